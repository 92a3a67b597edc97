"""Binance order books kept in step with the venue: which depth diffs to apply, when to fetch a snapshot, when to
start over.  Pure: no I/O, no clock, no asyncio; the caller owns the book, the sockets and the time.

Binance documents one procedure per market (spot; USD-M and COIN-M futures), followed here exactly:

- buffer the diffs of ``<symbol>@depth``; ask for the REST snapshot (``lastUpdateId``, ``L`` below) only once a
  diff is buffered, since a snapshot older than every buffered diff has nothing to join;
- spot: drop diffs with ``u <= L``; the first applied has ``U <= L + 1 <= u``; then each ``U == previous u + 1``;
- futures: drop diffs with ``u < L``; the first applied has ``U <= L <= u``; then each ``pu == previous u``.

:class:`DepthSync` is that procedure for one symbol, as a state machine fed the diffs (:meth:`~DepthSync.on_diff`),
the snapshot replies (:meth:`~DepthSync.on_snapshot`, :meth:`~DepthSync.on_snapshot_failed`) and two events only
the caller sees (:meth:`~DepthSync.on_reconnect`, :meth:`~DepthSync.on_crossed`).  Each call returns a
:class:`Decision`: hold the diff, drop it, apply these diffs in order, load this snapshot then apply these, or
start over (``resync``, with its reason: the caller marks the break in what it stores, it never re-applies in
silence).  :attr:`~DepthSync.wants_snapshot` and :meth:`~DepthSync.request_snapshot` tell the I/O layer when to
fetch.  Resyncs are counted by reason (:data:`RESYNC_REASONS`); one symbol's resync touches no other symbol.

The I/O layer around it, per symbol::

    decision = sync.on_diff(parse_depth_update(data))        # every diff, in the order received
    if sync.wants_snapshot and pacer.acquire(now, weight, symbol):
        request = sync.request_snapshot()                     # then GET the snapshot; when it answers:
    decision = sync.on_snapshot(request, parse_depth_snapshot(body, symbol))
    decision = sync.on_snapshot_failed(request, str(exc))     # or, when it fails (and pacer.on_failure)
    decision = sync.on_crossed()                              # the book crossed after a diff handed out

:class:`SnapshotPolicy` says when the stored stream is due a full snapshot entry.  The pacing of the snapshot
requests across symbols (the venue's REST weight budget, 429/418, backoff) is :mod:`ingestor.depth_pacer`.

OKX's procedure (:data:`DepthRule.OKX`: the snapshot is a WebSocket message, a resync resubscribes the stream,
:attr:`Action.RESUBSCRIBE`) shares these records and decisions and is :mod:`ingestor.depth_ws`.

:func:`parse_depth_update` and :func:`parse_depth_snapshot` read the venue's messages into frozen records,
refusing what a book may not hold with :class:`~ingestor.venue.MalformedFrame` and the kinds of
:data:`ingestor.binance.PARSE_REFUSALS`.  Prices and quantities stay the venue's decimal strings.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

from ingestor.fields import INT64_MAX as _INT64_MAX
from ingestor.fields import MS_MAX as _MS_MAX
from ingestor.fields import NON_NEGATIVE as _NON_NEGATIVE
from ingestor.fields import POSITIVE as _POSITIVE
from ingestor.fields import SIGNED as _SIGNED
from ingestor.fields import SYMBOL as _SYMBOL
from ingestor.venue import MalformedFrame

__all__ = [
    "RESYNC_REASONS",
    "Action",
    "Decision",
    "DepthDiff",
    "DepthRule",
    "DepthSnapshot",
    "DepthSync",
    "DepthSyncStats",
    "Level",
    "SnapshotPolicy",
    "SyncState",
    "parse_depth_snapshot",
    "parse_depth_update",
    "snapshot_phase_ms",
]

# ------------------------------------------------------------------------------------------------ records

#: one price level as the venue sent it: ``(price, quantity)``, decimal strings; quantity ``"0"`` removes it
Level = tuple[str, str]


@dataclass(frozen=True, slots=True)
class DepthDiff:
    """One ``depthUpdate`` event: the levels that changed between update ids ``first_id`` (``U``) and
    ``last_id`` (``u``), each with its quantity as of ``last_id``.  ``prev_id`` is futures' ``pu`` (the ``u``
    of the symbol's previous event), None on spot.  Times are the venue's, in milliseconds."""

    symbol: str
    first_id: int
    last_id: int
    prev_id: int | None
    event_ms: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    #: futures' transaction time ``T``; None on spot
    transaction_ms: int | None = None
    #: a venue whose snapshot comes on the WebSocket (OKX ``books``, ``action: snapshot``): this message is the whole
    #: book as of ``last_id``, not a change (``prev_id`` None); see :mod:`ingestor.depth_ws`
    snapshot: bool = False
    #: the venue's checksum of its book after this message (OKX: the signed crc32 of the top 25 levels a side); 0:
    #: none sent, nothing to check
    checksum: int = 0


@dataclass(frozen=True, slots=True)
class DepthSnapshot:
    """A REST depth reply: the book of ``symbol`` as of update id ``last_update_id``.  ``event_ms`` is futures'
    ``E`` (None on spot, whose reply carries no time)."""

    symbol: str
    last_update_id: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    event_ms: int | None = None
    #: the venue's checksum of this book (OKX, whose snapshot is a WebSocket message); 0: none
    checksum: int = 0


# ------------------------------------------------------------------------------------------------ parsing

# The bounds and patterns are the venue parsers' (ingestor.fields, imported above); the checks below name a
# depth field's problem in their own words.


def _int(value: Any, limit: int = _INT64_MAX) -> int:
    if type(value) is int and 0 <= value <= limit:
        return value
    if type(value) is int:
        kind = "bad_number" if value > limit else "bad_value"
    else:
        kind = "bad_number" if type(value) is float and not value < _INT64_MAX else "malformed"
    raise MalformedFrame(f"expected a non-negative integer up to {limit}, got {str(value)[:40]}", kind)


def _symbol(value: Any) -> str:
    if type(value) is str and _SYMBOL(value) is not None:
        return value
    raise MalformedFrame(f"expected a symbol, got {str(value)[:40]!r}")


def _decimal(value: Any, positive: bool) -> str:
    if type(value) is str and (_POSITIVE if positive else _NON_NEGATIVE)(value) is not None:
        return value
    what = "a positive" if positive else "a non-negative"
    if type(value) is not str:
        raise MalformedFrame(f"expected {what} decimal string, got {str(value)[:40]}")
    if _SIGNED(value) is not None:
        raise MalformedFrame(f"expected {what} decimal, got {value!r}", "bad_value")
    raise MalformedFrame(f"expected {what} plain decimal, got {value[:40]!r} ({len(value)} chars)", "bad_number")


def _levels(value: Any, side: str, removals: bool) -> tuple[Level, ...]:
    """A side's levels: a list of ``[price, quantity]`` pairs; quantity ``"0"`` only where ``removals``."""
    if type(value) is not list:
        raise MalformedFrame(f"{side}: expected a list of levels, got {str(value)[:40]}")
    out: list[Level] = []
    for level in value:
        if type(level) is not list or len(level) != 2:
            raise MalformedFrame(f"{side}: expected a [price, quantity] pair, got {str(level)[:40]}")
        out.append((_decimal(level[0], True), _decimal(level[1], not removals)))
    return tuple(out)


def parse_depth_update(data: Mapping[str, Any]) -> DepthDiff:
    """A ``depthUpdate`` event (the ``data`` of a combined-stream frame, decoded) -> a :class:`DepthDiff`.

    Refuses, with :class:`~ingestor.venue.MalformedFrame`: another event type, a missing or mistyped field
    (``malformed``), an id or time below zero, a price of zero or ``U`` after ``u`` (``bad_value``), a number
    past int64 or a decimal that is not plain (``bad_number``).  Quantities may be ``"0"`` (the level is gone).
    O(levels).
    """
    if not isinstance(data, Mapping):
        raise MalformedFrame(f"expected an event object, got {str(data)[:40]}")
    try:
        if data["e"] != "depthUpdate":
            raise MalformedFrame(f"not a depthUpdate event: {str(data['e'])[:40]!r}")
        first, last = _int(data["U"]), _int(data["u"])
        if first > last:
            raise MalformedFrame(f"first update id {first} after the last {last}", "bad_value")
        pu, t = data.get("pu"), data.get("T")
        return DepthDiff(
            symbol=_symbol(data["s"]), first_id=first, last_id=last, prev_id=None if pu is None else _int(pu),
            event_ms=_int(data["E"], _MS_MAX),
            bids=_levels(data["b"], "bids", True), asks=_levels(data["a"], "asks", True),
            transaction_ms=None if t is None else _int(t, _MS_MAX),
        )
    except KeyError as exc:
        raise MalformedFrame(f"missing field {exc}") from None


def parse_depth_snapshot(body: Mapping[str, Any], symbol: str) -> DepthSnapshot:
    """A REST depth reply (``/api/v3/depth``, ``/fapi/v1/depth``, ``/dapi/v1/depth``, decoded) for ``symbol``.

    Refuses as :func:`parse_depth_update` does, and a level of quantity zero (a book holds none), and a reply
    naming another symbol (futures replies carry ``symbol``; spot ones do not).  O(levels).
    """
    try:
        named = body.get("symbol")
        if named is not None and named != symbol:
            raise MalformedFrame(f"snapshot of {str(named)[:40]!r}, asked for {symbol!r}")
        e = body.get("E")
        return DepthSnapshot(
            symbol=symbol, last_update_id=_int(body["lastUpdateId"]),
            bids=_levels(body["bids"], "bids", False), asks=_levels(body["asks"], "asks", False),
            event_ms=None if e is None else _int(e, _MS_MAX),
        )
    except KeyError as exc:
        raise MalformedFrame(f"missing field {exc}") from None


# ------------------------------------------------------------------------------------------------ the procedure


class DepthRule(StrEnum):
    """Which procedure a symbol's stream follows: Binance's (a REST snapshot joined to the buffered diffs, this
    module's :class:`DepthSync`) or OKX's (the snapshot is the first message of the subscription,
    :class:`ingestor.depth_ws.WsBookSync`)."""

    SPOT = "spot"
    #: USD-M and COIN-M: ``pu`` chains the events
    FUTURES = "futures"
    #: OKX ``books``: the snapshot arrives on the WebSocket, ``prevSeqId`` chains the updates, a checksum proves
    #: the book; a fresh snapshot comes only by subscribing the stream again
    OKX = "okx"


class SyncState(StrEnum):
    """``buffering``: no book; diffs held until a snapshot joins them.  ``loaded``: the book is the snapshot,
    waiting for the diff that straddles it.  ``live``: the book is the snapshot plus every diff since."""

    BUFFERING = "buffering"
    LOADED = "loaded"
    LIVE = "live"


class Action(StrEnum):
    """What the caller does with a :class:`Decision`."""

    #: the diff is held until a snapshot arrives
    BUFFERED = "buffered"
    #: the diff is already in the book (older than the snapshot, or a repeat): nothing to do
    DROPPED = "dropped"
    #: apply ``diffs`` to the book, in order
    APPLY = "apply"
    #: replace the book with ``snapshot``, then apply ``diffs`` (possibly none) in order
    LOAD = "load"
    #: start over for ``reason``; when ``void_book`` the book held is no longer the venue's: mark the break
    RESYNC = "resync"
    #: a reply to a request that is not the one outstanding: nothing to do
    IGNORED = "ignored"
    #: as ``resync``, and the venue sends a fresh snapshot only to a new subscription: unsubscribe the symbol's
    #: book stream and subscribe it again (:data:`DepthRule.OKX`)
    RESUBSCRIBE = "resubscribe"


#: every reason a symbol starts over, as counted (:attr:`DepthSyncStats.resyncs`)
RESYNC_REASONS: Final = ("gap", "reconnect", "crossed", "stale_snapshot", "buffer_overflow", "snapshot_error")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after one event (see :class:`Action`).  ``reason`` names a resync (one of
    :data:`RESYNC_REASONS`) or a drop (``stale``, ``duplicate``); ``detail`` is free text for a log line."""

    action: Action
    diffs: tuple[DepthDiff, ...] = ()
    snapshot: DepthSnapshot | None = None
    reason: str = ""
    void_book: bool = False
    detail: str = ""


_BUFFERED: Final = Decision(Action.BUFFERED)
_STALE: Final = Decision(Action.DROPPED, reason="stale")
_DUPLICATE: Final = Decision(Action.DROPPED, reason="duplicate")
_IGNORED: Final = Decision(Action.IGNORED)


@dataclass(frozen=True, slots=True)
class DepthSyncStats:
    """One symbol's counters: diffs handed out to apply, dropped as already in the book, discarded from a full
    buffer; diffs held now; snapshots asked for, loaded, replies ignored; resyncs by reason."""

    symbol: str
    state: SyncState
    applied: int
    dropped: int
    overflowed: int
    buffered: int
    requests: int
    loads: int
    ignored: int
    resyncs: Mapping[str, int] = field(default_factory=dict)


class DepthSync:
    """Binance's book procedure for one symbol (see the module doc).  Owned by the one task that feeds it the
    symbol's diffs and snapshot replies; O(1) per diff, O(buffer) when a snapshot arrives.

    At most one snapshot request is outstanding.  A reply is judged by its ids, never by when it was asked:
    one asked before a resync is used when it joins the diffs held now, and counted ``stale_snapshot`` (another
    asked) when it does not.  The buffer holds at most ``max_buffer`` diffs, always a contiguous run: past the
    cap the oldest go (counted ``buffer_overflow`` once per request), a break inside it keeps only what follows
    the break (counted ``gap``).  Either way the outstanding request stays valid, so a burst cannot keep a
    symbol from ever syncing.
    """

    __slots__ = (
        "_applied", "_buffer", "_dropped", "_futures", "_ignored", "_last", "_loads", "_next_request",
        "_overflow_counted", "_overflowed", "_request", "_requests", "_resyncs", "_state", "max_buffer", "rule",
        "symbol",
    )

    def __init__(self, symbol: str, rule: DepthRule | str = DepthRule.SPOT, *, max_buffer: int = 1000) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, got {max_buffer}")
        self.symbol = symbol
        self.rule = DepthRule(rule)
        if self.rule is DepthRule.OKX:
            raise ValueError("DepthRule.OKX books are kept by ingestor.depth_ws.WsBookSync")
        self.max_buffer = max_buffer
        self._futures = self.rule is DepthRule.FUTURES
        self._state = SyncState.BUFFERING
        self._buffer: deque[DepthDiff] = deque()
        #: the update id the caller's book is at (loaded or live)
        self._last = 0
        self._request: int | None = None
        self._next_request = 1
        self._overflow_counted = False
        self._applied = self._dropped = self._overflowed = self._requests = self._loads = self._ignored = 0
        self._resyncs = dict.fromkeys(RESYNC_REASONS, 0)

    # -- what the caller reads

    @property
    def state(self) -> SyncState:
        return self._state

    @property
    def synced(self) -> bool:
        """The caller's book is the venue's as of :attr:`last_update_id` (a snapshot loaded, no break since)."""
        return self._state is not SyncState.BUFFERING

    @property
    def last_update_id(self) -> int | None:
        """The update id the caller's book is at; None while it holds none."""
        return None if self._state is SyncState.BUFFERING else self._last

    @property
    def wants_snapshot(self) -> bool:
        """A snapshot should be asked for now (the pacer permitting): diffs are held and none is outstanding."""
        return self._state is SyncState.BUFFERING and self._request is None and bool(self._buffer)

    @property
    def outstanding(self) -> int | None:
        """The id of the snapshot request awaiting its reply, if any."""
        return self._request

    def stats(self) -> DepthSyncStats:
        return DepthSyncStats(
            self.symbol, self._state, self._applied, self._dropped, self._overflowed, len(self._buffer),
            self._requests, self._loads, self._ignored, dict(self._resyncs),
        )

    # -- the rules

    def _follows(self, last: int, diff: DepthDiff) -> bool:
        """``diff`` is the one after the event that ended at ``last``."""
        return diff.prev_id == last if self._futures else diff.first_id == last + 1

    def _in_snapshot(self, snapshot_id: int, diff: DepthDiff) -> bool:
        """Everything ``diff`` changes is already in a snapshot at ``snapshot_id``: drop it."""
        return diff.last_id < snapshot_id if self._futures else diff.last_id <= snapshot_id

    def _joins(self, snapshot_id: int, diff: DepthDiff) -> bool:
        """``diff`` (not in the snapshot) is the first to apply on top of it."""
        return diff.first_id <= (snapshot_id if self._futures else snapshot_id + 1)

    # -- events

    def on_diff(self, diff: DepthDiff) -> Decision:
        """One diff of this symbol's stream, in the order received."""
        if diff.symbol != self.symbol:
            raise ValueError(f"a diff of {diff.symbol} fed to the book of {self.symbol}")
        state = self._state
        if state is SyncState.LIVE:
            if self._follows(self._last, diff):
                self._last = diff.last_id
                self._applied += 1
                return Decision(Action.APPLY, (diff,))
            if diff.last_id <= self._last:
                self._dropped += 1
                return _DUPLICATE
            return self._restart("gap", diff, f"after {self._last}: {diff.first_id}..{diff.last_id} pu={diff.prev_id}")
        if state is SyncState.LOADED:
            if self._in_snapshot(self._last, diff):
                self._dropped += 1
                return _STALE
            if self._joins(self._last, diff):
                self._state = SyncState.LIVE
                self._last = diff.last_id
                self._applied += 1
                return Decision(Action.APPLY, (diff,))
            return self._restart("gap", diff, f"snapshot {self._last}, next diff {diff.first_id}..{diff.last_id}")
        buffer = self._buffer
        if buffer:
            tail = buffer[-1].last_id
            if diff.last_id <= tail:
                self._dropped += 1
                return _DUPLICATE
            if not self._follows(tail, diff):
                buffer.clear()
                buffer.append(diff)
                self._resyncs["gap"] += 1
                return Decision(Action.RESYNC, reason="gap", detail=f"held up to {tail}, then {diff.first_id}")
            if len(buffer) >= self.max_buffer:
                buffer.popleft()
                buffer.append(diff)
                self._overflowed += 1
                if self._overflow_counted:
                    return _BUFFERED
                self._overflow_counted = True
                self._resyncs["buffer_overflow"] += 1
                return Decision(Action.RESYNC, reason="buffer_overflow", detail=f"{self.max_buffer} diffs held")
        buffer.append(diff)
        return _BUFFERED

    def request_snapshot(self) -> int:
        """The caller is sending the snapshot request now: its id, which the reply is given with."""
        if not self.wants_snapshot:
            raise RuntimeError(f"{self.symbol}: no snapshot wanted ({self._state}, outstanding {self._request})")
        self._request = request = self._next_request
        self._next_request += 1
        self._requests += 1
        self._overflow_counted = False
        return request

    def on_snapshot(self, request_id: int, snapshot: DepthSnapshot) -> Decision:
        """The reply to request ``request_id``: load it (and the held diffs that follow it), or ask again."""
        if snapshot.symbol != self.symbol:
            raise ValueError(f"a snapshot of {snapshot.symbol} given to the book of {self.symbol}")
        if request_id != self._request:
            self._ignored += 1
            return _IGNORED
        self._request = None
        snapshot_id = snapshot.last_update_id
        buffer = self._buffer
        if not buffer:
            # nothing received since the request was made (a reconnect in between): no way to tell it joins
            self._resyncs["stale_snapshot"] += 1
            return Decision(Action.RESYNC, reason="stale_snapshot", detail=f"snapshot {snapshot_id}, no diff held")
        while buffer and self._in_snapshot(snapshot_id, buffer[0]):
            buffer.popleft()
            self._dropped += 1
        if buffer and not self._joins(snapshot_id, buffer[0]):
            self._resyncs["stale_snapshot"] += 1
            detail = f"snapshot {snapshot_id}, first diff held {buffer[0].first_id}"
            return Decision(Action.RESYNC, reason="stale_snapshot", detail=detail)
        self._loads += 1
        if not buffer:
            self._state = SyncState.LOADED
            self._last = snapshot_id
            return Decision(Action.LOAD, snapshot=snapshot)
        diffs = tuple(buffer)
        buffer.clear()
        self._state = SyncState.LIVE
        self._last = diffs[-1].last_id
        self._applied += len(diffs)
        return Decision(Action.LOAD, diffs, snapshot)

    def on_snapshot_failed(self, request_id: int, error: str) -> Decision:
        """Request ``request_id`` got no usable reply: the held diffs stay, another snapshot is wanted."""
        if request_id != self._request:
            self._ignored += 1
            return _IGNORED
        self._request = None
        self._resyncs["snapshot_error"] += 1
        return Decision(Action.RESYNC, reason="snapshot_error", detail=error)

    def on_reconnect(self) -> Decision:
        """The connection carrying this symbol was replaced: what it sent before cannot be joined to what comes."""
        return self._restart("reconnect", None, "")

    def on_crossed(self) -> Decision:
        """The caller's book crossed (best bid at or above best ask) after applying what it was handed."""
        if self._state is SyncState.BUFFERING:
            raise RuntimeError(f"{self.symbol}: crossed reported while no book is held")
        return self._restart("crossed", None, f"at {self._last}")

    def _restart(self, reason: str, diff: DepthDiff | None, detail: str) -> Decision:
        """Back to buffering, holding ``diff`` (the first of the new run) when given."""
        void = self._state is not SyncState.BUFFERING
        self._state = SyncState.BUFFERING
        self._buffer.clear()
        if diff is not None:
            self._buffer.append(diff)
        self._overflow_counted = False
        self._resyncs[reason] += 1
        return Decision(Action.RESYNC, reason=reason, void_book=void, detail=detail)


# ------------------------------------------------------------------------------------------------ stored snapshots


@dataclass(frozen=True, slots=True)
class SnapshotPolicy:
    """When the stored stream is due a full snapshot entry besides the one at each load: after ``every_updates``
    diffs applied since the last, or when the venue's event time crosses a multiple of ``every_s`` seconds
    shifted by the symbol's phase (:func:`snapshot_phase_ms`: fixed per symbol, so two ingestors fed the same
    diffs choose the same one, and spread over the period, so a hundred books do not all encode their whole
    book in the same instant).  None disables either; both None: only at loads."""

    every_updates: int | None = None
    every_s: float | None = None

    def __post_init__(self) -> None:
        if self.every_updates is not None and self.every_updates < 1:
            raise ValueError(f"every_updates must be at least 1, got {self.every_updates}")
        if self.every_s is not None and not self.every_s >= 0.001:
            raise ValueError(f"every_s must be at least 0.001 (a millisecond), got {self.every_s}")

    def due(self, updates: int, last_ms: int, event_ms: int, phase_ms: int = 0) -> bool:
        """``updates`` diffs applied since the last snapshot entry, stored at venue time ``last_ms``; the diff
        just applied has venue time ``event_ms``; ``phase_ms`` shifts the period's boundaries (the symbol's
        :func:`snapshot_phase_ms`).  O(1)."""
        if self.every_updates is not None and updates >= self.every_updates:
            return True
        if self.every_s is None:
            return False
        period = round(self.every_s * 1000)
        return (event_ms + phase_ms) // period > (last_ms + phase_ms) // period

    def phase_ms(self, symbol: str) -> int:
        """:func:`snapshot_phase_ms` of ``symbol`` for this policy's period (0 without one)."""
        return 0 if self.every_s is None else snapshot_phase_ms(symbol, round(self.every_s * 1000))


def snapshot_phase_ms(symbol: str, period_ms: int) -> int:
    """Where in each period ``symbol``'s periodic snapshot falls: the CRC-32 of its name modulo the period, the same
    in every process and every run (not :func:`hash`, which is salted per process), and spread evenly enough that
    the books of one connection take their snapshots at different moments."""
    return zlib.crc32(symbol.encode()) % max(period_ms, 1)
