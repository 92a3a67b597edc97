"""An async consumer-group reader: at-least-once delivery, dedupe by seq, gap and trim reports.

::

    consumer = Consumer(redis_url="redis://127.0.0.1:6379/0", patterns=["binance:*:trade"], group="strat")
    await consumer.run(handler)          # until consumer.stop(), cancellation, or the handler raises

How a read goes: one ``XREADGROUP`` over every matched stream without ``BLOCK`` (a backlog comes
back at once) and, only when that finds nothing, one with ``BLOCK``; the reply is taken as the
server sent it (no dict per entry) and reduced to entry IDs and tick fields; per stream, the
entries are decoded and classified by a :class:`~consumer_sdk.core.sequencing.SeqTracker` (no I/O, no
await); new ticks go to the handler in order; then one ``XACK`` per stream, all written at once,
for everything the handler returned from, plus duplicates and invalid entries.  Nothing is
acknowledged before the handler returned for it: at-least-once.

Garbage collection: a reply holds two lists per entry, and collections that start while a large
one is being built walk it again and again (on a backlog of 500 000 entries, longer than the read
itself takes).  So Python's cyclic garbage collector is paused, if it was on, while a read without
``BLOCK`` is under way and until its reply is reduced to flat lists; other tasks that run in the
meantime run with it paused too.  A blocking read never pauses it, and handlers run with the
collector as the application left it.

Delivery rules:

- Start: the consumer first re-reads its own pending entries (``XREADGROUP ... 0``), so a
  restarted consumer with the same name finishes what it had been given.
- Dedupe: a seq at or below the last one this ``Consumer`` handed over for a stream (and not in a
  hole it is still waiting for) is a duplicate: acked, not handed again.  This covers redelivery
  after a failed ``XACK`` or a restarted ``run()``, and a writer re-publishing what it already
  stored.  A new ``Consumer`` object starts with no memory: what its previous incarnation handled
  but never acked is handed again (at-least-once).
- Claims: entries pending longer than ``claim_idle_ms`` on other (dead) consumers of the group are
  taken over with ``XAUTOCLAIM`` and handed over even when their seq is below the last seen: they
  were delivered to someone else, never to this consumer.
- Gaps: a jump in seq is checked against the stream (one ``XRANGE ... COUNT 1`` per hole).  If the
  stream holds entries in the hole, they went to another consumer of the group and nothing is
  reported; otherwise ``on_gap(key, first_missing, last_missing)`` is called just before the tick
  after the hole is handed over.  With several consumers in a group, a hole partly held by another
  consumer and partly missing is not reported (the ingestor counts venue gaps itself).
- Handler errors: the entry that raised and the rest of its batch are not acked; the error
  propagates out of :meth:`Consumer.run`.  Call ``run()`` again to retry them (this consumer's
  memory makes sure what was handled before is not handed again).
- Trimmed history: when the group's position is older than what the stream still holds and
  entries after it were removed (Redis >= 7: the group's ``lag`` counts more unread entries than
  the stream holds, or ``max-deleted-entry-id`` is after ``last-delivered-id``), checked for every
  stream when it is first read; or a seq hole holds no entries and trimming has passed the entry
  before it (the oldest entry held is newer); or a pending entry was deleted before it was
  processed; or ``start_id`` is a time or seq older than what the stream holds:
  ``on_trimmed(key, first_missing_id, first_available_id)`` is called before anything after the
  loss is handed over (``first_available_id`` is ``None`` when unknown).  Without ``on_trimmed``,
  :meth:`Consumer.run` raises :class:`~consumer_sdk.core.errors.TrimmedError` instead, once per loss per
  ``Consumer``; calling ``run()`` again continues past it.  (Redis moves ``max-deleted-entry-id``
  only on ``XDEL``, not when trimming, hence the ``lag`` count.)  Where Redis cannot give a ``lag``
  (nil after some deletions) the start check falls back on a jump in seq between the group's position
  and the oldest entry held.  A venue gap that trimming overtook is reported as trimmed.
- The server must be Redis 7.0+ or Valkey 7.2+ (:mod:`consumer_sdk.core.server`): the first set-up
  checks it and :meth:`Consumer.run` raises :class:`~consumer_sdk.core.errors.ConfigError` on an older one.
- ``NOGROUP`` (Redis restarted without persistence, stream or group deleted): the group is created
  again at ``0`` (everything in a re-created stream is new to the group), logged and counted.  A
  stream named literally is re-created empty (``MKSTREAM``) so the group can wait on it; a stream
  found by a glob that no longer exists is dropped until a rescan finds it again.
- Connection errors: retried forever with capped, jittered backoff (50 ms growing to 2 s), counted
  in ``reconnects``; afterwards the consumer re-reads its own pending entries.  Errors that retrying
  cannot fix (a key that is not a stream, authentication) raise :mod:`consumer_sdk.core.errors`.
- Blocking reads: a client made from a URL gets a socket timeout of ``block_ms`` + 10 s; a given
  client whose socket timeout is shorter than the block is used through a dedicated pool with the
  same settings and a longer timeout.

Streams found by a glob after the start are read from their beginning (``0``): everything in a
stream that appeared after the consumer started is new.  ``start_id`` applies to groups created
at the start.  Handlers are plain functions or coroutine functions, told apart once per ``run()``
(a plain function returning an awaitable has it awaited).  Logs go through ``market.consumer``
with events ``redis_retry``, ``group_recreated``, ``stream_gone``, ``streams_found``, ``trimmed``
and ``invalid_tick`` (the noisy ones throttled).  In Redis Cluster, one ``XREADGROUP`` cannot span
slots: use one ``Consumer`` per stream (or per hash tag).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson
import redis.exceptions as rexc
from redis.asyncio import Redis

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.backoff import backoff_delays
from consumer_sdk.core.errors import ConfigError, InvalidTick, TransientError, TrimmedError
from consumer_sdk.core.handler import Handler
from consumer_sdk.core.keys import DEFAULT_PREFIX, Pattern
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.redis import (
    ErrorKind,
    IdT,
    StreamView,
    blocking_client,
    classify,
    field_name,
    field_value,
    fmt_id,
    id_after,
    id_before,
    id_str,
    id_tuple,
    iter_read_reply,
    raw_stream_client,
    stream_view,
    translate,
    xack_many,
)
from consumer_sdk.core.sequencing import SeqTracker, Verdict, is_contiguous_channel
from consumer_sdk.core.server import require_supported
from consumer_sdk.core.tick import SCHEMA_VERSION, Tick, decode_tick
from consumer_sdk.replay import Bound, parse_bound, resolve_bound, start_trimmed

__all__ = [
    "Consumer",
    "ConsumerStats",
    "GapHook",
    "InvalidHook",
    "TrimmedHook",
    "group_behind_trim",
    "hole_verdict",
    "lag_estimate",
]

log = get_logger("consumer")

InvalidHook: TypeAlias = Callable[[str, str, Exception], None]
GapHook: TypeAlias = Callable[[str, int, int], None]
TrimmedHook: TypeAlias = Callable[[str, str, str | None], None]

# What one entry of a batch turned out to be.
_DELIVER: Final = 0
_DUPLICATE: Final = 1
_INVALID: Final = 2
_DELETED: Final = 3
_OK: Final = Verdict.OK
_GAP: Final = Verdict.GAP
_LATE: Final = Verdict.LATE
_DUP: Final = Verdict.DUPLICATE

# An entry that is not simply the next tick in order: (kind, verdict, the error of an invalid entry).
_Odd: TypeAlias = tuple[int, Verdict | None, InvalidTick | None]
# One stream's entries read: (key as returned, entry IDs, values of the field d), see _flatten.
_Flat: TypeAlias = tuple[Any, list[Any], list[Any]]


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """Counters since the consumer was built (a snapshot; read it as often as you like)."""

    delivered: int  # ticks handed to the handler
    acked: int  # entries acknowledged (handled, duplicates, invalid)
    duplicates: int  # redelivered seqs not handed again
    gaps: int  # holes in seq reported
    gap_ticks: int  # seqs missing in those holes
    late: int  # ticks that filled a hole after a later one was handed over
    invalid: int  # entries that are not ticks (acked, passed to on_invalid)
    nogroup_recoveries: int  # groups created again after NOGROUP
    reconnects: int  # connection errors retried
    claimed: int  # entries taken over from idle consumers with XAUTOCLAIM
    trimmed: int  # losses to trimming reported (on_trimmed or TrimmedError)
    keys: int  # streams being read now


# ---------------------------------------------------------------- pure decisions


def hole_verdict(hole_has_entries: bool, before: IdT, after: IdT, view: StreamView) -> str:
    """What a hole in seq between the entries ``before`` and ``after`` is.

    ``"shared"``: the stream holds entries in it, given to another consumer of the group;
    ``"trimmed"``: an entry in it was deleted (``max-deleted-entry-id``), or trimming has passed
    ``before`` (the oldest entry held is newer, or none is left), so what was there is gone;
    ``"gap"``: nothing was ever stored there.
    """
    if hole_has_entries:
        return "shared"
    md = view.max_deleted
    if md is not None and before < md < after:
        return "trimmed"
    if view.first_held is None or view.first_held > before:
        return "trimmed"
    return "gap"


def group_behind_trim(last_delivered: IdT, lag: int | None, view: StreamView) -> bool:
    """Whether a group at ``last_delivered`` will skip entries removed before it read them.

    An ``XDEL`` after its position; entries added after its position with none left; or the oldest
    entry held newer than its position while Redis counts more unread entries (``lag``) than the
    stream holds.  Without a ``lag`` (Redis < 7, or one Redis could not compute) a jump in seq
    between the position and the oldest entry held stands in for the count.
    """
    md = view.max_deleted
    if md is not None and md > last_delivered:
        return True
    if view.last_generated is None or view.last_generated <= last_delivered:
        return False
    first = view.first_held
    if first is None:
        return True
    if first <= last_delivered:
        return False  # trimming removes the oldest first: all after the position is still there
    if view.deleted is False:
        return False  # nothing was ever removed: a stream whose first seq is not 1 has skipped nothing
    if lag is not None:
        return lag > view.length
    return first[1] > last_delivered[1] + 1


def lag_estimate(group: dict[str, Any], stream: dict[str, Any] | None) -> int:
    """Entries the group has not been given yet: Redis 7's ``lag`` when it knows it, otherwise
    0 when the group is at the stream's last ID, else the stream length (an upper bound)."""
    lag = group.get("lag")
    if isinstance(lag, int):
        return lag
    if stream is None:
        return 0
    last_delivered = id_tuple(group.get("last-delivered-id") or "0-0")
    if last_delivered >= id_tuple(stream.get("last-generated-id") or "0-0"):
        return 0
    return int(stream.get("length") or 0)


class _KeyState:
    """One stream being read: its tracker, where the read stands, what was reported."""

    __slots__ = ("active", "cursor", "key", "last_id", "literal", "names", "tracker", "trim_reported")

    def __init__(self, key: str, literal: bool) -> None:
        self.key = key
        self.names: tuple[bytes, str] = (key.encode(), key)
        self.literal = literal
        # A channel whose seq skips by design (book_ticker) has no gaps; older means already seen.
        self.tracker = SeqTracker(contiguous=is_contiguous_channel(key.rpartition(":")[2]))
        self.last_id: Any = None  # entry ID of the last accepted tick
        self.cursor: Any = "0"  # "0" / a pending ID while re-reading our own pending entries, then ">"
        self.active = False
        self.trim_reported: set[Any] = set()


@dataclass(slots=True)
class _Batch:
    """One stream's entries, classified.

    ``ids`` and ``ticks`` have one item per entry, in order; ``ticks[i]`` is the tick to hand over,
    or ``None`` for an entry that is not to be handed over.  Entries that are not simply the next
    tick in order (a gap, a late or claimed tick, a duplicate, an invalid or a deleted entry) are
    listed in ``odd`` by index.
    """

    ids: list[Any]
    ticks: list[Any]
    odd: dict[int, _Odd]
    gaps: list[tuple[int, Any, Any, int, int]]  # (index, ID before the hole, ID after, first, last)
    pre_last: int | None  # the tracker's last seq before this batch
    pre_last_id: Any
    deleted: list[IdT]  # pending entries whose content is gone (reported on their own)
    reports: dict[int, tuple[int, int]] | None = None  # index -> hole to report before it
    done: int = 0  # entries dealt with, from the first: what may be acked

    def kind(self, index: int) -> int:
        item = self.odd.get(index)
        return _DELIVER if item is None else item[0]

    def verdict(self, index: int) -> Verdict | None:
        item = self.odd.get(index)
        return _OK if item is None else item[1]

    def accepted(self, index: int) -> bool:
        """Whether the tracker took this entry's seq as its last (an ``OK`` or a ``GAP``)."""
        if self.ticks[index] is None:
            return False
        verdict = self.verdict(index)
        return verdict is not None and verdict <= _GAP


# In place of the field value of a pending entry whose content was deleted.
_GONE: Final = object()


def _flatten(entries: Iterable[Any], dfield: Any) -> tuple[list[Any], list[Any]]:
    """One stream's entries, as the server sent them, as two lists: the entry IDs and their field ``dfield``.

    An entry is ``[entry_id, [field, value, ...]]`` (a mapping of fields is taken too); a value is
    ``None`` when the entry has no such field and :data:`_GONE` when its content was deleted (a
    pending entry, read again after a trim).  The lists hold no container per entry, so Python's
    cyclic garbage collector has little to walk once the reply itself is dropped.
    """
    ids: list[Any] = []
    values: list[Any] = []
    add_id = ids.append
    add_value = values.append
    for eid, fields in entries:
        add_id(eid)
        if type(fields) is list and len(fields) == 2 and fields[0] == dfield:  # what the writer stores
            add_value(fields[1])
        elif not fields:
            add_value(_GONE)
        else:
            add_value(field_value(fields, dfield))
    return ids, values


def _flatten_reply(reply: Any, dfield: Any) -> list[_Flat]:
    """``(key, ids, values)`` for every stream with entries in an XREADGROUP reply (see :func:`_flatten`)."""
    return [(key, *_flatten(entries, dfield)) for key, entries in iter_read_reply(reply) if entries]


class _CollectorPause:
    """Keeps Python's cyclic garbage collector off while large replies are read and flattened.

    A reply holds two lists per entry and no reference cycles; collections that start while it is
    being built walk it again and again as it grows, which costs more than reading it.  Shared by
    every consumer of the process: the collector is switched off by the first reader in, and back on
    by the last one out, only if it was on to begin with.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._resume:
                    self._resume = False
                    gc.enable()


_collector_paused: Final = _CollectorPause()

# How long a cancelled read may run on before it is cancelled again.
_RECANCEL_S: Final = 0.02


def _cancel_until_done(task: asyncio.Task[Any]) -> None:
    """Cancel ``task``, and again every :data:`_RECANCEL_S` while it runs on.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py sends every command through) drops a
    cancellation that arrives just as the command was written; the read would then block for its
    whole ``BLOCK``.
    """
    if task.done():
        return
    task.cancel()
    task.get_loop().call_later(_RECANCEL_S, _cancel_until_done, task)


def _check(raw: Any) -> Tick | InvalidTick:
    """:func:`decode_tick`'s verdict on a field value (``None``: no such field), the error returned."""
    if raw is None:
        return InvalidTick("no field 'd'")
    try:
        return decode_tick(raw)
    except InvalidTick as exc:
        return exc


def _classify(state: _KeyState, ids: list[Any], values: list[Any], claimed: bool) -> _Batch:
    """Decode and sequence-check one stream's entries (pure; updates the stream's tracker).

    ``ids`` and ``values`` as :func:`_flatten` gives them.  This is the per-entry cost of a read, so
    the common case is checked inline: a tick that passes :func:`decode_tick`'s checks and has the
    next seq in order.  Anything else takes the long way, with the same outcome.
    """
    tracker = state.tracker
    contiguous = tracker.contiguous
    observe = tracker.observe
    loads = orjson.loads
    version = SCHEMA_VERSION
    last = pre_last = tracker.last
    last_index = -1  # of the last entry accepted as the tracker's last seq
    ticks: list[Any] = []
    add_tick = ticks.append
    odd: dict[int, _Odd] = {}
    gaps: list[tuple[int, Any, Any, int, int]] = []
    deleted: list[IdT] = []
    in_order = 0
    for index, raw in enumerate(values):
        try:
            tick = loads(raw)
            seq = tick["seq"]
            v = tick["v"]
            if (
                type(seq) is not int
                or seq < 0
                or type(v) is not int
                or v != version
                or type(tick["venue"]) is not str
                or type(tick["symbol"]) is not str
                or type(tick["channel"]) is not str
                or type(tick["ts_event"]) is not int
                or type(tick["ts_recv"]) is not int
            ):
                raise ValueError
        except (ValueError, TypeError, KeyError):  # orjson.JSONDecodeError is a ValueError
            if raw is _GONE:  # listed as pending, but its content was deleted (trimmed)
                odd[index] = (_DELETED, None, None)
                deleted.append(id_tuple(ids[index]))
                add_tick(None)
                continue
            checked = _check(raw)
            if isinstance(checked, InvalidTick):
                odd[index] = (_INVALID, None, checked)
                add_tick(None)
                continue
            tick = checked
            seq = tick["seq"]
        if last is None or seq == last + 1 or (seq > last and not contiguous):  # SeqTracker.observe's OK
            last = seq
            last_index = index
            in_order += 1
            add_tick(tick)
            continue
        tracker.last = last
        verdict = observe(seq)
        if verdict is _LATE and not contiguous:
            verdict = _DUP
        if verdict is _DUP and not claimed:
            odd[index] = (_DUPLICATE, verdict, None)
            add_tick(None)
            continue
        if verdict is _GAP:
            assert last is not None
            before = ids[last_index] if last_index >= 0 else state.last_id
            gaps.append((index, before, ids[index], last + 1, seq - 1))
        if verdict <= _GAP:
            last_index = index
        last = tracker.last
        if verdict is not _OK:
            odd[index] = (_DELIVER, verdict, None)
        add_tick(tick)
    tracker.last = last
    tracker.accepted += in_order
    pre_last_id = state.last_id
    if last_index >= 0:
        state.last_id = ids[last_index]
    return _Batch(ids, ticks, odd, gaps, pre_last, pre_last_id, deleted)


def _rollback(state: _KeyState, batch: _Batch, index: int) -> None:
    """Forget what the tracker learnt from the entries from ``index`` on: they were not handed over."""
    tracker = state.tracker
    total = len(batch.ids)
    earlier = next((i for i in range(min(index, total) - 1, -1, -1) if batch.accepted(i)), None)
    if any(batch.accepted(i) for i in range(index, total)):
        tracker.last = batch.pre_last if earlier is None else batch.ticks[earlier]["seq"]
    for gap_index, _before, _after, first, last in batch.gaps:
        if gap_index >= index:
            tracker.fill(first, last)
    state.last_id = batch.pre_last_id if earlier is None else batch.ids[earlier]


def _is_async(handler: Handler) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    # An object whose __call__ is a coroutine function.
    return inspect.iscoroutinefunction(type(handler).__call__)


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _split_pattern(text: str, prefix: str) -> Pattern:
    parts = text.split(":")
    if len(parts) == 4:
        if parts[0] != prefix:
            raise ConfigError(f"stream key {text!r} does not start with the prefix {prefix!r}")
        return Pattern(":".join(parts[1:]))
    return Pattern(text)


def _scan_glob(pattern: Pattern, prefix: str) -> str:
    # fnmatch negates a class with [!...]; Redis globs with [^...].
    return pattern.redis_glob(prefix).replace("[!", "[^")


class Consumer:
    """Reads ticks from the streams matching ``patterns`` as member ``consumer`` of ``group``.

    ``redis_url`` is a URL or an existing ``redis.asyncio.Redis`` (``redis=`` is accepted as an
    alias for a client).  ``patterns`` are ``venue:SYMBOL:channel`` patterns with globs or full keys
    ``md:venue:SYMBOL:channel``.  ``count`` entries per stream per read; ``block_ms`` the longest a
    read waits; ``start_id`` where groups created at the start begin (``"$"``: new ticks only,
    ``"0"``: all history held, or any :func:`~consumer_sdk.replay.parse_bound` start: an entry ID,
    epoch ms, an ISO-8601 time, ``seq:N``); ``rescan_s`` how often globs are expanded again; ``claim_idle_ms``
    how long an entry may sit with another consumer before it is claimed (``None``: never).
    Hooks: ``on_invalid(key, entry_id, error)``, ``on_gap(key, first_missing, last_missing)``,
    ``on_trimmed(key, first_missing_id, first_available_id)`` (see the module documentation).
    """

    def __init__(
        self,
        *,
        redis_url: str | Redis | None = None,
        redis: Redis | None = None,
        patterns: Sequence[str],
        group: str,
        consumer: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        count: int = 1000,
        block_ms: int = 1000,
        start_id: str = "$",
        rescan_s: float = 5.0,
        claim_idle_ms: int | None = 30000,
        on_invalid: InvalidHook | None = None,
        on_gap: GapHook | None = None,
        on_trimmed: TrimmedHook | None = None,
    ) -> None:
        if (redis_url is None) == (redis is None):
            raise ConfigError("give exactly one of redis_url (a URL or a client) and redis (a client)")
        source = redis_url if redis_url is not None else redis
        assert source is not None
        if isinstance(patterns, str) or not patterns:
            raise ConfigError("patterns must be a non-empty sequence of patterns or stream keys")
        if not group or not isinstance(group, str):
            raise ConfigError("group must be a non-empty string")
        if count < 1:
            raise ConfigError(f"count must be >= 1, not {count}")
        if block_ms < 1:
            raise ConfigError(f"block_ms must be >= 1, not {block_ms}")
        if rescan_s <= 0:
            raise ConfigError(f"rescan_s must be > 0, not {rescan_s}")
        if claim_idle_ms is not None and claim_idle_ms < 1:
            raise ConfigError(f"claim_idle_ms must be >= 1 or None, not {claim_idle_ms}")
        self._start_bound = None if start_id in ("$", "0") else parse_bound(start_id, end=False)
        self._source: str | Redis = source
        self._patterns = tuple(dict.fromkeys(_split_pattern(p, prefix) for p in patterns))
        self._prefix = prefix
        self.group = group
        self.consumer = consumer or _default_consumer_name()
        self._count = count
        self._block_ms = block_ms
        self._start_id = start_id
        self._rescan_s = rescan_s
        self._claim_idle_ms = claim_idle_ms
        self._on_invalid = on_invalid
        self._on_gap = on_gap
        self._on_trimmed = on_trimmed

        self._states: dict[str, _KeyState] = {}
        self._by_name: dict[Any, _KeyState] = {}
        self._client: Redis | None = None
        self._owned = False
        self._dfield: Any = b"d"
        self._running = False
        self._server_checked = False
        self._stop = asyncio.Event()
        self._read_task: asyncio.Task[Any] | None = None
        self._next_rescan = 0.0
        self._next_claim = 0.0
        self._throttle = Throttle(log, interval=5.0)

        self._delivered = 0
        self._acked = 0
        self._duplicates = 0
        self._gaps = 0
        self._gap_ticks = 0
        self._late = 0
        self._invalid = 0
        self._nogroup = 0
        self._reconnects = 0
        self._claimed = 0
        self._trimmed = 0

    # ------------------------------------------------------------ public

    @property
    def keys(self) -> list[str]:
        """The stream keys being read now."""
        return [k for k, s in self._states.items() if s.active]

    def stats(self) -> ConsumerStats:
        return ConsumerStats(
            delivered=self._delivered,
            acked=self._acked,
            duplicates=self._duplicates,
            gaps=self._gaps,
            gap_ticks=self._gap_ticks,
            late=self._late,
            invalid=self._invalid,
            nogroup_recoveries=self._nogroup,
            reconnects=self._reconnects,
            claimed=self._claimed,
            trimmed=self._trimmed,
            keys=sum(1 for s in self._states.values() if s.active),
        )

    def stop(self) -> None:
        """Ask :meth:`run` to return: at once when it is waiting, else after the batch in hand is acked.

        Called before ``run()`` starts, it makes that ``run()`` return at once.
        """
        self._stop.set()
        task = self._read_task
        if task is not None and not task.done():
            _cancel_until_done(task)

    async def run(self, handler: Handler) -> None:
        """Hand every new tick to ``handler`` until :meth:`stop` or cancellation.

        Raises whatever ``handler`` (or a hook) raises, after acking what was handled before it;
        :class:`~consumer_sdk.core.errors.TrimmedError` when history was trimmed and no ``on_trimmed``
        was given; :class:`~consumer_sdk.core.errors.ConfigError` or
        :class:`~consumer_sdk.core.errors.MarketError` for Redis errors that retrying cannot fix.
        Connection errors never end it.
        """
        async for _ in self._loop(handler, _is_async(handler), None):
            pass  # pragma: no cover - the loop yields only when collecting batches

    async def batches(self) -> AsyncIterator[list[tuple[str, str, Tick]]]:
        """``async for batch in consumer.batches()``: lists of ``(key, entry_id, tick)``.

        A batch is acked when the next one is requested; the last one is left pending when the
        iteration ends (it is handed again by the next ``run()``/``batches()`` of a new consumer,
        or skipped as a duplicate by this one).  Ends on :meth:`stop`.
        """
        collected: list[tuple[str, str, Tick]] = []

        def ignore(_tick: Tick) -> None:
            return None

        async for _ in self._loop(ignore, False, collected):
            batch = collected[:]
            collected.clear()
            yield batch

    async def lag(self) -> dict[str, int]:
        """Entries not yet delivered to the group, per stream key (Redis 7 ``lag``; see :func:`lag_estimate`)."""
        client, owned = (self._client, False) if self._client is not None else self._make_client()
        try:
            keys = self.keys or self._literal_keys()
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.xinfo_groups(key)
                    pipe.xinfo_stream(key)
                results = await pipe.execute(raise_on_error=False)
        except rexc.RedisError as exc:
            raise translate(exc, "lag") from exc
        finally:
            if owned:
                await client.aclose()
        out: dict[str, int] = {}
        for i, key in enumerate(keys):
            groups, stream = results[2 * i], results[2 * i + 1]
            if isinstance(groups, Exception):
                continue
            mine = self._find_group(groups)
            if mine is not None:
                out[key] = lag_estimate(mine, None if isinstance(stream, Exception) else stream)
        return out

    async def aclose(self) -> None:
        """Close the client this consumer made for itself (a given client is left open)."""
        client, self._client = self._client, None
        if client is not None and self._owned:
            await client.aclose()

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        await self.aclose()

    # ------------------------------------------------------------ loop

    def _make_client(self) -> tuple[Redis, bool]:
        return blocking_client(self._source, self._block_ms)

    async def _loop(
        self, handler: Handler, is_async: bool, collect: list[tuple[str, str, Tick]] | None
    ) -> AsyncIterator[None]:
        if self._running:
            raise RuntimeError("this Consumer is already running; one run() or batches() at a time")
        self._running = True
        if self._client is None:
            self._client, self._owned = self._make_client()
        client = self._client
        reader = raw_stream_client(client)  # reads entries without a dict per entry
        self._dfield = field_name(client)
        delays = backoff_delays()
        need_setup, need_recover, failures = True, False, 0
        deferred: list[tuple[str, list[Any]]] = []
        try:
            while not self._stop.is_set():
                try:
                    if deferred:
                        await self._ack(client, deferred)
                        deferred = []
                    if need_setup:
                        await self._setup(client)
                        need_setup = False
                    if need_recover:
                        await self._recover(client)
                        need_recover = False
                    acks = await self._maintain(client, reader, handler, is_async, collect)
                    if collect is None and acks:
                        await self._ack(client, acks)  # claimed entries: do not hold them over a block
                        acks = []
                    if not collect:  # (when collecting, hand over what was claimed first)
                        found = await self._read(reader)
                        if found:
                            acks += await self._dispatch(client, found, handler, is_async, collect)
                    if collect is None:
                        await self._ack(client, acks)
                    else:
                        deferred = acks
                    if failures:
                        delays, failures = backoff_delays(), 0
                except (rexc.RedisError, OSError, TransientError) as exc:
                    reraise_if_cancelling()
                    kind = classify(exc)
                    if kind is ErrorKind.FATAL:
                        raise translate(exc, f"consumer {self.group}/{self.consumer}") from exc
                    failures += 1
                    if kind is ErrorKind.NOGROUP:
                        need_recover = True
                        if failures == 1:
                            continue
                    else:
                        self._reconnects += 1
                        for state in self._states.values():
                            state.cursor = "0"  # re-read our pending entries: some acks may be lost
                    delay = next(delays)
                    self._throttle.log(
                        logging.WARNING, "redis_retry", group=self.group, consumer=self.consumer,
                        kind=kind.value, error=f"{type(exc).__name__}: {exc}", delay_s=round(delay, 3),
                    )
                    await self._sleep(delay)
                    continue
                if collect:
                    yield None
        finally:
            self._running = False
            self._stop.clear()
            if self._owned:
                await self.aclose()

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()

    # ------------------------------------------------------------ keys and groups

    def _literal_keys(self) -> list[str]:
        return [p.redis_glob(self._prefix) for p in self._patterns if p.is_literal]

    async def _scan(self, client: Redis) -> list[str]:
        found: list[str] = []
        for pattern in self._patterns:
            if pattern.is_literal:
                continue
            async for raw in client.scan_iter(match=_scan_glob(pattern, self._prefix), count=1000, _type="stream"):
                key = id_str(raw)
                if pattern.matches(key[len(self._prefix) + 1 :]):
                    found.append(key)
        return found

    def _state(self, key: str, literal: bool) -> _KeyState:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _KeyState(key, literal)
            for name in state.names:
                self._by_name[name] = state
        state.literal = state.literal or literal
        return state

    async def _setup(self, client: Redis) -> None:
        """Find the streams, make sure the group exists on each, check for trimmed history.

        The first set-up also checks the server is one this SDK supports (:mod:`consumer_sdk.core.server`):
        :class:`ConfigError` otherwise, which ends :meth:`run`.
        """
        if not self._server_checked:
            await require_supported(client)
            self._server_checked = True
        keys = dict.fromkeys(self._literal_keys(), True)
        for key in await self._scan(client):
            keys.setdefault(key, False)
        for state in self._states.values():
            state.active = False
        states = [self._state(key, literal) for key, literal in keys.items()]
        await self._ensure_groups(client, states, None)
        self._next_rescan = self._next_claim = asyncio.get_running_loop().time()

    async def _group_start(self, client: Redis, key: str, bound: Bound | None) -> str:
        """The ID a new group starts after: ``$``, ``0``, or just before the first entry ``bound`` names."""
        if bound is None:
            return self._start_id
        if bound.kind == "open":
            return "0"
        first = await resolve_bound(client, key, bound)
        return "0" if first == "-" else fmt_id(id_before(id_tuple(first)))

    async def _ensure_groups(self, client: Redis, states: Sequence[_KeyState], start_id: str | None) -> None:
        """Create the group where it is missing: at ``start_id``, or where the consumer's start names."""
        if not states:
            return
        starts = [
            start_id if start_id is not None else await self._group_start(client, s.key, self._start_bound)
            for s in states
        ]
        async with client.pipeline(transaction=False) as pipe:
            for state, start in zip(states, starts, strict=True):
                pipe.xgroup_create(state.key, self.group, id=start, mkstream=state.literal)
            results = await pipe.execute(raise_on_error=False)
        existing: list[_KeyState] = []
        created: list[_KeyState] = []
        for state, result in zip(states, results, strict=True):
            if isinstance(result, Exception):
                text = str(result)
                if text.startswith("BUSYGROUP"):
                    existing.append(state)
                elif "requires the key to exist" in text:
                    state.active = False  # gone since it was found; a rescan will find it again
                    continue
                else:
                    raise result
            else:
                created.append(state)
            state.active = True
            state.cursor = "0"
        await self._check_group_positions(client, existing)
        bound = self._start_bound
        if start_id is None and bound is not None and bound.kind != "open" and created:
            await self._check_start(client, created, bound)

    async def _check_start(self, client: Redis, states: Sequence[_KeyState], bound: Bound) -> None:
        """Report streams where a start given as a time or seq lies in trimmed history."""
        async with client.pipeline(transaction=False) as pipe:
            for state in states:
                pipe.xinfo_stream(state.key)
            results = await pipe.execute(raise_on_error=False)
        for state, info in zip(states, results, strict=True):
            if isinstance(info, Exception):
                continue
            view = stream_view(info)
            if start_trimmed(bound, view):
                available = None if view.first_held is None else fmt_id(view.first_held)
                self._report_trimmed(state, bound.text, available, marker=("start", bound.text))

    async def _check_group_positions(self, client: Redis, states: Sequence[_KeyState]) -> None:
        """Report streams where the group's position lies before history the stream trimmed away."""
        if not states:
            return
        async with client.pipeline(transaction=False) as pipe:
            for state in states:
                pipe.xinfo_groups(state.key)
                pipe.xinfo_stream(state.key)
            results = await pipe.execute(raise_on_error=False)
        for i, state in enumerate(states):
            groups, stream = results[2 * i], results[2 * i + 1]
            if isinstance(groups, Exception) or isinstance(stream, Exception):
                continue
            mine = self._find_group(groups)
            if mine is None:
                continue
            view = stream_view(stream)
            position = id_tuple(mine.get("last-delivered-id") or "0-0")
            # Redis estimates the lag of a group whose read counter it lost (after XGROUP SETID) as if
            # it had read everything trimmed: only a lag from a known counter tells trimmed entries.
            lag = mine.get("lag") if mine.get("entries-read") is not None else None
            if not group_behind_trim(position, lag if isinstance(lag, int) else None, view):
                continue
            if view.first_held is not None and view.first_held > position:
                available: str | None = fmt_id(view.first_held)
            else:
                rows: Any = await client.xrange(state.key, "(" + fmt_id(position), "+", count=1)
                available = id_str(rows[0][0]) if rows else None
            self._report_trimmed(state, fmt_id(id_after(position)), available, marker=("group", position))

    def _find_group(self, groups: Any) -> dict[str, Any] | None:
        for g in groups:
            name = g.get("name")
            if name == self.group or name == self.group.encode():
                return dict(g)
        return None

    async def _recover(self, client: Redis) -> None:
        """After NOGROUP: create the group again at 0 wherever it is missing."""
        active = [s for s in self._states.values() if s.active]
        async with client.pipeline(transaction=False) as pipe:
            for state in active:
                pipe.xgroup_create(state.key, self.group, id="0", mkstream=state.literal)
            results = await pipe.execute(raise_on_error=False)
        for state, result in zip(active, results, strict=True):
            if isinstance(result, Exception):
                text = str(result)
                if text.startswith("BUSYGROUP"):
                    continue
                if "requires the key to exist" in text:
                    state.active = False
                    log_event(log, logging.WARNING, "stream_gone", key=state.key, group=self.group)
                    continue
                raise result
            self._nogroup += 1
            state.cursor = ">"  # a new group has nothing pending
            log_event(log, logging.WARNING, "group_recreated", key=state.key, group=self.group, start="0")

    async def _maintain(
        self,
        client: Redis,
        reader: Redis,
        handler: Handler,
        is_async: bool,
        collect: list[tuple[str, str, Tick]] | None,
    ) -> list[tuple[str, list[Any]]]:
        """Rescan globs and claim idle entries when they are due; returns the claimed entries' acks.

        ``reader`` is ``client`` as made by :func:`~consumer_sdk.core.redis.raw_stream_client`.
        """
        now = asyncio.get_running_loop().time()
        if now >= self._next_rescan:
            self._next_rescan = now + self._rescan_s
            if any(not p.is_literal for p in self._patterns):
                fresh = [key for key in await self._scan(client) if not self._states.get(key, _INACTIVE).active]
                if fresh:
                    log_event(log, logging.INFO, "streams_found", count=len(fresh), keys=fresh[:10])
                    await self._ensure_groups(client, [self._state(k, False) for k in fresh], "0")
        if self._claim_idle_ms is None or now < self._next_claim:
            return []
        self._next_claim = now + self._claim_idle_ms / 2000.0
        active = [s for s in self._states.values() if s.active]
        if not active:
            return []
        async with reader.pipeline(transaction=False) as pipe:
            for state in active:
                pipe.xautoclaim(state.key, self.group, self.consumer, self._claim_idle_ms, "0-0", count=self._count)
            results = await pipe.execute(raise_on_error=False)
        claimed: list[_Flat] = []
        for state, result in zip(active, results, strict=True):
            if isinstance(result, Exception):
                raise result
            if len(result) > 2 and result[2]:  # pending entries whose content was trimmed: dropped from the PEL
                first = id_str(result[2][0])
                self._report_trimmed(state, first, None, marker=("claim", first))
            if result[1]:
                self._claimed += len(result[1])
                claimed.append((state.key, *_flatten(result[1], self._dfield)))
            if id_str(result[0]) != "0-0":
                self._next_claim = now  # more to claim: go on next time round
        if not claimed:
            return []
        return await self._dispatch(client, claimed, handler, is_async, collect, claimed=True)

    # ------------------------------------------------------------ reading

    def _block(self) -> int:
        now = asyncio.get_running_loop().time()
        due = self._next_claim if self._claim_idle_ms is not None else float("inf")
        if any(not p.is_literal for p in self._patterns):
            due = min(due, self._next_rescan)
        if due == float("inf"):
            return self._block_ms
        return max(1, min(self._block_ms, int((due - now) * 1000)))

    async def _read(self, client: Redis) -> list[_Flat]:
        """One read over every active stream; ``client`` is a :func:`~consumer_sdk.core.redis.raw_stream_client`.

        What the streams hold already is read without ``BLOCK`` (a backlog comes as one large reply);
        only when there is nothing does the read block.
        """
        streams: dict[Any, Any] = {}
        draining: set[_KeyState] = set()
        for state in self._states.values():
            if state.active:
                streams[state.key] = state.cursor
                if state.cursor != ">":
                    draining.add(state)
        if not streams:
            await self._sleep(self._block() / 1000.0)
            return []
        if draining:
            found = await self._fetch(client, streams)
            for state in draining:
                state.cursor = ">"
            for rkey, ids, _values in found:
                state = self._by_name[rkey]
                if len(ids) >= self._count and state in draining:
                    state.cursor = ids[-1]  # a full page: there may be more pending
            return found
        if self._stop.is_set():
            return []
        found = await self._fetch(client, streams)
        if found or self._stop.is_set():
            return found
        read = self._fetch(client, streams, block=self._block())
        task: asyncio.Task[list[_Flat]] = asyncio.create_task(read)
        self._read_task = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._stop.is_set() and current is not None and not current.cancelling():
                return []
            raise
        finally:
            self._read_task = None

    async def _fetch(self, client: Redis, streams: dict[Any, Any], block: int | None = None) -> list[_Flat]:
        """One XREADGROUP, flattened; the reply is dropped before the garbage collector may run again.

        A read that does not block comes back at once, however large: the collector is paused for it.
        """
        if block is not None:
            reply = await client.xreadgroup(self.group, self.consumer, streams, count=self._count, block=block)
            return _flatten_reply(reply, self._dfield)
        with _collector_paused():
            reply = await client.xreadgroup(self.group, self.consumer, streams, count=self._count)
            found = _flatten_reply(reply, self._dfield)
            del reply
        return found

    async def _dispatch(
        self,
        client: Redis,
        streams: Sequence[_Flat],
        handler: Handler,
        is_async: bool,
        collect: list[tuple[str, str, Tick]] | None,
        *,
        claimed: bool = False,
    ) -> list[tuple[str, list[Any]]]:
        """Classify, check and hand over one read's entries; returns what to ack, per stream.

        When anything raises, what was handled before it is acked (best effort) and the error
        propagates; the tracker forgets what was not handed over.
        """
        acks: list[tuple[str, list[Any]]] = []
        try:
            for rkey, ids, values in streams:
                state = self._by_name.get(rkey)
                if state is None or not ids:
                    continue
                batch = _classify(state, ids, values, claimed)
                if batch.gaps:
                    try:
                        await self._check_holes(client, state, batch)
                    except BaseException:
                        _rollback(state, batch, 0)
                        raise
                try:
                    await self._deliver(state, batch, handler, is_async)
                finally:
                    acks.append((state.key, ids if batch.done == len(ids) else ids[: batch.done]))
                if collect is not None:
                    key = state.key
                    pairs = zip(batch.ids, batch.ticks, strict=True)
                    collect.extend((key, id_str(eid), tick) for eid, tick in pairs if tick is not None)
        except BaseException:
            with contextlib.suppress(rexc.RedisError, OSError):
                await self._ack(client, acks)
            raise
        return acks

    async def _check_holes(self, client: Redis, state: _KeyState, batch: _Batch) -> None:
        """Tell real gaps and trimmed history from holes another consumer of the group was given."""
        key = state.key
        async with client.pipeline(transaction=False) as pipe:
            for _index, before, after, _first, _last in batch.gaps:
                pipe.xrange(key, "(" + id_str(before), "(" + id_str(after), count=1)
            pipe.xinfo_stream(key)
            results = await pipe.execute(raise_on_error=False)
        info = results[-1]
        if isinstance(info, Exception) and "no such key" not in str(info).lower():
            raise info
        view = stream_view(None if isinstance(info, Exception) else info)
        reports: dict[int, tuple[int, int]] = {}
        for (index, before, after, first, last), rows in zip(batch.gaps, results, strict=False):
            if isinstance(rows, Exception):
                raise rows
            lo, hi = id_tuple(before), id_tuple(after)
            verdict = hole_verdict(bool(rows), lo, hi, view)
            if verdict == "shared":
                state.tracker.fill(first, last)
                continue
            if verdict == "trimmed":
                # told once, as trimmed history (here, or by the claim that found the deleted entry), never also as
                # a venue gap
                if not any(lo < d < hi for d in batch.deleted):
                    self._report_trimmed(
                        state, fmt_id(id_after(id_tuple(before))), id_str(after), marker=("hole", after)
                    )
                continue
            reports[index] = (first, last)
        batch.reports = reports

    def _report_trimmed(self, state: _KeyState, first_missing: str, available: str | None, *, marker: Any) -> None:
        if marker in state.trim_reported:
            return
        state.trim_reported.add(marker)
        self._trimmed += 1
        log_event(
            log, logging.WARNING, "trimmed", key=state.key, group=self.group,
            first_missing=first_missing, first_available=available,
        )
        if self._on_trimmed is None:
            raise TrimmedError(state.key, first_missing, available)
        self._on_trimmed(state.key, first_missing, available)

    async def _deliver(self, state: _KeyState, batch: _Batch, handler: Handler, is_async: bool) -> None:
        """Hand one stream's batch to the handler in order; ``batch.done`` tells how many to ack.

        Ticks in order between the odd entries go through a tight loop; the odd ones one at a time.
        """
        ticks = batch.ticks
        odd = batch.odd
        total = len(ticks)
        marks = sorted(odd) if odd else []
        marks.append(total)
        index = 0
        skipped = 0  # entries dealt with but not handed over
        try:
            for mark in marks:
                if index < mark:
                    run = ticks if index == 0 and mark == total else ticks[index:mark]
                    if is_async:
                        for tick in run:
                            await handler(tick)  # type: ignore[misc]
                            index += 1
                    else:
                        for tick in run:
                            result = handler(tick)
                            if result is not None and inspect.isawaitable(result):
                                await result
                            index += 1
                if index == total:
                    break
                kind, verdict, error = odd[index]
                if kind == _DELIVER:
                    tick = ticks[index]
                    if verdict is _GAP:
                        reports = batch.reports
                        if reports is not None and index in reports:
                            first, last = reports[index]
                            self._gaps += 1
                            self._gap_ticks += last - first + 1
                            if self._on_gap is not None:
                                self._on_gap(state.key, first, last)
                    elif verdict is _LATE:
                        self._late += 1
                    if is_async:
                        await handler(tick)  # type: ignore[misc]
                    else:
                        result = handler(tick)
                        if result is not None and inspect.isawaitable(result):
                            await result
                    if verdict is _LATE:
                        seq = tick["seq"]
                        state.tracker.fill(seq, seq)
                    index += 1
                    continue
                # Not handed over, acked even when reporting it raises.
                eid = batch.ids[index]
                index += 1
                skipped += 1
                if kind == _DUPLICATE:
                    self._duplicates += 1
                elif kind == _INVALID:
                    assert error is not None
                    self._invalid += 1
                    if self._on_invalid is not None:
                        self._on_invalid(state.key, id_str(eid), error)
                    else:
                        self._throttle.log(
                            logging.WARNING, "invalid_tick", key=state.key, id=id_str(eid), error=str(error)
                        )
                else:  # _DELETED
                    available = id_str(batch.ids[index]) if index < total else None
                    self._report_trimmed(state, id_str(eid), available, marker=("pending", eid))
        except BaseException:
            _rollback(state, batch, index)
            raise
        finally:
            batch.done = index
            self._delivered += index - skipped

    async def _ack(self, client: Redis, acks: list[tuple[str, list[Any]]]) -> None:
        todo = [(key, ids) for key, ids in acks if ids]
        if todo:
            self._acked += await xack_many(client, self.group, todo)


_INACTIVE: Final = _KeyState("", False)
