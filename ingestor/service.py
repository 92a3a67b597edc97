"""The ingestor process: venue sessions -> sequencer -> ingress -> distributor -> Redis.

Everything runs on one event loop in one thread, in one :class:`asyncio.TaskGroup`
owned by :meth:`Ingestor.run`: a task per venue connection (reads the socket,
parses, sequences, enqueues), one distributor task (drains the ingress in batches)
and one writer task (appends to Redis).  Each piece of state has exactly one owner
task, so nothing takes a lock.  The Prometheus exporter runs in its own thread and
only reads counters.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from consumer_sdk._log import get_logger, log_event
from consumer_sdk.consumer import Handler
from consumer_sdk.errors import ConfigError, InvalidTick, TransientError
from consumer_sdk.keys import Pattern, parse_entry_id, stream_key
from consumer_sdk.latency import LatencyHistogram
from consumer_sdk.server import require_supported
from consumer_sdk.tick import Tick, decode_tick
from distributor.control import ControlGate, ControlState, WindowPercentile
from distributor.hotpath import HOT_SAMPLE_EVERY, HotPath, Subscription
from distributor.ingress import IngressQueue
from distributor.registry import Changes, ChannelRegistry
from distributor.service import BatchHandler, Distributor
from distributor.spill import SpillLog
from distributor.writer import StreamWriter
from ingestor.binance import channel_to_stream
from ingestor.config import IngestSettings, redact_url
from ingestor.control_plane import run_auto_degrade, watch_control
from ingestor.heartbeat import heartbeat_loop
from ingestor.repair import GapRepairer
from ingestor.rest import VenueRest
from ingestor.sequencer import Sequencer
from ingestor.session import VenueSession
from ingestor.subscriptions import plan_connections

__all__ = ["Ingestor", "IngestorStats", "connect_redis"]

log = get_logger("ingestor")
FLUSH_ON_EXIT_S = 5.0


@dataclass(frozen=True, slots=True)
class IngestorStats:
    connections: int
    connections_live: int
    reconnects: int
    frames: int
    ticks: int
    malformed: int
    unsupported: int


def load_handler(target: str) -> Handler:
    """``package.module:handler`` -> the callable; :class:`ConfigError` naming what is wrong."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"subscriber {target!r}: cannot import {module_name!r}: {exc}") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"subscriber {target!r}: {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise ConfigError(f"subscriber {target!r}: {attr!r} is not callable")
    return cast(Handler, obj)


async def connect_redis(url: str, *, socket_timeout: float = 10.0) -> aioredis.Redis:
    """A client for ``url`` that has answered PING; :class:`TransientError` naming the (redacted) URL if not,
    :class:`ConfigError` when the server is older than the supported floor (:mod:`consumer_sdk.server`)."""
    client = aioredis.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=5.0, health_check_interval=30
    )
    try:
        await client.ping()
        await require_supported(client, redact_url(url))
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise TransientError(f"Redis unreachable at {redact_url(url)}: {exc}") from None
    except ConfigError:
        await client.aclose()
        raise
    return client


class Ingestor:
    """Build with settings, optionally add batch handlers, then ``await run()``."""

    def __init__(self, settings: IngestSettings, *, redis: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self._redis = redis
        self.sequencer = Sequencer()
        self.ingress: IngressQueue[Tick] = IngressQueue(settings.queue_capacity, settings.queue_policy)
        self.ingest_latency = LatencyHistogram()
        self.sessions: list[VenueSession] = []
        self.writer: StreamWriter | None = None
        self.repairer: GapRepairer | None = None
        self.distributor: Distributor | None = None
        self._handlers: list[BatchHandler] = []
        #: runtime switches (``market ctl``), applied by the distributor to every batch
        self.control = ControlGate()
        self.control_rejected = 0
        # The hot path's unit is a chunk (many ticks, timed as one): one chunk in 4 at most.
        self.hotpath = HotPath(sample_every=min(settings.latency_sample, HOT_SAMPLE_EVERY))
        configured = [f"{settings.venue}:{symbol}:{channel}" for symbol, channel, _ in self.streams()]
        self.hotpath.declare(configured)
        on_demand = [Pattern(p) for p in settings.on_demand]
        #: which venue streams are held: the configured ones that persist, plus what subscribers ask for
        self.registry = ChannelRegistry(
            known=configured,
            persist=[c for c in configured if not any(p.matches(c) for p in on_demand)],
            grace=settings.release_grace_s,
        )
        self._wants: dict[Subscription, tuple[str, ...]] = {}
        self._tg: asyncio.TaskGroup | None = None
        for spec in settings.subscribers:
            self.subscribe(load_handler(spec.target), spec.patterns, policy=spec.policy, name=spec.target)
        self.started = asyncio.Event()
        self._lock_fd = -1

    def streams(self) -> list[tuple[str, str, str]]:
        """(symbol, channel, venue stream name) for everything configured."""
        return [
            (symbol, channel, channel_to_stream(symbol, channel))
            for symbol in self.settings.symbols
            for channel in self.settings.channels
        ]

    def subscribe(
        self,
        handler: Handler,
        patterns: str | Sequence[str],
        *,
        policy: str = "drop_oldest",
        name: str | None = None,
        max_lag: int | None = None,
        max_consecutive_failures: int | None = None,
    ) -> Subscription:
        """Attach a co-located subscriber: ``handler(tick)`` (sync or async, the consumer SDK's signature)
        for every tick matching ``patterns``, fed by the hot path in this process, never through Redis."""
        sub = self.hotpath.subscribe(
            handler, patterns, policy=policy, name=name, max_lag=max_lag,
            max_consecutive_failures=max_consecutive_failures,
        )
        wanted = tuple(p.text for p in sub.patterns)
        self.registry.want(wanted)
        self._wants[sub] = wanted
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Detach a co-located subscriber; streams nobody wants any more are released after the grace period."""
        self.hotpath.unsubscribe(sub)
        self._sync_wants()

    def _sync_wants(self) -> None:
        """Release what removed subscribers asked for (removed by us, by their policy, or by failures)."""
        for sub in [s for s in self._wants if s.removed is not None]:
            self.registry.release(self._wants.pop(sub))

    def _new_session(self, streams: list[str]) -> VenueSession:
        s = self.settings
        assert self.repairer is not None
        session = VenueSession(
            ws_base=s.url, streams=streams, ingress=self.ingress, sequencer=self.sequencer,
            ingest_latency=self.ingest_latency, repairer=self.repairer, settings=s.session,
            sample_every=s.latency_sample,
        )
        self.sessions.append(session)
        if self._tg is not None:
            self._tg.create_task(session.run(), name=f"session-{session.session_id}")
        return session

    def apply_changes(self, changes: Changes) -> None:
        """Carry out the registry's decision at the venue: new streams go to the connection with the most
        room (a new one when all are full); released ones are unsubscribed and their state freed."""
        limit = self.settings.max_streams_per_connection
        for name in changes.unsubscribe:
            stream = channel_to_stream(name.symbol, name.channel)
            for session in self.sessions:
                session.remove_streams([stream])
            self.sequencer.release(name.venue, name.symbol, name.channel)
            log_event(log, logging.INFO, "stream_released", stream=str(name))
        adds = [channel_to_stream(n.symbol, n.channel) for n in changes.subscribe]
        while adds:
            roomiest = min(self.sessions, key=lambda x: len(x.streams), default=None)
            if roomiest is None or len(roomiest.streams) >= limit:
                roomiest = self._new_session([])
            room = limit - len(roomiest.streams)
            roomiest.add_streams(adds[:room])
            adds = adds[room:]
        for name in changes.subscribe:
            log_event(log, logging.INFO, "stream_held", stream=str(name))

    async def _registry_loop(self) -> None:
        """Once a second: follow subscribers' wants and release idle streams after the grace period."""
        while True:
            await asyncio.sleep(1.0)  # the registry's period; releases are in tens of seconds
            self._sync_wants()
            self.hotpath.set_shed(self.control.shed_active)  # automatic degradation may have changed it
            self.registry.suppress(self.control.state.unsubscribe_patterns())  # `market ctl pause --unsubscribe`
            changes = self.registry.tick(time.monotonic())
            if changes:
                self.apply_changes(changes)

    def add_batch_handler(self, handler: BatchHandler) -> None:
        """Called with every batch taken from the ingress, in the distributor task, before Redis."""
        self._handlers.append(handler)

    async def _seed(self, redis: aioredis.Redis) -> None:
        """Continue every stream after the newest seq Redis holds (restart safety)."""
        s = self.settings
        names = [(symbol, channel) for symbol, channel, _ in self.streams()]
        pipe = redis.pipeline(transaction=False)
        for symbol, channel in names:
            pipe.xrevrange(stream_key(s.venue, symbol, channel, s.prefix), "+", "-", count=1)
        tops = await pipe.execute()
        for (symbol, channel), top in zip(names, tops, strict=True):
            if top:
                _, seq = parse_entry_id(top[0][0])
                self.sequencer.seed(s.venue, symbol, channel, seq)
                log_event(log, logging.INFO, "stream_resumed", stream=f"{symbol}:{channel}", last_seq=seq)

    def _open_spill(self) -> SpillLog | None:
        s = self.settings
        if not s.spill_dir:
            return None
        spill = SpillLog(s.spill_dir, fsync=s.spill_fsync, max_bytes=s.spill_max_bytes)
        lock_path = os.path.join(s.spill_dir, "lock")
        self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            spill.close()
            raise ConfigError(
                f"spill directory {s.spill_dir!r} is in use by another ingestor: give each its own (--spill-dir)"
            ) from None
        if len(spill):
            log_event(log, logging.WARNING, "spill_found_at_start", records=len(spill), directory=s.spill_dir)
            self._seed_from_spill(spill)
        return spill

    def _seed_from_spill(self, spill: SpillLog) -> None:
        """Ticks spilled before a crash are newer than Redis: continue after them."""
        last: dict[tuple[str, str, str], int] = {}
        for raw in spill.scan():
            try:
                t = decode_tick(raw)
            except InvalidTick:
                continue
            last[(t["venue"], t["symbol"], t["channel"])] = t["seq"]
        for (venue, symbol, channel), seq in last.items():
            self.sequencer.seed(venue, symbol, channel, seq)

    async def run(self) -> None:
        s = self.settings
        redis = self._redis or await connect_redis(s.redis_url)
        spill: SpillLog | None = None
        try:
            await self._seed(redis)
            spill = self._open_spill()
            self.writer = StreamWriter(
                redis, prefix=s.prefix, retention=s.retention, capacity=s.writer_capacity, spill=spill,
                sample_every=s.latency_sample,
            )
            self.distributor = Distributor(
                self.ingress, self.writer, handlers=self._handlers, hotpath=self.hotpath, gate=self.control
            )
            hot_p99, redis_p99 = WindowPercentile(self.hotpath.latency), WindowPercentile(self.writer.ack_latency)

            def pressure() -> tuple[float, float]:
                return self.ingress.stats().fill_ratio, max(hot_p99.sample(), redis_p99.sample())

            initial = self.registry.tick(time.monotonic()).subscribe
            plan = plan_connections(
                [channel_to_stream(n.symbol, n.channel) for n in initial], s.max_streams_per_connection
            )
            self.repairer = GapRepairer(VenueRest(s.rest_url), self.ingress, self.sequencer, s.repair)
            self.sessions = []
            for group in plan:
                self._new_session(group)
            log_event(
                log, logging.INFO, "ingestor_started", venue=s.venue, url=s.url, redis=redact_url(s.redis_url),
                streams=sum(len(g) for g in plan), connections=len(plan), queue_policy=s.queue_policy.value,
            )
            self.started.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.writer.run(), name="writer")
                tg.create_task(self.distributor.run(), name="distributor")
                tg.create_task(self.repairer.run(), name="repair")
                tg.create_task(heartbeat_loop(self, redis, prefix=s.prefix), name="heartbeat")
                tg.create_task(
                    watch_control(redis, s.prefix, self._on_control, self._on_control_invalid), name="control"
                )
                tg.create_task(run_auto_degrade(self.control, pressure), name="auto-degrade")
                self.hotpath.start(tg)
                for session in self.sessions:
                    tg.create_task(session.run(), name=f"session-{session.session_id}")
                self._tg = tg
                tg.create_task(self._registry_loop(), name="registry")
        except asyncio.CancelledError:
            await self._flush_on_exit()
            raise
        except BaseExceptionGroup as group:
            fatal = group.subgroup(ConfigError)
            if fatal is not None:
                raise fatal.exceptions[0] from None
            raise
        finally:
            self._tg = None
            self.hotpath.close()
            if spill is not None:
                spill.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            if self._redis is None:
                await redis.aclose()

    def _on_control(self, state: ControlState) -> None:
        """A new desired state from the control plane (runs on the loop, between two awaits)."""
        applied = self.control.apply(state)
        self.hotpath.set_shed(self.control.shed_active)
        if applied:
            log_event(
                log, logging.INFO, "control_applied", version=state.version, degrade=self.control.level.value,
                pauses=[p.pattern for p in state.pauses],
                limits=[f"{x.pattern}={x.rate:g}/s {x.policy.value}" for x in state.limits],
                critical=list(state.critical.patterns), auto=state.auto.enabled,
            )

    def _on_control_invalid(self, reason: str) -> None:
        self.control_rejected += 1
        log_event(
            log, logging.ERROR, "control_state_rejected", reason=reason, kept_version=self.control.state.version
        )

    async def _flush_on_exit(self) -> None:
        """On shutdown, store what was accepted but not yet written (bounded in time)."""
        writer = self.writer
        if writer is None:
            return
        # Oldest first: what the writer holds, the batch the distributor had taken, the ticks conflation
        # held back, then the ingress.  Ticks held for a gap repair are left out: storing them past an
        # unrepaired hole would hide it from the next start, which repairs it from what Redis holds.
        in_hand = list(self.distributor.in_hand) if self.distributor is not None else []
        queued = self.control.filter(self.ingress.take(len(self.ingress)), time.monotonic())
        pending = writer.take_all() + in_hand + self.control.drain() + list(queued)
        if not pending:
            return
        try:
            async with asyncio.timeout(FLUSH_ON_EXIT_S):
                await writer.append(pending)
            log_event(log, logging.INFO, "flushed_on_exit", ticks=len(pending))
        except (TimeoutError, RedisError, OSError) as exc:
            log_event(log, logging.ERROR, "flush_on_exit_failed", ticks=len(pending), error=str(exc))

    def stats(self) -> IngestorStats:
        ss = self.sessions
        return IngestorStats(
            connections=len(ss),
            connections_live=sum(1 for x in ss if x.state.value == "live"),
            reconnects=sum(x.reconnects for x in ss),
            frames=sum(x.frames for x in ss),
            ticks=sum(x.ticks for x in ss),
            malformed=sum(x.malformed for x in ss),
            unsupported=sum(x.unsupported for x in ss),
        )
