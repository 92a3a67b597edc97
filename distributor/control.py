"""Runtime control: the switch model and the gate the distributor applies to every batch.  No I/O.

The switches (set live with ``market ctl``, stored by :mod:`ingestor.control_plane`):

- **pause** ``pattern``: ticks of matching streams are dropped (counted per stream).  What was
  missed is, on resume, marked in the stream with one gap marker per trade/agg_trade stream
  (``on_resume="mark"``: ``gap_first..gap_last``, reason ``paused``) or left as a plain hole in
  ``seq`` (``on_resume="none"``).  ``--unsubscribe`` also asks the ingestor to drop the venue
  subscription; the gate drops the ticks either way.
- **limit** ``pattern rate [policy]``: a token bucket per matching stream, ``rate`` ticks a second,
  ``burst`` tokens deep (default: one second's worth, at least 1).  The excess is dropped
  (``drop``) or conflated (``conflate``: only the latest excess tick of each stream is kept, and
  it goes out as soon as a token allows, unless a newer tick gets that token first).  When several
  limits match a stream, the lowest rate wins.
- **degrade** level, each including the ones before it:

  ========== ===================================================================================
  normal     nothing
  shed       nothing is filtered here; :attr:`ControlGate.shed_active` tells the hot path to treat
             slow subscribers as ``drop_oldest``
  conflate   ``book_ticker`` and unclosed kline updates: the latest tick per stream per
             ``conflate_interval`` (100 ms by default), always the newest value in the end
  essential  as ``conflate``, and ``book_ticker`` and unclosed kline updates of streams matching
             none of the *critical* patterns are dropped
  ========== ===================================================================================

  Trades, aggregate trades and closed klines are never conflated or dropped by a degrade level,
  whichever it is: they are events, not states, and a level may be chosen by :class:`AutoDegrade`
  without anyone looking.  Only an operator's explicit ``pause`` or ``limit`` removes them.
- **critical** patterns: the streams ``essential`` keeps whole.
- **auto**: :class:`AutoDegrade` may raise the level in force above the one set by hand, from the
  ingress fill ratio and the end-to-end p99 latency, and lowers it again with hysteresis.

Cost: with no switch in force :meth:`ControlGate.filter` is one attribute check per batch and
returns the batch itself.  Otherwise each tick costs one dict lookup keyed by
``(venue, symbol, channel)``; what to do with a stream is decided on its first tick and cached
until the next :meth:`ControlGate.apply`.  Gap markers (repair's and the gate's) are never limited
or conflated: a newer marker supersedes a tick held back for its stream.

Ordering: per stream, the gate emits ticks in the order it got them (held ticks are only ever
replaced by newer ones of their stream), so ``seq`` keeps increasing.

One task owns a gate (the distributor's); every method is synchronous and none awaits, so calls
from other tasks of the same event loop (the control-plane watcher, the auto-degrade sampler) are
safe without locks.  The metrics exporter thread only reads :meth:`ControlGate.stats`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from operator import itemgetter
from typing import Any, Final

import orjson

from consumer_sdk.errors import ConfigError
from consumer_sdk.keys import Pattern
from consumer_sdk.latency import LatencyHistogram
from consumer_sdk.tick import FIXED_CHANNELS, KLINE_INTERVALS, Tick, make_gap_marker

__all__ = [
    "MAX_WHO",
    "SCHEMA",
    "Auto",
    "AutoDegrade",
    "AutoDegradeConfig",
    "AutoStep",
    "ControlGate",
    "ControlState",
    "Critical",
    "Degrade",
    "GateStats",
    "Level",
    "Limit",
    "LimitPolicy",
    "OnResume",
    "Pause",
    "WindowPercentile",
    "dump_state",
    "parse_state",
    "parse_target",
    "state_to_dict",
]

SCHEMA: Final = 1
MAX_WHO: Final = 200
DEFAULT_CONFLATE_INTERVAL: Final = 0.1
PAUSE_REASON: Final = "paused"

_ALL_CHANNELS: Final = (*FIXED_CHANNELS, *(f"kline_{i}" for i in sorted(KLINE_INTERVALS)))
_TRADE_CHANNELS: Final = frozenset({"trade", "agg_trade"})
_stream_key: Final = itemgetter("venue", "symbol", "channel")
StreamIdent = tuple[str, str, str]


# ---------------------------------------------------------------------------------------------- enums


class Level(StrEnum):
    """Degrade levels, from none to the most degraded; each includes the ones before it."""

    NORMAL = "normal"
    SHED = "shed"
    CONFLATE = "conflate"
    ESSENTIAL = "essential"

    @property
    def rank(self) -> int:
        return _LEVELS.index(self)

    @classmethod
    def parse(cls, text: object) -> Level:
        if isinstance(text, str):
            try:
                return cls(text.strip().lower())
            except ValueError:
                pass
        raise ConfigError(f"unknown degrade level {text!r}: expected one of {', '.join(x.value for x in cls)}")


_LEVELS: Final = tuple(Level)


class LimitPolicy(StrEnum):
    """What a limit does with the ticks over its rate."""

    CONFLATE = "conflate"  # keep the latest excess tick per stream; send it when a token allows
    DROP = "drop"  # drop them

    @classmethod
    def parse(cls, text: object) -> LimitPolicy:
        if isinstance(text, str):
            try:
                return cls(text.strip().lower())
            except ValueError:
                pass
        raise ConfigError(f"unknown limit policy {text!r}: expected one of {', '.join(x.value for x in cls)}")


class OnResume(StrEnum):
    """What a resumed trade/agg_trade stream gets for the ticks dropped while it was paused."""

    MARK = "mark"  # one gap marker covering first..last dropped seq
    NONE = "none"  # nothing: a hole in seq, as the consumers will see it

    @classmethod
    def parse(cls, text: object) -> OnResume:
        if isinstance(text, str):
            try:
                return cls(text.strip().lower())
            except ValueError:
                pass
        raise ConfigError(f"unknown on_resume {text!r}: expected one of {', '.join(x.value for x in cls)}")


# ---------------------------------------------------------------------------------------------- targets


def parse_target(text: object) -> Pattern:
    """A ``venue:SYMBOL:channel`` pattern for a switch: venue lower-cased, symbol upper-cased, and a
    channel part that matches at least one channel there is (so ``binance:BTCUSDT:trades`` is refused)."""
    if not isinstance(text, str):
        raise ConfigError(f"invalid pattern {text!r}: expected a string venue:SYMBOL:channel")
    venue, sep, rest = text.strip().partition(":")
    pattern = Pattern(f"{venue.lower()}{sep}{rest}")
    channel = pattern.text.rsplit(":", 1)[1]
    if not any(fnmatch.fnmatchcase(c, channel) for c in _ALL_CHANNELS):
        raise ConfigError(
            f"invalid pattern {text!r}: channel {channel!r} matches no channel "
            "(trade, agg_trade, book_ticker, kline_<interval>)"
        )
    return pattern


# ---------------------------------------------------------------------------------------------- the state


@dataclass(frozen=True, slots=True)
class Pause:
    pattern: str
    unsubscribe: bool = False
    who: str = ""
    at: float = 0.0  # seconds since the Unix epoch


@dataclass(frozen=True, slots=True)
class Limit:
    pattern: str
    rate: float  # ticks per second, per stream
    policy: LimitPolicy = LimitPolicy.CONFLATE
    burst: float | None = None  # bucket depth in ticks; None: max(1, rate)
    who: str = ""
    at: float = 0.0

    @property
    def depth(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.rate)


@dataclass(frozen=True, slots=True)
class Degrade:
    level: Level = Level.NORMAL
    who: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Critical:
    patterns: tuple[str, ...] = ()
    who: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class Auto:
    enabled: bool = False
    who: str = ""
    at: float = 0.0


@dataclass(frozen=True, slots=True)
class ControlState:
    """Every switch in force, each with who set it and when.  Pauses and limits are sorted by pattern."""

    version: int = 0
    pauses: tuple[Pause, ...] = ()
    limits: tuple[Limit, ...] = ()
    degrade: Degrade = field(default_factory=Degrade)
    critical: Critical = field(default_factory=Critical)
    auto: Auto = field(default_factory=Auto)

    @property
    def switches(self) -> int:
        """Switches in force: pauses, limits, a level other than normal, automatic degradation on."""
        return (
            len(self.pauses) + len(self.limits) + (self.degrade.level is not Level.NORMAL) + self.auto.enabled
        )

    def pause_for(self, pattern: str) -> Pause | None:
        return next((p for p in self.pauses if p.pattern == pattern), None)

    def limit_for(self, pattern: str) -> Limit | None:
        return next((x for x in self.limits if x.pattern == pattern), None)

    def unsubscribe_patterns(self) -> tuple[Pattern, ...]:
        """The paused patterns whose venue subscriptions should be dropped too."""
        return tuple(Pattern(p.pattern) for p in self.pauses if p.unsubscribe)

    # Each change below returns the state itself when it changes nothing (who and when aside), so a
    # repeated command is a no-op; the version is left to the writer (:meth:`bumped`).

    def with_pause(self, target: str, *, unsubscribe: bool = False, who: str = "", at: float = 0.0) -> ControlState:
        pattern = parse_target(target).text
        old = self.pause_for(pattern)
        if old is not None and old.unsubscribe == unsubscribe:
            return self
        rest = [p for p in self.pauses if p.pattern != pattern]
        pauses = sorted([*rest, Pause(pattern, unsubscribe, who, at)], key=lambda p: p.pattern)
        return dataclasses.replace(self, pauses=tuple(pauses))

    def without_pause(self, target: str) -> ControlState:
        pattern = parse_target(target).text
        if self.pause_for(pattern) is None:
            return self
        return dataclasses.replace(self, pauses=tuple(p for p in self.pauses if p.pattern != pattern))

    def with_limit(
        self, target: str, rate: float, policy: LimitPolicy | str = LimitPolicy.CONFLATE, *,
        burst: float | None = None,
        who: str = "", at: float = 0.0,
    ) -> ControlState:
        pattern = parse_target(target).text
        rate = _rate(rate, "rate")
        if burst is not None:
            burst = _burst(burst, "burst")
        pol = LimitPolicy.parse(policy)
        old = self.limit_for(pattern)
        if old is not None and (old.rate, old.policy, old.burst) == (rate, pol, burst):
            return self
        rest = [x for x in self.limits if x.pattern != pattern]
        limits = sorted([*rest, Limit(pattern, rate, pol, burst, who, at)], key=lambda x: x.pattern)
        return dataclasses.replace(self, limits=tuple(limits))

    def without_limit(self, target: str) -> ControlState:
        pattern = parse_target(target).text
        if self.limit_for(pattern) is None:
            return self
        return dataclasses.replace(self, limits=tuple(x for x in self.limits if x.pattern != pattern))

    def with_level(self, level: Level | str, *, who: str = "", at: float = 0.0) -> ControlState:
        lvl = Level.parse(level)
        if lvl is self.degrade.level:
            return self
        return dataclasses.replace(self, degrade=Degrade(lvl, who, at))

    def with_critical(self, targets: Iterable[str], *, who: str = "", at: float = 0.0) -> ControlState:
        patterns = tuple(dict.fromkeys(parse_target(t).text for t in targets))
        if patterns == self.critical.patterns:
            return self
        return dataclasses.replace(self, critical=Critical(patterns, who, at))

    def with_auto(self, enabled: bool, *, who: str = "", at: float = 0.0) -> ControlState:
        if enabled == self.auto.enabled:
            return self
        return dataclasses.replace(self, auto=Auto(enabled, who, at))

    def bumped(self) -> ControlState:
        return dataclasses.replace(self, version=self.version + 1)


def _rate(value: object, where: str) -> float:
    if type(value) not in (int, float):
        raise ConfigError(f"{where} must be a number of ticks per second, got {value!r}")
    rate = float(value)  # type: ignore[arg-type]
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"{where} must be a positive, finite number of ticks per second, got {value!r}")
    return rate


def _burst(value: object, where: str) -> float:
    if type(value) not in (int, float):
        raise ConfigError(f"{where} must be a number of ticks, got {value!r}")
    burst = float(value)  # type: ignore[arg-type]
    if not math.isfinite(burst) or burst < 1:
        raise ConfigError(f"{where} must be a finite number of ticks, at least 1, got {value!r}")
    return burst


# ---------------------------------------------------------------------------------------------- JSON


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
        rate = _rate(body["rate"], f"control state: {where}.rate")
        policy_text = body.get("policy", LimitPolicy.CONFLATE.value)
        try:
            policy = LimitPolicy(policy_text) if isinstance(policy_text, str) else LimitPolicy.parse(policy_text)
        except ValueError:
            raise ConfigError(
                f"control state: {where}.policy: unknown limit policy {policy_text!r}: expected conflate or drop"
            ) from None
        burst = body.get("burst")
        if burst is not None:
            burst = _burst(burst, f"control state: {where}.burst")
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


# ---------------------------------------------------------------------------------------------- auto-degrade


@dataclass(frozen=True, slots=True)
class AutoDegradeConfig:
    """Thresholds of :class:`AutoDegrade`.  Pressure is *high* when the ingress fill ratio or the e2e p99
    reaches its high mark, *low* when both are at or under their low marks; in between resets both clocks."""

    fill_high: float = 0.5
    fill_low: float = 0.1
    p99_high_us: float = 250_000.0
    p99_low_us: float = 50_000.0
    down_after: float = 3.0  # seconds of high pressure before each step down (more degraded)
    up_after: float = 30.0  # seconds of low pressure before each step back up
    max_level: Level = Level.ESSENTIAL

    def __post_init__(self) -> None:
        if not 0.0 <= self.fill_low < self.fill_high <= 1.0:
            raise ConfigError(
                f"auto-degrade: need 0 <= fill_low < fill_high <= 1, got {self.fill_low}, {self.fill_high}"
            )
        if not 0.0 <= self.p99_low_us < self.p99_high_us:
            raise ConfigError(
                f"auto-degrade: need 0 <= p99_low_us < p99_high_us, got {self.p99_low_us}, {self.p99_high_us}"
            )
        if not (self.down_after >= 0 and self.up_after >= 0):
            raise ConfigError(f"auto-degrade: durations must be >= 0, got {self.down_after}, {self.up_after}")


@dataclass(frozen=True, slots=True)
class AutoStep:
    """One automatic level change, for the caller to log and count."""

    at: float
    before: Level
    after: Level
    reason: str

    @property
    def direction(self) -> str:
        """``down`` (more degraded) or ``up``."""
        return "down" if self.after.rank > self.before.rank else "up"


class AutoDegrade:
    """Steps one level down after ``down_after`` seconds of high pressure, one level back up after
    ``up_after`` seconds of low pressure; each step restarts the clock.  Feed it a sample a second."""

    __slots__ = ("_high_since", "_low_since", "config", "level")

    def __init__(self, config: AutoDegradeConfig | None = None) -> None:
        self.config = config or AutoDegradeConfig()
        self.level = Level.NORMAL
        self._high_since: float | None = None
        self._low_since: float | None = None

    def reset(self) -> None:
        self.level = Level.NORMAL
        self._high_since = self._low_since = None

    def sample(self, fill_ratio: float, p99_us: float, now: float) -> AutoStep | None:
        c = self.config
        if fill_ratio >= c.fill_high or p99_us >= c.p99_high_us:
            self._low_since = None
            if self._high_since is None:
                self._high_since = now
            if now - self._high_since >= c.down_after and self.level.rank < c.max_level.rank:
                self._high_since = now
                return self._step(
                    1, now, f"ingress fill {fill_ratio:.2f} (high {c.fill_high:g}), e2e p99 {p99_us:.0f} µs "
                    f"(high {c.p99_high_us:.0f}) for {c.down_after:g} s",
                )
        elif fill_ratio <= c.fill_low and p99_us <= c.p99_low_us:
            self._high_since = None
            if self.level is Level.NORMAL:
                self._low_since = None
                return None
            if self._low_since is None:
                self._low_since = now
            if now - self._low_since >= c.up_after:
                self._low_since = now
                return self._step(
                    -1, now, f"ingress fill {fill_ratio:.2f} (low {c.fill_low:g}), e2e p99 {p99_us:.0f} µs "
                    f"(low {c.p99_low_us:.0f}) for {c.up_after:g} s",
                )
        else:
            self._high_since = self._low_since = None
        return None

    def _step(self, delta: int, now: float, reason: str) -> AutoStep:
        before = self.level
        self.level = _LEVELS[before.rank + delta]
        return AutoStep(now, before, self.level, reason)


class WindowPercentile:
    """A quantile of what a :class:`LatencyHistogram` counted since the previous :meth:`sample`
    (the histogram only ever grows, so the difference of two readings is the window)."""

    __slots__ = ("_hist", "_last", "q")

    def __init__(self, hist: LatencyHistogram, q: float = 0.99) -> None:
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"quantile must be in (0, 1], got {q}")
        self._hist = hist
        self.q = q
        self._last = hist.copy()

    def sample(self) -> float:
        """The quantile in µs over the window (its bucket's upper bound); 0.0 when it saw nothing."""
        now = self._hist.copy()
        window = now.since(self._last)
        self._last = now
        return window.percentile(self.q)


# ---------------------------------------------------------------------------------------------- the gate


@dataclass(frozen=True, slots=True)
class GateStats:
    version: int
    level: Level  # in force: the operator's, or higher when automatic degradation raised it
    operator_level: Level
    auto_level: Level
    auto_enabled: bool
    shed_active: bool
    switches: int
    pauses: int
    limits: int
    paused_dropped: int
    limited_dropped: int  # over a limit with the drop policy
    limited_conflated: int  # over a limit with the conflate policy, superseded by a newer tick
    conflated: int  # by the conflate level, superseded by a newer tick
    essential_dropped: int
    markers: int  # gap markers emitted on resume
    held: int  # ticks held back now (conflation)
    paused_by_stream: dict[str, int]
    level_changes: dict[str, int]  # times each level came into force
    auto_steps: dict[str, int]  # automatic steps, "down" and "up"


_UNLIMITED: Final = 0.0


class _Stream:
    """What the gate does with one stream, and that stream's conflation and bucket state."""

    __slots__ = (
        "burst", "conflate", "drop_state", "gap_first", "gap_last", "gap_ts_event", "gap_ts_recv", "held_conf",
        "held_limit", "ident", "kline", "last", "limit_policy", "name", "next_emit", "paused", "rate", "tokens",
        "track_gap",
    )

    def __init__(self, ident: StreamIdent) -> None:
        self.ident = ident
        self.name = ":".join(ident)
        self.kline = ident[2].startswith("kline_")
        self.paused = False
        self.track_gap = False
        self.drop_state = False  # essential: drop book_ticker / unclosed klines
        self.conflate = False
        self.rate = _UNLIMITED
        self.burst = 0.0
        self.limit_policy = LimitPolicy.DROP
        self.tokens = 0.0
        self.last = -math.inf
        self.next_emit = -math.inf
        self.held_conf: Tick | None = None
        self.held_limit: Tick | None = None
        self.gap_first = -1
        self.gap_last = -1
        self.gap_ts_event = 0
        self.gap_ts_recv = 0


@dataclass(frozen=True, slots=True)
class _Decision:
    paused: bool
    drop_state: bool
    conflate: bool
    limit: Limit | None

    @property
    def passes(self) -> bool:
        return not (self.paused or self.drop_state or self.conflate or self.limit is not None)


class ControlGate:
    """Applies a :class:`ControlState` to batches of ticks (see the module doc).

    In the distributor loop, each round::

        now = clock()
        out = gate.tick_pending(now)      # held ticks now due, resume markers: older than the batch
        out += gate.filter(batch, now)    # (``filter`` returns ``batch`` itself when nothing is in force)

    and, while :attr:`active`, wait for the next batch at most :meth:`wait_bound` seconds.
    """

    def __init__(
        self,
        *,
        conflate_interval: float = DEFAULT_CONFLATE_INTERVAL,
        on_resume: OnResume | str = OnResume.MARK,
        auto: AutoDegradeConfig | None = None,
    ) -> None:
        if not (math.isfinite(conflate_interval) and conflate_interval > 0):
            raise ConfigError(f"conflate interval must be a positive number of seconds, got {conflate_interval!r}")
        self.conflate_interval = conflate_interval
        self.on_resume = on_resume if isinstance(on_resume, OnResume) else OnResume.parse(on_resume)
        self.auto = AutoDegrade(auto)
        self.state = ControlState()
        self.level = Level.NORMAL
        self.shed_active = False
        #: anything to do per tick or per round: a switch that filters, held ticks, something to release
        self.active = False
        self._pauses: tuple[Pattern, ...] = ()
        self._limits: tuple[tuple[Pattern, Limit], ...] = ()
        self._critical: tuple[Pattern, ...] = ()
        self._streams: dict[StreamIdent, _Stream | None] = {}
        self._holding: dict[_Stream, None] = {}
        self._release: list[Tick] = []
        self.paused_dropped = 0
        self.limited_dropped = 0
        self.limited_conflated = 0
        self.conflated = 0
        self.essential_dropped = 0
        self.markers = 0
        self.paused_by_stream: dict[str, int] = {}
        self.level_changes: dict[str, int] = {}
        self.auto_steps = {"down": 0, "up": 0}

    # -- switches -------------------------------------------------------------------------------------------

    def apply(self, state: ControlState) -> bool:
        """Put ``state`` in force; False (and nothing done) when it is the one in force already."""
        if state == self.state:
            return False
        if state.auto.enabled != self.state.auto.enabled:
            self.auto.reset()
        self.state = state
        self._pauses = tuple(Pattern(p.pattern) for p in state.pauses)
        self._limits = tuple((Pattern(x.pattern), x) for x in state.limits)
        self._critical = tuple(Pattern(p) for p in state.critical.patterns)
        self._reconfigure()
        return True

    def sample_auto(self, fill_ratio: float, p99_us: float, now: float) -> AutoStep | None:
        """Feed automatic degradation one sample (once a second); the step it took, if any, is in force
        when this returns.  Nothing happens while it is switched off."""
        if not self.state.auto.enabled:
            return None
        step = self.auto.sample(fill_ratio, p99_us, now)
        if step is not None:
            self.auto_steps[step.direction] += 1
            self._reconfigure()
        return step

    def _effective_level(self) -> Level:
        level = self.state.degrade.level
        if self.state.auto.enabled and self.auto.level.rank > level.rank:
            return self.auto.level
        return level

    def _reconfigure(self) -> None:
        """Invalidate every cached decision; settle what each stream held under the old ones."""
        level = self._effective_level()
        if level is not self.level:
            self.level_changes[level.value] = self.level_changes.get(level.value, 0) + 1
            self.level = level
        self.shed_active = level.rank >= Level.SHED.rank
        old = self._streams
        self._streams = {}
        holding: dict[_Stream, None] = {}
        for ident, st in old.items():
            if st is None:
                continue
            d = self._decide(ident)
            if st.held_limit is not None and (d.limit is None or d.limit.policy is not LimitPolicy.CONFLATE):
                self._release.append(st.held_limit)
                st.held_limit = None
            if st.held_conf is not None and not d.conflate:
                self._release.append(st.held_conf)
                st.held_conf = None
            if st.gap_first >= 0 and not d.paused:
                self._emit_marker(st)
            if d.passes and st.held_limit is None and st.held_conf is None:
                continue  # back to the fast case: decided afresh on its next tick
            self._configure(st, d)
            self._streams[ident] = st
            if st.held_limit is not None or st.held_conf is not None:
                holding[st] = None
        self._holding = holding
        self._update_active()

    def _update_active(self) -> None:
        self.active = bool(
            self._pauses or self._limits or self.level.rank >= Level.CONFLATE.rank or self._holding or self._release
        )

    def _decide(self, ident: StreamIdent) -> _Decision:
        name = ":".join(ident)
        paused = any(p.matches(name) for p in self._pauses)
        limit: Limit | None = None
        for pattern, lim in self._limits:
            if pattern.matches(name) and (limit is None or lim.rate < limit.rate):
                limit = lim
        channel = ident[2]
        state_channel = channel == "book_ticker" or channel.startswith("kline_")
        rank = self.level.rank
        conflate = state_channel and rank >= Level.CONFLATE.rank
        drop_state = (
            state_channel and self.level is Level.ESSENTIAL and not any(p.matches(name) for p in self._critical)
        )
        return _Decision(paused, drop_state, conflate, limit)

    def _configure(self, st: _Stream, d: _Decision) -> None:
        st.paused = d.paused
        st.track_gap = d.paused and self.on_resume is OnResume.MARK and st.ident[2] in _TRADE_CHANNELS
        st.drop_state = d.drop_state
        st.conflate = d.conflate
        if d.limit is None:
            st.rate = _UNLIMITED
        else:
            depth = d.limit.depth
            if (st.rate, st.burst) != (d.limit.rate, depth):
                st.tokens = depth  # a new bucket starts full
                st.last = -math.inf
            st.rate, st.burst, st.limit_policy = d.limit.rate, depth, d.limit.policy

    def _classify(self, ident: StreamIdent) -> _Stream | None:
        d = self._decide(ident)
        if d.passes:
            self._streams[ident] = None
            return None
        st = _Stream(ident)
        self._configure(st, d)
        self._streams[ident] = st
        return st

    # -- the data path --------------------------------------------------------------------------------------

    def filter(self, batch: Sequence[Tick], now: float) -> Sequence[Tick]:
        """What of ``batch`` goes on now, in order; ``batch`` itself when no switch is in force."""
        if not self.active:
            return batch
        out = self._take_release()
        streams = self._streams
        append = out.append
        for tick in batch:
            ident = _stream_key(tick)
            try:
                st = streams[ident]
            except KeyError:
                st = self._classify(ident)
            if st is None:
                append(tick)
            else:
                self._handle(st, tick, now, out)
        return out

    def _take_release(self) -> list[Tick]:
        if not self._release:
            return []
        out = self._release
        self._release = []
        if not self._holding:
            self._update_active()
        return out

    def _handle(self, st: _Stream, tick: Tick, now: float, out: list[Tick]) -> None:
        if st.paused:
            self.paused_dropped += 1
            self.paused_by_stream[st.name] = self.paused_by_stream.get(st.name, 0) + 1
            if st.track_gap:
                seq = tick["seq"]
                first: int = tick.get("gap_first", seq)  # type: ignore[assignment]
                if st.gap_first < 0:
                    st.gap_first = first
                st.gap_last = seq
                st.gap_ts_event = tick["ts_event"]
                st.gap_ts_recv = tick["ts_recv"]
            return
        if "gap_first" in tick:  # a marker: never held back; it supersedes what is held for its stream
            self._drop_held(st)
            out.append(tick)
            return
        if st.drop_state and not (st.kline and tick.get("closed") is True):
            self.essential_dropped += 1
            return
        if st.conflate:
            if st.kline and tick.get("closed") is True:
                if st.held_conf is not None:
                    st.held_conf = None
                    self.conflated += 1
                self._limit(st, tick, now, out)
                return
            if st.held_conf is None and now >= st.next_emit:
                st.next_emit = now + self.conflate_interval
                self._limit(st, tick, now, out)
                return
            if st.held_conf is not None:
                self.conflated += 1
            st.held_conf = tick
            self._holding[st] = None
            return
        self._limit(st, tick, now, out)

    def _limit(self, st: _Stream, tick: Tick, now: float, out: list[Tick]) -> None:
        if st.rate == _UNLIMITED:
            out.append(tick)
            return
        if now > st.last:
            st.tokens = min(st.burst, st.tokens + (now - st.last) * st.rate)
            st.last = now
        if st.tokens >= 1.0:
            st.tokens -= 1.0
            if st.held_limit is not None:
                st.held_limit = None
                self.limited_conflated += 1
            out.append(tick)
            return
        if st.limit_policy is LimitPolicy.DROP:
            self.limited_dropped += 1
            return
        if st.held_limit is not None:
            self.limited_conflated += 1
        st.held_limit = tick
        self._holding[st] = None

    def _drop_held(self, st: _Stream) -> None:
        if st.held_limit is not None:
            st.held_limit = None
            self.limited_conflated += 1
        if st.held_conf is not None:
            st.held_conf = None
            self.conflated += 1

    def _emit_marker(self, st: _Stream) -> None:
        venue, symbol, channel = st.ident
        self._release.append(
            make_gap_marker(
                venue, symbol, channel, st.gap_first, st.gap_last, st.gap_ts_event, st.gap_ts_recv, PAUSE_REASON
            )
        )
        self.markers += 1
        st.gap_first = st.gap_last = -1

    def tick_pending(self, now: float) -> list[Tick]:
        """Held ticks now due and resume markers, to go out before the next batch (call it each round)."""
        out = self._take_release()
        if not self._holding:
            return out
        for st in list(self._holding):
            if st.held_conf is not None and now >= st.next_emit:
                tick = st.held_conf
                st.held_conf = None
                st.next_emit = now + self.conflate_interval
                self._limit(st, tick, now, out)
            if st.held_limit is not None:
                if now > st.last:
                    st.tokens = min(st.burst, st.tokens + (now - st.last) * st.rate)
                    st.last = now
                if st.tokens >= 1.0:
                    st.tokens -= 1.0
                    out.append(st.held_limit)
                    st.held_limit = None
            if st.held_conf is None and st.held_limit is None:
                del self._holding[st]
        if not self._holding:
            self._update_active()
        return out

    def next_due(self) -> float | None:
        """When the earliest held tick may go out (on the ``now`` clock); None when nothing is held."""
        if self._release:
            return -math.inf
        due: float | None = None
        for st in self._holding:
            if st.held_conf is not None:
                t = st.next_emit
                if due is None or t < due:
                    due = t
            if st.held_limit is not None:
                t = st.last + max(0.0, 1.0 - st.tokens) / st.rate
                if due is None or t < due:
                    due = t
        return due

    def wait_bound(self, now: float) -> float | None:
        """How long the distributor may wait for a batch before calling :meth:`tick_pending` again:
        None (as long as it likes) when the gate is idle, else at most one conflate interval."""
        if not self.active:
            return None
        due = self.next_due()
        bound = self.conflate_interval if due is None else min(due - now, self.conflate_interval)
        return max(0.0, bound)

    def drain(self) -> list[Tick]:
        """Everything held back, regardless of limits (at shutdown)."""
        out = self._take_release()
        for st in self._holding:
            if st.held_limit is not None:
                out.append(st.held_limit)
                st.held_limit = None
            if st.held_conf is not None:
                out.append(st.held_conf)
                st.held_conf = None
        self._holding = {}
        self._update_active()
        return out

    # -- reading --------------------------------------------------------------------------------------------

    @property
    def held(self) -> int:
        return sum((st.held_conf is not None) + (st.held_limit is not None) for st in list(self._holding))

    def stats(self) -> GateStats:
        s = self.state
        return GateStats(
            version=s.version, level=self.level, operator_level=s.degrade.level, auto_level=self.auto.level,
            auto_enabled=s.auto.enabled, shed_active=self.shed_active, switches=s.switches, pauses=len(s.pauses),
            limits=len(s.limits), paused_dropped=self.paused_dropped, limited_dropped=self.limited_dropped,
            limited_conflated=self.limited_conflated, conflated=self.conflated,
            essential_dropped=self.essential_dropped, markers=self.markers, held=self.held,
            paused_by_stream=dict(self.paused_by_stream), level_changes=dict(self.level_changes),
            auto_steps=dict(self.auto_steps),
        )
