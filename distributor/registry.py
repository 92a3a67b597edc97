"""Which venue streams to hold subscriptions for: a pure bookkeeping object, no I/O.

Subscribers ask for patterns (``venue:SYMBOL:channel`` with globs): a literal pattern asks
for its one stream; a glob asks for the streams it matches among the *known* ones (those
configured, or listed by the venue).  Streams configured to *persist* are always wanted.

The owner (the ingestor) calls :meth:`ChannelRegistry.tick` now and then with a monotonic
clock value and applies the :class:`Changes` it returns at the venue:

- ``subscribe``: wanted and not active: at once, including a stream that was released and is
  asked for again;
- ``unsubscribe``: active and wanted by nobody for at least ``grace`` seconds (counted from the
  first ``tick`` that saw it unwanted), so a subscriber that comes straight back costs nothing;
  the owner frees the stream's per-stream state with it.

The registry assumes what it returned was done; :meth:`ChannelRegistry.failed` says otherwise,
and the next ``tick`` asks again for what is still wanted.  Time is only ever passed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern, StreamName

__all__ = ["Changes", "ChannelRegistry", "parse_stream"]


@dataclass(frozen=True, slots=True)
class Changes:
    """What to do at the venue, each list sorted (venue, symbol, channel)."""

    subscribe: tuple[StreamName, ...] = ()
    unsubscribe: tuple[StreamName, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe)


def parse_stream(stream: StreamName | str) -> StreamName:
    """``"binance:btcusdt:trade"`` -> ``StreamName("binance", "BTCUSDT", "trade")``; globs refused."""
    if isinstance(stream, StreamName):
        return stream
    pattern = Pattern(stream)
    if not pattern.is_literal:
        raise ConfigError(f"a stream is venue:SYMBOL:channel without globs, got {stream!r}")
    venue, symbol, channel = pattern.text.split(":")
    return StreamName(venue, symbol, channel)


def _patterns(patterns: str | Pattern | Iterable[str | Pattern]) -> list[Pattern]:
    if isinstance(patterns, str | Pattern):
        patterns = (patterns,)
    return [p if isinstance(p, Pattern) else Pattern(p) for p in patterns]


def _sorted(streams: Iterable[StreamName]) -> tuple[StreamName, ...]:
    return tuple(sorted(streams, key=lambda s: (s.venue, s.symbol, s.channel)))


class ChannelRegistry:
    """Wanted, active and to-be-released venue streams; see the module doc."""

    def __init__(
        self,
        *,
        known: Iterable[StreamName | str] = (),
        persist: Iterable[StreamName | str] = (),
        grace: float = 30.0,
    ) -> None:
        if grace < 0:
            raise ConfigError(f"grace must be >= 0 seconds, got {grace}")
        self.grace = grace
        self._persist = frozenset(parse_stream(s) for s in persist)
        self._known = {parse_stream(s) for s in known} | self._persist
        self._refs: Counter[Pattern] = Counter()
        self._active: set[StreamName] = set()
        self._unwanted_since: dict[StreamName, float] = {}
        self._wanted: frozenset[StreamName] | None = None  # cache, None when stale
        self._suppressed: tuple[Pattern, ...] = ()

    # -- inputs ---------------------------------------------------------------------------------------------

    def want(self, patterns: str | Pattern | Iterable[str | Pattern]) -> None:
        """A subscriber asks for ``patterns`` (counted: two asks need two releases)."""
        for p in _patterns(patterns):
            self._refs[p] += 1
        self._wanted = None

    def release(self, patterns: str | Pattern | Iterable[str | Pattern]) -> None:
        """A subscriber no longer asks for ``patterns``; releasing what was not asked for is a ConfigError."""
        parsed = _patterns(patterns)
        need = Counter(parsed)
        for p, n in need.items():
            if self._refs[p] < n:
                raise ConfigError(f"release of pattern {p.text!r} that is not wanted")
        for p in parsed:
            self._refs[p] -= 1
            if not self._refs[p]:
                del self._refs[p]
        self._wanted = None

    def add_known(self, streams: Iterable[StreamName | str]) -> None:
        """Streams a glob may match (the configured ones, or what the venue lists)."""
        self._known.update(parse_stream(s) for s in streams)
        self._wanted = None

    def remove_known(self, streams: Iterable[StreamName | str]) -> None:
        """Streams gone from the venue; a persisting stream stays known."""
        self._known.difference_update(parse_stream(s) for s in streams)
        self._known |= self._persist
        self._wanted = None

    def suppress(self, patterns: Iterable[str | Pattern]) -> None:
        """Streams matching these are not held, whoever wants them (paused with ``--unsubscribe``);
        an empty list lifts every suppression.  Released after the grace period, like any unwanted stream."""
        parsed = tuple(p if isinstance(p, Pattern) else Pattern(p) for p in patterns)
        if parsed != self._suppressed:
            self._suppressed = parsed
            self._wanted = None

    def failed(self, streams: Iterable[StreamName | str]) -> None:
        """The venue did not (or no longer does) carry these: not active; asked again if still wanted."""
        for s in streams:
            name = parse_stream(s)
            self._active.discard(name)
            self._unwanted_since.pop(name, None)

    # -- the decision ---------------------------------------------------------------------------------------

    def tick(self, now: float) -> Changes:
        """What to subscribe and unsubscribe at the venue now; marks it done."""
        wanted = self.wanted()
        subscribe = wanted - self._active
        unsubscribe: list[StreamName] = []
        for name in self._active - wanted:
            since = self._unwanted_since.setdefault(name, now)
            if now - since >= self.grace:
                unsubscribe.append(name)
        for name in [n for n in self._unwanted_since if n in wanted or n not in self._active]:
            del self._unwanted_since[name]
        for name in unsubscribe:
            self._active.discard(name)
            del self._unwanted_since[name]
        self._active |= subscribe
        return Changes(subscribe=_sorted(subscribe), unsubscribe=_sorted(unsubscribe))

    # -- views ----------------------------------------------------------------------------------------------

    def wanted(self) -> frozenset[StreamName]:
        """Streams asked for now: persisting ones, literal patterns, and known streams a glob matches."""
        if self._wanted is None:
            out = set(self._persist)
            globs: list[Pattern] = []
            for p in self._refs:
                if p.is_literal:
                    out.add(parse_stream(p.text))
                else:
                    globs.append(p)
            if globs:
                for name in self._known:
                    text = str(name)
                    if any(g.matches(text) for g in globs):
                        out.add(name)
            if self._suppressed:
                out = {n for n in out if not any(p.matches(str(n)) for p in self._suppressed)}
            self._wanted = frozenset(out)
        return self._wanted

    def active(self) -> frozenset[StreamName]:
        """Streams held at the venue, as far as the registry knows."""
        return frozenset(self._active)

    def releasing(self) -> dict[StreamName, float]:
        """Active streams nobody wants, with the clock value when that was first seen."""
        return dict(self._unwanted_since)

    def patterns(self) -> dict[str, int]:
        """Patterns asked for and how many times."""
        return {p.text: n for p, n in self._refs.items()}

    def known(self) -> frozenset[StreamName]:
        return frozenset(self._known)
