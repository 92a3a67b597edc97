"""Sharded ingestors with leases, under real faults: real Redis, the simulator, ingestors as processes.

Each test checks what is in Redis afterwards against the venue's own history: every trade id once, in order,
with no hole, whichever ingestor stored it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from venue_drill import complete, venue_last_trade, wait_for

from consumer_sdk.core.keys import heartbeat_set_key
from distributor.ingress import Policy
from ingestor.config import IngestSettings
from ingestor.leases import LeaseSettings, LeaseStore, fence_key, lease_key, shard_of
from ingestor.service import Ingestor
from ingestor.session import SessionSettings
from ops.simulator import Simulator, SimulatorConfig
from ops.status import Level, evaluate, read_heartbeats

FAST = SessionSettings(ping_interval=1.0, ping_timeout=2.0, open_timeout=2.0, backoff_base=0.05, backoff_cap=1.0)
SYMBOLS = ("BTCUSDT", "ETHUSDT")
TTL = 3.0
#: the old owner's ttl in the two-owners test: it renews every 20 s
SLOW_TTL = 60.0


def settings(sim: Simulator, prefix: str, spill: Path, *, count: int = 2, max_owned: int = 0) -> IngestSettings:
    return IngestSettings(
        url=sim.ws_url, rest_url=sim.rest_url, symbols=SYMBOLS, channels=("trade", "agg_trade"), prefix=prefix,
        session=FAST, queue_policy=Policy.BLOCK, spill_dir=str(spill),
        shards=LeaseSettings(count=count, max_owned=max_owned, ttl_s=TTL),
    )


async def owners(redis: aioredis.Redis, prefix: str, count: int = 2) -> dict[int, str | None]:
    held = await LeaseStore(redis, prefix, "reader").read(count)
    return {s: (None if h is None else h[1]) for s, h in held.items()}


async def stored_ids(redis: Any, key: str) -> list[int]:
    return [orjson.loads(f[b"d"])["seq"] for _, f in await redis.xrange(key)]


@asynccontextmanager
async def running(*ingestors: Ingestor) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(i.run()) for i in ingestors]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with pytest.raises(asyncio.CancelledError):
                await t


@pytest.mark.slow
async def test_two_ingestors_two_shards_each_owns_one_and_streams_are_split(
    aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    assert shard_of("BTCUSDT", 2) != shard_of("ETHUSDT", 2)
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, rate=1000.0, rest_weight_limit=0)) as sim:
        ings = [Ingestor(settings(sim, prefix, tmp_path / f"spill{i}", max_owned=1), redis=aredis) for i in (1, 2)]
        async with running(*ings):
            async def split() -> bool:
                held = [i.leases.tokens() if i.leases else {} for i in ings]
                return all(len(h) == 1 for h in held) and set(held[0]) != set(held[1])

            await wait_for(split, 20)
            for symbol in SYMBOLS:
                await complete(aredis, f"{prefix}:binance:{symbol}:trade", sim, symbol)
            for ing in ings:
                assert ing.leases is not None
                (shard,) = ing.leases.tokens()
                mine = {s for s in SYMBOLS if shard_of(s, 2) == shard}
                carried = {stream.split("@")[0].upper() for session in ing.sessions for stream in session.streams}
                assert carried == mine, "each ingestor subscribes to its own shard's symbols only"
            docs = await read_heartbeats(aredis, prefix)
            report = evaluate(docs, [], time.time())
            assert report.stage("leases").level is Level.OK, report.stage("leases").reason
            assert report.stage("leases").cause.startswith("2/2 shard(s) owned")
            tokens = sorted(o["token"] for d in docs for o in d["leases"]["owned"])
            assert tokens == [1, 2], "the fencing tokens are in the heartbeats"
    for symbol in SYMBOLS:
        agg = await stored_ids(aredis, f"{prefix}:binance:{symbol}:agg_trade")
        assert agg == list(range(agg[0], agg[0] + len(agg)))


@pytest.mark.slow
async def test_two_owners_at_once_are_harmless_because_of_the_entry_ids(
    aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """An owner that has not yet noticed its lease is gone (here: a ttl of 60 s and the leases taken from it just
    after a renewal, so its next renewal is 20 s away) goes on writing while the new owner writes the same streams.
    Nothing fences the writes (the token
    only fences the lease itself: the old owner can neither renew nor release the new one's); the entry IDs
    make them harmless: each seq is stored once, whoever sends it first, and no id is skipped."""
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, rate=1000.0, rest_weight_limit=0)) as sim:
        slow = IngestSettings(**{**_fields(settings(sim, prefix, tmp_path / "s1")),
                                 "shards": LeaseSettings(count=2, ttl_s=SLOW_TTL)})
        old = Ingestor(slow, redis=aredis)
        new = Ingestor(settings(sim, prefix, tmp_path / "s2"), redis=aredis)
        async with running(old):
            await wait_for(lambda: _holds(old, 2), 20)

            async def grown() -> bool:
                return all([await aredis.xlen(f"{prefix}:binance:{s}:trade") > 300 for s in SYMBOLS])

            await wait_for(grown, 20)
            async with running(new):
                await new.started.wait()

                async def just_renewed() -> bool:  # the old owner's next renewal is a whole SLOW_TTL / 3 away
                    return int(await aredis.pttl(lease_key(prefix, 0))) > SLOW_TTL * 1000 - 1000

                await wait_for(just_renewed, SLOW_TTL / 3 + 5)
                # As if the old owner's leases had expired in Redis: the new one takes them at its next round.
                await aredis.delete(lease_key(prefix, 0), lease_key(prefix, 1))
                await wait_for(lambda: _holds(new, 2), 10)
                assert old.writer is not None and new.writer is not None
                before = old.writer.stats()
                assert old.leases is not None and len(old.leases.held) == 2, "the old owner has not noticed yet"

                async def both_wrote() -> bool:
                    assert old.writer is not None and new.writer is not None
                    o, n = old.writer.stats(), new.writer.stats()
                    # each sent ticks the other may have stored first: a tick sent counts, stored or found there
                    return (o.appended + o.duplicates > before.appended + before.duplicates + 200
                            and n.appended + n.duplicates > 0)

                await wait_for(both_wrote, 10)
                assert old.leases is not None and len(old.leases.held) == 2, "both owners at once"
                await wait_for(lambda: _holds(old, 0), SLOW_TTL / 3 + 5)
                assert old.leases.lost == 2
                for symbol in SYMBOLS:
                    await complete(aredis, f"{prefix}:binance:{symbol}:trade", sim, symbol)
                dups = old.writer.stats().duplicates + new.writer.stats().duplicates
                assert dups > 0, "both sent the same ticks; each stream kept one of each"
        for symbol in SYMBOLS:
            agg = await stored_ids(aredis, f"{prefix}:binance:{symbol}:agg_trade")
            assert agg == list(range(agg[0], agg[0] + len(agg)))


def _fields(s: IngestSettings) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------- processes
async def start_ingest(sim: Simulator, redis_url: str, prefix: str, tmp: Path, name: str, *,
                       max_owned: int = 0) -> Any:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(
        "[session]\nping_interval = 1.0\nping_timeout = 2.0\nbackoff_cap = 1.0\n"
        f"[shards]\ncount = 2\nmax_owned = {max_owned}\nlease_ttl_s = {TTL}\n"
    )
    env = {**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}
    with (tmp / f"{name}.log").open("ab") as log_file:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "ingest", "--url", sim.ws_url, "--symbols", ",".join(SYMBOLS),
            "--channels", "trade,agg_trade", "--metrics-port", "0", "--spill-dir", str(tmp / f"spill-{name}"),
            "--config", str(cfg), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )


def events(log: Path, name: str) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in log.read_text().splitlines() if f'"{name}"' in x]


async def owner_and_standby(sim: Simulator, redis_url: str, aredis: aioredis.Redis, prefix: str,
                            tmp: Path) -> tuple[Any, Any, str]:
    """The owner of both shards, then a standby; returns both processes and the owner's id."""
    owner = await start_ingest(sim, redis_url, prefix, tmp, "owner")

    async def owned() -> bool:
        o = await owners(aredis, prefix)
        return None not in o.values() and len(set(o.values())) == 1

    await wait_for(owned, 20)
    owner_id = (await owners(aredis, prefix))[0]
    assert owner_id is not None
    standby = await start_ingest(sim, redis_url, prefix, tmp, "standby")

    async def standing_by() -> bool:
        return len(await aredis.smembers(heartbeat_set_key(prefix))) == 2

    await wait_for(standing_by, 20)
    assert events(tmp / "standby.log", "shards_held")[0]["standby"] is True

    async def grown() -> bool:
        return all([await aredis.xlen(f"{prefix}:binance:{s}:trade") > 300 for s in SYMBOLS])

    await wait_for(grown, 20)
    return owner, standby, owner_id


async def check_every_trade_once(aredis: aioredis.Redis, prefix: str, sim: Simulator) -> None:
    for symbol in SYMBOLS:
        ids = await complete(aredis, f"{prefix}:binance:{symbol}:trade", sim, symbol, timeout=40)
        assert ids, symbol
        agg = await stored_ids(aredis, f"{prefix}:binance:{symbol}:agg_trade")
        assert agg == list(range(agg[0], agg[0] + len(agg))), f"{symbol} agg_trade: a hole or a duplicate"


async def traded_on(sim: Simulator, trades: int) -> None:
    """Until the venue made ``trades`` more trades of each symbol."""
    tops = {s: await venue_last_trade(sim, s) for s in SYMBOLS}

    async def done() -> bool:
        return all([await venue_last_trade(sim, s) > top + trades for s, top in tops.items()])

    await wait_for(done, 30)


async def stop(*procs: Any) -> None:
    for p in procs:
        if p.returncode is None:
            p.terminate()
    for p in procs:
        await asyncio.wait_for(p.wait(), 30)


@pytest.mark.slow
async def test_a_sigkilled_owner_s_shards_are_taken_over_within_5s_with_no_hole(
    redis_url: str, aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    await _sigkill_takeover(redis_url, aredis, prefix, tmp_path)


@pytest.mark.slow
@pytest.mark.redis
async def test_on_a_cluster_a_sigkilled_owner_s_shards_are_taken_over_within_5s_with_no_hole(
    prefix: str, tmp_path: Path
) -> None:
    """The same on a Redis Cluster: the lease keys and the fence counter share a slot by their hash tag."""
    from consumer_sdk.core.redis import connect_redis
    from ops.redis_cluster import start_cluster

    with start_cluster(3, 0) as cluster:
        url = "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes[:2])
        client = await connect_redis(url)
        try:
            await _sigkill_takeover(url, client, prefix, tmp_path)
        finally:
            await client.aclose()


async def _sigkill_takeover(redis_url: str, aredis: aioredis.Redis, prefix: str, tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, rate=800.0, rest_weight_limit=0)) as sim:
        owner, standby, owner_id = await owner_and_standby(sim, redis_url, aredis, prefix, tmp_path)
        try:
            owner.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            await owner.wait()

            async def taken_over() -> bool:
                o = await owners(aredis, prefix)
                return all(v is not None and v != owner_id for v in o.values())

            await wait_for(taken_over, 15)
            took = time.monotonic() - killed
            print(f"\ntakeover after SIGKILL: {took:.2f} s (lease ttl {TTL:g} s, renewed every {TTL / 3:g} s)")
            assert took < 5.0
            await traded_on(sim, 200)
            await check_every_trade_once(aredis, prefix, sim)
            log = tmp_path / "standby.log"
            gained = events(log, "lease_gained")
            assert sorted(g["shard"] for g in gained) == [0, 1]
            assert min(g["token"] for g in gained) > 2, "new tokens, above the dead owner's"
            repaired = events(log, "gap_repaired")
            assert sum(r["fetched"] for r in repaired) > 0, "what the dead owner missed was backfilled over REST"
        finally:
            await stop(owner, standby)
    assert standby.returncode == 0


@pytest.mark.slow
async def test_a_frozen_owner_woken_after_a_takeover_stops_and_nothing_is_stored_twice(
    redis_url: str, aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """SIGSTOP past the ttl, the standby takes over, SIGCONT: for a moment both hold the shards' streams.
    Harmless because of the entry IDs (a seq at or below a stream's newest is skipped), not the token; the
    woken owner finds its leases expired at its next round and stops the shards' streams."""
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, rate=800.0, rest_weight_limit=0)) as sim:
        owner, standby, owner_id = await owner_and_standby(sim, redis_url, aredis, prefix, tmp_path)
        try:
            owner.send_signal(signal.SIGSTOP)
            frozen = time.monotonic()

            async def taken_over() -> bool:
                o = await owners(aredis, prefix)
                return all(v is not None and v != owner_id for v in o.values())

            await wait_for(taken_over, 15)
            print(f"\ntakeover from a frozen owner: {time.monotonic() - frozen:.2f} s")

            async def standby_writes() -> bool:
                return bool(events(tmp_path / "standby.log", "gap_repaired"))

            await wait_for(standby_writes, 20)
            owner.send_signal(signal.SIGCONT)
            log = tmp_path / "owner.log"

            async def owner_stopped() -> bool:
                return len(events(log, "lease_lost")) == 2

            await wait_for(owner_stopped, 15)
            assert {e["reason"] for e in events(log, "lease_lost")} <= {"expired", "taken"}

            async def owner_reports_nothing_held() -> bool:
                docs = {d.get("id"): d for d in await read_heartbeats(aredis, prefix)}
                doc = docs.get(owner_id)
                return doc is not None and doc.get("leases", {}).get("owned") == []

            await wait_for(owner_reports_nothing_held, 15)
            await traded_on(sim, 200)
            await check_every_trade_once(aredis, prefix, sim)
            report = evaluate(await read_heartbeats(aredis, prefix), [], time.time())
            assert report.stage("leases").level is Level.OK, report.stage("leases").reason
            assert "1 standby" in report.stage("leases").cause, "the woken owner is now the standby"
        finally:
            if owner.returncode is None:
                owner.send_signal(signal.SIGCONT)
            await stop(owner, standby)


# ---------------------------------------------------------------------------------------------- the store fails
async def test_leases_refused_at_start_is_one_line_and_exit_2(redis_url: str, aredis: aioredis.Redis, prefix: str,
                                                              tmp_path: Path) -> None:
    await aredis.hset(fence_key(prefix), "x", "1")  # INCR on it fails: the lease store refuses every take
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, rate=50.0, rest_weight_limit=0)) as sim:
        proc = await start_ingest(sim, redis_url, prefix, tmp_path, "refused")
        assert await asyncio.wait_for(proc.wait(), 30) == 2
        unreachable = await start_ingest(sim, "redis://127.0.0.1:1/0", prefix, tmp_path, "unreachable")
        assert await asyncio.wait_for(unreachable.wait(), 30) == 2
    lines = (tmp_path / "refused.log").read_text().strip().splitlines()
    assert lines[-1].startswith("market: error: cannot take shard leases at start from Redis at "), lines[-1]
    assert "WRONGTYPE" in lines[-1] and "Traceback" not in "\n".join(lines)
    last = (tmp_path / "unreachable.log").read_text().strip().splitlines()[-1]
    assert last.startswith("market: error: Redis unreachable at redis://127.0.0.1:1/0"), last


@pytest.mark.slow
async def test_a_failing_lease_store_at_run_time_is_counted_and_named_by_status(
    aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, rate=200.0, rest_weight_limit=0)) as sim:
        owner = Ingestor(settings(sim, prefix, tmp_path / "s1"), redis=aredis)
        standby = Ingestor(settings(sim, prefix, tmp_path / "s2"), redis=aredis)
        async with running(owner):
            await wait_for(lambda: _holds(owner, 2), 20)
            async with running(standby):
                await standby.started.wait()
                # Shard 0's lease gone (as if expired) and the fencing counter unusable: every take fails, every
                # round, for the owner (below its limit now) and the standby alike.
                await aredis.delete(fence_key(prefix))
                await aredis.hset(fence_key(prefix), "x", "1")
                await aredis.delete(lease_key(prefix, 0))

                async def named() -> bool:
                    report = evaluate(await read_heartbeats(aredis, prefix), [], time.time())
                    return report.stage("leases").level is Level.FAIL and "cannot reach its lease store" in (
                        report.stage("leases").cause)

                await wait_for(named, 20)
                assert owner.leases is not None and owner.leases.errors >= 1 and owner.leases.lost == 1
                assert "WRONGTYPE" in owner.leases.failing
                assert standby.leases is not None and standby.leases.errors >= 1
                await aredis.delete(fence_key(prefix))
                await aredis.set(fence_key(prefix), 100)  # tokens go on growing

                async def recovered() -> bool:
                    report = evaluate(await read_heartbeats(aredis, prefix), [], time.time())
                    return report.stage("leases").level is Level.OK

                await wait_for(recovered, 20)
                assert (await LeaseStore(aredis, prefix, "reader").read(2))[0][0] > 100  # type: ignore[index]
                for symbol in SYMBOLS:
                    await complete(aredis, f"{prefix}:binance:{symbol}:trade", sim, symbol)


async def _holds(ing: Ingestor, n: int) -> bool:
    return ing.leases is not None and len(ing.leases.held) == n
