"""Prometheus export for a process that runs consumers: ``market_consumer_lag{group, stream}``.

The gauge is the number of entries of each stream not yet delivered to the consumer's group (Redis 7's
``lag``; on older Redis the estimate of :func:`consumer_sdk.consumer.lag_estimate`), sampled every
``interval`` seconds by :meth:`LagExporter.run` and read by Prometheus from the last sample.
prometheus-client is imported only when Prometheus collects: the SDK itself needs only redis and orjson.

::

    exporter = LagExporter([consumer])
    registry = CollectorRegistry()
    registry.register(exporter)
    server, thread = start_http_server(9465, registry=registry)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(consumer.run(handler))
        tg.create_task(exporter.run())
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from consumer_sdk.consumer import Consumer
from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.errors import MarketError
from consumer_sdk.core.log import Throttle, get_logger

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = ["LagExporter"]

log = get_logger("consumer")


class LagExporter:
    """Samples the lag of each consumer's group (:meth:`run`) for Prometheus to read (:meth:`collect`)."""

    def __init__(self, consumers: Sequence[Consumer], *, interval: float = 5.0) -> None:
        self._consumers = list(consumers)
        self._interval = interval
        self._lag: dict[tuple[str, str], int] = {}
        self._throttle = Throttle(log, interval=5.0)

    @property
    def lag(self) -> dict[tuple[str, str], int]:
        """The last sample: ``(group, venue:SYMBOL:channel) -> entries not yet delivered``."""
        return dict(self._lag)

    async def sample(self) -> None:
        lag: dict[tuple[str, str], int] = {}
        for consumer in self._consumers:
            try:
                per_key = await consumer.lag()
            except (MarketError, OSError) as exc:
                self._throttle.log(logging.WARNING, "lag_sample_failed", group=consumer.group, error=str(exc)[:200])
                lag.update({k: v for k, v in self._lag.items() if k[0] == consumer.group})  # keep the last known
                continue
            for key, n in per_key.items():
                lag[(consumer.group, key.partition(":")[2])] = n  # the key without its prefix
        self._lag = lag  # one assignment: the exporter thread reads the old sample or the new one

    async def run(self) -> None:
        """Sample every ``interval`` seconds until cancelled."""
        while True:
            await self.sample()
            reraise_if_cancelling()  # redis-py may absorb a cancellation and answer as if nothing happened
            await asyncio.sleep(self._interval)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        fam = GaugeMetricFamily(
            "market_consumer_lag", "Stream entries not yet delivered to the consumer group", labels=["group", "stream"]
        )
        for (group, stream), n in sorted(self._lag.items()):
            fam.add_metric([group, stream], n)
        yield fam
