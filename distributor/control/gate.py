"""The gate the distributor applies to every batch: pauses, limits and the degrade level in force.  No I/O.

What each switch does is in :mod:`distributor.control`; what each level does to a stream is decided by
:func:`~distributor.control.degrade.stream_rule`, and the level in force by
:func:`~distributor.control.degrade.effective_level`.

Cost: with no switch in force :meth:`ControlGate.filter` is one attribute check per batch and
returns the batch itself.  Otherwise each tick costs one dict lookup keyed by
``(venue, symbol, channel)``; what to do with a stream is decided on its first tick and cached
until the next :meth:`ControlGate.apply`.  Gap markers (repair's and the gate's) are never limited
or conflated: a newer marker supersedes a tick held back for its stream.

Ordering: per stream, the gate emits ticks in the order it got them (held ticks are only ever
replaced by newer ones of their stream), so ``seq`` keeps increasing.

Order books (channel ``depth``, entries in the format of :mod:`consumer_sdk.book_stream`): a diff only means
something after the one before it, so a book stream is never thinned, only cut, and a cut is always healed by a
snapshot before the next diff is stored:

- **pause**: no entry of the book while paused (counted in ``paused_dropped``); no gap marker, whatever
  ``on_resume`` says (a marker is no book entry).  On resume, if anything was dropped, the book is *broken*
  (below) with the reason ``paused``.
- **limit** and the ``conflate`` level: do not apply to a book stream; its entries pass whole (a diff
  dropped or superseded would cost a whole snapshot to heal, more than it saves).
- ``essential``: a book stream matching no *critical* pattern is dropped like a paused one; when the level
  falls (or the stream becomes critical) it is broken with the reason ``degraded``.  ``shed``/``conflate``:
  nothing.
- **dropped upstream**: :meth:`ControlGate.dropped` is told of every entry the ingress queue dropped; a book
  entry breaks its book at once with the reason ``dropped``.

A broken book: every diff of it is dropped (counted in ``book_dropped``) until a snapshot entry of it newer
than every entry of it dropped comes, which passes and mends it (an older one passes too, a whole book being
always a valid point, and a newer one is asked for).  Once its entries may pass again, the gate calls
``on_book_break(venue, symbol, why)`` (given at construction) once per break: the book's keeper makes its
next diff a ``resync:<why>`` snapshot (the ingestor keeps the live book in step whatever was stored, so no
REST fetch is needed); a snapshot asked for and then lost (paused, dropped) is asked for again.  Without a
keeper the next ``periodic`` snapshot mends it.  Either way a stored book stream never holds a diff that
does not follow, nor a gap marker.  The cost is on book streams only: a stream of another channel is
classified as before, and no tick of one allocates anything more.

One task owns a gate (the distributor's); every method is synchronous and none awaits, so calls
from other tasks of the same event loop (the control-plane watcher, the auto-degrade sampler) are
safe without locks.  The metrics exporter thread only reads :meth:`ControlGate.stats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Final

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern
from consumer_sdk.core.tick import Tick, make_gap_marker
from distributor.control.degrade import (
    AutoDegrade,
    AutoDegradeConfig,
    AutoStep,
    effective_level,
    filters,
    sheds,
    stream_rule,
)
from distributor.control.state import ControlState, Level, Limit, LimitPolicy, OnResume

__all__ = [
    "BOOK_BREAK_REASONS", "BOOK_CHANNEL", "DEFAULT_CONFLATE_INTERVAL", "PAUSE_REASON", "BookBreakHook", "ControlGate",
    "GateStats",
]

DEFAULT_CONFLATE_INTERVAL: Final = 0.1
#: the reason of the gap marker a resumed trade/agg_trade stream gets
PAUSE_REASON: Final = "paused"

_TRADE_CHANNELS: Final = frozenset({"trade", "agg_trade"})
#: the order-book channel (:mod:`consumer_sdk.book_stream`)
BOOK_CHANNEL: Final = "depth"
#: the reasons a book stream breaks here, as its ``resync:<why>`` snapshot names them
BOOK_BREAK_REASONS: Final = ("paused", "degraded", "dropped")
#: ``(venue, symbol, why)``: ask the book's keeper for a ``resync:<why>`` snapshot at its next diff
BookBreakHook = Callable[[str, str, str], None]
_stream_key: Final = itemgetter("venue", "symbol", "channel")
StreamIdent = tuple[str, str, str]


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
    book_dropped: int = 0  # diffs of broken books, dropped until their snapshot
    book_breaks: dict[str, int] = field(default_factory=dict)  # snapshots asked of book keepers, by why
    books_broken: int = 0  # book streams broken now


_UNLIMITED: Final = 0.0


class _Stream:
    """What the gate does with one stream, and that stream's conflation and bucket state."""

    __slots__ = (
        "book", "book_asked", "book_break", "book_lost", "burst", "conflate", "drop_state", "gap_first", "gap_last",
        "gap_ts_event", "gap_ts_recv", "held_conf", "held_limit", "ident", "kline", "last", "limit_policy", "name",
        "next_emit", "paused", "rate", "tokens", "track_gap",
    )

    def __init__(self, ident: StreamIdent) -> None:
        self.ident = ident
        self.name = ":".join(ident)
        self.kline = ident[2].startswith("kline_")
        self.book = ident[2] == BOOK_CHANNEL
        #: why the book stream is broken (entries of it were not stored), None while it is whole
        self.book_break: str | None = None
        #: whether its keeper was asked for a snapshot since it broke
        self.book_asked = False
        #: the highest ``seq`` of its entries dropped (seqs only grow): only a snapshot above it mends the book
        self.book_lost = 0
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
        on_book_break: BookBreakHook | None = None,
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
        #: asked for a ``resync:<why>`` snapshot when a book stream breaks (see the module doc)
        self.on_book_break = on_book_break
        self._broken: set[StreamIdent] = set()
        self.book_dropped = 0
        self.book_breaks: dict[str, int] = {}

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

    def _reconfigure(self) -> None:
        """Invalidate every cached decision; settle what each stream held under the old ones."""
        level = effective_level(self.state.degrade.level, self.state.auto.enabled, self.auto.level)
        if level is not self.level:
            self.level_changes[level.value] = self.level_changes.get(level.value, 0) + 1
            self.level = level
        self.shed_active = sheds(level)
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
            if d.passes and st.held_limit is None and st.held_conf is None and st.book_break is None:
                continue  # back to the fast case: decided afresh on its next tick
            self._configure(st, d)
            self._streams[ident] = st
            if st.book_break is not None:
                self._ask(st)  # the pause (or level) that broke it may be over
            if st.held_limit is not None or st.held_conf is not None:
                holding[st] = None
        self._holding = holding
        self._update_active()

    def _update_active(self) -> None:
        self.active = bool(
            self._pauses or self._limits or filters(self.level) or self._holding or self._release or self._broken
        )

    def _decide(self, ident: StreamIdent) -> _Decision:
        name = ":".join(ident)
        paused = any(p.matches(name) for p in self._pauses)
        limit: Limit | None = None
        if ident[2] != BOOK_CHANNEL:  # a book stream is never limited (see the module doc)
            for pattern, lim in self._limits:
                if pattern.matches(name) and (limit is None or lim.rate < limit.rate):
                    limit = lim
        conflate, drop_state = stream_rule(self.level, ident[2], name, self._critical)
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
        if st.book:
            self._book_entry(st, tick, out)
            return
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

    def _book_entry(self, st: _Stream, tick: Tick, out: list[Tick]) -> None:
        """One entry of a book stream: dropped while paused or degraded (the book breaks), dropped while the
        book is broken unless it is a snapshot (which mends it), else passed."""
        if st.paused or st.drop_state:
            if st.paused:
                self.paused_dropped += 1
                self.paused_by_stream[st.name] = self.paused_by_stream.get(st.name, 0) + 1
            else:
                self.essential_dropped += 1
            st.book_break = "paused" if st.paused else "degraded"
            st.book_asked = False  # a snapshot asked for before may be among what is dropped
            st.book_lost = max(st.book_lost, tick["seq"])
            self._broken.add(st.ident)
            return
        if st.book_break is not None:
            if tick.get("kind") != "snapshot":
                self.book_dropped += 1
                self._ask(st)
                return
            if tick["seq"] > st.book_lost:
                st.book_break = None  # the next break sets what else it needs (a ``seq`` lost is below the next)
                self._broken.discard(st.ident)
                if not self._broken:
                    self._update_active()
            else:
                # made before an entry that was lost (the queue dropped a newer diff): it passes, a whole book
                # is always a valid point, but the book stays broken until a newer one, asked for now
                st.book_asked = False
                self._ask(st)
        out.append(tick)

    def _ask(self, st: _Stream) -> None:
        """Ask the keeper of the broken book ``st`` for a snapshot, once per break, when its entries pass again."""
        why = st.book_break
        if why is None or st.book_asked or st.paused or st.drop_state:
            return
        st.book_asked = True
        self.book_breaks[why] = self.book_breaks.get(why, 0) + 1
        if self.on_book_break is not None:
            venue, symbol, _ = st.ident
            self.on_book_break(venue, symbol, why)

    def dropped(self, tick: Tick) -> None:
        """``tick`` was dropped before it reached the gate (by the ingress queue's policy): a book entry breaks
        its book (``dropped``, see the module doc); any other tick is nothing to the gate.  Cost: one lookup."""
        if tick["channel"] != BOOK_CHANNEL:
            return
        ident = _stream_key(tick)
        st = self._streams.get(ident)
        if st is None:
            st = _Stream(ident)
            self._configure(st, self._decide(ident))
            self._streams[ident] = st
        st.book_lost = max(st.book_lost, tick["seq"])
        if not (st.paused or st.drop_state):
            if st.book_break is None or tick.get("kind") == "snapshot":
                # a diff lost while a snapshot asked for is on its way needs no other ask: if that one was made
                # before the diff, it will not mend the book and a newer one is asked for then
                st.book_break = "dropped"
                st.book_asked = False
        else:  # asked on resume, whatever was asked before: the snapshot may be the entry lost
            st.book_break = "paused" if st.paused else "degraded"
            st.book_asked = False
        self._broken.add(ident)
        self.active = True
        self._ask(st)

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
            auto_steps=dict(self.auto_steps), book_dropped=self.book_dropped, book_breaks=dict(self.book_breaks),
            books_broken=len(self._broken),
        )
