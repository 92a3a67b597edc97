"""One co-located subscriber: its record (:class:`Subscription`: routing, cursor, counters, handler times) and,
for a thread subscriber, its thread (:class:`Worker`) with the hand-off between that thread and its task.

Ownership: the hot path's publisher writes a subscription's routing lists and moves its cursor only while it
sleeps caught up (or hands it a ``drop_newest`` hold); its task (:mod:`distributor.hotpath.serving`) owns the
rest, except what its thread writes (below).

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
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol, cast

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.handler import Handler
from consumer_sdk.core.keys import Pattern, StreamName
from consumer_sdk.core.log import Throttle, get_logger
from consumer_sdk.core.tick import Tick
from distributor.hotpath.policy import Execution, SubscriberPolicy, overran
from distributor.hotpath.stats import SubscriptionStats

__all__ = ["Owner", "Subscription", "Worker", "default_name", "is_async", "parse_patterns"]

log = get_logger("hotpath")


class Owner(Protocol):
    """What a subscription asks of the hot path that made it (a :class:`~distributor.hotpath.HotPath`)."""

    max_chunk: int

    def unsubscribe(self, sub: Subscription, reason: str = ...) -> None: ...

    def _sub_stats(self, sub: Subscription) -> SubscriptionStats: ...


def is_async(handler: Handler) -> bool:
    """Whether ``handler`` is a coroutine function, or an object with an async ``__call__``."""
    if inspect.iscoroutinefunction(handler):
        return True
    return inspect.iscoroutinefunction(type(handler).__call__)  # an object with an async __call__


def default_name(handler: Handler, serial: int) -> str:
    base = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    return f"{base}#{serial}"


def parse_patterns(patterns: str | Pattern | Iterable[str | Pattern]) -> tuple[Pattern, ...]:
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


class Subscription:
    """A co-located subscriber: made by :meth:`~distributor.hotpath.HotPath.subscribe`, served by one task."""

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
        hot: Owner,
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
        self._worker: Worker | None = None
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

    def _begin_chunk(self, calls: int, now: int) -> None:
        """Whoever runs its handler (its task, or its thread) starts a chunk of at most ``calls`` calls at clock
        ``now``: what :meth:`stats` reads of a chunk in progress.  The inline delivery loop keeps its own copy
        of this and of :meth:`_end_chunk` (once per chunk and subscriber, on the loop)."""
        self._busy_base = self.delivered
        self._busy_n = calls
        self._busy_since = now

    def _end_chunk(self, now: int) -> tuple[int, int]:
        """The chunk begun by :meth:`_begin_chunk` ends at clock ``now``: account it; its calls and duration."""
        ns = now - self._busy_since
        self._busy_since = 0
        n = self.delivered - self._busy_base
        if n:
            self._chunk_done(n, ns)
        return n, ns

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
        """Unsubscribe (same as :meth:`~distributor.hotpath.HotPath.unsubscribe`)."""
        self._hot.unsubscribe(self, reason)

    def stats(self) -> SubscriptionStats:
        return self._hot._sub_stats(self)

    def __repr__(self) -> str:
        return f"Subscription({self.name!r}, {self.policy.value}, {[p.text for p in self.patterns]})"


class Worker:
    """The thread of one thread subscriber, and its hand-off with the subscriber's task (see the module doc;
    the task's side is :meth:`~distributor.hotpath.serving.Serving._serve_thread`).

    Ownership: the task writes ``pushed``, ``room`` and appends to ``queue``; the thread writes ``done``,
    pops from ``queue``, appends to ``failures`` and ``timings`` (which the task pops), and is the only
    writer of the subscriber's ``delivered`` count and handler times.  ``deque`` appends and pops are
    atomic, and each count has one writer, so nothing takes a lock; the one blocking wait is the thread's
    on ``event``, set once per chunk.
    """

    __slots__ = (
        "_clock",
        "_countdown",
        "_every",
        "_loop",
        "_poke",
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

    def __init__(
        self,
        sub: Subscription,
        loop: asyncio.AbstractEventLoop,
        sample_every: int,
        clock: Callable[[], int],
        poke: Callable[[Subscription], None],
    ) -> None:
        """``poke(sub)`` is called on the loop (``call_soon_threadsafe``) when the thread has something for the
        task: room again, handler errors, latency samples while it sleeps."""
        self._sub = sub
        self._loop = loop
        self._clock = clock
        self._poke = poke
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
        (no ticks) the news of ``dropped`` lost ticks for ``on_drop``.  The task counts them as taken."""
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
        clock = self._clock
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
            sub._begin_chunk(n, clock())
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
            sub._end_chunk(clock())
            self.done += 1
            if failures or self.room is not None or (timings and sub._waiter is not None):
                try:
                    self._loop.call_soon_threadsafe(self._poke, sub)
                except RuntimeError:  # the loop is closed: nobody is left to serve
                    return
