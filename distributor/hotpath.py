"""The in-process hot path: lock-free fan-out of ticks to co-located subscribers.

The model is the LMAX Disruptor's, on one event loop thread:

- One ring of ``capacity`` slots (a power of two), preallocated, with two parallel
  preallocated lists: the stream id of each slot's tick and the publish stamp of its batch.
  One writer (the distributor task) calls :meth:`HotPath.publish` with a batch; it copies
  the batch into the ring with slice assignments, bumps one per-stream counter per tick
  and advances one monotonically increasing cursor.  Its cost per tick does not depend on
  the number of subscribers; per batch it touches only the subscribers that are asleep or
  whose policy needs the publisher (``block``, ``drop_newest``, ``disconnect``).
- Each subscriber has its own read cursor and its own task.  The task sleeps on a future
  that the publisher resolves only when the subscriber is asleep and the batch holds a
  tick it wants; awake, it takes everything available in chunks of at most ``max_chunk``
  slots and calls its handler per tick (a plain call, or an ``await`` for a coroutine
  function: decided once, at :meth:`HotPath.subscribe`).  A sleeping subscriber that wants
  nothing in a batch is moved past it by the publisher without being woken.
- Routing: the match decision of every (subscriber, stream) pair is computed once, when the
  stream or the subscriber first appears, and kept in a list indexed by stream id, so a tick
  costs each subscriber one list lookup.

No locks: every piece of state has one owner.  The publisher owns the ring, the cursor, the
stream table and the per-stream counters; a subscriber task owns its cursor and counters
(the publisher moves the cursor only while the subscriber sleeps caught up, or hands it a
``drop_newest`` hold).  All of it runs on one thread, so a read never sees a half-written
value; the metrics exporter thread only reads integers.

Exact accounting, for every subscriber at every moment::

    matched = delivered + dropped + pending

``matched`` is the number of published ticks matching it since it subscribed: the sum of
the publisher's per-stream counters over its matching streams, less the same sum taken when
it subscribed.  A lapped ``drop_oldest`` subscriber moves its cursor to ``head - max_lag``
and counts ``missed = matched(head) - (delivered + dropped) - matched_in(head - max_lag, head)``,
the last term counted over the ring's stream-id list at C speed; nothing per tick is kept
for this, and the subscribers that keep up pay nothing for it.

Latency: ``HotPath.latency`` (a :class:`~consumer_sdk.latency.LatencyHistogram`, µs) counts, for
every delivery to every subscriber, the time from the publish stamp of the tick's batch (one
``perf_counter_ns`` read per batch, kept in the stamps list) to the moment its handler call has
returned.  A synchronous subscriber's delivery loop walks its chunk one publish batch at a time (the
ring slots of a batch share a stamp; ``bisect`` finds where the batch ends) and reads the clock once
per batch, after the handler has taken every tick of it: each tick is counted with the latency of
the last one of its batch, an upper bound, and the bookkeeping costs one clock read per batch and
subscriber instead of one per delivery.  ``sample_every=N`` times one chunk in N of each subscriber
(chosen by position, every tick of a timed chunk counted; the ingestor uses 4), ``0`` none.  Held-back
chunks and asynchronous subscribers are timed per delivery whenever ``sample_every`` is not 0.

Publishing with a ``block`` subscriber::

    if not hot.publish(batch):
        await hot.wait_room()

``publish`` never awaits.  It puts as much of the batch into the ring as every ``block``
subscriber has room for and returns True when all of it went in.  Otherwise it keeps the rest
(a reference, not a copy) and returns False; ``wait_room`` then publishes that rest as the
``block`` subscribers make room and returns once all of it is in the ring.  Calling
``publish`` again before that raises ``RuntimeError``.  Without ``block`` subscribers,
``publish`` always returns True.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import compress
from operator import itemgetter
from typing import Final, cast

from consumer_sdk._log import Throttle, get_logger, log_event
from consumer_sdk.consumer import Handler
from consumer_sdk.errors import ConfigError
from consumer_sdk.keys import Pattern, StreamName
from consumer_sdk.latency import LatencyHistogram, bucket_of, check_sample_every
from consumer_sdk.tick import Tick
from distributor.registry import parse_stream

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_MAX_CHUNK",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_MAX_SUBSCRIBERS",
    "HOT_SAMPLE_EVERY",
    "Handler",
    "HotPath",
    "HotPathStats",
    "SubscriberPolicy",
    "Subscription",
    "SubscriptionStats",
]

DEFAULT_CAPACITY: Final = 65536
DEFAULT_MAX_CHUNK: Final = 256
#: the ingestor times one chunk in this many of each subscriber (a chunk is timed as a whole, so it needs
#: fewer samples than the per-tick stages; see the module doc)
HOT_SAMPLE_EVERY: Final = 4
DEFAULT_MAX_STREAMS: Final = 65536
DEFAULT_MAX_SUBSCRIBERS: Final = 1024

log = get_logger("hotpath")

_LUT_SIZE: Final = 1 << 14  # µs: below 16 ms a delivery's latency bucket is a list lookup
_LUT: Final = [bucket_of(us) for us in range(_LUT_SIZE)]
_VACANT: Final = cast(Tick, {})
_stream_key: Final = itemgetter("venue", "symbol", "channel")
StreamIdent = tuple[str, str, str]


class SubscriberPolicy(StrEnum):
    """What happens to a subscriber that falls more than ``max_lag`` published ticks behind."""

    DROP_OLDEST = "drop_oldest"  # it skips to the newest max_lag ticks; on_drop(count) says how many it missed
    DROP_NEWEST = "drop_newest"  # it keeps the max_lag ticks it had and loses what comes until it has read them
    BLOCK = "block"  # the publisher waits for it (publish() returns False, wait_room())
    DISCONNECT = "disconnect"  # it is removed, with a reason

    @classmethod
    def parse(cls, text: str | SubscriberPolicy) -> SubscriberPolicy:
        if isinstance(text, SubscriberPolicy):
            return text
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(
                f"unknown subscriber policy {text!r}: expected one of {', '.join(p.value for p in cls)}"
            ) from None


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """One subscriber's counters.  ``matched == delivered + dropped + pending`` always holds."""

    name: str
    policy: SubscriberPolicy
    patterns: tuple[str, ...]
    matched: int  # published ticks matching its patterns since it subscribed (until it was removed)
    delivered: int  # handler calls, including those that raised
    dropped: int  # matching ticks it will never get (skipped, lost while over its limit, pending at removal)
    pending: int  # matching ticks published and neither delivered nor (yet) counted as dropped
    errors: int  # handler calls that raised
    drop_events: int  # times it was told of a drop (on_drop calls)
    lag: int  # published ticks, of every stream, between the head and its cursor
    removed: str | None  # why it was removed, None while subscribed


@dataclass(frozen=True, slots=True)
class HotPathStats:
    published: int
    capacity: int
    streams: int
    subscribers: int
    delivered: int  # over every subscriber, removed ones included
    dropped: int
    errors: int
    dropped_by_policy: dict[str, int]
    disconnected: int  # subscribers removed by the disconnect policy
    removed: int  # subscribers removed for any reason
    blocked: int  # publish() calls that returned False
    waiting_room: bool  # a publish is waiting for a block subscriber now
    max_lag: int  # the largest lag of a current subscriber


def _is_async(handler: Handler) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    return inspect.iscoroutinefunction(type(handler).__call__)  # an object with an async __call__


def _default_name(handler: Handler, serial: int) -> str:
    base = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return f"{base}#{serial}"


class Subscription:
    """A co-located subscriber: made by :meth:`HotPath.subscribe`, served by one task."""

    __slots__ = (
        "_async",
        "_base",
        "_blocking",
        "_final",
        "_hold",
        "_hot",
        "_last_fail",
        "_match",
        "_on_drop",
        "_running",
        "_sids",
        "_sidset",
        "_streak",
        "_throttle",
        "_waiter",
        "_wants_all",
        "cursor",
        "delivered",
        "drop_events",
        "dropped",
        "errors",
        "handler",
        "max_consecutive_failures",
        "max_lag",
        "name",
        "patterns",
        "policy",
        "removed",
    )

    def __init__(
        self,
        hot: HotPath,
        handler: Handler,
        patterns: tuple[Pattern, ...],
        policy: SubscriberPolicy,
        max_lag: int,
        name: str,
        max_consecutive_failures: int | None,
        on_drop: Callable[[int], None] | None,
    ) -> None:
        self._hot = hot
        self.handler = handler
        self.patterns = patterns
        self.policy = policy
        self.max_lag = max_lag
        self.name = name
        self.max_consecutive_failures = max_consecutive_failures
        self._on_drop = on_drop
        self._async = _is_async(handler)
        self._blocking = policy is SubscriberPolicy.BLOCK
        # Routing, written by the publisher when a stream first appears: 1/0 per stream id,
        # the ids it matches (list and set), and whether it matches every stream known so far.
        self._match: list[int] = []
        self._sids: list[int] = []
        self._sidset: set[int] = set()
        self._wants_all = True
        self._base = 0
        self._final: int | None = None
        self._hold: tuple[list[Tick], list[int], list[int]] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._running = False
        self._streak = 0
        self._last_fail = -2
        self._throttle = Throttle(log)
        self.cursor = 0
        self.delivered = 0
        self.dropped = 0
        self.errors = 0
        self.drop_events = 0
        self.removed: str | None = None

    def wants(self, name: StreamName) -> bool:
        text = str(name)
        return any(p.matches(text) for p in self.patterns)

    def close(self, reason: str = "unsubscribed") -> None:
        """Unsubscribe (same as :meth:`HotPath.unsubscribe`)."""
        self._hot.unsubscribe(self, reason)

    def stats(self) -> SubscriptionStats:
        return self._hot._sub_stats(self)

    def __repr__(self) -> str:
        return f"Subscription({self.name!r}, {self.policy.value}, {[p.text for p in self.patterns]})"


class _StreamTable(dict[StreamIdent, int]):
    """Stream ident -> stream id; a new ident is registered on first sight (``__missing__``)."""

    __slots__ = ("_register",)

    def __init__(self, register: Callable[[StreamIdent], int]) -> None:
        super().__init__()
        self._register = register

    def __missing__(self, key: StreamIdent) -> int:
        sid = self._register(key)
        self[key] = sid
        return sid


class HotPath:
    """Single-writer ring fan-out of ticks to co-located subscribers (see the module doc)."""

    def __init__(
        self,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_subscribers: int = DEFAULT_MAX_SUBSCRIBERS,
        clock: Callable[[], int] = time.perf_counter_ns,
        sample_every: int = 1,
    ) -> None:
        if capacity < 2 or capacity & (capacity - 1):
            raise ConfigError(f"hot path capacity must be a power of two >= 2, got {capacity}")
        if max_chunk < 1:
            raise ConfigError(f"hot path max_chunk must be at least 1, got {max_chunk}")
        if max_streams < 1 or max_subscribers < 1:
            raise ConfigError(
                f"hot path max_streams and max_subscribers must be at least 1, got {max_streams}, {max_subscribers}"
            )
        self.capacity = capacity
        self.max_chunk = max_chunk
        self.max_streams = max_streams
        self.max_subscribers = max_subscribers
        self._mask = capacity - 1
        self._segment = capacity // 2  # largest write between two limit checks (see _write)
        self._clock = clock
        #: a synchronous subscriber's deliveries are timed into ``latency`` one chunk in this many (0: never)
        self.sample_every = check_sample_every(sample_every)
        self._ring: list[Tick] = [_VACANT] * capacity
        self._ring_sids: list[int] = [0] * capacity
        self._stamps: list[int] = [0] * capacity
        self._cursor = 0
        self._table = _StreamTable(self._register_stream)
        self._sid_of = self._table.__getitem__
        self._names: list[StreamName] = []
        self._counts: list[int] = []  # ticks published per stream id
        self._subs: list[Subscription] = []
        self._blockers: list[Subscription] = []
        #: while True, ``block`` subscribers are lapped like ``drop_oldest`` ones (see :meth:`set_shed`)
        self.shed = False
        self._watched: list[Subscription] = []  # drop_newest and disconnect: checked by the publisher
        self._sleepers: list[Subscription] = []
        self._retiring: list[Subscription] = []  # removed, their task not yet ended
        self._backlog: list[Tick] | None = None
        self._room_waiter: asyncio.Future[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._closed = False
        self._serial = 0
        self._gone_delivered = 0
        self._gone_errors = 0
        self._dropped_gone: Counter[str] = Counter()
        self.disconnected = 0
        self.removed = 0
        self.blocked = 0
        self.latency = LatencyHistogram()  # publish stamp -> handler call, µs, every subscriber

    # -- subscribers ------------------------------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    @property
    def published(self) -> int:
        return self._cursor

    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subs)

    def subscribe(
        self,
        handler: Handler,
        patterns: str | Pattern | Iterable[str | Pattern],
        *,
        policy: SubscriberPolicy | str = SubscriberPolicy.DROP_OLDEST,
        max_lag: int | None = None,
        name: str | None = None,
        max_consecutive_failures: int | None = None,
        on_drop: Callable[[int], None] | None = None,
    ) -> Subscription:
        """Attach ``handler`` to the streams matching ``patterns``; it gets the ticks published from now on.

        ``max_lag`` (default ``capacity // 4``, at most ``capacity // 2``) is how many published ticks,
        of every stream, it may be behind before its ``policy`` acts.  ``max_consecutive_failures``: remove
        it after that many handler calls in a row raised (None: never).  ``on_drop(count)`` is called from
        its task each time it learns it lost ``count`` ticks.  Its task is started in the task group given
        to :meth:`start`, if any; otherwise run :meth:`run_subscriber` yourself.
        """
        if self._closed:
            raise RuntimeError("the hot path is closed")
        if not callable(handler):
            raise ConfigError(f"subscriber handler must be callable, got {handler!r}")
        if len(self._subs) >= self.max_subscribers:
            raise ConfigError(f"the hot path already has its maximum of {self.max_subscribers} subscribers")
        pats = _parse_patterns(patterns)
        pol = SubscriberPolicy.parse(policy)
        limit = self.capacity // 4 if max_lag is None else max_lag
        if not 1 <= limit <= self.capacity // 2:
            raise ConfigError(f"max_lag must be between 1 and {self.capacity // 2} (capacity / 2), got {limit}")
        if max_consecutive_failures is not None and max_consecutive_failures < 1:
            raise ConfigError(f"max_consecutive_failures must be at least 1 or None, got {max_consecutive_failures}")
        if on_drop is not None and not callable(on_drop):
            raise ConfigError(f"on_drop must be callable, got {on_drop!r}")
        self._serial += 1
        sub = Subscription(
            self, handler, pats, pol, limit, name or _default_name(handler, self._serial),
            max_consecutive_failures, on_drop,
        )
        counts = self._counts
        for sid, stream in enumerate(self._names):
            self._add_route(sub, sid, stream)
        sub._base = sum(map(counts.__getitem__, sub._sids))
        sub.cursor = self._cursor
        self._subs.append(sub)
        if pol is SubscriberPolicy.BLOCK:
            self._blockers.append(sub)
        elif pol is not SubscriberPolicy.DROP_OLDEST:
            self._watched.append(sub)
        if self._tg is not None:
            self._tg.create_task(self.run_subscriber(sub), name=f"hotpath-subscriber-{sub.name}")
        return sub

    def unsubscribe(self, sub: Subscription, reason: str = "unsubscribed") -> None:
        """Remove ``sub`` now (idempotent).  Its pending ticks count as dropped; its task returns."""
        if sub._hot is not self:
            raise ConfigError(f"{sub!r} belongs to another hot path")
        if sub.removed is None:
            self._remove(sub, reason)

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Run one task per subscriber in ``tg``: for those already subscribed and for every later one.

        The task group owns the tasks.  A subscriber's task returns when it is removed; :meth:`close`
        removes every subscriber, so the group can then finish.  Cancelling the group cancels them.
        """
        if self._closed:
            raise RuntimeError("the hot path is closed")
        self._tg = tg
        for sub in self._subs:
            if not sub._running:
                tg.create_task(self.run_subscriber(sub), name=f"hotpath-subscriber-{sub.name}")

    def close(self) -> None:
        """Remove every subscriber, drop a batch waiting for room, refuse further use."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            self._remove(sub, "hot path closed")
        self._backlog = None
        self._wake_publisher()
        self._tg = None

    # -- the publisher ----------------------------------------------------------------------------------------

    def publish(self, batch: Sequence[Tick]) -> bool:
        """Put a batch into the ring (see the module doc for the ``block`` protocol).

        True: every tick is in the ring.  False: a ``block`` subscriber has no room for the rest yet;
        ``await wait_room()`` before the next publish.
        """
        if self._backlog is not None:
            raise RuntimeError("publish() called while a batch waits for room: await wait_room() first")
        if self._closed:
            raise RuntimeError("the hot path is closed")
        if not batch:
            return True
        if self._blockers and not self.shed:
            room = self._room()
            if room < len(batch):
                items = batch if type(batch) is list else list(batch)
                if room > 0:
                    self._write(items[:room])
                self._backlog = items[room:] if room > 0 else items
                self.blocked += 1
                return False
        self._write(batch)
        return True

    async def wait_room(self) -> None:
        """Publish what :meth:`publish` kept back, waiting for ``block`` subscribers to make room.

        Returns at once when nothing is kept back.  If cancelled, what remains stays kept back
        and a later ``wait_room`` carries on.  Wrap it in ``asyncio.timeout`` to bound it.
        """
        loop = asyncio.get_running_loop()
        while self._backlog is not None:
            items = self._backlog
            room = self._room() if self._blockers and not self.shed else len(items)
            if room >= len(items):
                self._backlog = None
                self._write(items)
                return
            if room > 0:
                self._backlog = items[room:]
                self._write(items[:room])
                continue
            waiter = loop.create_future()
            self._room_waiter = waiter
            try:
                await waiter
            finally:
                self._room_waiter = None

    def set_shed(self, on: bool) -> None:
        """Shedding (the ``shed`` degrade level): ``block`` subscribers stop holding the publisher back and
        are treated as ``drop_oldest``: a slow one skips ahead and is told exactly what it missed."""
        if on == self.shed:
            return
        self.shed = on
        if on and self._room_waiter is not None:
            self._wake_publisher()

    def _room(self) -> int:
        return min(b.cursor + b.max_lag for b in self._blockers) - self._cursor

    def _wake_publisher(self) -> None:
        waiter = self._room_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _write(self, items: Sequence[Tick]) -> None:
        n = len(items)
        # Stream ids first: a tick lacking venue/symbol/channel raises here, before anything changes.
        sids = list(map(self._sid_of, map(_stream_key, items)))
        stamp = self._clock()
        ring, ring_sids, stamps, counts = self._ring, self._ring_sids, self._stamps, self._counts
        cap = self.capacity
        off = 0
        while off < n:
            pos = self._cursor
            a = pos & self._mask
            k = min(n - off, cap - a, self._segment)
            b = a + k
            if k == n:
                seg_sids = sids
                ring[a:b] = items
            else:
                if type(items) is not list:
                    items = list(items)  # to cut it: a deque has no slices
                seg_sids = sids[off:off + k]
                ring[a:b] = items[off:off + k]
            ring_sids[a:b] = seg_sids
            stamps[a:b] = [stamp] * k
            for sid in seg_sids:
                counts[sid] += 1
            self._cursor = pos + k
            off += k
            if self._sleepers:
                self._wake(seg_sids)
            if self._watched:
                self._check_limits()

    def _wake(self, seg_sids: list[int]) -> None:
        """Wake the sleepers that want something in this segment; move the others past it."""
        head = self._cursor
        present: set[int] | None = None
        still: list[Subscription] = []
        for sub in self._sleepers:
            waiter = sub._waiter
            if waiter is None:  # pragma: no cover - removed from the list whenever its waiter is dropped
                continue
            if not sub._wants_all:
                if present is None:
                    present = set(seg_sids)
                if sub._sidset.isdisjoint(present):
                    sub.cursor = head  # asleep and caught up: nothing here for it
                    still.append(sub)
                    continue
            sub._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        self._sleepers = still

    def _check_limits(self) -> None:
        head = self._cursor
        for sub in list(self._watched):
            if sub._hold is not None:
                continue
            lag = head - sub.cursor
            if lag <= sub.max_lag:
                continue
            if sub.policy is SubscriberPolicy.DISCONNECT:
                self.disconnected += 1
                self._remove(sub, f"fell {lag} ticks behind, over its max_lag of {sub.max_lag} (disconnect policy)",
                             logging.WARNING)
            else:
                self._make_hold(sub)

    def _make_hold(self, sub: Subscription) -> None:
        """drop_newest: keep its next max_lag slots (the ticks it wants among them) aside for it."""
        start = sub.cursor
        stop = start + sub.max_lag
        ticks: list[Tick] = []
        sids: list[int] = []
        stamps: list[int] = []
        want = sub._match.__getitem__
        for a, b in self._spans(start, stop):
            seg_sids = self._ring_sids[a:b]
            keep = list(map(want, seg_sids))
            ticks += compress(self._ring[a:b], keep)
            sids += compress(seg_sids, keep)
            stamps += compress(self._stamps[a:b], keep)
        sub._hold = (ticks, sids, stamps)
        sub.cursor = stop
        self._wake_one(sub)

    def _wake_one(self, sub: Subscription) -> None:
        waiter = sub._waiter
        if waiter is not None:
            sub._waiter = None
            self._sleepers.remove(sub)
            if not waiter.done():
                waiter.set_result(None)

    def _spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Ring index ranges covering positions [start, stop) (stop - start <= capacity)."""
        if stop <= start:
            return []
        a = start & self._mask
        b = a + (stop - start)
        if b <= self.capacity:
            return [(a, b)]
        return [(a, self.capacity), (0, b - self.capacity)]

    # -- streams and routing ----------------------------------------------------------------------------------

    def _register_stream(self, key: StreamIdent) -> int:
        if len(self._names) >= self.max_streams:
            raise ConfigError(f"more than {self.max_streams} distinct streams reached the hot path")
        sid = len(self._names)
        stream = StreamName(*key)
        self._names.append(stream)
        self._counts.append(0)
        for sub in self._subs:
            self._add_route(sub, sid, stream)
        return sid

    @staticmethod
    def _add_route(sub: Subscription, sid: int, stream: StreamName) -> None:
        if sub.wants(stream):
            sub._match.append(1)
            sub._sids.append(sid)
            sub._sidset.add(sid)
        else:
            sub._match.append(0)
            sub._wants_all = False

    def declare(self, streams: Iterable[StreamName | str]) -> None:
        """Register streams before their first tick (e.g. the configured ones, at start), so the routing
        decisions for them are made now rather than in the publish that first carries them."""
        for stream in streams:
            name = parse_stream(stream)
            self._sid_of((name.venue, name.symbol, name.channel))

    def published_by_stream(self) -> dict[StreamName, int]:
        counts = self._counts
        return {name: counts[sid] for sid, name in enumerate(self._names)}

    def _matched(self, sub: Subscription) -> int:
        if sub._final is not None:
            return sub._final
        counts = self._counts
        return sum(map(counts.__getitem__, sub._sids)) - sub._base

    # -- removal ----------------------------------------------------------------------------------------------

    def _remove(self, sub: Subscription, reason: str, level: int = logging.INFO) -> None:
        sub._final = self._matched(sub)
        sub.removed = reason
        # Stop a chunk in progress (a handler that unsubscribes its own subscriber): the delivery
        # loops read the routing list per tick, so an all-zero list ends their deliveries.
        sub._match[:] = [0] * len(sub._match)
        sub._hold = None
        self._subs.remove(sub)
        if sub in self._blockers:
            self._blockers.remove(sub)
            self._wake_publisher()
        if sub in self._watched:
            self._watched.remove(sub)
        self._wake_one(sub)
        if sub._running:
            self._retiring.append(sub)  # its task folds its counters in when it ends
        else:
            self._retire(sub)
        self.removed += 1
        log_event(log, level, "subscriber_removed", subscriber=sub.name, policy=sub.policy.value, reason=reason)

    def _retire(self, sub: Subscription) -> None:
        """Fold a removed subscriber's final counters into the hot path's totals (once, when its task ends)."""
        self._gone_delivered += sub.delivered
        self._gone_errors += sub.errors
        self._dropped_gone[sub.policy.value] += self._sub_stats(sub).dropped

    # -- a subscriber's task ----------------------------------------------------------------------------------

    async def run_subscriber(self, sub: Subscription) -> None:
        """Serve ``sub`` until it is removed.  Handler errors never escape; cancellation does.

        If this task ends for any other reason than the subscriber's removal (cancellation),
        the subscriber is removed too, so no subscriber is left without a task.
        """
        if sub._hot is not self:
            raise ConfigError(f"{sub!r} belongs to another hot path")
        if sub._running:
            raise RuntimeError(f"{sub!r} already has a task")
        sub._running = True
        try:
            if sub._async:
                await self._serve_async(sub)
            else:
                await self._serve_sync(sub)
        finally:
            sub._running = False
            if sub.removed is None:
                self._remove(sub, "subscriber task ended", logging.WARNING)
            elif sub in self._retiring:
                self._retiring.remove(sub)
                self._retire(sub)

    async def _sleep(self, sub: Subscription, loop: asyncio.AbstractEventLoop) -> None:
        waiter = loop.create_future()
        sub._waiter = waiter
        self._sleepers.append(sub)
        try:
            await waiter
        finally:
            if sub._waiter is waiter:  # cancelled while asleep
                sub._waiter = None
                self._sleepers.remove(sub)

    def _take(self, sub: Subscription) -> tuple[int, int] | None:
        """The next ring range [a, b) for ``sub``, after applying drop_oldest; None when caught up."""
        head = self._cursor
        c = sub.cursor
        if c == head:
            return None
        if head - c > sub.max_lag:  # only drop_oldest gets here: the publisher enforces the others
            c = self._skip(sub, c, head)
        a = c & self._mask
        k = min(head - c, self.max_chunk, self.capacity - a)
        sub.cursor = c + k
        if sub._blocking and self._room_waiter is not None:
            self._wake_publisher()
        return a, a + k

    def _skip(self, sub: Subscription, c: int, head: int) -> int:
        """drop_oldest: jump to the newest max_lag ticks and count exactly what was skipped."""
        new_c = head - sub.max_lag
        if sub._wants_all:
            kept = head - new_c
        else:
            want = sub._match.__getitem__
            kept = sum(sum(map(want, self._ring_sids[a:b])) for a, b in self._spans(new_c, head))
        missed = self._matched(sub) - sub.delivered - sub.dropped - kept
        sub.cursor = new_c
        if missed > 0:
            self._report_drop(sub, missed)
        return new_c

    def _finish_hold(self, sub: Subscription) -> None:
        """drop_newest: its hold is read; resume at the head and count what came meanwhile."""
        sub._hold = None
        sub.cursor = self._cursor
        missed = self._matched(sub) - sub.delivered - sub.dropped
        if missed > 0:
            self._report_drop(sub, missed)

    def _report_drop(self, sub: Subscription, missed: int) -> None:
        sub.dropped += missed
        sub.drop_events += 1
        if sub._on_drop is not None:
            try:
                sub._on_drop(missed)
            except Exception as exc:  # the subscriber's own callback must not stop its task
                sub._throttle.log(logging.ERROR, "subscriber_on_drop_failed", subscriber=sub.name,
                                  error=repr(exc)[:200])

    def _failed(self, sub: Subscription, tick: Tick, exc: Exception, index: int) -> None:
        """A handler call raised: count it, log it (rate-limited), remove after too many in a row."""
        sub.errors += 1
        sub._streak = sub._streak + 1 if sub._last_fail == index - 1 else 1
        sub._last_fail = index
        sub._throttle.log(
            logging.ERROR, "subscriber_handler_failed", subscriber=sub.name,
            key=f"{tick.get('venue')}:{tick.get('symbol')}:{tick.get('channel')}", seq=tick.get("seq"),
            error=repr(exc)[:200], consecutive=sub._streak,
        )
        limit = sub.max_consecutive_failures
        if limit is not None and sub._streak >= limit and sub.removed is None:
            self._remove(sub, f"{sub._streak} consecutive handler failures, last: {repr(exc)[:200]}", logging.ERROR)

    async def _serve_sync(self, sub: Subscription) -> None:
        loop = asyncio.get_running_loop()
        ring, ring_sids, stamps = self._ring, self._ring_sids, self._stamps
        match = sub._match
        handler = cast(Callable[[Tick], object], sub.handler)
        clock = self._clock
        hist = self.latency
        buckets = hist.counts
        lut = _LUT
        every = countdown = self.sample_every
        while sub.removed is None:
            if sub._hold is not None:
                ticks, sids, tstamps = sub._hold
                for i in range(0, len(ticks), self.max_chunk):
                    j = i + self.max_chunk
                    self._deliver_sync(sub, ticks[i:j], sids[i:j], tstamps[i:j])
                    await asyncio.sleep(0)
                    if sub.removed is not None:
                        return
                self._finish_hold(sub)
                continue
            span = self._take(sub)
            if span is None:  # caught up: sleep until the publisher has something for it
                await self._sleep(sub, loop)
                continue
            a, b = span
            # The hot loop: nothing else runs until it ends (plain calls, no await), so it reads the ring in
            # place.  One chunk in sample_every is timed: it is walked one publish batch (one stamp) at a
            # time, with one clock read per batch after its deliveries (LatencyHistogram.observe inlined,
            # with a weight); an untimed chunk is walked as one run.
            if every:
                countdown -= 1
            timed = every and not countdown
            if timed:
                countdown = every
            n = 0
            failed = self._failed
            base = sub.delivered
            total = 0
            top = hist.max_us
            i = a
            while i < b:
                stamp = stamps[i]
                j = b if not timed or stamps[b - 1] == stamp else bisect_right(stamps, stamp, i, b)
                m = n
                for k in range(i, j):
                    if match[ring_sids[k]]:
                        n += 1
                        try:
                            handler(ring[k])
                        except Exception as exc:
                            failed(sub, ring[k], exc, base + n)
                i = j
                m = n - m
                if timed and m:
                    us = (clock() - stamp) // 1000
                    buckets[lut[us] if 0 <= us < _LUT_SIZE else bucket_of(max(us, 0))] += m
                    total += us * m
                    if us > top:
                        top = us
            if timed:
                hist.sum_us += total
                hist.max_us = top
            sub.delivered += n
            if sub.cursor != self._cursor:
                await asyncio.sleep(0)  # more to read: let the others have their turn first

    def _deliver_sync(self, sub: Subscription, ticks: list[Tick], sids: list[int], tstamps: list[int]) -> None:
        match = sub._match
        handler = cast(Callable[[Tick], object], sub.handler)
        clock = self._clock
        observe = self.latency.observe
        timed = self.sample_every > 0
        for i, tick in enumerate(ticks):
            if match[sids[i]]:
                if timed:
                    observe((clock() - tstamps[i]) // 1000)
                sub.delivered += 1
                try:
                    handler(tick)
                except Exception as exc:
                    self._failed(sub, tick, exc, sub.delivered)

    async def _serve_async(self, sub: Subscription) -> None:
        loop = asyncio.get_running_loop()
        while sub.removed is None:
            if sub._hold is not None:
                ticks, sids, tstamps = sub._hold
                for i in range(0, len(ticks), self.max_chunk):
                    j = i + self.max_chunk
                    await self._deliver_async(sub, ticks[i:j], sids[i:j], tstamps[i:j])
                    if sub.removed is not None:
                        return
                self._finish_hold(sub)
                continue
            span = self._take(sub)
            if span is None:
                await self._sleep(sub, loop)
                continue
            a, b = span
            # Copies: the publisher runs while the handler awaits and may overwrite these slots.
            await self._deliver_async(sub, self._ring[a:b], self._ring_sids[a:b], self._stamps[a:b])

    async def _deliver_async(self, sub: Subscription, ticks: list[Tick], sids: list[int], tstamps: list[int]) -> None:
        match = sub._match
        handler = cast(Callable[[Tick], Awaitable[object]], sub.handler)
        clock = self._clock
        observe = self.latency.observe
        timed = self.sample_every > 0
        for i, tick in enumerate(ticks):
            if match[sids[i]]:
                if timed:
                    observe((clock() - tstamps[i]) // 1000)
                sub.delivered += 1
                try:
                    await handler(tick)
                except Exception as exc:
                    self._failed(sub, tick, exc, sub.delivered)
                if sub.removed is not None:
                    return
        await asyncio.sleep(0)

    # -- statistics -------------------------------------------------------------------------------------------

    def _sub_stats(self, sub: Subscription) -> SubscriptionStats:
        matched = self._matched(sub)
        if sub.removed is None:
            dropped = sub.dropped
            pending = matched - sub.delivered - dropped
            lag = self._cursor - sub.cursor
        else:
            dropped = matched - sub.delivered
            pending = 0
            lag = 0
        return SubscriptionStats(
            name=sub.name, policy=sub.policy, patterns=tuple(p.text for p in sub.patterns), matched=matched,
            delivered=sub.delivered, dropped=dropped, pending=pending, errors=sub.errors,
            drop_events=sub.drop_events, lag=lag, removed=sub.removed,
        )

    def stats(self) -> HotPathStats:
        by_policy = Counter(self._dropped_gone)
        delivered = self._gone_delivered
        errors = self._gone_errors
        max_lag = 0
        for sub in (*self._subs, *self._retiring):
            st = self._sub_stats(sub)
            by_policy[sub.policy.value] += st.dropped
            delivered += st.delivered
            errors += st.errors
            max_lag = max(max_lag, st.lag)
        return HotPathStats(
            published=self._cursor, capacity=self.capacity, streams=len(self._names), subscribers=len(self._subs),
            delivered=delivered, dropped=sum(by_policy.values()), errors=errors,
            dropped_by_policy={p.value: by_policy[p.value] for p in SubscriberPolicy},
            disconnected=self.disconnected, removed=self.removed, blocked=self.blocked,
            waiting_room=self._backlog is not None, max_lag=max_lag,
        )


def _parse_patterns(patterns: str | Pattern | Iterable[str | Pattern]) -> tuple[Pattern, ...]:
    if isinstance(patterns, str | Pattern):
        patterns = (patterns,)
    out: list[Pattern] = []
    for p in patterns:
        if isinstance(p, Pattern):
            out.append(p)
        elif isinstance(p, str):
            out.append(Pattern(p))
        else:
            raise ConfigError(f"a pattern must be a string like 'binance:BTCUSDT:trade', got {p!r}")
    if not out:
        raise ConfigError("a subscriber needs at least one pattern")
    return tuple(dict.fromkeys(out))
