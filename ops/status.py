# size: one judgement per stage (ingestor, connection, queue, fan-out, Redis, consumers), each a pure function of
#   the typed documents, and their rendering: one table of rules that a split would scatter.
"""``market status``: is every stage of the feed healthy, and if not, which one and why.

Stages, in data-path order, each judged ``ok``, ``warn`` or ``fail`` with one line naming the stage
and the cause (``unknown`` when nothing reports on it):

- ``ingestor``: are ingestors reporting?  An id in ``<prefix>:_hb:ingestors`` whose heartbeat key
  expired names an ingestor that stopped reporting (killed, frozen, cut off from Redis); a heartbeat
  with a field of the wrong type is ``warn``, naming the field (the stages are judged all the same).
  A process running several venues reports one ingestor per venue, its id naming the venue
  (``<host>-<pid>-<venue>-<start id>``), each judged on its own like any other ingestor;
- ``connection``: the venue WebSockets (state, how long down, last frame, reconnect storms, stale
  streams, gaps that could not be repaired);
- ``ingress``: the bounded queue between the connections and the distributor (fill, drops, backpressure);
- ``fanout``: the in-process hot path to co-located subscribers (drops, errors, disconnections);
- ``redis``: the stream writer (failing writes, ticks spilled to disk, a spill log full, buffer filling);
- ``consumers``: consumer groups on the streams (lag in entries, per group and stream);
- ``leases``: with ``[shards]`` (:mod:`ingestor.leases`), whether every shard is owned by a reporting
  ingestor, none by two, and whether an ingestor cannot reach its lease store (the ``leases`` section
  of each heartbeat; ``ok`` when no ingestor is sharded).

:func:`evaluate` is pure: heartbeats (as :mod:`ingestor.heartbeat` writes them, read through the one
typed definition :func:`consumer_sdk.core.health.from_doc`) and consumer-group rows in, a
:class:`StatusReport` out.  :func:`collect` is the I/O: it reads the heartbeats and
runs ``XINFO GROUPS`` over the streams ``<prefix>:*:*:*`` (``SCAN``, bounded).  :func:`render`
turns a report into one screen of text or one JSON object; :func:`run_status` is the command.

Exit status: 0 only when every stage is ``ok``; 1 when any is not (the report names them); 2 when
the input is bad or Redis cannot be read (one line).  When the Redis that holds the heartbeats is
down, no stage can be read: ``market status`` then exits 2 naming Redis, and the ingestors'
``market_redis_up`` metric says whether their writes fail too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import orjson
from redis.exceptions import OutOfMemoryError, RedisError, ResponseError

from consumer_sdk.consumer import lag_estimate
from consumer_sdk.core.errors import TransientError
from consumer_sdk.core.health import Heartbeat, Parsed, from_doc
from consumer_sdk.core.keys import check_prefix, heartbeat_key, heartbeat_set_key
from distributor.writer import DEAD_LETTER_REASONS

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "CONNECTION_DOWN_FAIL_S",
    "CONNECTION_QUIET_WARN_S",
    "CONSUMER_LAG_FAIL",
    "CONSUMER_LAG_WARN",
    "DEAD_PRUNE_S",
    "INGRESS_FILL_FAIL",
    "INGRESS_FILL_WARN",
    "MAX_INGESTORS",
    "MAX_STREAMS",
    "RECONNECT_STORM",
    "STAGES",
    "WRITER_FILL_WARN",
    "WRITER_SLOW_FLUSH_US",
    "Level",
    "StageStatus",
    "StatusReport",
    "collect",
    "dead_key",
    "evaluate",
    "group_rows",
    "parse_prefix",
    "read_groups",
    "read_heartbeats",
    "render",
    "run_status",
]

# -- thresholds ------------------------------------------------------------------------------------
#: a venue connection that has not been live for this long is ``fail`` (shorter: ``warn``, reconnecting)
CONNECTION_DOWN_FAIL_S: Final = 5.0
#: a live connection that delivered no frame for this long is ``warn`` (the session drops it at its
#: ``stall_timeout``, 30 s by default)
CONNECTION_QUIET_WARN_S: Final = 15.0
#: more reconnects than this within the heartbeat's reconnect window (5 min) is a storm: ``warn``
RECONNECT_STORM: Final = 10
#: the ingress queue at least this full is ``warn`` ...
INGRESS_FILL_WARN: Final = 0.8
#: ... and at least this full ``fail``: under ``block`` the venue sockets are no longer read, under the
#: drop policies ticks are being dropped.  Any tick dropped in the last minute is ``fail`` as well.
INGRESS_FILL_FAIL: Final = 0.99
#: the writer's memory buffer at least this full (Redis slower than the feed) is ``warn``
WRITER_FILL_WARN: Final = 0.8
#: a flush to Redis that took longer than this (µs) is ``warn``
WRITER_SLOW_FLUSH_US: Final = 1_000_000
#: a consumer group this many entries behind on a stream is ``warn`` ...
CONSUMER_LAG_WARN: Final = 1_000
#: ... and this many ``fail``
CONSUMER_LAG_FAIL: Final = 100_000
#: an ingestor that stopped reporting is reported dead for this long, then forgotten (seconds)
DEAD_PRUNE_S: Final = 600.0
#: at most this many streams are scanned for consumer groups, and this many ingestors read
MAX_STREAMS: Final = 10_000
MAX_INGESTORS: Final = 1_000

STAGES: Final = ("ingestor", "connection", "ingress", "fanout", "redis", "consumers", "leases")
_PIPE_CHUNK: Final = 500


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    UNKNOWN = "unknown"
    FAIL = "fail"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK: Final = {Level.OK: 0, Level.WARN: 1, Level.UNKNOWN: 2, Level.FAIL: 3}


@dataclass(frozen=True, slots=True)
class StageStatus:
    stage: str
    level: Level
    cause: str

    @property
    def reason(self) -> str:
        """One line naming the stage, its level and the cause, e.g. ``ingress WARN: queue 85% full (block)``."""
        return f"{self.stage} {self.level.value.upper()}: {self.cause}"

    def to_dict(self) -> dict[str, str]:
        return {"stage": self.stage, "level": self.level.value, "reason": self.reason, "cause": self.cause}


@dataclass(frozen=True, slots=True)
class StatusReport:
    stages: tuple[StageStatus, ...]
    checked_at: float
    ingestors: tuple[str, ...] = ()

    @property
    def level(self) -> Level:
        return max((s.level for s in self.stages), key=lambda lv: lv.rank, default=Level.OK)

    @property
    def ok(self) -> bool:
        return all(s.level is Level.OK for s in self.stages)

    @property
    def failing(self) -> tuple[str, ...]:
        """The stages judged ``fail`` or ``warn``, ``fail`` first (in data-path order among equals)."""
        bad = [s for s in self.stages if s.level in (Level.FAIL, Level.WARN)]
        bad.sort(key=lambda s: -s.level.rank)
        return tuple(s.stage for s in bad)

    @property
    def unknown(self) -> tuple[str, ...]:
        """The stages nothing reports on (no ingestor is reporting)."""
        return tuple(s.stage for s in self.stages if s.level is Level.UNKNOWN)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def stage(self, name: str) -> StageStatus:
        for s in self.stages:
            if s.stage == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.level.value,
            "exit_code": self.exit_code,
            "failing": list(self.failing),
            "unknown": list(self.unknown),
            "checked_at": round(self.checked_at, 3),
            "ingestors": list(self.ingestors),
            "stages": [s.to_dict() for s in self.stages],
        }


# -- reading status rows defensively (they come from outside: never trust their shape) ---------------
# (a heartbeat itself is read by :func:`consumer_sdk.core.health.from_doc`)
def _get(doc: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(part)
    return doc


def _int(doc: Any, *path: str) -> int:
    v = _get(doc, *path)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _float(doc: Any, *path: str) -> float | None:
    v = _get(doc, *path)
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def _str(doc: Any, *path: str, default: str = "") -> str:
    v = _get(doc, *path)
    return v if isinstance(v, str) else default


def _secs(x: float) -> str:
    if x < 10:
        return f"{x:.1f} s"
    if x < 120:
        return f"{x:.0f} s"
    if x < 7200:
        return f"{x / 60:.0f} min"
    return f"{x / 3600:.1f} h"


def _short(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _pct(ratio: float) -> str:
    return f"{100 * ratio:.0f}%"


_Verdict = tuple[Level, str]


# -- per-ingestor judgements (pure) ------------------------------------------------------------------
def _connection(hb: Heartbeat) -> _Verdict:
    venue = hb.venue or "venue"
    c = hb.connections
    sessions = c.sessions
    total = c.total or len(sessions)
    findings: list[_Verdict] = []
    for s in sessions:
        state = s.state
        name = f"{venue} session {s.id}"
        if state == "closed":
            why = s.last_error or s.reason or "stopped"
            findings.append((Level.FAIL, f"{name} closed ({_short(why)})"))
            continue
        down = s.down_for_s
        if state not in ("live", "rotating") or down is not None:
            down = down or 0.0
            why = s.last_error or s.reason
            refused = s.subscribe_errors
            if state == "subscribing" and refused:
                why = f"the venue refused {refused} subscribe request(s)"
            cause = f"{name} {state} for {_secs(down)}" + (f" ({_short(why)})" if why else "")
            findings.append((Level.FAIL if down >= CONNECTION_DOWN_FAIL_S else Level.WARN, cause))
            continue
        quiet = s.last_frame_age_s
        if quiet is not None and quiet >= CONNECTION_QUIET_WARN_S and s.streams != 0:
            findings.append((Level.WARN, f"{name} live but no frame for {_secs(quiet)}"))
    recent = c.reconnects_recent
    if recent > RECONNECT_STORM:
        window = hb.reconnect_window_s or 300.0
        top = next(iter(c.reconnect_reasons), "")
        findings.append((
            Level.WARN,
            f"reconnect storm: {recent} reconnects in the last {_secs(window)}" + (f" (mostly {top})" if top else ""),
        ))
    stale_n = c.stale_count
    if stale_n:
        names = list(c.stale[:3])
        more = f" and {stale_n - len(names)} more" if stale_n > len(names) else ""
        findings.append((Level.WARN, f"{stale_n} stream(s) stale, no new seq: {', '.join(names)}{more}"))
    unrepaired = hb.gaps.unrepaired_recent
    if unrepaired:
        findings.append((
            Level.WARN,
            f"{unrepaired} gap(s) could not be repaired in the last {_secs(hb.window_s or 60.0)} "
            f"({hb.gaps.ticks_unrepaired} ids marked missing since start)",
        ))
    if findings:
        return _worst(findings)
    if not total:
        return Level.WARN, f"no {venue} connection yet"
    ages = [s.last_frame_age_s for s in sessions if s.last_frame_age_s is not None]
    last = f", last frame {_secs(min(ages))} ago" if ages else ""
    return Level.OK, f"{c.live}/{total} {venue} connection(s) live{last}"


def _ingress(hb: Heartbeat) -> _Verdict:
    q = hb.ingress
    policy = q.policy or "?"
    fill = q.fill_ratio
    window = _secs(hb.window_s or 60.0)
    if q.dropped_recent:
        return Level.FAIL, f"{q.dropped_recent} ticks dropped in the last {window} ({policy}; queue {_pct(fill)} full)"
    if fill >= INGRESS_FILL_FAIL:
        what = "venue reads paused" if policy == "block" else "dropping ticks"
        return Level.FAIL, f"queue full ({policy}): {what}"
    if fill >= INGRESS_FILL_WARN:
        return Level.WARN, f"queue {_pct(fill)} full ({policy})"
    if q.backpressure_recent:
        return Level.WARN, f"queue became full {q.backpressure_recent} time(s) in the last {window} ({policy})"
    return Level.OK, f"queue {_pct(fill)} full ({q.length}/{q.capacity}, {policy})"


def _fanout(hb: Heartbeat) -> _Verdict:
    fan = hb.fanout
    if not fan.present:
        handlers = fan.batch_handlers
        return Level.OK, "no hot path in this ingestor" + (f" ({handlers} batch handler(s))" if handlers else "")
    window = _secs(hb.window_s or 60.0)
    worst = fan.slowest[0] if fan.slowest else None
    who = ""
    if worst is not None:  # named by its own handler time per tick, not by the time others waited behind it
        spent = worst.handler_us
        where = worst.execution
        own = f", {spent:.0f} µs a tick" + (f" ({where})" if where else "") if spent is not None else ""
        who = f" (slowest: {worst.name}, {worst.policy}{own}, {worst.lag} behind)"
    findings: list[_Verdict] = []
    if fan.disconnected_recent:
        findings.append((Level.FAIL, f"{fan.disconnected_recent} subscriber(s) disconnected in the last {window}"))
    if fan.dropped_recent:
        findings.append((
            Level.WARN, f"{fan.dropped_recent} ticks dropped for slow subscribers in the last {window}{who}"
        ))
    if fan.errors_recent:
        findings.append((Level.WARN, f"{fan.errors_recent} subscriber handler error(s) in the last {window}"))
    if fan.waiting_room:
        findings.append((Level.WARN, f"publisher waiting for a block subscriber{who}"))
    if fan.offloaded_recent:
        findings.append((Level.WARN, f"{fan.offloaded_recent} synchronous subscriber(s) moved off the event loop in "
                         f"the last {window}: handler over its budget{who if not findings else ''}"))
    if findings:
        return _worst(findings)
    if not fan.subscribers:
        return Level.OK, "no co-located subscribers"
    return Level.OK, f"{fan.subscribers} subscriber(s), max lag {fan.max_lag}"


def _redis(hb: Heartbeat) -> _Verdict:
    w = hb.writer
    if not w.present:
        return Level.UNKNOWN, "writer not started"
    spilled, buffered = w.spilled, w.buffered
    errors = w.errors_recent
    window = _secs(hb.window_s or 60.0)
    target = hb.redis
    at = f" to {target}" if target else ""
    held = f"{buffered} buffered" + (f", {spilled} ticks spilled to disk" if spilled else "")
    failing = w.failing or ""
    if w.spill_full:
        # Memory and the spill log hold all they can: new ticks wait in the ingress, whose policy decides
        # (block: the venue goes unread; drop_*: ticks are dropped).
        why = _short(w.spill_full_reason or "no room", 80)
        behind = ("Redis unreachable" if not w.connected
                  else f"Redis refuses writes ({_short(failing, 40)})" if failing else "")
        return Level.FAIL, (f"spill log full ({why}), the ingress decides; {held}"
                            + (f"; {behind}" if behind else "") + (f"; Redis at {target}" if target else ""))
    if not w.connected:
        parts = [f"writes failing ({errors} errors in the last {window})"]
        if spilled:
            parts.append(f"{spilled} ticks spilled to disk")
        parts.append(f"{buffered} buffered")
        return Level.FAIL, ", ".join(parts) + (f"; Redis at {target}" if target else "")
    since = w.failing_for_s
    lasting = f" for {_secs(since)}" if since is not None else ""
    if w.oom or failing == "oom":
        return Level.FAIL, (f"Redis out of memory: raise maxmemory or lower retention (writes refused{lasting}; "
                            f"nothing lost: {held}){f'; Redis at {target}' if target else ''}")
    if failing:
        return Level.FAIL, (f"Redis refuses writes ({_short(failing, 40)}){lasting}: retrying, nothing lost: {held}"
                            f"{f'; Redis at {target}' if target else ''}")
    dead = w.dead_lettered_recent
    if dead:
        why = ", ".join(k for k in w.rejected_by_reason if k in DEAD_LETTER_REASONS)
        where = w.dead_letter_key or "the dead-letter stream"
        return Level.FAIL, (f"{dead} ticks Redis can never store{f' ({why})' if why else ''} went to {where} "
                            f"in the last {window}")
    rejected = w.rejected_recent
    if rejected and w.dead_lettered is None:  # a heartbeat from before the dead-letter stream: dropped
        return Level.FAIL, f"{rejected} ticks rejected by Redis in the last {window} (not stored)"
    if spilled:
        return Level.WARN, f"draining the spill log: {spilled} ticks on disk wait for Redis"
    if w.fill_ratio >= WRITER_FILL_WARN:
        return Level.WARN, f"writer buffer {_pct(w.fill_ratio)} full: Redis slower than the feed"
    if errors:
        refused = f", {rejected} tick writes refused and retried" if rejected else ""
        return Level.WARN, f"{errors} write error(s) in the last {window}{refused}, recovered"
    if w.last_flush_us >= WRITER_SLOW_FLUSH_US:
        return Level.WARN, f"slow writes: last flush took {w.last_flush_us / 1e6:.1f} s"
    age = w.last_write_age_s
    last = f", last write {_secs(age)} ago" if age is not None else ""
    return Level.OK, f"writing{at}: {w.appended} ticks stored, {buffered} buffered{last}"


def _worst(findings: Sequence[_Verdict]) -> _Verdict:
    ordered = sorted(findings, key=lambda f: -f[0].rank)
    level, cause = ordered[0]
    if len(ordered) > 1:
        cause += f"; also {ordered[1][1]}" if len(ordered) == 2 else f"; and {len(ordered) - 1} more"
    return level, cause


_JUDGES: Final[Mapping[str, Callable[[Heartbeat], _Verdict]]] = {
    "connection": _connection, "ingress": _ingress, "fanout": _fanout, "redis": _redis,
}


def _ingestor_stage(alive: Sequence[Parsed], dead: Sequence[Mapping[str, Any]],
                    broken: Sequence[Mapping[str, Any]]) -> StageStatus:
    if dead:
        ids = [_str(d, "id", default="?") for d in dead]
        known = [t for t in (_float(d, "dead_for_s") for d in dead) if t is not None]
        ago = f", {_secs(max(known))} ago" if known else ""  # unknown when Redis could not record it
        names = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        others = f"; {len(alive)} other(s) reporting" if alive else "; none other reporting"
        cause = f"ingestor {names} stopped reporting (heartbeat expired{ago}){others}"
        return StageStatus("ingestor", Level.FAIL, cause)
    if not alive:
        if broken:
            return StageStatus("ingestor", Level.FAIL, f"no readable heartbeat ({_str(broken[0], 'error')})")
        return StageStatus("ingestor", Level.FAIL, "no ingestor is reporting (no heartbeat in Redis)")
    if broken:
        return StageStatus("ingestor", Level.WARN, f"unreadable heartbeat from {_str(broken[0], 'id')}: "
                                                   f"{_str(broken[0], 'error')}")
    odd = next((p for p in alive if p.malformed), None)
    if odd is not None:  # judged all the same, each such field taken at its default
        more = f" (and {len(odd.malformed) - 1} more)" if len(odd.malformed) > 1 else ""
        return StageStatus("ingestor", Level.WARN, f"malformed heartbeat from {odd.heartbeat.id or '?'}: "
                                                   f"{odd.malformed[0]}{more}")
    first = alive[0].heartbeat
    desc = f"{first.id} ({first.venue}, up {_secs(first.uptime_s or 0.0)}, {first.version or '?'})"
    more = f" and {len(alive) - 1} more" if len(alive) > 1 else ""
    venues = sorted({p.heartbeat.venue for p in alive if p.heartbeat.venue})
    if len(venues) > 1:  # several venues, in one process or several
        more += f" (venues {', '.join(venues)})"
    return StageStatus("ingestor", Level.OK, f"{len(alive)} reporting: {desc}{more}")


def _consumers(groups: Sequence[Mapping[str, Any]]) -> StageStatus:
    rows = [g for g in groups if isinstance(g, Mapping)]
    if not rows:
        return StageStatus("consumers", Level.OK, "no consumer groups")
    rows.sort(key=lambda g: -_int(g, "lag"))
    worst = rows[0]
    lag = _int(worst, "lag")
    behind = [g for g in rows if _int(g, "lag") >= CONSUMER_LAG_WARN]
    more = f" ({len(behind) - 1} more behind)" if len(behind) > 1 else ""
    approx = "" if worst.get("lag_exact", True) else " (estimate)"
    cause = f"group {_str(worst, 'group')} lags {lag} entries on {_str(worst, 'stream')}{approx}{more}"
    if lag >= CONSUMER_LAG_FAIL:
        return StageStatus("consumers", Level.FAIL, cause)
    if lag >= CONSUMER_LAG_WARN:
        return StageStatus("consumers", Level.WARN, cause)
    n_groups = len({_str(g, "group") for g in rows})
    return StageStatus("consumers", Level.OK, f"{n_groups} group(s) on {len({_str(g, 'stream') for g in rows})} "
                                              f"stream(s), max lag {lag}")


def _leases(alive: Sequence[Mapping[str, Any]]) -> StageStatus:
    """The shards across every reporting ingestor: each owned once, and every lease store reachable."""
    rows = [(_str(hb, "id", default="?"), hb["leases"]) for hb in alive if isinstance(hb.get("leases"), Mapping)]
    if not rows:
        return StageStatus("leases", Level.OK, "not sharded (no ingestor reports [shards])")
    counts = sorted({_int(d, "count") for _, d in rows})
    if len(counts) > 1:
        return StageStatus("leases", Level.FAIL, f"ingestors disagree on [shards] count: {counts}")
    count = counts[0]
    owners: dict[int, list[tuple[str, int]]] = {}
    for who, d in rows:
        owned = d.get("owned")
        for row in owned if isinstance(owned, list) else ():
            owners.setdefault(_int(row, "shard"), []).append((who, _int(row, "token")))
    findings: list[_Verdict] = []
    for who, d in rows:
        failing = _str(d, "failing")
        if failing:
            since = _float(d, "failing_for_s")
            lasting = f" for {_secs(since)}" if since is not None else ""
            findings.append((Level.FAIL, f"{who} cannot reach its lease store{lasting} ({_short(failing, 80)}): "
                                         "its shards stop when their leases expire"))
    missing = [s for s in range(count) if s not in owners]
    if missing:
        findings.append((Level.FAIL, f"{len(missing)} of {count} shard(s) owned by no reporting ingestor "
                                     f"({', '.join(map(str, missing[:8]))}): their streams are not ingested"))
    for shard, held in sorted(owners.items()):
        if len(held) > 1:
            held.sort(key=lambda h: h[1])
            claims = " and ".join(f"{w} (token {t})" for w, t in held)
            findings.append((Level.WARN, f"shard {shard} claimed by {claims}: the older stops at its next renewal"))
    if findings:
        level, cause = _worst(findings)
        return StageStatus("leases", level, cause)
    holding = [(who, sorted(s for s, h in owners.items() if any(w == who for w, _ in h))) for who, _ in rows]
    parts = [f"{who}: {', '.join(map(str, shards))}" for who, shards in holding if shards]
    standby = sum(1 for _, shards in holding if not shards)
    return StageStatus("leases", Level.OK, f"{count}/{count} shard(s) owned ({'; '.join(parts[:4])})"
                                           + (f", {standby} standby" if standby else ""))


def _standby_ids(heartbeats: Sequence[Any]) -> frozenset[str]:
    """Ids of sharded ingestors holding no shard (a standby has no venue connection, by design)."""
    out = set()
    for hb in heartbeats:
        leases = hb.get("leases") if isinstance(hb, Mapping) else None
        if isinstance(leases, Mapping) and leases.get("owned") == [] and isinstance(hb.get("id"), str):
            out.add(hb["id"])
    return frozenset(out)


def evaluate(heartbeats: Sequence[Mapping[str, Any]], consumer_groups: Sequence[Mapping[str, Any]],
             now: float) -> StatusReport:
    """Judge every stage from heartbeats and consumer-group rows (pure; any input shape, no exception).

    A heartbeat with ``"alive": false`` stands for an ingestor whose key expired; one with an ``error``
    for a key that could not be read.  Rows of ``consumer_groups`` carry ``stream``, ``group`` and ``lag``.
    """
    alive: list[Parsed] = []
    dead: list[Mapping[str, Any]] = []
    broken: list[Mapping[str, Any]] = []
    for hb in heartbeats:
        if not isinstance(hb, Mapping):
            broken.append({"id": "?", "error": f"not an object: {type(hb).__name__}"})
        elif hb.get("alive") is False:
            dead.append(hb)
        elif hb.get("error"):
            broken.append(hb)
        else:
            alive.append(from_doc(hb))
    alive.sort(key=lambda p: p.heartbeat.id)
    try:
        stages = [_ingestor_stage(alive, dead, broken)]
    except Exception as exc:  # an odd heartbeat must not turn into a traceback
        stages = [StageStatus("ingestor", Level.UNKNOWN, f"cannot judge: {type(exc).__name__}: {exc}")]
    standby = _standby_ids(heartbeats)
    for name, judge in _JUDGES.items():
        if not alive:
            stages.append(StageStatus(name, Level.UNKNOWN, "no ingestor is reporting"))
            continue
        verdicts = []
        for parsed in alive:
            try:
                if name == "connection" and parsed.heartbeat.id in standby and not parsed.heartbeat.connections.total:
                    level, cause = Level.OK, "standby: holds no shard, so no venue connection"
                else:
                    level, cause = judge(parsed.heartbeat)
            except Exception as exc:  # a judge's own fault must not turn into a traceback
                level, cause = Level.UNKNOWN, f"cannot judge: {type(exc).__name__}: {exc}"
            verdicts.append((level, cause, parsed.heartbeat.id or "?"))
        verdicts.sort(key=lambda v: -v[0].rank)
        level, cause, who = verdicts[0]
        if len(alive) > 1:
            cause = f"{who}: {cause}"
            others = sum(1 for v in verdicts[1:] if v[0] is not Level.OK)
            if others:
                cause += f" (+{others} other ingestor(s) not ok)"
        stages.append(StageStatus(name, level, cause))
    try:
        stages.append(_consumers(consumer_groups))
    except Exception as exc:
        stages.append(StageStatus("consumers", Level.UNKNOWN, f"cannot judge: {type(exc).__name__}: {exc}"))
    try:
        raw = [hb for hb in heartbeats if isinstance(hb, Mapping) and hb.get("alive") is not False
               and not hb.get("error")]
        stages.append(_leases(raw))
    except Exception as exc:
        stages.append(StageStatus("leases", Level.UNKNOWN, f"cannot judge: {type(exc).__name__}: {exc}"))
    return StatusReport(tuple(stages), now, tuple(p.heartbeat.id for p in alive))


def parse_prefix(text: str) -> str:
    """The key prefix, checked as the ingestor checks it; :class:`ConfigError` naming it otherwise."""
    return check_prefix(text)


# -- I/O ---------------------------------------------------------------------------------------------
def dead_key(prefix: str) -> str:
    """``<prefix>:_hb:dead``: a hash, ingestor id -> when a reader first found its heartbeat expired."""
    return f"{prefix}:_hb:dead"


def _is_oom(exc: BaseException) -> bool:
    """Redis refused a command for lack of memory (redis-py's ``OutOfMemoryError``, or an error reply
    starting with ``OOM``, as a script passes it on)."""
    return isinstance(exc, OutOfMemoryError) or (isinstance(exc, ResponseError) and str(exc).startswith("OOM"))


def _text(x: Any) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


def _chunks(items: Sequence[str], n: int = _PIPE_CHUNK) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


async def _server_time(redis: aioredis.Redis) -> float:
    sec, usec = await redis.time()
    return float(sec) + usec / 1e6


async def read_heartbeats(
    redis: aioredis.Redis, prefix: str, *, prune_after: float = DEAD_PRUNE_S
) -> list[dict[str, Any]]:
    """Every ingestor in the heartbeat set: its document (``alive``), or ``{"id", "alive": false,
    "dead_for_s"}`` when its key expired.  Ids dead for longer than ``prune_after`` are removed.

    ``dead_for_s`` counts from when a reader first found the key expired (kept in :func:`dead_key`);
    it is ``None`` when Redis, out of memory, refused to record that time."""
    members = sorted(_text(m) for m in await redis.smembers(heartbeat_set_key(prefix)))
    members = members[:MAX_INGESTORS]
    now = await _server_time(redis)
    docs: dict[str, Any] = {}
    for chunk in _chunks(members):
        pipe = redis.pipeline(transaction=False)
        for m in chunk:
            pipe.get(heartbeat_key(prefix, m))
        for m, raw in zip(chunk, await pipe.execute(), strict=True):
            docs[m] = raw
    missing = [m for m in members if docs[m] is None]
    gone: list[str] = []
    if missing:
        # An ingestor stopping cleanly removes its id, then its key: ask again before calling it dead.
        pipe = redis.pipeline(transaction=False)
        for m in missing:
            pipe.sismember(heartbeat_set_key(prefix), m)
        still = await pipe.execute()
        gone = [m for m, s in zip(missing, still, strict=True) if s]
    out: list[dict[str, Any]] = []
    for m in members:
        raw = docs[m]
        if raw is None:
            continue
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            out.append({"id": m, "error": f"not JSON: {exc}"})
            continue
        if not isinstance(doc, dict):
            out.append({"id": m, "error": "not a JSON object"})
            continue
        doc["alive"] = True
        doc.setdefault("id", m)
        out.append(doc)
    out.extend(await _dead(redis, prefix, gone, [m for m in members if docs[m] is not None], now, prune_after))
    return out


async def _dead(redis: aioredis.Redis, prefix: str, gone: list[str], alive: list[str], now: float,
                prune_after: float) -> list[dict[str, Any]]:
    dk = dead_key(prefix)
    pipe = redis.pipeline(transaction=False)
    for m in gone:
        pipe.hsetnx(dk, m, repr(now))
    if alive:
        pipe.hdel(dk, *alive)  # reporting again after a hiccup: not dead
    pipe.hgetall(dk)
    results = await pipe.execute(raise_on_error=False)
    for r in results:
        # A Redis out of memory refuses HSETNX: the ids are reported dead all the same, those
        # first seen now without the time (HDEL and HGETALL are not refused).
        if isinstance(r, Exception) and not _is_oom(r):
            raise r
    since = {_text(k): _text(v) for k, v in results[-1].items()}
    out: list[dict[str, Any]] = []
    prune: list[str] = []
    for m in gone:
        first: float | None
        try:
            first = float(since[m])
        except KeyError:
            first = None
        except ValueError:
            first = now
        if first is None:
            out.append({"id": m, "alive": False, "dead_for_s": None})
            continue
        dead_for = max(0.0, now - first)
        if dead_for > prune_after:
            prune.append(m)
        else:
            out.append({"id": m, "alive": False, "dead_for_s": round(dead_for, 1)})
    orphans = [k for k in since if k not in gone and k not in alive]
    if prune or orphans:
        pipe = redis.pipeline(transaction=False)
        if prune:
            pipe.srem(heartbeat_set_key(prefix), *prune)
        pipe.hdel(dk, *(prune + orphans))
        await pipe.execute()
    return out


def group_rows(key: str, groups: Any, stream: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """``XINFO GROUPS`` (and, for the estimate, ``XINFO STREAM``) of one stream -> one row per group (pure).

    ``lag`` is Redis 7's own when it reports one (``lag_exact``), otherwise
    :func:`consumer_sdk.consumer.lag_estimate`: 0 at the stream's end, else the stream's length.
    """
    rows: list[dict[str, Any]] = []
    if not isinstance(groups, list):
        return rows
    for g in groups:
        if not isinstance(g, Mapping):
            continue
        exact = isinstance(g.get("lag"), int)
        rows.append({
            "stream": key,
            "group": _text(g.get("name", "?")),
            "lag": lag_estimate(dict(g), None if stream is None else dict(stream)),
            "lag_exact": exact,
            "pending": g.get("pending") if isinstance(g.get("pending"), int) else 0,
            "consumers": g.get("consumers") if isinstance(g.get("consumers"), int) else 0,
            "last_delivered_id": _text(g.get("last-delivered-id") or "0-0"),
        })
    return rows


async def read_groups(redis: aioredis.Redis, prefix: str, *, max_streams: int = MAX_STREAMS) -> list[dict[str, Any]]:
    """One row per consumer group on the streams ``<prefix>:*:*:*`` (at most ``max_streams`` scanned)."""
    keys: list[str] = []
    async for raw in redis.scan_iter(match=f"{prefix}:*:*:*", count=1000, _type="stream"):
        keys.append(_text(raw))
        if len(keys) >= max_streams:
            break
    keys.sort()
    rows: list[dict[str, Any]] = []
    for chunk in _chunks(keys):
        pipe = redis.pipeline(transaction=False)
        for k in chunk:
            pipe.xinfo_groups(k)
        infos = await pipe.execute(raise_on_error=False)
        need = [k for k, info in zip(chunk, infos, strict=True)
                if isinstance(info, list) and any(isinstance(g, Mapping) and not isinstance(g.get("lag"), int)
                                                  for g in info)]
        streams: dict[str, Any] = {}
        if need:
            pipe = redis.pipeline(transaction=False)
            for k in need:
                pipe.xinfo_stream(k)
            for k, s in zip(need, await pipe.execute(raise_on_error=False), strict=True):
                if isinstance(s, Mapping):
                    streams[k] = s
        for k, info in zip(chunk, infos, strict=True):
            if isinstance(info, Exception):
                if "no such key" in str(info).lower():
                    continue  # deleted since the scan
                raise info
            rows.extend(group_rows(k, info, streams.get(k)))
    return rows


async def collect(redis: aioredis.Redis, prefix: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(heartbeats, consumer group rows)`` under ``prefix``, ready for :func:`evaluate`."""
    return await read_heartbeats(redis, prefix), await read_groups(redis, prefix)


def render(report: StatusReport, json: bool = False) -> str:
    """One screen: a header and one line per stage; or, with ``json``, one JSON object on one line."""
    if json:
        return orjson.dumps(report.to_dict()).decode()
    level = report.level.value.upper()
    head = f"market status: {level}" + (f" ({', '.join(report.failing)})" if report.failing else "")
    return "\n".join([head, *(s.reason for s in report.stages)])


async def run_status(url: str, prefix: str, *, json: bool = False, deadline_s: float = 10.0) -> int:
    """The ``market status`` command: print the report and return its exit status.

    Raises :class:`~consumer_sdk.core.errors.ConfigError` for a bad prefix or URL and
    :class:`~consumer_sdk.core.errors.TransientError` (one line naming Redis) when Redis cannot be read.
    """
    from consumer_sdk.core.redis import connect_redis
    from consumer_sdk.core.urls import redact_url, validate_redis_url

    parse_prefix(prefix)
    validate_redis_url(url)
    redis = await connect_redis(url, socket_timeout=deadline_s)
    try:
        async with asyncio.timeout(deadline_s):
            heartbeats, groups = await collect(redis, prefix)
    except (RedisError, OSError, TimeoutError) as exc:
        raise TransientError(
            f"cannot read status from Redis at {redact_url(url)}: {exc or type(exc).__name__}"
        ) from None
    finally:
        await redis.aclose()
    report = evaluate(heartbeats, groups, time.time())
    print(render(report, json=json), flush=True)
    return report.exit_code
