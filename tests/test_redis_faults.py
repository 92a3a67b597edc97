"""The Redis tier under real faults: Redis stopped and restarted, an ingestor killed, two ingestors at once.

Each test checks what is in Redis afterwards: every trade id the venue made, exactly once, in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from consumer_sdk.tick import is_gap_marker
from distributor.ingress import Policy
from ingestor.config import IngestSettings
from ingestor.service import Ingestor
from ingestor.session import SessionSettings
from ops.redis_server import restart, start_redis
from ops.simulator import Simulator, SimulatorConfig

FAST = SessionSettings(ping_interval=1.0, ping_timeout=2.0, open_timeout=2.0, backoff_base=0.05, backoff_cap=1.0)


async def wait_for(predicate: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


async def venue_last_trade(sim: Simulator, symbol: str) -> int:
    import json
    import urllib.request

    def get() -> Any:
        with urllib.request.urlopen(f"{sim.rest_url}/api/v3/trades?symbol={symbol}&limit=1", timeout=5) as r:
            return json.loads(r.read())

    return int((await asyncio.to_thread(get))[-1]["id"])


async def complete(redis: aioredis.Redis, key: str, sim: Simulator, symbol: str, timeout: float = 30) -> list[int]:
    """Wait until ``key`` reaches the venue's newest trade; return its ids (checked contiguous, unique)."""
    target = await venue_last_trade(sim, symbol)

    async def caught_up() -> bool:
        try:
            top = await redis.xrevrange(key, count=1)
        except (RedisConnectionError, OSError):  # the first use of a pooled connection after a Redis restart
            return False
        return bool(top) and int(top[0][0].split(b"-")[1]) >= target

    await wait_for(caught_up, timeout)
    ids = []
    for _, fields in await redis.xrange(key):
        tick = orjson.loads(fields[b"d"])
        assert not is_gap_marker(tick), tick
        ids.append(tick["seq"])
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"{key}: not every id exactly once in order"
    return ids


def ingest_settings(sim: Simulator, prefix: str, spill_dir: str, **kw: Any) -> IngestSettings:
    return IngestSettings(
        url=sim.ws_url, rest_url=sim.rest_url, symbols=("BTCUSDT", "ETHUSDT"), channels=("trade", "agg_trade"),
        prefix=prefix, session=FAST, queue_policy=Policy.BLOCK, spill_dir=spill_dir, **kw,
    )


@pytest.mark.slow
async def test_redis_down_10s_with_aof_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """2k ticks/s; Redis (AOF on) stopped for 10 s and started again: the writer spills, then drains in order."""
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
                for _ in range(100):  # Redis is down for 10 s while the venue keeps trading
                    await asyncio.sleep(0.1)
                    assert ing.writer is not None
                    peak_buffered = max(peak_buffered, ing.writer.stats().buffered)
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
        await asyncio.sleep(2)  # the ingestor stays dead for 2 s while the venue trades on
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

    from consumer_sdk.errors import ConfigError

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


