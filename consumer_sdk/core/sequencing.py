"""Pure sequence checking, shared by the ingestor and the consumer SDK.

One :class:`SeqTracker` per stream, owned by one task: no locks.  It classifies
each ``seq`` against the last accepted one:

- ``OK``: the next one (or the first seen).
- ``GAP``: accepted, but ``seq`` jumped; the hole ``(last+1 .. seq-1)`` is remembered (bounded).
- ``DUPLICATE``: at or below the last accepted and not inside a remembered hole: seen already.
- ``LATE``: inside a remembered hole: it arrived out of order, after a newer one was accepted.

Only ``OK`` and ``GAP`` are accepted (the stream keeps ``seq`` strictly increasing).

Not every ``seq`` is contiguous: a Binance ``bookTicker``'s ``u`` is the order book's update
id, which also advances on changes below the top of the book, and a kline's ``seq`` is its
event time in milliseconds; both skip by design.  A tracker
built with ``contiguous=False`` accepts jumps silently and calls anything at or below the last
``DUPLICATE`` (equal) or ``LATE`` (older).  :func:`is_contiguous_channel` tells which is which.
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum

__all__ = ["SeqTracker", "Verdict", "is_contiguous_channel"]


def is_contiguous_channel(channel: str) -> bool:
    """Whether a hole in this channel's ``seq`` is a real loss: trades and aggregate trades.

    A book ticker's ``seq`` is the book's update id, a kline's is its event time in ms: both skip by design.
    """
    return channel in ("trade", "agg_trade")


class Verdict(IntEnum):
    OK = 0
    GAP = 1
    DUPLICATE = 2
    LATE = 3

    @property
    def accepted(self) -> bool:
        return self <= Verdict.GAP


class SeqTracker:
    """Last accepted ``seq`` of one stream, and counters of what was not contiguous."""

    __slots__ = ("_holes", "accepted", "contiguous", "duplicates", "gap_ticks", "gaps", "last", "late")

    MAX_HOLES = 64

    def __init__(self, last: int | None = None, *, contiguous: bool = True) -> None:
        self.last = last
        self.contiguous = contiguous
        self._holes: deque[tuple[int, int]] = deque(maxlen=self.MAX_HOLES)
        self.accepted = 0
        self.gaps = 0
        self.gap_ticks = 0
        self.duplicates = 0
        self.late = 0

    def observe(self, seq: int) -> Verdict:
        last = self.last
        if last is None or seq == last + 1:
            self.last = seq
            self.accepted += 1
            return Verdict.OK
        if seq > last:
            if not self.contiguous:
                self.last = seq
                self.accepted += 1
                return Verdict.OK
            self._holes.append((last + 1, seq - 1))
            self.gaps += 1
            self.gap_ticks += seq - last - 1
            self.last = seq
            self.accepted += 1
            return Verdict.GAP
        if not self.contiguous and seq < last:
            self.late += 1
            return Verdict.LATE
        for lo, hi in self._holes:
            if lo <= seq <= hi:
                self.late += 1
                return Verdict.LATE
        self.duplicates += 1
        return Verdict.DUPLICATE

    def holes(self) -> list[tuple[int, int]]:
        """The remembered holes, oldest first, as inclusive ``(first, last)`` ranges."""
        return list(self._holes)

    def fill(self, first: int, last: int) -> None:
        """Forget a hole (or part of one) once it was repaired or reported."""
        kept: list[tuple[int, int]] = []
        for lo, hi in self._holes:
            if hi < first or lo > last:
                kept.append((lo, hi))
                continue
            if lo < first:
                kept.append((lo, first - 1))
            if hi > last:
                kept.append((last + 1, hi))
        self._holes.clear()
        self._holes.extend(kept)
