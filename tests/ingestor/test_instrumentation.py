"""Latency instrumentation: what each stage times, how it samples, and that it can be turned off.

The per-tick stages (frame -> ingress in the session, frame -> flush sent and frame -> Redis acknowledged in the
writer) time one tick in N by position; the hot path times a synchronous subscriber's chunks one publish batch at
a time, one chunk in N.  What that costs is measured by ``market bench ingest`` (tested for its accounting here).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY, LatencyHistogram, bucket_of, check_sample_every
from consumer_sdk.core.tick import Tick
from distributor.hotpath import HotPath
from distributor.ingress import IngressQueue, Policy
from distributor.writer import StreamWriter
from ingestor.config import load_settings
from ingestor.sequencer import Sequencer
from ingestor.service import Ingestor
from ingestor.session import VenueSession
from ops.bench.ingest import MODES, make_frames, run_ingest_bench

UNIT = 2.0


def tick(seq: int, ts_recv: int = 0, symbol: str = "S1") -> Tick:
    return {"v": 1, "venue": "sim", "symbol": symbol, "channel": "trade", "seq": seq, "ts_event": seq * 1000,
            "ts_recv": ts_recv, "trade_id": seq, "price": "1", "qty": "1", "side": "buy"}  # type: ignore[typeddict-item]


async def until(condition: Any, timeout: float = UNIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


class Clock:
    """A settable nanosecond clock for the hot path."""

    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns


@pytest.mark.parametrize("bad", [-1, 65537, 1.5, True, "4"])
def test_sampling_interval_is_checked(bad: Any) -> None:
    with pytest.raises(ConfigError, match="sampling interval"):
        check_sample_every(bad)
    with pytest.raises(ConfigError):
        HotPath(sample_every=bad)


# -- hot path ------------------------------------------------------------------------------------------------
async def test_hot_path_times_each_publish_batch_of_a_chunk_with_its_own_stamp() -> None:
    """Three batches published before the subscriber runs: one chunk, three stamps, three latencies."""
    clock = Clock()
    hot = HotPath(clock=clock, sample_every=1)
    got: list[Tick] = []
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        sub = hot.subscribe(got.append, "sim:*:*")
        await until(lambda: sub._waiter is not None)  # its task has run and is asleep, waiting for a publish
        seq = 0
        for size in (3, 5, 2):  # stamps 0, 10 and 20 µs
            hot.publish([tick(seq := seq + 1) for _ in range(size)])
            clock.ns += 10_000
        clock.ns += 10_000  # the subscriber runs 40, 30 and 20 µs after the three publishes
        await until(lambda: sub.delivered == 10)
        hot.close()
    assert len(got) == 10
    h = hot.latency
    assert h.count == 10
    assert h.counts[bucket_of(40)] == 3 and h.counts[bucket_of(30)] == 5 and h.counts[bucket_of(20)] == 2
    assert h.sum_us == 3 * 40 + 5 * 30 + 2 * 20 and h.max_us == 40


@pytest.mark.parametrize("every", [0, 1, 4])
async def test_hot_path_times_one_chunk_in_n_and_delivers_everything(every: int) -> None:
    clock = Clock()
    hot = HotPath(clock=clock, sample_every=every)
    got: list[Tick] = []
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        sub = hot.subscribe(got.append, "sim:*:*")
        for i in range(40):  # 40 chunks of 5: the subscriber catches up after each
            hot.publish([tick(5 * i + k) for k in range(5)])
            clock.ns += 7_000
            await until(lambda i=i: sub.delivered == 5 * (i + 1))
        hot.close()
    assert [t["seq"] for t in got] == list(range(200))
    timed = 0 if every == 0 else 200 // every
    assert hot.latency.count == timed
    assert hot.latency.counts[7] == timed  # each chunk ran 7 µs after its publish


# -- writer -----------------------------------------------------------------------------------------------------
async def test_writer_times_one_tick_in_n_by_position_across_batches(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix, sample_every=4)
    seq = 0
    counts = []
    for size in (3, 5, 7, 1):  # global positions 0, 4, 8, 12 are timed
        batch = [tick(seq := seq + 1, ts_recv=1) for _ in range(size)]
        await writer.append(batch)
        counts.append(writer.ack_latency.count)
    assert counts == [1, 2, 4, 4]
    assert writer.sent_latency.count == 4  # the same positions, timed when each flush was sent
    assert writer.appended == 16

    off = StreamWriter(aredis, prefix=prefix + "x", sample_every=0)
    await off.append([tick(i + 1, ts_recv=1) for i in range(50)])
    assert off.appended == 50 and off.ack_latency.count == 0 and off.sent_latency.count == 0


@pytest.mark.parametrize("window", [1, 4])
async def test_writer_times_each_flush_when_sent_and_when_acknowledged(
    aredis: aioredis.Redis, prefix: str, window: int
) -> None:
    """Through the writer's task (window 4: the windowed path; 1: one flush at a time): every tick is timed
    twice, when its flush is sent and when Redis acknowledged it, and the first is never the later."""
    writer = StreamWriter(aredis, prefix=prefix, sample_every=1, window=window)
    task = asyncio.create_task(writer.run())
    try:
        seq = 0
        for _ in range(20):
            now_us = time.time_ns() // 1000
            assert writer.submit([tick(seq := seq + 1, ts_recv=now_us, symbol=f"S{seq % 3}") for _ in range(10)])
            await writer.drain()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert writer.appended == 200
    sent, ack = writer.sent_latency, writer.ack_latency
    assert sent.count == ack.count == 200
    assert sent.sum_us < ack.sum_us  # each tick: sent before its reply came back
    snap = writer.snapshot()
    assert snap.sent_latency.counts == sent.counts and snap.sent_latency is not sent


# -- session ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("every", "timed"), [(0, 0), (1, 300), (4, 75), (DEFAULT_SAMPLE_EVERY, 300 // 16)])
async def test_session_times_one_frame_in_n(every: int, timed: int) -> None:
    frames = make_frames(300, symbols=3)

    async def feed() -> Any:
        for i in range(0, len(frames), 7):
            yield frames[i : i + 7]

    ingress: IngressQueue[Tick] = IngressQueue(1000, Policy.DROP_NEWEST)
    hist = LatencyHistogram()
    session = VenueSession(ws_base="ws://unused.invalid", streams=[], ingress=ingress, sequencer=Sequencer(),
                           ingest_latency=hist, sample_every=every)
    assert await session.consume(feed()) == "connection closed by venue"
    assert session.ticks == 300 and len(ingress) == 300 and session.malformed == 0
    assert hist.count == timed


# -- settings ---------------------------------------------------------------------------------------------------
def test_latency_sample_setting_flows_from_flag_env_and_file(tmp_path: Any) -> None:
    assert load_settings({}, {}).latency_sample == DEFAULT_SAMPLE_EVERY
    assert load_settings({"latency_sample": 0}, {"MARKET_LATENCY_SAMPLE": "8"}).latency_sample == 0
    assert load_settings({}, {"MARKET_LATENCY_SAMPLE": "8"}).latency_sample == 8
    toml = tmp_path / "m.toml"
    toml.write_text("latency_sample = 1\n")
    assert load_settings({}, {}, str(toml)).latency_sample == 1
    for bad in ("-1", "70000", "x"):
        with pytest.raises(ConfigError, match="latency sample"):
            load_settings({"latency_sample": bad}, {})


def test_ingestor_builds_its_hot_path_from_the_setting() -> None:
    assert Ingestor(load_settings({}, {})).hotpath.sample_every == 4
    assert Ingestor(load_settings({"latency_sample": 0}, {})).hotpath.sample_every == 0
    assert Ingestor(load_settings({"latency_sample": 1}, {})).hotpath.sample_every == 1


# -- the cost benchmark -----------------------------------------------------------------------------------------
async def test_ingest_bench_accounts_for_every_tick_in_every_mode(redis_url: str) -> None:
    r = await run_ingest_bench(redis_url, ticks=3_000, rounds=1, subscribers=2, symbols=2)
    assert sorted(r["modes"]) == sorted(MODES) and len(r["results"]) == len(MODES)
    for x in r["results"]:
        assert x["accepted"] == x["appended"] == 3_000, x
        assert x["hotpath_delivered"] == 2 * 3_000
        every = MODES[x["mode"]]
        assert x["timed"]["ingest"] == (3_000 // every if every else 0)
        assert x["timed"]["redis"] == (-(-3_000 // every) if every else 0)  # positions 0, N, 2N, ...
        assert (x["timed"]["hotpath"] > 0) == (every > 0)
        assert x["ticks_per_s"] > 0 and x["cpu_us_per_tick"] > 0
    s = r["summary"]
    assert s["cost_pct"] == r["modes"]["sampled"]["throughput_cost_pct"]
    assert s["met"] == (s["cost_pct"] <= s["target_pct"])
    assert r["modes"]["off"]["throughput_cost_pct"] == 0.0


async def test_ingest_bench_rejects_bad_arguments(redis_url: str) -> None:
    with pytest.raises(ConfigError):
        await run_ingest_bench(redis_url, ticks=10)
    with pytest.raises(ConfigError):
        await run_ingest_bench(redis_url, rounds=0)
