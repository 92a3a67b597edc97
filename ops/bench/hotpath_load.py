"""The hot-path bench's load and meters: pre-built ticks, the paced generator, the subscribers' handlers.

What :mod:`ops.bench.hotpath` runs: :func:`build_ticks` makes the ticks once (seeded, seq contiguous per
stream); :func:`generate` puts them into an ingress at an exact rate on the monotonic clock and stamps
each batch (:data:`STAMP`) once it is wholly in the ingress; :func:`distribute` is the distributor's
order (hot path, then writer); :func:`fast_handler` counts "ready in ingress -> callback" in a
:class:`FineHistogram` (1 µs buckets: one index, one increment per tick); :class:`SlowHandler` and
:class:`SlowSyncHandler` are the subscribers that cannot keep up.  Costs: the ticks about 0.5 kB each,
a histogram 100k ints.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import Tick
from distributor.hotpath import HotPath
from distributor.ingress import IngressQueue
from distributor.writer import StreamWriter

__all__ = [
    "CHANNELS",
    "FINE_US",
    "MAX_BATCH",
    "PACE_S",
    "STAMP",
    "VENUE",
    "FineAckHistogram",
    "FineHistogram",
    "SlowHandler",
    "SlowSyncHandler",
    "bench_patterns",
    "build_ticks",
    "distribute",
    "fast_handler",
    "generate",
]

CHANNELS: Final = ("trade", "agg_trade", "book_ticker")
VENUE: Final = "sim"
STAMP: Final = "_bench_t"  # the bench's own field: perf_counter_ns when the tick was put into the ingress
FINE_US: Final = 100_000  # the fine histogram counts 1 µs buckets up to 100 ms, then one overflow bucket
MAX_BATCH: Final = 5000
PACE_S: Final = 0.0005  # the generator's sleep between batches (the event loop rounds it up to 1 ms)


@dataclass
class FineHistogram:
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

    def merge(self, other: FineHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.over_max = max(self.over_max, other.over_max)

    def summary(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}p50_us": self.percentile(0.50),
            f"{prefix}p99_us": self.percentile(0.99),
            f"{prefix}p999_us": self.percentile(0.999),
            f"{prefix}max_us": self.max(),
        }


def fast_handler(fine: FineHistogram) -> Callable[[Tick], None]:
    """A fast subscriber's handler: counts ``clock - tick[STAMP]`` (ready in ingress -> callback) in ``fine``."""
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


class SlowHandler:
    """An async handler that cannot keep up: it sleeps 1 ms every ``every`` ticks, until ``draining``."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.n = 0
        self.draining = False

    async def __call__(self, tick: Tick) -> None:
        self.n += 1
        if not self.draining and self.n % self.every == 0:
            await asyncio.sleep(0.001)


class SlowSyncHandler:
    """A synchronous handler that blocks ``ms`` per tick (the thread sleeps), until ``draining``."""

    def __init__(self, ms: float) -> None:
        self.seconds = ms / 1000
        self.n = 0
        self.draining = False

    def __call__(self, tick: Tick) -> None:
        self.n += 1
        if not self.draining:
            time.sleep(self.seconds)


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


def build_ticks(total: int, symbols: int, seed: int) -> tuple[list[dict[str, Any]], list[int], list[str]]:
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


async def generate(
    ingress: IngressQueue[Tick], ticks: list[dict[str, Any]], rate: float, duration: float, *, wall: bool = False,
) -> tuple[int, float]:
    """Put ticks at ``rate``/s until ``duration`` has passed; returns (sent, seconds).

    ``wall``: also stamp ``ts_recv`` (µs since the epoch, once per batch) for the writer's latency."""
    clock, stamp_clock, wall_clock = time.monotonic, time.perf_counter_ns, time.time_ns
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
            last = sent + 1 if sent < due else sent
            for k in range(i, last):
                ticks[k][STAMP] = stamp
            if wall:
                recv = wall_clock() // 1000
                for k in range(i, last):
                    ticks[k]["ts_recv"] = recv
            if sent < due:
                await put(ticks[sent])  # type: ignore[arg-type]
                sent += 1
        await asyncio.sleep(PACE_S)
    return sent, clock() - t0


async def distribute(ingress: IngressQueue[Tick], hot: HotPath, writer: StreamWriter | None = None) -> None:
    """The distributor's order: the hot path first, then the writer (when there is one)."""
    while True:
        batch = await ingress.get_batch(MAX_BATCH)
        if not hot.publish(batch):
            await hot.wait_room()
        if writer is not None:
            while not writer.submit(batch):
                await writer.wait_room()


class FineAckHistogram(LatencyHistogram):
    """The writer's acknowledgement histogram, also counted at 1 µs resolution (its own buckets are a
    quarter octave wide: too coarse to see a 10% move)."""

    __slots__ = ("fine",)

    def __init__(self) -> None:
        super().__init__()
        self.fine = FineHistogram()

    def observe(self, us: int) -> None:
        super().observe(us)
        fine = self.fine
        if 0 <= us < FINE_US:
            fine.counts[us] += 1
        else:
            fine.counts[FINE_US] += 1
            fine.over_max = max(fine.over_max, us)


