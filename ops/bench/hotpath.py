"""``market bench hotpath``: the in-process fan-out under a paced load, with exact accounting.

The path measured is the real one minus the venue socket: a generator task puts pre-built ticks
into a real :class:`~distributor.ingress.IngressQueue` at ``rate`` ticks/s on the monotonic clock
(small timed batches: the number due is computed from the elapsed time, so the offered rate is
exact), a distributor-like task takes batches and publishes them to a :class:`~distributor.hotpath.HotPath`,
and ``subscribers`` co-located subscribers (``slow_subscribers`` of them deliberately too slow:
an async handler that sleeps every few ticks) receive them on the ``drop_oldest`` policy.

Latency is "tick ready in ingress" -> "subscriber callback", over every *fast* subscriber, on one
clock (``time.perf_counter_ns``): the generator stamps each batch once it is wholly in the ingress,
before it yields (nothing downstream can run earlier); the stamp is one int object per batch written
into a slot every pre-built tick already has (no allocation); the callback subtracts it from the
clock and counts it in a 1 µs-resolution histogram.

After ``duration`` the generator stops, the slow subscribers stop being slow, and everything is
drained (bounded by a timeout); ``accounted`` is True when, for every subscriber, the ticks published
that match it (counted here, from the patterns and what was generated) equal delivered + dropped.

``all_subscribers_p99_us`` is the hot path's own histogram (publish -> callback, four buckets per octave)
over *every* subscriber, the slow ones included.

A baseline runs the same load through the usual design, one ``asyncio.Queue`` per subscriber
(``put_nowait``, drop when full; ``await get()`` per tick), for ``baseline_duration`` seconds.

The slow-subscriber drill (``slow_handler_ms`` > 0): one more subscriber, on everything, with a
*synchronous* handler that blocks ``slow_handler_ms`` per tick (``time.sleep``: the thread is held,
as by blocking I/O) on ``drop_oldest``, the hot path's default execution (inline, moved to a thread of
its own when it overruns its budget).  The same load then runs in ``rounds`` pairs of rounds, one
without that subscriber and one with it, alternating (drift on a shared machine hits both alike), each
``duration`` seconds; their histograms are merged per side.  ``without_*`` are the figures without it,
``p99_ratio`` is the fast subscribers' p99 with it over without.  Given a Redis (``redis_url``), the
distributor task also hands every batch to a real :class:`~distributor.writer.StreamWriter` under a
prefix of its own (deleted afterwards), as an ingestor does, and ``redis_p99_us`` is the writer's
acknowledgement latency (tick ready in the ingress -> Redis acknowledged its append, every tick timed,
wall clock) with the slow subscriber, ``without_redis_p99_us`` without, ``redis_p99_ratio`` the ratio.
``slow_sync`` reports what became of the slow subscriber (where it runs, its handler time, its drops)
and ``slowest`` the name :meth:`~distributor.hotpath.HotPath.stats` gives as the feed ends.  The asyncio.Queue baseline
is not run in the drill.

``fast_execution="thread"`` runs the fast subscribers' handlers on threads of their own: against the
default (inline), the price of a thread hop for a trivial handler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern
from consumer_sdk.core.loop import loop_name
from consumer_sdk.core.loop import run as run_loop
from consumer_sdk.core.tick import Tick
from distributor.hotpath import DEFAULT_CAPACITY, Execution, HotPath, Subscription
from distributor.ingress import IngressQueue, Policy
from distributor.writer import Retention, StreamWriter
from ops.bench.hotpath_load import (
    CHANNELS,
    MAX_BATCH,
    STAMP,
    VENUE,
    FineAckHistogram,
    FineHistogram,
    SlowHandler,
    SlowSyncHandler,
    bench_patterns,
    build_ticks,
    distribute,
    fast_handler,
    generate,
)

__all__ = ["MAX_TICKS", "bench_patterns", "main", "run_hotpath_bench"]

MAX_TICKS: Final = 5_000_000  # pre-built ticks, about 0.5 kB each
INGRESS_CAPACITY: Final = 100_000
DRAIN_TIMEOUT_S: Final = 10.0
SLOW_SYNC: Final = "slow-sync"  # the drill's slow synchronous subscriber
MAX_SLOW_HANDLER_MS: Final = 1000.0
REDIS_MAXLEN: Final = 10_000  # per stream, in the drill's own prefix


async def _poll(condition: Callable[[], bool], limit_s: float) -> bool:
    """Check ``condition`` every 5 ms (it reads counters: nothing to wait on) for at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)


@dataclass
class _Round:
    figures: dict[str, Any]
    fine: FineHistogram
    redis: FineHistogram | None


async def _run_hot(
    ticks: list[dict[str, Any]], which: list[int], names: list[str], *, rate: float, subscribers: int,
    slow_subscribers: int, duration: float, symbols: int, capacity: int, max_lag: int | None,
    slow_handler_ms: float = 0.0, fast_execution: Execution = Execution.INLINE, redis: aioredis.Redis | None = None,
) -> _Round:
    hot = HotPath(capacity=capacity)
    ingress: IngressQueue[Tick] = IngressQueue(INGRESS_CAPACITY, Policy.BLOCK)
    fine = FineHistogram()
    slow_every = max(1, int(rate // 4000))
    subs: list[tuple[Subscription, bool]] = []
    slows: list[SlowHandler | SlowSyncHandler] = []
    for k in range(subscribers):
        is_slow = k < slow_subscribers
        handler: Callable[[Tick], Awaitable[None] | None]
        if is_slow:
            slow = SlowHandler(slow_every)
            slows.append(slow)
            handler = slow
        else:
            handler = fast_handler(fine)
        name = f"{'slow' if is_slow else 'fast'}{k}"
        subs.append((hot.subscribe(handler, bench_patterns(k, symbols, is_slow), max_lag=max_lag, name=name,
                                   execution=None if is_slow else fast_execution), is_slow))
    sync_sub: Subscription | None = None
    if slow_handler_ms > 0:
        sync_slow = SlowSyncHandler(slow_handler_ms)
        slows.append(sync_slow)
        sync_sub = hot.subscribe(sync_slow, f"{VENUE}:*:*", max_lag=max_lag, name=SLOW_SYNC, policy="drop_oldest")
    prefix = f"bench-h{uuid.uuid4().hex[:10]}"
    ack = FineAckHistogram()
    writer = None if redis is None else StreamWriter(
        redis, prefix=prefix, retention=Retention(maxlen=REDIS_MAXLEN), sample_every=1, ack_latency=ack,
    )

    hot.declare(names)  # as an ingestor does with its configured streams
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    try:
        async with asyncio.TaskGroup() as tg:
            hot.start(tg)
            tasks = [tg.create_task(distribute(ingress, hot, writer), name="bench-distributor")]
            if writer is not None:
                tasks.append(tg.create_task(writer.run(), name="bench-writer"))
            sent, gen_s = await generate(ingress, ticks, rate, duration, wall=writer is not None)
            slowest = hot.stats().slowest  # as the feed ends: draining, the slow handlers stop being slow
            sync_handler_us = sync_sub.stats().handler_us if sync_sub is not None else 0.0
            for laggard in slows:
                laggard.draining = True
            published_all = await _poll(lambda: hot.published == sent, DRAIN_TIMEOUT_S)
            drained = published_all and await _poll(
                lambda: all(s.stats().pending == 0 for s, _ in subs)
                and (sync_sub is None or sync_sub.stats().pending == 0), DRAIN_TIMEOUT_S
            )
            if writer is not None:
                stored = writer
                drained = drained and await _poll(
                    lambda: stored.appended + stored.duplicates + stored.dead_lettered >= sent, DRAIN_TIMEOUT_S
                )
            cpu_s = time.process_time() - cpu0
            wall_s = time.monotonic() - wall0
            stats = [(s.stats(), is_slow) for s, is_slow in subs]
            sync_st = sync_sub.stats() if sync_sub is not None else None
            hot_stats = hot.stats()
            hot.close()
            for task in tasks:
                task.cancel()
    finally:
        if redis is not None:
            with contextlib.suppress(OSError, RedisError):
                keys = [k async for k in redis.scan_iter(f"{prefix}:*", count=1000)]
                if keys:
                    await redis.delete(*keys)

    per_stream = Counter(which[:sent])
    accounted = drained
    for st in [st for st, _ in stats] + ([sync_st] if sync_st is not None else []):
        pats = [Pattern(p) for p in st.patterns]
        expected = sum(n for sid, n in per_stream.items() if any(p.matches(names[sid]) for p in pats))
        if not (st.matched == expected == st.delivered + st.dropped and st.pending == 0):
            accounted = False
    fast = [st for st, is_slow in stats if not is_slow]
    slow_st = [st for st, is_slow in stats if is_slow]
    figures: dict[str, Any] = {
        "offered_rate": round(sent / gen_s, 1) if gen_s else 0.0,
        "published": hot_stats.published,
        "delivered": sum(st.delivered for st, _ in stats),
        "dropped": sum(st.dropped for st, _ in stats),
        **fine.summary(),
        "fast_delivered": sum(st.delivered for st in fast),
        "fast_dropped": sum(st.dropped for st in fast),
        "slow_delivered": sum(st.delivered for st in slow_st),
        "slow_dropped": sum(st.dropped for st in slow_st),
        "latency_samples": fine.total(),
        "all_subscribers_p99_us": hot.latency.percentile(0.99),
        "cpu_s": round(cpu_s, 3),
        "cpu_util": round(cpu_s / wall_s, 3) if wall_s else 0.0,
        "accounted": accounted,
        "drained": drained,
        "slowest": slowest,
    }
    if writer is not None:
        figures["redis_appended"] = writer.appended
    if sync_st is not None:
        figures["slow_sync"] = {
            "execution": sync_st.execution.value, "offloaded": sync_st.offloaded, "delivered": sync_st.delivered,
            "dropped": sync_st.dropped, "handler_us": round(sync_handler_us, 1), "overruns": sync_st.overruns,
        }
    return _Round(figures, fine, ack.fine if writer is not None else None)


async def _run_baseline(
    ticks: list[dict[str, Any]], *, rate: float, subscribers: int, slow_subscribers: int, duration: float,
    symbols: int,
    max_lag: int,
) -> dict[str, Any]:
    """The same load through one asyncio.Queue per subscriber (filtering in the fan-out loop)."""
    ingress: IngressQueue[Tick] = IngressQueue(INGRESS_CAPACITY, Policy.BLOCK)
    fine = FineHistogram()
    slow_every = max(1, int(rate // 4000))
    queues: list[tuple[asyncio.Queue[Tick], list[Pattern], dict[tuple[str, str], bool]]] = []
    handlers: list[Callable[[Tick], Awaitable[None] | None]] = []
    slow_flags: list[bool] = []
    dropped = [0]
    for k in range(subscribers):
        is_slow = k < slow_subscribers
        queues.append((asyncio.Queue(max_lag), [Pattern(p) for p in bench_patterns(k, symbols, is_slow)], {}))
        handlers.append(SlowHandler(slow_every) if is_slow else fast_handler(fine))
        slow_flags.append(is_slow)

    async def fan_out() -> None:
        while True:
            batch = await ingress.get_batch(MAX_BATCH)
            for tick in batch:
                key = (tick["symbol"], tick["channel"])
                for q, pats, cache in queues:
                    want = cache.get(key)
                    if want is None:
                        text = f"{tick['venue']}:{tick['symbol']}:{tick['channel']}"
                        want = cache[key] = any(p.matches(text) for p in pats)
                    if want:
                        try:
                            q.put_nowait(tick)
                        except asyncio.QueueFull:
                            dropped[0] += 1

    async def consume(q: asyncio.Queue[Tick], handler: Callable[[Tick], Awaitable[None] | None]) -> None:
        while True:
            tick = await q.get()
            result = handler(tick)
            if result is not None:
                await result

    cpu0 = time.process_time()
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(fan_out())]
        tasks += [tg.create_task(consume(q, h)) for (q, _, _), h in zip(queues, handlers, strict=True)]
        sent, _ = await generate(ingress, ticks, rate, duration)
        cpu_s = time.process_time() - cpu0
        for t in tasks:
            t.cancel()
    return {**fine.summary("baseline_"), "baseline_sent": sent, "baseline_dropped": dropped[0],
            "baseline_cpu_s": round(cpu_s, 3)}


_SUMMED: Final = (
    "published", "delivered", "dropped", "fast_delivered", "fast_dropped", "slow_delivered", "slow_dropped",
    "latency_samples", "cpu_s", "redis_appended",
)


def _merge_rounds(rounds: Sequence[_Round], prefix: str) -> dict[str, Any]:
    """One side of the drill: counts summed over its rounds, percentiles from the merged histograms."""
    fine = FineHistogram()
    redis_fine: FineHistogram | None = FineHistogram() if rounds[0].redis is not None else None
    for r in rounds:
        fine.merge(r.fine)
        if redis_fine is not None and r.redis is not None:
            redis_fine.merge(r.redis)
    figs = [r.figures for r in rounds]
    out: dict[str, Any] = {f"{prefix}{k}": sum(f.get(k, 0) for f in figs) for k in _SUMMED if k in figs[0]}
    out[f"{prefix}cpu_s"] = round(out[f"{prefix}cpu_s"], 3)
    out[f"{prefix}offered_rate"] = round(sum(f["offered_rate"] for f in figs) / len(figs), 1)
    out[f"{prefix}cpu_util"] = round(sum(f["cpu_util"] for f in figs) / len(figs), 3)
    out[f"{prefix}all_subscribers_p99_us"] = max(f["all_subscribers_p99_us"] for f in figs)
    out[f"{prefix}accounted"] = all(f["accounted"] for f in figs)
    out[f"{prefix}drained"] = all(f["drained"] for f in figs)
    out |= fine.summary(prefix)
    if redis_fine is not None:
        out |= redis_fine.summary(f"{prefix}redis_")
    names = sorted({str(f["slowest"]) for f in figs})
    out[f"{prefix}slowest"] = names[0] if len(names) == 1 else names
    syncs = [f["slow_sync"] for f in figs if "slow_sync" in f]
    if syncs:
        out[f"{prefix}slow_sync"] = {
            "execution": sorted({x["execution"] for x in syncs}),
            "offloaded_rounds": sum(1 for x in syncs if x["offloaded"]),
            "delivered": sum(x["delivered"] for x in syncs),
            "dropped": sum(x["dropped"] for x in syncs),
            "handler_us": max(x["handler_us"] for x in syncs),
            "overruns": sum(x["overruns"] for x in syncs),
        }
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


async def _drill(
    ticks: list[dict[str, Any]], which: list[int], names: list[str], *, rate: float, subscribers: int,
    slow_subscribers: int, round_s: float, rounds: int, symbols: int, capacity: int, max_lag: int | None,
    slow_handler_ms: float, fast_execution: Execution, redis_url: str | None,
) -> dict[str, Any]:
    redis = None if redis_url is None else aioredis.Redis.from_url(redis_url, socket_timeout=10.0)
    try:
        if redis is not None:
            await redis.ping()
        without: list[_Round] = []
        with_slow: list[_Round] = []
        for _ in range(rounds):
            for ms, side in ((0.0, without), (slow_handler_ms, with_slow)):
                side.append(await _run_hot(
                    ticks, which, names, rate=rate, subscribers=subscribers, slow_subscribers=slow_subscribers,
                    duration=round_s, symbols=symbols, capacity=capacity, max_lag=max_lag, slow_handler_ms=ms,
                    fast_execution=fast_execution, redis=redis,
                ))
    except (OSError, RedisError) as exc:
        raise ConfigError(f"the drill's Redis at {redis_url} failed: {exc}") from None
    finally:
        if redis is not None:
            await redis.aclose()
    out = _merge_rounds(with_slow, "") | _merge_rounds(without, "without_")
    out["p99_ratio"] = _ratio(out["p99_us"], out["without_p99_us"])
    out["p50_ratio"] = _ratio(out["p50_us"], out["without_p50_us"])
    if redis is not None:
        out["redis_p99_ratio"] = _ratio(out["redis_p99_us"], out["without_redis_p99_us"])
        out["redis_p50_ratio"] = _ratio(out["redis_p50_us"], out["without_redis_p50_us"])
    return out


async def _measure(
    ticks: list[dict[str, Any]], which: list[int], names: list[str], *, rate: float, subscribers: int,
    slow_subscribers: int, duration: float, symbols: int, capacity: int, max_lag: int | None, baseline_s: float,
    slow_handler_ms: float, rounds: int, fast_execution: Execution, redis_url: str | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "rate": rate, "subscribers": subscribers, "slow_subscribers": slow_subscribers, "duration": duration,
        "symbols": symbols, "streams": symbols * len(CHANNELS), "capacity": capacity,
        "max_lag": capacity // 4 if max_lag is None else max_lag, "fast_execution": fast_execution.value,
    }
    if slow_handler_ms > 0:
        result |= {"slow_handler_ms": slow_handler_ms, "rounds": rounds, "redis": redis_url is not None}
        result |= await _drill(
            ticks, which, names, rate=rate, subscribers=subscribers, slow_subscribers=slow_subscribers,
            round_s=duration / rounds, rounds=rounds, symbols=symbols, capacity=capacity, max_lag=max_lag,
            slow_handler_ms=slow_handler_ms, fast_execution=fast_execution, redis_url=redis_url,
        )
        return result
    result |= (await _run_hot(
        ticks, which, names, rate=rate, subscribers=subscribers, slow_subscribers=slow_subscribers,
        duration=duration, symbols=symbols, capacity=capacity, max_lag=max_lag, fast_execution=fast_execution,
    )).figures
    if baseline_s > 0:
        for tick in ticks:
            tick[STAMP] = 0
        result |= await _run_baseline(
            ticks, rate=rate, subscribers=subscribers, slow_subscribers=slow_subscribers,
            duration=baseline_s, symbols=symbols, max_lag=result["max_lag"],
        )
        result["baseline_duration"] = baseline_s
        p99 = result["p99_us"]
        result["baseline_ratio_p99"] = round(result["baseline_p99_us"] / p99, 1) if p99 else None
    return result


async def run_hotpath_bench(
    *,
    rate: float,
    subscribers: int,
    slow_subscribers: int,
    duration: float,
    symbols: int = 50,
    seed: int = 1,
    baseline: bool = True,
    baseline_duration: float | None = None,
    capacity: int = DEFAULT_CAPACITY,
    max_lag: int | None = None,
    slow_handler_ms: float = 0.0,
    rounds: int = 2,
    fast_execution: str = "inline",
    redis_url: str | None = None,
) -> dict[str, Any]:
    """Run the hot-path load test; returns the figures as one flat dict (see the module doc), with ``loop``: the
    event loop it ran on (:mod:`consumer_sdk.core.loop`; run from the command line, the one ``MARKET_LOOP`` picks).

    ``baseline_duration`` defaults to ``min(duration, 5)`` seconds; ``baseline=False`` skips it.
    ``slow_handler_ms`` > 0 runs the slow-subscriber drill instead: ``duration`` seconds with the slow
    synchronous subscriber and as many without, in ``rounds`` alternating pairs; ``redis_url`` adds the
    writer.  ``fast_execution``: ``inline`` or ``thread`` for the fast subscribers' handlers.
    """
    if rate <= 0 or duration <= 0:
        raise ConfigError(f"rate and duration must be positive, got rate={rate} duration={duration}")
    if subscribers < 1 or not 0 <= slow_subscribers <= subscribers:
        raise ConfigError(
            f"need at least 1 subscriber and 0 <= slow subscribers <= subscribers, got {subscribers}/{slow_subscribers}"
        )
    if symbols < 1:
        raise ConfigError(f"symbols must be at least 1, got {symbols}")
    if not 0 <= slow_handler_ms <= MAX_SLOW_HANDLER_MS:
        raise ConfigError(f"slow handler ms must be between 0 (no drill) and {MAX_SLOW_HANDLER_MS:g}, "
                          f"got {slow_handler_ms}")
    if not 1 <= rounds <= 100:
        raise ConfigError(f"rounds must be between 1 and 100, got {rounds}")
    if fast_execution not in (Execution.INLINE, Execution.THREAD):
        raise ConfigError(f"fast execution must be 'inline' or 'thread', got {fast_execution!r}")
    drill = slow_handler_ms > 0
    per_run = duration / rounds if drill else duration
    total = int(rate * per_run) + 1
    if total > MAX_TICKS:
        raise ConfigError(f"rate x duration is {total} ticks, over the bench's limit of {MAX_TICKS}")
    base_s = min(duration, 5.0) if baseline_duration is None else baseline_duration
    if drill:
        base_s = 0.0
    runs_s = 2 * duration if drill else duration + (base_s if baseline else 0.0)
    runs = 2 * rounds if drill else 2

    ticks, which, names = build_ticks(total, symbols, seed)
    # The pre-built ticks live for the whole run: keep the collector from walking the list holding them.
    gc.freeze()
    deadline = runs_s + runs * 4 * DRAIN_TIMEOUT_S + 30.0  # a bound on the whole run: it never hangs
    try:
        async with asyncio.timeout(deadline):
            result = await _measure(ticks, which, names, rate=rate, subscribers=subscribers,
                                    slow_subscribers=slow_subscribers, duration=duration, symbols=symbols,
                                    capacity=capacity, max_lag=max_lag, baseline_s=base_s if baseline else 0.0,
                                    slow_handler_ms=slow_handler_ms, rounds=rounds,
                                    fast_execution=Execution(fast_execution), redis_url=redis_url)
            return result | {"loop": loop_name()}
    finally:
        gc.unfreeze()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ops.bench.hotpath``: the bench with every knob, one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m ops.bench.hotpath", description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=50_000, help="ticks per second offered to the ingress")
    parser.add_argument("--subscribers", type=int, default=16, help="co-located subscribers")
    parser.add_argument("--slow-subscribers", type=int, default=1, help="of which deliberately slow (async)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds (per side, in the drill)")
    parser.add_argument("--slow-handler-ms", type=float, default=0.0,
                        help="the drill: one more subscriber, synchronous, blocking this long per tick")
    parser.add_argument("--rounds", type=int, default=2, help="the drill's alternating pairs of rounds")
    parser.add_argument("--fast-execution", default="inline", help="inline or thread, for the fast subscribers")
    parser.add_argument("--redis", default=None, metavar="URL", help="the drill also writes to this Redis")
    parser.add_argument("--no-baseline", action="store_true", help="skip the asyncio.Queue baseline")
    try:
        args = parser.parse_args(argv)
        result = run_loop(run_hotpath_bench(
            rate=args.rate, subscribers=args.subscribers, slow_subscribers=args.slow_subscribers,
            duration=args.duration, slow_handler_ms=args.slow_handler_ms, rounds=args.rounds,
            fast_execution=args.fast_execution, redis_url=args.redis, baseline=not args.no_baseline,
        ))
    except ConfigError as exc:
        print(f"bench hotpath: {exc}", file=sys.stderr)
        return 2
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
