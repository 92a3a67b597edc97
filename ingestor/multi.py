"""Several venues in one process: one :class:`~ingestor.service.Ingestor` per venue, on one event loop.

``market ingest`` with ``[venues.<name>]`` tables (:func:`ingestor.config.load_venues`) runs a
:class:`VenueRunner`: each venue's ingestor is a whole pipeline of its own (its connections, sequencer, ingress
queue, hot path, writer, spill log in a subdirectory named after the venue, control gate and heartbeat, whose id
names the venue), all sharing the process's Redis client, its one metrics port
(:class:`~ingestor.metrics.VenuesCollector`) and its one stop.  Stream keys stay ``<prefix>:<venue>:<SYMBOL>:
<channel>``, so the venues never write the same stream, and every ingestor follows the one control state
(``market ctl pause okx:*:*`` reaches the ingestor whose venue the pattern names).

A venue's failures stay its own.  A lost connection is its session's to retry, as with one venue.  An ingestor
that ends with an error once it has been live (a connection of it was) is logged (``venue_failed``) and replaced by
a fresh one built from the same settings after a capped, jittered backoff, while the other venues go on; like any
start, the new one continues each stream after the newest seq Redis (or its spill log) holds and repairs the hole
from the venue (what the failed one held in memory is not saved: its last ticks are that hole).  An error before
a venue was first live (a spill directory in use, Redis refusing at start, the venue refusing the URL) stops the
process, as it does with one venue: a configuration to fix, not a fault to ride out.  A replacement attaches the
configured ``[[subscribers]]`` again; one attached by code (:meth:`~ingestor.service.Ingestor.subscribe`) is the
attaching code's to attach again to :attr:`VenueRunner.ingestors`' new ingestor.

A stop (cancellation: SIGTERM, Ctrl-C) reaches every venue at once; each saves what it holds within its
``[shutdown]`` budget, and :attr:`VenueRunner.stop_reports` holds each venue's :class:`~ingestor.service.StopReport`.
:func:`unsaved_at_stop` turns them into the one exit status: :class:`VenuesUnsavedAtStop`, naming every venue's
unsaved count, when any venue stopped with ticks saved nowhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from consumer_sdk.core.backoff import Backoff
from consumer_sdk.core.errors import ConfigError, MarketError
from consumer_sdk.core.log import get_logger, log_event
from ingestor.config import IngestSettings
from ingestor.heartbeat import HeartbeatState, Identity
from ingestor.service import Ingestor, StopReport

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ingestor.venue import Connector

__all__ = ["VenueRunner", "VenuesUnsavedAtStop", "stop_summary", "unsaved_at_stop"]

log = get_logger("ingestor")

#: a run of at least this long resets a venue's restart backoff
HEALTHY_RUN_S = 60.0


class VenuesUnsavedAtStop(MarketError):
    """The process stopped with ticks that one or more venues could store neither in Redis nor in their spill log."""

    def __init__(self, reports: Mapping[str, StopReport]) -> None:
        super().__init__(f"stopped with ticks saved neither to Redis nor to the spill log: {stop_summary(reports)}")
        self.reports = dict(reports)


def stop_summary(reports: Mapping[str, StopReport]) -> str:
    """``binance 0 unsaved, okx 12 unsaved``: every venue's unsaved count, in the order given (pure)."""
    return ", ".join(f"{venue} {r.unsaved} unsaved" for venue, r in reports.items())


def unsaved_at_stop(reports: Mapping[str, StopReport]) -> VenuesUnsavedAtStop | None:
    """The error to end the process with when any venue stopped with unsaved ticks, else None (pure)."""
    return VenuesUnsavedAtStop(reports) if any(r.unsaved for r in reports.values()) else None


class VenueRunner:
    """One :class:`Ingestor` per venue of ``settings`` (distinct venues), run together by :meth:`run`.

    ``redis`` is the client every venue shares (None: each connects its own); ``connectors`` opens a venue's
    connections by venue name (None or absent: WebSockets); ``restart_base_s`` and ``restart_cap_s`` bound the
    backoff before a failed venue's ingestor is replaced."""

    def __init__(
        self,
        settings: Sequence[IngestSettings],
        *,
        redis: aioredis.Redis | None = None,
        connectors: Mapping[str, Connector] | None = None,
        restart_base_s: float = 1.0,
        restart_cap_s: float = 30.0,
    ) -> None:
        venues = [s.venue for s in settings]
        if not venues or len(set(venues)) != len(venues):
            raise ConfigError(f"expected one or more distinct venues, got {venues}")
        self.settings: dict[str, IngestSettings] = {s.venue: s for s in settings}
        self._redis = redis
        self._connectors = dict(connectors or {})
        self._restart_base_s = restart_base_s
        self._restart_cap_s = restart_cap_s
        #: each venue's ingestor now (a failed one is replaced by a fresh one)
        self.ingestors: dict[str, Ingestor] = {venue: self._build(s) for venue, s in self.settings.items()}
        #: times each venue's ingestor was replaced after failing
        self.restarts: dict[str, int] = dict.fromkeys(self.settings, 0)
        #: each venue's last failure ("" when none)
        self.last_error: dict[str, str] = dict.fromkeys(self.settings, "")
        #: what each venue's stop did with the ticks it held (filled by a stop)
        self.stop_reports: dict[str, StopReport] = {}
        #: set once every venue's ingestor has started
        self.started = asyncio.Event()

    def _build(self, settings: IngestSettings) -> Ingestor:
        ingestor = Ingestor(settings, redis=self._redis, connector=self._connectors.get(settings.venue))
        if len(self.settings) > 1:
            # Its heartbeat id names its venue: several ingestors of one process report side by side.
            ingestor.heartbeat = HeartbeatState(Identity.new(time.time(), venue=settings.venue))
        return ingestor

    def running(self) -> list[Ingestor]:
        """The ingestors running now, one per venue (what the metrics exporter reads at each scrape)."""
        return list(self.ingestors.values())

    async def run(self) -> None:
        """Run every venue until cancelled; each venue's stop report lands in :attr:`stop_reports`.  An error a
        venue meets before it was first live ends the run, raised as it is (the other venues stop, saving what
        they hold)."""
        try:
            async with asyncio.TaskGroup() as tg:
                for venue in self.settings:
                    tg.create_task(self._keep(venue), name=f"venue-{venue}")
                tg.create_task(self._all_started(), name="venues-started")
        except BaseExceptionGroup as group:
            first = _first_error(group)
            if first is not None:
                raise first from None
            raise

    async def _all_started(self) -> None:
        await asyncio.gather(*(ingestor.started.wait() for ingestor in list(self.ingestors.values())))
        self.started.set()

    async def _keep(self, venue: str) -> None:
        """Run ``venue``'s ingestor; once it has been live, replace it whenever it fails."""
        backoff = Backoff(base=self._restart_base_s, cap=self._restart_cap_s)
        ever_started = False
        while True:
            ingestor = self.ingestors[venue]
            began = time.monotonic()
            try:
                await ingestor.run()
            except asyncio.CancelledError:
                if ingestor.stop_report is not None:
                    self.stop_reports[venue] = ingestor.stop_report
                raise
            except Exception as exc:
                ever_started = ever_started or any(s.been_live for s in ingestor.sessions)
                if not ever_started or len(self.settings) == 1:
                    raise
                error = _describe(exc)
                self.last_error[venue] = error
                if time.monotonic() - began >= HEALTHY_RUN_S:
                    backoff.reset()
                delay = backoff.next_delay()
                log_event(log, logging.ERROR, "venue_failed", venue=venue, error=error, restart_in_s=round(delay, 3),
                          restarts=self.restarts[venue])
            else:  # run() ends only when cancelled: with several venues, a return is a failure like any other
                if len(self.settings) == 1:
                    return
                delay = backoff.next_delay()
                log_event(log, logging.ERROR, "venue_failed", venue=venue, error="stopped by itself",
                          restart_in_s=round(delay, 3), restarts=self.restarts[venue])
            await asyncio.sleep(delay)
            self.ingestors[venue] = self._build(self.settings[venue])
            self.restarts[venue] += 1
            log_event(log, logging.INFO, "venue_restarted", venue=venue, restarts=self.restarts[venue])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        first = _first_error(exc) or exc.exceptions[0]
        return _describe(first)
    return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:300]


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The first error of ``group`` that is not a cancellation (nested groups opened)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_error(exc)
            if inner is not None:
                return inner
        elif not isinstance(exc, asyncio.CancelledError):
            return exc
    return None
