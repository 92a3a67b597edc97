"""History and live tails of one or more streams, without a consumer group.

Bounds (``market replay --start/--end``, ``market tail --from``) are parsed by the pure
:func:`parse_bound`: epoch milliseconds, ISO-8601 times, ``seq:N``, an entry ID ``<ms>-<seq>``,
or ``-``/``+`` for an open end.  :func:`resolve_bound` turns one into an ``XRANGE`` ID for a
given stream; a ``seq:N`` bound is found by binary search over the millisecond part of the
IDs (both the ms and the seq part increase in entry order), in ``O(log(time span))`` round trips.

Trimmed history is an explicit :class:`~consumer_sdk.core.errors.TrimmedError`, never a silently
shorter answer.  ``XINFO STREAM`` (Redis 7.0+, the supported floor) tells whether entries were ever removed
(``entries-added`` above ``length``, or ``max-deleted-entry-id`` for ``XDEL``; note that Redis
moves ``max-deleted-entry-id`` only on ``XDEL``, not when trimming); a start older than the
oldest entry still held, on a stream that lost entries, was trimmed.  Every page is checked
again, so a range trimmed away *while* it is being read is caught too (the trimming passed the
last entry read and the seq jumps to the next page).  Deletions are assumed to be trims (oldest
first), as the writer caps streams with ``MAXLEN``/``MINID``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import redis.exceptions as rexc
from redis.asyncio import Redis

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.backoff import backoff_delays
from consumer_sdk.core.errors import ConfigError, TrimmedError
from consumer_sdk.core.log import Throttle, get_logger
from consumer_sdk.core.redis import (
    CLUSTER_IDLE_S,
    MAX_SEQ,
    Entry,
    ErrorKind,
    IdT,
    StreamView,
    blocking_client,
    classify,
    fmt_id,
    id_after,
    id_before,
    id_str,
    id_tuple,
    is_cluster,
    iter_read_reply,
    stream_view,
    translate,
    xinfo_stream,
)
from consumer_sdk.core.tick import Tick
from consumer_sdk.poison import MAX_ENTRY_BYTES, PoisonedEntry, PoisonLog, entry_verdict

__all__ = [
    "Bound",
    "follow",
    "parse_bound",
    "read_range",
    "republish",
    "resolve_bound",
    "start_trimmed",
    "trimmed_between",
]

log = get_logger("replay")

Progress = Callable[[int, int | None], None]
#: ``on_invalid(key, entry_id, error)``: an entry that is not a tick, skipped
InvalidReport = Callable[[str, str, PoisonedEntry], None]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_LAST_ID: Final = (MAX_SEQ, MAX_SEQ)
_MS_RE: Final = re.compile(r"^[0-9]+$")
_ID_RE: Final = re.compile(r"^([0-9]+)-([0-9]+)$")
_SEQ_RE: Final = re.compile(r"^seq:([0-9]+)$")
# Epoch milliseconds below this (March 1973) are almost surely seconds typed by mistake.
_MIN_EPOCH_MS: Final = 100_000_000_000


@dataclass(frozen=True, slots=True)
class Bound:
    """One end of a range.

    ``kind`` is ``"open"`` (``-``/``+``), ``"ms"`` (a time, as epoch milliseconds), ``"seq"``
    (a tick seq) or ``"id"`` (an exact entry ID ``ms-seq``).  ``end`` tells which end it is:
    a time end includes its whole millisecond, a seq end means the last entry with seq <= N.
    """

    kind: Literal["open", "ms", "seq", "id"]
    end: bool
    ms: int = 0
    seq: int = 0
    text: str = ""

    def static_id(self) -> IdT | None:
        """The bound as an ID when it needs no look-up (everything but ``seq``)."""
        if self.kind == "open":
            return _LAST_ID if self.end else (0, 0)
        if self.kind == "ms":
            return (self.ms, MAX_SEQ) if self.end else (self.ms, 0)
        if self.kind == "id":
            return (self.ms, self.seq)
        return None


def parse_bound(text: str, *, end: bool) -> Bound:
    """Parse a range bound; raise :class:`ConfigError` on anything it does not recognise.

    ``1700000000000`` (epoch ms), ``2023-11-14T22:13:20Z`` / ``...+00:00`` / naive (UTC),
    ``seq:42``, ``1700000000000-42`` (entry ID), ``-`` or ``+`` (open); ``0`` as a start is open too,
    as in ``XRANGE``.
    """
    raw = text
    text = text.strip()
    if text == "0" and not end:
        return Bound("open", end, text="-")  # as in XRANGE: from the oldest entry held
    if text in ("-", "+"):
        if (text == "+") != end:
            where = "end" if end else "start"
            raise ConfigError(f"{raw!r} cannot be a range {where}: use '-' for the start and '+' for the end")
        return Bound("open", end, text=text)
    if _MS_RE.match(text):
        ms = int(text)
        if 0 < ms < _MIN_EPOCH_MS:
            raise ConfigError(
                f"{raw!r}: epoch milliseconds expected; this looks like seconds (multiply by 1000)"
            )
        return Bound("ms", end, ms=ms, text=text)
    if m := _SEQ_RE.match(text):
        return Bound("seq", end, seq=int(m.group(1)), text=text)
    if m := _ID_RE.match(text):
        ms, seq = int(m.group(1)), int(m.group(2))
        if seq > MAX_SEQ:
            raise ConfigError(f"{raw!r}: entry ID sequence part out of range")
        return Bound("id", end, ms=ms, seq=seq, text=text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"bad range bound {raw!r}: expected epoch milliseconds, an ISO-8601 time "
            "(2023-11-14T22:13:20Z), seq:N, an entry ID <ms>-<seq>, or '-'/'+'"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ms = (when - _EPOCH) // _MS
    if ms < 0:
        raise ConfigError(f"{raw!r}: times before 1970 are not supported")
    return Bound("ms", end, ms=ms, text=text)


def _as_bound(value: Bound | str, *, end: bool) -> Bound:
    return parse_bound(value, end=end) if isinstance(value, str) else value


# ------------------------------------------------------------------ pure trimming decisions


def start_trimmed(bound: Bound, view: StreamView) -> bool:
    """Whether a range starting at ``bound`` asks for entries the stream trimmed away.

    True when entries were removed from the stream and the start is older than the oldest entry
    still held (for ``seq:N``: N below its seq), or the stream was emptied of everything from the
    start on.  An open start asks for whatever is held: never trimmed.  Redis < 7 cannot tell.
    """
    if bound.kind == "open" or not view.deleted:
        return False
    if bound.kind == "seq":
        if view.first_held is None:
            return view.last_generated is not None and bound.seq <= view.last_generated[1]
        return bound.seq < view.first_held[1]
    start = bound.static_id()
    assert start is not None
    if view.first_held is None:
        return view.last_generated is not None and start <= view.last_generated
    return start < view.first_held


def trimmed_between(after: IdT, page_first: IdT | None, end: IdT, view: StreamView) -> bool:
    """Whether entries after ``after`` (the last one read) were removed before the next page was read.

    The page was read with ``XRANGE (after end`` (first entry ``page_first``, ``None`` when empty)
    and ``view`` looked up right after it.  An entry removed after the page was read cannot count:
    it would be in the page.  A deletion (``XDEL``) between ``after`` and the page counts; so does
    trimming that passed ``after`` (the oldest entry held is newer) when the seq jumps between
    ``after`` and the page (there were entries to lose), or when the page is empty although entries
    were added after ``after`` within the range.
    """
    md = view.max_deleted
    if md is not None and after < md and (md < page_first if page_first is not None else md <= end):
        return True
    if view.first_held is not None and view.first_held <= after:
        return False
    if page_first is not None:
        return page_first[1] > after[1] + 1
    return view.last_generated is not None and after < view.last_generated <= end


# ------------------------------------------------------------------ bound resolution


async def _first_at_or_after(client: Redis, key: str, start: IdT) -> IdT | None:
    rows: Any = await client.xrange(key, fmt_id(start), "+", count=1)
    return id_tuple(rows[0][0]) if rows else None


async def _first_with_seq(client: Redis, key: str, n: int) -> tuple[IdT | None, IdT | None]:
    """``(first entry with seq >= n, last entry held)``; either is ``None`` when there is none.

    Binary search over the ms part: ``g(m)``, the first entry at or after ``m-0``, has a seq that
    does not decrease with ``m``.  Find the largest ``m`` whose ``g(m)`` has seq < n; the answer is
    then the first entry at or after ``m-n``.  Each probe is one ``XRANGE m + COUNT 1``.
    """
    async with client.pipeline(transaction=False) as pipe:
        pipe.xrange(key, "-", "+", count=1)
        pipe.xrevrange(key, "+", "-", count=1)
        first_rows, last_rows = await pipe.execute()
    if not first_rows:
        return None, None
    first, last = id_tuple(first_rows[0][0]), id_tuple(last_rows[0][0])
    if first[1] >= n:
        return first, last
    if last[1] < n:
        return None, last
    lo, hi = first[0], last[0]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        probe = await _first_at_or_after(client, key, (mid, 0))
        assert probe is not None  # mid <= hi, the last entry's ms
        if probe[1] < n:
            lo = probe[0]  # g(m) is this entry for every m in [mid, probe.ms]
        else:
            hi = mid - 1
    return await _first_at_or_after(client, key, (lo, n)), last


async def resolve_bound(redis: Redis, key: str, bound: Bound | str, *, end: bool | None = None) -> str:
    """The ``XRANGE`` ID (inclusive) for ``bound`` on the stream ``key``.

    A ``seq:N`` start resolves to the first entry with seq >= N (past the last entry when there is
    none), a ``seq:N`` end to the last entry with seq <= N (``0-0``, below every entry, when there is
    none).  ``end`` is taken from the bound unless given with a string.
    """
    b = parse_bound(bound, end=bool(end)) if isinstance(bound, str) else bound
    try:
        return await _resolve(redis, key, b)
    except rexc.RedisError as exc:
        raise translate(exc, f"resolving {b.text or b.kind} on {key}") from exc


async def _resolve(client: Redis, key: str, b: Bound) -> str:
    if b.kind == "open":
        return "+" if b.end else "-"
    static = b.static_id()
    if static is not None:
        return fmt_id(static)
    if not b.end:
        found, last = await _first_with_seq(client, key, b.seq)
        if found is not None:
            return fmt_id(found)
        return "-" if last is None else fmt_id(id_after(last))
    if b.seq >= MAX_SEQ:
        return "+"
    above, last = await _first_with_seq(client, key, b.seq + 1)
    if last is None:
        return "+"
    if above is None:
        return fmt_id(last)
    rows: Any = await client.xrevrange(key, "(" + fmt_id(above), "-", count=1)
    return id_str(rows[0][0]) if rows else "0-0"


# ------------------------------------------------------------------ range reads


async def _pages(
    client: Redis,
    key: str,
    start: Bound,
    end: Bound,
    *,
    page: int,
    progress: Progress | None,
) -> AsyncIterator[Sequence[Entry]]:
    """Raw ``XRANGE`` pages of ``[start, end]``, checking every page for trimmed history."""
    if page < 1:
        raise ConfigError(f"page must be >= 1, not {page}")
    start_text = await _resolve(client, key, start)
    start_id = (0, 0) if start_text == "-" else id_tuple(start_text)
    end_text = await _resolve(client, key, end)
    end_id = _LAST_ID if end_text == "+" else id_tuple(end_text)
    if start_id > end_id:
        return
    after: IdT | None = None  # exclusive cursor once a page was read
    done = 0
    total: int | None = None
    while True:
        lo = fmt_id(start_id) if after is None else "(" + fmt_id(after)
        hi = "+" if end_id == _LAST_ID else fmt_id(end_id)
        async with client.pipeline(transaction=False) as pipe:
            pipe.xrange(key, lo, hi, count=page)
            pipe.xinfo_stream(key)
            if after is None and progress is not None:
                pipe.xrevrange(key, hi, lo, count=1)
                pipe.xlen(key)
            results = await pipe.execute(raise_on_error=False)
        rows = results[0]
        if isinstance(rows, Exception):
            raise rows
        view = stream_view(None if isinstance(results[1], Exception) else results[1])
        page_first = id_tuple(rows[0][0]) if rows else None
        if after is None:
            if start_trimmed(start, view):
                raise TrimmedError(key, start.text or fmt_id(start_id), _first_available(page_first, view))
            if progress is not None:
                total = _estimate_total(page_first, results[2], results[3])
        elif trimmed_between(after, page_first, end_id, view):
            raise TrimmedError(key, fmt_id(id_after(after)), _first_available(page_first, view))
        if not rows:
            return
        yield rows
        done += len(rows)
        if progress is not None:
            progress(done, total)
        after = id_tuple(rows[-1][0])
        if len(rows) < page or after >= end_id:
            return


def _first_available(page_first: IdT | None, view: StreamView) -> str | None:
    first = page_first if page_first is not None else view.first_held
    return None if first is None else fmt_id(first)


def _estimate_total(page_first: IdT | None, last_rows: Any, length: Any) -> int | None:
    """Entries in the range: the seq span of its first and last entries, at most the stream length."""
    if page_first is None or isinstance(last_rows, Exception) or not last_rows:
        return 0 if page_first is None else None
    last = id_tuple(last_rows[0][0])
    span = last[1] - page_first[1] + 1
    if isinstance(length, int) and length >= 0:
        span = min(span, length)
    return max(span, 1)


async def read_range(
    redis: Redis,
    key: str,
    start: Bound | str,
    end: Bound | str,
    *,
    page: int = 1000,
    progress: Progress | None = None,
    on_invalid: InvalidReport | None = None,
    max_entry_bytes: int = MAX_ENTRY_BYTES,
) -> AsyncIterator[tuple[str, Tick]]:
    """``(entry_id, tick)`` for every entry of ``key`` in ``[start, end]``, in order.

    Pages with ``XRANGE`` and exclusive starts.  Raises :class:`TrimmedError` when the start lies
    in history the stream no longer holds (Redis >= 7), or when the range is trimmed while being
    read; :class:`TransientError` when Redis is unreachable.  An entry that is not a tick (see
    :mod:`consumer_sdk.poison`; a field ``d`` longer than ``max_entry_bytes`` is not parsed) is passed
    to ``on_invalid(key, entry_id, error)`` and skipped, or, without ``on_invalid``, raises
    :class:`~consumer_sdk.poison.PoisonedEntry` (an :class:`~consumer_sdk.core.errors.InvalidTick`)
    naming the key and the entry ID.  ``progress(done, estimated_total)`` is called after every page;
    the estimate is the seq span of the range (``None`` when unknown).  Memory: one page of entries.
    """
    sb, eb = _as_bound(start, end=False), _as_bound(end, end=True)
    try:
        async for rows in _pages(redis, key, sb, eb, page=page, progress=progress):
            for eid, fields in rows:
                raw = fields.get(b"d")
                if raw is None:
                    raw = fields.get("d")
                tick = entry_verdict(raw, max_entry_bytes)
                if isinstance(tick, PoisonedEntry):
                    if on_invalid is None:
                        raise PoisonedEntry(f"{key} {id_str(eid)}: {tick}", tick.kind)
                    on_invalid(key, id_str(eid), tick)
                    continue
                yield id_str(eid), tick
    except rexc.RedisError as exc:
        raise translate(exc, f"reading {key}") from exc


def _target_key(key: str, target_prefix: str) -> str:
    prefix, sep, rest = key.partition(":")
    if not sep or not rest or not target_prefix or ":" in target_prefix:
        raise ConfigError(f"cannot republish {key!r} under prefix {target_prefix!r}")
    if target_prefix == prefix:
        raise ConfigError(f"target prefix {target_prefix!r} is the source's own prefix")
    return f"{target_prefix}:{rest}"


async def republish(
    redis: Redis,
    key: str,
    start: Bound | str,
    end: Bound | str,
    *,
    target_prefix: str,
    page: int = 1000,
    maxlen: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Copy ``[start, end]`` of ``key`` to the same stream under ``target_prefix``, keeping entry IDs.

    Entries at or below the target's last ID are skipped, so running it again (or after a partial
    copy) adds only what is missing.  Fields are copied byte for byte.  ``maxlen`` caps the target
    (``MAXLEN ~``).  Returns the number of entries written.
    """
    target = _target_key(key, target_prefix)
    sb, eb = _as_bound(start, end=False), _as_bound(end, end=True)
    written = 0
    try:
        info = await xinfo_stream(redis, target)
        last = id_tuple(info["last-generated-id"]) if info else (0, 0)
        async for rows in _pages(redis, key, sb, eb, page=page, progress=progress):
            fresh = [(eid, fields) for eid, fields in rows if id_tuple(eid) > last]
            if not fresh:
                continue
            async with redis.pipeline(transaction=False) as pipe:
                for eid, fields in fresh:
                    pipe.xadd(target, dict(fields), id=eid, maxlen=maxlen, approximate=True)
                await pipe.execute()
            written += len(fresh)
            last = id_tuple(fresh[-1][0])
    except rexc.RedisError as exc:
        raise translate(exc, f"republishing {key} to {target}") from exc
    return written


# ------------------------------------------------------------------ live tail


async def _follow_cursor(client: Redis, key: str, start: str) -> str:
    """The exclusive ``XREAD`` ID after which ``key`` is followed."""
    if start == "$":
        info = await xinfo_stream(client, key)
        return id_str(info["last-generated-id"]) if info else "0-0"
    bound = parse_bound(start, end=False)
    if bound.kind == "open":
        return "0-0"
    view = stream_view(await xinfo_stream(client, key))
    resolved = await _resolve(client, key, bound)
    if start_trimmed(bound, view):
        raise TrimmedError(key, bound.text, _first_available(None, view))
    if resolved == "-":
        return "0-0"
    return fmt_id(id_before(id_tuple(resolved)))


async def _xread_each(client: Redis, cursors: dict[Any, Any], count: int) -> list[Any]:
    """``XREAD COUNT count STREAMS key cursor`` per stream, pipelined, never blocking (a Redis Cluster, where
    one command cannot span hash slots); the replies joined as one ``XREAD`` reply's ``[key, entries]`` pairs.
    An error reply is raised after every reply was read."""
    pipe = client.pipeline(transaction=False)
    for key, cursor in cursors.items():
        pipe.xread({key: cursor}, count=count)
    replies: list[Any] = await pipe.execute(raise_on_error=False)
    error = next((r for r in replies if isinstance(r, BaseException)), None)
    if error is not None:
        raise error
    return [pair for reply in replies for pair in iter_read_reply(reply)]


async def follow(
    redis: Redis | str,
    keys: Sequence[str],
    *,
    start: str = "$",
    block_ms: int = 1000,
    count: int = 1000,
    on_invalid: Callable[[str, str, Exception], None] | None = None,
    max_entry_bytes: int = MAX_ENTRY_BYTES,
) -> AsyncIterator[tuple[str, str, Tick]]:
    """``(key, entry_id, tick)`` as entries arrive on ``keys``, with ``XREAD BLOCK`` and no group.

    ``start`` is ``$`` (only what arrives from now on), ``-``/``0`` (everything held), or any bound
    :func:`parse_bound` reads (a time, ``seq:N``, an entry ID); a start in trimmed history raises
    :class:`TrimmedError`. On a Redis Cluster each stream is read with an ``XREAD`` of its own, pipelined, and a
    round that finds nothing waits :data:`~consumer_sdk.core.redis.CLUSTER_IDLE_S`. A client whose socket timeout
    is shorter than the block is given a dedicated connection pool. Once started, a lost connection is retried
    with capped, jittered backoff from where it stopped; failing to reach Redis at start raises
    :class:`TransientError`. Entries that are not ticks (see :mod:`consumer_sdk.poison`) are passed to
    ``on_invalid(key, id, error)`` (an :class:`~consumer_sdk.poison.PoisonedEntry`; logged at most once a second
    per kind when it is ``None``) and skipped.
    """
    if not keys:
        raise ConfigError("follow() needs at least one stream key")
    if block_ms < 0 or count < 1:
        raise ConfigError("block_ms must be >= 0 and count >= 1")
    client, owned = blocking_client(redis, block_ms)
    try:
        try:
            cursors: dict[Any, Any] = {}
            for key in keys:
                cursors[key] = await _follow_cursor(client, key, start)
        except rexc.RedisError as exc:
            raise translate(exc, "follow") from exc
        names: dict[Any, str] = {k.encode(): k for k in keys}
        cluster = is_cluster(client)
        throttle = Throttle(log, interval=5.0)
        poison = PoisonLog(log)
        delays = backoff_delays()
        while True:
            try:
                reply: Any
                if cluster:
                    reply = await _xread_each(client, cursors, count)
                    if not reply:
                        idle = min(block_ms / 1000.0, CLUSTER_IDLE_S) if block_ms else CLUSTER_IDLE_S
                        await asyncio.sleep(idle)  # poll: no one command can wait on streams of several slots
                        continue
                else:
                    reply = await client.xread(cursors, count=count, block=block_ms)
                reraise_if_cancelling()  # redis-py may absorb a cancellation and return what it read
            except rexc.RedisError as exc:
                reraise_if_cancelling()
                if classify(exc) is not ErrorKind.TRANSIENT:
                    raise translate(exc, "follow") from exc
                delay = next(delays)
                throttle.log(logging.WARNING, "follow_retry", error=f"{type(exc).__name__}: {exc}", delay_s=delay)
                await asyncio.sleep(delay)
                continue
            delays = backoff_delays()
            for rkey, entries in iter_read_reply(reply):
                key = names[rkey] if rkey in names else id_str(rkey)
                for eid, fields in entries:
                    sid = id_str(eid)
                    cursors[key] = sid
                    raw = fields.get(b"d") if fields else None
                    if raw is None and fields:
                        raw = fields.get("d")
                    tick = entry_verdict(raw, max_entry_bytes)
                    if isinstance(tick, PoisonedEntry):
                        if on_invalid is not None:
                            on_invalid(key, sid, tick)
                        else:
                            poison.report(key, sid, tick.kind, str(tick))
                        continue
                    yield key, sid, tick
    finally:
        if owned:
            await client.aclose()
