"""Degradation: what each level does to a stream, and :class:`AutoDegrade`, which picks a level from
the pressure it is fed.  No I/O, no clock: time is passed in.

The rules, each level including the ones before it (the gate applies them, see
:mod:`distributor.control`):

========== =========================================================================================
normal     nothing
shed       nothing is filtered (:func:`sheds`: the hot path treats slow subscribers as ``drop_oldest``)
conflate   ``book_ticker`` and unclosed kline updates: the latest tick per stream per interval
essential  as ``conflate``, and those of streams matching no *critical* pattern are dropped, order books
           (``depth``) of such streams too
========== =========================================================================================

Order books are never conflated (see :mod:`distributor.control.gate` for what a dropped book gets).

Trades, aggregate trades and closed klines are never conflated or dropped by a level: they are events,
not states, and a level may be chosen by :class:`AutoDegrade` without anyone looking.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern
from consumer_sdk.core.latency import LatencyHistogram
from distributor.control.state import LEVELS, Level

__all__ = [
    "AutoDegrade",
    "AutoDegradeConfig",
    "AutoStep",
    "WindowPercentile",
    "effective_level",
    "filters",
    "sheds",
    "stream_rule",
]


# ---------------------------------------------------------------------------------------------- the rules


def effective_level(operator: Level, auto_enabled: bool, auto_level: Level) -> Level:
    """The level in force: the operator's, or automatic degradation's when it is on and more degraded."""
    if auto_enabled and auto_level.rank > operator.rank:
        return auto_level
    return operator


def sheds(level: Level) -> bool:
    """Whether slow subscribers are treated as ``drop_oldest`` at ``level`` (``shed`` and above)."""
    return level.rank >= Level.SHED.rank


def filters(level: Level) -> bool:
    """Whether ``level`` itself holds back or drops ticks (``conflate`` and above)."""
    return level.rank >= Level.CONFLATE.rank


def stream_rule(level: Level, channel: str, name: str, critical: Iterable[Pattern]) -> tuple[bool, bool]:
    """What ``level`` does to the stream ``name`` of ``channel``: ``(conflate, drop)``.

    Only state channels (``book_ticker``, ``kline_*``) are touched: conflated from ``conflate`` on, dropped
    at ``essential`` unless a ``critical`` pattern matches ``name``.  An order book (``depth``) is never
    conflated (a diff means something only after the one before it), only dropped at ``essential`` like a
    state channel; the gate then resyncs it when it passes again.  A closed kline is an event: the gate
    lets it through tick by tick whatever this says.  Cost: O(1), plus one match per critical pattern for
    a state channel at ``essential``.
    """
    book = channel == "depth"
    state_channel = channel == "book_ticker" or channel.startswith("kline_")
    conflate = state_channel and level.rank >= Level.CONFLATE.rank
    drop = (state_channel or book) and level is Level.ESSENTIAL and not any(p.matches(name) for p in critical)
    return conflate, drop


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
        self.level = LEVELS[before.rank + delta]
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
