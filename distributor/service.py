"""The distributor loop: ingress batches -> the hot path -> the Redis writer.

One task owns it.  It takes everything queued in one swap (no per-tick await), publishes
the batch to the in-process hot path first (co-located subscribers; never Redis), then
hands it to the writer's bounded buffer.  When a ``block`` subscriber or the writer has no
room it waits, so the ingress fills and the ingress policy decides; nothing else buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from consumer_sdk._log import Throttle, get_logger
from consumer_sdk.tick import Tick
from distributor.hotpath import HotPath
from distributor.ingress import IngressQueue
from distributor.writer import StreamWriter

__all__ = ["BatchHandler", "Distributor"]

BatchHandler = Callable[[Sequence[Tick]], None]
log = get_logger("distributor")


class Distributor:
    def __init__(
        self,
        ingress: IngressQueue[Tick],
        writer: StreamWriter,
        *,
        max_batch: int = 20000,
        handlers: Sequence[BatchHandler] = (),
        hotpath: HotPath | None = None,
    ) -> None:
        self._ingress = ingress
        self._writer = writer
        self._hot = hotpath
        self._max_batch = max_batch
        self._handlers = list(handlers)
        self._throttle = Throttle(log)
        self.batches = 0
        self.handler_errors = 0

    def add_handler(self, handler: BatchHandler) -> None:
        self._handlers.append(handler)

    async def run(self) -> None:
        ingress, writer, hot = self._ingress, self._writer, self._hot
        while True:
            batch = await ingress.get_batch(self._max_batch)
            self.batches += 1
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
