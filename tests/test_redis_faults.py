"""The Redis tier under real faults: Redis stopped and restarted, an ingestor killed, two ingestors at once.

Each test checks what is in Redis afterwards: every trade id the venue made, exactly once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from venue_drill import complete, ingestor_running, spot_caught_up, stream_coverage, venue_last_trade, wait_for

from consumer_sdk.core.tick import is_gap_marker
from distributor.ingress import Policy
from distributor.spill import MAGIC, SpillLog
from distributor.writer import StreamWriter
from ingestor.config import IngestSettings
from ingestor.repair import GapRepairer, RepairSettings
from ingestor.service import Ingestor, plan_spill_recovery
from ingestor.session import SessionSettings
from ops.redis_server import restart, start_redis
from ops.simulator import Simulator, SimulatorConfig

FAST = SessionSettings(ping_interval=1.0, ping_timeout=2.0, open_timeout=2.0, backoff_base=0.05, backoff_cap=1.0)


def ingest_settings(sim: Simulator, prefix: str, spill_dir: str, **kw: Any) -> IngestSettings:
    return IngestSettings(
        url=sim.ws_url, rest_url=sim.rest_url, symbols=("BTCUSDT", "ETHUSDT"), channels=("trade", "agg_trade"),
        prefix=prefix, session=FAST, queue_policy=Policy.BLOCK, spill_dir=spill_dir, **kw,
    )


@pytest.mark.slow
async def test_redis_down_10s_with_aof_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """2k events/s; Redis (AOF on) stopped until the writer's memory (2000) is full and 10k more ticks wait in
    the spill log (about 10 s of this feed), then started again: the writer drains memory and the log in order."""
    with start_redis(appendonly=True) as server:
        client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=2000.0)) as sim:
            ing = Ingestor(
                ingest_settings(sim, "md", str(tmp_path / "spill"), writer_capacity=2000), redis=client
            )
            task = asyncio.create_task(ing.run())
            try:
                async def flowing() -> bool:
                    return await client.xlen("md:binance:BTCUSDT:trade") > 200

                await wait_for(flowing, 20)
                server.stop()
                peak_buffered = 0

                async def spilled_10k() -> bool:  # Redis stays down while the venue keeps trading
                    nonlocal peak_buffered
                    assert ing.writer is not None
                    held = ing.writer.stats()
                    peak_buffered = max(peak_buffered, held.buffered)
                    return held.spilled >= 10_000

                await wait_for(spilled_10k, 90)
                restart(server, appendonly=True)
                assert ing.writer is not None
                stats = ing.writer.stats()
                for symbol in ("BTCUSDT", "ETHUSDT"):
                    await complete(client, f"md:binance:{symbol}:trade", sim, symbol, timeout=40)
                after = ing.writer.stats()
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await client.aclose()
    assert stats.errors > 0
    assert after.spill_drained > 0, "the outage outlasted the memory buffer, so ticks went through the spill log"
    assert peak_buffered <= 2000 + 20_000  # the memory bound (plus at most one batch) held during the outage
    assert after.spilled == 0  # the spill log was drained; live ticks keep flowing through memory meanwhile
    assert after.buffered < 2000


async def _run_cli_ingest(sim: Simulator, redis_url: str, prefix: str, spill: Path, log: Path) -> Any:
    env = {**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}
    cfg = log.with_suffix(".toml")
    cfg.write_text("[session]\nping_interval = 1.0\nping_timeout = 2.0\nbackoff_cap = 1.0\n")
    with log.open("ab") as log_file:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "ingest", "--url", sim.ws_url, "--symbols", "BTCUSDT",
            "--channels", "trade,agg_trade", "--metrics-port", "0", "--spill-dir", str(spill), "--config", str(cfg),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )


@pytest.mark.slow
async def test_sigkill_and_restart_backfills_the_downtime(redis_url: str, aredis: aioredis.Redis, prefix: str,
                                                          tmp_path: Path) -> None:
    key = f"{prefix}:binance:BTCUSDT:trade"
    async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=1500.0)) as sim:
        first = await _run_cli_ingest(sim, redis_url, prefix, tmp_path / "spill", tmp_path / "one.log")

        async def grown(n: int) -> bool:
            return await aredis.xlen(key) >= n

        await wait_for(lambda: grown(300), 20)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        before = await aredis.xlen(key)
        top = await aredis.xrevrange(key, count=1)
        stored_top = int(top[0][0].split(b"-")[1])

        async def traded_on() -> bool:  # the ingestor stays dead while the venue makes 1000 more trades
            return await venue_last_trade(sim, "BTCUSDT") >= stored_top + 1000

        await wait_for(traded_on, 30)
        second = await _run_cli_ingest(sim, redis_url, prefix, tmp_path / "spill", tmp_path / "two.log")
        try:
            ids = await complete(aredis, key, sim, "BTCUSDT", timeout=30)
        finally:
            second.terminate()
            assert await asyncio.wait_for(second.wait(), 15) == 0
    assert len(ids) > before
    log = (tmp_path / "two.log").read_text()
    repaired = [orjson.loads(x) for x in log.splitlines() if '"gap_repaired"' in x]
    assert repaired and sum(r["fetched"] for r in repaired) > 0, "the downtime was backfilled over REST"


async def test_two_ingestors_on_the_same_feed_store_each_tick_once(aredis: aioredis.Redis, prefix: str,
                                                                   tmp_path: Path) -> None:
    async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=2000.0)) as sim:
        ings = [Ingestor(ingest_settings(sim, prefix, str(tmp_path / f"spill{i}")), redis=aredis) for i in (1, 2)]
        tasks = [asyncio.create_task(i.run()) for i in ings]
        try:
            async def grown() -> bool:
                return await aredis.xlen(f"{prefix}:binance:BTCUSDT:trade") > 1500

            await wait_for(grown, 30)
            for symbol in ("BTCUSDT", "ETHUSDT"):
                await complete(aredis, f"{prefix}:binance:{symbol}:trade", sim, symbol)
                entries = await aredis.xrange(f"{prefix}:binance:{symbol}:agg_trade")
                agg = [orjson.loads(f[b"d"])["seq"] for _, f in entries]
                assert agg == sorted(set(agg))
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with pytest.raises(asyncio.CancelledError):
                    await t
    dups = [i.writer.stats().duplicates for i in ings if i.writer is not None]
    assert sum(dups) > 0, "both wrote the same ticks; the stream kept one of each"


def test_spill_dir_held_by_another_ingestor_is_refused(tmp_path: Path) -> None:
    import fcntl

    from consumer_sdk.core.errors import ConfigError

    spill = tmp_path / "spill"
    spill.mkdir()
    fd = os.open(spill / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        ing = Ingestor(IngestSettings(url="ws://127.0.0.1:1", spill_dir=str(spill)))
        with pytest.raises(ConfigError, match="in use by another ingestor"):
            ing._open_spill()
    finally:
        os.close(fd)




# -- stops and full disks during an outage: every trade id stored or marked -------------------------------------
DRILL_RATE = float(os.environ.get("MARKET_DRILL_RATE", "10000"))


async def _start_ingest(
    sim: Simulator, redis_url: str, spill: Path, log: Path, *, toml: str = "", env: dict[str, str] | None = None
) -> Any:
    """``market ingest`` as a child process on BTCUSDT trades and aggregate trades, keeping every entry."""
    cfg = log.with_suffix(".toml")
    cfg.write_text(
        "[session]\nping_interval = 1.0\nping_timeout = 2.0\nbackoff_cap = 1.0\n[retention]\nmaxlen = 0\n" + toml
    )
    with log.open("ab") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "ingest", "--url", sim.ws_url, "--symbols", "BTCUSDT",
            "--channels", "trade,agg_trade", "--metrics-port", "0", "--spill-dir", str(spill), "--config", str(cfg),
            env={**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": "md", **(env or {})},
            stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        if f'"event":"{name}"' in line:
            out.append(orjson.loads(line))
    return out


async def _log_shows(log: Path, name: str, timeout: float) -> dict[str, Any]:
    async def shown() -> bool:
        return bool(_events(log, name))

    await wait_for(shown, timeout)
    return _events(log, name)[0]


async def _no_unmarked_hole(redis: aioredis.Redis, targets: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """Each BTCUSDT stream holds or marks every id from its first up to ``targets[channel]`` (the venue's newest
    at catch-up); ``(range, stored, marked)`` of each, as counts."""
    report = {}
    for channel, upto in targets.items():
        start, stored, marked, holes = await stream_coverage(redis, f"md:binance:BTCUSDT:{channel}", upto)
        assert holes == [], f"{channel}: unmarked holes {holes[:5]}"
        report[channel] = (upto - start + 1, len(stored), len(marked))
    return report


async def _check_against_venue(redis: aioredis.Redis, sim: Simulator, first_id: int) -> int:
    """The stored trades from ``first_id`` that the venue still lists match it (price, quantity); how many
    were compared (up to 1000)."""
    import json
    import urllib.request

    def get() -> Any:
        url = f"{sim.rest_url}/api/v3/historicalTrades?symbol=BTCUSDT&fromId={first_id}&limit=1000"
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())

    venue = {int(row["id"]): row for row in await asyncio.to_thread(get)}
    compared = 0
    start = "-"
    while True:
        page = await redis.xrange("md:binance:BTCUSDT:trade", start, "+", count=50_000)
        for _, fields in page:
            t = orjson.loads(fields[b"d"])
            row = venue.get(t["seq"])
            if row is not None and not is_gap_marker(t):
                assert (t["price"], t["qty"]) == (row["price"], row["qty"]), (t, row)
                compared += 1
        if len(page) < 50_000:
            return compared
        start = "(" + page[-1][0].decode()


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "2m") -> Iterator[bool]:
    """A tmpfs of ``size`` mounted on ``path`` (True), or False where this sandbox refuses the mount."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_sigterm_during_an_outage_saves_what_the_process_holds(tmp_path: Path) -> None:
    """Redis (AOF) stopped; once the writer's memory is full and the spill log in use, SIGTERM: exit 0 with
    everything saved, said in the last log line; after Redis and the ingestor restart, every trade id from the
    first stored to the venue's newest is stored or inside a gap marker, and what is stored matches the venue."""
    spill, one, two = tmp_path / "spill", tmp_path / "one.log", tmp_path / "two.log"
    with start_redis(appendonly=True) as server:
        client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=DRILL_RATE)) as sim:
            first = await _start_ingest(sim, server.url, spill, one)
            second = None
            try:
                async def flowing() -> bool:
                    return await client.xlen("md:binance:BTCUSDT:trade") > 1000

                await wait_for(flowing, 30)
                server.stop()
                await _log_shows(one, "spilling_to_disk", 120)  # memory is full: newer ticks go to the spill log

                async def spilled() -> bool:  # about 30k ticks on disk besides the 200k in memory
                    return sum(p.stat().st_size for p in spill.glob("seg-*.spill")) >= 10 << 20

                await wait_for(spilled, 60)
                first.send_signal(signal.SIGTERM)
                signalled = asyncio.get_running_loop().time()
                rc = await asyncio.wait_for(first.wait(), 60)
                stop_s = asyncio.get_running_loop().time() - signalled
                last = orjson.loads(one.read_text().splitlines()[-1])
                assert rc == 0, last
                assert last["event"] == "stopped" and last["unsaved"] == 0, last
                assert last["to_spill"] > 0 and last["to_redis"] == 0
                restart(server, appendonly=True)
                second = await _start_ingest(sim, server.url, spill, two)
                targets = await spot_caught_up(client, sim, "md", 240)
                report = await _no_unmarked_hole(client, targets)
                compared = await _check_against_venue(client, sim, (await venue_last_trade(sim, "BTCUSDT")) - 150_000)
            finally:
                for proc in (first, second):
                    if proc is not None and proc.returncode is None:
                        proc.terminate()
                        await asyncio.wait_for(proc.wait(), 60)
                await client.aclose()
    found = _events(two, "spill_found_at_start")[0]
    assert found["holes"] == [], "what the stop saved is contiguous with what Redis holds"
    print(f"\nstop drill: rate {DRILL_RATE:.0f}/s; SIGTERM with {found['records'] - last['to_spill']} ticks in the "
          f"spill log: the stop saved {last['to_spill']} more to it ({last}); the restart found {found['records']} "
          f"records, no hole; ids (range, stored, marked) up to the venue's newest at catch-up: {report}; "
          f"{compared} stored trades compared with the venue; SIGTERM to exit {stop_s:.1f} s")
    assert compared == 1000


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_a_full_spill_disk_during_an_outage_is_survived(tmp_path: Path) -> None:
    """The spill log on a 2 MB filesystem (or, where mounting is refused, a 2 MB cap), Redis stopped long
    enough to fill memory, the log and the ingress (20k here, so the venue goes unread for most of the rest):
    the ingestor logs ``spill_full``, stops reading the venue, and once Redis is back it is still alive 20 s
    later with no traceback, every trade id stored or marked."""
    outage = float(os.environ.get("MARKET_DRILL_OUTAGE_S", "40"))
    spill, one = tmp_path / "disk", tmp_path / "one.log"
    with small_filesystem(spill) as mounted, start_redis(appendonly=True) as server:
        toml = "" if mounted else "[spill]\nmax_mb = 2\n"
        client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=DRILL_RATE)) as sim:
            proc = await _start_ingest(sim, server.url, spill, one, toml=toml, env={"MARKET_QUEUE_CAPACITY": "20000"})
            try:
                async def flowing() -> bool:
                    return await client.xlen("md:binance:BTCUSDT:trade") > 1000

                await wait_for(flowing, 30)
                server.stop()
                stopped = asyncio.get_running_loop().time()
                full = await _log_shows(one, "spill_full", 180)
                assert ("disk full" if mounted else "cap") in full["reason"]

                async def outage_over() -> bool:
                    return asyncio.get_running_loop().time() - stopped >= outage

                await wait_for(outage_over, outage + 1)
                assert proc.returncode is None
                restart(server, appendonly=True)
                back = asyncio.get_running_loop().time()
                targets = await spot_caught_up(client, sim, "md", 300)

                async def twenty_s_later() -> bool:
                    return asyncio.get_running_loop().time() - back >= 20 or proc.returncode is not None

                await wait_for(twenty_s_later, 30)
                assert proc.returncode is None, "the ingestor died"
                report = await _no_unmarked_hole(client, targets)
            finally:
                if proc.returncode is None:
                    proc.terminate()
                    await asyncio.wait_for(proc.wait(), 60)
                await client.aclose()
    text = one.read_text()
    assert "Traceback" not in text and '"exception"' not in text
    drained = _events(one, "spill_drained")
    repairs = [(e["stream"], e["fetched"], e["missing"]) for e in _events(one, "gap_repaired")
               + _events(one, "gap_partly_repaired") + _events(one, "gap_marked")]
    reconnects = len([e for e in _events(one, "session_state") if e.get("previous") == "backing_off"])
    print(f"\nfull-spill drill ({'2 MB tmpfs' if mounted else '2 MB cap'}): rate {DRILL_RATE:.0f}/s, outage "
          f"{outage:.0f} s, spill_full at {full['bytes']} bytes / {full['records']} records, drained "
          f"{drained[-1]['drained'] if drained else 0}; venue reconnects {reconnects}, repairs {repairs}; "
          f"ids (range, stored, marked): {report}")


async def test_a_start_repairs_the_hole_between_redis_and_the_spill_before_draining_it(
    aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """Redis holds trade ids up to R, the spill log holds R+101 on (what a stop that lost its memory leaves),
    and a record in the middle of the log's first segment is corrupt on disk: the restart fetches R+1..R+100
    from the venue and stores them before draining the log (the append script would otherwise skip them as
    older than the log's ticks), and puts the ids lost with the cut right after the cut segment."""
    copy = f"{prefix}x"
    src, dst = f"{prefix}:binance:BTCUSDT:trade", f"{copy}:binance:BTCUSDT:trade"
    try:
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=1000.0)) as sim:
            first = Ingestor(ingest_settings(sim, prefix, str(tmp_path / "one")), redis=aredis)
            async with ingestor_running(first):
                async def grown() -> bool:
                    return await aredis.xlen(src) >= 600

                await wait_for(grown, 30)
            entries = await aredis.xrange(src)
            kept, tail = entries[:-300], entries[-300:]
            pipe = aredis.pipeline(transaction=False)
            for entry_id, fields in kept:
                pipe.xadd(dst, fields, id=entry_id)
            await pipe.execute()
            payloads = [fields[b"d"] for _, fields in tail[100:]]
            spill = SpillLog(tmp_path / "two", segment_bytes=1)  # one segment per append
            spill.append(payloads[:100])
            spill.append(payloads[100:])
            spill.close()
            first_segment = sorted((tmp_path / "two").glob("seg-*.spill"))[0]
            at = len(MAGIC) + sum(8 + len(p) for p in payloads[:50]) + 8 + 10
            raw = bytearray(first_segment.read_bytes())
            raw[at] ^= 0x01  # bit rot in the 51st record: it and the 49 after it in that segment are lost
            first_segment.write_bytes(bytes(raw))
            hole = [orjson.loads(f[b"d"])["seq"] for _, f in tail[:100]]
            cut = [orjson.loads(p)["seq"] for p in payloads[50:100]]

            second = Ingestor(ingest_settings(sim, copy, str(tmp_path / "two")), redis=aredis)
            async with ingestor_running(second):
                ids = await complete(aredis, dst, sim, "BTCUSDT", timeout=60)
        assert set(hole) <= set(ids) and set(cut) <= set(ids)
        assert second.repairer is not None and second.repairer.ticks_repaired.get("trade", 0) >= 150
        assert second.repairer.gaps_unrepaired == 0
    finally:
        keys = [k async for k in aredis.scan_iter(f"{copy}:*")]
        if keys:
            await aredis.delete(*keys)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_sigterm_with_the_spill_disk_full_exits_1_and_the_restart_repairs_what_was_lost(
    tmp_path: Path,
) -> None:
    """Redis stopped and the spill log's 2 MB filesystem full: SIGTERM saves what fits, exits 1, and names
    how many ticks were saved nowhere in its last log line; the restart repairs the hole between Redis and
    the log from the venue before draining it, so every trade id is stored or marked."""
    spill, one, two = tmp_path / "disk", tmp_path / "one.log", tmp_path / "two.log"
    with small_filesystem(spill) as mounted, start_redis(appendonly=True) as server:
        toml = "" if mounted else "[spill]\nmax_mb = 2\n"
        client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=DRILL_RATE)) as sim:
            first = await _start_ingest(sim, server.url, spill, one, toml=toml)
            second = None
            try:
                async def flowing() -> bool:
                    return await client.xlen("md:binance:BTCUSDT:trade") > 1000

                await wait_for(flowing, 30)
                server.stop()
                await _log_shows(one, "spill_full", 180)
                first.send_signal(signal.SIGTERM)
                rc = await asyncio.wait_for(first.wait(), 60)
                last = orjson.loads(one.read_text().splitlines()[-1])
                assert rc == 1, last
                assert last["event"] == "stopped" and last["unsaved"] > 0 and "spill log" in last["error"], last
                restart(server, appendonly=True)
                second = await _start_ingest(sim, server.url, spill, two, toml=toml)
                targets = await spot_caught_up(client, sim, "md", 300)
                report = await _no_unmarked_hole(client, targets)
            finally:
                for proc in (first, second):
                    if proc is not None and proc.returncode is None:
                        proc.terminate()
                        await asyncio.wait_for(proc.wait(), 60)
                await client.aclose()
    found = _events(two, "spill_found_at_start")[0]
    filled = [e for e in _events(two, "gap_repaired") + _events(two, "gap_marked") + _events(two, "gap_partly_repaired")
              if e.get("where") == "between Redis and the spill log"]
    assert found["holes"] and filled, "the restart found the hole the lost memory left, and filled it"
    print(f"\nunsaved-stop drill ({'2 MB tmpfs' if mounted else '2 MB cap'}): rate {DRILL_RATE:.0f}/s; {last}; "
          f"restart: {found['records']} records in the log, holes {found['holes']}, filled "
          f"{[(e['stream'], e['fetched'], e['missing']) for e in filled]}; ids (range, stored, marked): {report}")


async def test_a_stop_during_an_outage_puts_memory_in_front_of_the_spill(tmp_path: Path) -> None:
    """In process, small buffers: Redis (AOF) stopped until the writer's memory is full and the spill log
    holds newer ticks, then the ingestor is cancelled.  Its memory goes to a front segment, the rest to the
    log's end, nothing unsaved; the next ingestor stores every trade id exactly once, in order."""
    with start_redis(appendonly=True) as server:
        client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        try:
            async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=2000.0)) as sim:
                settings = ingest_settings(sim, "md", str(tmp_path / "spill"), writer_capacity=3000)
                first = Ingestor(settings, redis=client)
                async with ingestor_running(first):
                    async def flowing() -> bool:
                        return await client.xlen("md:binance:BTCUSDT:trade") > 200

                    await wait_for(flowing, 20)
                    server.stop()

                    async def memory_full_and_spilling() -> bool:
                        assert first.writer is not None and first.writer.spill is not None
                        return first.writer.stats().buffered >= 3000 and len(first.writer.spill) >= 1000

                    await wait_for(memory_full_and_spilling, 30)
                report = first.stop_report
                assert report is not None and report.unsaved == 0 and report.to_redis == 0
                assert report.to_spill >= 3000
                restart(server, appendonly=True)
                # What the stop saved continues what Redis holds: nothing for the next start to repair.
                stored = {}
                for symbol in ("BTCUSDT", "ETHUSDT"):
                    for channel in ("trade", "agg_trade"):
                        top = await client.xrevrange(f"md:binance:{symbol}:{channel}", count=1)
                        stored[("binance", symbol, channel)] = int(top[0][0].split(b"-")[1])
                log = SpillLog(tmp_path / "spill")
                spilled = [(seg, orjson.loads(raw)) for seg, raw in log.scan_segments()]
                log.close()
                assert plan_spill_recovery(stored, spilled)[1] == []
                second = Ingestor(settings, redis=client)
                async with ingestor_running(second):
                    for symbol in ("BTCUSDT", "ETHUSDT"):
                        await complete(client, f"md:binance:{symbol}:trade", sim, symbol, timeout=40)
        finally:
            await client.aclose()


# -- a stop or a start meeting a Redis that takes part of what it is given ----------------------------------------
def _trade(symbol: str, seq: int) -> Any:
    return {"v": 1, "venue": "binance", "symbol": symbol, "channel": "trade", "seq": seq,
            "ts_event": (1_700_000_000_000 + seq) * 1000, "ts_recv": (1_700_000_000_000 + seq) * 1000 + 5,
            "trade_id": seq, "price": "1.5", "qty": "2", "side": "buy"}


async def _refuse_one_stream(redis: aioredis.Redis, prefix: str, symbol: str) -> None:
    """A key of another type at ``symbol``'s trade stream and at the dead-letter stream: Redis stores the other
    streams and refuses this one's ticks for as long as the keys stay (they can go to neither place)."""
    await redis.set(f"{prefix}:binance:{symbol}:trade", b"not a stream")
    await redis.set(f"{prefix}:deadletter", b"not a stream either")


async def test_a_stop_saves_to_the_spill_log_only_what_redis_did_not_take(
    aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """Redis stores BTCUSDT and refuses ETHUSDT (a key of another type there, and at the dead-letter stream):
    the stop's flush counts BTCUSDT as stored and puts only ETHUSDT's ticks in the spill log."""
    await _refuse_one_stream(aredis, prefix, "ETHUSDT")
    ing = Ingestor(IngestSettings(url="ws://127.0.0.1:1", prefix=prefix, spill_dir=str(tmp_path / "spill")))
    spill = SpillLog(tmp_path / "spill")
    ing.writer = StreamWriter(aredis, prefix=prefix, spill=spill)
    ticks = [_trade(sym, seq) for seq in range(1, 51) for sym in ("BTCUSDT", "ETHUSDT")]
    assert ing.writer.submit(ticks)
    try:
        report = await ing._flush_on_exit()
        assert (report.to_redis, report.to_spill, report.unsaved) == (50, 50, 0), report
        assert "Redis: dead-letter stream" in report.error and "WRONGTYPE" in report.error, report
        saved = [orjson.loads(raw) for raw in spill.scan()]
    finally:
        spill.close()
    assert [(t["symbol"], t["seq"]) for t in saved] == [("ETHUSDT", s) for s in range(1, 51)]
    stored = [orjson.loads(f[b"d"])["seq"] for _, f in await aredis.xrange(f"{prefix}:binance:BTCUSDT:trade")]
    assert stored == list(range(1, 51))


async def test_a_start_puts_in_front_of_the_spill_log_only_the_repairs_redis_did_not_take(
    aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """Redis holds ids up to 5 of two streams and the spill log 10 on: the start fills 6..9 of each (marked:
    repair is off) before the log drains.  Redis takes BTCUSDT's and refuses ETHUSDT's: only ETHUSDT's goes to
    a front segment of the log, ahead of its records."""
    await _refuse_one_stream(aredis, prefix, "ETHUSDT")
    pipe = aredis.pipeline(transaction=False)
    for seq in range(1, 6):
        t = _trade("BTCUSDT", seq)
        pipe.xadd(f"{prefix}:binance:BTCUSDT:trade", {"d": orjson.dumps(t)}, id=f"{t['ts_event'] // 1000}-{seq}")
    await pipe.execute()
    spill = SpillLog(tmp_path / "spill")
    spill.append([orjson.dumps(_trade(sym, 10)) for sym in ("BTCUSDT", "ETHUSDT")])
    stored = {("binance", "BTCUSDT", "trade"): 5, ("binance", "ETHUSDT", "trade"): 5}
    ing = Ingestor(IngestSettings(url="ws://127.0.0.1:1", prefix=prefix, spill_dir=str(tmp_path / "spill"),
                                  repair=RepairSettings(enabled=False)))
    ing._spill_holes = plan_spill_recovery(stored, [(seg, orjson.loads(raw)) for seg, raw in spill.scan_segments()])[1]
    assert len(ing._spill_holes) == 2
    ing.writer = StreamWriter(aredis, prefix=prefix, spill=spill)
    ing.repairer = GapRepairer(None, ing.ingress, ing.sequencer, RepairSettings(enabled=False))
    try:
        async with asyncio.timeout(30):
            await ing._fill_spill_holes()
        assert ing._start_pending == []
        in_log = [orjson.loads(raw) for raw in spill.scan()]
    finally:
        spill.close()
    marker = in_log[0]
    assert is_gap_marker(marker) and marker["symbol"] == "ETHUSDT", in_log
    assert (marker["gap_first"], marker["gap_last"]) == (6, 9)
    assert [(t["symbol"], t["seq"]) for t in in_log[1:]] == [("BTCUSDT", 10), ("ETHUSDT", 10)], "nothing else added"
    top = orjson.loads((await aredis.xrevrange(f"{prefix}:binance:BTCUSDT:trade", count=1))[0][1][b"d"])
    assert is_gap_marker(top) and (top["gap_first"], top["gap_last"]) == (6, 9), "BTCUSDT's went to Redis"
