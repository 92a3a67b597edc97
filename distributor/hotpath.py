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
``drop_newest`` hold).  All of it runs on one thread (a thread subscriber's handler aside: see
below), so a read never sees a half-written value; the metrics exporter thread only reads integers.

Exact accounting, for every subscriber at every moment::

    matched = delivered + dropped + pending

``matched`` is the number of published ticks matching it since it subscribed: the sum of
the publisher's per-stream counters over its matching streams, less the same sum taken when
it subscribed.  A lapped ``drop_oldest`` subscriber moves its cursor to ``head - max_lag``
and counts ``missed = matched(head) - (delivered + dropped) - matched_in(head - max_lag, head)``,
the last term counted over the ring's stream-id list at C speed; nothing per tick is kept
for this, and the subscribers that keep up pay nothing for it.

Latency: ``HotPath.latency`` (a :class:`~consumer_sdk.core.latency.LatencyHistogram`, µs) counts, for
every delivery to every subscriber, the time from the publish stamp of the tick's batch (one
``perf_counter_ns`` read per batch, kept in the stamps list) to the moment its handler call has
returned.  A synchronous subscriber's delivery loop walks its chunk one publish batch at a time (the
ring slots of a batch share a stamp; ``bisect`` finds where the batch ends) and reads the clock once
per batch, after the handler has taken every tick of it: each tick is counted with the latency of
the last one of its batch, an upper bound, and the bookkeeping costs one clock read per batch and
subscriber instead of one per delivery.  ``sample_every=N`` times one chunk in N of each subscriber
(chosen by position, every tick of a timed chunk counted; the ingestor uses 4), ``0`` none.  Held-back
chunks and asynchronous subscribers are timed per delivery whenever ``sample_every`` is not 0.

Where handlers run (isolation by design)::

    async handler             on the loop, in its task; it awaits, so it never holds the others up
    sync handler, "inline"    on the loop, in its task, while it keeps within its budget (the default)
    sync handler, "thread"    on a thread of its own (chosen at subscribe, or moved there for overrunning)

Every chunk a subscriber handles is timed (two clock reads and a few counter updates per chunk, whatever
its size: about 1 µs per chunk and subscriber on the 2-core development machine): the sum, the largest
per-tick mean of a chunk and a recent per-tick mean (EWMA over about 8 chunks) are kept per subscriber.
An inline handler's chunk *overruns* when it held the loop longer than both ``handler_budget_us`` per
tick and :data:`MIN_OVERRUN_US` (wall time: a handler that blocks on a sleep or on I/O overruns as
surely as one that computes).  A new inline subscriber's first chunk is *one call*: within budget, its
chunks are ``max_chunk`` from then on; over it, :func:`probation_chunk` calls (enough to overrun), so a
handler slow from its first call holds the loop for one call, not for a full chunk.  After an overrun its
chunks are cut to
:func:`probation_chunk` calls (enough to overrun once more if it is still that slow, at most
:data:`PROBATION_CHUNK`: one call for a 1 ms handler); at its :data:`OFFLOAD_AFTER`-th overrun within
:data:`OFFLOAD_WINDOW` of its chunks it is moved, for good, to a thread of its own (logged
``subscriber_offloaded``).  So a slow handler holds the publisher, the writer, the socket reader and the
other subscribers once, for at most ``max_chunk + (OFFLOAD_AFTER - 1) * PROBATION_CHUNK`` of its calls (a
1 ms handler is moved after its first :data:`OFFLOAD_AFTER` calls, each holding the loop once for 1 ms),
and never again; a trivial inline handler pays no thread hop.  Wall time also
counts what was not the handler's doing (the machine preempting the loop's thread, another thread
holding the GIL): that is why one overrun, or a few spread out, move nothing.  A handler that blocks
only now and then (one chunk in five) stays inline, its overruns counted and logged
(``subscriber_overran``); declare it ``execution="thread"``.  A synchronous handler may run on another
thread: code that must run on the loop (asyncio objects, ``call_soon``) belongs in an async handler.

A thread subscriber's task stays on the loop and keeps its ring cursor, so its queue is the ring window
like everyone's and its policy is applied there, by the same code, with the same exact accounting.  The
task copies each chunk's matching ticks (C-speed slices) into a hand-off deque of at most
:data:`HANDOFF_CHUNKS` chunks (one being handled, one waiting) and sets a ``threading.Event`` once per
chunk; it takes nothing more from the ring while the hand-off is full, so a slow thread lags on the ring
and its policy acts (``drop_oldest`` skips, ``drop_newest`` holds, ``disconnect`` removes, ``block``
holds the publisher).  The thread is the only writer of the subscriber's ``delivered`` count and handler
times, and calls ``on_drop`` (handed over in order with the ticks, so a subscriber's callbacks all run
on one thread); it passes handler errors and latency samples back through two deques, and wakes the task
(``call_soon_threadsafe``) at most once per chunk: when the task waits for room, an error needs
handling, or latency samples wait while the task sleeps.  A removed thread subscriber's thread ends
after the call in progress (it is a daemon thread: a call that never returns cannot keep the process
alive).  With the GIL, a thread handler that computes rather than waits still competes with the loop for
the interpreter (switched every ``sys.getswitchinterval()``, 5 ms by default): it no longer holds the
others up for a whole chunk, but CPU-heavy work belongs in another process.

An async handler that never returns is bounded the same way: its task holds one chunk (a copy), its
cursor stays behind, and its policy acts on the ring.  :class:`SubscriptionStats` counts the ticks a
lagging ``drop_oldest`` subscriber can no longer get as dropped at once (it is told, ``on_drop``,
when it next reads), and its ``handler_us`` grows with the call in progress, so it is named by
:attr:`HotPathStats.slowest` while it hangs.

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
import threading
import time
from bisect import bisect_right
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import compress
from operator import itemgetter
from typing import Final, cast

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.handler import Handler
from consumer_sdk.core.keys import Pattern, StreamName
from consumer_sdk.core.latency import LatencyHistogram, bucket_of, check_sample_every
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.tick import Tick
from distributor.registry import parse_stream

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_HANDLER_BUDGET_US",
    "DEFAULT_MAX_CHUNK",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_MAX_SUBSCRIBERS",
    "HANDOFF_CHUNKS",
    "HOT_SAMPLE_EVERY",
    "MIN_OVERRUN_US",
    "OFFLOAD_AFTER",
    "OFFLOAD_WINDOW",
    "PROBATION_CHUNK",
    "Execution",
    "Handler",
    "HotPath",
    "HotPathSnapshot",
    "HotPathStats",
    "SubscriberPolicy",
    "Subscription",
    "SubscriptionStats",
    "offload_due",
    "overran",
    "probation_chunk",
]

DEFAULT_CAPACITY: Final = 65536
DEFAULT_MAX_CHUNK: Final = 256
#: the ingestor times one chunk in this many of each subscriber (a chunk is timed as a whole, so it needs
#: fewer samples than the per-tick stages; see the module doc)
HOT_SAMPLE_EVERY: Final = 4
DEFAULT_MAX_STREAMS: Final = 65536
DEFAULT_MAX_SUBSCRIBERS: Final = 1024
#: an inline handler's budget: its mean time per tick over a chunk (µs); see the module doc
DEFAULT_HANDLER_BUDGET_US: Final = 50.0
#: a chunk that held the loop for less than this (µs) is never an overrun, whatever its per-tick mean:
#: a one-tick chunk hit by a collection or a preemption is not a slow handler
MIN_OVERRUN_US: Final = 500
#: an inline handler is moved to its own thread at this many overruns ...
OFFLOAD_AFTER: Final = 4
#: ... within this many of its chunks
OFFLOAD_WINDOW: Final = 8
#: after an overrun, an inline handler's chunks hold at most this many calls until it is moved, or has
#: gone OFFLOAD_WINDOW chunks without overrunning (fewer when its calls are slow: see :func:`probation_chunk`)
PROBATION_CHUNK: Final = 16
#: chunks handed to a thread subscriber and not yet handled: one in its handler, one waiting
HANDOFF_CHUNKS: Final = 2

log = get_logger("hotpath")

_MIN_OVERRUN_NS: Final = MIN_OVERRUN_US * 1000
_LUT_SIZE: Final = 1 << 14  # µs: below 16 ms a delivery's latency bucket is a list lookup
_LUT: Final = [bucket_of(us) for us in range(_LUT_SIZE)]
_VACANT: Final = cast(Tick, {})
_stream_key: Final = itemgetter("venue", "symbol", "channel")
StreamIdent = tuple[str, str, str]


class Execution(StrEnum):
    """Where a subscriber's handler runs (see the module doc)."""

    INLINE = "inline"  # sync, on the loop, moved to THREAD when it overruns its budget repeatedly
    THREAD = "thread"  # sync, on a thread of its own
    ASYNC = "async"  # a coroutine function, awaited on the loop

    @classmethod
    def parse(cls, text: str | Execution | None, is_async: bool) -> Execution:
        """The execution for a handler: None picks ``async`` or ``inline`` by its kind."""
        if text is None:
            return cls.ASYNC if is_async else cls.INLINE
        try:
            value = cls(text)
        except ValueError:
            raise ConfigError(
                f"unknown subscriber execution {text!r}: expected one of {', '.join(e.value for e in cls)}"
            ) from None
        if is_async and value is not cls.ASYNC:
            raise ConfigError(f"execution {value.value!r} is for synchronous handlers; this handler is a coroutine "
                              "function, which runs on the loop (execution 'async')")
        if not is_async and value is cls.ASYNC:
            raise ConfigError("execution 'async' needs a coroutine function (async def); "
                              "a synchronous handler runs 'inline' or on a 'thread'")
        return value


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


#: the policies whose subscribers are lapped by their own reads (block only while shedding)
_SKIPPING: Final = frozenset({SubscriberPolicy.DROP_OLDEST, SubscriberPolicy.BLOCK})  # lapped by _take


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """One subscriber's counters.  ``matched == delivered + dropped + pending`` always holds."""

    name: str
    policy: SubscriberPolicy
    patterns: tuple[str, ...]
    matched: int  # published ticks matching its patterns since it subscribed (until it was removed)
    delivered: int  # handler calls, including those that raised
    dropped: int  # matching ticks it will never get (skipped or past its window, lost while over its limit,
    #              pending at removal)
    pending: int  # matching ticks published and neither delivered nor (yet) counted as dropped
    errors: int  # handler calls that raised
    drop_events: int  # times it was told of a drop (on_drop calls)
    lag: int  # published ticks, of every stream, between the head and its cursor
    removed: str | None  # why it was removed, None while subscribed
    execution: Execution = Execution.INLINE  # where its handler runs now
    offloaded: bool = False  # moved off the loop for overrunning its budget
    handler_us: float = 0.0  # its own time per tick, recent: mean over about 8 chunks, or the chunk in progress
    #                         (when that is longer: a handler that hangs); wall time, awaits included for async
    handler_max_us: float = 0.0  # the largest mean time per tick of one chunk
    handler_total_us: int = 0  # time in its handler since it subscribed
    busy_us: int = 0  # how long the chunk in progress has been running (0: none)
    overruns: int = 0  # chunks over its budget (sync handlers; see the module doc)
    budget_us: float = DEFAULT_HANDLER_BUDGET_US


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
    slowest: str | None = None  # the current subscriber with the most handler time per tick, then lag
    offloaded: int = 0  # subscribers moved to a thread for overrunning their budget, since start
    threads: int = 0  # current subscribers whose handler runs on a thread of its own
    overruns: int = 0  # chunks over budget, every subscriber, removed ones included


@dataclass(frozen=True, slots=True)
class HotPathSnapshot:
    """What observers (heartbeat, metrics) read of the hot path at one instant: :meth:`HotPath.snapshot`."""

    stats: HotPathStats
    #: every current subscriber, slowest first (as :meth:`HotPath.slowest` ranks them)
    ranked: tuple[SubscriptionStats, ...]
    #: publish stamp to handler call (µs), every subscriber, a copy
    latency: LatencyHistogram


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
        "_avg_tick_ns",
        "_base",
        "_blocking",
        "_budget_ns",
        "_busy_base",
        "_busy_n",
        "_busy_ns",
        "_busy_since",
        "_chunk_limit",
        "_chunks",
        "_final",
        "_hold",
        "_hold_at",
        "_hot",
        "_last_fail",
        "_marks",
        "_match",
        "_max_tick_ns",
        "_on_drop",
        "_running",
        "_sids",
        "_sidset",
        "_streak",
        "_taken",
        "_throttle",
        "_waiter",
        "_wants_all",
        "_worker",
        "budget_us",
        "cursor",
        "delivered",
        "drop_events",
        "dropped",
        "errors",
        "execution",
        "handler",
        "max_consecutive_failures",
        "max_lag",
        "name",
        "offloaded",
        "overruns",
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
        execution: Execution,
        budget_us: float,
    ) -> None:
        self._hot = hot
        self.handler = handler
        self.patterns = patterns
        self.policy = policy
        self.max_lag = max_lag
        self.name = name
        self.max_consecutive_failures = max_consecutive_failures
        self._on_drop = on_drop
        self._async = execution is Execution.ASYNC
        self._blocking = policy is SubscriberPolicy.BLOCK
        self.execution = execution
        self.offloaded = False
        self.budget_us = budget_us
        self._budget_ns = int(budget_us * 1000)
        self._worker: _Worker | None = None
        # Inline: 1 call at first, then max_chunk if that was within budget (a slow handler is found on one
        # call, not on a full chunk), else probation_chunk() of them, as after an overrun.
        self._chunk_limit = 1 if execution is Execution.INLINE else hot.max_chunk
        # Routing, written by the publisher when a stream first appears: 1/0 per stream id,
        # the ids it matches (list and set), and whether it matches every stream known so far.
        self._match: list[int] = []
        self._sids: list[int] = []
        self._sidset: set[int] = set()
        self._wants_all = True
        self._base = 0
        self._final: int | None = None
        self._hold: tuple[list[Tick], list[int], list[int]] | None = None
        self._hold_at = 0  # thread subscribers: how much of the hold was handed over
        self._waiter: asyncio.Future[None] | None = None
        self._running = False
        self._streak = 0
        self._last_fail = -2
        self._throttle = Throttle(log)
        self.cursor = 0
        #: matching ticks its task took from the ring (or hold) for its handler: written by its task; equal to
        #: ``delivered`` between two chunks, except on a thread, where the thread counts ``delivered``
        self._taken = 0
        self.delivered = 0
        self.dropped = 0
        self.errors = 0
        self.drop_events = 0
        self.removed: str | None = None
        # Handler time, written by whoever runs the handler (its task, or its thread once it has one).
        self._busy_ns = 0
        self._max_tick_ns = 0
        self._avg_tick_ns = 0
        self._chunks = 0
        self.overruns = 0
        self._marks: list[int] = []  # chunk numbers of its latest overruns (inline only)
        self._busy_since = 0  # clock at the start of the chunk in progress, 0 between chunks
        self._busy_n = 0  # ticks in the chunk in progress
        self._busy_base = 0  # delivered when it started (thread and async)

    def _chunk_done(self, n: int, ns: int) -> None:
        """Account one chunk of ``n`` handler calls that took ``ns`` (inlined in the inline delivery loop).  A
        thread's overruns are counted too (it no longer holds anyone up: nothing else follows from them)."""
        self._busy_ns += ns
        self._chunks += 1
        per = ns // n
        if per > self._max_tick_ns:
            self._max_tick_ns = per
        if self._chunks == 1:
            self._avg_tick_ns = per
        else:
            self._avg_tick_ns += (per - self._avg_tick_ns) >> 3
        if self.execution is Execution.THREAD and overran(ns, n, self._budget_ns):
            self.overruns += 1

    @property
    def thread(self) -> threading.Thread | None:
        """The thread its handler runs on (execution ``thread``, once its task has started), else None."""
        return self._worker.thread if self._worker is not None else None

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
        handler_budget_us: float = DEFAULT_HANDLER_BUDGET_US,
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
        #: an inline handler's default budget, µs per tick (see the module doc)
        self.handler_budget_us = _check_budget(handler_budget_us)
        self._mask = capacity - 1
        self._segment = capacity // 2  # largest write between two limit checks (see _write)
        self._clock = clock
        #: a synchronous subscriber's deliveries are timed into ``latency`` one chunk in this many (0: never)
        self.sample_every = check_sample_every(sample_every)
        self._ring: list[Tick] = [_VACANT] * capacity
        self._ring_sids: list[int] = [0] * capacity
        self._stamps: list[int] = [0] * capacity
        self._cursor = 0
        #: ring positions below this hold no tick (see :meth:`_vacate`)
        self._vacated = 0
        self._blank: list[Tick] = [_VACANT] * capacity
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
        self._gone_overruns = 0
        self._dropped_gone: Counter[str] = Counter()
        #: subscribers moved to a thread of their own for overrunning their budget
        self.offloaded = 0
        self._overrun_log = Throttle(log, interval=10.0)  # an overrun may be the machine's doing: a line in 10 s
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
        execution: str | Execution | None = None,
        handler_budget_us: float | None = None,
    ) -> Subscription:
        """Attach ``handler`` to the streams matching ``patterns``; it gets the ticks published from now on.

        ``max_lag`` (default ``capacity // 4``, at most ``capacity // 2``) is how many published ticks,
        of every stream, it may be behind before its ``policy`` acts.  ``max_consecutive_failures``: remove
        it after that many handler calls in a row raised (None: never).  ``on_drop(count)`` is called where
        its handler runs (its task, or its thread, in order with its ticks) each time it learns it lost
        ``count`` ticks.  Its task is started in the task group given
        to :meth:`start`, if any; otherwise run :meth:`run_subscriber` yourself.

        ``execution``: ``inline`` (a synchronous handler's default: on the loop, moved to a thread of its
        own if it overruns ``handler_budget_us`` per tick repeatedly), ``thread`` (a synchronous handler on
        a thread of its own from the start: for handlers known to block or compute), ``async`` (a coroutine
        function's only choice).  ``handler_budget_us`` defaults to the hot path's.
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
        mode = Execution.parse(execution, _is_async(handler))
        budget = self.handler_budget_us if handler_budget_us is None else _check_budget(handler_budget_us)
        self._serial += 1
        sub = Subscription(
            self, handler, pats, pol, limit, name or _default_name(handler, self._serial),
            max_consecutive_failures, on_drop, mode, budget,
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
        self._vacate()
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

    def _vacate(self) -> None:
        """Drop the ring's references to the ticks every subscriber has read, so the ring keeps alive only
        the window between the slowest cursor and the head, not the last ``capacity`` ticks published.

        Nothing reads a slot below its subscriber's cursor: an inline subscriber reads its chunk in place
        with no await (the publisher cannot run meanwhile); the others copy their chunk before awaiting.
        Costs one pass over the subscribers and one C-speed slice assignment per publish; a slot already
        overwritten (a lapped cursor) is never cleared.
        """
        head = self._cursor
        low = min([s.cursor for s in self._subs], default=head)
        start = max(self._vacated, head - self.capacity)
        if low <= start:
            return
        ring, blank = self._ring, self._blank
        for a, b in self._spans(start, low):
            ring[a:b] = blank[a:b]
        self._vacated = low

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
        worker = sub._worker
        if worker is not None:
            worker.halt()
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
        self._gone_overruns += sub.overruns
        self._dropped_gone[sub.policy.value] += self._sub_stats(sub).dropped
        if not self._subs and not self._retiring:
            self._vacate()  # the distributor publishes nothing while no one subscribes: free the ring now

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
                if sub.execution is Execution.INLINE:
                    await self._serve_sync(sub)  # returns when removed, or moved to a thread
                if sub.removed is None:
                    await self._serve_thread(sub)
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
        worker = sub._worker
        if worker is not None and (worker.failures or worker.timings):
            self._wake_one(sub)  # its thread passed something back since it last looked: no wake-up is lost
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
        k = min(head - c, sub._chunk_limit, self.capacity - a)
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
        missed = self._matched(sub) - sub._taken - sub.dropped - kept
        sub.cursor = new_c
        if missed > 0:
            self._report_drop(sub, missed)
        return new_c

    def _finish_hold(self, sub: Subscription) -> None:
        """drop_newest: its hold is read; resume at the head and count what came meanwhile."""
        sub._hold = None
        sub._hold_at = 0
        sub.cursor = self._cursor
        missed = self._matched(sub) - sub._taken - sub.dropped
        if missed > 0:
            self._report_drop(sub, missed)

    def _report_drop(self, sub: Subscription, missed: int) -> None:
        sub.dropped += missed
        sub.drop_events += 1
        worker = sub._worker
        if sub._on_drop is not None and worker is not None:
            worker.hand([], None, missed)  # told on its thread, in order with its ticks
        elif sub._on_drop is not None:
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
        """An inline subscriber's task: returns when it is removed or has been moved to a thread."""
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
                i = sub._hold_at
                if i < len(ticks):
                    j = sub._hold_at = i + sub._chunk_limit
                    t0 = clock()
                    n = self._deliver_sync(sub, ticks[i:j], sids[i:j], tstamps[i:j])
                    sub._taken = sub.delivered
                    if n:
                        ns = clock() - t0
                        sub._chunk_done(n, ns)
                        if self._judge(sub, n, ns):
                            return
                    await asyncio.sleep(0)
                    continue
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
            t0 = sub._busy_since = clock()
            sub._busy_n = b - a
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
            ns = clock() - t0
            sub._busy_since = 0
            if timed:
                hist.sum_us += total
                hist.max_us = top
            if n:
                sub.delivered += n
                sub._taken += n
                # The handler's time (Subscription._chunk_done, inlined: once per chunk and subscriber).
                sub._busy_ns += ns
                chunks = sub._chunks = sub._chunks + 1
                per = ns // n
                if per > sub._max_tick_ns:
                    sub._max_tick_ns = per
                sub._avg_tick_ns = per if chunks == 1 else sub._avg_tick_ns + ((per - sub._avg_tick_ns) >> 3)
                if (ns > _MIN_OVERRUN_NS or sub._marks) and self._judge(sub, n, ns):
                    return
                if sub._chunk_limit < self.max_chunk and not sub._marks:  # its first chunk: one call
                    if per <= sub._budget_ns:
                        sub._chunk_limit = self.max_chunk
                        continue  # within budget: the rest of this turn's chunk at once, as it would have had
                    sub._chunk_limit = probation_chunk(per, self.max_chunk)
            if sub.cursor != self._cursor:
                await asyncio.sleep(0)  # more to read: let the others have their turn first

    def _judge(self, sub: Subscription, n: int, ns: int) -> bool:
        """An inline chunk of ``n`` calls (already accounted) took ``ns``: on an overrun, cut its chunks and move
        it to a thread at its OFFLOAD_AFTER-th overrun within OFFLOAD_WINDOW chunks.  True when it was moved (its
        task then serves it from the thread)."""
        marks = sub._marks
        if not overran(ns, n, sub._budget_ns):
            if marks and sub._chunks - marks[-1] >= OFFLOAD_WINDOW:
                marks.clear()  # clean for a whole window: full chunks again
                sub._chunk_limit = self.max_chunk
            return False
        sub.overruns += 1
        marks.append(sub._chunks)
        if len(marks) > OFFLOAD_AFTER:
            del marks[0]
        sub._chunk_limit = probation_chunk(ns // n, min(self.max_chunk, PROBATION_CHUNK))
        self._overrun_log.log(
            logging.WARNING, "subscriber_overran", subscriber=sub.name, calls=n, handler_us=round(ns / n / 1000, 1),
            budget_us=sub.budget_us, overruns=sub.overruns,
        )
        if not offload_due(marks, sub._chunks) or sub.removed is not None:
            return False
        sub.execution = Execution.THREAD
        sub.offloaded = True
        sub._chunk_limit = self.max_chunk
        self.offloaded += 1
        log_event(
            log, logging.WARNING, "subscriber_offloaded", subscriber=sub.name, policy=sub.policy.value,
            overruns=sub.overruns, handler_us=round(sub._avg_tick_ns / 1000, 1), budget_us=sub.budget_us,
        )
        return True

    def _deliver_sync(self, sub: Subscription, ticks: list[Tick], sids: list[int], tstamps: list[int]) -> int:
        """Hand a held-back chunk to an inline handler; returns the number of calls."""
        match = sub._match
        handler = cast(Callable[[Tick], object], sub.handler)
        clock = self._clock
        observe = self.latency.observe
        timed = self.sample_every > 0
        n = 0
        for i, tick in enumerate(ticks):
            if match[sids[i]]:
                if timed:
                    observe((clock() - tstamps[i]) // 1000)
                sub.delivered += 1
                n += 1
                try:
                    handler(tick)
                except Exception as exc:
                    self._failed(sub, tick, exc, sub.delivered)
        return n

    async def _serve_async(self, sub: Subscription) -> None:
        loop = asyncio.get_running_loop()
        while sub.removed is None:
            if sub._hold is not None:
                ticks, sids, tstamps = sub._hold
                for i in range(0, len(ticks), self.max_chunk):
                    chunk = ticks[i : i + self.max_chunk]
                    j = i + len(chunk)
                    sub._taken += len(chunk)  # a hold holds only ticks it wants
                    await self._deliver_async(sub, chunk, sids[i:j], tstamps[i:j])
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
            sids = self._ring_sids[a:b]
            sub._taken += b - a if sub._wants_all else sum(map(sub._match.__getitem__, sids))
            await self._deliver_async(sub, self._ring[a:b], sids, self._stamps[a:b])

    async def _deliver_async(self, sub: Subscription, ticks: list[Tick], sids: list[int], tstamps: list[int]) -> None:
        match = sub._match
        handler = cast(Callable[[Tick], Awaitable[object]], sub.handler)
        clock = self._clock
        observe = self.latency.observe
        timed = self.sample_every > 0
        base = sub._busy_base = sub.delivered
        sub._busy_n = len(ticks)
        t0 = sub._busy_since = clock()
        try:
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
        finally:
            sub._busy_since = 0
            if sub.delivered > base:
                sub._chunk_done(sub.delivered - base, clock() - t0)
        await asyncio.sleep(0)

    # -- thread subscribers -----------------------------------------------------------------------------------

    async def _serve_thread(self, sub: Subscription) -> None:
        """A thread subscriber's task: it reads the ring like any subscriber (so its policy acts there) and
        hands the matching ticks of each chunk to its thread, at most HANDOFF_CHUNKS chunks at a time."""
        loop = asyncio.get_running_loop()
        worker = sub._worker
        if worker is None:
            worker = sub._worker = _Worker(self, sub, loop, self.sample_every)
            worker.thread.start()
        ring, ring_sids, stamps = self._ring, self._ring_sids, self._stamps
        match = sub._match
        max_chunk = self.max_chunk
        while sub.removed is None:
            if worker.failures or worker.timings:
                self._fold(sub, worker)
                continue
            if worker.pushed - worker.done >= HANDOFF_CHUNKS:
                room = loop.create_future()
                worker.room = room
                try:
                    # Checked again once the waiter is visible to the thread: no wake-up can be lost.
                    if worker.pushed - worker.done >= HANDOFF_CHUNKS and sub.removed is None:
                        await room
                finally:
                    worker.room = None
                continue
            if sub._hold is not None:
                ticks, _, tstamps = sub._hold
                i = sub._hold_at
                if i < len(ticks):
                    j = sub._hold_at = i + max_chunk
                    worker.hand(ticks[i:j], tstamps[i:j] if worker.timed() else None)
                else:
                    self._finish_hold(sub)
                continue
            span = self._take(sub)
            if span is None:
                await self._sleep(sub, loop)
                continue
            a, b = span
            timed = worker.timed()
            if sub._wants_all:
                worker.hand(ring[a:b], stamps[a:b] if timed else None)
            else:
                keep = list(map(match.__getitem__, ring_sids[a:b]))
                ticks = list(compress(ring[a:b], keep))
                if ticks:
                    worker.hand(ticks, list(compress(stamps[a:b], keep)) if timed else None)

    def _fold(self, sub: Subscription, worker: _Worker) -> None:
        """Take in what a thread passed back: handler errors (counted, logged, maybe removal), latencies."""
        failures, timings = worker.failures, worker.timings
        while failures:
            tick, exc, index = failures.popleft()
            self._failed(sub, tick, exc, index)
        if timings:
            hist = self.latency
            buckets = hist.counts
            while timings:
                us, m = timings.popleft()
                us = max(us, 0)
                buckets[_LUT[us] if us < _LUT_SIZE else bucket_of(us)] += m
                hist.sum_us += us * m
                if us > hist.max_us:
                    hist.max_us = us

    def _poke(self, sub: Subscription) -> None:
        """From a thread, through ``call_soon_threadsafe``: its task has room again, or errors to handle."""
        worker = sub._worker
        if worker is None or sub.removed is not None:
            return
        room = worker.room
        if room is not None and not room.done():
            room.set_result(None)
        else:
            self._wake_one(sub)

    # -- statistics -------------------------------------------------------------------------------------------

    def _sub_stats(self, sub: Subscription) -> SubscriptionStats:
        matched = self._matched(sub)
        if sub.removed is None:
            dropped = sub.dropped
            head = self._cursor
            lag = head - sub.cursor
            if lag > sub.max_lag and sub._hold is None and sub.policy in _SKIPPING:
                # A drop_oldest subscriber that has not read for a while (a handler that hangs): what fell out
                # of its window is lost already; it is told (on_drop) when it next reads.
                if sub._wants_all:
                    kept = sub.max_lag
                else:
                    want = sub._match.__getitem__
                    kept = sum(sum(map(want, self._ring_sids[a:b])) for a, b in self._spans(head - sub.max_lag, head))
                dropped = max(dropped, matched - sub._taken - kept)
            pending = matched - sub.delivered - dropped
        else:
            dropped = matched - sub.delivered
            pending = 0
            lag = 0
        per = sub._avg_tick_ns
        busy = 0
        since = sub._busy_since
        if since:
            busy = max(0, self._clock() - since)
            calls = sub._busy_n if sub.execution is Execution.INLINE else sub.delivered - sub._busy_base
            per = max(per, busy // max(1, calls))
        return SubscriptionStats(
            name=sub.name, policy=sub.policy, patterns=tuple(p.text for p in sub.patterns), matched=matched,
            delivered=sub.delivered, dropped=dropped, pending=pending, errors=sub.errors,
            drop_events=sub.drop_events, lag=lag, removed=sub.removed, execution=sub.execution,
            offloaded=sub.offloaded, handler_us=per / 1000, handler_max_us=sub._max_tick_ns / 1000,
            handler_total_us=(sub._busy_ns + busy) // 1000, busy_us=busy // 1000, overruns=sub.overruns,
            budget_us=sub.budget_us,
        )

    def slowest(self, n: int = 3) -> list[SubscriptionStats]:
        """The ``n`` current subscribers with the most handler time per tick (their own: recent mean, or the
        chunk in progress when that is longer), then the largest lag: who is slow, not who waited."""
        rows = [self._sub_stats(sub) for sub in self._subs]
        rows.sort(key=_slowness)
        return rows[:n]

    def stats(self) -> HotPathStats:
        by_policy = Counter(self._dropped_gone)
        delivered = self._gone_delivered
        errors = self._gone_errors
        overruns = self._gone_overruns
        max_lag = 0
        threads = 0
        worst: SubscriptionStats | None = None
        for sub in (*self._subs, *self._retiring):
            st = self._sub_stats(sub)
            by_policy[sub.policy.value] += st.dropped
            delivered += st.delivered
            errors += st.errors
            overruns += st.overruns
            if sub.removed is None:
                max_lag = max(max_lag, st.lag)
                threads += sub.execution is Execution.THREAD
                if (st.handler_us or st.lag) and (worst is None or _slowness(st) < _slowness(worst)):
                    worst = st
        return HotPathStats(
            published=self._cursor, capacity=self.capacity, streams=len(self._names), subscribers=len(self._subs),
            delivered=delivered, dropped=sum(by_policy.values()), errors=errors,
            dropped_by_policy={p.value: by_policy[p.value] for p in SubscriberPolicy},
            disconnected=self.disconnected, removed=self.removed, blocked=self.blocked,
            waiting_room=self._backlog is not None, max_lag=max_lag,
            slowest=worst.name if worst is not None else None, offloaded=self.offloaded, threads=threads,
            overruns=overruns,
        )

    def snapshot(self) -> HotPathSnapshot:
        """:meth:`stats`, every subscriber ranked and a copy of the latency histogram (no I/O; two passes over
        the subscribers, as :meth:`stats` and :meth:`slowest` each make one)."""
        return HotPathSnapshot(
            stats=self.stats(), ranked=tuple(self.slowest(self.max_subscribers)), latency=self.latency.copy()
        )


class _Worker:
    """The thread of one thread subscriber, and its hand-off with the subscriber's task (see the module doc).

    Ownership: the task writes ``pushed``, ``room`` and appends to ``queue``; the thread writes ``done``,
    pops from ``queue``, appends to ``failures`` and ``timings`` (which the task pops), and is the only
    writer of the subscriber's ``delivered`` count and handler times.  ``deque`` appends and pops are
    atomic, and each count has one writer, so nothing takes a lock; the one blocking wait is the thread's
    on ``event``, set once per chunk.
    """

    __slots__ = (
        "_countdown",
        "_every",
        "_hot",
        "_loop",
        "_sub",
        "_throttle",
        "done",
        "event",
        "failures",
        "halted",
        "pushed",
        "queue",
        "room",
        "thread",
        "timings",
    )

    def __init__(self, hot: HotPath, sub: Subscription, loop: asyncio.AbstractEventLoop, sample_every: int) -> None:
        self._hot = hot
        self._sub = sub
        self._loop = loop
        self._every = self._countdown = sample_every
        #: (ticks, their publish stamps if the chunk is timed, ticks lost just before them: on_drop's count)
        self.queue: deque[tuple[list[Tick], list[int] | None, int]] = deque()
        self.event = threading.Event()
        self.halted = False
        self.pushed = 0  # chunks handed over
        self.done = 0  # chunks handled
        self.room: asyncio.Future[None] | None = None  # set while the task waits for the thread to take a chunk
        self.failures: deque[tuple[Tick, Exception, int]] = deque()  # (tick, error, index of the call)
        self.timings: deque[tuple[int, int]] = deque()  # (µs from publish to handled, ticks) per publish batch
        self._throttle = Throttle(log)  # the thread's own (on_drop failures)
        self.thread = threading.Thread(target=self._run, name=f"hotpath-{sub.name}"[:60], daemon=True)

    def timed(self) -> bool:
        """Whether the next chunk is one of the ``sample_every`` that are timed (the task's side)."""
        if not self._every:
            return False
        self._countdown -= 1
        if self._countdown:
            return False
        self._countdown = self._every
        return True

    def hand(self, ticks: list[Tick], stamps: list[int] | None, dropped: int = 0) -> None:
        """The task's side: pass one chunk of matching ticks (and their publish stamps if it is timed), or
        (no ticks) the news of ``dropped`` lost ticks for ``on_drop``."""
        self._sub._taken += len(ticks)
        self.queue.append((ticks, stamps, dropped))
        self.pushed += 1
        self.event.set()

    def halt(self) -> None:
        """On the loop, when the subscriber is removed: the thread ends after the call in progress."""
        self.halted = True
        self.event.set()
        room = self.room
        if room is not None and not room.done():
            room.set_result(None)

    def _tell_drop(self, count: int) -> None:
        on_drop = self._sub._on_drop
        if on_drop is None:  # pragma: no cover - only handed when there is one
            return
        try:
            on_drop(count)
        except Exception as exc:  # the subscriber's own callback must not stop its thread
            self._throttle.log(logging.ERROR, "subscriber_on_drop_failed", subscriber=self._sub.name,
                               error=repr(exc)[:200])

    def _run(self) -> None:
        sub = self._sub
        handler = cast(Callable[[Tick], object], sub.handler)
        clock = self._hot._clock
        queue, event, failures, timings = self.queue, self.event, self.failures, self.timings
        while not self.halted:
            try:
                ticks, stamps, dropped = queue.popleft()
            except IndexError:
                event.clear()
                if not queue and not self.halted:  # checked after the clear: a chunk handed meanwhile is seen
                    event.wait()
                continue
            if dropped:
                self._tell_drop(dropped)
            n = len(ticks)
            base = sub._busy_base = sub.delivered
            sub._busy_n = n
            t0 = sub._busy_since = clock()
            i = 0
            while i < n and not self.halted:
                stamp = 0
                if stamps is None:
                    j = n
                else:
                    stamp = stamps[i]
                    j = n if stamps[n - 1] == stamp else bisect_right(stamps, stamp, i, n)
                before = sub.delivered
                for k in range(i, j):
                    if self.halted:
                        break
                    sub.delivered += 1
                    try:
                        handler(ticks[k])
                    except Exception as exc:
                        failures.append((ticks[k], exc, sub.delivered))
                if stamps is not None and sub.delivered > before:
                    timings.append(((clock() - stamp) // 1000, sub.delivered - before))
                i = j
            ns = clock() - t0
            sub._busy_since = 0
            if sub.delivered > base:
                sub._chunk_done(sub.delivered - base, ns)
            self.done += 1
            if failures or self.room is not None or (timings and sub._waiter is not None):
                try:
                    self._loop.call_soon_threadsafe(self._hot._poke, sub)
                except RuntimeError:  # the loop is closed: nobody is left to serve
                    return


def overran(ns: int, calls: int, budget_ns: int) -> bool:
    """Whether a chunk of ``calls`` handler calls that took ``ns`` overran a budget of ``budget_ns`` per call:
    longer than the budget times the calls, and than :data:`MIN_OVERRUN_US` (so a one-call chunk hit by a
    collection or a preemption is not taken for a slow handler)."""
    return ns > budget_ns * calls and ns > _MIN_OVERRUN_NS


def probation_chunk(per_call_ns: int, cap: int) -> int:
    """How many calls an inline handler's chunks hold after an overrun, given its latest per-call mean: enough
    to pass :data:`MIN_OVERRUN_US` once more if it is still that slow (so the next chunk can overrun again and
    a handler just over its budget is still caught), no more than ``cap``, at least 1.  A 1 ms handler gets
    1-call chunks: it holds the loop 1 ms at a time until it is moved, not ``cap`` ms."""
    if per_call_ns <= 0:
        return cap
    return max(1, min(cap, _MIN_OVERRUN_NS // per_call_ns + 1))


def offload_due(overruns: Sequence[int], chunk: int) -> bool:
    """Whether an inline subscriber is to be moved to a thread, given the chunk numbers of its latest
    overruns (oldest first) and the number of the current chunk: :data:`OFFLOAD_AFTER` of them within
    :data:`OFFLOAD_WINDOW` chunks."""
    return len(overruns) >= OFFLOAD_AFTER and chunk - overruns[-OFFLOAD_AFTER] < OFFLOAD_WINDOW


def _slowness(st: SubscriptionStats) -> tuple[float, int, str]:
    return (-st.handler_us, -st.lag, st.name)


def _check_budget(us: float) -> float:
    if isinstance(us, bool) or not isinstance(us, int | float) or not 0 < us <= 1e9:
        raise ConfigError(f"handler_budget_us must be a positive number of microseconds, got {us!r}")
    return float(us)


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
