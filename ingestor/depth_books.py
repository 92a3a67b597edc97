"""Every symbol's order book kept in the ingestor, and the ``depth`` entries to store: pure, no I/O, no clock.

:class:`DepthBooks` holds, per configured symbol, one :class:`~ingestor.depth.DepthSync` (Binance's procedure;
OKX's: :class:`~ingestor.depth_ws.WsBookSync`, below)
and one :class:`~consumer_sdk.book.Book` (the live book, whatever the number of subscribers).  It is fed the
venue's diffs (:meth:`~DepthBooks.on_diff`, by the pipeline), the REST snapshot replies
(:meth:`~DepthBooks.on_snapshot`, :meth:`~DepthBooks.on_snapshot_failed`, by the fetcher) and reconnects
(:meth:`~DepthBooks.on_reconnect`, by the session), and returns the ticks to store, in the format of
:mod:`consumer_sdk.book_stream`:

- each applied diff whose ``u`` is above the last ``seq`` stored becomes a diff entry with ``seq = u``; one not
  above it is applied to the book and not stored;
- the first storable point after a book is loaded gets a snapshot entry *in place of* that diff (the book
  after it, ``seq`` its ``u``): ``start`` the first time, ``resync:<why>`` after a break (``gap``,
  ``reconnect``, ``crossed``, ``bad_level``, ...), never a diff applied over a break in silence;
- a ``periodic`` snapshot replaces a diff when :class:`~ingestor.depth.SnapshotPolicy` says one is due (each
  symbol at its own phase of the period, so the books do not all encode themselves at once).

After every diff it checks the book is not crossed (best bid at or above best ask): a crossed book is not the
venue's, so the symbol starts over (``resync:crossed``) and the diff that crossed it is not stored.  A diff the
book refuses (a value past its scale) starts the symbol over too (``bad_level``).  One symbol's resync touches
no other symbol.  Resyncs are counted by symbol and reason (:attr:`DepthBooks.resyncs`).

Entries that were made but not stored (an operator's pause, a degrade level, the ingress queue's drop policy:
:mod:`distributor.control.gate` drops the book's diffs after them until a snapshot) leave the live book in step:
:meth:`DepthBooks.on_store_break` resyncs the *stream* only, with a ``resync:<why>`` snapshot of the live book in
place of the next diff stored, no REST fetch.

:attr:`DepthBooks.wanted` names the symbols whose snapshot should be asked for now; ``on_want`` (given at
construction) is called when a symbol starts wanting one, so the I/O layer need not poll.

OKX (``rule=DepthRule.OKX``, :mod:`ingestor.depth_ws`): the snapshot is a message of the stream (a
:class:`~ingestor.depth.DepthDiff` with ``snapshot`` set, fed to :meth:`~DepthBooks.on_diff` like the updates), and
after each message whose ``checksum`` is not 0 the book's top 25 levels a side must give it
(:func:`~ingestor.depth_ws.okx_checksum`, over the strings the book keeps, the venue's own).  A break, a mismatch, a
crossed book or a refused level voids the book and calls ``on_resubscribe(symbol, reason)``: the I/O layer
unsubscribes the symbol's ``books`` stream and subscribes it again, and the snapshot that brings is stored as
``resync:<why>`` (a snapshot that comes unasked, as ``resync:snapshot``).  Stored diffs carry ``pu`` (OKX's
``prevSeqId``) and no ``first``.  A sequence reset (the venue's ids restarting lower, after maintenance) is followed
by the book, which stays the venue's; the stored stream, whose ``seq`` only rises, is counted a resync
(``seq_reset``) and resumes, with a ``resync:seq_reset`` snapshot, once the ids pass the last ``seq`` stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from consumer_sdk.book import Book, BookError, Level
from consumer_sdk.book_stream import Link, encode_diff, encode_snapshot
from consumer_sdk.core.tick import Tick
from ingestor.depth import Action, Decision, DepthDiff, DepthRule, DepthSnapshot, DepthSync, SnapshotPolicy
from ingestor.depth_ws import CHECKSUM_DEPTH, WsBookSync, new_sync, okx_checksum

__all__ = ["BOOK_RESYNC_REASONS", "BookView", "DepthBooks", "DepthStats", "SymbolDepth", "UnknownSymbol"]

#: every reason a symbol's book starts over, as counted: :data:`ingestor.depth.RESYNC_REASONS`, a diff or
#: snapshot the book refused, and entries the book was in step for but that were not stored
#: (:data:`distributor.control.gate.BOOK_BREAK_REASONS`: a pause, the ``essential`` level, an ingress drop)
BOOK_RESYNC_REASONS: Final = ("gap", "reconnect", "crossed", "stale_snapshot", "buffer_overflow", "snapshot_error",
                              "bad_level", "paused", "degraded", "dropped", "checksum", "seq_reset")


class BookView(Protocol):
    """What a subscriber may do with the ingestor's live book: read it (a :class:`~consumer_sdk.book.Book` seen
    through its reads only, so a type checker refuses a change; ``copy()`` gives a book of one's own)."""

    @property
    def update_id(self) -> int | None: ...

    @property
    def scale(self) -> int: ...

    def top(self, n: int) -> tuple[tuple[Level, ...], tuple[Level, ...]]: ...

    def best_bid(self) -> Level | None: ...

    def best_ask(self) -> Level | None: ...

    def spread(self) -> int | None: ...

    def crossed(self) -> bool: ...

    def depth(self) -> tuple[int, int]: ...

    def levels(self) -> tuple[tuple[Level, ...], tuple[Level, ...]]: ...

    def copy(self) -> Book: ...


class UnknownSymbol(KeyError):
    """A diff or snapshot of a symbol no book is kept for."""


@dataclass(frozen=True, slots=True)
class DepthStats:
    """The books at one instant: resyncs by ``(symbol, reason)``; entries stored (diffs, snapshots by the
    reason's kind: ``start``, ``resync``, ``periodic``); diffs applied but not stored (not above the last stored
    ``seq``); symbols in step now, of those kept; snapshot requests sent, and those that gave no usable book by
    kind (filled in by the fetcher's owner); the venue's checksums compared with the book's, by outcome (``equal``,
    ``mismatch``: OKX), and the symbols waiting for the snapshot a new subscription brings (OKX)."""

    resyncs: Mapping[tuple[str, str], int] = field(default_factory=dict)
    diffs_stored: int = 0
    snapshots_stored: Mapping[str, int] = field(default_factory=dict)
    not_stored: int = 0
    live: int = 0
    symbols: int = 0
    requests: int = 0
    failures: Mapping[str, int] = field(default_factory=dict)
    checksums: Mapping[str, int] = field(default_factory=dict)
    resubscribing: tuple[str, ...] = ()


class SymbolDepth:
    """One symbol's state (owned by :class:`DepthBooks`)."""

    __slots__ = ("book", "last_event_ms", "pending", "phase_ms", "since_snapshot", "snapshot_ms", "stored", "symbol",
                 "sync")

    def __init__(self, symbol: str, rule: DepthRule, max_buffer: int, phase_ms: int = 0) -> None:
        self.symbol = symbol
        #: where in each period this symbol's periodic snapshot falls (:meth:`SnapshotPolicy.phase_ms`)
        self.phase_ms = phase_ms
        self.sync: DepthSync | WsBookSync = new_sync(symbol, rule, max_buffer)
        self.book = Book()
        #: the last ``seq`` stored in (or found in) the symbol's stream; None: nothing yet
        self.stored: int | None = None
        #: the reason of the snapshot the next storable point gets; None: the stream is continuous
        self.pending: str | None = "start"
        #: diffs stored since the last snapshot entry, and that snapshot's venue time (ms)
        self.since_snapshot = 0
        self.snapshot_ms = 0
        self.last_event_ms = 0


class DepthBooks:
    """The books of ``symbols`` on ``venue`` (see the module doc).  One owner: the event loop's tasks, between
    awaits.  Cost per diff: the book's, plus one dict for the tick stored; a snapshot entry: O(levels)."""

    __slots__ = ("_not_stored", "_snapshots", "_symbols", "_ws", "checksums", "diffs_stored", "link", "on_resubscribe",
                 "on_resync", "on_want", "policy", "resyncs", "rule", "venue")

    def __init__(
        self, venue: str, symbols: Iterable[str], *, rule: DepthRule | str = DepthRule.SPOT,
        policy: SnapshotPolicy | None = None, max_buffer: int = 1000, on_want: Callable[[], None] | None = None,
        on_resync: Callable[[str, str, str], None] | None = None,
        on_resubscribe: Callable[[str, str], None] | None = None,
    ) -> None:
        rule = DepthRule(rule)
        self.venue = venue
        self.rule = rule
        self.policy = policy or SnapshotPolicy()
        #: the snapshot comes on the WebSocket (OKX): resyncs resubscribe, checksums are checked
        self._ws = rule is DepthRule.OKX
        #: how the stored diffs follow a snapshot (:mod:`consumer_sdk.book_stream`)
        self.link: Link = "next" if rule is DepthRule.SPOT else "prev"
        self._symbols = {s: SymbolDepth(s, rule, max_buffer, self.policy.phase_ms(s)) for s in symbols}
        self.on_want = on_want
        #: called with ``(symbol, reason, detail)`` at each resync (the I/O layer logs it)
        self.on_resync = on_resync
        #: called with ``(symbol, reason)`` when a symbol's book needs a fresh snapshot that only a new subscription
        #: brings (OKX): unsubscribe its book stream and subscribe it again
        self.on_resubscribe = on_resubscribe
        #: venue checksums compared with the book's, by outcome: ``equal``, ``mismatch``
        self.checksums = {"equal": 0, "mismatch": 0}
        self.resyncs: dict[tuple[str, str], int] = {}
        self.diffs_stored = 0
        self._snapshots: dict[str, int] = {}
        self._not_stored = 0

    # -- what readers see

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._symbols

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self._symbols)

    def book(self, symbol: str) -> BookView | None:
        """The live book of ``symbol`` (the one the ingestor keeps: read it, never change it), or None while it
        is not in step with the venue (before its first snapshot, or during a resync)."""
        st = self._symbols[symbol]
        return st.book if st.sync.synced else None

    def state(self, symbol: str) -> SymbolDepth:
        return self._symbols[symbol]

    def last_update_id(self, symbol: str) -> int | None:
        st = self._symbols.get(symbol)
        return None if st is None else st.sync.last_update_id

    @property
    def resubscribing(self) -> list[str]:
        """The symbols whose book waits for the snapshot a new subscription brings (OKX)."""
        return [s for s, st in self._symbols.items() if isinstance(st.sync, WsBookSync) and st.sync.wants_resubscribe]

    @property
    def wanted(self) -> list[str]:
        """The symbols whose snapshot should be asked for now (diffs held, no request outstanding)."""
        return [s for s, st in self._symbols.items() if st.sync.wants_snapshot]

    def seed(self, symbol: str, stored_seq: int) -> None:
        """The symbol's stream already holds ``stored_seq`` (found at start): nothing at or below it is stored."""
        st = self._symbols.get(symbol)
        if st is not None and (st.stored is None or stored_seq > st.stored):
            st.stored = stored_seq

    def stats(self) -> DepthStats:
        return DepthStats(
            dict(self.resyncs), self.diffs_stored, dict(self._snapshots), self._not_stored,
            sum(1 for st in self._symbols.values() if st.sync.synced), len(self._symbols),
            checksums=dict(self.checksums) if self._ws else {}, resubscribing=tuple(self.resubscribing),
        )

    # -- events

    def on_diff(self, diff: DepthDiff, ts_recv: int) -> list[Tick]:
        """One diff (received at ``ts_recv`` µs) -> the ticks to store, in order; :class:`UnknownSymbol` for a
        symbol not kept."""
        st = self._symbols.get(diff.symbol)
        if st is None:
            raise UnknownSymbol(diff.symbol)
        decision = st.sync.on_diff(diff)
        if diff.event_ms > st.last_event_ms:
            st.last_event_ms = diff.event_ms
        return self._act(st, decision, ts_recv)

    def request(self, symbol: str) -> int:
        """The fetcher is asking for ``symbol``'s snapshot now: the request's id."""
        return self._symbols[symbol].sync.request_snapshot()

    def on_snapshot(self, symbol: str, request_id: int, snapshot: DepthSnapshot, ts_recv: int) -> list[Tick]:
        """The reply to ``request_id`` -> the ticks to store."""
        st = self._symbols[symbol]
        return self._act(st, st.sync.on_snapshot(request_id, snapshot), ts_recv)

    def on_snapshot_failed(self, symbol: str, request_id: int, error: str) -> Decision:
        """Request ``request_id`` got no usable reply (counted ``snapshot_error``); another will be wanted."""
        st = self._symbols[symbol]
        decision = st.sync.on_snapshot_failed(request_id, error)
        self._act(st, decision, 0)
        return decision

    def on_reconnect(self, symbols: Iterable[str]) -> list[Decision]:
        """The connection carrying ``symbols`` was replaced: each starts over (``resync:reconnect``)."""
        out = []
        for symbol in symbols:
            st = self._symbols.get(symbol)
            if st is not None:
                decision = st.sync.on_reconnect()
                self._act(st, decision, 0)
                out.append(decision)
        return out

    def on_store_break(self, venue: str, symbol: str, why: str) -> None:
        """Entries of ``symbol``'s stream were not stored (``why``: ``paused``, ``degraded``, ``dropped``, ...): the
        next storable diff becomes a ``resync:<why>`` snapshot (counted like every resync).  The live book is in
        step, so nothing is fetched; a symbol already waiting for a snapshot entry keeps the reason it has.  A
        symbol not kept, or of another venue: nothing.  (The signature of
        :data:`distributor.control.gate.BookBreakHook`.)"""
        st = self._symbols.get(symbol) if venue == self.venue else None
        if st is not None:
            self._resync(st, why, "entries not stored")

    # -- the work

    def _resync(self, st: SymbolDepth, reason: str, detail: str = "") -> None:
        key = (st.symbol, reason)
        self.resyncs[key] = self.resyncs.get(key, 0) + 1
        if self.on_resync is not None:
            self.on_resync(st.symbol, reason, detail)
        if st.pending is None:
            st.pending = f"resync:{reason}"
        if st.sync.wants_snapshot and self.on_want is not None:
            self.on_want()

    def _act(self, st: SymbolDepth, decision: Decision, ts_recv: int) -> list[Tick]:
        action = decision.action
        if action is Action.APPLY or action is Action.LOAD:
            out: list[Tick] = []
            if action is Action.LOAD:
                snap = decision.snapshot
                assert snap is not None
                try:
                    st.book.apply_snapshot(snap.last_update_id, snap.bids, snap.asks)
                except BookError as exc:
                    self._restart(st, "bad_level", f"snapshot {snap.last_update_id}: {exc}")
                    return out
                if snap.event_ms is not None:
                    st.last_event_ms = snap.event_ms
                if self._ws and st.pending is None:
                    st.pending = "resync:snapshot"  # a snapshot unasked: the diffs before need not lead to it
                if not decision.diffs:
                    if st.book.crossed():
                        self._act(st, st.sync.on_crossed(), ts_recv)
                    elif self._ws and not self._checksum_ok(st, snap.checksum, f"snapshot {snap.last_update_id}"):
                        pass
                    elif st.pending is not None and (st.stored is None or snap.last_update_id > st.stored):
                        # No diff joins it yet: stored now, before the diff that will, at the venue time of the
                        # last diff seen (the snapshot holds it)
                        self._store_snapshot(st, st.pending, snap.last_update_id, st.last_event_ms, ts_recv, out)
                    return out
            for diff in decision.diffs:
                if not self._apply(st, diff, ts_recv, out):
                    break
            return out
        if action is Action.RESYNC or action is Action.RESUBSCRIBE:
            self._resync(st, decision.reason, decision.detail)
            if action is Action.RESUBSCRIBE and self.on_resubscribe is not None:
                self.on_resubscribe(st.symbol, decision.reason)
        elif action is Action.BUFFERED and st.sync.wants_snapshot and self.on_want is not None:
            self.on_want()
        return []

    def _store_snapshot(self, st: SymbolDepth, reason: str, seq: int, event_ms: int, ts_recv: int,
                        out: list[Tick]) -> None:
        out.append(encode_snapshot(
            st.book, reason, venue=self.venue, symbol=st.symbol, link=self.link, ts_event=event_ms * 1000,
            ts_recv=ts_recv,
        ))
        st.pending = None
        st.since_snapshot = 0
        st.snapshot_ms = event_ms
        st.stored = seq
        kind = reason.partition(":")[0]
        self._snapshots[kind] = self._snapshots.get(kind, 0) + 1

    def _restart(self, st: SymbolDepth, reason: str, detail: str) -> None:
        """Start ``st`` over for a reason :class:`DepthSync` does not see (the book refused a value): a new
        procedure, buffering from the next diff (OKX: a fresh snapshot asked for by resubscribing)."""
        if isinstance(st.sync, WsBookSync):
            self._act(st, st.sync.on_refused(detail), 0)
            return
        st.sync = DepthSync(st.symbol, st.sync.rule, max_buffer=st.sync.max_buffer)
        self._resync(st, reason, detail)

    def _checksum_ok(self, st: SymbolDepth, checksum: int, what: str) -> bool:
        """The venue's ``checksum`` (0: none) matches the book's top levels; a mismatch starts the symbol over."""
        if not checksum:
            return True
        bids, asks = st.book.top(CHECKSUM_DEPTH)
        ours = okx_checksum(bids, asks)
        if ours == checksum:
            self.checksums["equal"] += 1
            return True
        self.checksums["mismatch"] += 1
        sync = st.sync
        assert isinstance(sync, WsBookSync)
        self._act(st, sync.on_checksum_mismatch(f"{what}: venue {checksum}, book {ours}"), 0)
        return False

    def _apply(self, st: SymbolDepth, diff: DepthDiff, ts_recv: int, out: list[Tick]) -> bool:
        """Apply ``diff`` and append what to store; False when the symbol started over."""
        book = st.book
        reset = self._ws and WsBookSync.is_reset(diff)
        try:
            book.apply_diff(diff.bids, diff.asks, diff.last_id, reset=reset)
        except BookError as exc:
            self._restart(st, "bad_level", f"diff {diff.first_id}..{diff.last_id}: {exc}")
            return False
        if book.crossed():
            self._act(st, st.sync.on_crossed(), ts_recv)
            return False
        if self._ws and not self._checksum_ok(st, diff.checksum, f"seqId {diff.last_id}"):
            return False
        if reset:
            self._resync(st, "seq_reset", f"seqId {diff.last_id} after {diff.prev_id}")
        seq = diff.last_id
        if st.stored is not None and seq <= st.stored:
            self._not_stored += 1
            return True
        reason = st.pending
        if reason is None and self.policy.due(st.since_snapshot + 1, st.snapshot_ms, diff.event_ms, st.phase_ms):
            reason = "periodic"
        if reason is not None:
            self._store_snapshot(st, reason, seq, diff.event_ms, ts_recv, out)
            return True
        out.append(encode_diff(
            self.venue, st.symbol, seq=seq, first=None if self._ws else diff.first_id, pu=diff.prev_id,
            ts_event=diff.event_ms * 1000, ts_recv=ts_recv, bids=diff.bids, asks=diff.asks,
        ))
        st.since_snapshot += 1
        self.diffs_stored += 1
        st.stored = seq
        return True
