"""The stored form of an order book (channel ``depth``) and its rebuild: pure functions, no I/O.

One capped stream per venue and symbol, ``<prefix>:<venue>:<SYMBOL>:depth``, entry ID ``<ms>-<seq>`` as on every
channel.  Each entry's field ``d`` is a tick of schema version 1 (``v``, ``venue``, ``symbol``, ``channel`` =
``"depth"``, ``seq``, ``ts_event``, ``ts_recv``; times in µs) with these fields besides:

=========== ================================================== ================================================
field       ``kind: "diff"``                                   ``kind: "snapshot"``
=========== ================================================== ================================================
``seq``     the diff's last update id (Binance ``u``)          the update id the book is at
``first``   the diff's first update id (Binance ``U``), where  absent
            the venue sends one
``pu``      the previous diff's last update id, where the      absent
            venue sends one (Binance futures ``pu``, OKX
            ``prevSeqId``)
``reason``  absent                                             ``"start"``, ``"resync:<why>"`` (``why``: 1 to 40
                                                               of ``a-z 0-9 _ . -``, e.g. ``resync:gap``) or
                                                               ``"periodic"``
``link``    absent                                             how the diffs after it follow: ``"next"`` or
                                                               ``"prev"`` (below)
``bids``,   the levels the diff changes, ``[[price, size],     the whole book, each side best first
``asks``    ...]``, as the venue sent them; size ``"0"``
            deletes the level
=========== ================================================== ================================================

A diff of the spot capture in tests/fixtures: ``{"v":1,"venue":"binance","symbol":"NKNUSDT","channel":"depth",
"seq":499869757,"ts_event":1633998512668000,"ts_recv":1633998512663777,"kind":"diff","first":499869755,
"bids":[["0.35200000","1290.00000000"],["0.34730000","106.00000000"],["0.34690000","14009.00000000"]],"asks":[]}``
(277 bytes); the snapshot it follows, 609 bids and 1000 asks, is 48.6 KB, within the 64 KiB a consumer reads
of one entry (:data:`consumer_sdk.poison.MAX_ENTRY_BYTES`), which a deeper book of such strings would pass.

The rules a stream keeps, and :class:`Rebuilder` checks:

- ``seq`` strictly increases in entry order (a stream with one ``seq`` per entry ID cannot hold a diff and a
  snapshot at one ``seq``: a periodic snapshot is stored *in place of* the diff that brought the book to its
  ``seq``; both name the same book, so two writers that chose differently still agree).
- A snapshot replaces the whole book: a reader discards what it had, whatever the reason.  ``start``: written
  when a writer starts; ``resync:<why>``: written after the writer lost the thread of the diffs (a gap, a
  reconnect) and fetched the book again, so the diffs before it need not lead to it; ``periodic``: a recovery
  point, so a reader never applies more than one period of diffs.
- Continuity, by the ``link`` of the newest snapshot: ``"next"`` (Binance spot): the first diff after a
  snapshot at ``S`` has ``first <= S + 1``, every later one ``first == previous seq + 1``.  ``"prev"``
  (Binance futures, OKX): the first diff after a snapshot at ``S`` has ``pu == S`` or ``first <= S``, every
  later one ``pu == previous seq``.  A diff that does not follow is a break (:class:`BookBreak`): the book
  is lost until the next snapshot.
- A writer stores no diff whose ``seq`` is not above the stream's last.  It applies such a diff to its book
  before storing the snapshot it ends at: Binance futures' first diff may end at ``lastUpdateId`` itself, and
  the venue's rule applies it (in the COIN-M capture of tests/fixtures, 5 of 10 symbols start so, and at 2 of
  them that diff changes a level of the REST book).  A resync snapshot that is not newer than the last stored
  ``seq`` is brought forward with the diffs the writer holds before it is stored.
- A snapshot's ``ts_event`` is the venue's time of the book where it gives one (futures REST ``E``), else the
  event time of the diff it is stored with or before; the writer holds entry IDs' ms non-decreasing as on
  every channel.

To get the book at a ``seq`` or a time, a reader finds the newest snapshot at or before it (``XREVRANGE key
<end> - COUNT <n>``, newest first, until an entry of ``kind`` ``"snapshot"``; :func:`consumer_sdk.replay.
resolve_bound` turns ``seq:N`` into the end's entry ID), then reads :func:`read_span`'s range and feeds
:func:`decode`'s entries to :func:`rebuild`.  If trimming took every snapshot at or before the target,
:class:`HistoryTrimmed` says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Literal, NotRequired, TypeAlias

import orjson

from consumer_sdk.book import DEFAULT_SCALE, Book, BookError, Level
from consumer_sdk.core.errors import ConfigError, Fatal, InvalidTick, TrimmedError
from consumer_sdk.core.tick import SCHEMA_VERSION, Tick

__all__ = [
    "CHANNEL",
    "LINKS",
    "BookBreak",
    "BookEntry",
    "DepthDiff",
    "DepthSnapshot",
    "HistoryTrimmed",
    "InvalidBookEntry",
    "Link",
    "ReadSpan",
    "Rebuilder",
    "Verdict",
    "decode",
    "decode_all",
    "encode_diff",
    "encode_snapshot",
    "read_span",
    "rebuild",
]

CHANNEL: Final = "depth"
Link: TypeAlias = Literal["next", "prev"]
LINKS: Final[tuple[Link, ...]] = ("next", "prev")

#: the largest seq an entry ID holds
_MAX_SEQ: Final = 2**64 - 1
_INT64_MAX: Final = 2**63 - 1
_REASON: Final = re.compile(r"start|periodic|resync:[a-z0-9_.\-]{1,40}").fullmatch
_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}").fullmatch
#: a plain decimal, whatever the scale (the book checks the scale)
_DECIMAL: Final = re.compile(r"[0-9]{1,20}(?:\.[0-9]{0,80})?").fullmatch
_ENTRY_ID: Final = re.compile(r"([0-9]{1,20})-([0-9]{1,20})").fullmatch


class DepthDiff(Tick):
    """A diff entry's tick (see the module doc)."""

    kind: Literal["diff"]
    first: NotRequired[int]
    pu: NotRequired[int]
    bids: Sequence[Sequence[str]]
    asks: Sequence[Sequence[str]]


class DepthSnapshot(Tick):
    """A snapshot entry's tick (see the module doc)."""

    kind: Literal["snapshot"]
    reason: str
    link: Link
    bids: Sequence[Sequence[str]]
    asks: Sequence[Sequence[str]]


class InvalidBookEntry(InvalidTick):
    """An entry that is not a valid ``depth`` entry, or whose levels the book refuses."""


class BookBreak(Fatal):
    """An entry that does not follow the one before it; ``kind`` is ``"gap"`` (the book is lost until the next
    snapshot) or ``"disorder"`` (a ``seq`` not above the last one; the entry is ignored)."""

    def __init__(self, message: str, kind: Literal["gap", "disorder"], seq: int, after: int | None) -> None:
        super().__init__(message)
        self.kind = kind
        self.seq = seq
        self.after = after


class HistoryTrimmed(TrimmedError):
    """No snapshot at or before the wanted position is held: the book there cannot be rebuilt."""

    def __init__(self, wanted: str, oldest: BookEntry | None, key: str = CHANNEL) -> None:
        held = None if oldest is None else f"seq {oldest.seq} ({oldest.ms}-{oldest.seq})"
        super().__init__(key, f"{wanted} (no snapshot at or before it)", held)
        self.wanted = wanted
        self.oldest = oldest


# ---------------------------------------------------------------- encoding


def _check_int(name: str, value: object, limit: int = _INT64_MAX) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise ConfigError(f"{name}: expected an integer from 0 to {limit}, got {value!r:.40}")
    return value


def encode_diff(
    venue: str, symbol: str, *, seq: int, first: int | None, ts_event: int, ts_recv: int,
    bids: Sequence[Sequence[str]], asks: Sequence[Sequence[str]], pu: int | None = None,
) -> DepthDiff:
    """The tick of one applied diff (``seq`` its last update id); stored with ``encode_tick`` like any tick.

    The levels are kept as given (the venue's lists), not copied.  Cost: one dict."""
    if first is None and pu is None:
        raise ConfigError("a diff needs its first update id, the previous one (pu), or both")
    tick: DepthDiff = {
        "v": SCHEMA_VERSION, "venue": venue, "symbol": symbol, "channel": CHANNEL, "seq": seq,
        "ts_event": ts_event, "ts_recv": ts_recv, "kind": "diff",
    }  # type: ignore[typeddict-item]  # the levels follow the ids, so the stored JSON reads in that order
    if first is not None:
        tick["first"] = first
    if pu is not None:
        tick["pu"] = pu
    tick["bids"] = bids
    tick["asks"] = asks
    return tick


def encode_snapshot(
    book: Book, reason: str, *, venue: str, symbol: str, link: Link, ts_event: int, ts_recv: int
) -> DepthSnapshot:
    """The tick of a whole book at its update id (``seq``), each side best first.  ``reason``: ``start``,
    ``resync:<why>`` or ``periodic``; ``link``: how the diffs after it follow.  Cost: O(levels)."""
    if book.update_id is None:
        raise ConfigError("a book that has had no snapshot or diff has no update id to store it at")
    if type(reason) is not str or not _REASON(reason):
        raise ConfigError(f"reason: expected start, periodic or resync:<why>, got {reason!r:.60}")
    if link not in LINKS:
        raise ConfigError(f"link: expected one of {LINKS}, got {link!r:.40}")
    bids, asks = book.levels()
    return {
        "v": SCHEMA_VERSION, "venue": venue, "symbol": symbol, "channel": CHANNEL, "seq": book.update_id,
        "ts_event": ts_event, "ts_recv": ts_recv, "kind": "snapshot", "reason": reason, "link": link,
        "bids": bids, "asks": asks,
    }


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class BookEntry:
    """One decoded ``depth`` entry.  ``ms`` is the entry ID's millisecond when :func:`decode` was given the ID,
    else ``ts_event // 1000``.  Levels are tuples of the venue's strings."""

    kind: Literal["diff", "snapshot"]
    venue: str
    symbol: str
    seq: int
    ms: int
    ts_event: int
    ts_recv: int
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    first: int | None = None
    pu: int | None = None
    reason: str | None = None
    link: Link | None = None

    @property
    def is_snapshot(self) -> bool:
        return self.kind == "snapshot"


def _bad(message: str) -> InvalidBookEntry:
    return InvalidBookEntry(f"not a depth entry: {message}")


def _int_field(obj: Mapping[str, Any], name: str, limit: int = _INT64_MAX) -> int:
    value = obj.get(name)
    if type(value) is not int or not 0 <= value <= limit:
        raise _bad(f"{name!r}: expected an integer from 0 to {limit}, got {value!r:.40}")
    return value


def _optional_id(obj: Mapping[str, Any], name: str) -> int | None:
    """The update id in field ``name``; None when there is no such field (a field of null is refused)."""
    return _int_field(obj, name, _MAX_SEQ) if name in obj else None


def _levels(obj: Mapping[str, Any], name: str) -> tuple[Level, ...]:
    value = obj.get(name)
    if type(value) is not list:
        raise _bad(f"{name!r}: expected a list of [price, size] pairs, got {type(value).__name__}")
    out: list[Level] = []
    for i, level in enumerate(value):
        if type(level) is not list or len(level) != 2:
            raise _bad(f"{name}[{i}]: expected a [price, size] pair, got {level!r:.60}")
        price, size = level
        for what, text in (("price", price), ("size", size)):
            if type(text) is not str or not _DECIMAL(text):
                raise _bad(f"{name}[{i}] {what}: expected a plain decimal string, got {text!r:.40}")
        out.append((price, size))
    return tuple(out)


def decode(raw: bytes | str | Mapping[str, Any], entry_id: bytes | str | None = None) -> BookEntry:
    """Parse and check one entry's field ``d`` (bytes, text, or the object already parsed); ``entry_id``, when
    given, must carry the same ``seq``.  Anything that is not a valid ``depth`` entry raises
    :class:`InvalidBookEntry` saying which field is wrong; nothing half-read is returned.  Prices and sizes are
    checked to be plain decimals here and against the scale by the book.  Cost: O(levels)."""
    obj: Any = raw
    if isinstance(raw, bytes | str):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _bad(f"not JSON ({exc})") from None
    if not isinstance(obj, Mapping):
        raise _bad(f"expected a JSON object, got {type(obj).__name__}")
    if type(obj.get("v")) is not int or obj["v"] != SCHEMA_VERSION:
        raise _bad(f"unsupported schema version {obj.get('v')!r:.40}")
    if obj.get("channel") != CHANNEL:
        raise _bad(f"channel {obj.get('channel')!r:.40}, not {CHANNEL!r}")
    for name in ("venue", "symbol"):
        if type(obj.get(name)) is not str or not _NAME(obj[name]):
            raise _bad(f"{name!r}: expected 1 to 64 letters, digits, '_', '.' or '-', got {obj.get(name)!r:.40}")
    seq = _int_field(obj, "seq", _MAX_SEQ)
    ts_event = _int_field(obj, "ts_event")
    ts_recv = _int_field(obj, "ts_recv")
    ms = ts_event // 1000
    if entry_id is not None:
        text = entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else entry_id
        m = _ENTRY_ID(text)
        if m is None or int(m[2]) != seq:
            raise _bad(f"entry ID {text!r:.60} does not name seq {seq}")
        ms = int(m[1])
    kind = obj.get("kind")
    bids, asks = _levels(obj, "bids"), _levels(obj, "asks")
    if kind == "diff":
        first = _optional_id(obj, "first")
        pu = _optional_id(obj, "pu")
        if first is None and pu is None:
            raise _bad("a diff names neither its first update id ('first') nor the previous one ('pu')")
        if first is not None and first > seq:
            raise _bad(f"'first' {first} is above 'seq' {seq}")
        if pu is not None and (pu >= seq or (first is not None and pu >= first)):
            raise _bad(f"'pu' {pu} is not below 'first' and 'seq' ({first}, {seq})")
        return BookEntry("diff", obj["venue"], obj["symbol"], seq, ms, ts_event, ts_recv, bids, asks, first, pu)
    if kind == "snapshot":
        reason, link = obj.get("reason"), obj.get("link")
        if type(reason) is not str or not _REASON(reason):
            raise _bad(f"'reason': expected start, periodic or resync:<why>, got {reason!r:.60}")
        if link not in LINKS:
            raise _bad(f"'link': expected one of {LINKS}, got {link!r:.40}")
        for name in ("first", "pu"):
            if name in obj:
                raise _bad(f"a snapshot carries no {name!r}")
        return BookEntry(
            "snapshot", obj["venue"], obj["symbol"], seq, ms, ts_event, ts_recv, bids, asks, reason=reason, link=link
        )
    raise _bad(f"'kind': expected 'diff' or 'snapshot', got {kind!r:.40}")


# ---------------------------------------------------------------- rebuilding


class Verdict(Enum):
    """What :meth:`Rebuilder.feed` did with an entry."""

    #: a snapshot: the book was replaced
    RESET = "reset"
    #: a diff that follows: applied
    APPLIED = "applied"
    #: a diff with no book to apply it to (before the first snapshot, or after a break): skipped
    WAITING = "waiting"


class Rebuilder:
    """A book rebuilt from a stream's entries fed in stream order: each snapshot replaces it, each diff is
    checked to follow (the newest snapshot's ``link``) and applied.

    After a break (:class:`BookBreak` of kind ``gap``) or an entry the book refuses (:class:`InvalidBookEntry`)
    :attr:`book` is None until the next snapshot: a book is never half-applied or silently wrong.  An entry of
    another venue or symbol than the first one fed is refused.  One owner; cost per diff: the book's.
    """

    __slots__ = ("_after_snapshot", "_own", "applied", "book", "breaks", "last_seq", "link", "skipped", "snapshots",
                 "stream")

    def __init__(self, *, scale: int = DEFAULT_SCALE) -> None:
        #: the one book, reused by every snapshot (it keeps its cache of parsed prices)
        self._own = Book(scale)
        #: the rebuilt book (the rebuilder's own: ``copy()`` it to keep a state), None while there is none
        self.book: Book | None = None
        self.link: Link | None = None
        #: the seq of the last entry taken (applied, skipped or lost to a break)
        self.last_seq: int | None = None
        #: (venue, symbol) of the first entry fed
        self.stream: tuple[str, str] | None = None
        self._after_snapshot = False
        self.applied = 0
        self.snapshots = 0
        self.skipped = 0
        self.breaks = 0

    def _lose(self, exc: Exception) -> Exception:
        self.book = None
        self.breaks += 1
        return exc

    def feed(self, entry: BookEntry) -> Verdict:
        """Take the next entry; see the class doc for what raises."""
        where = (entry.venue, entry.symbol)
        if self.stream is None:
            self.stream = where
        elif where != self.stream:
            raise InvalidBookEntry(f"entry seq {entry.seq} is of {':'.join(where)}, not {':'.join(self.stream)}")
        last = self.last_seq
        if last is not None and entry.seq <= last:
            raise BookBreak(f"seq {entry.seq} is not above the last one, {last}", "disorder", entry.seq, last)
        self.last_seq = entry.seq
        if entry.kind == "snapshot":
            try:
                self._own.apply_snapshot(entry.seq, entry.bids, entry.asks)
            except BookError as exc:
                raise self._lose(InvalidBookEntry(f"snapshot seq {entry.seq}: {exc}")) from None
            self.book, self.link, self._after_snapshot = self._own, entry.link, True
            self.snapshots += 1
            return Verdict.RESET
        book = self.book
        if book is None:
            self.skipped += 1
            return Verdict.WAITING
        assert last is not None  # a book is only held after a snapshot
        why = self._does_not_follow(entry, last)
        if why:
            raise self._lose(BookBreak(f"diff seq {entry.seq} does not follow seq {last}: {why}", "gap", entry.seq,
                                       last))
        try:
            book.apply_diff(entry.bids, entry.asks, entry.seq)
        except BookError as exc:
            raise self._lose(InvalidBookEntry(f"diff seq {entry.seq}: {exc}")) from None
        self._after_snapshot = False
        self.applied += 1
        return Verdict.APPLIED

    def _does_not_follow(self, entry: BookEntry, last: int) -> str:
        """Why ``entry`` (a diff) does not follow ``last`` under the current link; empty when it does."""
        first, pu = entry.first, entry.pu
        if self.link == "next":
            if first is None:
                return "it has no 'first' in a stream whose diffs follow by 'first'"
            if self._after_snapshot:
                return "" if first <= last + 1 else f"first {first} is above {last + 1} after the snapshot"
            return "" if first == last + 1 else f"first {first} is not {last + 1}"
        if pu is None:
            return "it has no 'pu' in a stream whose diffs follow by 'pu'"
        if pu == last or (self._after_snapshot and first is not None and first <= last):
            return ""
        straddle = " and first is above it" if self._after_snapshot and first is not None else ""
        return f"pu {pu} is not {last}{straddle}"


def rebuild(
    entries: Sequence[BookEntry], *, seq: int | None = None, ms: int | None = None, scale: int = DEFAULT_SCALE,
    key: str = CHANNEL,
) -> Book:
    """The book at a position of a stream, from ``entries`` in stream order (a range read from the stream).

    The position is the last entry with ``seq`` at or below ``seq`` and ``ms`` at or below ``ms`` (the end
    when neither is given).  The newest snapshot at or before it is taken and the diffs after it applied, each
    checked to follow; entries before that snapshot are not read.  Raises :class:`HistoryTrimmed` when no
    snapshot is at or before the position (``key`` names the stream in its message), :class:`BookBreak` when a
    diff does not follow, :class:`InvalidBookEntry` when the book refuses one.  Cost: O(entries) to find the
    snapshot, then the book's cost per diff applied.
    """
    end = 0
    for entry in entries:
        if (seq is not None and entry.seq > seq) or (ms is not None and entry.ms > ms):
            break
        end += 1
    start = next((i for i in range(end - 1, -1, -1) if entries[i].kind == "snapshot"), None)
    if start is None:
        wanted = " and ".join(filter(None, (f"seq {seq}" if seq is not None else "",
                                            f"ms {ms}" if ms is not None else ""))) or "the end"
        raise HistoryTrimmed(wanted, entries[0] if entries else None, key)
    rebuilder = Rebuilder(scale=scale)
    for entry in entries[start:end]:
        rebuilder.feed(entry)
    assert rebuilder.book is not None  # a break or a refusal raised
    return rebuilder.book


def decode_all(items: Iterable[tuple[bytes | str, bytes | str | Mapping[str, Any]]]) -> list[BookEntry]:
    """``[(entry ID, d), ...]`` (an ``XRANGE`` reply's IDs and ``d`` fields) decoded, each checked against its ID."""
    return [decode(d, entry_id) for entry_id, d in items]


# ---------------------------------------------------------------- positions


@dataclass(frozen=True, slots=True)
class ReadSpan:
    """The ``XRANGE`` that rebuilds the book at a target from the newest snapshot at or before it.

    Read ``start`` to ``end`` (both inclusive, in pages), decode, and give :func:`rebuild` the entries with
    ``seq <= last_seq`` (all of them when it is None): a page past ``last_seq`` ends the read.
    """

    start: str
    end: str
    last_seq: int | None


def _id_parts(entry_id: bytes | str | tuple[int, int], what: str) -> tuple[int, int]:
    if isinstance(entry_id, tuple):
        ms, seq = entry_id
    else:
        text = entry_id.decode(errors="replace") if isinstance(entry_id, bytes) else entry_id
        m = _ENTRY_ID(text)
        if m is None:
            raise ConfigError(f"{what}: expected an entry ID <ms>-<seq>, got {text!r:.60}")
        ms, seq = int(m[1]), int(m[2])
    _check_int(f"{what} ms", ms, _MAX_SEQ)
    _check_int(f"{what} seq", seq, _MAX_SEQ)
    return ms, seq


def read_span(
    snapshot_id: bytes | str | tuple[int, int], *, seq: int | None = None, ms: int | None = None,
    end_id: bytes | str | tuple[int, int] | None = None,
) -> ReadSpan:
    """What to read to get the book at ``seq`` (a venue update id), at ``ms`` (epoch milliseconds, as entry IDs
    count them), or at the entry ``end_id`` (``resolve_bound("seq:N", end=True)`` gives it), given the entry ID of
    the newest snapshot at or before that target.  No target: the book now (to ``+``).

    A ``seq`` target alone cannot bound an ``XRANGE`` (IDs order by ms first): the span reads to ``+`` and stops
    past ``last_seq``.  Raises :class:`ConfigError` for more than one target or a snapshot after the target.
    """
    if sum(x is not None for x in (seq, ms, end_id)) > 1:
        raise ConfigError("give one target: seq, ms or end_id")
    snap_ms, snap_seq = _id_parts(snapshot_id, "snapshot_id")
    start = f"{snap_ms}-{snap_seq}"
    if end_id is not None:
        end_ms, end_seq = _id_parts(end_id, "end_id")
        if (end_ms, end_seq) < (snap_ms, snap_seq):
            raise ConfigError(f"the snapshot {start} is after the target entry {end_ms}-{end_seq}")
        return ReadSpan(start, f"{end_ms}-{end_seq}", end_seq)
    if seq is not None:
        if _check_int("seq", seq, _MAX_SEQ) < snap_seq:
            raise ConfigError(f"the snapshot {start} is after the target seq {seq}")
        return ReadSpan(start, "+", seq)
    if ms is not None:
        if _check_int("ms", ms, _MAX_SEQ) < snap_ms:
            raise ConfigError(f"the snapshot {start} is after the target ms {ms}")
        return ReadSpan(start, str(ms), None)
    return ReadSpan(start, "+", None)
