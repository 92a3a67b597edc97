"""The venue session heals: real faults (closed sockets, stalls, black-holed links, rotations) on the real Redis.

Every check reads what reached Redis: the trade ids of each stream must be contiguous (nothing lost,
nothing stored twice, in order), up to what the venue had made.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import venue_drill as drill
from venue_drill import run_ingestor_fixture, state_log_fixture  # noqa: F401 - the fixtures run_ingestor and state_log

from distributor.ingress import Policy
from ingestor.config import IngestSettings
from ingestor.lifecycle import SessionState
from ingestor.session import SessionSettings
from ops.faultproxy import FaultProxy
from ops.simulator import Simulator, SimulatorConfig


def settings(url: str, rest: str, prefix: str, symbols: tuple[str, ...], channels: tuple[str, ...] = ("trade",),
             session: SessionSettings = drill.FAST, **kw: Any) -> IngestSettings:
    return IngestSettings(
        url=url, rest_url=rest, symbols=symbols, channels=channels, prefix=prefix, session=session,
        queue_policy=Policy.BLOCK, **kw,
    )


async def assert_complete(redis: aioredis.Redis, prefix: str, sim: Simulator, symbols: tuple[str, ...],
                          timeout: float = 30.0) -> dict[str, int]:
    """Each trade stream holds every id from its first up to what the venue had made when asked."""
    return {s: len(await drill.complete(redis, f"{prefix}:binance:{s}:trade", sim, s, timeout)) for s in symbols}


async def test_close_every_few_seconds_for_a_minute(run_ingestor: Any, aredis: aioredis.Redis, prefix: str,
                                                    state_log: drill.StateLog) -> None:
    symbols = ("BTCUSDT", "ETHUSDT")
    async with Simulator(SimulatorConfig(symbols=symbols, rate=600.0, close_every=4.0)) as sim:
        ing = await run_ingestor(settings(sim.ws_url, sim.rest_url, prefix, symbols))
        await drill.ride_out_close_storm(ing)
        counts = await assert_complete(aredis, prefix, sim, symbols)
    drill.assert_close_storm_ridden(state_log, ing, counts)


async def test_stall_is_detected_within_the_timeout(run_ingestor: Any, aredis: aioredis.Redis, prefix: str,
                                                    state_log: drill.StateLog) -> None:
    """The venue keeps the socket and goes silent for an hour (no frame, no pong): the session drops the
    connection by itself, through our ping's timeout or the no-frame watchdog, while the venue is still silent;
    once the venue speaks again the stream is whole."""
    symbols = ("BTCUSDT",)
    async with Simulator(SimulatorConfig(symbols=symbols, rate=400.0)) as sim:
        ing = await run_ingestor(settings(sim.ws_url, sim.rest_url, prefix, symbols))
        await drill.stall_noticed_while_silent(ing, sim, state_log)
        await assert_complete(aredis, prefix, sim, symbols)


async def test_rotation_before_max_age_loses_and_duplicates_nothing(
    run_ingestor: Any, aredis: aioredis.Redis, prefix: str, state_log: drill.StateLog
) -> None:
    symbols = ("BTCUSDT", "ETHUSDT")
    rotating = dataclasses.replace(drill.FAST, max_age=2.0)
    async with Simulator(SimulatorConfig(symbols=symbols, rate=800.0)) as sim:
        ing = await run_ingestor(settings(sim.ws_url, sim.rest_url, prefix, symbols, session=rotating))
        await drill.rotations(ing, 4, "four rotations")
        await assert_complete(aredis, prefix, sim, symbols)
        assert ing.sequencer.stats().gaps == 0
        assert ing.stats().reconnects == 0
        assert ing.repairer is not None and ing.repairer.gaps_unrepaired == 0
        assert not [f for _, f in state_log.records if f["event"] == "rotation_failed"]


async def test_server_shutdown_rotates_make_before_break(run_ingestor: Any, aredis: aioredis.Redis, prefix: str,
                                                         state_log: drill.StateLog) -> None:
    symbols = ("BTCUSDT", "ETHUSDT")
    cfg = SimulatorConfig(symbols=symbols, rate=800.0, max_connection_age=3.0, shutdown_notice=1.5)
    async with Simulator(cfg) as sim:
        ing = await run_ingestor(settings(sim.ws_url, sim.rest_url, prefix, symbols))
        await drill.rotations(ing, 3, "three rotations on serverShutdown")
        await assert_complete(aredis, prefix, sim, symbols)
        assert ing.sequencer.stats().gaps == 0
        assert ing.stats().reconnects == 0
    assert any(f.get("event") == "server_shutdown_notice" for _, f in state_log.records)


async def test_2000_streams_over_two_connections_within_rate_limit(
    run_ingestor: Any, aredis: aioredis.Redis, prefix: str
) -> None:
    symbols = tuple(f"S{i:03d}USDT" for i in range(500))
    channels = ("trade", "agg_trade", "book_ticker", "kline_1m")
    async with Simulator(SimulatorConfig(symbols=symbols, rate=500.0)) as sim:
        ing = await run_ingestor(settings(sim.ws_url, sim.rest_url, prefix, symbols, channels))
        await drill.until_live(ing, 30)
        assert len(ing.sessions) >= 2
        assert sum(len(s.streams) for s in ing.sessions) == 2000
        assert all(len(s.streams) <= 1024 for s in ing.sessions)
        assert sim.stats().rate_limit_closes == 0
        assert all(s.subscribe_errors == 0 and s.reconnects == 0 for s in ing.sessions)


def _rss_kib() -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+)", text)
    return int(m.group(1)) if m else 0


async def test_threads_and_memory_flat_across_100_reconnects(
    run_ingestor: Any, aredis: aioredis.Redis, prefix: str
) -> None:
    symbols = ("BTCUSDT",)
    quick = SessionSettings(ping_interval=5.0, ping_timeout=5.0, backoff_base=0.01, backoff_cap=0.02)
    async with Simulator(SimulatorConfig(symbols=symbols, rate=300.0)) as sim:
        ing = await run_ingestor(settings(sim.ws_url, sim.rest_url, prefix, symbols, session=quick))
        await drill.until_live(ing)
        session = ing.sessions[0]
        samples: dict[int, tuple[int, int]] = {}
        for i in range(1, 101):
            before = session.connects
            sim.close_all()

            async def reconnected(before: int = before) -> bool:
                return session.connects > before and session.state is SessionState.LIVE

            await drill.wait_for(reconnected, 10, f"reconnect {i}")
            if i in (20, 100):
                gc.collect()
                samples[i] = (threading.active_count(), _rss_kib())
        await assert_complete(aredis, prefix, sim, symbols)
    assert session.reconnects >= 100
    assert samples[100][0] == samples[20][0], samples
    assert samples[100][1] - samples[20][1] < 8 * 1024, samples  # KiB: no growth per reconnect


async def test_bad_frames_are_counted_and_the_stream_stays_whole(
    run_ingestor: Any, aredis: aioredis.Redis, prefix: str
) -> None:
    symbols = ("BTCUSDT",)
    async with Simulator(SimulatorConfig(symbols=symbols, rate=1000.0)) as sim:
        ing = await run_ingestor(settings(sim.ws_url, sim.rest_url, prefix, symbols))
        await drill.bad_frames_seen(ing, sim, 20)
        await assert_complete(aredis, prefix, sim, symbols)
        assert all(s.state is SessionState.LIVE for s in ing.sessions)
        assert ing.stats().reconnects == 0


@pytest.mark.slow
async def test_black_holed_link_for_30s_heals_with_backfill(redis_url: str, aredis: aioredis.Redis, prefix: str,
                                                            tmp_path: Path) -> None:
    """`market ingest` through a proxy that silently drops the link while the venue keeps trading: until the
    ingestor noticed and 3000 BTCUSDT trades (about 30 s of this feed) were made behind the cut."""
    symbols = ("BTCUSDT", "ETHUSDT")
    config = tmp_path / "ingest.toml"
    config.write_text(drill.BLACK_HOLE_CONFIG)
    log_path = tmp_path / "ingest.log"
    async with Simulator(SimulatorConfig(symbols=symbols, rate=600.0)) as sim, FaultProxy(sim.port) as proxy:
        args = ["--url", proxy.url, "--symbols", ",".join(symbols), "--channels", "trade", "--metrics-port", "0",
                "--config", str(config)]
        async with drill.market_ingest(args, redis_url, prefix, log_path) as proc:
            async def flowing() -> bool:
                return all([await aredis.xlen(f"{prefix}:binance:{s}:trade") > 50 for s in symbols])

            await drill.wait_for(flowing, 20, "ticks flowing")
            started = time.monotonic()
            wall_cut = time.time()
            # 3000 more BTCUSDT trades: about 30 s of this feed
            await drill.black_hole_until_noticed(proxy, sim, "BTCUSDT", log_path, 3000)
            proxy.restore()
            restored, wall_restored = time.monotonic(), time.time()
            counts = await assert_complete(aredis, prefix, sim, symbols, timeout=60)
            healed = time.monotonic() - restored

            async def kept_receiving() -> bool:  # then 6000 more trades per stream, about a minute of them
                return all([await aredis.xlen(f"{prefix}:binance:{s}:trade") >= counts[s] + 6000 for s in symbols])

            await drill.wait_for(kept_receiving, 240, "6000 more trades per stream over the healed link")
            after = await assert_complete(aredis, prefix, sim, symbols, timeout=30)
            assert all(after[s] > counts[s] for s in symbols)
    assert proc.returncode == 0
    log = drill.BlackHoleLog(log_path, wall_cut, wall_restored)
    assert log.fetched > 0
    print("\n" + log.summary(restored - started, healed, time.monotonic() - started))
