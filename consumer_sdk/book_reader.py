"""Order books read from their ``depth`` streams: the book at a past position, and live books as entries arrive.

The stored form is :mod:`consumer_sdk.book_stream`'s (read its module doc); this module adds the reads.

- :func:`book_at`: the book as it was at ``seq:N``, an entry ID, a time (epoch ms or ISO-8601) or ``+`` (now):
  the newest snapshot at or before the target (found by walking the stream back from the target with
  ``XREVRANGE``), then every entry after it up to the target (``XRANGE``, in pages), each checked to follow.
  :class:`~consumer_sdk.book_stream.HistoryTrimmed` when trimming removed every snapshot at or before the
  target (or the snapshot went while being read), :class:`NoBook` when the stream never held a book there (no
  such stream, or a target before its first snapshot with nothing trimmed),
  :class:`~consumer_sdk.book_stream.BookBreak` when a stored diff does not follow.
- :func:`follow_books`: a :class:`BookUpdate` per key at start (its newest snapshot and the diffs after it), then
  one per entry as it arrives (``XREAD BLOCK`` over all the keys, on a client whose socket timeout outlasts the
  block).  A diff that does not follow loses the book until the next snapshot, and the update says so (event
  ``break``, then ``waiting``); any snapshot replaces the book (``snapshot``, its reason in ``detail``).  A lost
  connection is retried with capped, jittered backoff from where it stopped.  When the reader is idle or has
  reconnected it checks that every stream is still the one it followed: a stream deleted, or gone back below the
  reader's position (Redis restarted without the data), gives a ``reset`` update and is started again (``start``).
- :class:`LiveBook` is the pure part of the live reader: one key's book fed entry by entry (no I/O).

Entry size: a depth snapshot is a whole book (48.6 KB for the spot capture's 1,609 levels), so depth entries are
read with their own limit, :data:`MAX_DEPTH_ENTRY_BYTES` (2 MiB: 5,000 levels a side of 200-byte levels), not the
64 KiB a tick reader takes (:data:`consumer_sdk.poison.MAX_ENTRY_BYTES`).  A longer field ``d`` is refused unparsed
(:class:`~consumer_sdk.book_stream.InvalidBookEntry`: in a live reader, the book is lost until the next snapshot).
The limit bounds parsing, not the transfer: Redis sends the entry whole.

Memory: :func:`book_at` holds one page of entries and one book; :func:`follow_books` one book per key and one
``XREAD`` reply (``count`` entries per key at most, each at most ``max_entry_bytes``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import redis.exceptions as rexc
from redis.asyncio import Redis

from consumer_sdk.book import DEFAULT_SCALE, Book
from consumer_sdk.book_stream import (
    CHANNEL,
    BookBreak,
    BookEntry,
    HistoryTrimmed,
    InvalidBookEntry,
    Rebuilder,
    Verdict,
    decode,
)
from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.backoff import backoff_delays
from consumer_sdk.core.errors import ConfigError, Fatal
from consumer_sdk.core.keys import check_prefix, parse_key
from consumer_sdk.core.log import Throttle, get_logger
from consumer_sdk.core.redis import (
    ErrorKind,
    blocking_client,
    classify,
    field_value,
    id_str,
    id_tuple,
    iter_read_reply,
    stream_view,
    translate,
    xinfo_stream,
)
from consumer_sdk.replay import Bound, parse_bound, resolve_bound

__all__ = [
    "MAX_DEPTH_ENTRY_BYTES",
    "BookAt",
    "BookEvent",
    "BookUpdate",
    "LiveBook",
    "NoBook",
    "book_at",
    "check_depth_key",
    "entry_of",
    "follow_books",
]

log = get_logger("book_reader")

#: the longest field ``d`` a depth reader parses: 2 MiB (a snapshot of 5,000 levels a side, 200 bytes a level)
MAX_DEPTH_ENTRY_BYTES: Final = 2 * 1024 * 1024
#: the ``XREVRANGE`` page sizes of the walk back to a snapshot: small first, as one is usually near
_WALK_PAGES: Final = (16, 128, 1000)
#: a prefilter of the walk back: a snapshot written by ``encode_tick`` holds these bytes (a diff that does is decoded)
_SNAPSHOT_MARK: Final = b'"snapshot"'

BookEvent: TypeAlias = Literal["start", "snapshot", "diff", "waiting", "break", "ignored", "reset"]


class NoBook(Fatal):
    """The stream holds no book at the position asked, and nothing was trimmed: there is no such stream, it is
    empty, or the position is before its first snapshot."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: no book {why}")
        self.key = key


def check_depth_key(key: str) -> str:
    """``key`` is ``<prefix>:<venue>:<SYMBOL>:depth`` with a valid prefix; its prefix, else :class:`ConfigError`."""
    prefix = key.split(":", 1)[0]
    try:
        check_prefix(prefix)
    except ConfigError:
        raise ConfigError(f"not a stream key of the form <prefix>:<venue>:<SYMBOL>:{CHANNEL}: {key!r}") from None
    name = parse_key(key, prefix=prefix)
    if name.channel != CHANNEL:
        raise ConfigError(f"not an order-book stream (channel {CHANNEL!r}): {key!r} is of channel {name.channel!r}")
    return prefix


def entry_of(entry_id: bytes | str, raw: bytes | str | None, max_bytes: int = MAX_DEPTH_ENTRY_BYTES) -> BookEntry:
    """One stream entry's field ``d`` (``raw``; None when it has none) decoded and checked against its ID; a
    field longer than ``max_bytes`` is refused unparsed.  Raises :class:`InvalidBookEntry` naming the entry."""
    sid = id_str(entry_id)
    if raw is None:
        raise InvalidBookEntry(f"entry {sid}: no field 'd'")
    if len(raw) > max_bytes:
        raise InvalidBookEntry(f"entry {sid}: too large: {len(raw)} bytes (a depth entry is at most {max_bytes})")
    try:
        return decode(raw, sid)
    except InvalidBookEntry as exc:
        raise InvalidBookEntry(f"entry {sid}: {exc}") from None


def _raw(fields: Any) -> Any:
    """The field ``d`` of an entry as redis-py returned it (bytes keys, or str when decoding), None if absent."""
    raw = field_value(fields, b"d")
    return field_value(fields, "d") if raw is None else raw


# ---------------------------------------------------------------- the book at a position


@dataclass(frozen=True, slots=True)
class BookAt:
    """The book at a position: :attr:`book` is the caller's own; the position is the last entry applied
    (:attr:`entry_id`, its ``seq`` and ``ts_event`` in µs); :attr:`snapshot_id` is where the rebuild started and
    :attr:`diffs` how many diffs were applied after it."""

    key: str
    book: Book
    entry_id: str
    seq: int
    ts_event: int
    snapshot_id: str
    diffs: int


async def _newest_snapshot(
    client: Redis, key: str, end: str, max_bytes: int
) -> tuple[str | None, BookEntry | None]:
    """Walk ``key`` back from ``end`` (inclusive): ``(the entry ID of the newest snapshot at or before it,
    None)``, or, when there is none, ``(None, the oldest entry held if it decodes)``.  Entries that do not decode
    are passed over (they are not snapshots).  Memory: one page."""
    upper = end
    pages = 0
    while True:
        count = _WALK_PAGES[min(pages, len(_WALK_PAGES) - 1)]
        pages += 1
        rows: Any = await client.xrevrange(key, upper, "-", count=count)
        for eid, fields in rows:
            raw = _raw(fields)
            if raw is None or len(raw) > max_bytes:
                continue
            if _SNAPSHOT_MARK not in (raw if isinstance(raw, bytes) else raw.encode()):
                continue  # a diff: passed over without a parse
            try:
                entry = decode(raw, id_str(eid))
            except InvalidBookEntry:
                continue
            if entry.is_snapshot:
                return id_str(eid), None
        if len(rows) < count:
            if not rows:
                return None, None
            try:
                return None, entry_of(rows[-1][0], _raw(rows[-1][1]), max_bytes)
            except InvalidBookEntry:
                return None, None
        upper = "(" + id_str(rows[-1][0])


async def _nothing_before(client: Redis, key: str, wanted: str, oldest: BookEntry | None) -> Exception:
    """Why no snapshot is held at or before ``wanted``: trimmed, or there never was a book there."""
    info = await xinfo_stream(client, key)
    if info is None:
        return NoBook(key, "(no such stream)")
    view = stream_view(info)
    if view.deleted is not False:
        return HistoryTrimmed(wanted, oldest, key)
    if view.length == 0:
        return NoBook(key, "(the stream is empty)")
    return NoBook(key, f"at {wanted} (no snapshot at or before it; nothing was trimmed)")


async def book_at(
    redis: Redis, key: str, at: Bound | str = "+", *, scale: int = DEFAULT_SCALE, page: int = 1000,
    max_entry_bytes: int = MAX_DEPTH_ENTRY_BYTES,
) -> BookAt:
    """The book of ``key`` (a ``depth`` stream) as it was at ``at``: ``seq:N`` (the last entry with seq <= N), an
    entry ID ``<ms>-<seq>``, a time (epoch ms or ISO-8601: the last entry of that millisecond or before) or ``+``
    (the newest entry); see the module doc for what raises.  Cost: the walk back to the snapshot (a diff is passed
    over unparsed), then a parse of each entry from the snapshot on and the book's cost per diff."""
    check_depth_key(key)
    bound = parse_bound(at, end=True) if isinstance(at, str) else at
    if page < 1:
        raise ConfigError(f"page must be >= 1, not {page}")
    wanted = "the end" if bound.kind == "open" else bound.text
    try:
        end = await resolve_bound(redis, key, bound)
        snapshot_id, oldest = await _newest_snapshot(redis, key, end, max_entry_bytes)
        if snapshot_id is None:
            raise await _nothing_before(redis, key, wanted, oldest)
        return await _rebuild_from(redis, key, snapshot_id, end, wanted, scale, page, max_entry_bytes)
    except rexc.RedisError as exc:
        raise translate(exc, f"reading the book of {key}") from exc


async def _rebuild_from(
    client: Redis, key: str, snapshot_id: str, end: str, wanted: str, scale: int, page: int, max_bytes: int
) -> BookAt:
    rebuilder = Rebuilder(scale=scale)
    lower = snapshot_id
    last: tuple[str, BookEntry] | None = None
    while True:
        rows: Any = await client.xrange(key, lower, end, count=page)
        if last is None and (not rows or id_str(rows[0][0]) != snapshot_id):
            # the snapshot was trimmed between the walk back and this read
            raise HistoryTrimmed(wanted, None, key)
        for eid, fields in rows:
            entry = entry_of(eid, _raw(fields), max_bytes)
            try:
                rebuilder.feed(entry)
            except BookBreak as exc:
                view = stream_view(await xinfo_stream(client, key))
                if last is not None and view.first_held is not None and view.first_held > id_tuple(last[0]):
                    raise HistoryTrimmed(wanted, None, key) from exc  # trimmed while being read
                raise
            last = (id_str(eid), entry)
        if len(rows) < page:
            break
        lower = "(" + id_str(rows[-1][0])
    assert last is not None and rebuilder.book is not None  # the snapshot was read; a break raised
    entry_id, entry = last
    return BookAt(key, rebuilder.book, entry_id, entry.seq, entry.ts_event, snapshot_id, rebuilder.applied)


# ---------------------------------------------------------------- live books


@dataclass(frozen=True, slots=True)
class BookUpdate:
    """What one entry (or a start or reset) did to one key's book.

    ``event``: ``start`` (the book at the newest entry when the reader started or restarted the key; None when
    no snapshot is held), ``snapshot`` (the book was replaced; ``detail`` is the snapshot's reason), ``diff``
    (applied), ``waiting`` (no book: a diff skipped until the next snapshot), ``break`` (the book was lost at this
    entry: a diff that does not follow, or an entry that cannot be read; ``detail`` says why; no book until the
    next snapshot), ``ignored`` (an entry left out, the book kept: a seq not above the last one, another
    symbol's entry), ``reset`` (the stream was deleted or went back; a ``start`` follows).

    ``book`` is the reader's live book: it changes with the next update of the key; ``copy()`` it to keep it.
    ``seq`` and ``ts_event`` (µs) are the book's position (the last entry applied), None without a book.
    """

    key: str
    event: BookEvent
    book: Book | None
    entry_id: str | None
    seq: int | None
    ts_event: int | None
    detail: str = ""


class LiveBook:
    """One key's book fed entry by entry (pure: no I/O): a :class:`Rebuilder` that turns every entry, readable
    or not, into a :class:`BookUpdate`.  An entry that cannot be read loses the book until the next snapshot
    (it may have been a diff)."""

    __slots__ = ("_entry", "_max_bytes", "_rebuilder", "_scale", "entry_id", "key")

    def __init__(self, key: str, *, scale: int = DEFAULT_SCALE, max_entry_bytes: int = MAX_DEPTH_ENTRY_BYTES) -> None:
        self.key = key
        self._scale = scale
        self._max_bytes = max_entry_bytes
        self._rebuilder = Rebuilder(scale=scale)
        #: the last entry applied to the book (its position), None without a book
        self._entry: BookEntry | None = None
        #: the ID of the last entry taken, whatever it did
        self.entry_id: str | None = None

    @property
    def book(self) -> Book | None:
        """The live book, None while there is none."""
        return self._rebuilder.book

    def restart(self) -> None:
        """Forget the book and the position: wait for a snapshot, as a new reader would."""
        self._rebuilder = Rebuilder(scale=self._scale)
        self._entry = None
        self.entry_id = None

    def update(self, event: BookEvent, detail: str = "") -> BookUpdate:
        """The key's state now, as an update of ``event``."""
        book, entry = self._rebuilder.book, self._entry
        if book is None or entry is None:
            return BookUpdate(self.key, event, None, self.entry_id, None, None, detail)
        return BookUpdate(self.key, event, book, self.entry_id, book.update_id, entry.ts_event, detail)

    def take(self, entry_id: bytes | str, raw: bytes | str | None) -> BookUpdate:
        """Feed one entry (its ID and field ``d``); what it did.  Cost: a parse and the book's cost per diff."""
        sid = id_str(entry_id)
        self.entry_id = sid
        held = self._rebuilder.book is not None
        try:
            entry = entry_of(sid, raw, self._max_bytes)
        except InvalidBookEntry as exc:
            self.restart()
            self.entry_id = sid
            return self.update("break" if held else "waiting", f"{exc}; waiting for the next snapshot")
        try:
            verdict = self._rebuilder.feed(entry)
        except BookBreak as exc:
            if exc.kind == "disorder":
                return self.update("ignored", f"entry {sid}: {exc}")
            self._entry = None
            return self.update("break", f"entry {sid}: {exc}; waiting for the next snapshot")
        except InvalidBookEntry as exc:
            if self._rebuilder.book is None:
                self._entry = None
                return self.update("break" if held else "waiting", f"entry {sid}: {exc}; waiting for the next "
                                                                   "snapshot")
            return self.update("ignored", f"entry {sid}: {exc}")
        if verdict is Verdict.WAITING:
            return self.update("waiting", "waiting for the next snapshot")
        self._entry = entry
        if verdict is Verdict.RESET:
            return self.update("snapshot", entry.reason or "")
        return self.update("diff")


async def _start_key(client: Redis, live: LiveBook, page: int, max_bytes: int) -> tuple[str, BookUpdate]:
    """Bring ``live`` to the newest entry of its stream (its newest snapshot and the entries after it): the
    ``XREAD`` cursor to follow from, and the ``start`` update."""
    key = live.key
    live.restart()
    newest: Any = await client.xrevrange(key, "+", "-", count=1)
    if not newest:
        info = await xinfo_stream(client, key)
        cursor = "0-0" if info is None else id_str(info["last-generated-id"])
        why = "no such stream yet" if info is None else "the stream is empty"
        return cursor, live.update("start", f"{why}: waiting for a snapshot")
    end = id_str(newest[0][0])
    snapshot_id, _oldest = await _newest_snapshot(client, key, end, max_bytes)
    if snapshot_id is None:
        live.entry_id = end
        return end, live.update("start", "no snapshot held: waiting for the next one")
    lower, detail = snapshot_id, ""
    while True:
        rows: Any = await client.xrange(key, lower, end, count=page)
        for eid, fields in rows:
            update = live.take(eid, _raw(fields))
            if update.event in ("break", "waiting", "ignored"):
                detail = update.detail
            elif update.event == "snapshot":
                detail = ""
        if len(rows) < page:
            break
        lower = "(" + id_str(rows[-1][0])
    return end, live.update("start", detail if live.book is None else "")


async def _gone_back(client: Redis, cursors: dict[Any, Any]) -> list[str]:
    """The keys whose stream was deleted or holds less than the reader read (its last ID is below the cursor)."""
    followed = [k for k, c in cursors.items() if c != "0-0"]
    if not followed:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for key in followed:
            pipe.xinfo_stream(key)
        replies = await pipe.execute(raise_on_error=False)
    out: list[str] = []
    for key, reply in zip(followed, replies, strict=True):
        if isinstance(reply, Exception):
            if "no such key" not in str(reply).lower():
                raise reply
            out.append(key)
        elif id_tuple(reply["last-generated-id"]) < id_tuple(cursors[key]):
            out.append(key)
    return out


async def follow_books(
    redis: Redis | str, keys: Sequence[str], *, block_ms: int = 1000, count: int = 100, page: int = 1000,
    scale: int = DEFAULT_SCALE, max_entry_bytes: int = MAX_DEPTH_ENTRY_BYTES,
) -> AsyncIterator[BookUpdate]:
    """A ``start`` :class:`BookUpdate` per key, then one per entry as entries arrive on ``keys`` (``depth``
    streams), each key's in stream order; see the module doc.  ``redis`` is a client (given a dedicated pool when
    its socket timeout is shorter than the block) or a URL.  Failing to reach Redis at start raises
    :class:`~consumer_sdk.core.errors.TransientError`; a refusal (ACL, a key that is not a stream) raises."""
    if not keys:
        raise ConfigError("follow_books() needs at least one stream key")
    if len(set(keys)) != len(keys):
        raise ConfigError("follow_books(): a key is given twice")
    for key in keys:
        check_depth_key(key)
    if block_ms < 1 or count < 1 or page < 1:
        raise ConfigError("block_ms, count and page must be >= 1")
    client, owned = blocking_client(redis, block_ms)
    try:
        books = {key: LiveBook(key, scale=scale, max_entry_bytes=max_entry_bytes) for key in keys}
        names: dict[Any, str] = {k.encode(): k for k in keys} | {k: k for k in keys}
        cursors: dict[Any, Any] = {}
        try:
            for key, live in books.items():
                cursors[key], update = await _start_key(client, live, page, max_entry_bytes)
                yield update
        except rexc.RedisError as exc:
            raise translate(exc, "follow_books") from exc
        throttle = Throttle(log, interval=5.0)
        delays = backoff_delays()
        check = False
        while True:
            try:
                if check:
                    for key in await _gone_back(client, cursors):
                        yield books[key].update("reset", "the stream was deleted or went back: starting it again")
                        cursors[key], update = await _start_key(client, books[key], page, max_entry_bytes)
                        yield update
                    check = False
                reply = await client.xread(cursors, count=count, block=block_ms)
                reraise_if_cancelling()  # redis-py may absorb a cancellation and return what it read
            except rexc.RedisError as exc:
                reraise_if_cancelling()
                if classify(exc) is ErrorKind.FATAL:
                    raise translate(exc, "follow_books") from exc
                delay = next(delays)
                throttle.log(logging.WARNING, "follow_books_retry", error=f"{type(exc).__name__}: {exc}",
                             delay_s=delay)
                check = True
                await asyncio.sleep(delay)
                continue
            delays = backoff_delays()
            if not reply:
                check = True  # idle: see that every stream is still the one followed
                continue
            for rkey, entries in iter_read_reply(reply):
                key = names[rkey]
                live = books[key]
                for eid, fields in entries:
                    cursors[key] = id_str(eid)
                    yield live.take(eid, _raw(fields))
    finally:
        if owned:
            await client.aclose()
