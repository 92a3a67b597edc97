"""Heartbeats: what an ingestor tells operators about every stage, once a second, through Redis.

Every ``interval`` seconds an ingestor writes one JSON document to ``<prefix>:_hb:ingestor:<id>``
with an expiry of ``ttl`` seconds and adds ``<id>`` to the set ``<prefix>:_hb:ingestors``.  An id
still in the set whose key has expired names an ingestor that stopped reporting (killed, frozen,
cut off from Redis); ``market status`` (:mod:`ops.status`) reads both and judges each stage.  Each
command touches one key and no transaction spans two, so this runs unchanged on Redis Cluster.  A
clean stop (cancellation) removes the id and the key: a stopped ingestor is not a dead one.

The document is a :class:`consumer_sdk.core.health.Heartbeat` (its fields are described there),
written by :func:`consumer_sdk.core.health.to_doc`.  :func:`heartbeat_document` is pure (no I/O): it
turns the ingestor's :class:`~ingestor.snapshot.IngestorSnapshot` into that document.
:class:`HeartbeatState` keeps what one snapshot cannot show: who is beating, since when a connection
has been down, and the counters of the last minutes, so the document carries recent counts (drops in
the last minute) as well as totals since start.  :func:`heartbeat_loop` is the thin I/O part:
snapshot, build, ``SET ... PX``, ``SADD`` (both in scripts flagged ``allow-oom``, so a Redis out of
memory still takes the beat that says so), sleep; a Redis error never ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import os
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import orjson
from redis.exceptions import RedisError

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.health import (
    MAX_LISTED,
    SCHEMA,
    Connections,
    Fanout,
    Gaps,
    Heartbeat,
    Ingress,
    Session,
    Subscriber,
    Writer,
    to_doc,
)
from consumer_sdk.core.keys import heartbeat_key, heartbeat_set_key
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.urls import public_url
from ingestor.snapshot import IngestorSnapshot

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "HEARTBEAT_SCHEMA",
    "MAX_LISTED",
    "RECENT_WINDOW_S",
    "RECONNECT_WINDOW_S",
    "HeartbeatState",
    "Identity",
    "Reporting",
    "build_heartbeat",
    "heartbeat_document",
    "heartbeat_key",
    "heartbeat_loop",
    "heartbeat_set_key",
    "heartbeat_state",
    "public_url",
]

log = get_logger("heartbeat")

HEARTBEAT_SCHEMA: Final = SCHEMA
#: the span of the ``*_recent`` counts (drops, errors, backpressure, unrepaired gaps), seconds
RECENT_WINDOW_S: Final = 60.0
#: the span of ``reconnects_recent``, seconds (a reconnect storm is judged over it)
RECONNECT_WINDOW_S: Final = 300.0
_LIVE_STATES: Final = frozenset({"live", "rotating"})
# The two writes of a beat, as scripts flagged ``allow-oom``: a Redis out of memory refuses a plain
# SET or SADD, and the heartbeat would then expire and report the ingestor dead rather than the OOM
# it carries.  A beat is one small key and one set member, so it may pass the limit.
_BEAT_SET: Final = "#!lua flags=allow-oom\nreturn redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])"
_BEAT_ADD: Final = "#!lua flags=allow-oom\nreturn redis.call('SADD', KEYS[1], ARGV[1])"
_HOST_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("market")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is beating: ``<host>-<pid>-<start id>``; the start id tells two runs of one process apart.  An
    ingestor among several of one process (one per venue, :mod:`ingestor.multi`) names its venue too:
    ``<host>-<pid>-<venue>-<start id>``."""

    host: str
    pid: int
    start_id: str
    started_at: float
    #: the venue, when the process runs several ("": it runs one)
    venue: str = ""

    @property
    def id(self) -> str:
        if self.venue:
            return f"{self.host}-{self.pid}-{self.venue}-{self.start_id}"
        return f"{self.host}-{self.pid}-{self.start_id}"

    @classmethod
    def new(cls, now: float, venue: str = "") -> Identity:
        host = _HOST_CHARS.sub("-", socket.gethostname())[:63] or "host"
        return cls(host=host, pid=os.getpid(), start_id=secrets.token_hex(3), started_at=now,
                   venue=_HOST_CHARS.sub("-", venue)[:40])


class _Window:
    """Samples of monotonic counters; ``delta`` is how much one grew over the last ``span`` seconds."""

    __slots__ = ("_keep", "_samples")

    def __init__(self, keep: float, start: float) -> None:
        self._keep = keep
        self._samples: deque[tuple[float, Mapping[str, int]]] = deque([(start, {})])

    def observe(self, now: float, counters: Mapping[str, int]) -> None:
        samples = self._samples
        samples.append((now, dict(counters)))
        # Keep one sample at or before the start of the longest span.
        while len(samples) > 2 and samples[1][0] <= now - self._keep:
            samples.popleft()

    def delta(self, name: str, span: float) -> int:
        samples = self._samples
        now, current = samples[-1]
        base: Mapping[str, int] = samples[0][1]
        for t, values in reversed(samples):
            if t <= now - span:
                base = values
                break
        return max(0, current.get(name, 0) - base.get(name, 0))


class HeartbeatState:
    """What a heartbeat remembers between two beats (owned by one task; no I/O)."""

    __slots__ = (
        "_beats", "_down_since", "_last_error", "_last_write", "_seen", "_window", "identity", "reconnect_window_s",
        "window_s",
    )

    def __init__(
        self,
        identity: Identity | None = None,
        *,
        window_s: float = RECENT_WINDOW_S,
        reconnect_window_s: float = RECONNECT_WINDOW_S,
    ) -> None:
        self.identity = identity or Identity.new(time.time())
        self.window_s = window_s
        self.reconnect_window_s = reconnect_window_s
        # Counters start at zero when the ingestor starts: the first minute counts from there.
        self._window = _Window(max(window_s, reconnect_window_s), self.identity.started_at)
        self._down_since: dict[int, float] = {}
        self._seen: dict[int, tuple[str, int, float]] = {}  # session -> (state, transitions, since)
        self._last_error: dict[int, str] = {}
        self._last_write: tuple[int, float] | None = None  # (writer batches, when they last moved)
        self._beats = 0  # documents built so far


class Reporting(Protocol):
    """What a heartbeat reads: an ingestor (:class:`ingestor.service.Ingestor`) or a stand-in in a test."""

    @property
    def heartbeat(self) -> HeartbeatState:
        """The state its heartbeat keeps between beats (one for as long as it lives)."""
        ...

    def snapshot(self) -> IngestorSnapshot: ...


def heartbeat_state(ingestor: Reporting) -> HeartbeatState:
    """The state kept for ``ingestor`` (the same identity for as long as it lives)."""
    return ingestor.heartbeat


def _round(x: float, digits: int = 3) -> float:
    return round(x, digits)


def build_heartbeat(ingestor: Reporting, now: float, *, state: HeartbeatState | None = None) -> dict[str, Any]:
    """The heartbeat document of ``ingestor`` at ``now`` (Unix seconds), as JSON-ready dicts."""
    st = state if state is not None else ingestor.heartbeat
    return to_doc(heartbeat_document(ingestor.snapshot(), now, st))


def heartbeat_document(snap: IngestorSnapshot, now: float, st: HeartbeatState) -> Heartbeat:
    """The heartbeat for ``snap`` taken at ``now`` (Unix seconds); updates ``st`` (no I/O).

    Cost: one pass over the snapshot's sessions, at most three subscribers, one window sample.
    """
    ident = st.identity
    connections = _connections(snap, st, now)
    ingress = _ingress(snap)
    fanout = _fanout(snap)
    writer = _writer(snap, st, now)
    gaps = _gaps(snap)

    st._beats += 1
    window = st._window
    window.observe(now, {
        "reconnects": connections.reconnects,
        "ingress_dropped": ingress.dropped,
        "backpressure": ingress.backpressure_events,
        "fanout_dropped": fanout.dropped,
        "fanout_errors": fanout.errors,
        "fanout_disconnected": fanout.disconnected,
        "fanout_offloaded": fanout.offloaded,
        "fanout_overruns": fanout.overruns,
        "writer_errors": writer.errors,
        "writer_rejected": writer.rejected,
        "writer_dead_lettered": writer.dead_lettered or 0,
        "gaps_unrepaired": gaps.unrepaired,
    })
    span = st.window_s
    replace = dataclasses.replace
    connections = replace(connections, reconnects_recent=window.delta("reconnects", st.reconnect_window_s))
    ingress = replace(
        ingress, dropped_recent=window.delta("ingress_dropped", span),
        backpressure_recent=window.delta("backpressure", span),
    )
    if fanout.present:
        fanout = replace(
            fanout, dropped_recent=window.delta("fanout_dropped", span),
            errors_recent=window.delta("fanout_errors", span),
            disconnected_recent=window.delta("fanout_disconnected", span),
            offloaded_recent=window.delta("fanout_offloaded", span),
            overruns_recent=window.delta("fanout_overruns", span),
        )
    if writer.present:
        writer = replace(
            writer, errors_recent=window.delta("writer_errors", span),
            rejected_recent=window.delta("writer_rejected", span),
            dead_lettered_recent=window.delta("writer_dead_lettered", span),
        )
    gaps = replace(gaps, unrepaired_recent=window.delta("gaps_unrepaired", span))

    return Heartbeat(
        v=HEARTBEAT_SCHEMA, id=ident.id, host=ident.host, pid=ident.pid, version=_version(), venue=snap.venue,
        url=public_url(snap.url), redis=public_url(snap.redis_url), prefix=snap.prefix,
        started_at=_round(ident.started_at), ts=_round(now), uptime_s=_round(max(0.0, now - ident.started_at), 1),
        window_s=span, reconnect_window_s=st.reconnect_window_s, connections=connections, ingress=ingress,
        fanout=fanout, writer=writer, gaps=gaps,
    )


def _connections(snap: IngestorSnapshot, st: HeartbeatState, now: float) -> Connections:
    listed: list[Session] = []
    stale: list[str] = []
    reasons: dict[str, int] = {}
    live = reconnects = stalls = 0
    ids = set()
    for s in snap.sessions:
        sid = s.session_id
        ids.add(sid)
        state = s.state.value
        reason = s.reason[:300]
        seen = st._seen.get(sid)
        # A connection seen in the first document has existed since the start; a later one since now.
        since_start = seen is None and st._beats == 0
        if seen is None or seen[0] != state or seen[1] != s.transitions:
            seen = (state, s.transitions, st.identity.started_at if since_start else now)
            st._seen[sid] = seen
        if state == "backing_off" and reason:
            st._last_error[sid] = reason
        if state in _LIVE_STATES:
            live += 1
            st._down_since.pop(sid, None)
            down_for: float | None = None
        else:
            since = st._down_since.setdefault(sid, st.identity.started_at if since_start else now)
            down_for = _round(max(0.0, now - since), 1)
        reconnects += s.reconnects
        stalls += s.stalls
        for key, n in s.reconnect_reasons.items():
            reasons[key] = reasons.get(key, 0) + n
        stale.extend(s.stale)
        listed.append(Session(
            id=sid, state=state, reason=reason, last_error=st._last_error.get(sid),
            state_for_s=_round(max(0.0, now - seen[2]), 1), down_for_s=down_for,
            last_frame_age_s=_round(max(0.0, now - s.last_frame_us / 1e6)) if s.last_frame_us else None,
            streams=s.streams, reconnects=s.reconnects, subscribe_errors=s.subscribe_errors, stale=len(s.stale),
        ))
    for table in (st._seen, st._down_since, st._last_error):
        for gone in [k for k in table if k not in ids]:
            del table[gone]
    top = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:5])
    return Connections(
        total=len(snap.sessions), live=live, reconnects=reconnects, reconnect_reasons=top,
        stale=tuple(sorted(stale)[:MAX_LISTED]), stale_count=len(stale), stalls=stalls,
        sessions=tuple(listed[:MAX_LISTED]),
    )


def _ingress(snap: IngestorSnapshot) -> Ingress:
    q = snap.ingress
    capacity = max(1, q.capacity)
    return Ingress(
        length=q.length, capacity=capacity, fill_ratio=_round(q.length / capacity, 4), policy=q.policy.value,
        dropped=q.dropped, backpressure_events=q.backpressure_events,
    )


def _fanout(snap: IngestorSnapshot) -> Fanout:
    hot = snap.hotpath
    if hot is None:
        return Fanout(present=False, subscribers=0, batch_handlers=snap.batch_handlers)
    hs = hot.stats
    slowest = tuple(  # ordered by each one's own handler time per tick, then lag
        Subscriber(
            name=ss.name[:100], policy=ss.policy.value, execution=ss.execution.value, offloaded=ss.offloaded,
            handler_us=_round(ss.handler_us, 1), handler_max_us=_round(ss.handler_max_us, 1), busy_us=ss.busy_us,
            overruns=ss.overruns, lag=ss.lag, dropped=ss.dropped, errors=ss.errors,
        )
        for ss in hot.ranked[:3]
    )
    return Fanout(
        present=True, subscribers=hs.subscribers, batch_handlers=snap.batch_handlers, capacity=hs.capacity,
        delivered=hs.delivered, dropped=hs.dropped, errors=hs.errors, disconnected=hs.disconnected,
        waiting_room=hs.waiting_room, max_lag=hs.max_lag, offloaded=hs.offloaded, threads=hs.threads,
        overruns=hs.overruns, slowest=slowest,
    )


def _writer(snap: IngestorSnapshot, st: HeartbeatState, now: float) -> Writer:
    w = snap.writer
    if w is None:
        return Writer(present=False)
    ws = w.stats
    if st._last_write is None or st._last_write[0] != ws.batches:
        st._last_write = (ws.batches, now if ws.batches else 0.0)
    last_at = st._last_write[1]
    capacity = max(1, ws.capacity)
    failing = ws.failing[:40] or None
    return Writer(
        present=True, connected=ws.connected, buffered=ws.buffered, capacity=capacity,
        fill_ratio=_round(ws.buffered / capacity, 4), appended=ws.appended, errors=ws.errors, retries=ws.retries,
        failing=failing, oom=failing == "oom", failing_for_s=_round(ws.failing_for_s, 1) if failing else None,
        rejected=ws.rejected,
        rejected_by_reason={k[:40]: v for k, v in sorted(ws.rejected_by_reason.items()) if v},
        dead_lettered=ws.dead_lettered, dead_letter_key=w.dead_letter_key or None, spilled=ws.spilled,
        spill_bytes=ws.spill_bytes, spill_full=ws.spill_full, spill_full_reason=ws.spill_full_reason[:200] or None,
        spill_full_events=ws.spill_full_events, spill_refused=ws.spill_refused,
        spill_write_failures=ws.spill_write_failures, spill_corrupt=ws.spill_corrupt, spill_torn=ws.spill_torn,
        last_flush_us=ws.last_flush_us, last_write_age_s=_round(max(0.0, now - last_at), 1) if last_at else None,
    )


def _gaps(snap: IngestorSnapshot) -> Gaps:
    seq, rep = snap.sequence, snap.repair
    return Gaps(
        detected=seq.gaps,
        repaired=rep.gaps_repaired if rep is not None else 0,
        unrepaired=rep.gaps_unrepaired if rep is not None else 0,
        ticks_unrepaired=sum(rep.ticks_unrepaired.values()) if rep is not None else 0,
        repairing=rep.holding if rep is not None else 0,
        duplicates=seq.duplicates,
        out_of_order=seq.out_of_order,
    )


# ---------------------------------------------------------------------------------------------- I/O
async def heartbeat_loop(
    ingestor: Reporting,
    redis: aioredis.Redis,
    *,
    prefix: str,
    interval: float = 1.0,
    ttl: float = 5.0,
    state: HeartbeatState | None = None,
    clock: Callable[[], float] = time.time,
    sections: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Publish ``ingestor``'s heartbeat every ``interval`` seconds until cancelled.

    ``sections`` gives top-level sections to add to each document beside those of
    :class:`~consumer_sdk.core.health.Heartbeat` (``leases``, see :mod:`ingestor.leases`; ``market status``
    reads them from the raw document, :func:`~consumer_sdk.core.health.from_doc` passes over them).

    Redis errors are logged (at most once a second) and the next beat tries again; each write is
    bounded in time, so a hung Redis delays no later beat by more than ``interval``.  On
    cancellation the id and the key are removed (best effort, within one second).
    """
    if not interval > 0:
        raise ConfigError(f"heartbeat interval must be positive, got {interval}")
    if not ttl > interval:
        raise ConfigError(f"heartbeat ttl ({ttl} s) must be longer than its interval ({interval} s)")
    st = state if state is not None else ingestor.heartbeat
    ident = st.identity.id
    key = heartbeat_key(prefix, ident)
    members = heartbeat_set_key(prefix)
    px = max(1, int(ttl * 1000))
    throttle = Throttle(log, interval=1.0)
    loop = asyncio.get_running_loop()
    failing = False
    log_event(log, logging.INFO, "heartbeat_started", id=ident, key=key, interval_s=interval, ttl_s=ttl)
    try:
        while True:
            began = loop.time()
            hb = heartbeat_document(ingestor.snapshot(), clock(), st)
            hb = dataclasses.replace(hb, interval_s=interval, ttl_s=ttl, tasks=len(asyncio.all_tasks()))
            doc = to_doc(hb)
            if sections is not None:
                doc.update({k: v for k, v in sections().items() if k not in doc})
            payload = orjson.dumps(doc)
            try:
                async with asyncio.timeout(interval):
                    pipe = redis.pipeline(transaction=False)
                    pipe.eval(_BEAT_SET, 1, key, payload, px)
                    pipe.eval(_BEAT_ADD, 1, members, ident)
                    await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                reraise_if_cancelling()  # redis-py may turn our cancellation into its own error
                failing = True
                throttle.log(logging.WARNING, "heartbeat_failed", id=ident, error=str(exc)[:200] or type(exc).__name__)
            else:
                if failing:
                    failing = False
                    log_event(log, logging.INFO, "heartbeat_recovered", id=ident)
            await asyncio.sleep(max(0.0, interval - (loop.time() - began)))
    finally:
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                # The id first, then the key: a reader finding an id without its key asks again.
                await redis.srem(members, ident)
                await redis.delete(key)
