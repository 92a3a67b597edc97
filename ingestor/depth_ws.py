"""Order books whose snapshot arrives on the WebSocket (OKX ``books``): which message to apply, when to start over.
Pure: no I/O, no clock, no asyncio; the caller owns the book, the socket and the time.

OKX documents the procedure (v5 WebSocket, "Order book channel", "Sequence ID" and "Checksum"), followed here:

- the first ``books`` push after a subscribe is the whole book (``action: snapshot``, ``prevSeqId`` -1); the
  venue sends another only to a new subscription, so a book that lost the thread is rebuilt by unsubscribing and
  subscribing its stream again (:attr:`~ingestor.depth.Action.RESUBSCRIBE`), never over REST;
- an update follows the message before it when its ``prevSeqId`` is that message's ``seqId``;
- a quiet book gets a keep-alive update: ``seqId == prevSeqId``, no level; it changes nothing;
- while a connection is replaced (make-before-break) two connections deliver the same book: an update the book
  already holds (its ``seqId`` and ``prevSeqId`` both at or below the last, and ``prevSeqId`` below it) and a
  snapshot no newer than the live book (the new subscription's, or one left over) are dropped, so each message is
  taken once and the overlap costs no resync;
- after the venue's maintenance the ids may be reset: an update whose ``seqId`` is *below* its ``prevSeqId``,
  still naming the previous ``seqId`` as its ``prevSeqId``; it is applied, and the updates after it chain from
  the lower id ("subsequent messages follow the regular sequencing rule");
- ``checksum``: the signed crc32 of the top 25 bids and asks interleaved (:func:`okx_checksum`), checked against the
  book after each message when it is not 0 (OKX sends 0 since June 2026).  The check takes the book, which the
  caller holds: it reports a mismatch with :meth:`WsBookSync.on_checksum_mismatch`.

A message of a capture from before OKX sent sequence ids (``prev_id`` None) cannot show a gap by itself: it is
applied as following the one before, and its checksum is the proof (a mismatch starts the book over).

:class:`WsBookSync` is that procedure for one symbol, with the interface of :class:`ingestor.depth.DepthSync` that
:class:`ingestor.depth_books.DepthBooks` uses; :func:`new_sync` picks the class by :class:`~ingestor.depth.DepthRule`.
Each call returns a :class:`~ingestor.depth.Decision`: ``load`` a snapshot (``snapshot``, the message as a
:class:`~ingestor.depth.DepthSnapshot`), ``apply`` an update, ``dropped`` (no book yet, or a keep-alive),
``resubscribe`` (a break or a mismatch: the book is void, ask the venue for a fresh snapshot) or ``resync``
(after a reconnect: the new connection's subscription brings the snapshot).  Resyncs are counted by reason
(:data:`WS_RESYNC_REASONS`); one symbol's resync touches no other symbol.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Final

from ingestor.depth import Action, Decision, DepthDiff, DepthRule, DepthSnapshot, DepthSync, DepthSyncStats, SyncState

__all__ = ["CHECKSUM_DEPTH", "WS_RESYNC_REASONS", "WsBookSync", "new_sync", "okx_checksum"]

#: levels a side OKX's checksum covers
CHECKSUM_DEPTH: Final = 25
_INT32: Final = 1 << 31

#: every reason a symbol's book starts over, as counted (:attr:`DepthSyncStats.resyncs`): a break in the ids, a
#: replaced connection, a crossed book, a checksum that does not match, a level the book refused
WS_RESYNC_REASONS: Final = ("gap", "reconnect", "crossed", "checksum", "bad_level")


def okx_checksum(bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]]) -> int:
    """OKX's book checksum: the signed crc32 of the top 25 bids (best first) and asks, interleaved as
    ``bid_px:bid_sz:ask_px:ask_sz:...`` (where one side is shorter the other's levels go on alone), in the
    venue's own strings.  Pure; cost: one string of the 50 levels and one crc32."""
    parts: list[str] = []
    add = parts.extend
    nb, na = min(len(bids), CHECKSUM_DEPTH), min(len(asks), CHECKSUM_DEPTH)
    for i in range(max(nb, na)):
        if i < nb:
            add(bids[i][:2])
        if i < na:
            add(asks[i][:2])
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= _INT32 else crc


_NO_BOOK: Final = Decision(Action.DROPPED, reason="no_snapshot")
_KEEPALIVE: Final = Decision(Action.DROPPED, reason="keepalive")
_DUPLICATE: Final = Decision(Action.DROPPED, reason="duplicate")
_BEHIND: Final = Decision(Action.DROPPED, reason="snapshot_behind")
_IGNORED: Final = Decision(Action.IGNORED)


class WsBookSync:
    """OKX's book procedure for one symbol (see the module doc).  Owned by the one task that feeds it the symbol's
    messages; O(1) per message.

    States: ``buffering`` (no book: updates are dropped until a snapshot arrives; nothing is held, since the
    snapshot is a message of the stream itself) and ``live`` (the book is the last snapshot plus every update
    since).  :attr:`wants_resubscribe` is True from a ``resubscribe`` decision until a snapshot arrives or the
    connection is replaced.
    """

    __slots__ = ("_applied", "_dropped", "_last", "_loads", "_resets", "_resubscribe", "_resyncs", "_state",
                 "max_buffer", "rule", "symbol")

    def __init__(self, symbol: str, rule: DepthRule | str = DepthRule.OKX, *, max_buffer: int = 1000) -> None:
        self.symbol = symbol
        self.rule = DepthRule(rule)
        if self.rule is not DepthRule.OKX:
            raise ValueError(f"{self.rule} books are kept by ingestor.depth.DepthSync")
        #: unused (nothing is held); kept so the caller may treat both procedures alike
        self.max_buffer = max_buffer
        self._state = SyncState.BUFFERING
        self._last = 0
        self._resubscribe = False
        self._applied = self._dropped = self._loads = self._resets = 0
        self._resyncs = dict.fromkeys(WS_RESYNC_REASONS, 0)

    # -- what the caller reads

    @property
    def state(self) -> SyncState:
        return self._state

    @property
    def synced(self) -> bool:
        """The caller's book is the venue's as of :attr:`last_update_id`."""
        return self._state is SyncState.LIVE

    @property
    def last_update_id(self) -> int | None:
        return self._last if self._state is SyncState.LIVE else None

    @property
    def wants_snapshot(self) -> bool:
        """Always False: no snapshot is fetched over REST (see :attr:`wants_resubscribe`)."""
        return False

    @property
    def wants_resubscribe(self) -> bool:
        """A fresh snapshot is wanted: the stream should be subscribed again (asked once, by the ``resubscribe``
        decision; this says it is still awaited)."""
        return self._resubscribe

    @property
    def resets(self) -> int:
        """Sequence resets followed (an update whose ``seqId`` is below its ``prevSeqId``)."""
        return self._resets

    def stats(self) -> DepthSyncStats:
        return DepthSyncStats(self.symbol, self._state, self._applied, self._dropped, 0, 0, 0, self._loads, 0,
                              dict(self._resyncs))

    # -- the rule

    @staticmethod
    def is_keepalive(last: int, diff: DepthDiff) -> bool:
        """``diff`` is OKX's keep-alive for a book at ``last``: ``seqId == prevSeqId == last``, no level."""
        return diff.prev_id == last and diff.last_id == last and not diff.bids and not diff.asks

    @staticmethod
    def is_duplicate(last: int, diff: DepthDiff) -> bool:
        """``diff`` (an update) is one the book at ``last`` already holds: a second connection's copy of it during a
        rotation.  Its ``prevSeqId`` is below ``last`` and its ``seqId`` at or below it (a sequence reset names
        ``last`` itself as its ``prevSeqId``, so it is never one)."""
        prev = diff.prev_id
        return prev is not None and prev < last and diff.last_id <= last

    @staticmethod
    def follows(last: int, diff: DepthDiff) -> bool | None:
        """``diff`` (an update) follows the message that ended at ``last``: its ``prevSeqId`` names it (whether its
        ``seqId`` rose or, a sequence reset, fell).  None: it carries no ids, so only its checksum can tell."""
        if diff.prev_id is None:
            return None
        return diff.prev_id == last

    @staticmethod
    def is_reset(diff: DepthDiff) -> bool:
        """``diff`` restarts the venue's ids (maintenance): its ``seqId`` is below its ``prevSeqId``."""
        return diff.prev_id is not None and diff.last_id < diff.prev_id

    # -- events

    def on_diff(self, diff: DepthDiff) -> Decision:
        """One ``books`` message of this symbol (a snapshot or an update), in the order received."""
        if diff.symbol != self.symbol:
            raise ValueError(f"a message of {diff.symbol} fed to the book of {self.symbol}")
        if diff.snapshot:
            if self._state is SyncState.LIVE and diff.last_id <= self._last:
                self._dropped += 1  # the book is at or past it already (another connection's, during a rotation)
                return _BEHIND
            self._state = SyncState.LIVE
            self._last = diff.last_id
            self._resubscribe = False
            self._loads += 1
            snapshot = DepthSnapshot(diff.symbol, diff.last_id, diff.bids, diff.asks, diff.event_ms, diff.checksum)
            return Decision(Action.LOAD, snapshot=snapshot)
        if self._state is not SyncState.LIVE:
            self._dropped += 1
            return _NO_BOOK
        last = self._last
        if self.is_keepalive(last, diff):
            self._dropped += 1
            return _KEEPALIVE
        if self.is_duplicate(last, diff):
            self._dropped += 1
            return _DUPLICATE
        follows = self.follows(last, diff)
        if follows is False:
            return self._restart("gap", f"after {last}: seqId {diff.last_id} prevSeqId {diff.prev_id}")
        if follows is None:
            diff = dataclasses.replace(diff, prev_id=last)  # as following: the checksum is the proof
        reason = ""
        if self.is_reset(diff):
            self._resets += 1
            reason = "seq_reset"
        self._last = diff.last_id
        self._applied += 1
        return Decision(Action.APPLY, (diff,), reason=reason)

    def request_snapshot(self) -> int:
        """Never: no snapshot is fetched over REST (:attr:`wants_snapshot` is always False)."""
        raise RuntimeError(f"{self.symbol}: the snapshot of this book comes on the WebSocket, not over REST")

    def on_snapshot(self, request_id: int, snapshot: DepthSnapshot) -> Decision:
        """A REST reply: none was asked, so it is ignored."""
        return _IGNORED

    def on_snapshot_failed(self, request_id: int, error: str) -> Decision:
        """A failed REST request: none was asked, so it is ignored."""
        return _IGNORED

    def on_checksum_mismatch(self, detail: str = "") -> Decision:
        """The caller's book, after the message it was handed, does not give the message's checksum."""
        return self._restart_live("checksum", detail)

    def on_crossed(self) -> Decision:
        """The caller's book crossed (best bid at or above best ask) after the message it was handed."""
        return self._restart_live("crossed", f"at {self._last}")

    def on_refused(self, detail: str = "") -> Decision:
        """The caller's book refused a level of the message it was handed (``bad_level``)."""
        return self._restart("bad_level", detail)

    def on_reconnect(self) -> Decision:
        """The connection carrying this symbol was replaced: the new one's subscription brings a snapshot, so
        nothing is asked (``resync``, not ``resubscribe``)."""
        void = self._state is SyncState.LIVE
        self._state = SyncState.BUFFERING
        self._resubscribe = False
        self._resyncs["reconnect"] += 1
        return Decision(Action.RESYNC, reason="reconnect", void_book=void)

    def _restart_live(self, reason: str, detail: str) -> Decision:
        if self._state is not SyncState.LIVE:
            raise RuntimeError(f"{self.symbol}: {reason} reported while no book is held")
        return self._restart(reason, detail)

    def _restart(self, reason: str, detail: str) -> Decision:
        """The book is void; a fresh snapshot is wanted, asked by subscribing the stream again."""
        void = self._state is SyncState.LIVE
        self._state = SyncState.BUFFERING
        self._resubscribe = True
        self._resyncs[reason] += 1
        return Decision(Action.RESUBSCRIBE, reason=reason, void_book=void, detail=detail)


def new_sync(symbol: str, rule: DepthRule | str, max_buffer: int) -> DepthSync | WsBookSync:
    """The procedure keeping ``symbol``'s book by ``rule``."""
    rule = DepthRule(rule)
    if rule is DepthRule.OKX:
        return WsBookSync(symbol, rule, max_buffer=max_buffer)
    return DepthSync(symbol, rule, max_buffer=max_buffer)

