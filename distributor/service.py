"""The distributor loop: ingress batches -> the hot path -> the Redis writer.

One task owns it.  It takes everything queued in one swap (no per-tick await), publishes
the batch to the in-process hot path first (co-located subscribers; never Redis), then
hands it to the writer's bounded buffer.  When a ``block`` subscriber or the writer has no
room it waits, so the ingress fills and the ingress policy decides; nothing else buffers.

With a :class:`~distributor.control.ControlGate` (runtime switches: pause, limit, degrade), every
batch goes through the gate first, so paused, limited or conflated ticks reach neither the hot path
nor Redis.  With no switch in force that costs one attribute check per batch.  While the gate holds
ticks back (conflation), the wait for the next batch is bounded so they go out on time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from consumer_sdk.core.log import Throttle, get_logger
from consumer_sdk.core.tick import Tick
from distributor.control import ControlGate
from distributor.hotpath import HotPath
from distributor.ingress import IngressQueue
from distributor.sink import StreamSink

__all__ = ["BatchHandler", "Distributor"]

BatchHandler = Callable[[Sequence[Tick]], None]
log = get_logger("distributor")


class Distributor:
    def __init__(
        self,
        ingress: IngressQueue[Tick],
        writer: StreamSink,
        *,
        max_batch: int = 20000,
        handlers: Sequence[BatchHandler] = (),
        hotpath: HotPath | None = None,
        gate: ControlGate | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ingress = ingress
        self.gate = gate
        self._clock = clock
        self._writer = writer
        self._hot = hotpath
        self._max_batch = max_batch
        self._handlers = list(handlers)
        self._throttle = Throttle(log)
        #: the batch taken from the ingress and not yet handed to the writer (for a final flush on exit)
        self.in_hand: Sequence[Tick] = ()
        self.batches = 0
        self.handler_errors = 0

    def add_handler(self, handler: BatchHandler) -> None:
        self._handlers.append(handler)

    async def _gated_batch(self, gate: ControlGate) -> Sequence[Tick]:
        """The next batch through the gate, with what it held back and is now due in front of it."""
        ingress, clock = self._ingress, self._clock
        bound = gate.wait_bound(clock())
        batch: Sequence[Tick]
        if bound is None:
            batch = await ingress.get_batch(self._max_batch)
        elif bound <= 0:
            batch = ingress.take(self._max_batch)
        else:
            try:
                async with asyncio.timeout(bound):
                    batch = await ingress.get_batch(self._max_batch)
            except TimeoutError:
                batch = ()
        now = clock()
        due = gate.tick_pending(now)  # older than anything in this batch
        batch = gate.filter(batch, now)
        if due:
            due.extend(batch)
            return due
        return batch

    async def run(self) -> None:
        ingress, writer, hot, gate = self._ingress, self._writer, self._hot, self.gate
        while True:
            if gate is None:
                batch: Sequence[Tick] = await ingress.get_batch(self._max_batch)
            else:
                batch = await self._gated_batch(gate)
                if not batch:
                    continue
            self.batches += 1
            self.in_hand = batch
            if hot is not None and gate is not None and hot.shed is not gate.shed_active:
                hot.set_shed(gate.shed_active)
            if hot is not None and hot.subscriber_count and not hot.publish(batch):
                await hot.wait_room()
            for handler in self._handlers:
                try:
                    handler(batch)
                except Exception as exc:  # a handler's fault must not stop the feed
                    self.handler_errors += 1
                    self._throttle.log(logging.ERROR, "batch_handler_failed", error=repr(exc)[:200])
            while not writer.submit(batch):
                await writer.wait_room()
            self.in_hand = ()
