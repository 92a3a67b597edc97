"""Control and degradation edges that mutation testing showed unchecked (docs/testing.md, "Mutation testing").

Error messages that name where a stored state is wrong, boundaries of the auto-degrade thresholds,
token-bucket timing at rates other than 1/s, held ticks across reconfigurations, resume markers from
seq 0, and every figure :meth:`ControlGate.stats` reports.  Time is passed in; nothing sleeps.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import Tick, is_gap_marker, make_gap_marker
from distributor.control import (
    MAX_WHO,
    AutoDegrade,
    AutoDegradeConfig,
    ControlGate,
    ControlState,
    Critical,
    Degrade,
    Level,
    Limit,
    LimitPolicy,
    Pause,
    WindowPercentile,
    dump_state,
    parse_state,
    parse_target,
    state_to_dict,
)

T0 = 1000.0
TRADE = "binance:BTCUSDT:trade"
BOOK = "binance:BTCUSDT:book_ticker"


def tick(symbol: str, channel: str, seq: int, **extra: Any) -> Tick:
    t: dict[str, Any] = {
        "v": 1, "venue": "binance", "symbol": symbol, "channel": channel, "seq": seq,
        "ts_event": 1_700_000_000_000_000 + seq, "ts_recv": 1_700_000_000_000_500 + seq, **extra,
    }
    return t  # type: ignore[return-value]


def trade(seq: int, symbol: str = "BTCUSDT") -> Tick:
    return tick(symbol, "trade", seq, trade_id=seq, price="1", qty="1", side="buy")


def book(seq: int, symbol: str = "BTCUSDT") -> Tick:
    return tick(symbol, "book_ticker", seq, bid_px="1", bid_qty="1", ask_px="2", ask_qty="1", update_id=seq)


def kline(seq: int, closed: bool) -> Tick:
    return tick("BTCUSDT", "kline_1m", seq, open_time=0, close_time=1, open="1", high="1", low="1", close="1",
                volume="1", quote_volume="1", trades=1, closed=closed)


def seqs(ticks: Any) -> list[int]:
    return [t["seq"] for t in ticks]


def gate_with(state: ControlState, **kwargs: Any) -> ControlGate:
    gate = ControlGate(**kwargs)
    gate.apply(state)
    return gate


def refused(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_state(raw)  # type: ignore[arg-type]
    return str(info.value)


# -- targets and the state model -----------------------------------------------------------------------------------


def test_parse_target_lowers_only_the_venue() -> None:
    with pytest.raises(ConfigError, match="matches no channel"):
        parse_target("binance:BTCUSDT:Trade")  # channels are lower case: not lowered into a valid one
    with pytest.raises(ConfigError) as info:
        parse_target("BINANCE")
    assert str(info.value).startswith("invalid pattern 'binance': expected venue:SYMBOL:channel")


def test_parse_target_lists_the_channels_there_are() -> None:
    with pytest.raises(ConfigError) as info:
        parse_target("binance:BTCUSDT:depth5")
    assert str(info.value) == (
        "invalid pattern 'binance:BTCUSDT:depth5': channel 'depth5' matches no channel "
        "(trade, agg_trade, book_ticker, depth, kline_<interval>)"
    )


def test_changes_record_who_and_when_and_default_to_nobody_at_zero() -> None:
    s = ControlState()
    assert s.with_pause(TRADE).pauses == (Pause(TRADE, False, "", 0.0),)
    assert s.with_pause(TRADE, who="ops", at=5.0).pauses == (Pause(TRADE, False, "ops", 5.0),)
    assert s.with_limit(TRADE, 3).limits == (Limit(TRADE, 3.0, LimitPolicy.CONFLATE, None, "", 0.0),)
    assert s.with_limit(TRADE, 3, "drop", burst=7, who="ops", at=6.0).limits == (
        Limit(TRADE, 3.0, LimitPolicy.DROP, 7.0, "ops", 6.0),
    )
    assert s.with_level("shed").degrade == Degrade(Level.SHED, "", 0.0)
    assert s.with_level("shed", who="ops", at=7.0).degrade == Degrade(Level.SHED, "ops", 7.0)
    assert s.with_critical([TRADE]).critical == Critical((TRADE,), "", 0.0)
    assert s.with_critical([TRADE], who="ops", at=8.0).critical == Critical((TRADE,), "ops", 8.0)
    auto = s.with_auto(True).auto
    assert (auto.enabled, auto.who, auto.at) == (True, "", 0.0)
    auto = s.with_auto(True, who="ops", at=9.0).auto
    assert (auto.enabled, auto.who, auto.at) == (True, "ops", 9.0)


def test_bumped_adds_one_to_the_version() -> None:
    assert ControlState().bumped().version == 1
    assert ControlState().bumped().bumped().version == 2


def test_limit_arguments_are_named_in_their_errors() -> None:
    with pytest.raises(ConfigError) as info:
        ControlState().with_limit(TRADE, 0)
    assert str(info.value) == "rate must be a positive, finite number of ticks per second, got 0"
    with pytest.raises(ConfigError) as info:
        ControlState().with_limit(TRADE, 5, burst=0.5)
    assert str(info.value) == "burst must be a finite number of ticks, at least 1, got 0.5"
    with pytest.raises(ConfigError) as info:
        ControlState().with_limit(TRADE, 5, burst="2")  # type: ignore[arg-type]
    assert str(info.value) == "burst must be a number of ticks, got '2'"


def test_the_stored_form_leaves_out_an_unset_burst_and_sorts_its_keys() -> None:
    s = ControlState().with_limit(TRADE, 3).with_limit(BOOK, 2, burst=4)
    limits = state_to_dict(s)["limits"]
    assert limits[TRADE] == {"rate": 3.0, "policy": "conflate", "who": "", "at": 0.0}
    assert limits[BOOK]["burst"] == 4.0
    raw = dump_state(s)
    assert list(orjson.loads(raw)) == sorted(orjson.loads(raw))
    assert list(orjson.loads(raw)["limits"][TRADE]) == ["at", "policy", "rate", "who"]
    assert parse_state(raw) == s


# -- parse_state: every error says where ------------------------------------------------------------------------


def test_parse_state_names_what_is_not_text() -> None:
    assert refused(5) == "control state: expected JSON text, got int"


@pytest.mark.parametrize(("raw", "message"), [
    ("[]", "control state: control state must be a JSON object, got a list"),
    ('{"degrade": "shed"}', "control state: degrade must be a JSON object, got a string"),
    ('{"auto": true}', "control state: auto must be a JSON object, got a boolean"),
    ('{"critical": null}', "control state: critical must be a JSON object, got null"),
    ('{"pauses": 5}', "control state: pauses must be a JSON object, got a number"),
    ('{"limits": 5.5}', "control state: limits must be a JSON object, got a number"),
    ('{"pauses": {"binance:BTCUSDT:trade": []}}',
     "control state: pauses['binance:BTCUSDT:trade'] must be a JSON object, got a list"),
])
def test_a_section_of_the_wrong_kind_is_named_with_its_kind(raw: str, message: str) -> None:
    assert refused(raw) == message


@pytest.mark.parametrize(("raw", "message"), [
    ('{"x": 1, "y": 2}', "control state: control state: unknown field(s) 'x', 'y'"),
    ('{"degrade": {"level": "shed", "x": 1}}', "control state: degrade: unknown field(s) 'x'"),
    ('{"auto": {"enabled": true, "x": 1}}', "control state: auto: unknown field(s) 'x'"),
    ('{"critical": {"x": 1}}', "control state: critical: unknown field(s) 'x'"),
    ('{"pauses": {"binance:BTCUSDT:trade": {"x": 1}}}',
     "control state: pauses['binance:BTCUSDT:trade']: unknown field(s) 'x'"),
    ('{"limits": {"binance:BTCUSDT:trade": {"rate": 1, "x": 1}}}',
     "control state: limits['binance:BTCUSDT:trade']: unknown field(s) 'x'"),
])
def test_an_unknown_field_is_named_with_its_section(raw: str, message: str) -> None:
    assert refused(raw) == message


@pytest.mark.parametrize(("section", "body", "where"), [
    ("auto", {"enabled": True}, "auto"),
    ("critical", {"patterns": []}, "critical"),
    ("pauses", {TRADE: {}}, f"pauses[{TRADE!r}]"),
    ("limits", {TRADE: {"rate": 1}}, f"limits[{TRADE!r}]"),
])
def test_a_bad_who_is_named_with_its_section(section: str, body: dict[str, Any], where: str) -> None:
    def stamped(who: object) -> dict[str, Any]:
        if section in ("pauses", "limits"):
            return {section: {p: {**b, "who": who} for p, b in body.items()}}
        return {section: {**body, "who": who}}

    assert refused(orjson.dumps(stamped(5))) == (
        f"control state: {where}.who must be a string of at most {MAX_WHO} characters"
    )
    parse_state(orjson.dumps(stamped("w" * MAX_WHO)))  # exactly the limit: accepted
    assert refused(orjson.dumps(stamped("w" * (MAX_WHO + 1)))).endswith(f"at most {MAX_WHO} characters")


@pytest.mark.parametrize(("raw", "message"), [
    ('{"critical": {"patterns": ["nope"]}}', "control state: critical.patterns: invalid pattern 'nope'"),
    ('{"pauses": {"nope": {}}}', "control state: pauses: invalid pattern 'nope'"),
    ('{"limits": {"nope": {"rate": 1}}}', "control state: limits: invalid pattern 'nope'"),
])
def test_a_bad_pattern_is_named_with_its_section(raw: str, message: str) -> None:
    assert refused(raw).startswith(message)


def test_a_limit_policy_must_be_written_exactly() -> None:
    assert refused(f'{{"limits": {{"{TRADE}": {{"rate": 1, "policy": "DROP"}}}}}}') == (
        f"control state: limits[{TRADE!r}].policy: unknown limit policy 'DROP': expected conflate or drop"
    )


def test_sections_may_leave_out_their_optional_fields() -> None:
    s = parse_state(f'{{"critical": {{}}, "pauses": {{"{TRADE}": {{}}}}, "limits": {{"{BOOK}": {{"rate": 2}}}}}}')
    assert s.critical == Critical((), "", 0.0)
    assert s.pauses == (Pause(TRADE, False, "", 0.0),)
    assert s.limits == (Limit(BOOK, 2.0, LimitPolicy.CONFLATE, None, "", 0.0),)


# -- automatic degradation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"fill_low": 0.0}, {"fill_high": 1.0}, {"p99_low_us": 0.0}, {"down_after": 0, "up_after": 0},
])
def test_auto_degrade_config_accepts_its_bounds(kwargs: dict[str, float]) -> None:
    AutoDegradeConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fill_low": 0.5, "fill_high": 0.5}, "auto-degrade: need 0 <= fill_low < fill_high <= 1, got 0.5, 0.5"),
    ({"fill_high": 1.5}, "auto-degrade: need 0 <= fill_low < fill_high <= 1, got 0.1, 1.5"),
    ({"fill_low": -0.1}, "auto-degrade: need 0 <= fill_low < fill_high <= 1, got -0.1, 0.5"),
    ({"p99_low_us": 7.0, "p99_high_us": 7.0}, "auto-degrade: need 0 <= p99_low_us < p99_high_us, got 7.0, 7.0"),
    ({"p99_low_us": -1.0}, "auto-degrade: need 0 <= p99_low_us < p99_high_us, got -1.0, 250000.0"),
    ({"down_after": -1}, "auto-degrade: durations must be >= 0, got -1, 30.0"),
    ({"up_after": -1}, "auto-degrade: durations must be >= 0, got 3.0, -1"),
])
def test_auto_degrade_config_refuses_past_its_bounds(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        AutoDegradeConfig(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_auto_degrade_thresholds_are_inclusive_and_every_clock_restarts() -> None:
    """Pressure exactly at a high mark is high, exactly at the low marks is low; down, up, and down again."""
    auto = AutoDegrade(AutoDegradeConfig(down_after=2, up_after=5))
    assert auto.sample(0.5, 0, 0) is None  # fill exactly at fill_high: the clock starts
    step = auto.sample(0.5, 0, 2)
    assert step is not None and (step.before, step.after) == (Level.NORMAL, Level.SHED)
    step = auto.sample(0.0, 250_000, 4)  # p99 exactly at its high mark
    assert step is not None and step.after is Level.CONFLATE
    assert auto.sample(0.1, 50_000, 5) is None  # exactly at both low marks: low
    step = auto.sample(0.1, 50_000, 10)
    assert step is not None and (step.before, step.after, step.direction) == (Level.CONFLATE, Level.SHED, "up")
    assert step.reason == "ingress fill 0.10 (low 0.1), e2e p99 50000 µs (low 50000) for 5 s"
    assert auto.sample(0.9, 0, 11) is None  # high again: its clock starts afresh
    step = auto.sample(0.9, 0, 13)
    assert step is not None and step.after is Level.CONFLATE
    assert auto.sample(0.0, 0, 14) is None  # low: its clock starts afresh
    assert auto.sample(0.3, 0, 15) is None  # in between: both clocks stop
    assert auto.sample(0.0, 0, 16) is None
    step = auto.sample(0.0, 0, 21)
    assert step is not None and step.after is Level.SHED


@pytest.mark.parametrize(("q", "ok"), [(0.0, False), (1e-9, True), (1.0, True), (1.5, False)])
def test_window_percentile_quantile_bounds(q: float, ok: bool) -> None:
    if ok:
        WindowPercentile(LatencyHistogram(), q)
        return
    with pytest.raises(ConfigError) as info:
        WindowPercentile(LatencyHistogram(), q)
    assert str(info.value) == f"quantile must be in (0, 1], got {q}"


# -- the gate -------------------------------------------------------------------------------------------------------


def test_a_fresh_gate_reports_normal_and_nothing_shed() -> None:
    st = ControlGate().stats()
    assert st.level is Level.NORMAL and st.shed_active is False and st.auto_enabled is False


def test_on_resume_given_as_text_marks_the_gap() -> None:
    paused = ControlState().with_pause(TRADE)
    gate = gate_with(paused, on_resume="mark")
    gate.filter([trade(4), trade(5)], T0)
    gate.apply(ControlState())
    (marker,) = gate.tick_pending(T0)
    assert (marker["gap_first"], marker["gap_last"]) == (4, 5)  # type: ignore[typeddict-item]


def test_a_resume_marker_from_seq_0_carries_the_last_dropped_ticks_times() -> None:
    gate = gate_with(ControlState().with_pause(TRADE))
    gate.filter([trade(0), trade(1)], T0)
    gate.filter([trade(2)], T0 + 1)
    gate.apply(ControlState().with_pause("binance:ETHUSDT:trade"))  # BTCUSDT resumed, another pause set
    out = gate.tick_pending(T0 + 2)
    last = trade(2)
    assert out == [make_gap_marker("binance", "BTCUSDT", "trade", 0, 2, last["ts_event"], last["ts_recv"], "paused")]
    gate.apply(ControlState())  # a later change does not mark the same range again
    assert gate.tick_pending(T0 + 3) == [] and gate.markers == 1


def test_level_changes_count_each_time_a_level_comes_into_force() -> None:
    gate = ControlGate()
    for level in ("shed", "normal", "shed", "conflate", "shed"):
        gate.apply(gate.state.with_level(level))
    assert gate.stats().level_changes == {"shed": 3, "normal": 1, "conflate": 1}


def test_removing_limits_releases_every_held_tick_whatever_the_order() -> None:
    state = ControlState().with_limit("binance:AAA:trade", 1).with_limit("binance:ZZZ:trade", 1)
    gate = gate_with(state)
    gate.filter([trade(1, "AAA"), trade(1, "ZZZ"), trade(2, "ZZZ")], T0)  # AAA: nothing held; ZZZ: 2 held
    gate.apply(ControlState())
    assert seqs(gate.tick_pending(T0)) == [2]


def test_a_stream_that_passes_untouched_does_not_hide_the_held_ticks_of_the_next() -> None:
    state = ControlState().with_limit("binance:ZZZ:trade", 1)
    gate = gate_with(state)
    gate.filter([trade(1, "AAA"), trade(1, "ZZZ"), trade(2, "ZZZ")], T0)  # AAA passes; ZZZ: 2 held
    gate.apply(state.with_pause("binance:ETHUSDT:trade"))
    gate.apply(ControlState())
    assert seqs(gate.tick_pending(T0)) == [2]


def test_a_resumed_stream_still_limited_is_marked_once() -> None:
    state = ControlState().with_limit(TRADE, 100)
    gate = gate_with(state.with_pause(TRADE))
    gate.filter([trade(1), trade(2)], T0)
    gate.apply(state)  # resumed; the limit stays
    (marker,) = gate.tick_pending(T0)
    assert (marker["gap_first"], marker["gap_last"]) == (1, 2)  # type: ignore[typeddict-item]
    gate.apply(state.with_level("shed"))
    gate.apply(state.with_pause("binance:ETHUSDT:trade"))
    assert gate.tick_pending(T0) == [] and gate.markers == 1
    assert seqs(gate.filter([trade(3)], T0)) == [3]


def test_a_held_tick_is_released_when_its_limit_turns_to_drop_and_kept_when_it_stays_conflate() -> None:
    s1 = ControlState().with_limit(TRADE, 1, "conflate")
    gate = gate_with(s1)
    gate.filter([trade(1), trade(2)], T0)
    gate.apply(s1.with_pause("binance:ETHUSDT:trade"))  # the limit unchanged: the held tick stays held
    assert gate.held == 1 and gate.tick_pending(T0) == []
    gate.apply(s1.with_limit(TRADE, 1, "drop"))
    assert seqs(gate.tick_pending(T0)) == [2] and gate.held == 0


def test_held_ticks_still_go_out_after_an_unrelated_change() -> None:
    state = ControlState().with_level("conflate").with_limit(TRADE, 1, "conflate")
    gate = gate_with(state)
    gate.filter([trade(1), trade(2), book(1), book(2)], T0)  # trade 2 held by the limit, book 2 by conflation
    assert gate.held == 2
    gate.apply(state.with_pause("binance:ETHUSDT:trade"))
    assert gate.held == 2
    assert gate.tick_pending(T0 + 0.05) == []  # not due yet: still held
    assert sorted(seqs(gate.tick_pending(T0 + 1))) == [2, 2]


def test_a_conflated_book_ticker_is_still_held_after_an_early_tick_pending() -> None:
    gate = gate_with(ControlState().with_level("conflate"))
    gate.filter([book(1), book(2)], T0)
    assert gate.tick_pending(T0 + 0.05) == []
    assert seqs(gate.tick_pending(T0 + 0.1)) == [2]


def test_equal_rates_the_first_pattern_in_order_wins() -> None:
    """Limits are kept sorted by pattern, so which of two equal rates applies never depends on the order they
    were set in: the first pattern's."""
    state = ControlState().with_limit("binance:*:trade", 1, "drop").with_limit(TRADE, 1, "conflate")
    for s in (state, ControlState().with_limit(TRADE, 1, "conflate").with_limit("binance:*:trade", 1, "drop")):
        gate = gate_with(s)
        gate.filter([trade(1), trade(2)], T0)
        assert gate.limited_dropped == 1 and gate.held == 0


def test_releases_work_again_after_being_taken() -> None:
    limited = ControlState().with_limit(TRADE, 1)
    gate = gate_with(limited)
    for round_ in range(3):
        base = 10 * round_
        gate.apply(limited)
        gate.filter([trade(base + 1), trade(base + 2)], T0 + round_)
        gate.apply(ControlState())
        assert seqs(gate.filter([trade(base + 3)], T0 + round_)) == [base + 2, base + 3]


def test_a_book_ticker_exactly_one_interval_later_goes_out_at_once() -> None:
    gate = gate_with(ControlState().with_level("conflate"), conflate_interval=0.25)
    assert seqs(gate.filter([book(1)], T0)) == [1]
    assert seqs(gate.filter([book(2)], T0 + 0.25)) == [2]
    assert gate.held == 0


def test_a_released_conflated_tick_starts_a_new_interval() -> None:
    gate = gate_with(ControlState().with_level("conflate"))
    gate.filter([book(1), book(2)], T0)  # 1 out, 2 held until T0 + 0.1
    assert seqs(gate.tick_pending(T0 + 0.1)) == [2]
    assert seqs(gate.filter([book(3)], T0 + 0.15)) == []  # within the new interval: held
    assert seqs(gate.tick_pending(T0 + 0.2)) == [3]


def test_conflation_counts_every_superseded_tick() -> None:
    gate = gate_with(ControlState().with_level("conflate"))
    gate.filter([book(i) for i in range(1, 6)], T0)  # 1 out, 2 3 4 superseded, 5 held
    assert gate.conflated == 3
    gate.filter([kline(1, False), kline(2, False), kline(3, False), kline(4, True)], T0)
    assert gate.conflated == 3 + 2  # 2 superseded by 3, 3 by the closed kline


def test_a_limited_stream_under_conflation_takes_tokens_for_closed_klines_and_leading_edges() -> None:
    state = ControlState().with_level("conflate").with_limit("binance:BTCUSDT:kline_1m", 1, "drop")
    gate = gate_with(state)
    out = gate.filter([kline(1, True), kline(2, True)], T0)  # both closed: one token
    assert seqs(out) == [1] and gate.limited_dropped == 1
    gate2 = gate_with(ControlState().with_level("conflate").with_limit(BOOK, 1, "drop"))
    assert seqs(gate2.filter([book(1)], T0)) == [1]
    assert seqs(gate2.filter([book(2)], T0 + 0.5)) == []  # a new interval but no token: dropped
    assert gate2.limited_dropped == 1


def test_a_bucket_refills_at_its_rate_and_each_release_spends_a_token() -> None:
    gate = gate_with(ControlState().with_limit(TRADE, 10, "conflate", burst=1))
    assert seqs(gate.filter([trade(1), trade(2)], T0)) == [1]  # 2 held
    assert gate.next_due() == pytest.approx(T0 + 0.1)
    assert gate.tick_pending(T0 + 0.05) == []
    assert seqs(gate.tick_pending(T0 + 0.1)) == [2]
    assert seqs(gate.filter([trade(3)], T0 + 0.1)) == []  # the release spent the token: 3 held
    assert seqs(gate.tick_pending(T0 + 0.2)) == [3]


def test_limit_conflation_counts_every_superseded_tick() -> None:
    gate = gate_with(ControlState().with_limit(TRADE, 1, "conflate"))
    gate.filter([trade(i) for i in range(1, 6)], T0)  # 1 out, 2 3 4 superseded, 5 held
    assert gate.limited_conflated == 3
    gate.filter([trade(6)], T0 + 1)  # a token: 6 goes, 5 superseded
    assert gate.limited_conflated == 4


def test_a_marker_drops_both_held_ticks_of_its_stream() -> None:
    state = ControlState().with_level("conflate").with_limit(BOOK, 1, "conflate")
    gate = gate_with(state)
    gate.filter([book(1), book(2), book(3)], T0)  # 1 out (token spent), 2 superseded, 3 held by conflation
    gate.tick_pending(T0 + 0.1)  # due for conflation, but no token: now held by the limit
    gate.filter([book(4), book(5)], T0 + 0.15)  # 4 superseded, 5 held by conflation
    assert gate.held == 2 and (gate.conflated, gate.limited_conflated) == (2, 0)
    gate.filter([book(6)], T0 + 0.16)  # 5 superseded
    gate.tick_pending(T0 + 0.2)  # 6 due for conflation, no token yet: it supersedes 3 held by the limit
    gate.filter([book(7)], T0 + 0.25)  # held by conflation
    assert gate.held == 2 and (gate.conflated, gate.limited_conflated) == (3, 1)
    marker = make_gap_marker("binance", "BTCUSDT", "book_ticker", 8, 9, 1, 1, "unrecoverable")
    assert gate.filter([marker], T0 + 0.25) == [marker]
    assert gate.held == 0 and (gate.conflated, gate.limited_conflated) == (4, 2)
    assert gate.tick_pending(T0 + 5) == [] and gate.drain() == []


def test_a_marker_with_nothing_held_changes_no_count() -> None:
    gate = gate_with(ControlState().with_level("conflate"))
    marker = make_gap_marker("binance", "BTCUSDT", "book_ticker", 4, 9, 1, 1, "unrecoverable")
    assert gate.filter([marker], T0) == [marker]
    assert (gate.conflated, gate.limited_conflated, gate.held) == (0, 0, 0)


def test_a_release_waiting_means_no_wait_and_an_idle_pause_waits_one_interval() -> None:
    limited = ControlState().with_limit(TRADE, 1).with_pause("binance:ETHUSDT:trade")
    gate = gate_with(limited, conflate_interval=0.3)
    assert gate.wait_bound(T0) == pytest.approx(0.3)  # active (a pause), nothing held
    gate.filter([trade(1), trade(2)], T0)
    gate.apply(limited.without_limit(TRADE))
    assert gate.next_due() == float("-inf") and gate.wait_bound(T0) == 0.0


def test_after_a_drain_nothing_is_held_or_counted_again() -> None:
    state = ControlState().with_level("conflate").with_limit(TRADE, 1, "conflate")
    gate = gate_with(state)
    gate.filter([trade(1), trade(2), book(1), book(2)], T0)
    assert sorted(seqs(gate.drain())) == [2, 2]
    counts = (gate.conflated, gate.limited_conflated)
    assert seqs(gate.filter([trade(3)], T0 + 5)) == [3]
    assert seqs(gate.filter([book(3)], T0 + 5)) == [3]
    assert (gate.conflated, gate.limited_conflated) == counts and gate.held == 0
    assert gate.tick_pending(T0 + 10) == []


def test_stats_reports_every_figure() -> None:
    state = (ControlState().with_limit(TRADE, 1, "drop").with_limit(BOOK, 1, "conflate").with_level("essential")
             .with_critical([BOOK]).with_auto(True).bumped())
    gate = gate_with(state)
    out = gate.filter([trade(1), trade(2), book(1), book(2), book(3), book(1, "ETHUSDT")], T0)
    assert seqs(out) == [1, 1]
    st = gate.stats()
    assert (st.version, st.level, st.operator_level, st.auto_level, st.auto_enabled, st.shed_active) == (
        1, Level.ESSENTIAL, Level.ESSENTIAL, Level.NORMAL, True, True,
    )
    assert (st.switches, st.pauses, st.limits) == (4, 0, 2)
    assert (st.limited_dropped, st.limited_conflated, st.conflated, st.essential_dropped, st.held) == (1, 0, 1, 1, 1)
    assert st.paused_dropped == 0 and st.markers == 0 and st.auto_steps == {"down": 0, "up": 0}
    assert is_gap_marker(make_gap_marker("binance", "X", "trade", 1, 1, 1, 1, "r"))
