"""Heartbeats: what an ingestor tells operators about every stage, once a second, through Redis.

Every ``interval`` seconds an ingestor writes one JSON document to ``<prefix>:_hb:ingestor:<id>``
with an expiry of ``ttl`` seconds and adds ``<id>`` to the set ``<prefix>:_hb:ingestors``.  An id
still in the set whose key has expired names an ingestor that stopped reporting (killed, frozen,
cut off from Redis); ``market status`` (:mod:`ops.status`) reads both and judges each stage.  Each
command touches one key and no transaction spans two, so this runs unchanged on Redis Cluster.  A
clean stop (cancellation) removes the id and the key: a stopped ingestor is not a dead one.

:func:`build_heartbeat` is pure (no I/O): it reads the ingestor's counters and returns the
document.  :class:`HeartbeatState` keeps what one snapshot cannot show: who is beating, since when
a connection has been down, and the counters of the last minutes, so the document carries recent
counts (drops in the last minute) as well as totals since start.  :func:`heartbeat_loop` is the
thin I/O part: build, ``SET ... PX``, ``SADD`` (both in scripts flagged ``allow-oom``, so a Redis
out of memory still takes the beat that says so), sleep; a Redis error never ends it.

The document (schema ``v`` 1), every part read defensively (a part the ingestor does not have yet
is reported with ``"present": false``):

- ``id`` (``<host>-<pid>-<start id>``), ``host``, ``pid``, ``version``, ``venue``, ``url`` (no
  secrets), ``redis`` (no secrets), ``prefix``, ``started_at`` and ``ts`` (Unix seconds),
  ``uptime_s``, ``window_s`` and ``reconnect_window_s`` (the spans of the ``*_recent`` counts);
- ``connections``: ``total``, ``live``, ``reconnects``, ``reconnects_recent``, ``reconnect_reasons``,
  ``stale`` (names, at most :data:`MAX_LISTED`), ``stale_count``, ``stalls`` and ``sessions``: per
  venue connection its ``state``, ``reason``, ``last_error``, ``state_for_s``, ``down_for_s`` (None
  while live), ``last_frame_age_s`` (None before the first frame), ``streams``, ``reconnects``,
  ``subscribe_errors``, ``stale``;
- ``ingress``: ``length``, ``capacity``, ``fill_ratio``, ``policy``, ``dropped``, ``dropped_recent``,
  ``backpressure_events``, ``backpressure_recent``;
- ``fanout``: ``present``, ``subscribers``, ``dropped``, ``dropped_recent``, ``errors``,
  ``errors_recent``, ``disconnected``, ``disconnected_recent``, ``waiting_room``, ``max_lag``,
  ``capacity``, ``offloaded`` and ``offloaded_recent`` (synchronous subscribers moved off the loop for
  overrunning their budget), ``threads``, ``overruns`` and ``overruns_recent``, ``slowest`` (at most
  three, slowest first by their own handler time per tick, then lag: ``name``, ``policy``,
  ``execution``, ``offloaded``, ``handler_us``, ``handler_max_us``, ``busy_us``, ``overruns``, ``lag``,
  ``dropped``, ``errors``);
- ``writer``: ``present``, ``connected`` (Redis answers; a refusal is an answer), ``buffered``,
  ``capacity``, ``fill_ratio``, ``appended``, ``errors``, ``errors_recent``, ``failing`` (the class of
  the error holding ticks back now, e.g. ``oom``, ``readonly``, ``unreachable``; ``null`` when writes go
  through), ``oom`` (Redis refuses writes for lack of memory), ``failing_for_s``, ``rejected`` and
  ``rejected_recent`` (tick writes Redis refused: each refused attempt counts its ticks),
  ``rejected_by_reason``, ``dead_lettered`` and ``dead_lettered_recent`` (ticks Redis can never store,
  kept in ``dead_letter_key``), ``spilled``, ``spill_bytes``, ``spill_full`` and ``spill_full_reason``
  (the spill log refuses ticks for lack of room: its cap, or a full disk; the ingress policy decides),
  ``spill_full_events``, ``spill_refused`` (offers the spill log took nothing of),
  ``spill_write_failures``, ``spill_corrupt``, ``spill_torn``, ``last_flush_us`` (how long the last
  flush took), ``last_write_age_s``;
- ``gaps``: ``detected``, ``repaired``, ``unrepaired``, ``unrepaired_recent``, ``ticks_unrepaired``,
  ``repairing``, ``duplicates``, ``out_of_order``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import os
import re
import secrets
import socket
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson
from redis.exceptions import RedisError

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import heartbeat_key, heartbeat_set_key
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.urls import public_url

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from ingestor.service import Ingestor

__all__ = [
    "HEARTBEAT_SCHEMA",
    "MAX_LISTED",
    "RECENT_WINDOW_S",
    "RECONNECT_WINDOW_S",
    "HeartbeatState",
    "Identity",
    "build_heartbeat",
    "heartbeat_key",
    "heartbeat_loop",
    "heartbeat_set_key",
    "heartbeat_state",
    "public_url",
]

log = get_logger("heartbeat")

HEARTBEAT_SCHEMA: Final = 1
#: the span of the ``*_recent`` counts (drops, errors, backpressure, unrepaired gaps), seconds
RECENT_WINDOW_S: Final = 60.0
#: the span of ``reconnects_recent``, seconds (a reconnect storm is judged over it)
RECONNECT_WINDOW_S: Final = 300.0
#: at most this many names in a list (stale streams, sessions, slowest subscribers)
MAX_LISTED: Final = 20
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
    """Who is beating: ``<host>-<pid>-<start id>``; the start id tells two runs of one process apart."""

    host: str
    pid: int
    start_id: str
    started_at: float

    @property
    def id(self) -> str:
        return f"{self.host}-{self.pid}-{self.start_id}"

    @classmethod
    def new(cls, now: float) -> Identity:
        host = _HOST_CHARS.sub("-", socket.gethostname())[:63] or "host"
        return cls(host=host, pid=os.getpid(), start_id=secrets.token_hex(3), started_at=now)


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


_states: weakref.WeakKeyDictionary[Any, HeartbeatState] = weakref.WeakKeyDictionary()


def heartbeat_state(ingestor: Ingestor) -> HeartbeatState:
    """The state kept for ``ingestor`` (made on first use; the same identity for as long as it lives)."""
    state = _states.get(ingestor)
    if state is None:
        state = _states[ingestor] = HeartbeatState()
    return state


def _num(obj: Any, name: str, default: int = 0) -> int:
    value = getattr(obj, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        return default
    return value


def _total(value: Any) -> int:
    """An int, or the sum of a ``{label: int}`` mapping (per-channel counters)."""
    if isinstance(value, Mapping):
        return sum(v for v in value.values() if isinstance(v, int))
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _stats(obj: Any) -> Any:
    fn = getattr(obj, "stats", None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:  # a part being built may not be ready to report; the heartbeat goes on without it
        return None


def _round(x: float, digits: int = 3) -> float:
    return round(x, digits)


def build_heartbeat(ingestor: Ingestor, now: float, *, state: HeartbeatState | None = None) -> dict[str, Any]:
    """The heartbeat document for ``ingestor`` at ``now`` (Unix seconds); see the module doc."""
    st = state if state is not None else heartbeat_state(ingestor)
    ident = st.identity
    settings = ingestor.settings
    connections = _connections(ingestor, st, now)
    ingress = _ingress(ingestor)
    fanout = _fanout(ingestor)
    writer = _writer(ingestor, st, now)
    gaps = _gaps(ingestor)

    st._beats += 1
    window = st._window
    window.observe(now, {
        "reconnects": connections["reconnects"],
        "ingress_dropped": ingress["dropped"],
        "backpressure": ingress["backpressure_events"],
        "fanout_dropped": fanout.get("dropped", 0),
        "fanout_errors": fanout.get("errors", 0),
        "fanout_disconnected": fanout.get("disconnected", 0),
        "fanout_offloaded": fanout.get("offloaded", 0),
        "fanout_overruns": fanout.get("overruns", 0),
        "writer_errors": writer.get("errors", 0),
        "writer_rejected": writer.get("rejected", 0),
        "writer_dead_lettered": writer.get("dead_lettered", 0),
        "gaps_unrepaired": gaps["unrepaired"],
    })
    span = st.window_s
    connections["reconnects_recent"] = window.delta("reconnects", st.reconnect_window_s)
    ingress["dropped_recent"] = window.delta("ingress_dropped", span)
    ingress["backpressure_recent"] = window.delta("backpressure", span)
    if fanout["present"]:
        fanout["dropped_recent"] = window.delta("fanout_dropped", span)
        fanout["errors_recent"] = window.delta("fanout_errors", span)
        fanout["disconnected_recent"] = window.delta("fanout_disconnected", span)
        fanout["offloaded_recent"] = window.delta("fanout_offloaded", span)
        fanout["overruns_recent"] = window.delta("fanout_overruns", span)
    if writer["present"]:
        writer["errors_recent"] = window.delta("writer_errors", span)
        writer["rejected_recent"] = window.delta("writer_rejected", span)
        writer["dead_lettered_recent"] = window.delta("writer_dead_lettered", span)
    gaps["unrepaired_recent"] = window.delta("gaps_unrepaired", span)

    return {
        "v": HEARTBEAT_SCHEMA,
        "id": ident.id,
        "host": ident.host,
        "pid": ident.pid,
        "version": _version(),
        "venue": settings.venue,
        "url": public_url(settings.url),
        "redis": public_url(settings.redis_url),
        "prefix": settings.prefix,
        "started_at": _round(ident.started_at),
        "ts": _round(now),
        "uptime_s": _round(max(0.0, now - ident.started_at), 1),
        "window_s": span,
        "reconnect_window_s": st.reconnect_window_s,
        "connections": connections,
        "ingress": ingress,
        "fanout": fanout,
        "writer": writer,
        "gaps": gaps,
    }


def _connections(ingestor: Ingestor, st: HeartbeatState, now: float) -> dict[str, Any]:
    sessions = list(getattr(ingestor, "sessions", ()) or ())
    listed: list[dict[str, Any]] = []
    stale: list[str] = []
    reasons: dict[str, int] = {}
    live = reconnects = stalls = 0
    ids = set()
    for s in sessions:
        sid = _num(s, "session_id", id(s))
        ids.add(sid)
        lifecycle = getattr(s, "lifecycle", None)
        state_obj = getattr(lifecycle, "state", None) or getattr(s, "state", None)
        state = str(getattr(state_obj, "value", state_obj) or "unknown")
        reason = str(getattr(lifecycle, "reason", "") or "")[:300]
        transitions = _num(lifecycle, "transitions")
        seen = st._seen.get(sid)
        # A connection seen in the first document has existed since the start; a later one since now.
        since_start = seen is None and st._beats == 0
        if seen is None or seen[0] != state or seen[1] != transitions:
            seen = (state, transitions, st.identity.started_at if since_start else now)
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
        last_us = _num(s, "last_frame_us")
        n_reconnects = _num(s, "reconnects")
        reconnects += n_reconnects
        stalls += _num(s, "stalls")
        for key, n in (getattr(s, "reconnect_reasons", None) or {}).items():
            if isinstance(n, int):
                reasons[str(key)] = reasons.get(str(key), 0) + n
        s_stale = sorted(str(x) for x in (getattr(s, "stale", None) or ()))
        stale.extend(s_stale)
        listed.append({
            "id": sid,
            "state": state,
            "reason": reason,
            "last_error": st._last_error.get(sid),
            "state_for_s": _round(max(0.0, now - seen[2]), 1),
            "down_for_s": down_for,
            "last_frame_age_s": _round(max(0.0, now - last_us / 1e6)) if last_us else None,
            "streams": len(getattr(s, "streams", ()) or ()),
            "reconnects": n_reconnects,
            "subscribe_errors": _num(s, "subscribe_errors"),
            "stale": len(s_stale),
        })
    for table in (st._seen, st._down_since, st._last_error):
        for gone in [k for k in table if k not in ids]:
            del table[gone]
    top = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:5])
    return {
        "total": len(sessions),
        "live": live,
        "reconnects": reconnects,
        "reconnect_reasons": top,
        "stale": sorted(stale)[:MAX_LISTED],
        "stale_count": len(stale),
        "stalls": stalls,
        "sessions": listed[:MAX_LISTED],
    }


def _ingress(ingestor: Ingestor) -> dict[str, Any]:
    q = _stats(getattr(ingestor, "ingress", None))
    capacity = max(1, _num(q, "capacity", 1))
    length = _num(q, "length")
    policy = getattr(q, "policy", "unknown")
    return {
        "length": length,
        "capacity": capacity,
        "fill_ratio": _round(length / capacity, 4),
        "policy": str(getattr(policy, "value", policy)),
        "dropped": _num(q, "dropped"),
        "backpressure_events": _num(q, "backpressure_events"),
    }


def _fanout(ingestor: Ingestor) -> dict[str, Any]:
    hot = getattr(ingestor, "hotpath", None)
    hs = _stats(hot)
    batch_handlers = len(getattr(ingestor, "_handlers", ()) or ())
    if hs is None:
        return {"present": False, "subscribers": 0, "batch_handlers": batch_handlers}
    slowest: list[dict[str, Any]] = []
    ranked = getattr(hot, "slowest", None)  # ordered by each one's own handler time per tick, then lag
    subs = getattr(hot, "subscriptions", None)
    if not callable(ranked) and callable(subs):  # a hot path that cannot rank: the furthest behind
        rows_by_lag: list[dict[str, Any]] = []
        for sub in subs():
            ss = _stats(sub)
            if ss is not None:
                policy = getattr(ss, "policy", "")
                rows_by_lag.append({
                    "name": str(getattr(ss, "name", "?"))[:100],
                    "policy": str(getattr(policy, "value", policy)),
                    "lag": _num(ss, "lag"),
                    "dropped": _num(ss, "dropped"),
                    "errors": _num(ss, "errors"),
                })
        rows_by_lag.sort(key=lambda r: (-r["lag"], -r["dropped"], r["name"]))
        slowest = rows_by_lag[:3]
    elif callable(ranked):
        try:
            rows = ranked(3)
        except Exception:  # a part being built may not be ready to report; the heartbeat goes on without it
            rows = []
        for ss in rows:
            policy = getattr(ss, "policy", "")
            execution = getattr(ss, "execution", "")
            slowest.append({
                "name": str(getattr(ss, "name", "?"))[:100],
                "policy": str(getattr(policy, "value", policy)),
                "execution": str(getattr(execution, "value", execution)),
                "offloaded": bool(getattr(ss, "offloaded", False)),
                "handler_us": _round(float(getattr(ss, "handler_us", 0.0)), 1),
                "handler_max_us": _round(float(getattr(ss, "handler_max_us", 0.0)), 1),
                "busy_us": _num(ss, "busy_us"),
                "overruns": _num(ss, "overruns"),
                "lag": _num(ss, "lag"),
                "dropped": _num(ss, "dropped"),
                "errors": _num(ss, "errors"),
            })
    return {
        "present": True,
        "subscribers": _num(hs, "subscribers"),
        "batch_handlers": batch_handlers,
        "capacity": _num(hs, "capacity"),
        "delivered": _num(hs, "delivered"),
        "dropped": _num(hs, "dropped"),
        "errors": _num(hs, "errors"),
        "disconnected": _num(hs, "disconnected"),
        "waiting_room": bool(getattr(hs, "waiting_room", False)),
        "max_lag": _num(hs, "max_lag"),
        "offloaded": _num(hs, "offloaded"),
        "threads": _num(hs, "threads"),
        "overruns": _num(hs, "overruns"),
        "slowest": slowest,
    }


def _writer(ingestor: Ingestor, st: HeartbeatState, now: float) -> dict[str, Any]:
    w = getattr(ingestor, "writer", None)
    ws = _stats(w)
    if ws is None:
        return {"present": False}
    batches = _num(ws, "batches")
    if st._last_write is None or st._last_write[0] != batches:
        st._last_write = (batches, now if batches else 0.0)
    last_at = st._last_write[1]
    capacity = max(1, _num(ws, "capacity", 1))
    buffered = _num(ws, "buffered")
    failing = getattr(ws, "failing", "")
    failing = str(failing)[:40] if failing else None
    failing_for = getattr(ws, "failing_for_s", 0.0)
    by_reason = getattr(ws, "rejected_by_reason", None)
    return {
        "present": True,
        "connected": bool(getattr(ws, "connected", True)),
        "buffered": buffered,
        "capacity": capacity,
        "fill_ratio": _round(buffered / capacity, 4),
        "appended": _num(ws, "appended"),
        "errors": _num(ws, "errors"),
        "retries": _num(ws, "retries"),
        "failing": failing,
        "oom": failing == "oom",
        "failing_for_s": _round(float(failing_for), 1) if failing and isinstance(failing_for, int | float) else None,
        "rejected": _num(ws, "rejected"),
        "rejected_by_reason": {
            str(k)[:40]: v for k, v in sorted((by_reason or {}).items()) if isinstance(v, int) and v
        } if isinstance(by_reason, Mapping) else {},
        "dead_lettered": _num(ws, "dead_lettered"),
        "dead_letter_key": str(getattr(w, "dead_letter_key", "") or "") or None,
        "spilled": _num(ws, "spilled"),
        "spill_bytes": _num(ws, "spill_bytes"),
        "spill_full": getattr(ws, "spill_full", False) is True,
        "spill_full_reason": str(getattr(ws, "spill_full_reason", "") or "")[:200] or None,
        "spill_full_events": _num(ws, "spill_full_events"),
        "spill_refused": _num(ws, "spill_refused"),
        "spill_write_failures": _num(ws, "spill_write_failures"),
        "spill_corrupt": _num(ws, "spill_corrupt"),
        "spill_torn": _num(ws, "spill_torn"),
        "last_flush_us": _num(ws, "last_flush_us"),
        "last_write_age_s": _round(max(0.0, now - last_at), 1) if last_at else None,
    }


def _gaps(ingestor: Ingestor) -> dict[str, Any]:
    seq = _stats(getattr(ingestor, "sequencer", None))
    rep = getattr(ingestor, "repairer", None)
    return {
        "detected": _num(seq, "gaps"),
        "repaired": _num(rep, "gaps_repaired"),
        "unrepaired": _num(rep, "gaps_unrepaired"),
        "ticks_unrepaired": _total(getattr(rep, "ticks_unrepaired", 0)),
        "repairing": len(getattr(rep, "holds", None) or ()),
        "duplicates": _num(seq, "duplicates"),
        "out_of_order": _num(seq, "out_of_order"),
    }


# ---------------------------------------------------------------------------------------------- I/O
async def heartbeat_loop(
    ingestor: Ingestor,
    redis: aioredis.Redis,
    *,
    prefix: str,
    interval: float = 1.0,
    ttl: float = 5.0,
    state: HeartbeatState | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Publish ``ingestor``'s heartbeat every ``interval`` seconds until cancelled.

    Redis errors are logged (at most once a second) and the next beat tries again; each write is
    bounded in time, so a hung Redis delays no later beat by more than ``interval``.  On
    cancellation the id and the key are removed (best effort, within one second).
    """
    if not interval > 0:
        raise ConfigError(f"heartbeat interval must be positive, got {interval}")
    if not ttl > interval:
        raise ConfigError(f"heartbeat ttl ({ttl} s) must be longer than its interval ({interval} s)")
    st = state if state is not None else heartbeat_state(ingestor)
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
            doc = build_heartbeat(ingestor, clock(), state=st)
            doc["interval_s"] = interval
            doc["ttl_s"] = ttl
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
