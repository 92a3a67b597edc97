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
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from consumer_sdk.errors import ConfigError
from consumer_sdk.keys import Pattern
from consumer_sdk.tick import Tick
from distributor.hotpath import DEFAULT_CAPACITY, HotPath, Subscription
from distributor.ingress import IngressQueue, Policy

__all__ = ["MAX_TICKS", "bench_patterns", "run_hotpath_bench"]

MAX_TICKS: Final = 5_000_000  # pre-built ticks, about 0.5 kB each
CHANNELS: Final = ("trade", "agg_trade", "book_ticker")
VENUE: Final = "sim"
STAMP: Final = "_bench_t"  # the bench's own field: perf_counter_ns when the tick was put into the ingress
FINE_US: Final = 100_000  # the fine histogram counts 1 µs buckets up to 100 ms, then one overflow bucket
INGRESS_CAPACITY: Final = 100_000
MAX_BATCH: Final = 5000
PACE_S: Final = 0.0005  # the generator's sleep between batches (the event loop rounds it up to 1 ms)
DRAIN_TIMEOUT_S: Final = 10.0


@dataclass
class _Fine:
    """A 1 µs-resolution latency histogram, cheap enough for a callback (one index, one increment)."""

    counts: list[int] = field(default_factory=lambda: [0] * (FINE_US + 1))
    over_max: int = 0

    def total(self) -> int:
        return sum(self.counts)

    def percentile(self, q: float) -> float:
        total = self.total()
        if not total:
            return 0.0
        rank = max(1, -(-int(q * total * 1_000_000) // 1_000_000))  # nearest rank, ceil(q * total)
        acc = 0
        for us, c in enumerate(self.counts):
            acc += c
            if acc >= rank:
                return float(us if us < FINE_US else self.over_max)
        return float(self.over_max)

    def max(self) -> float:
        if self.counts[FINE_US]:
            return float(self.over_max)
        for us in range(FINE_US - 1, -1, -1):
            if self.counts[us]:
                return float(us)
        return 0.0

    def summary(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}p50_us": self.percentile(0.50),
            f"{prefix}p99_us": self.percentile(0.99),
            f"{prefix}p999_us": self.percentile(0.999),
            f"{prefix}max_us": self.max(),
        }


def _fast_handler(fine: _Fine) -> Callable[[Tick], None]:
    counts = fine.counts
    clock = time.perf_counter_ns

    def on_tick(tick: dict[str, Any]) -> None:
        us = (clock() - tick[STAMP]) // 1000
        if us < FINE_US:
            counts[us] += 1
        else:
            counts[FINE_US] += 1
            if us > fine.over_max:
                fine.over_max = us

    return cast(Callable[[Tick], None], on_tick)  # a tick is a dict; this one reads the bench's own field


class _Slow:
    """An async handler that cannot keep up: it sleeps 1 ms every ``every`` ticks, until ``draining``."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.n = 0
        self.draining = False

    async def __call__(self, tick: Tick) -> None:
        self.n += 1
        if not self.draining and self.n % self.every == 0:
            await asyncio.sleep(0.001)


def bench_patterns(index: int, symbols: int, slow: bool) -> list[str]:
    """The patterns of subscriber ``index``: slow ones take everything; fast ones a mix of
    everything, one channel, a tenth of the symbols (glob) and one stream (literal)."""
    if slow:
        return [f"{VENUE}:*:*"]
    kind = index % 4
    if kind == 0:
        return [f"{VENUE}:*:*"]
    if kind == 1:
        return [f"{VENUE}:*:trade"]
    if kind == 2:
        return [f"{VENUE}:S{index % 10}*:*"]
    return [f"{VENUE}:S{index % symbols:04d}:book_ticker"]


def _build(total: int, symbols: int, seed: int) -> tuple[list[dict[str, Any]], list[int], list[str]]:
    """``total`` ticks over ``symbols`` x 3 channels, seq contiguous per stream, seeded."""
    rng = random.Random(seed)
    streams = [(f"S{i:04d}", ch) for i in range(symbols) for ch in CHANNELS]
    names = [f"{VENUE}:{sym}:{ch}" for sym, ch in streams]
    which = rng.choices(range(len(streams)), k=total)
    seqs = [0] * len(streams)
    prices = [f"{100 + i / 100:.2f}" for i in range(64)]
    ticks: list[dict[str, Any]] = []
    append = ticks.append
    for n, sid in enumerate(which):
        sym, ch = streams[sid]
        seq = seqs[sid] = seqs[sid] + 1
        append({
            "v": 1, "venue": VENUE, "symbol": sym, "channel": ch, "seq": seq, "ts_event": 0, "ts_recv": 0,
            "trade_id": seq, "price": prices[n & 63], "qty": "1.000", "side": "buy", STAMP: 0,
        })
    return ticks, which, names


async def _generate(
    ingress: IngressQueue[Tick], ticks: list[dict[str, Any]], rate: float, duration: float,
) -> tuple[int, float]:
    """Put ticks at ``rate``/s until ``duration`` has passed; returns (sent, seconds)."""
    clock, stamp_clock = time.monotonic, time.perf_counter_ns
    offer, put = ingress.offer, ingress.put
    limit = len(ticks)
    sent = 0
    t0 = clock()
    end = t0 + duration
    while True:
        now = clock()
        if now >= end:
            break
        due = min(limit, int((now - t0) * rate) + 1)
        while sent < due:
            # Put what fits, then stamp it: the batch is ready in the ingress now, and nothing
            # downstream can run before this task yields.  A full ingress (block) is waited for.
            i = sent
            while sent < due and offer(ticks[sent]):  # type: ignore[arg-type]
                sent += 1
            stamp = stamp_clock()
            for k in range(i, sent):
                ticks[k][STAMP] = stamp
            if sent < due:
                ticks[sent][STAMP] = stamp
                await put(ticks[sent])  # type: ignore[arg-type]
                sent += 1
        await asyncio.sleep(PACE_S)
    return sent, clock() - t0


async def _distribute_hot(ingress: IngressQueue[Tick], hot: HotPath) -> None:
    while True:
        batch = await ingress.get_batch(MAX_BATCH)
        if not hot.publish(batch):
            await hot.wait_room()


async def _poll(condition: Callable[[], bool], limit_s: float) -> bool:
    """Check ``condition`` every 5 ms (it reads counters: nothing to wait on) for at most ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.005)


async def _run_hot(
    ticks: list[dict[str, Any]], which: list[int], names: list[str], *, rate: float, subscribers: int,
    slow_subscribers: int, duration: float, symbols: int, capacity: int, max_lag: int | None,
) -> dict[str, Any]:
    hot = HotPath(capacity=capacity)
    ingress: IngressQueue[Tick] = IngressQueue(INGRESS_CAPACITY, Policy.BLOCK)
    fine = _Fine()
    slow_every = max(1, int(rate // 4000))
    subs: list[tuple[Subscription, bool]] = []
    slows: list[_Slow] = []
    for k in range(subscribers):
        is_slow = k < slow_subscribers
        handler: Callable[[Tick], Awaitable[None] | None]
        if is_slow:
            slow = _Slow(slow_every)
            slows.append(slow)
            handler = slow
        else:
            handler = _fast_handler(fine)
        name = f"{'slow' if is_slow else 'fast'}{k}"
        subs.append((hot.subscribe(handler, bench_patterns(k, symbols, is_slow), max_lag=max_lag, name=name), is_slow))

    hot.declare(names)  # as an ingestor does with its configured streams
    cpu0 = time.process_time()
    wall0 = time.monotonic()
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        dist = tg.create_task(_distribute_hot(ingress, hot), name="bench-distributor")
        sent, gen_s = await _generate(ingress, ticks, rate, duration)
        for slow in slows:
            slow.draining = True
        published_all = await _poll(lambda: hot.published == sent, DRAIN_TIMEOUT_S)
        drained = published_all and await _poll(
            lambda: all(s.stats().pending == 0 for s, _ in subs), DRAIN_TIMEOUT_S
        )
        cpu_s = time.process_time() - cpu0
        wall_s = time.monotonic() - wall0
        stats = [(s.stats(), is_slow) for s, is_slow in subs]
        hot_stats = hot.stats()
        hot.close()
        dist.cancel()

    per_stream = Counter(which[:sent])
    accounted = drained
    for st, _ in stats:
        pats = [Pattern(p) for p in st.patterns]
        expected = sum(n for sid, n in per_stream.items() if any(p.matches(names[sid]) for p in pats))
        if not (st.matched == expected == st.delivered + st.dropped and st.pending == 0):
            accounted = False
    fast = [st for st, is_slow in stats if not is_slow]
    slow_st = [st for st, is_slow in stats if is_slow]
    return {
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
    }


async def _run_baseline(
    ticks: list[dict[str, Any]], *, rate: float, subscribers: int, slow_subscribers: int, duration: float,
    symbols: int,
    max_lag: int,
) -> dict[str, Any]:
    """The same load through one asyncio.Queue per subscriber (filtering in the fan-out loop)."""
    ingress: IngressQueue[Tick] = IngressQueue(INGRESS_CAPACITY, Policy.BLOCK)
    fine = _Fine()
    slow_every = max(1, int(rate // 4000))
    queues: list[tuple[asyncio.Queue[Tick], list[Pattern], dict[tuple[str, str], bool]]] = []
    handlers: list[Callable[[Tick], Awaitable[None] | None]] = []
    slow_flags: list[bool] = []
    dropped = [0]
    for k in range(subscribers):
        is_slow = k < slow_subscribers
        queues.append((asyncio.Queue(max_lag), [Pattern(p) for p in bench_patterns(k, symbols, is_slow)], {}))
        handlers.append(_Slow(slow_every) if is_slow else _fast_handler(fine))
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
        sent, _ = await _generate(ingress, ticks, rate, duration)
        cpu_s = time.process_time() - cpu0
        for t in tasks:
            t.cancel()
    return {**fine.summary("baseline_"), "baseline_sent": sent, "baseline_dropped": dropped[0],
            "baseline_cpu_s": round(cpu_s, 3)}


async def _measure(
    ticks: list[dict[str, Any]], which: list[int], names: list[str], *, rate: float, subscribers: int,
    slow_subscribers: int, duration: float, symbols: int, capacity: int, max_lag: int | None, baseline_s: float,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "rate": rate, "subscribers": subscribers, "slow_subscribers": slow_subscribers, "duration": duration,
        "symbols": symbols, "streams": symbols * len(CHANNELS), "capacity": capacity,
        "max_lag": capacity // 4 if max_lag is None else max_lag,
    }
    result |= await _run_hot(
        ticks, which, names, rate=rate, subscribers=subscribers, slow_subscribers=slow_subscribers,
        duration=duration, symbols=symbols, capacity=capacity, max_lag=max_lag,
    )
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
) -> dict[str, Any]:
    """Run the hot-path load test; returns the figures as one flat dict (see the module doc).

    ``baseline_duration`` defaults to ``min(duration, 5)`` seconds; ``baseline=False`` skips it.
    """
    if rate <= 0 or duration <= 0:
        raise ConfigError(f"rate and duration must be positive, got rate={rate} duration={duration}")
    if subscribers < 1 or not 0 <= slow_subscribers <= subscribers:
        raise ConfigError(
            f"need at least 1 subscriber and 0 <= slow subscribers <= subscribers, got {subscribers}/{slow_subscribers}"
        )
    if symbols < 1:
        raise ConfigError(f"symbols must be at least 1, got {symbols}")
    total = int(rate * duration) + 1
    if total > MAX_TICKS:
        raise ConfigError(f"rate x duration is {total} ticks, over the bench's limit of {MAX_TICKS}")
    base_s = min(duration, 5.0) if baseline_duration is None else baseline_duration

    ticks, which, names = _build(total, symbols, seed)
    # The pre-built ticks live for the whole run: keep the collector from walking the list holding them.
    gc.freeze()
    deadline = duration + base_s + 4 * DRAIN_TIMEOUT_S + 30.0  # a bound on the whole run: it never hangs
    try:
        async with asyncio.timeout(deadline):
            return await _measure(ticks, which, names, rate=rate, subscribers=subscribers,
                                  slow_subscribers=slow_subscribers, duration=duration, symbols=symbols,
                                  capacity=capacity, max_lag=max_lag, baseline_s=base_s if baseline else 0.0)
    finally:
        gc.unfreeze()
