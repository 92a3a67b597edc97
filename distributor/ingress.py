"""The bounded ingress queue between the venue sessions and the distributor.

Producers (the venue sessions, all tasks on one event loop) put ticks; one
consumer (the distributor task) takes them in batches by swapping the whole
buffer out: O(1) per batch, no lock, no per-tick await.  When the queue is full
the configured policy decides:

- ``drop_newest``: the incoming tick is dropped (counted);
- ``drop_oldest``: the oldest queued tick is dropped to make room (counted);
- ``block``: the producer awaits :meth:`IngressQueue.put` until there is room, so the
  venue socket stops being read and TCP pushes back on the venue.

Each time the queue turns full a backpressure event is counted.

``on_drop`` (optional) is called with each tick a drop policy dropped, synchronously, before anything newer
is queued: the ingestor gives :meth:`distributor.control.ControlGate.dropped`, so an order book that lost an
entry here is resynced before its next diff is stored (a stored book stream is never left broken).  It costs
nothing while nothing is dropped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from consumer_sdk.core.errors import ConfigError

__all__ = ["IngressQueue", "IngressStats", "Policy"]

T = TypeVar("T")


class Policy(StrEnum):
    DROP_NEWEST = "drop_newest"
    DROP_OLDEST = "drop_oldest"
    BLOCK = "block"

    @classmethod
    def parse(cls, text: str) -> Policy:
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(
                f"unknown queue policy {text!r}: expected one of {', '.join(p.value for p in cls)}"
            ) from None


@dataclass(frozen=True, slots=True)
class IngressStats:
    length: int
    capacity: int
    policy: Policy
    offered: int
    dropped: int
    backpressure_events: int

    @property
    def fill_ratio(self) -> float:
        return self.length / self.capacity


class IngressQueue(Generic[T]):
    """Bounded multi-producer (same loop), single-consumer queue with a full-queue policy."""

    __slots__ = (
        "_buf", "_full", "_not_empty", "_room", "backpressure_events", "capacity", "dropped",
        "offered", "on_drop", "policy",
    )

    def __init__(
        self, capacity: int, policy: Policy | str = Policy.DROP_OLDEST, on_drop: Callable[[T], None] | None = None
    ) -> None:
        if capacity < 1:
            raise ConfigError(f"ingress capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.policy = policy if isinstance(policy, Policy) else Policy.parse(policy)
        self._buf: deque[T] = deque()
        self._not_empty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._full = False
        self.offered = 0
        self.dropped = 0
        self.backpressure_events = 0
        #: called with each item a drop policy dropped (see the module doc)
        self.on_drop = on_drop

    def __len__(self) -> int:
        return len(self._buf)

    def _on_full(self) -> None:
        if not self._full:
            self._full = True
            self.backpressure_events += 1

    def offer(self, item: T) -> bool:
        """Put without waiting.  Under ``block`` a full queue returns False and keeps nothing:
        the caller must then ``await put(item)``.  Under the drop policies it always returns True."""
        buf = self._buf
        if len(buf) >= self.capacity:
            self._on_full()
            if self.policy is Policy.BLOCK:
                self._room.clear()
                return False
            self.offered += 1
            self.dropped += 1
            on_drop = self.on_drop
            if self.policy is Policy.DROP_NEWEST:
                if on_drop is not None:
                    on_drop(item)
                return True
            oldest = buf.popleft()
            if on_drop is not None:
                on_drop(oldest)
        else:
            self.offered += 1
        buf.append(item)
        if not self._not_empty.is_set():
            self._not_empty.set()
        return True

    async def put(self, item: T) -> None:
        """Put, waiting for room under ``block``; same as :meth:`offer` under the drop policies."""
        while not self.offer(item):
            await self._room.wait()

    async def get_batch(self, max_items: int) -> deque[T] | list[T]:
        """Wait until something is queued, then take up to ``max_items`` in arrival order."""
        while not self._buf:
            self._not_empty.clear()
            await self._not_empty.wait()
        return self.take(max_items)

    def take(self, max_items: int) -> deque[T] | list[T]:
        """Take up to ``max_items`` without waiting (possibly none)."""
        buf = self._buf
        if len(buf) <= max_items:
            self._buf = deque()
            batch: deque[T] | list[T] = buf
        else:
            pop = buf.popleft
            batch = [pop() for _ in range(max_items)]
        if self._full and len(self._buf) < self.capacity:
            self._full = False
        if not self._room.is_set():
            self._room.set()
        return batch

    def stats(self) -> IngressStats:
        return IngressStats(
            length=len(self._buf), capacity=self.capacity, policy=self.policy, offered=self.offered,
            dropped=self.dropped, backpressure_events=self.backpressure_events,
        )
