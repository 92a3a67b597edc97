"""The hot path assembled: :class:`HotPath`'s construction, subscribe and unsubscribe, its task group, and
its statistics.  The ring it publishes into is :mod:`distributor.hotpath.ring`, the tasks that serve its
subscribers :mod:`distributor.hotpath.serving` (its two base classes, in that order).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.handler import Handler
from consumer_sdk.core.keys import Pattern
from distributor.hotpath.policy import (
    DEFAULT_CAPACITY,
    DEFAULT_HANDLER_BUDGET_US,
    DEFAULT_MAX_CHUNK,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_SUBSCRIBERS,
    SKIPPING,
    Execution,
    SubscriberPolicy,
    check_budget,
)
from distributor.hotpath.serving import Serving
from distributor.hotpath.stats import HotPathSnapshot, HotPathStats, SubscriptionStats, slowness
from distributor.hotpath.subscription import Subscription, default_name, is_async, parse_patterns

__all__ = ["HotPath"]


class HotPath(Serving):
    """Single-writer ring fan-out of ticks to co-located subscribers (see :mod:`distributor.hotpath`)."""

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
        #: an inline handler's default budget, µs per tick (see :mod:`distributor.hotpath.policy`)
        self.handler_budget_us = check_budget(handler_budget_us)
        super().__init__(capacity, max_streams, clock, max_chunk, sample_every)
        self.max_subscribers = max_subscribers
        self._tg: asyncio.TaskGroup | None = None
        self._serial = 0

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
        pats = parse_patterns(patterns)
        pol = SubscriberPolicy.parse(policy)
        limit = self.capacity // 4 if max_lag is None else max_lag
        if not 1 <= limit <= self.capacity // 2:
            raise ConfigError(f"max_lag must be between 1 and {self.capacity // 2} (capacity / 2), got {limit}")
        if max_consecutive_failures is not None and max_consecutive_failures < 1:
            raise ConfigError(f"max_consecutive_failures must be at least 1 or None, got {max_consecutive_failures}")
        if on_drop is not None and not callable(on_drop):
            raise ConfigError(f"on_drop must be callable, got {on_drop!r}")
        mode = Execution.parse(execution, is_async(handler))
        budget = self.handler_budget_us if handler_budget_us is None else check_budget(handler_budget_us)
        self._serial += 1
        sub = Subscription(
            self, handler, pats, pol, limit, name or default_name(handler, self._serial),
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

    async def run_subscriber(self, sub: Subscription) -> None:
        """Serve ``sub`` until it is removed.  Handler errors never escape; cancellation does.

        If this task ends for any other reason than the subscriber's removal (cancellation),
        the subscriber is removed too, so no subscriber is left without a task.
        """
        if sub._hot is not self:
            raise ConfigError(f"{sub!r} belongs to another hot path")
        if sub._running:
            raise RuntimeError(f"{sub!r} already has a task")
        await self._serve(sub)

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

    # -- statistics -------------------------------------------------------------------------------------------

    def _sub_stats(self, sub: Subscription) -> SubscriptionStats:
        matched = self._matched(sub)
        if sub.removed is None:
            dropped = sub.dropped
            head = self._cursor
            lag = head - sub.cursor
            if lag > sub.max_lag and sub._hold is None and sub.policy in SKIPPING:
                # A drop_oldest subscriber that has not read for a while (a handler that hangs): what fell out
                # of its window is lost already; it is told (on_drop) when it next reads.
                dropped = max(dropped, matched - sub._taken - self._kept(sub, head))
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
        rows.sort(key=slowness)
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
                if (st.handler_us or st.lag) and (worst is None or slowness(st) < slowness(worst)):
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
