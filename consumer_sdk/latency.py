"""A lock-free latency histogram with power-of-two microsecond buckets.

``observe`` is one ``int.bit_length()`` and one list increment: no allocation,
no lock, cheap enough to call per tick.  It is owned by one task; a metrics
collector in another thread only reads it (a torn read costs one sample).
Bucket ``i`` counts samples ``< 2**i`` µs and ``>= 2**(i-1)``; bucket 0 counts 0 µs.
"""

from __future__ import annotations

from typing import Final

__all__ = ["BUCKETS", "LatencyHistogram"]

BUCKETS: Final = 32  # up to 2**31 µs (~36 min); above that lands in the last bucket


class LatencyHistogram:
    __slots__ = ("counts", "max_us", "sum_us")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.sum_us = 0
        self.max_us = 0

    def observe(self, us: int) -> None:
        if us < 0:
            us = 0
        i = us.bit_length()
        self.counts[i if i < BUCKETS else BUCKETS - 1] += 1
        self.sum_us += us
        if us > self.max_us:
            self.max_us = us

    @property
    def count(self) -> int:
        return sum(self.counts)

    def upper_bounds(self) -> list[float]:
        """The ``le`` bound of each bucket in µs (Prometheus style, cumulative buckets)."""
        return [float(2**i) - 1 if i else 0.0 for i in range(BUCKETS - 1)] + [float("inf")]

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
            if acc >= rank and c:
                return float(min(2**i - 1 if i else 0, self.max_us))
        return float(self.max_us)

    def merge(self, other: LatencyHistogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)
