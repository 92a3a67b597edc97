"""A lock-free latency histogram in microseconds, with four buckets per power of two.

``observe`` is an ``int.bit_length()``, a shift and one list increment: no allocation, no
lock, cheap enough to call per tick.  Below 8 µs every value has its own bucket; above, each
power-of-two range is split in four, so a reported percentile is within 25% of the truth (as
in HDR histograms, coarser).  One task owns a histogram; a metrics collector in another
thread only reads it (a torn read costs at most one sample).
"""

from __future__ import annotations

from typing import Final

from consumer_sdk.core.errors import ConfigError

__all__ = ["BUCKETS", "DEFAULT_SAMPLE_EVERY", "LatencyHistogram", "bucket_bounds", "bucket_of", "check_sample_every"]

#: values up to 2**32 µs (~71 min) are told apart; larger ones land in the last bucket
BUCKETS: Final = 8 + 29 * 4

#: Per-tick stages (frame -> ingress, frame -> Redis acknowledged) observe one tick in this many, chosen by
#: position, not by value (systematic sampling: 50k ticks/s still gives ~3k samples a second).  ``1``
#: observes every tick, ``0`` turns the measurement off.  The measured cost is in docs/bench.
DEFAULT_SAMPLE_EVERY: Final = 16


def check_sample_every(n: int) -> int:
    """``n`` if it is a valid sampling interval (0 = off, 1 = every tick, up to 65536)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 65536:
        raise ConfigError(f"latency sampling interval must be an integer from 0 (off) to 65536, got {n!r}")
    return n


def bucket_of(us: int) -> int:
    if us < 8:
        return us if us > 0 else 0
    b = us.bit_length()
    i = 8 + ((b - 4) << 2) + ((us >> (b - 3)) & 3)
    return i if i < BUCKETS else BUCKETS - 1


def bucket_bounds() -> list[float]:
    """The inclusive upper bound (``le``) of each bucket in µs; the last is +Inf."""
    out: list[float] = [float(i) for i in range(8)]
    for i in range(8, BUCKETS - 1):
        octave, sub = divmod(i - 8, 4)
        b = octave + 4
        out.append(float(((5 + sub) << (b - 3)) - 1))
    out.append(float("inf"))
    return out


_BOUNDS: Final = bucket_bounds()


class LatencyHistogram:
    __slots__ = ("counts", "max_us", "sum_us")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.sum_us = 0
        self.max_us = 0

    def observe(self, us: int) -> None:
        if us < 8:
            i = us if us > 0 else 0
            if us < 0:
                us = 0
        else:
            b = us.bit_length()
            i = 8 + ((b - 4) << 2) + ((us >> (b - 3)) & 3)
            if i >= BUCKETS:
                i = BUCKETS - 1
        self.counts[i] += 1
        self.sum_us += us
        if us > self.max_us:
            self.max_us = us

    @property
    def count(self) -> int:
        return sum(self.counts)

    def upper_bounds(self) -> list[float]:
        """The ``le`` bound of each bucket in µs (Prometheus style, cumulative buckets)."""
        return list(_BOUNDS)

    def cumulative(self) -> list[int]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return out

    def percentile(self, q: float) -> float:
        """An estimate of the ``q`` quantile (0..1) in µs: the upper bound of its bucket, capped at the max."""
        total = self.count
        if total == 0:
            return 0.0
        rank = q * total
        acc = 0
        for i, c in enumerate(self.counts):
            acc += c
            if c and acc >= rank:
                return float(min(_BOUNDS[i], self.max_us))
        return float(self.max_us)

    def merge(self, other: LatencyHistogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)

    def copy(self) -> LatencyHistogram:
        h = LatencyHistogram()
        h.counts = list(self.counts)
        h.sum_us = self.sum_us
        h.max_us = self.max_us
        return h

    def since(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """What was observed after ``earlier`` (a :meth:`copy` of this one); ``max_us`` is this one's."""
        h = LatencyHistogram()
        h.counts = [a - b for a, b in zip(self.counts, earlier.counts, strict=True)]
        h.sum_us = self.sum_us - earlier.sum_us
        h.max_us = self.max_us
        return h

    @classmethod
    def from_buckets(cls, cumulative: list[int], sum_us: float, max_us: int = 0) -> LatencyHistogram:
        """Rebuild from Prometheus-style cumulative bucket counts in this histogram's layout."""
        h = cls()
        prev = 0
        for i, c in enumerate(cumulative[:BUCKETS]):
            h.counts[i] = c - prev
            prev = c
        h.sum_us = int(sum_us)
        if not max_us:  # the highest non-empty bucket's bound (the last bucket has none: its lower bound)
            top = max((i for i, c in enumerate(h.counts) if c), default=-1)
            max_us = int(_BOUNDS[top]) if 0 <= top < BUCKETS - 1 else int(_BOUNDS[-2]) + 1 if top >= 0 else 0
        h.max_us = max_us
        return h
