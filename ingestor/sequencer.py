"""Per-stream sequencing of normalized ticks: pure, one owner, no locks.

For channels whose ``seq`` is the venue's own id (trade, agg_trade, book_ticker)
the sequencer checks it: duplicates and late (out-of-order) ticks are rejected,
jumps are accepted and reported as gaps.  Klines carry no venue id: the
sequencer assigns ``last + 1``, starting from what the stream already holds
(:meth:`Sequencer.seed`), so the numbering carries across restarts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from consumer_sdk.sequencing import SeqTracker, Verdict
from consumer_sdk.tick import Tick

__all__ = ["GapReport", "SequenceStats", "Sequencer"]


@dataclass(frozen=True, slots=True)
class GapReport:
    """A hole in a stream's venue ids, inclusive on both ends."""

    venue: str
    symbol: str
    channel: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class SequenceStats:
    accepted: int
    gaps: int
    gap_ticks: int
    duplicates: int
    out_of_order: int


class Sequencer:
    """Checks or assigns ``seq`` per ``(venue, symbol, channel)``."""

    __slots__ = ("_assigned", "_trackers", "assigned_count", "pending_gaps")

    def __init__(self) -> None:
        self._trackers: dict[tuple[str, str, str], SeqTracker] = {}
        self._assigned: dict[tuple[str, str, str], int] = {}
        self.assigned_count = 0
        #: gaps seen since the owner last drained them (bounded by the owner draining it)
        self.pending_gaps: list[GapReport] = []

    def seed(self, venue: str, symbol: str, channel: str, last_seq: int) -> None:
        """Continue after ``last_seq``, the newest seq already stored for this stream."""
        ident = (venue, symbol, channel)
        if channel.startswith("kline_"):
            self._assigned[ident] = last_seq
        else:
            self._trackers[ident] = SeqTracker(last_seq)

    def accept(self, tick: Tick) -> Verdict:
        """Check (or assign) the tick's ``seq``; the tick goes on only when the verdict is accepted."""
        ident = (tick["venue"], tick["symbol"], tick["channel"])
        if tick["seq"] == 0 and ident[2].startswith("kline_"):
            seq = self._assigned.get(ident, 0) + 1
            self._assigned[ident] = seq
            self.assigned_count += 1
            tick["seq"] = seq
            return Verdict.OK
        tracker = self._trackers.get(ident)
        if tracker is None:
            tracker = self._trackers[ident] = SeqTracker()
        last = tracker.last
        verdict = tracker.observe(tick["seq"])
        if verdict is Verdict.GAP and last is not None:
            self.pending_gaps.append(GapReport(*ident, last + 1, tick["seq"] - 1))
        return verdict

    def last_seq(self, venue: str, symbol: str, channel: str) -> int | None:
        ident = (venue, symbol, channel)
        if ident in self._assigned:
            return self._assigned[ident]
        tracker = self._trackers.get(ident)
        return None if tracker is None else tracker.last

    def streams(self) -> Iterator[tuple[str, str, str]]:
        yield from self._trackers
        yield from self._assigned

    def stats(self) -> SequenceStats:
        ts = self._trackers.values()
        return SequenceStats(
            accepted=sum(t.accepted for t in ts) + self.assigned_count,
            gaps=sum(t.gaps for t in ts),
            gap_ticks=sum(t.gap_ticks for t in ts),
            duplicates=sum(t.duplicates for t in ts),
            out_of_order=sum(t.late for t in ts),
        )
