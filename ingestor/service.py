# size: the ingestor's composition root: it builds every stage and owns their tasks and the order they start and
#   stop in (the Redis repair at start, the flush at stop); each stage's own logic lives in its own module.
"""The ingestor process: venue sessions -> sequencer -> ingress -> distributor -> Redis.

Everything runs on one event loop in one thread, in one :class:`asyncio.TaskGroup`
owned by :meth:`Ingestor.run`: a task per venue connection (reads the socket,
parses, sequences, enqueues), one distributor task (drains the ingress in batches)
and one writer task (appends to Redis).  Each piece of state has exactly one owner
task, so nothing takes a lock.  The Prometheus exporter runs in its own thread and
only reads counters.

With the channel ``depth`` the ingestor keeps each symbol's order book (:class:`~ingestor.depth_books.DepthBooks`,
fed by the sessions' pipelines) and one task asks for the REST snapshots the books want
(:class:`~ingestor.depth_fetch.DepthFetcher`); the books' entries go through the ingress, the hot path and the
writer like every tick.  A venue whose book snapshot is a message of its stream (OKX ``books``,
:data:`~ingestor.depth.DepthRule.OKX`) has no fetcher: a book that broke is rebuilt by subscribing its stream again
on the session carrying it (:meth:`~ingestor.session.VenueSession.resubscribe`), and ``depth.resubscribing`` lists
the books waiting for that snapshot.  :meth:`Ingestor.book` gives a co-located subscriber the live book of a symbol.

With ``[shards]`` the ingestor ingests only the shards it holds a lease on (:mod:`ingestor.leases`): it takes
them before it starts, renews them in a task of their own, stops a shard's streams the moment its lease is
lost, and on gaining one continues its streams after the newest seq Redis holds, the venue's REST history
filling what was missed, as at a restart.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, replace
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from consumer_sdk.core.backoff import Backoff
from consumer_sdk.core.errors import ConfigError, InvalidTick, MarketError, TransientError
from consumer_sdk.core.handler import Handler
from consumer_sdk.core.heap import settle_heap
from consumer_sdk.core.keys import Pattern, StreamName, parse_entry_id, stream_key
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.redis import connect_redis
from consumer_sdk.core.sequencing import is_contiguous_channel
from consumer_sdk.core.tick import Tick, decode_tick, is_gap_marker
from consumer_sdk.core.urls import redact_url
from distributor.control import ControlGate, ControlState, WindowPercentile
from distributor.hotpath import HOT_SAMPLE_EVERY, HotPath, Subscription
from distributor.ingress import IngressQueue
from distributor.registry import Changes, ChannelRegistry
from distributor.service import BatchHandler, Distributor
from distributor.spill import SpillLog
from distributor.writer import StreamWriter, WriteRefused
from ingestor.config import IngestSettings
from ingestor.control_plane import run_auto_degrade, watch_control
from ingestor.depth import DepthRule, SnapshotPolicy
from ingestor.depth_books import BookView, DepthBooks
from ingestor.depth_fetch import DepthFetcher
from ingestor.depth_pacer import SnapshotPacer
from ingestor.heartbeat import HeartbeatState, heartbeat_loop
from ingestor.leases import Gained, LeaseStore, LeaseTable, Lost, keep_leases, lease_round, leases_doc, shard_streams
from ingestor.repair import REPAIRABLE, GapRepairer, merge_repair
from ingestor.rest import VenueRest
from ingestor.sequencer import GapReport, Sequencer
from ingestor.session import VenueSession
from ingestor.snapshot import ChannelSequence, IngestorSnapshot
from ingestor.subscriptions import plan_connections
from ingestor.venue import Connector, Venue
from ingestor.venues import venue_profile

__all__ = [
    "Ingestor",
    "IngestorStats",
    "SpillHole",
    "StopReport",
    "UnsavedAtStop",
    "plan_spill_recovery",
    "plan_stop_flush",
]

log = get_logger("ingestor")
Ident = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class StopReport:
    """What a stop did with the ticks the process held."""

    #: stored in Redis by the final flush
    to_redis: int
    #: written to the spill log by the final flush
    to_spill: int
    #: neither: lost with the process (the next start sees the hole, repairs it from the venue or marks it)
    unsaved: int
    #: ticks held for a gap repair in progress: not saved, since they would hide the hole; the next start
    #: fetches the hole and these again from the venue
    held_for_repair: int
    #: why Redis or the spill log refused ("" when nothing did)
    error: str = ""
    #: how long the final flush took
    took_s: float = 0.0


class UnsavedAtStop(MarketError):
    """The process stopped with ticks it could store neither in Redis nor in the spill log."""

    def __init__(self, report: StopReport) -> None:
        super().__init__(f"stopped with {report.unsaved} ticks saved neither to Redis nor to the spill log")
        self.report = report


def plan_stop_flush(
    older: list[Tick], newer: list[Tick], spill_holds_records: bool
) -> tuple[list[Tick], bool, list[Tick]]:
    """Where a stop puts what the process holds (pure): ``(first, in_front, later)``.

    ``older`` is what the writer held (older than any record of the spill log, which takes every tick
    once it started), ``newer`` what was taken after it (the distributor's batch, conflation, the
    ingress).  ``first`` is tried on Redis, and what Redis does not take goes into a front segment of
    the log when ``in_front`` (it is older than the log's records), else to the log's end; ``later``
    never goes to Redis before the log drains (it is newer than the log's records) and goes to its end.
    """
    if not spill_holds_records:
        return older + newer, False, []
    return older, True, newer


@dataclass(frozen=True, slots=True)
class SpillHole:
    """Ids missing before the spill log's tick ``after``: between what Redis holds and the log's first tick
    above it (``place`` -1, filled in front of the log), or where the log was cut at open (``place``: the
    segment after which the ids belong)."""

    gap: GapReport
    after: Tick
    place: int


def plan_spill_recovery(
    stored: Mapping[Ident, int], spilled: Iterable[tuple[int, Tick]], cut_after: Set[int] = frozenset()
) -> tuple[dict[Ident, int], list[SpillHole]]:
    """What a start finds in the spill log, against the newest seq Redis holds per stream (pure).

    ``spilled`` is the log's records in drain order with their segment numbers; ``cut_after`` the
    segments after which records may be missing (:attr:`SpillLog.cut_after`).  Returns the newest seq
    the log holds per stream (the sequencer continues after the newer of that and Redis), and the holes
    to fill before the log drains, per trade or aggregate trade stream:

    - the ids between Redis's newest and the log's first tick above it;
    - the ids skipped between two of the log's ticks across a place where the log was cut.

    A gap marker covers from its ``gap_first``.  Ticks at or below Redis's newest were stored already;
    a stream Redis holds nothing of has no front hole (where its history starts is not known); a jump
    not across a cut is the feed's own (marked or repaired when it was spilled) and left alone.
    """
    newest: dict[Ident, int] = {}
    last: dict[Ident, tuple[int, int]] = {}  # per stream: (seq, segment) of the last tick above Redis
    holes: list[SpillHole] = []
    cuts = sorted(cut_after)
    for seg, t in spilled:
        ident = (t["venue"], t["symbol"], t["channel"])
        seq = t["seq"]
        if seq > newest.get(ident, -1):
            newest[ident] = seq
        top = stored.get(ident)
        if top is not None and seq <= top:
            continue
        start: int = t.get("gap_first", seq)  # type: ignore[assignment]
        contiguous = is_contiguous_channel(ident[2])
        prev = last.get(ident)
        if prev is None:
            last[ident] = (seq, seg)
            if contiguous and top is not None and start > top + 1:
                holes.append(SpillHole(GapReport(*ident, top + 1, start - 1), t, -1))
            continue
        prev_seq, prev_seg = prev
        if seq <= prev_seq:
            continue
        last[ident] = (seq, seg)
        if contiguous and start > prev_seq + 1:
            place = next((c for c in cuts if prev_seg <= c < seg), None)
            if place is not None:
                holes.append(SpillHole(GapReport(*ident, prev_seq + 1, start - 1), t, place))
    return newest, holes


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


class Ingestor:
    """Build with settings, optionally add batch handlers, then ``await run()``."""

    def __init__(
        self, settings: IngestSettings, *, redis: aioredis.Redis | None = None, connector: Connector | None = None,
        depth_rest: VenueRest | None = None, repair_rest: VenueRest | None = None,
    ) -> None:
        """``connector`` opens the venue connections (None: WebSockets); ``depth_rest`` asks for the order books'
        snapshots and ``repair_rest`` for the ids of gaps (None: a client on ``settings.rest_url`` bounded by
        ``[repair]``'s REST settings, asking the venue's requests)."""
        self.settings = settings
        self._redis = redis
        self._connector = connector
        self._depth_rest = depth_rest
        self._repair_rest = repair_rest
        self._resync_logs: dict[str, Throttle] = {}
        #: the venue: its stream names, which connection carries which channel, its REST calls, its book rule
        self.profile = venue_profile(settings.venue)
        self.profile.check_channels(settings.channels, settings.depth.speed_ms)
        for symbol in settings.symbols:
            self.profile.check_symbol(symbol)  # the venue's own form (OKX: instrument ids like BTC-USDT)
        d = settings.depth
        #: the order books, one per symbol (None: the channel ``depth`` is not configured)
        self.depth: DepthBooks | None = None
        if "depth" in settings.channels:
            self.depth = DepthBooks(
                settings.venue, settings.symbols, rule=self.profile.depth_rule, max_buffer=d.max_buffer,
                policy=SnapshotPolicy(d.snapshot_every_updates, d.snapshot_every_s), on_resync=self._on_book_resync,
                on_resubscribe=self._on_book_resubscribe,
            )
        self.depth_fetcher: DepthFetcher | None = None
        self.sequencer = Sequencer()
        self.ingress: IngressQueue[Tick] = IngressQueue(settings.queue_capacity, settings.queue_policy)
        self.ingest_latency = LatencyHistogram()
        self.sessions: list[VenueSession] = []
        self.writer: StreamWriter | None = None
        self.repairer: GapRepairer | None = None
        self.distributor: Distributor | None = None
        self._handlers: list[BatchHandler] = []
        #: runtime switches (``market ctl``), applied by the distributor to every batch
        self.control = ControlGate(on_book_break=self.depth.on_store_break if self.depth is not None else None)
        if self.depth is not None:
            self.ingress.on_drop = self.control.dropped  # a book that lost an entry there is resynced
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
            self.subscribe(load_handler(spec.target), spec.patterns, policy=spec.policy, name=spec.target,
                           execution=spec.execution, handler_budget_us=spec.handler_budget_us)
        self.started = asyncio.Event()
        self._lock_fd = -1
        #: holes between Redis and the spill log, or inside the log, found at start
        self._spill_holes: list[SpillHole] = []
        #: ticks repaired (or markers) for those holes, not yet stored: older than anything in the spill log
        self._start_pending: list[Tick] = []
        #: set when a stop flushed what the process held (see :meth:`run`)
        self.stop_report: StopReport | None = None
        #: what its heartbeat remembers between beats, its identity included (see :mod:`ingestor.heartbeat`)
        self.heartbeat = HeartbeatState()
        shards = settings.shards
        #: with ``[shards]``: the leases held (None: not sharded, every configured stream is ingested)
        self.leases: LeaseTable | None = LeaseTable(shards) if shards.enabled else None
        self._shard_symbols = shard_streams(settings.symbols, shards.count) if shards.enabled else {}
        #: configured streams of shards not held now: suppressed in the registry
        self._unowned: set[StreamName] = set()
        self._lease_store: LeaseStore | None = None

    def streams(self) -> list[tuple[str, str, str]]:
        """(symbol, channel, venue stream name) for everything configured."""
        return [
            (symbol, channel, self._stream(symbol, channel))
            for symbol in self.settings.symbols
            for channel in self.settings.channels
        ]

    def _stream(self, symbol: str, channel: str) -> str:
        return self.profile.stream_name(symbol, channel, self.settings.depth.speed_ms)

    def _connections_limit(self) -> int:
        return min(self.settings.max_streams_per_connection, self.profile.max_streams)

    def _plan(self, names: Iterable[tuple[str, str]]) -> list[tuple[Venue, list[str]]]:
        """The connections carrying ``(symbol, channel)`` streams: grouped by the :class:`Venue` serving each
        (one for Binance spot; USD-M's ``/public`` and ``/market`` routes), then split within the stream limit."""
        by_venue: dict[Venue, list[str]] = {}
        for symbol, channel in names:
            by_venue.setdefault(self.profile.venue_for(channel), []).append(self._stream(symbol, channel))
        limit = self._connections_limit()
        return [(venue, group) for venue, streams in by_venue.items() for group in plan_connections(streams, limit)]

    def book(self, symbol: str) -> BookView | None:
        """The live order book of ``symbol`` kept by this ingestor (one per symbol, whatever the number of
        subscribers), or None while it is not in step with the venue (before its first snapshot, during a
        resync).  Not a copy: read it, never change it, and only on the event loop (an inline or async
        subscriber); it may already be past the tick being handled.  ``copy()`` it to keep a state.
        KeyError for a symbol whose book is not kept."""
        if self.depth is None:
            raise KeyError(f"{symbol}: the channel depth is not configured")
        return self.depth.book(symbol)

    def _on_book_resync(self, symbol: str, reason: str, detail: str) -> None:
        throttle = self._resync_logs.get(reason)
        if throttle is None:
            throttle = self._resync_logs[reason] = Throttle(log)
        throttle.log(logging.WARNING, "book_resync", symbol=symbol, reason=reason, detail=detail[:200])

    def _on_book_resubscribe(self, symbol: str, reason: str) -> None:
        """``symbol``'s book broke (``reason``) and only a new subscription brings its snapshot (OKX): its stream is
        unsubscribed and subscribed again on the session carrying it, and no other stream.  Called by the books,
        on the loop, while the session's pipeline hands them a message."""
        stream = self._stream(symbol, "depth")
        for session in self.sessions:
            if stream in session.streams:
                session.resubscribe([stream])
                return

    async def _store_depth(self, symbol: str, ticks: list[Tick]) -> None:
        """A snapshot reply's entries, through the session carrying the symbol's book (behind what it stores)."""
        for session in self.sessions:
            if symbol in session.depth_symbols():
                await session.store_depth(ticks)
                return
        for t in ticks:
            if not self.ingress.offer(t):
                await self.ingress.put(t)

    def subscribe(
        self,
        handler: Handler,
        patterns: str | Sequence[str],
        *,
        policy: str = "drop_oldest",
        name: str | None = None,
        max_lag: int | None = None,
        max_consecutive_failures: int | None = None,
        execution: str | None = None,
        handler_budget_us: float | None = None,
    ) -> Subscription:
        """Attach a co-located subscriber: ``handler(tick)`` (sync or async, the consumer SDK's signature)
        for every tick matching ``patterns``, fed by the hot path in this process, never through Redis.

        A synchronous handler runs on the event loop (``execution="inline"``, the default) while it keeps
        within ``handler_budget_us`` per tick, and is moved to a thread of its own when it overruns it
        repeatedly; ``execution="thread"`` puts it there from the start (see :mod:`distributor.hotpath`)."""
        sub = self.hotpath.subscribe(
            handler, patterns, policy=policy, name=name, max_lag=max_lag,
            max_consecutive_failures=max_consecutive_failures, execution=execution,
            handler_budget_us=handler_budget_us,
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

    def _new_session(self, streams: list[str], venue: Venue) -> VenueSession:
        s = self.settings
        assert self.repairer is not None
        session = VenueSession(
            ws_base=s.url, streams=streams, ingress=self.ingress, sequencer=self.sequencer,
            ingest_latency=self.ingest_latency, repairer=self.repairer, settings=s.session,
            sample_every=s.latency_sample, connector=self._connector, depth=self.depth, venue=venue,
        )
        self.sessions.append(session)
        if self._tg is not None:
            self._tg.create_task(session.run(), name=f"session-{session.session_id}")
        return session

    def apply_changes(self, changes: Changes) -> None:
        """Carry out the registry's decision at the venue: new streams go to the connection with the most
        room (a new one when all are full); released ones are unsubscribed and their state freed."""
        limit = self._connections_limit()
        for name in changes.unsubscribe:
            stream = self._stream(name.symbol, name.channel)
            for session in self.sessions:
                session.remove_streams([stream])
            self.sequencer.release(name.venue, name.symbol, name.channel)
            log_event(log, logging.INFO, "stream_released", stream=str(name))
        by_venue: dict[Venue, list[str]] = {}
        for n in changes.subscribe:
            by_venue.setdefault(self.profile.venue_for(n.channel), []).append(self._stream(n.symbol, n.channel))
        for venue, adds in by_venue.items():
            while adds:
                roomiest = min(
                    (x for x in self.sessions if x.venue is venue), key=lambda x: len(x.streams), default=None
                )
                if roomiest is None or len(roomiest.streams) >= limit:
                    roomiest = self._new_session([], venue)
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
            self._suppress()
            changes = self.registry.tick(time.monotonic())
            if changes:
                self.apply_changes(changes)

    def _suppress(self) -> None:
        """Streams not held: paused with ``market ctl pause --unsubscribe``, or of a shard not owned."""
        unowned = [str(n) for n in sorted(self._unowned, key=str)]
        self.registry.suppress([*self.control.state.unsubscribe_patterns(), *unowned])

    def _shard_names(self, shard: int) -> list[StreamName]:
        s = self.settings
        return [StreamName(s.venue, sym, ch) for sym in self._shard_symbols.get(shard, ()) for ch in s.channels]

    async def _take_leases(self, redis: aioredis.Redis) -> None:
        """The first lease round, before anything starts: a lease store that does not answer is one line, exit 2."""
        table = self.leases
        assert table is not None
        self._lease_store = LeaseStore(redis, self.settings.prefix, self.heartbeat.identity.id)
        try:
            gained, _ = await lease_round(table, self._lease_store)
        except (RedisError, OSError, TimeoutError):
            raise TransientError(
                f"cannot take shard leases at start from Redis at {redact_url(self.settings.redis_url)}: "
                f"{table.failing}"
            ) from None
        held = {g.shard for g in gained}
        self._unowned = {n for shard in range(table.settings.count) if shard not in held
                         for n in self._shard_names(shard)}
        self._suppress()
        for g in gained:
            log_event(log, logging.INFO, "lease_gained", shard=g.shard, token=g.token,
                      symbols=list(self._shard_symbols.get(g.shard, ())))
        log_event(log, logging.INFO, "shards_held", held=sorted(held), count=table.settings.count,
                  standby=not held)

    async def _on_leases(self, redis: aioredis.Redis, gained: Sequence[Gained], lost: Sequence[Lost]) -> None:
        """A shard lost: its streams stop at once (what is held still goes to Redis, where the entry IDs make
        it harmless).  A shard gained: its streams continue after the newest seq Redis holds, the sequencer
        finding the ids missed since and the repairer fetching them over REST."""
        for x in lost:
            names = self._shard_names(x.shard)
            streams = [self._stream(n.symbol, n.channel) for n in names]
            for session in self.sessions:
                session.remove_streams(streams)
            self.registry.failed(names)
            for n in names:
                self.sequencer.release(n.venue, n.symbol, n.channel)
            self._unowned.update(names)
            log_event(log, logging.WARNING, "lease_lost", shard=x.shard, token=x.token, reason=x.reason,
                      streams=len(names))
        self._suppress()
        table = self.leases
        assert table is not None or not gained
        for g in gained:
            assert table is not None
            names = self._shard_names(g.shard)
            try:
                for n in names:
                    self.sequencer.release(n.venue, n.symbol, n.channel)
                async with asyncio.timeout(table.settings.renew_every_s):  # the next round waits on it
                    await self._seed(redis, [(n.symbol, n.channel) for n in names])
            except (RedisError, OSError, TimeoutError) as exc:
                # Not continued from where Redis is: let the lease expire, to be taken again.
                table.abandon(g.shard)
                log_event(log, logging.WARNING, "lease_abandoned", shard=g.shard, token=g.token,
                          error=str(exc)[:200] or type(exc).__name__)
                continue
            self._unowned.difference_update(names)
            log_event(log, logging.INFO, "lease_gained", shard=g.shard, token=g.token,
                      symbols=list(self._shard_symbols.get(g.shard, ())))
        self._suppress()
        changes = self.registry.tick(time.monotonic())
        if changes:
            self.apply_changes(changes)

    def _lease_section(self) -> dict[str, Any]:
        """The heartbeat's ``leases`` section (none when not sharded)."""
        if self.leases is None:
            return {}
        return {"leases": leases_doc(self.leases.stats(time.monotonic()), self._shard_symbols)}

    def add_batch_handler(self, handler: BatchHandler) -> None:
        """Called with every batch taken from the ingress, in the distributor task, before Redis."""
        self._handlers.append(handler)

    async def _seed(self, redis: aioredis.Redis, only: Sequence[tuple[str, str]] | None = None) -> dict[Ident, int]:
        """Continue every stream (or ``only`` these ``(symbol, channel)``) after the newest seq Redis holds
        (restart safety); that seq per stream."""
        s = self.settings
        names = list(only) if only is not None else [(symbol, channel) for symbol, channel, _ in self.streams()]
        pipe = redis.pipeline(transaction=False)
        for symbol, channel in names:
            pipe.xrevrange(stream_key(s.venue, symbol, channel, s.prefix), "+", "-", count=1)
        tops = await pipe.execute()
        stored: dict[Ident, int] = {}
        for (symbol, channel), top in zip(names, tops, strict=True):
            if top:
                _, seq = parse_entry_id(top[0][0])
                stored[(s.venue, symbol, channel)] = seq
                if channel == "depth" and self.depth is not None:
                    self.depth.seed(symbol, seq)  # a book's entries are above it; the sequencer never sees them
                    continue
                self.sequencer.seed(s.venue, symbol, channel, seq)
                log_event(log, logging.INFO, "stream_resumed", stream=f"{symbol}:{channel}", last_seq=seq)
        return stored

    def _open_spill(self, stored: Mapping[Ident, int] | None = None) -> SpillLog | None:
        """Open the spill log (one ingestor per directory); seed the sequencer from it and find the holes
        between what Redis holds (``stored``) and what the log holds."""
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
        if spill.set_aside:
            log_event(
                log, logging.WARNING, "spill_old_format_set_aside", files=spill.set_aside, directory=s.spill_dir,
                detail="files of an older spill format are not drained (renamed *.old-format); the hole they "
                "leave is repaired from the venue or marked",
            )
        if len(spill):
            self._seed_from_spill(spill, stored or {})
            log_event(
                log, logging.WARNING, "spill_found_at_start", records=len(spill), bytes=spill.bytes,
                directory=s.spill_dir,
                holes=[f"{h.gap.symbol}:{h.gap.channel} {h.gap.first}..{h.gap.last}" for h in self._spill_holes],
            )
        return spill

    def _seed_from_spill(self, spill: SpillLog, stored: Mapping[Ident, int]) -> None:
        """Ticks spilled before a stop are newer than Redis: continue after them; remember the holes
        between Redis and the log (filled before the log drains, see :meth:`_fill_spill_holes`)."""

        def ticks() -> Iterable[tuple[int, Tick]]:
            for seg, raw in spill.scan_segments():
                try:
                    yield seg, decode_tick(raw)
                except InvalidTick:
                    continue

        newest, self._spill_holes = plan_spill_recovery(stored, ticks(), spill.cut_after)
        for (venue, symbol, channel), seq in newest.items():
            if channel == "depth" and self.depth is not None:
                self.depth.seed(symbol, seq)
                continue
            self.sequencer.seed(venue, symbol, channel, seq)

    async def _fill_spill_holes(self) -> None:
        """Repair (or mark) the holes found at start, and put that where it belongs before the log drains.

        Each hole is fetched from the venue like any gap (up to ``[repair] max_gap`` ids, within
        ``deadline_s``); what the venue no longer has becomes a gap marker.  A hole between Redis and the
        log is older than every record of its stream in the log: it goes to Redis first, or, while Redis
        refuses, into a front segment of the log, which drains before the rest.  A hole where the log was
        cut goes into a segment inserted right after the cut.  Runs in the writer's task before it drains;
        live ticks meanwhile go to the log's end.
        """
        repairer, writer = self.repairer, self.writer
        assert repairer is not None and writer is not None
        front: list[Tick] = []
        inside: dict[int, list[Tick]] = {}
        for hole in self._spill_holes:
            filled = await self._repair_hole(repairer, hole)
            if hole.place < 0:
                front += filled
            else:
                inside.setdefault(hole.place, []).extend(filled)
        self._spill_holes = []
        spill = writer.spill
        for place, ticks in inside.items():
            assert spill is not None
            try:
                spill.insert_after(place, [orjson.dumps(t) for t in ticks])
            except OSError as exc:
                log_event(log, logging.ERROR, "spill_hole_unfilled", ticks=len(ticks), after_segment=place,
                          error=str(exc))
        self._start_pending = front
        backoff = Backoff(base=0.2, cap=5.0)
        while self._start_pending:
            try:
                await writer.append(self._start_pending)
                self._start_pending = []
                break
            except WriteRefused as exc:
                # What Redis took is stored; only the rest, still in order, waits.
                self._start_pending = exc.remaining
                error = str(exc)
                if not self._start_pending:
                    break
            except (RedisError, OSError) as exc:
                error = str(exc)
            if spill is not None:
                try:
                    spill.prepend([orjson.dumps(t) for t in self._start_pending])
                    self._start_pending = []
                    break
                except OSError as exc:
                    error = f"{error}; spill log: {exc}"
            log_event(log, logging.WARNING, "spill_holes_store_retry", ticks=len(self._start_pending), error=error)
            await asyncio.sleep(backoff.next_delay())

    async def _repair_hole(self, repairer: GapRepairer, hole: SpillHole) -> list[Tick]:
        """The hole's ids from the venue, in order, with a gap marker for each run it no longer has; counted
        and logged like any repair."""
        s, gap = repairer.settings, hole.gap
        size = gap.last - gap.first + 1
        boundary: Any = {**hole.after, "seq": gap.last + 1}
        boundary.pop("gap_first", None)
        fetched: list[Tick] = []
        if not s.enabled or repairer._rest is None:
            reason = "repair disabled"
        elif gap.channel not in REPAIRABLE:
            reason = "not repairable"
        elif size > s.max_gap:
            reason = f"gap of {size} ids exceeds max_gap"
        else:
            fetched, reason = await repairer._fetch(gap, [boundary], asyncio.Event())
        merged = merge_repair(gap.first, fetched, [boundary], reason)[:-1]
        missing = sum(t["gap_last"] - t["gap_first"] + 1 for t in merged if is_gap_marker(t))  # type: ignore[typeddict-item]
        if missing:
            repairer._count_unrepaired(gap.channel, missing)
        else:
            repairer.gaps_repaired += 1
        repairer.ticks_repaired[gap.channel] = repairer.ticks_repaired.get(gap.channel, 0) + size - missing
        log_event(
            log, logging.INFO if not missing else logging.WARNING,
            "gap_repaired" if not missing else ("gap_marked" if missing == size else "gap_partly_repaired"),
            stream=f"{gap.symbol}:{gap.channel}", first=gap.first, last=gap.last, fetched=size - missing,
            missing=missing, where="between Redis and the spill log" if hole.place < 0 else "inside the spill log",
            **({"reason": reason} if missing else {}),
        )
        return merged

    async def _write(self) -> None:
        """The writer's task: fill the holes found at start, then store forever."""
        assert self.writer is not None
        if self._spill_holes:
            await self._fill_spill_holes()
        await self.writer.run()

    async def run(self) -> None:
        s = self.settings
        redis = self._redis or await connect_redis(s.redis_url)
        spill: SpillLog | None = None
        try:
            if self.leases is not None:
                await self._take_leases(redis)
            stored = await self._seed(redis)
            spill = self._open_spill(stored)
            self.writer = StreamWriter(
                redis, prefix=s.prefix, retention=s.retention, capacity=s.writer_capacity, spill=spill,
                sample_every=s.latency_sample, replica_acks=s.redis_replica_acks,
            )
            self.distributor = Distributor(
                self.ingress, self.writer, handlers=self._handlers, hotpath=self.hotpath, gate=self.control
            )
            hot_p99, redis_p99 = WindowPercentile(self.hotpath.latency), WindowPercentile(self.writer.ack_latency)

            def pressure() -> tuple[float, float]:
                return self.ingress.stats().fill_ratio, max(hot_p99.sample(), redis_p99.sample())

            initial = self.registry.tick(time.monotonic()).subscribe
            plan = self._plan((n.symbol, n.channel) for n in initial)
            rest_venue = self.profile.rest_venue
            self.repairer = GapRepairer(
                self._repair_rest or s.repair.client(s.rest_url, rest_venue), self.ingress, self.sequencer, s.repair
            )
            if self.depth is not None and self.profile.depth_rule is not DepthRule.OKX:
                d = s.depth
                self.depth_fetcher = DepthFetcher(
                    self.depth, self._depth_rest or s.repair.client(s.rest_url, rest_venue), rest_venue,
                    self._store_depth, limit=d.limit, rule=self.profile.depth_rule,
                    pacer=SnapshotPacer(weight_per_minute=d.weight_per_minute, share=d.weight_share),
                )
            self.sessions = []
            for venue, group in plan:
                self._new_session(group, venue)
            log_event(
                log, logging.INFO, "ingestor_started", venue=s.venue, url=s.url, redis=redact_url(s.redis_url),
                streams=sum(len(g) for _, g in plan), connections=len(plan), queue_policy=s.queue_policy.value,
            )
            settle_heap()  # set up: what exists now is never garbage (consumer_sdk.core.heap)
            self.started.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._write(), name="writer")
                tg.create_task(self.distributor.run(), name="distributor")
                tg.create_task(self.repairer.run(), name="repair")
                if self.depth_fetcher is not None:
                    tg.create_task(self.depth_fetcher.run(), name="depth-snapshots")
                tg.create_task(
                    heartbeat_loop(self, redis, prefix=s.prefix, sections=self._lease_section), name="heartbeat"
                )
                if self.leases is not None and self._lease_store is not None:
                    async def on_leases(gained: Sequence[Gained], lost: Sequence[Lost]) -> None:
                        await self._on_leases(redis, gained, lost)

                    tg.create_task(keep_leases(self.leases, self._lease_store, on_leases), name="leases")
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
            self.stop_report = await self._flush_on_exit()
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
            if self.repairer is not None:
                await self.repairer.aclose()
            if self.depth_fetcher is not None:
                await self.depth_fetcher.aclose()
            report = self.stop_report
            if report is not None:
                log_event(
                    log, logging.ERROR if report.unsaved else logging.INFO, "stopped", unsaved=report.unsaved,
                    to_redis=report.to_redis, to_spill=report.to_spill, held_for_repair=report.held_for_repair,
                    took_s=report.took_s, **({"error": report.error} if report.error else {}),
                )

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

    async def _flush_on_exit(self) -> StopReport:
        """On a stop, save what the process holds: to Redis if it answers in time, else to the spill log.

        Bounded by ``[shutdown] flush_timeout_s`` (Redis is tried for ``redis_timeout_s`` of it; the
        spill log is written synchronously, one ``write`` per attempt).  Order is what makes this safe:
        the spill drains in file order and the append script skips any seq at or below a stream's
        newest, so

        - with the spill log empty, everything goes to Redis, or else all of it, oldest first, to the log;
        - with records in the log, what the writer held in memory is older than them: it goes to Redis
          (where it belongs before them) or into a front segment, drained first; what was taken after
          (the distributor's batch, conflation, the ingress) is newer: it goes to the log's end.

        What fits nowhere is counted as unsaved; the part kept is always contiguous with what is stored,
        so the next start sees the rest as one hole and repairs it from the venue or marks it.  Ticks held
        for a gap repair are left out (storing them past an unrepaired hole would hide it from the next
        start, which fetches the hole and them again).
        """
        writer = self.writer
        if writer is None:
            return StopReport(0, 0, 0, 0)
        s = self.settings
        began = time.monotonic()
        deadline = began + s.shutdown_flush_s
        held = sum(len(h) for h in self.repairer.holds.values()) if self.repairer is not None else 0
        in_hand = list(self.distributor.in_hand) if self.distributor is not None else []
        queued = self.control.filter(self.ingress.take(len(self.ingress)), time.monotonic())
        older = self._start_pending + writer.take_all()
        self._start_pending = []
        newer = in_hand + self.control.drain() + list(queued)
        spill = writer.spill
        first, in_front, later = plan_stop_flush(older, newer, spill is not None and len(spill) > 0)
        to_redis = to_spill = 0
        errors: list[str] = []
        if first:
            try:
                async with asyncio.timeout(max(0.0, min(s.shutdown_redis_s, deadline - time.monotonic()))):
                    await writer.append(first)
                to_redis, first = len(first), []
            except WriteRefused as exc:
                # Redis took a prefix of each stream: only what it did not take is saved to the log.
                to_redis, first = len(first) - len(exc.remaining), exc.remaining
                errors.append(f"Redis: {str(exc) or type(exc).__name__}")
            except (TimeoutError, RedisError, OSError) as exc:
                errors.append(f"Redis: {str(exc) or type(exc).__name__}")
        unsaved = len(first) + len(later)
        if spill is not None and unsaved:
            try:
                if first:
                    payloads = [orjson.dumps(t) for t in first]
                    to_spill += spill.save_newest(payloads) if in_front else spill.save_oldest(payloads)
                if later and time.monotonic() < deadline:
                    to_spill += spill.save_oldest([orjson.dumps(t) for t in later])
                spill.sync()
            except OSError as exc:
                errors.append(f"spill log: {exc}")
            unsaved -= to_spill
            if unsaved and spill.full_reason:
                errors.append(f"spill log: {spill.full_reason}")
        return StopReport(
            to_redis, to_spill, unsaved, held, "; ".join(errors), round(time.monotonic() - began, 3)
        )

    def snapshot(self) -> IngestorSnapshot:
        """Every part's state and counters now, frozen: what the heartbeat and the metrics read.

        No I/O; safe from the metrics exporter's thread as the parts' own ``stats()`` are (plain reads).
        Cost: a pass over the sessions, the subscribers and the sequencer's streams, three histogram copies.
        """
        s = self.settings
        per: dict[str, list[int]] = {}
        for (_, _, channel), tracker in self.sequencer.trackers():
            acc = per.setdefault(channel, [0, 0, 0])
            acc[0] += tracker.gaps
            acc[1] += tracker.duplicates
            acc[2] += tracker.late
        writer, repairer = self.writer, self.repairer
        depth = self.depth.stats() if self.depth is not None else None
        fetcher = self.depth_fetcher
        if depth is not None and fetcher is not None:
            depth = replace(depth, requests=fetcher.requests, failures=dict(fetcher.failures))
        return IngestorSnapshot(
            venue=s.venue, url=s.url, redis_url=s.redis_url, prefix=s.prefix, channels=tuple(s.channels),
            sessions=tuple(session.snapshot() for session in list(self.sessions)),
            ingress=self.ingress.stats(), hotpath=self.hotpath.snapshot(), batch_handlers=len(self._handlers),
            writer=writer.snapshot() if writer is not None else None,
            sequence=self.sequencer.stats(),
            sequence_by_channel={channel: ChannelSequence(*acc) for channel, acc in per.items()},
            repair=repairer.stats() if repairer is not None else None,
            control=self.control.stats(), control_rejected=self.control_rejected,
            ingest_latency=self.ingest_latency.copy(), depth=depth,
        )

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
