"""``market ctl``: runtime switches, applied live by every ingestor on the same Redis and prefix.

TARGET is a ``venue:SYMBOL:channel`` pattern with globs in any part (``binance:BTCUSDT:trade``,
``binance:*:kline_*``); a venue alone (``okx`` or ``okx:*``) is ``okx:*:*``, every stream of that venue, whichever
process of however many venues ingests it.  Every change is one atomic update of ``<prefix>:_ctl:state`` together
with its record in the audit stream ``<prefix>:_ctl:audit`` (one server-side script call: no change without its
record; on a Redis Cluster the two keys carry the hash tag ``{<prefix>}``, ``<prefix>:_ctl:{<prefix>}:state``, so
they share a slot: :func:`ingestor.control_plane.control_keys`): who made it (the OS user, or ``--actor`` /
``MARKET_ACTOR``), from which host, as which Redis user, when (the server's clock and the operator's), the command and
its arguments, the control version before and after, and ``--reason``. ``history`` shows the newest records.
Repeating a change that is already in force changes nothing and records nothing.

Bad input (an unknown level, an invalid pattern, a rate that is not a positive number, a ``--reason``
over :data:`~ingestor.control_plane.MAX_REASON` characters or with a control character) and an
unreachable Redis raise :class:`~consumer_sdk.core.errors.ConfigError` / ``TransientError``: the ``market``
command prints one line and exits 2.  ``show`` exits 1 when the stored record is malformed, ``history``
when a record it shows is corrupt (shown as such, with its id).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import orjson
import typer

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import DEFAULT_PREFIX, check_prefix
from distributor.control import ControlState, Level, LimitPolicy, parse_target, state_to_dict

if TYPE_CHECKING:  # Redis is imported when a command runs: `market --help` and other commands stay quick
    import redis.asyncio as aioredis

    from ingestor.control_plane import AuditEntry, Change, CorruptAuditEntry, StoredState

__all__ = ["app"]

T = TypeVar("T")

app = typer.Typer(
    name="ctl",
    help="Runtime switches applied live by every ingestor: pause, limit, degrade (targets: venue:SYMBOL:channel).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

Target = Annotated[
    str, typer.Argument(help="venue:SYMBOL:channel pattern, globs allowed (binance:*:kline_*); okx:* is okx:*:*")
]
Who = Annotated[
    str | None,
    typer.Option("--actor", "--who", help="who makes the change, for the audit (default: $MARKET_ACTOR, the OS user)"),
]
Reason = Annotated[str | None, typer.Option("--reason", help="why, for the audit (at most 1000 characters)")]


# ---------------------------------------------------------------------------------------------- plumbing


def _prefix() -> str:
    return check_prefix(os.environ.get("MARKET_PREFIX", DEFAULT_PREFIX), "MARKET_PREFIX")


def _redis_url() -> str:
    from consumer_sdk.core.urls import DEFAULT_REDIS_URL, validate_redis_url

    return validate_redis_url(os.environ.get("MARKET_REDIS_URL", DEFAULT_REDIS_URL))


async def _with_redis(job: Callable[[aioredis.Redis], Coroutine[Any, Any, T]]) -> T:
    from consumer_sdk.core.redis import connect_redis

    redis = await connect_redis(_redis_url())
    try:
        return await job(redis)
    finally:
        await redis.aclose()


def _run(job: Callable[[aioredis.Redis], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(_with_redis(job))
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _target(text: str) -> str:
    """A switch's ``venue:SYMBOL:channel`` pattern; a whole venue may be named alone: ``okx`` and ``okx:*`` are
    ``okx:*:*`` (a symbol without its channel, ``okx:BTC-USDT``, is refused as before)."""
    venue, sep, rest = text.strip().partition(":")
    if venue and (not sep or rest == "*"):
        text = f"{venue}:*:*"
    return parse_target(text).text


def _when(at: float) -> str:
    if at <= 0:
        return "-"
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _change(
    mutate: Callable[[ControlState, str, float], ControlState], *, action: str, target: str,
    detail: dict[str, Any], who: str | None, reason: str | None, done: str, already: str,
) -> None:
    """Apply one change, with its audit record, and print what happened."""
    from ingestor.control_plane import update_state

    actor, by = _who(who)
    why = _reason(reason)
    prefix = _prefix()
    at = time.time()

    async def job(redis: aioredis.Redis) -> Change:
        return await update_state(
            redis, prefix, lambda s: mutate(s, by, at), who=actor, action=action, target=target, detail=detail,
            reason=why, clock=lambda: at,
        )

    change = _run(job)
    if change.changed:
        print(f"{done} (version {change.after.version}, by {by})")
    else:
        print(f"{already} (version {change.after.version}): nothing changed")


def _who(who: str | None) -> tuple[str, str]:
    """``(actor, stamp)``: who the audit record names (``--actor``, else ``$MARKET_ACTOR``, else the OS user)
    and what the switch is stamped with (the actor when given, else ``user@host`` as before)."""
    from distributor.control import MAX_WHO
    from ingestor.control_plane import check_text, default_who, os_user

    given, source = (who, "--actor/--who") if who and who.strip() else (os.environ.get("MARKET_ACTOR"), "MARKET_ACTOR")
    if given and given.strip():
        actor = check_text(source, given.strip(), MAX_WHO)
        return actor, actor
    source = "the OS user name (give --actor)"
    return check_text(source, os_user(), MAX_WHO), check_text(source, default_who(), MAX_WHO)


def _reason(reason: str | None) -> str:
    from ingestor.control_plane import MAX_REASON, check_text

    return check_text("--reason", reason.strip(), MAX_REASON) if reason else ""


def _rate(text: str) -> float:
    try:
        rate = float(text.strip().removesuffix("/s"))
    except ValueError:
        rate = math.nan
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"invalid rate {text!r}: expected a positive number of ticks per second, e.g. 100")
    return rate


# ---------------------------------------------------------------------------------------------- commands


@app.command()
def pause(
    target: Target,
    unsubscribe: Annotated[
        bool, typer.Option("--unsubscribe", help="also drop the venue subscription while paused")
    ] = False,
    who: Who = None,
    reason: Reason = None,
) -> None:
    """Drop the ticks of matching streams until `resume` (counted; trade gaps marked on resume)."""
    pattern = _target(target)
    _change(
        lambda s, by, at: s.with_pause(pattern, unsubscribe=unsubscribe, who=by, at=at),
        action="pause", target=pattern, detail={"unsubscribe": unsubscribe}, who=who, reason=reason,
        done=f"paused {pattern}" + (" (and unsubscribed)" if unsubscribe else ""),
        already=f"{pattern} is already paused",
    )


@app.command()
def resume(target: Target, who: Who = None, reason: Reason = None) -> None:
    """Lift the pause set on exactly this pattern."""
    pattern = _target(target)
    _change(
        lambda s, by, at: s.without_pause(pattern), action="resume", target=pattern, detail={}, who=who, reason=reason,
        done=f"resumed {pattern}", already=f"no pause is set on {pattern}",
    )


@app.command(context_settings={"ignore_unknown_options": True})
def limit(
    target: Target,
    rate: Annotated[str, typer.Argument(help="ticks per second, per matching stream")],
    policy: Annotated[str, typer.Option(help="conflate (keep the latest excess tick) or drop")] = "conflate",
    burst: Annotated[float | None, typer.Option(help="bucket depth in ticks (default: one second's worth)")] = None,
    who: Who = None,
    reason: Reason = None,
) -> None:
    """Rate-limit each matching stream with a token bucket."""
    pattern = _target(target)
    value = _rate(rate)
    pol = LimitPolicy.parse(policy)
    if burst is not None and not (math.isfinite(burst) and burst >= 1):
        raise ConfigError(f"invalid --burst {burst!r}: expected a number of ticks, at least 1")
    _change(
        lambda s, by, at: s.with_limit(pattern, value, pol, burst=burst, who=by, at=at),
        action="limit", target=pattern, detail={"rate": value, "policy": pol.value, "burst": burst}, who=who,
        reason=reason,
        done=f"limited {pattern} to {value:g}/s ({pol.value})",
        already=f"{pattern} is already limited to {value:g}/s ({pol.value})",
    )


@app.command()
def unlimit(target: Target, who: Who = None, reason: Reason = None) -> None:
    """Lift the limit set on exactly this pattern."""
    pattern = _target(target)
    _change(
        lambda s, by, at: s.without_limit(pattern), action="unlimit", target=pattern, detail={}, who=who, reason=reason,
        done=f"unlimited {pattern}", already=f"no limit is set on {pattern}",
    )


@app.command()
def degrade(
    level: Annotated[str, typer.Argument(help="normal, shed, conflate or essential")],
    who: Who = None,
    reason: Reason = None,
) -> None:
    """Set the degrade level: normal, shed (slow subscribers drop oldest), conflate, essential."""
    lvl = Level.parse(level)
    _change(
        lambda s, by, at: s.with_level(lvl, who=by, at=at), action="degrade", target="",
        detail={"level": lvl.value}, who=who, reason=reason, done=f"degrade level {lvl.value}",
        already=f"degrade level is already {lvl.value}",
    )


@app.command()
def critical(
    targets: Annotated[list[str] | None, typer.Argument(help="the patterns `essential` keeps whole")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="set no critical patterns")] = False,
    who: Who = None,
    reason: Reason = None,
) -> None:
    """Set the critical stream patterns (replacing the previous set)."""
    if not targets and not clear:
        raise ConfigError("critical: give one or more TARGET patterns, or --clear")
    if targets and clear:
        raise ConfigError("critical: give TARGET patterns or --clear, not both")
    patterns = [_target(t) for t in targets or ()]
    shown = ", ".join(patterns) or "none"
    _change(
        lambda s, by, at: s.with_critical(patterns, who=by, at=at), action="critical", target=" ".join(patterns),
        detail={"patterns": patterns}, who=who, reason=reason, done=f"critical patterns: {shown}",
        already=f"critical patterns are already: {shown}",
    )


@app.command()
def auto(
    switch: Annotated[str, typer.Argument(help="on or off")],
    who: Who = None,
    reason: Reason = None,
) -> None:
    """Switch automatic degradation (from ingress fill and e2e p99) on or off."""
    value = switch.strip().lower()
    if value not in ("on", "off"):
        raise ConfigError(f"auto: expected on or off, got {switch!r}")
    enabled = value == "on"
    _change(
        lambda s, by, at: s.with_auto(enabled, who=by, at=at), action="auto", target="",
        detail={"enabled": enabled}, who=who, reason=reason, done=f"automatic degradation {value}",
        already=f"automatic degradation is already {value}",
    )


@app.command()
def reset(who: Who = None, reason: Reason = None) -> None:
    """Clear every switch (also replaces a malformed stored record)."""
    from ingestor.control_plane import reset_state

    actor, by = _who(who)
    why = _reason(reason)
    prefix = _prefix()
    change = _run(lambda redis: reset_state(redis, prefix, who=actor, reason=why))
    print(f"every switch cleared (version {change.after.version}, by {by})")


@app.command()
def show(json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False) -> None:
    """Every switch in force, who set it and when.  Exit 1 when the stored record is malformed."""
    from ingestor.control_plane import control_keys, read_state

    prefix = _prefix()

    async def job(redis: aioredis.Redis) -> tuple[Any, str]:
        return await read_state(redis, prefix), control_keys(redis, prefix)[0]

    stored, key = _run(job)
    if json:
        doc: dict[str, Any] = {"key": key, "valid": stored.valid}
        if stored.state is not None:
            doc["switches"] = stored.state.switches
            doc["state"] = state_to_dict(stored.state)
        else:
            doc["error"] = stored.error
            doc["raw"] = (stored.raw or b"").decode("utf-8", "replace")
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
    else:
        for line in render(key, stored):
            print(line)
    if not stored.valid:
        print(f"market: MALFORMED control state at {key}: not applied: {stored.error}", file=sys.stderr)
        raise SystemExit(1)


def render(key: str, stored: StoredState) -> list[str]:
    """The human view of ``show``."""
    if stored.state is None:
        raw = (stored.raw or b"").decode("utf-8", "replace")
        return [
            f"MALFORMED: {key} holds no valid control state; ingestors reject it and keep their last good state.",
            f"  error:  {stored.error}",
            f"  stored: {raw[:500]}{'...' if len(raw) > 500 else ''}",
            "  fix it by hand, or run `market ctl reset` to clear every switch.",
        ]
    s = stored.state
    rows: list[tuple[str, str, str, str]] = [
        ("degrade", s.degrade.level.value, s.degrade.who or "-", _when(s.degrade.at)),
        ("auto", "on" if s.auto.enabled else "off", s.auto.who or "-", _when(s.auto.at)),
    ]
    if s.critical.patterns:
        rows.append(("critical", ", ".join(s.critical.patterns), s.critical.who or "-", _when(s.critical.at)))
    for p in s.pauses:
        rows.append(("pause", p.pattern + (" (unsubscribed)" if p.unsubscribe else ""), p.who or "-", _when(p.at)))
    for x in s.limits:
        burst = f", burst {x.burst:g}" if x.burst is not None else ""
        rows.append(("limit", f"{x.pattern} {x.rate:g}/s {x.policy.value}{burst}", x.who or "-", _when(x.at)))
    header = f"{key} version {s.version}: " + (
        f"{s.switches} switch{'es' if s.switches != 1 else ''} in force" if s.switches else "no switch in force"
    )
    widths = [max(len(r[i]) for r in [("SWITCH", "SETTING", "BY", "AT"), *rows]) for i in range(3)]
    lines = [header]
    for r in [("SWITCH", "SETTING", "BY", "AT"), *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
    return lines


@app.command()
def history(
    limit: Annotated[int, typer.Option("--limit", "-n", "--count", help="how many records, newest first")] = 20,
    json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """The audit trail, newest first: who changed what, from which host, as which Redis user, and when.
    Exit 1 when a record shown is corrupt (it is shown as such, with its id)."""
    from ingestor.control_plane import AUDIT_MAXLEN, AuditEntry, read_audit

    if not 1 <= limit <= AUDIT_MAXLEN:
        raise ConfigError(f"--limit: 1 to {AUDIT_MAXLEN}, got {limit}")
    prefix = _prefix()
    records = _run(lambda redis: read_audit(redis, prefix, limit))
    if json:
        for r in records:
            sys.stdout.write(orjson.dumps(record_to_dict(r)).decode() + "\n")
    else:
        for line in render_history(records):
            print(line)
    corrupt = [r.id for r in records if not isinstance(r, AuditEntry)]
    if corrupt:
        shown = ", ".join(corrupt[:10]) + (f" and {len(corrupt) - 10} more" if len(corrupt) > 10 else "")
        print(f"market: {len(corrupt)} corrupt audit record(s): {shown}", file=sys.stderr)
        raise SystemExit(1)


def record_to_dict(record: AuditEntry | CorruptAuditEntry) -> dict[str, Any]:
    """The JSON form of one record for ``history --json``: ``valid`` says which of the two it is."""
    from ingestor.control_plane import AuditEntry

    if not isinstance(record, AuditEntry):
        return {"id": record.id, "valid": False, "error": record.error, "fields": record.fields}
    return {
        "id": record.id, "valid": True, "who": record.who, "host": record.host, "redis_user": record.redis_user,
        "server_ms": record.server_ms, "client_ms": record.client_ms, "action": record.action,
        "target": record.target, "detail": record.detail, "before": record.before, "after": record.after,
        "reason": record.reason,
    }


def render_history(records: list[AuditEntry | CorruptAuditEntry]) -> list[str]:
    """The table ``history`` prints, newest first; a corrupt record is one line naming its id and fault."""
    from ingestor.control_plane import AuditEntry

    if not records:
        return ["no audit record"]
    header = ("ID", "SERVER TIME", "WHO", "HOST", "REDIS USER", "VERSION", "CHANGE", "REASON")
    rows: list[tuple[str, ...]] = []
    for r in records:
        if not isinstance(r, AuditEntry):
            fields = " ".join(f"{k}={v}" for k, v in r.fields.items())
            rows.append((r.id, "CORRUPT", f"{r.error}; fields: {fields or '(none)'}"))
            continue
        args = " ".join(f"{k}={_arg(v)}" for k, v in r.detail.items() if k != "patterns" and v is not None)
        change = " ".join(x for x in (r.action, r.target, args) if x)
        rows.append((
            r.id, _when_ms(r.server_ms), r.who, r.host, r.redis_user, f"{r.before}->{r.after}", change, r.reason or "-",
        ))
    full = [row for row in rows if len(row) == len(header)]
    widths = [max(len(row[i]) for row in [header, *full]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        if len(row) == len(header):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
        else:
            lines.append("  ".join(row))
    return lines


def _when_ms(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{ms}ms"


def _arg(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
