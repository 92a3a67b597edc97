"""``market ctl``: runtime switches, applied live by every ingestor on the same Redis and prefix.

TARGET is a ``venue:SYMBOL:channel`` pattern with globs in any part (``binance:BTCUSDT:trade``,
``binance:*:kline_*``).  Every change is one atomic update of ``<prefix>:_ctl:state``, recorded in the
audit stream ``<prefix>:_ctl:audit`` with who made it (``user@host``, or ``--who``) and when.
Repeating a change that is already in force changes nothing.

Bad input (an unknown level, an invalid pattern, a rate that is not a positive number) and an
unreachable Redis raise :class:`~consumer_sdk.core.errors.ConfigError` / ``TransientError``: the ``market``
command prints one line and exits 2.  ``show`` exits 1 when the stored record is malformed.
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

    from ingestor.control_plane import Change, StoredState

__all__ = ["app"]

T = TypeVar("T")

app = typer.Typer(
    name="ctl",
    help="Runtime switches applied live by every ingestor: pause, limit, degrade (targets: venue:SYMBOL:channel).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

Target = Annotated[str, typer.Argument(help="venue:SYMBOL:channel pattern, globs allowed (binance:*:kline_*)")]
Who = Annotated[str | None, typer.Option("--who", help="who makes the change, for the audit (default: user@host)")]


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


def _when(at: float) -> str:
    if at <= 0:
        return "-"
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _change(
    mutate: Callable[[ControlState, str, float], ControlState], *, action: str, target: str,
    detail: dict[str, Any], who: str | None, done: str, already: str,
) -> None:
    """Apply one change and print what happened."""
    from ingestor.control_plane import update_state

    by = _who(who)
    prefix = _prefix()
    at = time.time()

    async def job(redis: aioredis.Redis) -> Change:
        return await update_state(
            redis, prefix, lambda s: mutate(s, by, at), who=by, action=action, target=target, detail=detail,
            clock=lambda: at,
        )

    change = _run(job)
    if change.changed:
        print(f"{done} (version {change.after.version}, by {by})")
    else:
        print(f"{already} (version {change.after.version}): nothing changed")


def _who(who: str | None) -> str:
    from distributor.control import MAX_WHO
    from ingestor.control_plane import default_who

    by = who.strip() if who and who.strip() else default_who()
    if len(by) > MAX_WHO:
        raise ConfigError(f"--who: at most {MAX_WHO} characters, got {len(by)}")
    return by


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
) -> None:
    """Drop the ticks of matching streams until `resume` (counted; trade gaps marked on resume)."""
    pattern = parse_target(target).text
    _change(
        lambda s, by, at: s.with_pause(pattern, unsubscribe=unsubscribe, who=by, at=at),
        action="pause", target=pattern, detail={"unsubscribe": unsubscribe}, who=who,
        done=f"paused {pattern}" + (" (and unsubscribed)" if unsubscribe else ""),
        already=f"{pattern} is already paused",
    )


@app.command()
def resume(target: Target, who: Who = None) -> None:
    """Lift the pause set on exactly this pattern."""
    pattern = parse_target(target).text
    _change(
        lambda s, by, at: s.without_pause(pattern), action="resume", target=pattern, detail={}, who=who,
        done=f"resumed {pattern}", already=f"no pause is set on {pattern}",
    )


@app.command(context_settings={"ignore_unknown_options": True})
def limit(
    target: Target,
    rate: Annotated[str, typer.Argument(help="ticks per second, per matching stream")],
    policy: Annotated[str, typer.Option(help="conflate (keep the latest excess tick) or drop")] = "conflate",
    burst: Annotated[float | None, typer.Option(help="bucket depth in ticks (default: one second's worth)")] = None,
    who: Who = None,
) -> None:
    """Rate-limit each matching stream with a token bucket."""
    pattern = parse_target(target).text
    value = _rate(rate)
    pol = LimitPolicy.parse(policy)
    if burst is not None and not (math.isfinite(burst) and burst >= 1):
        raise ConfigError(f"invalid --burst {burst!r}: expected a number of ticks, at least 1")
    _change(
        lambda s, by, at: s.with_limit(pattern, value, pol, burst=burst, who=by, at=at),
        action="limit", target=pattern, detail={"rate": value, "policy": pol.value, "burst": burst}, who=who,
        done=f"limited {pattern} to {value:g}/s ({pol.value})",
        already=f"{pattern} is already limited to {value:g}/s ({pol.value})",
    )


@app.command()
def unlimit(target: Target, who: Who = None) -> None:
    """Lift the limit set on exactly this pattern."""
    pattern = parse_target(target).text
    _change(
        lambda s, by, at: s.without_limit(pattern), action="unlimit", target=pattern, detail={}, who=who,
        done=f"unlimited {pattern}", already=f"no limit is set on {pattern}",
    )


@app.command()
def degrade(
    level: Annotated[str, typer.Argument(help="normal, shed, conflate or essential")],
    who: Who = None,
) -> None:
    """Set the degrade level: normal, shed (slow subscribers drop oldest), conflate, essential."""
    lvl = Level.parse(level)
    _change(
        lambda s, by, at: s.with_level(lvl, who=by, at=at), action="degrade", target="",
        detail={"level": lvl.value}, who=who, done=f"degrade level {lvl.value}",
        already=f"degrade level is already {lvl.value}",
    )


@app.command()
def critical(
    targets: Annotated[list[str] | None, typer.Argument(help="the patterns `essential` keeps whole")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="set no critical patterns")] = False,
    who: Who = None,
) -> None:
    """Set the critical stream patterns (replacing the previous set)."""
    if not targets and not clear:
        raise ConfigError("critical: give one or more TARGET patterns, or --clear")
    if targets and clear:
        raise ConfigError("critical: give TARGET patterns or --clear, not both")
    patterns = [parse_target(t).text for t in targets or ()]
    shown = ", ".join(patterns) or "none"
    _change(
        lambda s, by, at: s.with_critical(patterns, who=by, at=at), action="critical", target=" ".join(patterns),
        detail={"patterns": patterns}, who=who, done=f"critical patterns: {shown}",
        already=f"critical patterns are already: {shown}",
    )


@app.command()
def auto(
    switch: Annotated[str, typer.Argument(help="on or off")],
    who: Who = None,
) -> None:
    """Switch automatic degradation (from ingress fill and e2e p99) on or off."""
    value = switch.strip().lower()
    if value not in ("on", "off"):
        raise ConfigError(f"auto: expected on or off, got {switch!r}")
    enabled = value == "on"
    _change(
        lambda s, by, at: s.with_auto(enabled, who=by, at=at), action="auto", target="",
        detail={"enabled": enabled}, who=who, done=f"automatic degradation {value}",
        already=f"automatic degradation is already {value}",
    )


@app.command()
def reset(who: Who = None) -> None:
    """Clear every switch (also replaces a malformed stored record)."""
    from ingestor.control_plane import reset_state

    by = _who(who)
    prefix = _prefix()
    change = _run(lambda redis: reset_state(redis, prefix, who=by))
    print(f"every switch cleared (version {change.after.version}, by {by})")


@app.command()
def show(json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False) -> None:
    """Every switch in force, who set it and when.  Exit 1 when the stored record is malformed."""
    from consumer_sdk.core.keys import control_state_key
    from ingestor.control_plane import read_state

    prefix = _prefix()
    stored = _run(lambda redis: read_state(redis, prefix))
    key = control_state_key(prefix)
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
    count: Annotated[int, typer.Option("-n", "--count", help="how many entries, newest first")] = 20,
    json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """The audit trail: who changed what, and when."""
    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    from ingestor.control_plane import read_audit

    prefix = _prefix()
    entries = _run(lambda redis: read_audit(redis, prefix, count))
    for e in entries:
        if json:
            sys.stdout.write(orjson.dumps({
                "id": e.id, "who": e.who, "at_ms": e.at_ms, "action": e.action, "target": e.target,
                "detail": e.detail, "version": e.version,
            }).decode() + "\n")
        else:
            what = " ".join(x for x in (e.action, e.target) if x)
            extra = " ".join(f"{k}={v}" for k, v in e.detail.items() if k != "patterns" and v is not None)
            print(f"{_when(e.at_ms / 1000)}  v{e.version}  {e.who}  {what}{'  ' + extra if extra else ''}")
