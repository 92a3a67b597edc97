"""Reading the ingestor's ``/metrics`` page: Prometheus text -> samples and latency histograms.

Pure: text in, a :class:`Scrape` out; the HTTP read itself is :func:`ops.bench.processes.http_get`.
A histogram in :class:`~consumer_sdk.core.latency.LatencyHistogram`'s layout is rebuilt bucket for bucket,
so two scrapes can be subtracted (:func:`window_hist`) and a window's percentiles cover that window
only.  Cost: one regex match per line of the page.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

from consumer_sdk.core.latency import LatencyHistogram, bucket_bounds

__all__ = ["Scrape", "parse_metrics", "window_hist"]

_BOUNDS: Final = bucket_bounds()
_LINE: Final = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL: Final = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Scrape:
    """One read of a Prometheus text page: samples and histograms, each by (name, labels)."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]
    hists: dict[tuple[str, frozenset[tuple[str, str]]], LatencyHistogram]

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.values.items() if n == name and want <= lab)

    def hist(self, name: str, **labels: str) -> LatencyHistogram:
        """``name``'s histogram: a new one, every label set that includes ``labels`` merged (all of them when none
        is given), as :meth:`total` sums samples."""
        want = set(labels.items())
        out = LatencyHistogram()
        for (n, lab), h in self.hists.items():
            if n == name and want <= lab:
                out.merge(h)
        return out


def parse_metrics(text: str) -> Scrape:
    """Prometheus text exposition -> :class:`Scrape`; histograms in :class:`LatencyHistogram`'s layout
    are rebuilt from their cumulative buckets, one per label set."""
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    buckets: dict[tuple[str, frozenset[tuple[str, str]]], list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, raw_labels, raw_value = m.groups()
        try:
            value = float(raw_value)
        except ValueError:
            continue
        labels = dict(_LABEL.findall(raw_labels or ""))
        if name.endswith("_bucket") and "le" in labels:
            le = labels.pop("le")
            key = (name.removesuffix("_bucket"), frozenset(labels.items()))
            buckets.setdefault(key, []).append((float(le), value))
            continue
        values[(name, frozenset(labels.items()))] = value
    hists: dict[tuple[str, frozenset[tuple[str, str]]], LatencyHistogram] = {}
    for (base, label_set), pairs in buckets.items():
        pairs.sort()
        if len(pairs) != len(_BOUNDS) or any(a != b for (a, _), b in zip(pairs, _BOUNDS, strict=True)):
            continue  # not in our histogram layout
        h = LatencyHistogram.from_buckets([int(c) for _, c in pairs], values.get((f"{base}_sum", label_set), 0.0))
        h.max_us = _top_bound(h)  # the text carries no max: the upper bound of the highest bucket used
        hists[(base, label_set)] = h
    return Scrape(values, hists)


def _top_bound(h: LatencyHistogram) -> int:
    """The upper bound of the highest non-empty bucket (the last finite one for the overflow bucket)."""
    top = next((i for i in range(len(h.counts) - 1, -1, -1) if h.counts[i] > 0), None)
    if top is None:
        return 0
    bound = _BOUNDS[top]
    return int(bound if math.isfinite(bound) else _BOUNDS[-2])


def window_hist(later: LatencyHistogram, earlier: LatencyHistogram) -> LatencyHistogram:
    """What ``later`` observed after ``earlier``; its max is the upper bound of its highest bucket."""
    h = later.since(earlier)
    h.max_us = _top_bound(h)
    return h
