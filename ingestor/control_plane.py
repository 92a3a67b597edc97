# size: the control plane's one Redis layout: the state, the audit records written in the same script call, and
# the watcher that reads them back; split, each part would restate the others' keys and rules.
"""The control plane in Redis: the desired switches, their audit trail and change notices; and the
two tasks an ingestor runs for it (:func:`watch_control`, :func:`run_auto_degrade`).

Under one prefix (``md`` by default):

- ``<prefix>:_ctl:state``: the desired :class:`~distributor.control.ControlState` as JSON, with its
  version.  Every change is a compare-and-set: read, compute, then one script call that writes only if
  the key still holds what was read (else read again), so two ``market ctl`` calls at once never lose
  each other's change.  That script spans the state key and the audit stream: on a Redis Cluster both
  carry the hash tag ``{<prefix>}`` so they share a slot, ``<prefix>:_ctl:{<prefix>}:state`` and
  ``<prefix>:_ctl:{<prefix>}:audit`` (:func:`control_keys`); a standalone server keeps the names below.
- ``<prefix>:_ctl:audit``: a stream (``MAXLEN ~ 10000``), one entry per change, written by the same
  server-side script as the change itself (``_CHANGE_SCRIPT``): no change without its record, no record
  without its change.  Fields (:data:`AUDIT_FIELDS`): ``who`` (the operator), ``host``, ``redis_user``
  (``ACL WHOAMI``), ``server_ms`` (the server's ``TIME`` at the change), ``client_ms`` (the operator's
  clock), ``action``, ``target``, ``detail`` (a JSON object: the other arguments), ``before`` and
  ``after`` (the control version), ``reason``.  Every field is bounded (:data:`AUDIT_LIMITS`); a record
  that breaks a rule is read back as a :class:`CorruptAuditEntry`, never an exception.
- ``<prefix>:_ctl:changed``: after each change its version is PUBLISHed here.  Watchers also re-read
  the key every ``poll_interval`` (0.5 s), so a missed message still takes effect within a second.

The pure part (what to apply, what to reject) is :class:`StateFollower`; the rest moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import getpass
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from consumer_sdk.core.backoff import backoff_delays
from consumer_sdk.core.errors import ConfigError, TransientError
from consumer_sdk.core.keys import control_audit_key, control_changed_channel, control_state_key
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.redis import client_kwargs, cluster_raw_client, is_cluster
from distributor.control import MAX_WHO, AutoStep, ControlGate, ControlState, dump_state, parse_state

__all__ = [
    "AUDIT_ACTIONS",
    "AUDIT_FIELDS",
    "AUDIT_LIMITS",
    "AUDIT_MAXLEN",
    "MAX_REASON",
    "POLL_INTERVAL",
    "AuditEntry",
    "Change",
    "CorruptAuditEntry",
    "StateFollower",
    "StoredState",
    "audit_fields",
    "check_text",
    "control_keys",
    "default_who",
    "os_user",
    "parse_audit",
    "read_audit",
    "read_state",
    "redis_user",
    "reset_state",
    "run_auto_degrade",
    "update_state",
    "watch_control",
]

AUDIT_MAXLEN: Final = 10_000
POLL_INTERVAL: Final = 0.5
MAX_ATTEMPTS: Final = 200
#: the longest ``--reason`` an audit record carries
MAX_REASON: Final = 1000
#: the fields of an audit record (:data:`AUDIT_FIELDS`, in the order they are written; ``reason`` may be empty) and
#: the longest value of each field, in characters; a longer one is refused when written, corrupt when read
AUDIT_LIMITS: Final[Mapping[str, int]] = {
    "server_ms": 19, "who": MAX_WHO, "host": 255, "redis_user": MAX_WHO, "client_ms": 19, "action": 16,
    "target": 8192, "detail": 8192, "before": 19, "after": 19, "reason": MAX_REASON,
}
AUDIT_FIELDS: Final = tuple(AUDIT_LIMITS)
#: what an audit record's ``action`` may be: the ``market ctl`` commands that change something
AUDIT_ACTIONS: Final = frozenset({"pause", "resume", "limit", "unlimit", "degrade", "critical", "auto", "reset"})
_NUMBERS: Final = frozenset({"server_ms", "client_ms", "before", "after"})
#: control characters, and the invisible ones that reorder or hide text on a terminal (bidi overrides, ...)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")

#: One change in one step: compare-and-set the state (KEYS[1]) and append its audit record (KEYS[2]).
#: ARGV: the kind read (none, string or other), the value read (kind string), the new state, the audit
#: MAXLEN, the notice channel, the new version, then the record's field/value pairs.  Returns false
#: (nothing written) when the state is no longer what was read, else {audit entry id, server ms}.  The
#: XADD comes first: when Redis refuses it (WRONGTYPE, an exhausted stream ID) the call stops before the
#: state is touched; the shebang makes Redis refuse the whole call when it is out of memory.
_CHANGE_SCRIPT: Final = """#!lua
local kind = redis.call('TYPE', KEYS[1])['ok']
if ARGV[1] == 'string' then
  if kind ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[2] then return false end
elseif ARGV[1] == 'none' then
  if kind ~= 'none' then return false end
elseif kind == 'none' or kind == 'string' then
  return false
end
local t = redis.call('TIME')
local ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'server_ms', ms, unpack(ARGV, 7))
redis.call('SET', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {id, ms}
"""

log = get_logger("control")


def os_user() -> str:
    """The name of the user running this process (``getpass.getuser()``; the uid when it has none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def default_who() -> str:
    """``user@host`` of this process."""
    return f"{os_user()}@{socket.gethostname()}"


def check_text(name: str, value: str, limit: int) -> str:
    """``value`` when it has at most ``limit`` characters and no control character (a newline, an escape
    sequence, a bidi override); :class:`ConfigError` naming ``name`` otherwise.  Cost: one pass over at
    most ``limit`` characters (a longer value is refused by its length alone)."""
    if len(value) > limit:
        raise ConfigError(f"{name}: at most {limit} characters, got {len(value)}")
    bad = _CONTROL.search(value)
    if bad:
        raise ConfigError(f"{name}: control and invisible characters are not allowed (found {bad.group()!a})")
    return value


def _clean_text(value: str, limit: int) -> str:
    """``value`` fit for an audit record whatever it holds: control characters replaced by ``?``, cut to
    ``limit`` characters.  For what the operator did not type (the host name, the Redis user name)."""
    return _CONTROL.sub("?", value)[:limit]


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class StoredState:
    """What the state key holds: a valid state (``error`` None), or the reason it is not one."""

    state: ControlState | None  # None when malformed; the empty state when the key does not exist
    error: str | None = None
    raw: bytes | None = None

    @property
    def valid(self) -> bool:
        return self.error is None


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def control_keys(redis: object, prefix: str) -> tuple[str, str]:
    """``(state key, audit stream)`` of the control plane under ``prefix`` for this client: the names of
    :mod:`consumer_sdk.core.keys` on a standalone server; on a Redis Cluster, where the change script must
    find both in one hash slot, the same names with the hash tag ``{<prefix>}`` before the last part
    (``md:_ctl:{md}:state``, ``md:_ctl:{md}:audit``).  The change channel is no key and keeps its name."""
    if is_cluster(redis):
        return f"{prefix}:_ctl:{{{prefix}}}:state", f"{prefix}:_ctl:{{{prefix}}}:audit"
    return control_state_key(prefix), control_audit_key(prefix)


def _wrongtype(key: str, exc: ResponseError) -> str | None:
    text = str(exc)
    if text.startswith("WRONGTYPE"):
        return f"control state: {key} is not a string key ({text})"
    return None


async def read_state(redis: aioredis.Redis, prefix: str) -> StoredState:
    """The stored state, checked; a missing key is the empty state (nothing in force)."""
    key = control_keys(redis, prefix)[0]
    try:
        raw = _bytes(await redis.get(key))
    except ResponseError as exc:
        error = _wrongtype(key, exc)
        if error is None:
            raise
        return StoredState(None, error, None)
    if raw is None:
        return StoredState(ControlState())
    try:
        return StoredState(parse_state(raw), None, raw)
    except ConfigError as exc:
        return StoredState(None, str(exc), raw)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One valid audit record: who changed what, from where, as which Redis user, and when."""

    id: str
    who: str
    host: str
    redis_user: str
    server_ms: int  # the server's TIME when the change was made
    client_ms: int  # the operator's clock
    action: str
    target: str
    detail: dict[str, Any]
    before: int  # the control version before the change
    after: int  # ... and the version it produced (before + 1)
    reason: str = ""

    @property
    def version(self) -> int:
        return self.after


@dataclass(frozen=True, slots=True)
class CorruptAuditEntry:
    """A record of the audit stream that is not a valid one: its id, the first rule it breaks, and its
    fields as far as they can be shown (each value cut to 200 characters, control characters escaped)."""

    id: str
    error: str
    fields: dict[str, str]


def audit_fields(
    *, who: str, host: str, redis_user: str, client_ms: int, action: str, target: str,
    detail: Mapping[str, Any], before: int, after: int, reason: str = "",
) -> dict[str, str]:
    """The record of one change, without ``server_ms`` (the change script adds it): checked by the rules
    :func:`parse_audit` reads it back with, so every record written reads back valid.  A value that breaks
    them (a 1 MB reason, a newline in a name) is a :class:`ConfigError` naming the field; nothing is written."""
    fields = {
        "who": who, "host": host, "redis_user": redis_user, "client_ms": str(client_ms), "action": action,
        "target": target, "detail": orjson.dumps(dict(detail)).decode(), "before": str(before), "after": str(after),
        "reason": reason,
    }
    try:
        parse_audit("0-0", [(k.encode(), v.encode()) for k, v in {"server_ms": "0", **fields}.items()])
    except ConfigError as exc:
        raise ConfigError(f"audit record: {exc}") from None
    return fields


def parse_audit(entry_id: str, pairs: list[tuple[bytes, bytes]]) -> AuditEntry:
    """One record read from the stream (its field/value pairs as stored), checked: every field of
    :data:`AUDIT_FIELDS` once and no other, UTF-8, within :data:`AUDIT_LIMITS`, no control character, the
    numbers decimal, ``after`` = ``before`` + 1, ``action`` one of :data:`AUDIT_ACTIONS`, ``detail`` a JSON
    object.  :class:`ConfigError` naming the first rule broken.  Cost: linear in the record's size."""
    f: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        try:
            name, value = raw_name.decode(), raw_value.decode()
        except UnicodeDecodeError:
            raise ConfigError(f"field {_shown(raw_name)!r}: not UTF-8") from None
        if name not in AUDIT_LIMITS:
            raise ConfigError(f"unexpected field {_shown(raw_name)!r}")
        if name in f:
            raise ConfigError(f"field {name!r} given twice")
        f[name] = check_text(f"field {name!r}", value, AUDIT_LIMITS[name])
    missing = [name for name in AUDIT_FIELDS if name not in f and name != "reason"]
    if missing:
        raise ConfigError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    for name in _NUMBERS:
        if not (f[name].isascii() and f[name].isdigit()):
            raise ConfigError(f"field {name!r}: not a decimal number: {f[name]!r}")
    if int(f["after"]) != int(f["before"]) + 1:
        raise ConfigError(f"versions {f['before']} -> {f['after']}: a change adds one")
    if f["action"] not in AUDIT_ACTIONS:
        raise ConfigError(f"unknown action {f['action']!r}")
    try:
        detail = orjson.loads(f["detail"])
    except orjson.JSONDecodeError:
        raise ConfigError("field 'detail': not valid JSON") from None
    if not isinstance(detail, dict):
        raise ConfigError("field 'detail': not a JSON object")
    return AuditEntry(
        id=entry_id, who=f["who"], host=f["host"], redis_user=f["redis_user"], server_ms=int(f["server_ms"]),
        client_ms=int(f["client_ms"]), action=f["action"], target=f["target"], detail=detail,
        before=int(f["before"]), after=int(f["after"]), reason=f.get("reason", ""),
    )


def _shown(value: bytes, limit: int = 200) -> str:
    """Hostile bytes as text fit for a terminal: invalid UTF-8 as ``\\xNN``, control characters escaped."""
    text = value[: limit * 4].decode("utf-8", "backslashreplace")
    text = _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)
    return text[:limit] + ("..." if len(text) > limit or len(value) > limit * 4 else "")


def _entry(entry_id: str, raw: object) -> AuditEntry | CorruptAuditEntry:
    """One XREVRANGE entry as the server sent it (``[field, value, ...]``), parsed or marked corrupt."""
    flat = [_bytes(x) or b"" for x in raw] if isinstance(raw, list | tuple) else []
    pairs = list(zip(flat[0::2], flat[1::2], strict=False))
    try:
        return parse_audit(entry_id, pairs)
    except ConfigError as exc:
        shown = {_shown(k, 64): _shown(v) for k, v in pairs[:32]}
        return CorruptAuditEntry(entry_id, str(exc), shown)


async def read_audit(
    redis: aioredis.Redis, prefix: str, count: int = 20, *, page: int = 100
) -> list[AuditEntry | CorruptAuditEntry]:
    """The newest ``count`` audit records, newest first, each parsed or marked corrupt (never an exception
    for what a record holds).  Read ``page`` entries per ``XREVRANGE``; memory is linear in what is read."""
    cluster = is_cluster(redis)
    raw_client = cluster_raw_client(redis) if cluster else aioredis.Redis(connection_pool=redis.connection_pool)
    raw_client.set_response_callback("XREVRANGE", lambda response, **_: response)
    key, end = control_keys(redis, prefix)[1], "+"
    out: list[AuditEntry | CorruptAuditEntry] = []
    try:
        while len(out) < count:
            want = min(page, count - len(out))
            rows: Any = await raw_client.execute_command("XREVRANGE", key, end, "-", "COUNT", want)  # type: ignore[no-untyped-call]
            for row in rows or ():
                out.append(_entry(_text(row[0]), row[1]))
            if not rows or len(rows) < want:
                break
            end = f"({_text(rows[-1][0])}"
    finally:
        if cluster:  # a cluster client of its own (no pool to share)
            await raw_client.aclose()
    return out


async def redis_user(redis: aioredis.Redis) -> str:
    """The ACL user this client is, as Redis says (``ACL WHOAMI``); when the command is refused (a user
    without the right to it, a server without ACLs), the user name the client logged in with, else
    ``default`` (what a password-only or no login is).  Redis unreachable: :class:`TransientError`."""
    try:
        name: object = await redis.acl_whoami()
    except ResponseError:
        name = client_kwargs(redis).get("username") or "default"
    except (RedisError, OSError) as exc:
        raise TransientError(f"Redis failed before the change, nothing changed: {exc}") from None
    return _clean_text(_text(name), MAX_WHO) or "default"


# ---------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class Change:
    before: ControlState
    after: ControlState
    audit_id: str = ""  # the id of the change's audit record ("" when nothing changed)

    @property
    def changed(self) -> bool:
        return self.after != self.before


async def update_state(
    redis: aioredis.Redis,
    prefix: str,
    mutate: Callable[[ControlState], ControlState],
    *,
    who: str,
    action: str,
    target: str = "",
    detail: Mapping[str, Any] | None = None,
    host: str | None = None,
    reason: str = "",
    clock: Callable[[], float] = time.time,
    audit_maxlen: int = AUDIT_MAXLEN,
) -> Change:
    """Apply ``mutate`` to the stored state atomically, with its audit record and notice (one script call
    that writes only when the state is still what was read; read again and retried when another writer got
    in first).  ``mutate`` returning its argument means nothing changes: nothing is written, audited or
    announced.  ``who``, ``host`` (default: this machine's name) and ``reason`` go into the record with the
    Redis user (:func:`redis_user`) and both clocks.

    A malformed stored state is not overwritten: :class:`ConfigError` (``market ctl reset`` replaces it).
    Cost: two round trips (read, script) per attempt, and one for ``ACL WHOAMI``.
    """
    key = control_keys(redis, prefix)[0]

    def step(raw: bytes | None, wrongtype: str | None) -> tuple[ControlState, ControlState]:
        if wrongtype is not None:
            raise ConfigError(f"control state: {key} is not a string key ({wrongtype}): "
                              "fix it by hand or run `market ctl reset`")
        before = ControlState() if raw is None else _parse_stored(key, raw)
        after = mutate(before)
        return before, before if after == before else dataclasses.replace(after, version=before.version + 1)

    return await _apply(redis, prefix, step, who=who, host=host, reason=reason, action=action, target=target,
                        detail=detail or {}, clock=clock, audit_maxlen=audit_maxlen)


def _parse_stored(key: str, raw: bytes) -> ControlState:
    try:
        return parse_state(raw)
    except ConfigError as exc:
        raise ConfigError(
            f"the stored control state at {key} is malformed, so it was left as it is ({exc}); "
            "fix it by hand or run `market ctl reset`"
        ) from None


async def reset_state(
    redis: aioredis.Redis, prefix: str, *, who: str, host: str | None = None, reason: str = "",
    clock: Callable[[], float] = time.time, audit_maxlen: int = AUDIT_MAXLEN,
) -> Change:
    """Replace whatever is stored, malformed or not, with the empty state (nothing in force); audited and
    announced in the same step, as :func:`update_state` does."""

    def step(raw: bytes | None, _wrongtype: str | None) -> tuple[ControlState, ControlState]:
        before = ControlState(version=_version_of(raw))
        if raw is not None:
            with contextlib.suppress(ConfigError):
                before = parse_state(raw)
        return before, ControlState(version=before.version + 1)

    return await _apply(redis, prefix, step, who=who, host=host, reason=reason, action="reset", target="",
                        detail={}, clock=clock, audit_maxlen=audit_maxlen)


def _version_of(raw: bytes | None) -> int:
    """The version of a stored record, as far as it can be read (0 if not at all)."""
    if raw is None:
        return 0
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 0
    version = obj.get("version") if isinstance(obj, dict) else None
    return version if type(version) is int and version >= 0 else 0


async def _apply(
    redis: aioredis.Redis, prefix: str, step: Callable[[bytes | None, str | None], tuple[ControlState, ControlState]],
    *, who: str, host: str | None, reason: str, action: str, target: str, detail: Mapping[str, Any],
    clock: Callable[[], float], audit_maxlen: int,
) -> Change:
    """Read the state key, let ``step`` (given the value, or the WRONGTYPE error of a key of another type)
    say the states before and after, and write the change with its record: retried while another writer
    gets in first.  Nothing is written when ``step`` returns the same state twice or raises."""
    key = control_keys(redis, prefix)[0]
    user = await redis_user(redis)
    host = _clean_text(host or socket.gethostname(), AUDIT_LIMITS["host"])
    for _ in range(MAX_ATTEMPTS):
        raw, wrongtype = None, None
        try:
            raw = _bytes(await redis.get(key))
        except ResponseError as exc:
            if _wrongtype(key, exc) is None:
                raise
            wrongtype = str(exc)  # a key of another type (only a reset replaces it)
        except (RedisError, OSError) as exc:
            raise TransientError(f"{key}: Redis failed before the change, nothing changed: {exc}") from None
        before, after = step(raw, wrongtype)
        if after == before:
            return Change(before, before)
        fields = audit_fields(
            who=who, host=host, redis_user=user, client_ms=int(clock() * 1000), action=action, target=target,
            detail=detail, before=before.version, after=after.version, reason=reason,
        )
        kind = "other" if wrongtype is not None else "none" if raw is None else "string"
        audit_id = await _write(redis, prefix, kind, raw, after, fields, audit_maxlen)
        if audit_id is not None:
            return Change(before, after, audit_id)
    raise TransientError(f"{key}: too many concurrent changes, try again")


async def _write(
    redis: aioredis.Redis, prefix: str, kind: str, raw: bytes | None, state: ControlState,
    fields: Mapping[str, str], audit_maxlen: int,
) -> str | None:
    """Run ``_CHANGE_SCRIPT``: the audit entry's id, or None when the state changed since it was read."""
    key, audit = control_keys(redis, prefix)
    args: list[str | bytes | int] = [
        kind, raw or b"", dump_state(state), audit_maxlen, control_changed_channel(prefix), state.version,
    ]
    for name, value in fields.items():
        args += [name, value]
    try:
        reply: Any = await redis.register_script(_CHANGE_SCRIPT)(keys=[key, audit], args=args)
    except ResponseError as exc:
        text = (str(exc).splitlines() or [type(exc).__name__])[0]
        if "WRONGTYPE" in text:
            raise ConfigError(f"{audit} is not a stream, so no change can be audited; nothing changed. "
                              f"Look at it, then delete it ({text})") from None
        user = fields.get("redis_user", "default")
        raise ConfigError(
            f"Redis refused the change and its audit record (Redis user {user}); nothing changed: {text}"
        ) from None
    except (RedisError, OSError) as exc:
        raise TransientError(
            f"Redis failed during the change (version {state.version}): it was applied with its audit record, "
            f"or not at all; `market ctl history` says which: {exc}"
        ) from None
    return None if reply is None else _text(reply[0])


# ---------------------------------------------------------------------------------------------- following


_UNSEEN: Final = object()


class StateFollower:
    """Decides what a watcher does with what it read: apply a new valid state once, reject a malformed
    record once (keeping the last good state), ignore what it has seen.  No I/O."""

    __slots__ = ("_last", "applied", "current", "on_invalid", "on_state", "rejected")

    def __init__(self, on_state: Callable[[ControlState], None], on_invalid: Callable[[str], None]) -> None:
        self.on_state = on_state
        self.on_invalid = on_invalid
        self.current: ControlState | None = None
        self._last: object = _UNSEEN
        self.applied = 0
        self.rejected = 0

    def offer(self, raw: bytes | None) -> None:
        """What the state key holds now (``None``: no key, the empty state)."""
        if raw == self._last:
            return
        if raw is None:
            state = ControlState()
        else:
            try:
                state = parse_state(raw)
            except ConfigError as exc:
                self._reject(raw, str(exc))
                return
        if state != self.current:
            self.on_state(state)  # if it raises, nothing is recorded: the next read tries again
            self.current = state
            self.applied += 1
        self._last = raw

    def offer_error(self, message: str) -> None:
        """The key cannot be read as a state at all (e.g. a key of another type)."""
        self._reject(message, message)

    def _reject(self, seen: object, message: str) -> None:
        if seen == self._last:
            return
        self._last = seen
        self.rejected += 1
        self.on_invalid(message)


async def watch_control(
    redis: aioredis.Redis,
    prefix: str,
    on_state: Callable[[ControlState], None],
    on_invalid: Callable[[str], None],
    *,
    poll_interval: float = POLL_INTERVAL,
    delays: Callable[[], Iterator[float]] = lambda: backoff_delays(initial=0.1, cap=5.0),
) -> NoReturn:
    """Follow the stored state for as long as it runs: read it at start (so a restart resumes the
    switches in force), then on every change notice and every ``poll_interval`` seconds.

    ``on_state`` gets each new valid state once (never the same one twice in a row); ``on_invalid`` gets
    the reason a stored record is rejected (once per distinct record), and the last good state stays in
    force.  Redis errors are logged and retried with capped, jittered backoff; only cancellation ends it.
    """
    key, channel = control_keys(redis, prefix)[0], control_changed_channel(prefix)
    follower = StateFollower(on_state, on_invalid)
    throttle = Throttle(log, interval=10.0)
    backoff: Iterator[float] | None = None
    task = asyncio.current_task()
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(channel)  # before the first read: no change can fall in between
            while True:
                try:
                    raw = _bytes(await redis.get(key))
                except ResponseError as exc:
                    error = _wrongtype(key, exc)
                    if error is None:
                        raise
                    follower.offer_error(error)
                else:
                    _offer(follower, raw, throttle)
                backoff = None
                await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll_interval)
                if task is not None and task.cancelling():
                    # redis-py's PubSub.get_message may return None, instead of raising, when the task is
                    # cancelled while it reads: carry the cancellation on, or the watcher would never end.
                    raise asyncio.CancelledError
        except (RedisError, OSError) as exc:
            if backoff is None:
                backoff = delays()
            delay = next(backoff)
            throttle.log(logging.WARNING, "control_plane_unavailable", error=f"{type(exc).__name__}: {exc}"[:300],
                         retry_in_s=round(delay, 3))
            await asyncio.sleep(delay)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]


def _offer(follower: StateFollower, raw: bytes | None, throttle: Throttle) -> None:
    try:
        follower.offer(raw)
    except Exception as exc:  # the callback's fault must not end the watcher; the next read retries
        throttle.log(logging.ERROR, "control_apply_failed", error=repr(exc)[:300])


async def run_auto_degrade(
    gate: ControlGate,
    sample: Callable[[], tuple[float, float]],
    on_step: Callable[[AutoStep], None] | None = None,
    *,
    interval: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
) -> NoReturn:
    """Every ``interval`` seconds feed the gate's automatic degradation ``sample()`` =
    ``(ingress fill ratio, e2e p99 µs)``.  Each step it takes is logged (the gate counts it) and handed
    to ``on_step``."""
    while True:
        await asyncio.sleep(interval)
        fill, p99 = sample()
        step = gate.sample_auto(fill, p99, clock())
        if step is not None:
            log_event(
                log, logging.WARNING, "auto_degrade_step", before=step.before.value, after=step.after.value,
                direction=step.direction, reason=step.reason,
            )
            if on_step is not None:
                on_step(step)
