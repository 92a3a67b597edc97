"""The control plane in Redis: the desired switches, their audit trail and change notices; and the
two tasks an ingestor runs for it (:func:`watch_control`, :func:`run_auto_degrade`).

Under one prefix (``md`` by default):

- ``<prefix>:_ctl:state``: the desired :class:`~distributor.control.ControlState` as JSON, with its
  version.  One key, so every change is one ``WATCH``/``MULTI`` transaction on one slot (Redis Cluster
  safe) and two ``market ctl`` calls at once never lose each other's change.
- ``<prefix>:_ctl:audit``: a stream (``MAXLEN ~ 10000``), one entry per change: ``who``, ``at``
  (epoch ms), ``action``, ``target``, ``detail`` (JSON) and the ``version`` it produced.
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
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError, WatchError

from consumer_sdk.core.backoff import backoff_delays
from consumer_sdk.core.errors import ConfigError, TransientError
from consumer_sdk.core.keys import control_audit_key, control_changed_channel, control_state_key
from consumer_sdk.core.log import Throttle, get_logger, log_event
from distributor.control import AutoStep, ControlGate, ControlState, dump_state, parse_state

__all__ = [
    "AUDIT_MAXLEN",
    "POLL_INTERVAL",
    "AuditEntry",
    "Change",
    "StateFollower",
    "StoredState",
    "default_who",
    "read_audit",
    "read_state",
    "reset_state",
    "run_auto_degrade",
    "update_state",
    "watch_control",
]

AUDIT_MAXLEN: Final = 10_000
POLL_INTERVAL: Final = 0.5
MAX_ATTEMPTS: Final = 200

log = get_logger("control")


def default_who() -> str:
    """``user@host`` of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


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


def _wrongtype(prefix: str, exc: ResponseError) -> str | None:
    text = str(exc)
    if text.startswith("WRONGTYPE"):
        return f"control state: {control_state_key(prefix)} is not a string key ({text})"
    return None


async def read_state(redis: aioredis.Redis, prefix: str) -> StoredState:
    """The stored state, checked; a missing key is the empty state (nothing in force)."""
    try:
        raw = _bytes(await redis.get(control_state_key(prefix)))
    except ResponseError as exc:
        error = _wrongtype(prefix, exc)
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
    id: str
    who: str
    at_ms: int
    action: str
    target: str
    detail: dict[str, Any]
    version: int


async def read_audit(redis: aioredis.Redis, prefix: str, count: int = 20) -> list[AuditEntry]:
    """The newest ``count`` audit entries, newest first."""
    rows: Any = await redis.xrevrange(control_audit_key(prefix), "+", "-", count=count)
    out: list[AuditEntry] = []
    for entry_id, fields in rows or ():
        f = {_text(k): _text(v) for k, v in (fields or {}).items()}
        try:
            detail = orjson.loads(f.get("detail", "{}"))
        except orjson.JSONDecodeError:
            detail = {"raw": f.get("detail", "")}
        out.append(
            AuditEntry(
                id=_text(entry_id), who=f.get("who", ""),
                at_ms=int(f.get("at", 0) or 0), action=f.get("action", ""), target=f.get("target", ""),
                detail=detail if isinstance(detail, dict) else {"value": detail},
                version=int(f.get("version", 0) or 0),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True, slots=True)
class Change:
    before: ControlState
    after: ControlState

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
    clock: Callable[[], float] = time.time,
) -> Change:
    """Apply ``mutate`` to the stored state atomically (optimistic ``WATCH``/``MULTI``, retried when
    another writer got in first), then audit and announce the change.  ``mutate`` returning its
    argument means nothing changes: nothing is written, audited or announced.

    A malformed stored state is not overwritten: :class:`ConfigError` (``market ctl reset`` replaces it).
    """
    key = control_state_key(prefix)
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(MAX_ATTEMPTS):
            try:
                await pipe.watch(key)
                raw = _bytes(await pipe.get(key))
                before = ControlState() if raw is None else _parse_stored(key, raw)
                after = mutate(before)
                if after == before:
                    await pipe.unwatch()  # type: ignore[no-untyped-call]
                    return Change(before, before)
                after = dataclasses.replace(after, version=before.version + 1)
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, dump_state(after))
                await pipe.execute()
                break
            except WatchError:
                continue
            except ResponseError as exc:
                error = _wrongtype(prefix, exc)
                if error is None:
                    raise
                raise ConfigError(f"{error}: fix it by hand or run `market ctl reset`") from None
        else:
            raise TransientError(f"{key}: too many concurrent changes, try again")
    await _announce(redis, prefix, after, who=who, action=action, target=target, detail=detail, at=clock())
    return Change(before, after)


def _parse_stored(key: str, raw: bytes) -> ControlState:
    try:
        return parse_state(raw)
    except ConfigError as exc:
        raise ConfigError(
            f"the stored control state at {key} is malformed, so it was left as it is ({exc}); "
            "fix it by hand or run `market ctl reset`"
        ) from None


async def reset_state(
    redis: aioredis.Redis, prefix: str, *, who: str, clock: Callable[[], float] = time.time
) -> Change:
    """Replace whatever is stored, malformed or not, with the empty state (nothing in force)."""
    key = control_state_key(prefix)
    async with redis.pipeline(transaction=True) as pipe:
        for _ in range(MAX_ATTEMPTS):
            try:
                await pipe.watch(key)
                try:
                    raw = _bytes(await pipe.get(key))
                except ResponseError:
                    raw = None  # a key of another type: replaced below
                before = ControlState(version=_version_of(raw))
                if raw is not None:
                    with contextlib.suppress(ConfigError):
                        before = parse_state(raw)
                after = ControlState(version=before.version + 1)
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, dump_state(after))  # SET replaces a key of any type
                await pipe.execute()
                break
            except WatchError:
                continue
        else:
            raise TransientError(f"{key}: too many concurrent changes, try again")
    await _announce(redis, prefix, after, who=who, action="reset", target="", detail={}, at=clock())
    return Change(before, after)


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


async def _announce(
    redis: aioredis.Redis, prefix: str, state: ControlState, *, who: str, action: str, target: str,
    detail: Mapping[str, Any] | None, at: float,
) -> None:
    fields: dict[str, str | int] = {
        "who": who, "at": int(at * 1000), "action": action, "target": target,
        "detail": orjson.dumps(dict(detail or {})).decode(), "version": state.version,
    }
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.xadd(control_audit_key(prefix), fields, maxlen=AUDIT_MAXLEN, approximate=True)  # type: ignore[arg-type]
        pipe.publish(control_changed_channel(prefix), str(state.version))
        await pipe.execute()
    except (RedisError, OSError) as exc:
        raise TransientError(
            f"the change is stored (version {state.version}) but its audit record or notice failed: {exc}"
        ) from None


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
    key, channel = control_state_key(prefix), control_changed_channel(prefix)
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
                    error = _wrongtype(prefix, exc)
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
