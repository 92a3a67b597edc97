"""The subscribers' tasks: each subscriber is served by one task on the loop, which reads the ring from its own
cursor (:mod:`distributor.hotpath.ring`) and hands what it wants to its handler, where its execution says
(:class:`~distributor.hotpath.policy.Execution`):

- inline (:meth:`Serving._serve_sync`): the handler is called in the task, on the ring's slots in place, one
  chunk at a time; the chunk is timed and judged against the handler's budget
  (:mod:`distributor.hotpath.policy`), and an inline subscriber that overruns repeatedly is moved to a thread;
- async (:meth:`Serving._serve_async`): the task copies its chunk and awaits the handler per tick;
- thread (:meth:`Serving._serve_thread`): the task copies each chunk's matching ticks to the subscriber's
  thread (:class:`~distributor.hotpath.subscription.Worker`, where the hand-off is described) and takes what
  it passes back (errors, latency samples).

A ``drop_newest`` hold is read the same way by all three (:meth:`~distributor.hotpath.ring.Ring._held`), and
the async, thread and held-back deliveries account their chunks through the same two calls
(``Subscription._begin_chunk`` / ``_end_chunk``); the inline loop over the ring keeps its own copy of that
bookkeeping, once per chunk, and nothing of it per tick.

An async handler that never returns is bounded the same way as a slow thread: its task holds one chunk (a copy),
its cursor stays behind, and its policy acts on the ring (what its stats then say:
:mod:`distributor.hotpath.stats`).
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import Awaitable, Callable
from itertools import compress
from typing import cast

from consumer_sdk.core.latency import LatencyHistogram, bucket_of, check_sample_every
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.tick import Tick
from distributor.hotpath.policy import (
    HANDOFF_CHUNKS,
    MIN_OVERRUN_NS,
    OFFLOAD_AFTER,
    OFFLOAD_WINDOW,
    PROBATION_CHUNK,
    Execution,
    offload_due,
    overran,
    probation_chunk,
)
from distributor.hotpath.ring import Ring
from distributor.hotpath.stats import LUT, LUT_SIZE
from distributor.hotpath.subscription import Subscription, Worker

__all__ = ["Serving"]

log = get_logger("hotpath")


class Serving(Ring):
    """The subscribers' tasks of a :class:`~distributor.hotpath.HotPath` (its base class, over the ring)."""

    def __init__(
        self, capacity: int, max_streams: int, clock: Callable[[], int], max_chunk: int, sample_every: int
    ) -> None:
        super().__init__(capacity, max_streams, clock)
        self.max_chunk = max_chunk
        #: a synchronous subscriber's deliveries are timed into ``latency`` one chunk in this many (0: never)
        self.sample_every = check_sample_every(sample_every)
        self.latency = LatencyHistogram()  # publish stamp -> handler call, µs, every subscriber
        #: subscribers moved to a thread of their own for overrunning their budget
        self.offloaded = 0
        self._overrun_log = Throttle(log, interval=10.0)  # an overrun may be the machine's doing: a line in 10 s

    async def _serve(self, sub: Subscription) -> None:
        """A subscriber's task (:meth:`~distributor.hotpath.HotPath.run_subscriber`, which checks it is ours and
        has no other task): serve ``sub`` until it is removed, by its execution; removed if the task ends
        otherwise (cancellation), and its counters folded into the totals as it ends."""
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
        lut = LUT
        every = countdown = self.sample_every
        while sub.removed is None:
            if sub._hold is not None:
                held = self._held(sub, sub._hold)
                if held is not None:
                    sub._begin_chunk(len(held[0]), clock())
                    self._deliver_held(sub, *held)
                    n, ns = sub._end_chunk(clock())
                    if n and self._judge(sub, n, ns):
                        return
                    await asyncio.sleep(0)
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
                    buckets[lut[us] if 0 <= us < LUT_SIZE else bucket_of(max(us, 0))] += m
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
                if (ns > MIN_OVERRUN_NS or sub._marks) and self._judge(sub, n, ns):
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

    def _deliver_held(self, sub: Subscription, ticks: list[Tick], sids: list[int], tstamps: list[int]) -> None:
        """Hand a held-back chunk to an inline handler, each tick timed when ``sample_every`` is not 0: the
        synchronous twin of :meth:`_deliver_async` (the caller accounts the chunk)."""
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
                held = self._held(sub, sub._hold)
                if held is not None:
                    await self._deliver_async(sub, *held)
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
        """Await an async handler on a chunk (a copy: the publisher runs meanwhile), each tick timed when
        ``sample_every`` is not 0, and account the chunk; then let the others have their turn."""
        match = sub._match
        handler = cast(Callable[[Tick], Awaitable[object]], sub.handler)
        clock = self._clock
        observe = self.latency.observe
        timed = self.sample_every > 0
        sub._begin_chunk(len(ticks), clock())
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
            sub._end_chunk(clock())
        await asyncio.sleep(0)

    # -- thread subscribers -----------------------------------------------------------------------------------

    async def _serve_thread(self, sub: Subscription) -> None:
        """A thread subscriber's task: it reads the ring like any subscriber (so its policy acts there) and
        hands the matching ticks of each chunk to its thread, at most HANDOFF_CHUNKS chunks at a time."""
        loop = asyncio.get_running_loop()
        worker = sub._worker
        if worker is None:
            worker = sub._worker = Worker(sub, loop, self.sample_every, self._clock, self._poke)
            worker.thread.start()
        ring, ring_sids, stamps = self._ring, self._ring_sids, self._stamps
        match = sub._match
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
                held = self._held(sub, sub._hold)
                if held is not None:
                    ticks, _, tstamps = held
                    worker.hand(ticks, tstamps if worker.timed() else None)
                continue
            span = self._take(sub)
            if span is None:
                await self._sleep(sub, loop)
                continue
            a, b = span
            timed = worker.timed()
            if sub._wants_all:
                sub._taken += b - a
                worker.hand(ring[a:b], stamps[a:b] if timed else None)
            else:
                keep = list(map(match.__getitem__, ring_sids[a:b]))
                ticks = list(compress(ring[a:b], keep))
                if ticks:
                    sub._taken += len(ticks)
                    worker.hand(ticks, list(compress(stamps[a:b], keep)) if timed else None)

    def _fold(self, sub: Subscription, worker: Worker) -> None:
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
                buckets[LUT[us] if us < LUT_SIZE else bucket_of(us)] += m
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
