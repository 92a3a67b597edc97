"""Where the distributor hands ticks for storing: the :class:`StreamSink` seam.

The distributor loop (:class:`~distributor.service.Distributor`) needs three things of the store behind
it, and nothing else: take a batch now or say it has no room (:meth:`StreamSink.submit`), wait for room
(:meth:`StreamSink.wait_room`), and wait until everything taken is stored (:meth:`StreamSink.drain`).
:class:`~distributor.writer.StreamWriter` (Redis Streams) is the real one;
:class:`~distributor.memory.MemorySink` keeps ticks in a list, for unit tests of what sits upstream.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from consumer_sdk.core.tick import Tick

__all__ = ["StreamSink"]


class StreamSink(Protocol):
    """A bounded store the distributor submits batches to (one producer task, on the event loop)."""

    def submit(self, ticks: Iterable[Tick]) -> bool:
        """Take all of ``ticks`` for storing, in order, without waiting; False (nothing taken) when there
        is no room: the caller then awaits :meth:`wait_room` and submits again."""
        ...

    async def wait_room(self) -> None:
        """Return once a refused :meth:`submit` is worth trying again."""
        ...

    async def drain(self) -> None:
        """Return once everything taken so far is stored."""
        ...
