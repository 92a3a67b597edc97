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

from consumer_sdk.sequencing import SeqTracker, Verdict, is_contiguous_channel
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

    __slots__ = ("_assigned", "_kline_event", "_trackers", "assigned_count", "kline_duplicates", "last_gap")

    def __init__(self) -> None:
        self._trackers: dict[tuple[str, str, str], SeqTracker] = {}
        self._assigned: dict[tuple[str, str, str], int] = {}
        self._kline_event: dict[tuple[str, str, str], int] = {}
        self.assigned_count = 0
        self.kline_duplicates = 0
        #: the hole behind the most recent ``GAP`` verdict
        self.last_gap: GapReport | None = None

    def seed(self, venue: str, symbol: str, channel: str, last_seq: int, last_event: int = 0) -> None:
        """Continue after ``last_seq`` (and, for klines, the event time ``last_event``), the newest stored.

        Seeding never moves a stream backwards: the newest of several sources (Redis, the spill log) wins.
        """
        ident = (venue, symbol, channel)
        if channel.startswith("kline_"):
            if last_seq >= self._assigned.get(ident, -1):
                self._assigned[ident] = last_seq
                self._kline_event[ident] = max(last_event, self._kline_event.get(ident, -1))
        else:
            tracker = self._trackers.get(ident)
            if tracker is None or tracker.last is None or last_seq > tracker.last:
                self._trackers[ident] = SeqTracker(last_seq, contiguous=is_contiguous_channel(channel))

    def accept(self, tick: Tick) -> Verdict:
        """Check (or assign) the tick's ``seq``; the tick goes on only when the verdict is accepted."""
        ident = (tick["venue"], tick["symbol"], tick["channel"])
        if tick["seq"] == 0 and ident[2].startswith("kline_"):
            # A kline update is known by its event time: one already seen (a replayed frame, or the
            # overlap of two connections during a rotation) is a duplicate.
            if tick["ts_event"] <= self._kline_event.get(ident, -1):
                self.kline_duplicates += 1
                return Verdict.DUPLICATE
            self._kline_event[ident] = tick["ts_event"]
            seq = self._assigned.get(ident, 0) + 1
            self._assigned[ident] = seq
            self.assigned_count += 1
            tick["seq"] = seq
            return Verdict.OK
        tracker = self._trackers.get(ident)
        if tracker is None:
            tracker = self._trackers[ident] = SeqTracker(contiguous=is_contiguous_channel(ident[2]))
        last = tracker.last
        verdict = tracker.observe(tick["seq"])
        if verdict is Verdict.GAP and last is not None:
            self.last_gap = GapReport(*ident, last + 1, tick["seq"] - 1)
        return verdict

    def forget_holes(self, ident: tuple[str, str, str], first: int, last: int) -> None:
        """The ids ``first..last`` were repaired or marked: a late arrival among them is now a duplicate."""
        tracker = self._trackers.get(ident)
        if tracker is not None:
            tracker.fill(first, last)

    def release(self, venue: str, symbol: str, channel: str) -> None:
        """Forget a stream's state (it was unsubscribed); a later seed or tick starts it again."""
        ident = (venue, symbol, channel)
        self._trackers.pop(ident, None)

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
            duplicates=sum(t.duplicates for t in ts) + self.kline_duplicates,
            out_of_order=sum(t.late for t in ts),
        )
