"""``market bench ingest``: the ingestor's own path at full speed, its latency instrumentation on and off.

What runs, in this process, against Redis: venue frames (the simulator's market, ``symbols`` symbols x
trade, aggTrade and bookTicker, encoded as combined-stream frames before the clock starts) go through
the real :meth:`~ingestor.session.VenueSession.consume` read loop (parse, sequence, ingress), then the
real :class:`~distributor.ingress.IngressQueue` (``block``), :class:`~distributor.service.Distributor`,
:class:`~distributor.hotpath.HotPath` with ``subscribers`` no-op subscribers, and
:class:`~distributor.writer.StreamWriter` appending to Redis.  The frames are handed over ``burst`` per
event-loop turn, as one socket read of a few kilobytes would; a round ends when Redis has acknowledged
every tick.  Its throughput is ticks / elapsed; its cost is this process's CPU time per tick.

After one round that is not counted (the first pays for allocating what the others reuse), three
modes, in rounds that alternate (so drift on a shared machine hits all of them alike):

- ``off``: ``latency_sample = 0``, the hot path untimed: no latency is measured at all;
- ``sampled``: the default (one tick in :data:`~consumer_sdk.core.latency.DEFAULT_SAMPLE_EVERY` at the per-tick
  stages, the hot path timed per publish batch);
- ``every``: ``latency_sample = 1``: every tick timed at the per-tick stages.

The cost of a mode is how much throughput it loses against ``off`` (medians over its rounds) and how
much CPU per tick it adds.  Left out: the WebSocket library's framing and the socket, which take the
same time whatever is measured, so the share measured here is an upper bound of the share in a live
ingestor.  Each round writes under its own key prefix (deleted afterwards), so no round finds the
previous one's ticks already stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from consumer_sdk.core.errors import ConfigError, MarketError
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY, LatencyHistogram
from distributor.hotpath import HOT_SAMPLE_EVERY, HotPath
from distributor.ingress import IngressQueue, Policy
from distributor.service import Distributor
from distributor.writer import Retention, StreamWriter
from ingestor.sequencer import Sequencer
from ingestor.session import VenueSession
from ops.bench.probe import noop
from ops.bench.profiles import CHANNELS, SYMBOLS

__all__ = ["MODES", "TARGET_COST_PCT", "make_frames", "run_ingest_bench"]

#: mode -> per-tick latency sampling interval (0 = off; the hot path is timed whenever it is not 0)
MODES: Final[dict[str, int]] = {"off": 0, "sampled": DEFAULT_SAMPLE_EVERY, "every": 1}
TARGET_COST_PCT: Final = 5.0
ROUND_TIMEOUT_S: Final = 120.0
MAXLEN: Final = 20_000


def make_frames(ticks: int, symbols: int, seed: int = 1) -> list[bytes]:
    """``ticks`` combined-stream frames from the simulator's market (no klines), in the order it emits them."""
    from ops.simulator.market import SyntheticMarket

    if not 1 <= symbols <= len(SYMBOLS):
        raise ConfigError(f"symbols must be between 1 and {len(SYMBOLS)}, got {symbols}")
    market = SyntheticMarket(SYMBOLS[:symbols], seed=seed, kline_intervals=(), id_base=0)
    frames: list[bytes] = []
    now_ms = 1_700_000_000_000
    dumps = orjson.dumps
    while len(frames) < ticks:
        for _, stream, payload in market.step(min(1000, ticks - len(frames)), now_ms):
            frames.append(b'{"stream":"%s","data":%s}' % (stream.encode(), dumps(payload)))
        now_ms += 20
    return frames


async def _feed(frames: Sequence[bytes], burst: int) -> AsyncIterator[Sequence[bytes]]:
    for i in range(0, len(frames), burst):
        yield frames[i : i + burst]  # one socket read's worth
        await asyncio.sleep(0)  # let the rest of the path run, as between two reads


async def _round(redis: aioredis.Redis, frames: Sequence[bytes], *, sample_every: int, subscribers: int,
                 burst: int, symbols: int) -> dict[str, Any]:
    prefix = f"bench-i{uuid.uuid4().hex[:10]}"
    ingress: IngressQueue[Any] = IngressQueue(100_000, Policy.BLOCK)
    writer = StreamWriter(redis, prefix=prefix, retention=Retention(maxlen=MAXLEN), sample_every=sample_every)
    hot = HotPath(sample_every=min(sample_every, HOT_SAMPLE_EVERY))
    subs = [hot.subscribe(noop, "binance:*:*", name="noop") for _ in range(subscribers)]
    distributor = Distributor(ingress, writer, hotpath=hot)
    ingest_latency = LatencyHistogram()
    streams = [f"{s.lower()}@{c}" for s in SYMBOLS[:symbols] for c in ("trade", "aggTrade", "bookTicker")]
    session = VenueSession(ws_base="ws://bench.invalid", streams=streams, ingress=ingress, sequencer=Sequencer(),
                           ingest_latency=ingest_latency, sample_every=sample_every)
    total = len(frames)

    def done() -> bool:
        return (writer.appended + writer.duplicates + writer.dead_lettered >= total
                and all(sub.delivered >= total for sub in subs))

    try:
        async with asyncio.timeout(ROUND_TIMEOUT_S), asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(writer.run()), tg.create_task(distributor.run())]
            hot.start(tg)
            gc.collect()
            cpu0, t0 = time.process_time(), time.perf_counter()
            ended = await session.consume(_feed(frames, burst))
            while True:  # the writer's and the subscribers' counters: poll them (1 ms in a round of seconds)
                if done():
                    break
                await asyncio.sleep(0.001)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            delivered = sum(sub.delivered for sub in subs)
            for task in tasks:
                task.cancel()
            hot.close()
    except TimeoutError:
        raise MarketError(f"an ingest bench round did not finish within {ROUND_TIMEOUT_S:.0f} s") from None
    finally:
        with contextlib.suppress(OSError, aioredis.RedisError):
            keys = [k async for k in redis.scan_iter(f"{prefix}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
    return {
        "sample_every": sample_every, "ticks": total, "accepted": session.ticks, "appended": writer.appended,
        "ended": ended, "elapsed_s": round(elapsed, 4), "ticks_per_s": round(total / elapsed, 1),
        "cpu_us_per_tick": round(1e6 * cpu / total, 3), "hotpath_delivered": delivered,
        "writer_flushes": writer.batches, "distributor_batches": distributor.batches,
        "timed": {"ingest": ingest_latency.count, "hotpath": hot.latency.count, "redis": writer.ack_latency.count},
    }


def _modes_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in rounds if r["mode"] == mode]
        if not mine:
            continue
        rates = [r["ticks_per_s"] for r in mine]
        cpu = [r["cpu_us_per_tick"] for r in mine]
        out[mode] = {
            "sample_every": MODES[mode], "rounds": len(mine), "ticks_per_s": round(statistics.median(rates), 1),
            "ticks_per_s_min": min(rates), "ticks_per_s_max": max(rates),
            "cpu_us_per_tick": round(statistics.median(cpu), 3),
        }
    base = out.get("off")
    if base:
        for m in out.values():
            m["throughput_cost_pct"] = round(100 * (1 - m["ticks_per_s"] / base["ticks_per_s"]), 2)
            m["cpu_cost_pct"] = round(100 * (m["cpu_us_per_tick"] / base["cpu_us_per_tick"] - 1), 2)
    return out


async def run_ingest_bench(
    redis_url: str,
    *,
    ticks: int = 200_000,
    rounds: int = 3,
    subscribers: int = 16,
    symbols: int = 20,
    burst: int = 64,
    seed: int = 1,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, Any]:
    """Rounds of every mode of :data:`MODES`, alternating, after one warm-up round; the figures and the cost.

    ``summary["cost_pct"]`` is the throughput the default (sampled) instrumentation costs against none,
    ``summary["met"]`` whether it is within :data:`TARGET_COST_PCT`.  Raises :class:`ConfigError` on a bad
    argument, :class:`~consumer_sdk.core.errors.TransientError` when Redis does not answer.
    """
    from consumer_sdk.core.redis import connect_redis

    if not 1_000 <= ticks <= 5_000_000:
        raise ConfigError(f"ticks must be between 1000 and 5000000, got {ticks}")
    if not 1 <= rounds <= 50:
        raise ConfigError(f"rounds must be between 1 and 50, got {rounds}")
    if not 0 <= subscribers <= 1000:
        raise ConfigError(f"subscribers must be between 0 and 1000, got {subscribers}")
    if not 1 <= burst <= 10_000:
        raise ConfigError(f"burst must be between 1 and 10000, got {burst}")
    frames = make_frames(ticks, symbols, seed)
    redis = await connect_redis(redis_url)
    names = list(MODES)
    plan = [names[(r + i) % len(names)] for r in range(rounds) for i in range(len(names))]
    results: list[dict[str, Any]] = []
    try:
        if progress is not None:
            progress("ingest path: warm-up", 0.0)
        # A whole round first, not counted: the first one pays for allocating what the others reuse.
        await _round(redis, frames, sample_every=DEFAULT_SAMPLE_EVERY, subscribers=subscribers, burst=burst,
                     symbols=symbols)
        for i, mode in enumerate(plan):
            if progress is not None:
                progress(f"ingest path: round {i + 1}/{len(plan)} ({mode})", i / len(plan))
            r = await _round(redis, frames, sample_every=MODES[mode], subscribers=subscribers, burst=burst,
                             symbols=symbols)
            r["mode"] = mode
            results.append(r)
    finally:
        await redis.aclose()
    modes = _modes_summary(results)
    cost = modes["sampled"]["throughput_cost_pct"]
    return {
        "ticks": ticks, "rounds": rounds, "subscribers": subscribers, "symbols": symbols,
        "streams": symbols * len(CHANNELS), "burst": burst, "seed": seed, "order": plan,
        "modes": modes, "results": results,
        "summary": {
            "cost_pct": cost, "cpu_cost_pct": modes["sampled"]["cpu_cost_pct"],
            "every_tick_cost_pct": modes["every"]["throughput_cost_pct"],
            "every_tick_cpu_cost_pct": modes["every"]["cpu_cost_pct"],
            "target_pct": TARGET_COST_PCT, "met": cost <= TARGET_COST_PCT,
            "off_ticks_per_s": modes["off"]["ticks_per_s"], "sampled_ticks_per_s": modes["sampled"]["ticks_per_s"],
        },
    }
