"""The stored form of a :class:`~distributor.control.state.ControlState`: JSON out, and a strict parser
back.  No I/O (:mod:`ingestor.control_plane` reads and writes it in Redis).

The parser refuses anything unexpected with a :class:`ConfigError` naming where it is (``degrade.level``,
``limits['binance:*:trade'].rate``, ...), so a bad hand edit of the stored state is reported, never half
applied.  Cost: linear in the size of the document.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

import orjson

from consumer_sdk.core.errors import ConfigError
from distributor.control.state import (
    Auto,
    ControlState,
    Critical,
    Degrade,
    Level,
    Limit,
    LimitPolicy,
    Pause,
    checked_burst,
    checked_rate,
    parse_target,
)

__all__ = ["MAX_WHO", "SCHEMA", "dump_state", "parse_state", "state_to_dict"]

SCHEMA: Final = 1
#: the longest ``who`` a stored switch may carry
MAX_WHO: Final = 200


def state_to_dict(state: ControlState) -> dict[str, Any]:
    """The stored form of a state (JSON-ready)."""
    return {
        "schema": SCHEMA,
        "version": state.version,
        "degrade": {"level": state.degrade.level.value, "who": state.degrade.who, "at": state.degrade.at},
        "auto": {"enabled": state.auto.enabled, "who": state.auto.who, "at": state.auto.at},
        "critical": {"patterns": list(state.critical.patterns), "who": state.critical.who, "at": state.critical.at},
        "pauses": {p.pattern: {"unsubscribe": p.unsubscribe, "who": p.who, "at": p.at} for p in state.pauses},
        "limits": {
            x.pattern: {
                "rate": x.rate, "policy": x.policy.value, **({"burst": x.burst} if x.burst is not None else {}),
                "who": x.who, "at": x.at,
            }
            for x in state.limits
        },
    }


def dump_state(state: ControlState) -> bytes:
    """:func:`state_to_dict` as JSON bytes, keys sorted (the same state always gives the same bytes)."""
    return orjson.dumps(state_to_dict(state), option=orjson.OPT_SORT_KEYS)


_TOP: Final = frozenset({"schema", "version", "degrade", "auto", "critical", "pauses", "limits"})


def parse_state(raw: bytes | str) -> ControlState:
    """The stored control state, checked strictly: anything unexpected is a :class:`ConfigError` naming
    where it is.  Sections that are missing take their defaults; ``who`` and ``at`` may be left out."""
    if not isinstance(raw, bytes | str):
        raise ConfigError(f"control state: expected JSON text, got {type(raw).__name__}")
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"control state: not valid JSON ({exc})") from None
    top = _object(obj, "control state")
    _only(top, _TOP, "control state")
    schema = top.get("schema", SCHEMA)
    if type(schema) is not int or schema != SCHEMA:
        raise ConfigError(f"control state: unsupported schema {schema!r} (this version reads {SCHEMA})")
    version = top.get("version", 0)
    if type(version) is not int or version < 0:
        raise ConfigError(f"control state: version must be a non-negative integer, got {version!r}")

    degrade = Degrade()
    if "degrade" in top:
        d = _object(top["degrade"], "degrade")
        _only(d, {"level", "who", "at"}, "degrade")
        if "level" not in d:
            raise ConfigError("control state: degrade.level is missing")
        try:
            level = Level.parse(d["level"])
        except ConfigError as exc:
            raise ConfigError(f"control state: degrade.level: {exc}") from None
        if d["level"] != level.value:
            raise ConfigError(f"control state: degrade.level: unknown degrade level {d['level']!r}")
        degrade = Degrade(level, *_stamp(d, "degrade"))

    auto = Auto()
    if "auto" in top:
        a = _object(top["auto"], "auto")
        _only(a, {"enabled", "who", "at"}, "auto")
        enabled = a.get("enabled")
        if type(enabled) is not bool:
            raise ConfigError(f"control state: auto.enabled must be true or false, got {enabled!r}")
        auto = Auto(enabled, *_stamp(a, "auto"))

    critical = Critical()
    if "critical" in top:
        c = _object(top["critical"], "critical")
        _only(c, {"patterns", "who", "at"}, "critical")
        pats = c.get("patterns", [])
        if not isinstance(pats, list):
            raise ConfigError(f"control state: critical.patterns must be a list of patterns, got {pats!r}")
        texts = [_pattern(p, "critical.patterns") for p in pats]
        if len(set(texts)) != len(texts):
            raise ConfigError("control state: critical.patterns: a pattern is listed twice")
        critical = Critical(tuple(texts), *_stamp(c, "critical"))

    pauses: list[Pause] = []
    for pattern, body in _patterns_map(top.get("pauses", {}), "pauses"):
        where = f"pauses[{pattern!r}]"
        _only(body, {"unsubscribe", "who", "at"}, where)
        unsubscribe = body.get("unsubscribe", False)
        if type(unsubscribe) is not bool:
            raise ConfigError(f"control state: {where}.unsubscribe must be true or false, got {unsubscribe!r}")
        pauses.append(Pause(pattern, unsubscribe, *_stamp(body, where)))

    limits: list[Limit] = []
    for pattern, body in _patterns_map(top.get("limits", {}), "limits"):
        where = f"limits[{pattern!r}]"
        _only(body, {"rate", "policy", "burst", "who", "at"}, where)
        if "rate" not in body:
            raise ConfigError(f"control state: {where}.rate is missing")
        rate = checked_rate(body["rate"], f"control state: {where}.rate")
        policy_text = body.get("policy", LimitPolicy.CONFLATE.value)
        try:
            policy = LimitPolicy(policy_text) if isinstance(policy_text, str) else LimitPolicy.parse(policy_text)
        except ValueError:
            raise ConfigError(
                f"control state: {where}.policy: unknown limit policy {policy_text!r}: expected conflate or drop"
            ) from None
        burst = body.get("burst")
        if burst is not None:
            burst = checked_burst(burst, f"control state: {where}.burst")
        limits.append(Limit(pattern, rate, policy, burst, *_stamp(body, where)))

    return ControlState(
        version=version,
        pauses=tuple(sorted(pauses, key=lambda p: p.pattern)),
        limits=tuple(sorted(limits, key=lambda x: x.pattern)),
        degrade=degrade,
        critical=critical,
        auto=auto,
    )


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"control state: {where} must be a JSON object, got {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _only(obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ConfigError(f"control state: {where}: unknown field(s) {', '.join(map(repr, unknown))}")


def _pattern(value: object, where: str) -> str:
    try:
        return parse_target(value).text
    except ConfigError as exc:
        raise ConfigError(f"control state: {where}: {exc}") from None


def _patterns_map(value: object, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    section = _object(value, where)
    seen: set[str] = set()
    for raw_pattern, body in section.items():
        pattern = _pattern(raw_pattern, where)
        if pattern in seen:
            raise ConfigError(f"control state: {where}: pattern {pattern!r} is listed twice")
        seen.add(pattern)
        yield pattern, _object(body, f"{where}[{pattern!r}]")


def _stamp(obj: Mapping[str, Any], where: str) -> tuple[str, float]:
    who = obj.get("who", "")
    if not isinstance(who, str) or len(who) > MAX_WHO:
        raise ConfigError(f"control state: {where}.who must be a string of at most {MAX_WHO} characters")
    at = obj.get("at", 0.0)
    if type(at) not in (int, float) or not math.isfinite(at) or at < 0:
        raise ConfigError(f"control state: {where}.at must be seconds since the epoch, got {at!r}")
    return who, float(at)
