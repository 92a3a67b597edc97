"""The switch model: degrade levels, limit policies, switch targets and :class:`ControlState`.  No I/O.

A :class:`ControlState` is immutable; each change (``with_pause``, ``with_limit``, ...) returns a new
state, or the state itself when it changes nothing, so a repeated command is a no-op.  Its stored form
is in :mod:`distributor.control.codec`; the gate that applies it, in :mod:`distributor.control.gate`.

Cost: a change is O(switches) (the pauses and limits stay sorted by pattern); :func:`parse_target`
is one ``fnmatch`` per known channel at most.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern
from consumer_sdk.core.tick import FIXED_CHANNELS, KLINE_INTERVALS

__all__ = [
    "LEVELS",
    "Auto",
    "ControlState",
    "Critical",
    "Degrade",
    "Level",
    "Limit",
    "LimitPolicy",
    "OnResume",
    "Pause",
    "checked_burst",
    "checked_rate",
    "parse_target",
]

_ALL_CHANNELS: Final = (*FIXED_CHANNELS, *(f"kline_{i}" for i in sorted(KLINE_INTERVALS)))


# ---------------------------------------------------------------------------------------------- enums


class Level(StrEnum):
    """Degrade levels, from none to the most degraded; each includes the ones before it."""

    NORMAL = "normal"
    SHED = "shed"
    CONFLATE = "conflate"
    ESSENTIAL = "essential"

    @property
    def rank(self) -> int:
        return LEVELS.index(self)

    @classmethod
    def parse(cls, text: object) -> Level:
        if isinstance(text, str):
            try:
                return cls(text.strip().lower())
            except ValueError:
                pass
        raise ConfigError(f"unknown degrade level {text!r}: expected one of {', '.join(x.value for x in cls)}")


#: every level, from none to the most degraded (``LEVELS[level.rank] is level``)
LEVELS: Final = tuple(Level)


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
            "(trade, agg_trade, book_ticker, depth, kline_<interval>)"
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
        rate = checked_rate(rate, "rate")
        if burst is not None:
            burst = checked_burst(burst, "burst")
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


def checked_rate(value: object, where: str) -> float:
    """``value`` as a rate in ticks a second: a positive, finite int or float (a bool is refused);
    a :class:`ConfigError` starting with ``where`` otherwise."""
    if type(value) not in (int, float):
        raise ConfigError(f"{where} must be a number of ticks per second, got {value!r}")
    rate = float(value)  # type: ignore[arg-type]
    if not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"{where} must be a positive, finite number of ticks per second, got {value!r}")
    return rate


def checked_burst(value: object, where: str) -> float:
    """``value`` as a bucket depth in ticks: a finite int or float, at least 1 (a bool is refused);
    a :class:`ConfigError` starting with ``where`` otherwise."""
    if type(value) not in (int, float):
        raise ConfigError(f"{where} must be a number of ticks, got {value!r}")
    burst = float(value)  # type: ignore[arg-type]
    if not math.isfinite(burst) or burst < 1:
        raise ConfigError(f"{where} must be a finite number of ticks, at least 1, got {value!r}")
    return burst
