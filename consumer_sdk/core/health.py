"""The heartbeat document: one typed definition that the ingestor writes and ``market status`` reads.

Once a second an ingestor publishes a :class:`Heartbeat` as JSON (:mod:`ingestor.heartbeat` builds
it from the ingestor's snapshot); ``market status`` (:mod:`ops.status`) reads it back and judges each
stage.  :func:`to_doc` is the one place the JSON shape is written and :func:`from_doc` the one place
it is read, so writer and reader cannot drift apart.  The fields, their JSON names and their order
are those of schema ``v`` :data:`SCHEMA`; each is described where it is declared below.

What reaches :func:`from_doc` is hostile input: a document of another version, of an odd tool, or
anything at all under the heartbeat key.  :func:`from_doc` never raises.  A field that is missing
or of the wrong type takes the default declared with it, and is reported as a :class:`Problem`
naming its path (``writer.connected``) and what was found instead.  A missing field is ordinary (an
ingestor of an older version writes fewer of them: :attr:`Problem.missing`); a wrong-typed one is
not.  Where a reader must tell "not reported" from a value, the field's type allows ``None``.

Both functions are pure, one pass over the document; a document holds at most
:data:`MAX_LISTED` sessions and stale streams and three subscribers, so the cost is bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from consumer_sdk.core.untrusted import Problem, Reader, kind_of

__all__ = [
    "MAX_LISTED",
    "SCHEMA",
    "Connections",
    "Fanout",
    "Gaps",
    "Heartbeat",
    "Ingress",
    "Parsed",
    "Problem",
    "Session",
    "Subscriber",
    "Writer",
    "from_doc",
    "to_doc",
]

#: the document's schema version, its ``v``
SCHEMA: Final = 1
#: at most this many names in a list (stale streams, sessions)
MAX_LISTED: Final = 20


# ------------------------------------------------------------------------------------------ the document
@dataclass(frozen=True, slots=True)
class Session:
    """One venue connection."""

    #: the session's number in its process; None when not reported
    id: int | None = None
    #: ``connecting``, ``subscribing``, ``live``, ``rotating``, ``backing_off``, ``closed`` (or ``unknown``)
    state: str = "unknown"
    #: why it entered that state
    reason: str = ""
    #: the reason it last backed off for; None when it never did
    last_error: str | None = None
    #: seconds in that state
    state_for_s: float | None = None
    #: seconds since it was last live; None while live
    down_for_s: float | None = None
    #: seconds since its last frame; None before the first
    last_frame_age_s: float | None = None
    #: venue streams it carries; None when not reported
    streams: int | None = None
    reconnects: int = 0
    #: subscribe requests the venue refused
    subscribe_errors: int = 0
    #: its streams that are stale
    stale: int = 0


@dataclass(frozen=True, slots=True)
class Connections:
    total: int = 0
    #: sessions ``live`` or ``rotating``
    live: int = 0
    reconnects: int = 0
    #: reconnects within the last ``reconnect_window_s``
    reconnects_recent: int = 0
    #: the five commonest failures behind reconnects, commonest first
    reconnect_reasons: Mapping[str, int] = field(default_factory=dict)
    #: stale stream names, sorted (at most :data:`MAX_LISTED`); ``stale_count`` counts them all
    stale: tuple[str, ...] = ()
    stale_count: int = 0
    #: connections dropped for delivering no frame for too long
    stalls: int = 0
    #: at most :data:`MAX_LISTED`
    sessions: tuple[Session, ...] = ()


@dataclass(frozen=True, slots=True)
class Ingress:
    """The bounded queue between the connections and the distributor."""

    length: int = 0
    capacity: int = 0
    fill_ratio: float = 0.0
    #: ``block``, ``drop_oldest`` or ``drop_newest``
    policy: str = ""
    dropped: int = 0
    #: times the queue became full
    backpressure_events: int = 0
    dropped_recent: int = 0
    backpressure_recent: int = 0


@dataclass(frozen=True, slots=True)
class Subscriber:
    """A co-located subscriber, as ranked among the slowest."""

    name: str = ""
    policy: str = ""
    #: ``inline`` or ``thread``
    execution: str = ""
    #: moved off the event loop for overrunning its budget
    offloaded: bool = False
    #: its own handler time per tick (recent); None when not reported
    handler_us: float | None = None
    handler_max_us: float | None = None
    #: how long the chunk in progress has been running
    busy_us: int = 0
    overruns: int = 0
    lag: int = 0
    dropped: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class Fanout:
    """The in-process hot path to co-located subscribers; ``present`` false when there is none (only
    ``subscribers`` and ``batch_handlers`` are written then)."""

    present: bool = False
    subscribers: int = 0
    #: handlers called with every batch in the distributor task
    batch_handlers: int = 0
    capacity: int = 0
    delivered: int = 0
    dropped: int = 0
    errors: int = 0
    #: subscribers removed by the disconnect policy
    disconnected: int = 0
    #: a publish waits for a ``block`` subscriber now
    waiting_room: bool = False
    max_lag: int = 0
    #: synchronous subscribers moved off the loop for overrunning their budget, since start
    offloaded: int = 0
    #: subscribers whose handler runs on a thread of its own now
    threads: int = 0
    #: chunks over budget
    overruns: int = 0
    #: at most three, slowest first (by their own handler time per tick, then lag)
    slowest: tuple[Subscriber, ...] = ()
    dropped_recent: int = 0
    errors_recent: int = 0
    disconnected_recent: int = 0
    offloaded_recent: int = 0
    overruns_recent: int = 0


@dataclass(frozen=True, slots=True)
class Writer:
    """The stream writer; ``present`` false before it started (nothing else is written then)."""

    present: bool = False
    #: Redis answered the last attempt (a refusal is an answer)
    connected: bool = True
    buffered: int = 0
    capacity: int = 0
    fill_ratio: float = 0.0
    appended: int = 0
    errors: int = 0
    retries: int = 0
    #: the class of the error holding ticks back now (``oom``, ``readonly``, ``unreachable``, ...); None when
    #: writes go through
    failing: str | None = None
    #: Redis refuses writes for lack of memory
    oom: bool = False
    #: how long ``failing`` has lasted; None when not failing
    failing_for_s: float | None = None
    #: tick writes Redis refused (each refused attempt counts its ticks)
    rejected: int = 0
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)
    #: ticks Redis can never store, kept in ``dead_letter_key``; None in a heartbeat from before the
    #: dead-letter stream
    dead_lettered: int | None = None
    dead_letter_key: str | None = None
    #: ticks in the spill log on disk, and its bytes
    spilled: int = 0
    spill_bytes: int = 0
    #: the spill log refuses ticks for lack of room (its cap, or a full disk): the ingress policy decides
    spill_full: bool = False
    spill_full_reason: str | None = None
    spill_full_events: int = 0
    #: offers the spill log took nothing of
    spill_refused: int = 0
    spill_write_failures: int = 0
    spill_corrupt: int = 0
    spill_torn: int = 0
    #: how long the last flush took
    last_flush_us: int = 0
    #: seconds since a batch was last stored; None before the first
    last_write_age_s: float | None = None
    errors_recent: int = 0
    rejected_recent: int = 0
    dead_lettered_recent: int = 0


@dataclass(frozen=True, slots=True)
class Gaps:
    #: gaps the sequencer found
    detected: int = 0
    repaired: int = 0
    #: gaps marked (not, or not wholly, repaired)
    unrepaired: int = 0
    #: venue ids marked missing
    ticks_unrepaired: int = 0
    #: streams held for a repair now
    repairing: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    unrepaired_recent: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One ingestor's heartbeat.  Times are Unix seconds; ``*_recent`` counts cover the last ``window_s``
    seconds (``reconnects_recent``: ``reconnect_window_s``)."""

    v: int | None = SCHEMA
    #: ``<host>-<pid>-<start id>``
    id: str = ""
    host: str = ""
    pid: int | None = None
    version: str = ""
    venue: str = ""
    #: the venue URL and the Redis URL, without secrets
    url: str = ""
    redis: str = ""
    prefix: str = ""
    started_at: float | None = None
    ts: float | None = None
    uptime_s: float | None = None
    window_s: float | None = None
    reconnect_window_s: float | None = None
    connections: Connections = field(default_factory=Connections)
    ingress: Ingress = field(default_factory=Ingress)
    fanout: Fanout = field(default_factory=Fanout)
    writer: Writer = field(default_factory=Writer)
    gaps: Gaps = field(default_factory=Gaps)
    #: the publisher's beat interval and the key's expiry (written by the loop that publishes it)
    interval_s: float | None = None
    ttl_s: float | None = None
    #: the process's asyncio tasks when the loop that publishes it wrote it; None when not reported
    tasks: int | None = None


# ------------------------------------------------------------------------------------------ writing
def to_doc(hb: Heartbeat) -> dict[str, Any]:
    """``hb`` as the JSON object of schema ``v`` 1 (plain dicts and lists, ready for ``orjson.dumps``)."""
    doc: dict[str, Any] = {
        "v": hb.v, "id": hb.id, "host": hb.host, "pid": hb.pid, "version": hb.version, "venue": hb.venue,
        "url": hb.url, "redis": hb.redis, "prefix": hb.prefix, "started_at": hb.started_at, "ts": hb.ts,
        "uptime_s": hb.uptime_s, "window_s": hb.window_s, "reconnect_window_s": hb.reconnect_window_s,
        "connections": _connections_doc(hb.connections), "ingress": _ingress_doc(hb.ingress),
        "fanout": _fanout_doc(hb.fanout), "writer": _writer_doc(hb.writer), "gaps": _gaps_doc(hb.gaps),
    }
    if hb.interval_s is not None:
        doc["interval_s"] = hb.interval_s
    if hb.ttl_s is not None:
        doc["ttl_s"] = hb.ttl_s
    if hb.tasks is not None:
        doc["tasks"] = hb.tasks
    return doc


def _connections_doc(c: Connections) -> dict[str, Any]:
    return {
        "total": c.total, "live": c.live, "reconnects": c.reconnects, "reconnect_reasons": dict(c.reconnect_reasons),
        "stale": list(c.stale), "stale_count": c.stale_count, "stalls": c.stalls,
        "sessions": [
            {
                "id": s.id, "state": s.state, "reason": s.reason, "last_error": s.last_error,
                "state_for_s": s.state_for_s, "down_for_s": s.down_for_s, "last_frame_age_s": s.last_frame_age_s,
                "streams": s.streams, "reconnects": s.reconnects, "subscribe_errors": s.subscribe_errors,
                "stale": s.stale,
            }
            for s in c.sessions
        ],
        "reconnects_recent": c.reconnects_recent,
    }


def _ingress_doc(q: Ingress) -> dict[str, Any]:
    return {
        "length": q.length, "capacity": q.capacity, "fill_ratio": q.fill_ratio, "policy": q.policy,
        "dropped": q.dropped, "backpressure_events": q.backpressure_events, "dropped_recent": q.dropped_recent,
        "backpressure_recent": q.backpressure_recent,
    }


def _fanout_doc(f: Fanout) -> dict[str, Any]:
    if not f.present:
        return {"present": False, "subscribers": f.subscribers, "batch_handlers": f.batch_handlers}
    return {
        "present": True, "subscribers": f.subscribers, "batch_handlers": f.batch_handlers, "capacity": f.capacity,
        "delivered": f.delivered, "dropped": f.dropped, "errors": f.errors, "disconnected": f.disconnected,
        "waiting_room": f.waiting_room, "max_lag": f.max_lag, "offloaded": f.offloaded, "threads": f.threads,
        "overruns": f.overruns,
        "slowest": [
            {
                "name": s.name, "policy": s.policy, "execution": s.execution, "offloaded": s.offloaded,
                "handler_us": s.handler_us, "handler_max_us": s.handler_max_us, "busy_us": s.busy_us,
                "overruns": s.overruns, "lag": s.lag, "dropped": s.dropped, "errors": s.errors,
            }
            for s in f.slowest
        ],
        "dropped_recent": f.dropped_recent, "errors_recent": f.errors_recent,
        "disconnected_recent": f.disconnected_recent, "offloaded_recent": f.offloaded_recent,
        "overruns_recent": f.overruns_recent,
    }


def _writer_doc(w: Writer) -> dict[str, Any]:
    if not w.present:
        return {"present": False}
    return {
        "present": True, "connected": w.connected, "buffered": w.buffered, "capacity": w.capacity,
        "fill_ratio": w.fill_ratio, "appended": w.appended, "errors": w.errors, "retries": w.retries,
        "failing": w.failing, "oom": w.oom, "failing_for_s": w.failing_for_s, "rejected": w.rejected,
        "rejected_by_reason": dict(w.rejected_by_reason), "dead_lettered": w.dead_lettered,
        "dead_letter_key": w.dead_letter_key, "spilled": w.spilled, "spill_bytes": w.spill_bytes,
        "spill_full": w.spill_full, "spill_full_reason": w.spill_full_reason,
        "spill_full_events": w.spill_full_events, "spill_refused": w.spill_refused,
        "spill_write_failures": w.spill_write_failures, "spill_corrupt": w.spill_corrupt,
        "spill_torn": w.spill_torn, "last_flush_us": w.last_flush_us, "last_write_age_s": w.last_write_age_s,
        "errors_recent": w.errors_recent, "rejected_recent": w.rejected_recent,
        "dead_lettered_recent": w.dead_lettered_recent,
    }


def _gaps_doc(g: Gaps) -> dict[str, Any]:
    return {
        "detected": g.detected, "repaired": g.repaired, "unrepaired": g.unrepaired,
        "ticks_unrepaired": g.ticks_unrepaired, "repairing": g.repairing, "duplicates": g.duplicates,
        "out_of_order": g.out_of_order, "unrepaired_recent": g.unrepaired_recent,
    }


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True, slots=True)
class Parsed:
    """What :func:`from_doc` made of a document: the heartbeat, and every field it had to default."""

    heartbeat: Heartbeat
    problems: tuple[Problem, ...] = ()

    @property
    def malformed(self) -> tuple[Problem, ...]:
        """The problems that are not a missing field: values of the wrong type or shape."""
        return tuple(p for p in self.problems if not p.missing)


def from_doc(doc: object) -> Parsed:
    """A heartbeat from a decoded JSON value (any value: never raises); see the module doc."""
    problems: list[Problem] = []
    if not isinstance(doc, Mapping):  # one problem; every field at its default
        problems.append(Problem("", "an object", kind_of(doc)))
        doc = {}
        r = Reader(doc, "", problems, quiet=True)
    else:
        r = Reader(doc, "", problems)
    hb = Heartbeat(
        v=r.integer_or_none("v"), id=r.text("id"), host=r.text("host"), pid=r.integer_or_none("pid"),
        version=r.text("version"), venue=r.text("venue"), url=r.text("url"), redis=r.text("redis"),
        prefix=r.text("prefix"),
        started_at=r.number_or_none("started_at"), ts=r.number_or_none("ts"), uptime_s=r.number_or_none("uptime_s"),
        window_s=r.number_or_none("window_s"), reconnect_window_s=r.number_or_none("reconnect_window_s"),
        connections=_connections(r.section("connections")), ingress=_ingress(r.section("ingress")),
        fanout=_fanout(r.section("fanout")), writer=_writer(r.section("writer")), gaps=_gaps(r.section("gaps")),
        interval_s=_optional_float(doc, "interval_s", r), ttl_s=_optional_float(doc, "ttl_s", r),
        tasks=r.integer_or_none("tasks") if "tasks" in doc else None,
    )
    return Parsed(hb, tuple(problems))


def _optional_float(doc: Mapping[str, Any], key: str, r: Reader) -> float | None:
    """A field only the publishing loop writes: its absence is no problem."""
    return r.number_or_none(key) if key in doc else None


def _connections(r: Reader) -> Connections:
    return Connections(
        total=r.integer("total"), live=r.integer("live"), reconnects=r.integer("reconnects"),
        reconnects_recent=r.integer("reconnects_recent"), reconnect_reasons=r.counts("reconnect_reasons"),
        stale=r.names("stale"), stale_count=r.integer("stale_count"), stalls=r.integer("stalls"),
        sessions=tuple(
            Session(
                id=s.integer_or_none("id"), state=s.text("state", "unknown"), reason=s.text("reason"),
                last_error=s.text_or_none("last_error"), state_for_s=s.number_or_none("state_for_s"),
                down_for_s=s.number_or_none("down_for_s"), last_frame_age_s=s.number_or_none("last_frame_age_s"),
                streams=s.integer_or_none("streams"), reconnects=s.integer("reconnects"),
                subscribe_errors=s.integer("subscribe_errors"), stale=s.integer("stale"),
            )
            for s in r.rows("sessions")
        ),
    )


def _ingress(r: Reader) -> Ingress:
    return Ingress(
        length=r.integer("length"), capacity=r.integer("capacity"), fill_ratio=r.number("fill_ratio"),
        policy=r.text("policy"),
        dropped=r.integer("dropped"), backpressure_events=r.integer("backpressure_events"),
        dropped_recent=r.integer("dropped_recent"), backpressure_recent=r.integer("backpressure_recent"),
    )


def _fanout(r: Reader) -> Fanout:
    if not r.flag("present"):
        return Fanout(present=False, subscribers=r.integer("subscribers"), batch_handlers=r.integer("batch_handlers"))
    return Fanout(
        present=True, subscribers=r.integer("subscribers"), batch_handlers=r.integer("batch_handlers"),
        capacity=r.integer("capacity"), delivered=r.integer("delivered"), dropped=r.integer("dropped"),
        errors=r.integer("errors"),
        disconnected=r.integer("disconnected"), waiting_room=r.flag("waiting_room"), max_lag=r.integer("max_lag"),
        offloaded=r.integer("offloaded"), threads=r.integer("threads"), overruns=r.integer("overruns"),
        slowest=tuple(
            Subscriber(
                name=s.text("name"), policy=s.text("policy"), execution=s.text("execution"),
                offloaded=s.flag("offloaded"), handler_us=s.number_or_none("handler_us"),
                handler_max_us=s.number_or_none("handler_max_us"), busy_us=s.integer("busy_us"),
                overruns=s.integer("overruns"), lag=s.integer("lag"), dropped=s.integer("dropped"),
                errors=s.integer("errors"),
            )
            for s in r.rows("slowest")
        ),
        dropped_recent=r.integer("dropped_recent"), errors_recent=r.integer("errors_recent"),
        disconnected_recent=r.integer("disconnected_recent"), offloaded_recent=r.integer("offloaded_recent"),
        overruns_recent=r.integer("overruns_recent"),
    )


def _writer(r: Reader) -> Writer:
    if not r.flag("present"):
        return Writer(present=False)
    return Writer(
        present=True, connected=r.flag("connected", True), buffered=r.integer("buffered"),
        capacity=r.integer("capacity"),
        fill_ratio=r.number("fill_ratio"), appended=r.integer("appended"), errors=r.integer("errors"),
        retries=r.integer("retries"), failing=r.text_or_none("failing"), oom=r.flag("oom"),
        failing_for_s=r.number_or_none("failing_for_s"), rejected=r.integer("rejected"),
        rejected_by_reason=r.counts("rejected_by_reason"), dead_lettered=r.integer_or_none("dead_lettered"),
        dead_letter_key=r.text_or_none("dead_letter_key"), spilled=r.integer("spilled"),
        spill_bytes=r.integer("spill_bytes"),
        spill_full=r.flag("spill_full"), spill_full_reason=r.text_or_none("spill_full_reason"),
        spill_full_events=r.integer("spill_full_events"), spill_refused=r.integer("spill_refused"),
        spill_write_failures=r.integer("spill_write_failures"), spill_corrupt=r.integer("spill_corrupt"),
        spill_torn=r.integer("spill_torn"), last_flush_us=r.integer("last_flush_us"),
        last_write_age_s=r.number_or_none("last_write_age_s"), errors_recent=r.integer("errors_recent"),
        rejected_recent=r.integer("rejected_recent"), dead_lettered_recent=r.integer("dead_lettered_recent"),
    )


def _gaps(r: Reader) -> Gaps:
    return Gaps(
        detected=r.integer("detected"), repaired=r.integer("repaired"), unrepaired=r.integer("unrepaired"),
        ticks_unrepaired=r.integer("ticks_unrepaired"), repairing=r.integer("repairing"),
        duplicates=r.integer("duplicates"),
        out_of_order=r.integer("out_of_order"), unrepaired_recent=r.integer("unrepaired_recent"),
    )
