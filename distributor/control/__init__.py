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
  essential  as ``conflate``, and ``book_ticker``, unclosed kline updates and order books of
             streams matching none of the *critical* patterns are dropped
  ========== ===================================================================================

  Trades, aggregate trades and closed klines are never conflated or dropped by a degrade level,
  whichever it is: they are events, not states, and a level may be chosen by :class:`AutoDegrade`
  without anyone looking.  Only an operator's explicit ``pause`` or ``limit`` removes them.
- **critical** patterns: the streams ``essential`` keeps whole.
- **order books** (channel ``depth``): never thinned, only cut and then healed.  A pause drops every entry
  of the book (no gap marker, ever); ``essential`` drops those of non-critical books; a limit and the
  ``conflate`` level do not apply to books.  When a book's entries pass again after some were dropped (by a
  pause, ``essential``, or the ingress queue's drop policy), its diffs are dropped until a
  ``resync:<why>`` snapshot (``paused``, ``degraded``, ``dropped``) that the gate asks the book's keeper
  for, so a stored book stream never holds a break (:mod:`~distributor.control.gate` has the details).
- **auto**: :class:`AutoDegrade` may raise the level in force above the one set by hand, from the
  ingress fill ratio and the end-to-end p99 latency, and lowers it again with hysteresis.

The package, each module importing only those listed before it:

- :mod:`~distributor.control.state`: levels, policies, switch targets and the immutable
  :class:`ControlState` with its changes;
- :mod:`~distributor.control.codec`: the stored JSON form and its strict parser;
- :mod:`~distributor.control.degrade`: what each level does to a stream (plain functions) and
  :class:`AutoDegrade`;
- :mod:`~distributor.control.gate`: :class:`ControlGate`, which applies a state to batches of ticks
  (its costs, ordering and ownership are stated there).
"""

from distributor.control.codec import MAX_WHO, SCHEMA, dump_state, parse_state, state_to_dict
from distributor.control.degrade import AutoDegrade, AutoDegradeConfig, AutoStep, WindowPercentile
from distributor.control.gate import BOOK_BREAK_REASONS, BookBreakHook, ControlGate, GateStats
from distributor.control.state import (
    Auto,
    ControlState,
    Critical,
    Degrade,
    Level,
    Limit,
    LimitPolicy,
    OnResume,
    Pause,
    parse_target,
)

__all__ = [
    "BOOK_BREAK_REASONS",
    "MAX_WHO",
    "SCHEMA",
    "Auto",
    "AutoDegrade",
    "AutoDegradeConfig",
    "AutoStep",
    "BookBreakHook",
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
