"""Order-book benchmark: updates per second of :class:`consumer_sdk.book.Book` against the naive book, in one run.

The naive book (:class:`NaiveBook`) is what a feed handler commonly does: a dict of levels, re-sorted after every
update so the best levels are at hand (both sides, as :meth:`Book.top <consumer_sdk.book.Book.top>` has them).  Both
parse prices and sizes with the same :func:`~consumer_sdk.book.decimal_parser`, so what differs is the storage:
a binary search and a list insert against a full sort.

Workloads (built before the clock starts, so both books get the very same input):

- :func:`synthetic_workload`: a seeded snapshot of ``depth`` levels a side around a fixed mid price in Binance's
  8-decimal strings, then diffs of 1 to 8 levels a side, most near the top, a quarter of them deletes (of present
  and of absent levels), some beyond the snapshot's depth;
- :func:`capture_workload`: one symbol's REST snapshot and depth diffs from a Binance spot capture (the format of
  tests/fixtures: frames ``.jsonl`` and REST replies ``.depth.jsonl``), the continuous diffs after the snapshot
  replayed over and over (update ids shifted on each pass) until there are enough.

:func:`bench_book` applies the workload's diffs to each book, timing every update with ``perf_counter_ns``
(the clock reads are counted in both sides' times alike), and returns one flat dict: rates, their ratio, the p50
and p99 time of one update on each side, and a digest of each side's final book, which must agree.
"""

from __future__ import annotations

import gc
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from consumer_sdk.book import DEFAULT_SCALE, Book, Level, decimal_parser

__all__ = ["NaiveBook", "Workload", "bench_book", "capture_workload", "levels_digest", "synthetic_workload"]

#: one diff: bids, asks (``[price, size]`` pairs) and the update id
Diff = tuple[list[list[str]], list[list[str]], int]


@dataclass(frozen=True, slots=True)
class Workload:
    """A snapshot and the diffs that follow it."""

    source: str
    update_id: int
    bids: list[list[str]]
    asks: list[list[str]]
    diffs: list[Diff]


class NaiveBook:
    """The baseline: one dict per side, keyed by the exact price, and both sides fully re-sorted per update."""

    __slots__ = ("_parse", "ask_order", "asks", "bid_order", "bids", "update_id")

    def __init__(self, scale: int = DEFAULT_SCALE) -> None:
        self._parse = decimal_parser(scale)
        self.bids: dict[int, Level] = {}
        self.asks: dict[int, Level] = {}
        self.bid_order: list[int] = []
        self.ask_order: list[int] = []
        self.update_id = 0

    def apply_snapshot(self, update_id: int, bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]]) -> None:
        parse = self._parse
        self.bids = {parse(p): (p, s) for p, s in bids}
        self.asks = {parse(p): (p, s) for p, s in asks}
        self._sort()
        self.update_id = update_id

    def apply_diff(self, bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]], update_id: int) -> None:
        parse = self._parse
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for price, size in levels:
                if parse(size):
                    side[parse(price)] = (price, size)
                else:
                    side.pop(parse(price), None)
        self._sort()
        self.update_id = update_id

    def _sort(self) -> None:
        self.bid_order = sorted(self.bids, reverse=True)
        self.ask_order = sorted(self.asks)

    def levels(self) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        return tuple(self.bids[k] for k in self.bid_order), tuple(self.asks[k] for k in self.ask_order)


def levels_digest(levels: tuple[Sequence[Level], Sequence[Level]]) -> str:
    """A sha256 of a book's levels (each side best first, the venue's strings)."""
    h = hashlib.sha256()
    for side in levels:
        for price, size in side:
            h.update(f"{price} {size}\n".encode())
        h.update(b"|\n")
    return h.hexdigest()


def _units(n: int) -> str:
    return f"{n // 100_000_000}.{n % 100_000_000:08d}"


def synthetic_workload(updates: int, depth: int = 1000, seed: int = 7) -> Workload:
    """A seeded snapshot of ``depth`` levels a side (ticks of 0.01 around 30000) and ``updates`` diffs after it.

    Each diff sets or deletes 1 to 8 levels a side: 70% within 20 ticks of the mid, 25% within 200, the rest
    up to twice the depth; a quarter are deletes, present or not.  Bids stay below the mid and asks above it.
    """
    rng = random.Random(seed)
    mid = 3_000_000  # in cents

    def price(cents: int) -> str:
        return f"{cents // 100}.{cents % 100:02d}000000"

    def size() -> str:
        return _units(rng.randrange(1, 5_000_000_000))

    bids = [[price(mid - i), size()] for i in range(1, depth + 1)]
    asks = [[price(mid + i), size()] for i in range(1, depth + 1)]
    diffs: list[Diff] = []
    for n in range(updates):
        sides: list[list[list[str]]] = []
        for sign in (-1, 1):
            levels = []
            for _ in range(rng.randrange(1, 9)):
                roll = rng.randrange(100)
                far = 20 if roll < 70 else 200 if roll < 95 else 2 * depth
                cents = mid + sign * rng.randrange(1, far + 1)
                levels.append([price(cents), "0.00000000" if rng.randrange(4) == 0 else size()])
            sides.append(levels)
        diffs.append((sides[0], sides[1], 1_001 + n))
    return Workload("synthetic", 1_000, bids, asks, diffs)


def capture_workload(frames: Path, snapshots: Path, updates: int, symbol: str | None = None) -> Workload:
    """``symbol``'s (by default the one with the most diffs) REST snapshot and its continuous spot diffs after it,
    repeated until ``updates`` diffs; each pass shifts the update ids past the last one."""
    books: dict[str, tuple[int, list[list[str]], list[list[str]]]] = {}
    for line in snapshots.read_bytes().splitlines():
        row = orjson.loads(line)
        sym = row["url"].split("symbol=")[1].split("&")[0]
        body = orjson.loads(row["body"])
        books[sym] = (body["lastUpdateId"], body["bids"], body["asks"])
    found: dict[str, list[Diff]] = {sym: [] for sym in books}
    for line in frames.read_bytes().splitlines():
        data = orjson.loads(orjson.loads(line)["frame"]).get("data")
        if isinstance(data, dict) and data.get("e") == "depthUpdate" and data["s"] in found:
            diffs, last = found[data["s"]], books[data["s"]][0]
            prev = diffs[-1][2] if diffs else last
            if data["u"] > last and (data["U"] == prev + 1 if diffs else data["U"] <= last + 1):
                diffs.append((data["b"], data["a"], data["u"]))
    sym = symbol or max(found, key=lambda s: len(found[s]))
    last, bids, asks = books[sym]
    one = found[sym]
    if not one:
        raise ValueError(f"{frames}: no diffs of {sym} follow its snapshot")
    span = one[-1][2] - last
    out: list[Diff] = []
    while len(out) < updates:
        shift = span * (len(out) // len(one))
        out.extend((b, a, u + shift) for b, a, u in one)
    return Workload(f"capture:{sym}", last, bids, asks, out[:updates])


def _timed(apply: Callable[[list[list[str]], list[list[str]], int], None], diffs: list[Diff]) -> tuple[int, list[int]]:
    """Total and per-update nanoseconds of applying ``diffs`` in order."""
    clock = time.perf_counter_ns
    samples = [0] * len(diffs)
    gc.collect()
    start = clock()
    for i, (bids, asks, update_id) in enumerate(diffs):
        t0 = clock()
        apply(bids, asks, update_id)
        samples[i] = clock() - t0
    return clock() - start, samples


def _quantile_us(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    return round(sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000, 3)


def bench_book(
    workload: Workload | None = None, *, updates: int = 20_000, depth: int = 1000, seed: int = 7,
    scale: int = DEFAULT_SCALE,
) -> dict[str, Any]:
    """Apply ``workload`` (by default :func:`synthetic_workload` of ``updates``, ``depth``, ``seed``) to a
    :class:`Book` and to a :class:`NaiveBook`; return the rates, their ratio, p50/p99 of one update and the
    final books' digests.  Cost: the workload's diffs twice, plus a full sort per diff on the naive side."""
    work = workload or synthetic_workload(updates, depth, seed)
    book, naive = Book(scale), NaiveBook(scale)
    book.apply_snapshot(work.update_id, work.bids, work.asks)
    naive.apply_snapshot(work.update_id, work.bids, work.asks)
    book_ns, book_samples = _timed(book.apply_diff, work.diffs)
    naive_ns, naive_samples = _timed(naive.apply_diff, work.diffs)
    n = len(work.diffs)
    rate = n * 1e9 / book_ns if book_ns else 0.0
    base = n * 1e9 / naive_ns if naive_ns else 0.0
    book_samples.sort()
    naive_samples.sort()
    book_digest, naive_digest = levels_digest(book.levels()), levels_digest(naive.levels())
    return {
        "source": work.source,
        "updates": n,
        "levels_per_update": round(sum(len(b) + len(a) for b, a, _ in work.diffs) / n, 2) if n else 0.0,
        "depth": list(book.depth()),
        "updates_per_s": round(rate),
        "baseline_updates_per_s": round(base),
        "ratio": round(rate / base, 2) if base else 0.0,
        "p50_us": _quantile_us(book_samples, 0.50),
        "p99_us": _quantile_us(book_samples, 0.99),
        "baseline_p50_us": _quantile_us(naive_samples, 0.50),
        "baseline_p99_us": _quantile_us(naive_samples, 0.99),
        "book_update_id": book.update_id,
        "baseline_update_id": naive.update_id,
        "book_digest": book_digest,
        "baseline_digest": naive_digest,
        "equal": book_digest == naive_digest,
    }
