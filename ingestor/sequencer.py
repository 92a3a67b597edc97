"""Per-stream sequencing of normalized ticks: pure, one owner, no locks.

Every tick's ``seq`` comes from the venue (trade id, aggregate id, book update id, kline event
time): the sequencer checks it per ``(venue, symbol, channel)``.  Duplicates and late
(out-of-order) ticks are rejected; jumps in trade and aggregate trade ids are accepted and
reported as gaps: :meth:`Sequencer.check` returns the hole itself (a :class:`GapReport`) in place of the
``GAP`` verdict, for the repairer; :meth:`Sequencer.accept` returns the verdict and keeps the hole in
:attr:`Sequencer.last_gap`.  :meth:`Sequencer.seed` continues a stream after what is already stored,
so a restart rejects what it stored before.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from consumer_sdk.core.sequencing import SeqTracker, Verdict, is_contiguous_channel
from consumer_sdk.core.tick import Tick

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
    """Checks ``seq`` per ``(venue, symbol, channel)``."""

    __slots__ = ("_trackers", "last_gap")

    def __init__(self) -> None:
        self._trackers: dict[tuple[str, str, str], SeqTracker] = {}
        #: the hole behind the most recent ``GAP`` verdict
        self.last_gap: GapReport | None = None

    def seed(self, venue: str, symbol: str, channel: str, last_seq: int) -> None:
        """Continue after ``last_seq``, the newest seq stored (or saved) for this stream.

        Never moves a stream backwards, whichever order the sources (Redis, the spill log) are seeded
        in: the newest wins, and what the stream's tracker counted and remembers is kept.
        """
        ident = (venue, symbol, channel)
        tracker = self._trackers.get(ident)
        if tracker is None:
            self._trackers[ident] = SeqTracker(last_seq, contiguous=is_contiguous_channel(channel))
        elif tracker.last is None or last_seq > tracker.last:
            tracker.last = last_seq

    def check(self, tick: Tick) -> Verdict | GapReport:
        """Check the tick's ``seq``: ``OK``, the hole it revealed (a :class:`GapReport`: accepted, in place
        of ``GAP``), or ``DUPLICATE``/``LATE`` (rejected).  The tick goes on unless rejected.

        Cost: two dict lookups; a :class:`GapReport` is built only for a hole.
        """
        ident = (tick["venue"], tick["symbol"], tick["channel"])
        tracker = self._trackers.get(ident)
        if tracker is None:
            tracker = self._trackers[ident] = SeqTracker(contiguous=is_contiguous_channel(ident[2]))
        last = tracker.last
        verdict = tracker.observe(tick["seq"])
        if verdict is Verdict.GAP and last is not None:
            return GapReport(*ident, last + 1, tick["seq"] - 1)
        return verdict

    def accept(self, tick: Tick) -> Verdict:
        """Check the tick's ``seq``; the tick goes on only when the verdict is accepted.  A ``GAP``
        verdict's hole is left in :attr:`last_gap` (:meth:`check` returns it instead)."""
        verdict = self.check(tick)
        if isinstance(verdict, GapReport):
            self.last_gap = verdict
            return Verdict.GAP
        return verdict

    def forget_holes(self, ident: tuple[str, str, str], first: int, last: int) -> None:
        """The ids ``first..last`` were repaired or marked: a late arrival among them is now a duplicate."""
        tracker = self._trackers.get(ident)
        if tracker is not None:
            tracker.fill(first, last)

    def retract(self, gap: GapReport) -> None:
        """Take back the tick :meth:`check` just accepted with ``gap`` (the caller refused it after all): its stream
        goes on after ``gap.first - 1``, the hole and the tick are no longer counted."""
        tracker = self._trackers.get((gap.venue, gap.symbol, gap.channel))
        if tracker is None or tracker.last != gap.last + 1:
            return
        tracker.fill(gap.first, gap.last)
        tracker.last = gap.first - 1
        tracker.accepted -= 1
        tracker.gaps -= 1
        tracker.gap_ticks -= gap.last - gap.first + 1

    def release(self, venue: str, symbol: str, channel: str) -> None:
        """Forget a stream's state (it was unsubscribed); a later seed or tick starts it again."""
        self._trackers.pop((venue, symbol, channel), None)

    def last_seq(self, venue: str, symbol: str, channel: str) -> int | None:
        tracker = self._trackers.get((venue, symbol, channel))
        return None if tracker is None else tracker.last

    def trackers(self) -> Iterator[tuple[tuple[str, str, str], SeqTracker]]:
        yield from list(self._trackers.items())

    def stats(self) -> SequenceStats:
        ts = list(self._trackers.values())
        return SequenceStats(
            accepted=sum(t.accepted for t in ts),
            gaps=sum(t.gaps for t in ts),
            gap_ticks=sum(t.gap_ticks for t in ts),
            duplicates=sum(t.duplicates for t in ts),
            out_of_order=sum(t.late for t in ts),
        )
