"""The hot path's ring: the publisher's half and the cursors' arithmetic.

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
:mod:`distributor.hotpath.subscription`), so a read never sees a half-written value; the metrics exporter
thread only reads integers.

Exact accounting, for every subscriber at every moment::

    matched = delivered + dropped + pending

``matched`` is the number of published ticks matching it since it subscribed: the sum of
the publisher's per-stream counters over its matching streams, less the same sum taken when
it subscribed.  A lapped ``drop_oldest`` subscriber moves its cursor to ``head - max_lag``
and counts ``missed = matched(head) - (delivered + dropped) - matched_in(head - max_lag, head)``,
the last term counted over the ring's stream-id list at C speed; nothing per tick is kept
for this, and the subscribers that keep up pay nothing for it.

Publishing with a ``block`` subscriber::

    if not hot.publish(batch):
        await hot.wait_room()

``publish`` never awaits.  It puts as much of the batch into the ring as every ``block``
subscriber has room for and returns True when all of it went in.  Otherwise it keeps the rest
(a reference, not a copy) and returns False; ``wait_room`` then publishes that rest as the
``block`` subscribers make room and returns once all of it is in the ring.  Calling
``publish`` again before that raises ``RuntimeError``.  Without ``block`` subscribers,
``publish`` always returns True.

The subscribers' tasks that read the ring are :mod:`distributor.hotpath.serving`; a subscriber's own state is
:mod:`distributor.hotpath.subscription`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import compress
from operator import itemgetter
from typing import Final, cast

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import StreamName
from consumer_sdk.core.log import get_logger, log_event
from consumer_sdk.core.tick import Tick
from distributor.hotpath.policy import SubscriberPolicy
from distributor.hotpath.subscription import Subscription
from distributor.registry import parse_stream

__all__ = ["Ring", "StreamIdent"]

log = get_logger("hotpath")

_VACANT: Final = cast(Tick, {})
_stream_key: Final = itemgetter("venue", "symbol", "channel")
StreamIdent = tuple[str, str, str]


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


class Ring:
    """The ring, the stream table and the subscriber lists of a :class:`~distributor.hotpath.HotPath` (its
    base class): publishing, routing, the cursors' arithmetic, holds and removal.  Not used on its own."""

    def __init__(self, capacity: int, max_streams: int, clock: Callable[[], int]) -> None:
        """``capacity``: a power of two (checked by the hot path)."""
        self.capacity = capacity
        self.max_streams = max_streams
        self._mask = capacity - 1
        self._segment = capacity // 2  # largest write between two limit checks (see _write)
        self._clock = clock
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
        self._closed = False  # set by close(): publish refuses
        # What removed subscribers leave behind, folded in when their task ends (see _retire).
        self._gone_delivered = 0
        self._gone_errors = 0
        self._gone_overruns = 0
        self._dropped_gone: Counter[str] = Counter()
        self.disconnected = 0
        self.removed = 0
        self.blocked = 0

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
        self._dropped_gone[sub.policy.value] += self._matched(sub) - sub.delivered  # removed: all it missed
        if not self._subs and not self._retiring:
            self._vacate()  # the distributor publishes nothing while no one subscribes: free the ring now

    # -- a subscriber's reads ---------------------------------------------------------------------------------

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
        missed = self._matched(sub) - sub._taken - sub.dropped - self._kept(sub, head)
        sub.cursor = new_c
        if missed > 0:
            self._report_drop(sub, missed)
        return new_c

    def _held(
        self, sub: Subscription, hold: tuple[list[Tick], list[int], list[int]]
    ) -> tuple[list[Tick], list[int], list[int]] | None:
        """drop_newest: the next chunk of its ``hold`` (``sub._hold``): ticks, stream ids and publish stamps, at
        most its chunk limit of them (copies), counted as taken; None once the hold is read (it then resumes at
        the head, see :meth:`_finish_hold`).  Every kind of subscriber reads its hold through this."""
        ticks, sids, stamps = hold
        i = sub._hold_at
        if i >= len(ticks):
            self._finish_hold(sub)
            return None
        j = sub._hold_at = i + sub._chunk_limit
        chunk = ticks[i:j]
        sub._taken += len(chunk)  # a hold holds only ticks it wants
        return chunk, sids[i:j], stamps[i:j]

    def _kept(self, sub: Subscription, head: int) -> int:
        """The ticks ``sub`` wants among the newest ``max_lag`` published before ``head``: what a lapped
        subscriber still gets (counted over the ring's stream ids at C speed)."""
        if sub._wants_all:
            return sub.max_lag
        want = sub._match.__getitem__
        return sum(sum(map(want, self._ring_sids[a:b])) for a, b in self._spans(head - sub.max_lag, head))

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
