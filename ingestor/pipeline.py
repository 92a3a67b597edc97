"""The ingest pipeline: one socket read's frames -> the ticks to store and what the caller must act on.

Pure and synchronous: no I/O, no awaits, no clock.  :meth:`IngestPipeline.process` parses each frame
with the venue's :meth:`~ingestor.venue.Venue.parse_frame`, checks each tick's ``seq`` with the
:class:`~ingestor.sequencer.Sequencer`, and returns, in an :class:`Ingested`:

- ``ticks``: the accepted ticks to store, in the order received;
- ``held``: accepted ticks of streams under repair (the repairer's hold, passed in as ``holding``):
  they go to the repairer, which releases them in order once the hole before them is filled or marked;
- ``event``: the frame the caller must act on before the rest, where processing stopped: a
  :class:`GapFound` (the tick that revealed a hole in a stream's ids, and the hole), a
  :class:`~ingestor.venue.Reply`, a :class:`~ingestor.venue.ServerShutdown`, a :class:`BadFrame`
  (a frame refused, with its kind: to log) or a :class:`LoopError` (an unexpected exception: the connection ends);
- ``resume``: where to go on, ``process(ts, frames, resume)``, once the event is dealt with.

It stops at an event so the caller acts on it in the order the venue sent it: every tick before a
gap is stored before its repair starts (the repair's output then follows them), and a reply is
handled between the frames around it, as they came.  Events are rare (a gap, a reply at subscribe
time), so the common call processes the whole read at once.  Duplicates and late ticks are counted
and dropped; events this project does not carry are counted.

Refused, counted by kind in :attr:`IngestPipeline.refused` and never stored (a :class:`BadFrame` each):
what the venue's parser refuses (its kinds, for Binance :data:`ingestor.binance.PARSE_REFUSALS`), a tick of a
stream not subscribed (``unsubscribed``: a channel not carried for a symbol that is; ``unknown_symbol``: a
symbol no stream carries; checked when the caller passes ``carried``), and a tick whose id jumps ahead of
its stream's last by more than ``max_jump`` (``id_jump``: no real gap is that wide, and taking it would make
every later id of the venue a duplicate; the stream goes on after its last id as if it never came).
:data:`SKIP_REASONS` lists every reason a frame is skipped, with those the connection counts.

A venue whose frames carry several ticks (OKX: one push, several ``data`` entries) returns them as a list from
its parser: each is checked as a frame's tick is, in order; an event among them stops processing there, and the
call that resumes takes the frame's remaining ticks first (:attr:`IngestPipeline._leftover`).  A frame that yields
no tick (an empty list) counts as an event not carried.  Binance's frames are one tick each: the list case costs
them nothing (it is tested after the ``dict`` case).

Order books: given ``depth`` (an :class:`~ingestor.depth_books.DepthBooks`), the pipeline parses with the
venue's ``parse_frame_depth`` and hands each ``depthUpdate`` diff to it (never to the sequencer: a book's
continuity is its own procedure); the ``depth`` entries it returns are stored among the ticks, in order.  A
diff of a symbol no book is kept for is refused (``unknown_symbol``).  Without ``depth`` a ``depthUpdate`` is
an event not carried, as before.

The session (:mod:`ingestor.session`) owns the I/O around it: the socket, the repair task, the ingress
queue's ``offer``/``put`` (backpressure), and the latency samples.  ``market bench ingest`` feeds
frames through the session's :meth:`~ingestor.session.VenueSession.ingest`, which runs this.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.sequencing import Verdict
from consumer_sdk.core.tick import Tick
from ingestor.depth import DepthDiff
from ingestor.depth_books import DepthBooks, UnknownSymbol
from ingestor.sequencer import GapReport, Sequencer
from ingestor.venue import MalformedFrame, Reply, ServerShutdown, Venue

__all__ = [
    "CONNECTION_REFUSALS",
    "MAX_ID_JUMP",
    "SKIP_REASONS",
    "BadFrame",
    "Event",
    "GapFound",
    "IngestPipeline",
    "Ingested",
    "LoopError",
    "PipelineStats",
]

Ident = tuple[str, str, str]

#: an id this far ahead of its stream's last is refused (``id_jump``): 2^40, a million years of a busy
#: Binance symbol's trades (BTCUSDT made about 5e9 in its first seven years), yet far below int64
MAX_ID_JUMP: Final = 1 << 40

#: what the connection refuses before any frame reaches the pipeline (:mod:`ingestor.wsframes`,
#: :mod:`ingestor.session`): a message over the size limit, a binary message, pings beyond the rate
#: answered, a frame the protocol forbids, our pings left unanswered (the connection is dropped)
CONNECTION_REFUSALS: Final = ("too_large", "binary", "ping_flood", "protocol", "no_pong")

#: every reason a venue frame is skipped (``market_frames_skipped``): events not carried, what the Binance
#: parser refuses, what the pipeline refuses, what the connection refuses
SKIP_REASONS: Final = (
    "unsupported", "malformed", "invalid_utf8", "too_deep", "bad_number", "bad_value", "unsubscribed",
    "unknown_symbol", "id_jump", *CONNECTION_REFUSALS,
)


@dataclass(frozen=True, slots=True)
class GapFound:
    """``tick`` (accepted, not in ``ticks``) revealed the hole ``gap`` in its stream's ids: the caller
    starts a repair (the tick is then held) or stores a gap marker and then the tick."""

    gap: GapReport
    tick: Tick


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame refused (counted in :attr:`IngestPipeline.refused` under ``kind``; in ``malformed`` too when the
    venue's parser refused it): why, the frame, and the kind."""

    error: str
    raw: bytes | str
    kind: str = "malformed"


@dataclass(frozen=True, slots=True)
class LoopError:
    """An exception no frame should cause (a bug): the caller ends the connection and reconnects."""

    error: Exception


#: what processing stopped at
Event = GapFound | Reply | ServerShutdown | BadFrame | LoopError


@dataclass(frozen=True, slots=True)
class Ingested:
    """What :meth:`IngestPipeline.process` made of ``frames[start:resume]`` (see the module doc)."""

    ticks: list[Tick]
    held: list[Tick]
    event: Event | None
    resume: int


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """Counters since start: frames received, ticks accepted (stored or held), ticks rejected
    (duplicate or late), frames malformed, events not carried; when the last frame arrived (µs); frames
    refused by kind (a copy)."""

    frames: int
    ticks: int
    rejected: int
    malformed: int
    unsupported: int
    last_frame_us: int
    refused: Mapping[str, int] = field(default_factory=dict)


class IngestPipeline:
    """Frames -> ticks for one session (see the module doc).  One owner: the session's readers (on one
    event loop, never inside :meth:`process` at once).

    ``holding`` holds the ``(venue, symbol, channel)`` of the streams under repair now (the repairer's
    ``holds``; only read, and the same object for the pipeline's life); without it no tick is held.
    ``max_jump``: how far ahead of its stream's last id a tick's id may be (see the module doc).
    """

    __slots__ = ("_check", "_depth", "_holding", "_leftover", "_max_jump", "_parse", "_sequencer", "frames",
                 "last_frame_us", "malformed", "refused", "rejected", "ticks", "unsupported", "venue")

    def __init__(
        self, venue: Venue, sequencer: Sequencer, holding: Collection[Ident] | None = None, *,
        max_jump: int = MAX_ID_JUMP, depth: DepthBooks | None = None,
    ) -> None:
        self.venue = venue
        self._parse: Callable[
            [bytes | str, int], Tick | list[Tick] | Reply | ServerShutdown | DepthDiff | None
        ] = venue.parse_frame
        self._depth = depth
        if depth is not None:
            parse_depth = getattr(venue, "parse_frame_depth", None)
            if parse_depth is None:
                raise ConfigError(f"venue {venue.name}: order books (channel depth) are not carried")
            self._parse = parse_depth
        self._sequencer = sequencer
        self._check = sequencer.check
        self._holding: Collection[Ident] = holding if holding is not None else {}
        self._max_jump = max_jump
        self.frames = 0
        self.ticks = 0
        self.rejected = 0
        self.malformed = 0
        self.unsupported = 0
        self.last_frame_us = 0
        #: frames refused, by kind (see the module doc)
        self.refused: dict[str, int] = {}
        #: a frame of several ticks stopped at an event: its ticks, the next to take, the frame
        self._leftover: tuple[list[Tick], int, bytes | str] | None = None

    def stats(self) -> PipelineStats:
        return PipelineStats(
            frames=self.frames, ticks=self.ticks, rejected=self.rejected, malformed=self.malformed,
            unsupported=self.unsupported, last_frame_us=self.last_frame_us, refused=dict(self.refused),
        )

    def process(
        self, ts: int, frames: Sequence[bytes | str], start: int = 0,
        carried: Mapping[str, Collection[str]] | None = None,
    ) -> Ingested:
        """``frames[start:]``, received at ``ts`` (µs since the epoch, one socket read), up to and including
        the first frame that needs the caller (``event``); never raises.

        ``carried``: the channels subscribed, by symbol; a tick of another stream is refused (None: every
        stream is taken).  The frames are counted once, on the call with ``start == 0``.  Cost: per frame,
        one parse and one sequencer check (with ``carried``, two lookups more); per call, two lists and the result.
        """
        if not start:
            self.frames += len(frames)
            self.last_frame_us = ts
            self._leftover = None
        elif self._leftover is not None:
            # The rest of a frame of several ticks whose event the caller has just dealt with.
            entries, k, raw0 = self._leftover
            self._leftover = None
            ticks0: list[Tick] = []
            held0: list[Tick] = []
            event0, k = self._take_all(entries, k, raw0, carried, ticks0, held0)
            if event0 is not None:
                if k < len(entries):
                    self._leftover = (entries, k, raw0)
                return Ingested(ticks0, held0, event0, start)
            if ticks0 or held0:
                out = self.process(ts, frames, start, carried)
                return Ingested(ticks0 + out.ticks, held0 + out.held, out.event, out.resume)
        parse = self._parse
        check = self._check
        holding = self._holding
        # `holding` is empty almost always: then no tick needs its ident built
        hold_any = bool(holding)
        ok = Verdict.OK
        ticks: list[Tick] = []
        held: list[Tick] = []
        store = ticks.append
        event: Event | None = None
        accepted = rejected = unsupported = 0
        resume = len(frames)
        i = start
        try:
            # by index after an event: skipping `start` frames of an iterator would make a flood quadratic
            for i, raw in enumerate(frames) if not start else ((j, frames[j]) for j in range(start, len(frames))):
                try:
                    r = parse(raw, ts)
                except MalformedFrame as exc:
                    self.malformed += 1
                    event = self._refuse(exc.kind, str(exc), raw)
                    resume = i + 1
                    break
                if type(r) is dict:
                    if carried is not None:
                        channels = carried.get(r["symbol"])
                        if channels is None or r["channel"] not in channels:
                            event = self._refuse(
                                "unknown_symbol" if channels is None else "unsubscribed",
                                f"{r['symbol']} {r['channel']} is not subscribed", raw,
                            )
                            resume = i + 1
                            break
                    verdict = check(r)
                    if verdict is ok:
                        accepted += 1
                        if hold_any and (r["venue"], r["symbol"], r["channel"]) in holding:
                            held.append(r)
                        else:
                            store(r)
                    elif type(verdict) is GapReport:
                        if r["seq"] - verdict.first + 1 > self._max_jump:  # the id minus the stream's last
                            self._sequencer.retract(verdict)
                            event = self._refuse(
                                "id_jump", f"id {r['seq']} is {r['seq'] - verdict.first + 1} ahead of the last", raw
                            )
                            resume = i + 1
                            break
                        accepted += 1
                        if hold_any and (r["venue"], r["symbol"], r["channel"]) in holding:
                            held.append(r)  # a hole among held ticks: the repairer marks it when it releases them
                        else:
                            event = GapFound(verdict, r)
                            resume = i + 1
                            break
                    else:
                        rejected += 1
                elif type(r) is list:
                    # Several ticks in one frame (an OKX push of several entries): each as above, in order.
                    event, k = self._take_all(r, 0, raw, carried, ticks, held)
                    if event is not None:
                        if k < len(r):
                            self._leftover = (r, k, raw)
                        resume = i + 1
                        break
                    if not r:
                        unsupported += 1
                elif type(r) is DepthDiff:
                    depth = self._depth
                    if depth is None:
                        unsupported += 1
                        continue
                    if carried is not None:
                        channels = carried.get(r.symbol)
                        if channels is None or "depth" not in channels:
                            event = self._refuse(
                                "unknown_symbol" if channels is None else "unsubscribed",
                                f"{r.symbol} depth is not subscribed", raw,
                            )
                            resume = i + 1
                            break
                    try:
                        entries = depth.on_diff(r, ts)
                    except UnknownSymbol:
                        event = self._refuse("unknown_symbol", f"no book is kept for {r.symbol}", raw)
                        resume = i + 1
                        break
                    if entries:
                        accepted += len(entries)
                        ticks.extend(entries)
                elif r is None:
                    unsupported += 1
                elif isinstance(r, Reply | ServerShutdown):
                    event = r
                    resume = i + 1
                    break
        except Exception as exc:  # nothing the venue sends may escape: the caller ends the connection
            event = LoopError(exc)
            resume = i + 1
        finally:
            self.ticks += accepted
            self.rejected += rejected
            self.unsupported += unsupported
        return Ingested(ticks, held, event, resume)

    def _take_all(
        self, entries: list[Tick], k: int, raw: bytes | str, carried: Mapping[str, Collection[str]] | None,
        ticks: list[Tick], held: list[Tick],
    ) -> tuple[Event | None, int]:
        """``entries[k:]`` (the ticks of one frame), each checked as :meth:`process` checks a frame's tick, into
        ``ticks`` or ``held``; the event that stopped it and the index of the entry after it, or ``(None,
        len(entries))``.  Counts what it accepts and rejects itself."""
        check = self._check
        holding = self._holding
        hold_any = bool(holding)
        ok = Verdict.OK
        n = len(entries)
        while k < n:
            r = entries[k]
            k += 1
            if carried is not None:
                channels = carried.get(r["symbol"])
                if channels is None or r["channel"] not in channels:
                    # the entries of a frame are of one stream: the rest of it is refused with this one
                    return self._refuse(
                        "unknown_symbol" if channels is None else "unsubscribed",
                        f"{r['symbol']} {r['channel']} is not subscribed", raw,
                    ), n
            verdict = check(r)
            if verdict is ok:
                self.ticks += 1
                if hold_any and (r["venue"], r["symbol"], r["channel"]) in holding:
                    held.append(r)
                else:
                    ticks.append(r)
            elif type(verdict) is GapReport:
                if r["seq"] - verdict.first + 1 > self._max_jump:
                    self._sequencer.retract(verdict)
                    return self._refuse(
                        "id_jump", f"id {r['seq']} is {r['seq'] - verdict.first + 1} ahead of the last", raw
                    ), k
                self.ticks += 1
                if hold_any and (r["venue"], r["symbol"], r["channel"]) in holding:
                    held.append(r)
                else:
                    return GapFound(verdict, r), k
            else:
                self.rejected += 1
        return None, n

    def _refuse(self, kind: str, error: str, raw: bytes | str) -> BadFrame:
        refused = self.refused
        refused[kind] = refused.get(kind, 0) + 1
        return BadFrame(error, raw, kind)
