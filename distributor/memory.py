"""An in-memory :class:`~distributor.sink.StreamSink`, for unit tests of what feeds the store.

:class:`MemorySink` keeps every submitted tick in :attr:`MemorySink.stored`, in order, up to
``capacity`` ticks not yet taken by the test: holding that many, :meth:`MemorySink.submit` refuses, as
the real writer does when its buffer (and spill log) is full, until the test calls :meth:`MemorySink.take`.
No I/O, no task: storing is immediate, so :meth:`MemorySink.drain` returns at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.tick import Tick
from distributor.sink import StreamSink

__all__ = ["MemorySink"]


class MemorySink(StreamSink):
    """Ticks stored in a list.  ``capacity``: ticks held at which it refuses (None: no bound); as the
    writer's buffer, a batch taken below it is taken whole."""

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ConfigError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        #: what was submitted and not yet taken, in order
        self.stored: list[Tick] = []
        #: batches taken, and refused for want of room
        self.batches = 0
        self.refused = 0
        self._room = asyncio.Event()
        self._room.set()

    def submit(self, ticks: Iterable[Tick]) -> bool:
        if self.capacity is not None and len(self.stored) >= self.capacity:
            self.refused += 1
            self._room.clear()
            return False
        self.stored.extend(ticks)
        self.batches += 1
        return True

    async def wait_room(self) -> None:
        await self._room.wait()

    async def drain(self) -> None:
        return None

    def take(self) -> list[Tick]:
        """Everything stored so far (then forgotten), which makes room."""
        out, self.stored = self.stored, []
        self._room.set()
        return out
