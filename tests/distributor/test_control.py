"""distributor.control: the switch model (``state``), its strict parser (``codec``), the level rules and
automatic degradation (``degrade``) and the gate (``gate``); pure, no I/O.

Time is always passed in: ``now`` values below are simulated seconds, nothing sleeps.
"""

from __future__ import annotations

import ast
import math
from collections import deque
from pathlib import Path
from typing import Any

import pytest

import distributor.control as control
import distributor.control.codec as control_codec
import distributor.control.degrade as control_degrade
import distributor.control.gate as control_gate
import distributor.control.state as control_state
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import Tick, is_gap_marker, make_gap_marker
from distributor.control import (
    AutoDegrade,
    AutoDegradeConfig,
    ControlGate,
    ControlState,
    Level,
    LimitPolicy,
    OnResume,
    WindowPercentile,
    dump_state,
    parse_state,
    parse_target,
)
from distributor.control.degrade import effective_level, filters, sheds, stream_rule

T0 = 1000.0


def tick(symbol: str, channel: str, seq: int, *, venue: str = "binance", **extra: Any) -> Tick:
    t: dict[str, Any] = {
        "v": 1, "venue": venue, "symbol": symbol, "channel": channel, "seq": seq,
        "ts_event": 1_700_000_000_000_000 + seq, "ts_recv": 1_700_000_000_000_100 + seq, **extra,
    }
    return t  # type: ignore[return-value]


def trade(symbol: str, seq: int) -> Tick:
    return tick(symbol, "trade", seq, trade_id=seq, price="1.0", qty="1", side="buy")


def agg(symbol: str, seq: int) -> Tick:
    return tick(symbol, "agg_trade", seq, trade_id=seq, price="1.0", qty="1", side="buy",
                first_trade_id=seq, last_trade_id=seq)


def book(symbol: str, seq: int) -> Tick:
    return tick(symbol, "book_ticker", seq, bid_px="1", bid_qty="1", ask_px="2", ask_qty="1", update_id=seq)


def kline(symbol: str, seq: int, closed: bool, interval: str = "1m") -> Tick:
    return tick(symbol, f"kline_{interval}", seq, open_time=0, close_time=1, open="1", high="1", low="1",
                close="1", volume="1", quote_volume="1", trades=1, closed=closed)


def seqs(ticks: list[Tick] | Any, channel: str | None = None, symbol: str | None = None) -> list[int]:
    return [t["seq"] for t in ticks
            if (channel is None or t["channel"] == channel) and (symbol is None or t["symbol"] == symbol)]


def gate_with(state: ControlState, **kwargs: Any) -> ControlGate:
    gate = ControlGate(**kwargs)
    gate.apply(state)
    return gate


def test_exports() -> None:
    assert sorted(control.__all__) == sorted([
        "BOOK_BREAK_REASONS", "MAX_WHO", "SCHEMA", "Auto", "AutoDegrade", "AutoDegradeConfig", "AutoStep",
        "BookBreakHook", "ControlGate", "ControlState",
        "Critical", "Degrade", "GateStats", "Level", "Limit", "LimitPolicy", "OnResume", "Pause", "WindowPercentile",
        "dump_state", "parse_state", "parse_target", "state_to_dict",
    ])
    for name in control.__all__:
        assert hasattr(control, name)
    assert sorted(control_state.__all__) == sorted([
        "LEVELS", "Auto", "ControlState", "Critical", "Degrade", "Level", "Limit", "LimitPolicy", "OnResume", "Pause",
        "checked_burst", "checked_rate", "parse_target",
    ])
    assert sorted(control_codec.__all__) == sorted(["MAX_WHO", "SCHEMA", "dump_state", "parse_state", "state_to_dict"])
    assert sorted(control_degrade.__all__) == sorted([
        "AutoDegrade", "AutoDegradeConfig", "AutoStep", "WindowPercentile", "effective_level", "filters", "sheds",
        "stream_rule",
    ])
    assert sorted(control_gate.__all__) == sorted([
        "BOOK_BREAK_REASONS", "BOOK_CHANNEL", "DEFAULT_CONFLATE_INTERVAL", "PAUSE_REASON", "BookBreakHook",
        "ControlGate", "GateStats",
    ])
    # the package re-exports each public name from the one module that defines it
    for name in control.__all__:
        homes = [m for m in (control_state, control_codec, control_degrade, control_gate) if name in m.__all__]
        assert len(homes) == 1 and getattr(control, name) is getattr(homes[0], name), name


def test_modules_import_only_the_ones_below_them() -> None:
    """No circle inside the package: state imports none of its siblings, codec and degrade only state, the gate
    state and degrade (the package's ``__init__`` re-exports them all)."""
    allowed = {"state": set(), "codec": {"state"}, "degrade": {"state"}, "gate": {"state", "degrade"}}
    root = Path(control.__file__).parent
    assert sorted(p.stem for p in root.glob("*.py")) == sorted(["__init__", *allowed])
    for name, below in allowed.items():
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        siblings = {m.removeprefix("distributor.control.") for m in modules if m.startswith("distributor.control")}
        assert siblings == below, name


# -- no switch in force ------------------------------------------------------------------------------------------


def test_idle_gate_returns_the_batch_itself() -> None:
    gate = ControlGate()
    batch = deque([trade("BTCUSDT", 1), book("BTCUSDT", 2)])
    assert gate.active is False
    assert gate.filter(batch, T0) is batch
    assert gate.tick_pending(T0) == []
    assert gate.wait_bound(T0) is None
    assert gate.stats().switches == 0


def test_shed_filters_nothing_and_is_exposed() -> None:
    gate = gate_with(ControlState().with_level("shed"))
    batch = [book("BTCUSDT", 1), book("BTCUSDT", 2)]
    assert gate.shed_active is True
    assert gate.active is False
    assert gate.filter(batch, T0) is batch
    gate.apply(ControlState())
    assert gate.shed_active is False


def test_apply_is_idempotent() -> None:
    state = ControlState().with_pause("binance:BTCUSDT:trade").bumped()
    gate = ControlGate()
    assert gate.apply(state) is True
    assert gate.apply(parse_state(dump_state(state))) is False
    gate.filter([trade("BTCUSDT", 1)], T0)
    assert gate.apply(state) is False
    assert gate.paused_dropped == 1
    assert gate.markers == 0


# -- pause ---------------------------------------------------------------------------------------------------------


def test_pause_drops_matching_streams_counted_per_stream() -> None:
    gate = gate_with(ControlState().with_pause("binance:*:book_ticker").with_pause("binance:ETHUSDT:trade"))
    batch = [trade("BTCUSDT", 1), book("BTCUSDT", 1), trade("ETHUSDT", 1), book("ETHUSDT", 1),
             trade("BTCUSDT", 2), book("ETHUSDT", 2), trade("ETHUSDT", 2), agg("ETHUSDT", 1)]
    out = list(gate.filter(batch, T0))
    assert [(t["symbol"], t["channel"], t["seq"]) for t in out] == [
        ("BTCUSDT", "trade", 1), ("BTCUSDT", "trade", 2), ("ETHUSDT", "agg_trade", 1)
    ]
    st = gate.stats()
    assert st.paused_dropped == 5
    assert st.paused_by_stream == {
        "binance:BTCUSDT:book_ticker": 1, "binance:ETHUSDT:book_ticker": 2, "binance:ETHUSDT:trade": 2
    }
    assert st.pauses == 2


def test_pause_pattern_symbol_is_case_insensitive_and_venue_lowered() -> None:
    gate = gate_with(ControlState().with_pause("Binance:btcusdt:trade"))
    assert gate.state.pauses[0].pattern == "binance:BTCUSDT:trade"
    assert list(gate.filter([trade("BTCUSDT", 1)], T0)) == []


def test_resume_marks_the_gap_of_a_trade_stream() -> None:
    paused = ControlState().with_pause("binance:BTCUSDT:*")
    gate = gate_with(paused)
    assert list(gate.filter([trade("BTCUSDT", 10), agg("BTCUSDT", 5), book("BTCUSDT", 7)], T0)) == []
    assert list(gate.filter([trade("BTCUSDT", 11), trade("BTCUSDT", 12)], T0 + 1)) == []
    gate.apply(paused.without_pause("binance:BTCUSDT:*"))
    assert gate.active is True  # markers waiting
    out = gate.tick_pending(T0 + 2) + list(gate.filter([trade("BTCUSDT", 13)], T0 + 2))
    markers = [t for t in out if is_gap_marker(t)]
    assert [(m["channel"], m["gap_first"], m["gap_last"], m["seq"], m["reason"]) for m in markers] == [  # type: ignore[typeddict-item]
        ("trade", 10, 12, 12, "paused"), ("agg_trade", 5, 5, 5, "paused")
    ]
    assert out[-1]["seq"] == 13 and not is_gap_marker(out[-1])
    # the marker carries the last dropped tick's times, so the stream's time order holds
    assert markers[0]["ts_event"] == trade("BTCUSDT", 12)["ts_event"]
    assert gate.stats().markers == 2
    assert gate.active is False


def test_resume_marker_goes_out_first_even_without_tick_pending() -> None:
    paused = ControlState().with_pause("binance:BTCUSDT:trade")
    gate = gate_with(paused)
    gate.filter([trade("BTCUSDT", 1), trade("BTCUSDT", 2)], T0)
    gate.apply(ControlState())
    out = list(gate.filter([trade("BTCUSDT", 3)], T0))
    assert seqs(out) == [2, 3] and is_gap_marker(out[0])


def test_resume_with_on_resume_none_leaves_a_plain_hole() -> None:
    gate = gate_with(ControlState().with_pause("binance:BTCUSDT:trade"), on_resume="none")
    gate.filter([trade("BTCUSDT", 1), trade("BTCUSDT", 2)], T0)
    gate.apply(ControlState())
    assert gate.tick_pending(T0) == []
    assert seqs(gate.filter([trade("BTCUSDT", 3)], T0)) == [3]
    assert gate.markers == 0


def test_paused_range_covers_a_repair_marker_it_dropped() -> None:
    gate = gate_with(ControlState().with_pause("binance:BTCUSDT:trade"))
    repair_marker = make_gap_marker("binance", "BTCUSDT", "trade", 3, 6, 1, 1, "unrecoverable")
    gate.filter([repair_marker, trade("BTCUSDT", 7)], T0)
    gate.apply(ControlState())
    (marker,) = gate.tick_pending(T0)
    assert (marker["gap_first"], marker["gap_last"]) == (3, 7)  # type: ignore[typeddict-item]


def test_repausing_before_the_marker_left_keeps_one_range() -> None:
    paused = ControlState().with_pause("binance:BTCUSDT:trade")
    gate = gate_with(paused)
    gate.filter([trade("BTCUSDT", 1)], T0)
    gate.apply(paused.with_pause("binance:ETHUSDT:trade"))  # another change, BTCUSDT still paused
    gate.filter([trade("BTCUSDT", 2)], T0)
    gate.apply(ControlState())
    (marker,) = gate.tick_pending(T0)
    assert (marker["gap_first"], marker["gap_last"]) == (1, 2)  # type: ignore[typeddict-item]


# -- limits --------------------------------------------------------------------------------------------------------


def test_token_bucket_rate_over_simulated_time() -> None:
    """8 ticks/s with a burst of 8 against 64 ticks/s for 10 s: the burst, then exactly 8 a second."""
    gate = gate_with(ControlState().with_limit("binance:BTCUSDT:trade", 8, "drop"))
    passed_at: list[float] = []
    for k in range(640):
        now = T0 + k / 64
        out = gate.filter([trade("BTCUSDT", k + 1)], now)
        passed_at += [now] * len(out)
    assert len(passed_at) == 8 + math.floor(639 * 8 / 64)  # 87
    assert gate.limited_dropped == 640 - 87
    assert len([t for t in passed_at if t >= T0 + 5]) == 40  # steady state: 8 a second
    assert passed_at[:8] == [T0 + k / 64 for k in range(8)]  # the burst


def test_token_bucket_is_per_stream() -> None:
    gate = gate_with(ControlState().with_limit("binance:*:trade", 2, "drop", burst=2))
    batch = [trade(s, i) for i in range(1, 6) for s in ("BTCUSDT", "ETHUSDT")]
    out = list(gate.filter(batch, T0))
    assert seqs(out, symbol="BTCUSDT") == [1, 2] and seqs(out, symbol="ETHUSDT") == [1, 2]
    assert gate.limited_dropped == 6
    out = list(gate.filter([trade("BTCUSDT", 6), trade("ETHUSDT", 6)], T0 + 0.5))  # one token each
    assert len(out) == 2


def test_lowest_matching_rate_wins() -> None:
    state = ControlState().with_limit("binance:*:trade", 100, "drop").with_limit("binance:BTCUSDT:*", 1, "drop")
    gate = gate_with(state)
    out = list(gate.filter([trade("BTCUSDT", i) for i in range(1, 11)], T0))
    assert seqs(out) == [1]


def test_limit_conflate_keeps_only_the_latest_excess_tick() -> None:
    gate = gate_with(ControlState().with_limit("binance:BTCUSDT:book_ticker", 1, "conflate"))
    out = list(gate.filter([book("BTCUSDT", i) for i in range(1, 6)], T0))
    assert seqs(out) == [1]
    assert gate.held == 1
    assert gate.limited_conflated == 3  # 2, 3, 4 superseded; 5 held
    assert gate.tick_pending(T0 + 0.5) == []  # no token yet
    assert gate.next_due() == pytest.approx(T0 + 1.0)
    assert seqs(gate.tick_pending(T0 + 1.0)) == [5]
    assert gate.held == 0 and gate.active is True  # the limit is still in force
    assert gate.limited_dropped == 0


def test_limit_conflate_newer_tick_takes_the_token_from_the_held_one() -> None:
    gate = gate_with(ControlState().with_limit("binance:BTCUSDT:trade", 1, "conflate"))
    gate.filter([trade("BTCUSDT", 1), trade("BTCUSDT", 2)], T0)  # 1 out, 2 held
    out = list(gate.filter([trade("BTCUSDT", 3)], T0 + 1))  # a token: 3 goes, 2 is superseded
    assert seqs(out) == [3]
    assert gate.held == 0 and gate.limited_conflated == 1


def test_unlimit_releases_held_ticks_before_new_ones() -> None:
    limited = ControlState().with_limit("binance:BTCUSDT:trade", 1, "conflate")
    gate = gate_with(limited)
    gate.filter([trade("BTCUSDT", 1), trade("BTCUSDT", 2)], T0)
    gate.apply(limited.without_limit("binance:BTCUSDT:trade"))
    out = gate.tick_pending(T0) + list(gate.filter([trade("BTCUSDT", 3)], T0))
    assert seqs(out) == [2, 3]
    assert gate.active is False


def test_changing_a_limit_resets_its_bucket_and_keeps_an_unchanged_one() -> None:
    s1 = ControlState().with_limit("binance:BTCUSDT:trade", 1, "drop").with_limit("binance:ETHUSDT:trade", 1, "drop")
    gate = gate_with(s1)
    gate.filter([trade("BTCUSDT", 1), trade("ETHUSDT", 1)], T0)  # both buckets now empty
    gate.apply(s1.with_limit("binance:BTCUSDT:trade", 3, "drop"))
    out = list(gate.filter([trade("BTCUSDT", i) for i in (2, 3, 4, 5)] + [trade("ETHUSDT", 2)], T0))
    assert seqs(out, symbol="BTCUSDT") == [2, 3, 4]  # new bucket, full
    assert seqs(out, symbol="ETHUSDT") == []  # same bucket, still empty


def test_a_gap_marker_is_never_limited_and_supersedes_the_held_tick() -> None:
    gate = gate_with(ControlState().with_limit("binance:BTCUSDT:trade", 1, "conflate"))
    gate.filter([trade("BTCUSDT", 1), trade("BTCUSDT", 2)], T0)
    marker = make_gap_marker("binance", "BTCUSDT", "trade", 3, 9, 1, 1, "unrecoverable")
    out = list(gate.filter([marker], T0))
    assert out == [marker]
    assert gate.held == 0 and gate.limited_conflated == 1


# -- degrade levels ------------------------------------------------------------------------------------------------


def test_conflate_keeps_the_latest_book_ticker_per_interval() -> None:
    gate = gate_with(ControlState().with_level("conflate"))
    out: list[Tick] = []
    for i in range(10):  # 10 updates in 90 ms
        now = T0 + i * 0.01
        out += gate.tick_pending(now)
        out += gate.filter([book("BTCUSDT", i + 1), book("ETHUSDT", i + 1)], now)
    assert seqs(out, symbol="BTCUSDT") == [1]  # the leading edge at once
    assert gate.wait_bound(T0 + 0.09) == pytest.approx(0.01)
    out += gate.tick_pending(T0 + 0.1)
    assert seqs(out, symbol="BTCUSDT") == [1, 10] and seqs(out, symbol="ETHUSDT") == [1, 10]
    assert gate.conflated == 2 * 8
    assert gate.held == 0


def test_conflate_never_touches_trades_or_closed_klines() -> None:
    gate = gate_with(ControlState().with_level("conflate"))
    batch = [trade("BTCUSDT", i) for i in range(1, 51)] + [agg("BTCUSDT", i) for i in range(1, 51)]
    batch += [kline("BTCUSDT", 1, False), kline("BTCUSDT", 2, False), kline("BTCUSDT", 3, True)]
    out = list(gate.filter(batch, T0))
    assert seqs(out, "trade") == list(range(1, 51))
    assert seqs(out, "agg_trade") == list(range(1, 51))
    # update 1 went out at once, 2 was held and superseded by the closed kline 3, which is never held
    assert seqs(out, "kline_1m") == [1, 3]
    assert gate.conflated == 1 and gate.held == 0


@pytest.mark.parametrize("level", list(Level))
def test_trades_are_never_conflated_or_dropped_by_any_level(level: Level) -> None:
    state = ControlState().with_level(level).with_critical(["binance:NOTHING:*"])
    gate = gate_with(state)
    batch = [trade(s, i) for i in range(1, 201) for s in ("BTCUSDT", "ETHUSDT")]
    batch += [agg("BTCUSDT", i) for i in range(1, 201)]
    out: list[Tick] = []
    for k in range(0, len(batch), 37):
        now = T0 + k * 0.001
        out += gate.tick_pending(now)
        out += gate.filter(batch[k:k + 37], now)
    assert out == batch
    st = gate.stats()
    assert st.conflated == st.essential_dropped == st.paused_dropped == 0


def test_essential_keeps_critical_streams_and_all_trades() -> None:
    state = ControlState().with_level("essential").with_critical(["binance:BTCUSDT:*"])
    gate = gate_with(state)
    batch = [book("BTCUSDT", 1), book("ETHUSDT", 1), trade("ETHUSDT", 1), kline("ETHUSDT", 1, False),
             kline("ETHUSDT", 2, True), book("ETHUSDT", 2), kline("BTCUSDT", 1, False)]
    out = list(gate.filter(batch, T0))
    assert [(t["symbol"], t["channel"], t["seq"]) for t in out] == [
        ("BTCUSDT", "book_ticker", 1), ("ETHUSDT", "trade", 1), ("ETHUSDT", "kline_1m", 2),
        ("BTCUSDT", "kline_1m", 1),
    ]
    assert gate.essential_dropped == 3
    assert gate.shed_active is True


def test_essential_also_conflates_critical_state_streams() -> None:
    gate = gate_with(ControlState().with_level("essential").with_critical(["binance:BTCUSDT:*"]))
    out = list(gate.filter([book("BTCUSDT", i) for i in range(1, 4)], T0))
    assert seqs(out) == [1]
    assert seqs(gate.tick_pending(T0 + 0.1)) == [3]


def test_leaving_conflate_releases_what_it_held_first() -> None:
    state = ControlState().with_level("conflate")
    gate = gate_with(state)
    gate.filter([book("BTCUSDT", 1), book("BTCUSDT", 2)], T0)
    gate.apply(state.with_level("normal"))
    assert gate.active is True
    out = gate.tick_pending(T0) + list(gate.filter([book("BTCUSDT", 3)], T0))
    assert seqs(out) == [2, 3]
    assert gate.active is False
    assert gate.stats().level_changes == {"conflate": 1, "normal": 1}


def test_decision_cache_is_invalidated_on_apply() -> None:
    gate = gate_with(ControlState().with_pause("binance:ETHUSDT:trade"))
    assert seqs(gate.filter([trade("BTCUSDT", 1)], T0)) == [1]  # decided: passes
    gate.apply(gate.state.with_pause("binance:BTCUSDT:trade"))
    assert seqs(gate.filter([trade("BTCUSDT", 2)], T0)) == []


def test_conflate_and_limit_together() -> None:
    state = ControlState().with_level("conflate").with_limit("binance:BTCUSDT:book_ticker", 2, "drop", burst=1)
    gate = gate_with(state)
    out: list[Tick] = []
    for k in range(100):  # 1 s of updates every 10 ms: conflation gives 10/s, the limit 2/s
        now = T0 + k * 0.01
        out += gate.tick_pending(now)
        out += gate.filter([book("BTCUSDT", k + 1)], now)
    assert 2 <= len(out) <= 3
    assert seqs(out) == sorted(seqs(out))


def test_drain_returns_everything_held() -> None:
    state = ControlState().with_level("conflate").with_limit("binance:ETHUSDT:trade", 1, "conflate")
    gate = gate_with(state)
    gate.filter([book("BTCUSDT", 1), book("BTCUSDT", 2), trade("ETHUSDT", 1), trade("ETHUSDT", 2)], T0)
    assert sorted(seqs(gate.drain())) == [2, 2]
    assert gate.held == 0


# -- the level rules -----------------------------------------------------------------------------------------------


def test_the_operator_level_holds_unless_auto_is_on_and_more_degraded() -> None:
    for operator in Level:
        for auto in Level:
            assert effective_level(operator, False, auto) is operator
            expected = auto if auto.rank > operator.rank else operator
            assert effective_level(operator, True, auto) is expected


def test_shed_and_filtering_start_at_their_levels() -> None:
    assert [sheds(x) for x in Level] == [False, True, True, True]
    assert [filters(x) for x in Level] == [False, False, True, True]


@pytest.mark.parametrize("channel", ["trade", "agg_trade"])
@pytest.mark.parametrize("level", list(Level))
def test_no_level_touches_an_event_channel(channel: str, level: Level) -> None:
    assert stream_rule(level, channel, f"binance:BTCUSDT:{channel}", ()) == (False, False)


@pytest.mark.parametrize("channel", ["book_ticker", "kline_1m", "kline_1d"])
def test_state_channels_are_conflated_then_dropped_unless_critical(channel: str) -> None:
    name = f"binance:BTCUSDT:{channel}"
    critical = [Pattern(f"binance:BTCUSDT:{channel}")]
    other = [Pattern("binance:ETHUSDT:*")]
    assert stream_rule(Level.NORMAL, channel, name, ()) == (False, False)
    assert stream_rule(Level.SHED, channel, name, ()) == (False, False)
    assert stream_rule(Level.CONFLATE, channel, name, ()) == (True, False)
    assert stream_rule(Level.ESSENTIAL, channel, name, ()) == (True, True)
    assert stream_rule(Level.ESSENTIAL, channel, name, other) == (True, True)
    assert stream_rule(Level.ESSENTIAL, channel, name, [*other, *critical]) == (True, False)


# -- automatic degradation -----------------------------------------------------------------------------------------


def test_auto_degrade_hysteresis_over_a_synthetic_series() -> None:
    cfg = AutoDegradeConfig(fill_high=0.5, fill_low=0.1, p99_high_us=100_000, p99_low_us=10_000,
                            down_after=3, up_after=5, max_level=Level.CONFLATE)
    auto = AutoDegrade(cfg)
    # (seconds, fill, p99): 0-9 overloaded, 10-14 in between, 15-40 calm
    series = [(t, 0.9, 1_000) for t in range(0, 10)]
    series += [(t, 0.3, 1_000) for t in range(10, 15)]
    series += [(t, 0.05, 5_000) for t in range(15, 41)]
    steps = [s for t, fill, p99 in series if (s := auto.sample(fill, p99, float(t))) is not None]
    assert [(s.at, s.before.value, s.after.value, s.direction) for s in steps] == [
        (3.0, "normal", "shed", "down"),
        (6.0, "shed", "conflate", "down"),  # another 3 s of high pressure
        # capped at conflate; 10-14 reset both clocks; calm from 15
        (20.0, "conflate", "shed", "up"),
        (25.0, "shed", "normal", "up"),
    ]
    assert "fill 0.90" in steps[0].reason
    assert auto.level is Level.NORMAL


def test_auto_degrade_latency_alone_steps_down_and_a_blip_resets_the_clock() -> None:
    auto = AutoDegrade(AutoDegradeConfig(down_after=2, up_after=2))
    assert auto.sample(0.0, 300_000, 0.0) is None
    assert auto.sample(0.0, 300_000, 1.0) is None
    assert auto.sample(0.0, 100_000, 1.5) is None  # in between: the clock starts over
    assert auto.sample(0.0, 300_000, 2.0) is None
    assert auto.sample(0.0, 300_000, 3.0) is None
    step = auto.sample(0.0, 300_000, 4.0)
    assert step is not None and step.after is Level.SHED


def test_auto_degrade_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="fill_low"):
        AutoDegradeConfig(fill_low=0.6, fill_high=0.5)
    with pytest.raises(ConfigError, match="p99"):
        AutoDegradeConfig(p99_low_us=5, p99_high_us=1)


def test_gate_auto_degrade_only_when_switched_on() -> None:
    gate = ControlGate(auto=AutoDegradeConfig(down_after=0, up_after=0))
    assert gate.sample_auto(1.0, 1e9, T0) is None  # off: nothing
    gate.apply(ControlState().with_auto(True).with_level("shed"))
    step = gate.sample_auto(1.0, 1e9, T0)
    assert step is not None and step.after is Level.SHED
    assert gate.stats().level is Level.SHED  # the operator's shed already; auto equals it
    step = gate.sample_auto(1.0, 1e9, T0 + 1)
    assert step is not None and gate.stats().level is Level.CONFLATE and gate.active
    st = gate.stats()
    assert (st.operator_level, st.auto_level, st.auto_steps) == (Level.SHED, Level.CONFLATE, {"down": 2, "up": 0})
    gate.apply(gate.state.with_auto(False))  # off again: back to the operator's level at once
    assert gate.level is Level.SHED and gate.auto.level is Level.NORMAL


def test_window_percentile() -> None:
    hist = LatencyHistogram()
    p99 = WindowPercentile(hist)
    assert p99.sample() == 0.0
    for _ in range(99):
        hist.observe(10)
    hist.observe(5_000)
    assert p99.sample() == 11.0  # the bucket of 10 µs: [10, 11]
    hist.observe(5_000)
    assert p99.sample() == 5_000.0  # only the new sample counts (its bucket bound, capped at the max seen)
    assert p99.sample() == 0.0


# -- the state model and its parser ------------------------------------------------------------------------------


def test_changes_that_change_nothing_return_the_same_state() -> None:
    s = ControlState().with_pause("binance:BTCUSDT:trade", who="a", at=1.0)
    assert s.with_pause("binance:btcusdt:trade", who="b", at=2.0) is s
    assert s.with_pause("binance:BTCUSDT:trade", unsubscribe=True) is not s
    assert s.without_pause("binance:ETHUSDT:trade") is s
    assert s.with_level("normal") is s
    assert s.with_auto(False) is s
    assert s.with_critical([]) is s
    lim = s.with_limit("binance:*:trade", 5, "drop")
    assert lim.with_limit("binance:*:trade", 5.0, LimitPolicy.DROP) is lim
    assert lim.without_limit("binance:*:book_ticker") is lim


def test_state_round_trips_through_json() -> None:
    s = (
        ControlState(version=41)
        .with_pause("binance:BTCUSDT:trade", unsubscribe=True, who="alice@h", at=1.5)
        .with_pause("binance:*:book_ticker", who="bob@h", at=2.0)
        .with_limit("binance:*:kline_*", 2.5, "conflate", burst=4, who="c@h", at=3.0)
        .with_limit("binance:ETHUSDT:trade", 100, "drop", who="d@h", at=4.0)
        .with_level("essential", who="e@h", at=5.0)
        .with_critical(["binance:BTCUSDT:*", "binance:ETHUSDT:trade"], who="f@h", at=6.0)
        .with_auto(True, who="g@h", at=7.0)
    )
    assert parse_state(dump_state(s)) == s
    assert parse_state(dump_state(s).decode()) == s
    assert [p.pattern for p in s.pauses] == ["binance:*:book_ticker", "binance:BTCUSDT:trade"]
    assert s.switches == 2 + 2 + 1 + 1
    assert [p.text for p in s.unsubscribe_patterns()] == ["binance:BTCUSDT:trade"]


def test_minimal_hand_written_state_is_accepted() -> None:
    s = parse_state('{"pauses": {"binance:btcusdt:trade": {}}, "limits": {"binance:*:trade": {"rate": 5}}}')
    assert s.version == 0
    assert s.pauses[0].pattern == "binance:BTCUSDT:trade" and s.pauses[0].who == ""
    assert s.limits[0].policy is LimitPolicy.CONFLATE and s.limits[0].depth == 5.0
    assert parse_state("{}") == ControlState()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("NaN", "not valid JSON"),
        ("[]", "must be a JSON object"),
        ('"x"', "must be a JSON object"),
        ('{"pauzes": {}}', "unknown field(s) 'pauzes'"),
        ('{"schema": 2}', "unsupported schema"),
        ('{"version": -1}', "version"),
        ('{"version": 1.5}', "version"),
        ('{"version": true}', "version"),
        ('{"version": "3"}', "version"),
        ('{"degrade": {"level": "panic"}}', "unknown degrade level 'panic'"),
        ('{"degrade": {"level": "CONFLATE"}}', "unknown degrade level"),
        ('{"degrade": {"level": 2}}', "unknown degrade level"),
        ('{"degrade": {}}', "degrade.level is missing"),
        ('{"degrade": "conflate"}', "degrade must be a JSON object"),
        ('{"degrade": {"level": "shed", "by": "x"}}', "unknown field(s) 'by'"),
        ('{"degrade": {"level": "shed", "who": 5}}', "degrade.who"),
        ('{"degrade": {"level": "shed", "at": "yesterday"}}', "degrade.at"),
        ('{"degrade": {"level": "shed", "at": -1}}', "degrade.at"),
        ('{"auto": {"enabled": "yes"}}', "auto.enabled"),
        ('{"auto": {}}', "auto.enabled"),
        ('{"critical": {"patterns": "binance:*:trade"}}', "critical.patterns must be a list"),
        ('{"critical": {"patterns": ["binance:*"]}}', "invalid pattern"),
        ('{"critical": {"patterns": [5]}}', "invalid pattern"),
        ('{"critical": {"patterns": ["binance:*:trade", "binance:*:trade"]}}', "listed twice"),
        ('{"pauses": []}', "pauses must be a JSON object"),
        ('{"pauses": {"binance:BTCUSDT": {}}}', "invalid pattern"),
        ('{"pauses": {"binance:BTC USDT:trade": {}}}', "invalid pattern"),
        ('{"pauses": {"binance:BTCUSDT:trades": {}}}', "matches no channel"),
        ('{"pauses": {"binance:BTCUSDT:trade": true}}', "must be a JSON object"),
        ('{"pauses": {"binance:BTCUSDT:trade": {"unsubscribe": 1}}}', "unsubscribe"),
        ('{"pauses": {"binance:BTCUSDT:trade": {}, "binance:btcusdt:trade": {}}}', "listed twice"),
        ('{"limits": {"binance:*:trade": {}}}', "rate is missing"),
        ('{"limits": {"binance:*:trade": {"rate": 0}}}', "positive"),
        ('{"limits": {"binance:*:trade": {"rate": -5}}}', "positive"),
        ('{"limits": {"binance:*:trade": {"rate": 1e999}}}', "infinity"),
        ('{"limits": {"binance:*:trade": {"rate": "10"}}}', "must be a number"),
        ('{"limits": {"binance:*:trade": {"rate": true}}}', "must be a number"),
        ('{"limits": {"binance:*:trade": {"rate": 5, "policy": "sample"}}}', "unknown limit policy 'sample'"),
        ('{"limits": {"binance:*:trade": {"rate": 5, "policy": null}}}', "unknown limit policy"),
        ('{"limits": {"binance:*:trade": {"rate": 5, "burst": 0.5}}}', "at least 1"),
        ('{"limits": {"binance:*:trade": {"rate": 5, "every": 1}}}', "unknown field(s) 'every'"),
    ],
)
def test_parse_state_rejects_malformed_records(raw: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_state(raw)
    assert needle in str(info.value)
    assert str(info.value).startswith("control state")


def test_parse_state_rejects_non_text() -> None:
    with pytest.raises(ConfigError, match="expected JSON text"):
        parse_state(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "needle"),
    [("binance:BTCUSDT", "invalid pattern"), ("", "invalid pattern"), ("binance::trade", "invalid pattern"),
     ("binance:BTCUSDT:depth5", "matches no channel"), ("binance:*:kline_2m", "matches no channel")],
)
def test_parse_target_rejects(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_target(text)


def test_parse_target_normalizes() -> None:
    assert parse_target(" BINANCE:btcusdt:trade").text == "binance:BTCUSDT:trade"
    assert parse_target("binance:*:kline_*").text == "binance:*:kline_*"
    assert parse_target("*:*:*").text == "*:*:*"


@pytest.mark.parametrize("rate", [0, -1, math.inf, math.nan])
def test_with_limit_rejects_bad_rates(rate: float) -> None:
    with pytest.raises(ConfigError, match="rate"):
        ControlState().with_limit("binance:*:trade", rate)


def test_enums_parse_with_clear_messages() -> None:
    assert Level.parse(" Conflate ") is Level.CONFLATE
    with pytest.raises(ConfigError, match="normal, shed, conflate, essential"):
        Level.parse("panic")
    with pytest.raises(ConfigError, match="conflate, drop"):
        LimitPolicy.parse("sample")
    with pytest.raises(ConfigError, match="mark, none"):
        OnResume.parse("backfill")
    with pytest.raises(ConfigError, match="conflate interval"):
        ControlGate(conflate_interval=0)
