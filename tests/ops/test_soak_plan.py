"""The soak's pure decisions: schedule parsing and layout, the stream invariant, the growth test."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.core.errors import ConfigError
from ops.soak_plan import (
    COOLDOWN_S,
    FAULT_KINDS,
    VENUE_PLANS,
    WARMUP_S,
    StreamCheck,
    VenuePlan,
    applicable_faults,
    checked_channels,
    grows_without_bound,
    history_path,
    merge_runs,
    missing_from,
    newest_id,
    parse_faults,
    plan,
    recovery_summary,
    slope,
    venue_plan,
)

# ------------------------------------------------------------------ --faults


def test_all_and_none() -> None:
    assert parse_faults("all") == {k: rate for k, (_, rate) in FAULT_KINDS.items()}
    assert parse_faults("none") == {} == parse_faults("")


def test_kinds_with_and_without_rates() -> None:
    assert parse_faults("stall=10/h, blackhole") == {"stall": 10.0, "blackhole": FAULT_KINDS["blackhole"][1]}
    assert parse_faults("refuse=2.5") == {"refuse": 2.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stal", "unknown fault 'stal'"),
        ("stall=x/h", "rate must look like 4/h"),
        ("stall=0/h", "above 0"),
        ("stall=-1/h", "above 0"),
        ("stall=nan", "above 0"),
        ("stall=3601/h", "at most 3600"),
        ("stall,,refuse", "unknown fault ''"),
    ],
)
def test_bad_schedules_are_refused_with_their_name(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_faults(text)


# ------------------------------------------------------------------ plan


def test_same_seed_same_schedule_other_seed_other_schedule() -> None:
    rates = parse_faults("all")
    assert plan(rates, 3600, 7) == plan(rates, 3600, 7)
    assert plan(rates, 3600, 7) != plan(rates, 3600, 8)


@pytest.mark.parametrize("duration", [300.0, 1800.0, 7200.0])
def test_every_kind_at_least_once_in_order_never_overlapping(duration: float) -> None:
    rates = parse_faults("all")
    events = plan(rates, duration, 1)
    assert {e.kind for e in events} == set(FAULT_KINDS)
    for kind, rate in rates.items():
        assert sum(e.kind == kind for e in events) == max(1, round(rate * duration / 3600))
    assert events[0].at >= WARMUP_S
    for a, b in itertools.pairwise(events):
        assert a.at + a.duration <= b.at, (a, b)
    last = events[-1]
    assert last.at + last.duration <= duration - COOLDOWN_S
    assert all(e.status in (404, 403, 502) for e in events if e.kind == "http_error")
    assert all(e.target in (0, 1) and e.duration > 0 for e in events)


def test_a_schedule_that_cannot_fit_is_refused() -> None:
    with pytest.raises(ConfigError, match="do not fit"):
        plan(parse_faults("all"), 120, 1)
    with pytest.raises(ConfigError, match="needs more than"):
        plan(parse_faults("stall"), 40, 1)
    assert plan({}, 10, 1) == []


# ------------------------------------------------------------------ venues


def test_the_venues_and_what_each_checks() -> None:
    assert list(VENUE_PLANS) == ["binance", "binance_usdm", "binance_coinm", "okx"]
    spot = venue_plan("binance")
    assert (spot.symbols, spot.channels, spot.checked) == (("BTCUSDT", "ETHUSDT"), ("trade", "agg_trade"),
                                                          ("trade", "agg_trade"))
    for futures in ("binance_usdm", "binance_coinm"):
        p = venue_plan(futures)
        assert p.checked == ("agg_trade",) and "trade" not in p.channels
        assert checked_channels(p, p.channels) == ("agg_trade",)  # book tickers and mark prices run unchecked
    okx = venue_plan("okx")
    assert okx.checked == ("trade",) and checked_channels(okx, ("book_ticker", "trade")) == ("trade",)
    assert checked_channels(spot, ("book_ticker", "agg_trade", "trade")) == ("agg_trade", "trade")
    assert checked_channels(spot, ("book_ticker",)) == ()
    with pytest.raises(ConfigError, match="unknown venue 'kraken'; known: binance, binance_usdm, binance_coinm, okx"):
        venue_plan("kraken")


def test_every_checked_channel_has_its_rest_history() -> None:
    for p in VENUE_PLANS.values():
        assert set(p.checked) == set(p.history), p.name
        assert set(p.checked) <= set(p.channels), p.name
        assert set(p.unsupported) <= set(FAULT_KINDS), p.name


def test_history_paths_per_venue() -> None:
    assert history_path(venue_plan("binance"), "BTCUSDT", "trade") == "/api/v3/trades?symbol=BTCUSDT&limit=1"
    assert history_path(venue_plan("binance"), "BTCUSDT", "agg_trade") == "/api/v3/aggTrades?symbol=BTCUSDT&limit=1"
    assert history_path(venue_plan("binance_usdm"), "ETHUSDT", "agg_trade") == (
        "/fapi/v1/aggTrades?symbol=ETHUSDT&limit=1"
    )
    assert history_path(venue_plan("binance_coinm"), "BTCUSD_PERP", "agg_trade") == (
        "/dapi/v1/aggTrades?symbol=BTCUSD_PERP&limit=1"
    )
    assert history_path(venue_plan("okx"), "BTC-USDT-SWAP", "trade") == (
        "/api/v5/market/history-trades?instId=BTC-USDT-SWAP&limit=1"
    )
    with pytest.raises(KeyError):
        history_path(venue_plan("binance_usdm"), "BTCUSDT", "trade")


def test_newest_id_in_each_venues_answer() -> None:
    spot = venue_plan("binance")
    assert newest_id(spot, "trade", [{"id": 7}, {"id": 9}]) == 9  # oldest first
    assert newest_id(spot, "agg_trade", [{"a": 12}]) == 12
    assert newest_id(spot, "trade", []) is None
    assert newest_id(venue_plan("binance_coinm"), "agg_trade", [{"a": 3}]) == 3
    okx = venue_plan("okx")
    assert newest_id(okx, "trade", {"code": "0", "msg": "", "data": [{"tradeId": "42"}, {"tradeId": "41"}]}) == 42
    assert newest_id(okx, "trade", {"code": "0", "data": []}) is None
    with pytest.raises(ValueError, match="51001"):
        newest_id(okx, "trade", {"code": "51001", "msg": "Instrument ID does not exist"})


def test_faults_a_venue_cannot_take_are_set_aside_by_name() -> None:
    rates = parse_faults("all")
    for p in VENUE_PLANS.values():  # every kind acts on a part every profile has
        assert applicable_faults(p, rates) == (rates, {}), p.name
    narrow = VenuePlan("v", ("X",), ("trade",), ("trade",), "/ping", {"trade": ("/t", "s", "id")},
                       unsupported={"bad_frames": "no wire faults", "stall": "no stall"})
    kept, skipped = applicable_faults(narrow, rates)
    assert skipped == {"bad_frames": "no wire faults", "stall": "no stall"}
    assert set(kept) == set(FAULT_KINDS) - {"bad_frames", "stall"}
    assert {e.kind for e in plan(kept, 600, 1)} == set(kept)
    assert applicable_faults(narrow, {"refuse": 4.0}) == ({"refuse": 4.0}, {})
    assert applicable_faults(narrow, {"stall": 4.0}) == ({}, {"stall": "no stall"})


# ------------------------------------------------------------------ the stream invariant


def test_contiguous_ids_pass() -> None:
    c = StreamCheck("k")
    for seq in range(100, 110):
        c.feed(f"1-{seq}", seq, None)
    assert c.breaks == 0 and c.stored == 10 and c.next == 110 and c.runs == [[100, 109]]


def test_a_hole_is_a_break_naming_the_first_offender() -> None:
    c = StreamCheck("k")
    c.feed("1-1", 1, None)
    c.feed("1-2", 2, None)
    c.feed("1-5", 5, None)
    c.feed("1-9", 9, None)
    assert c.breaks == 2
    assert c.first_break == "k at entry 1-5: id 5 where 3 was due (missing 3..4)"
    assert c.runs == [[1, 2], [5, 5], [9, 9]]


def test_a_duplicate_or_older_id_is_a_break_and_not_counted_as_stored() -> None:
    c = StreamCheck("k")
    for seq in (1, 2, 2, 3, 1):
        c.feed(f"1-{seq}", seq, None)
    assert c.breaks == 2 and c.stored == 3 and c.next == 4
    assert "stored twice or out of order" in c.first_break


def test_a_gap_marker_covers_its_ids() -> None:
    c = StreamCheck("k")
    c.feed("1-1", 1, None)
    c.feed("1-7", 7, (2, 7))
    c.feed("1-8", 8, None)
    assert c.breaks == 0 and c.marked == 6 and c.markers == 1 and c.stored == 2 and c.next == 9


def test_a_gap_marker_that_leaves_a_hole_or_is_mislabelled_breaks() -> None:
    c = StreamCheck("k")
    c.feed("1-1", 1, None)
    c.feed("1-7", 7, (4, 7))  # 2..3 neither stored nor marked
    assert c.breaks == 1 and "gap marker 4..7 where id 2 was due" in c.first_break
    d = StreamCheck("k")
    d.feed("1-1", 1, None)
    d.feed("1-6", 6, (2, 7))  # a marker's seq is its last id
    assert d.breaks == 1


def test_a_marker_first_in_the_stream_starts_it() -> None:
    c = StreamCheck("k")
    c.feed("1-5", 5, (1, 5))
    c.feed("1-6", 6, None)
    assert c.breaks == 0 and c.next == 7 and c.marked == 5


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=60))
def test_property_any_sequence_passes_only_when_contiguous(seqs: list[int]) -> None:
    c = StreamCheck("k")
    for s in seqs:
        c.feed(f"1-{s}", s, None)
    contiguous = all(b == a + 1 for a, b in itertools.pairwise(seqs))
    assert (c.breaks == 0) == contiguous


# ------------------------------------------------------------------ consumers against what was stored


def test_merge_and_missing() -> None:
    assert merge_runs([(5, 6), (1, 2), (3, 3), (10, 12), (11, 11)]) == [(1, 3), (5, 6), (10, 12)]
    assert merge_runs([(5, 6), (1, 2), (3, 4)]) == [(1, 6)]
    stored = [(1, 10), (20, 29)]
    assert missing_from(stored, [(1, 10), (20, 29)], 100) == 0
    assert missing_from(stored, [(1, 4), (6, 10), (20, 25)], 100) == 1 + 4
    assert missing_from(stored, [(1, 4), (6, 10), (20, 25)], 25) == 1  # not yet due past upto
    assert missing_from(stored, [(0, 100)], 100) == 0
    assert missing_from(stored, [], 100) == 20


@given(
    st.lists(st.integers(min_value=0, max_value=200), max_size=80),
    st.lists(st.integers(min_value=0, max_value=200), max_size=80),
)
def test_property_missing_matches_sets(stored: list[int], seen: list[int]) -> None:
    assert missing_from([(s, s) for s in stored], [(s, s) for s in seen], 10**6) == len(set(stored) - set(seen))


# ------------------------------------------------------------------ growth


def test_slope() -> None:
    assert slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert slope([(0, 1)]) == 0.0
    assert slope([(1, 1), (1, 5)]) == 0.0


def test_flat_noisy_series_does_not_grow_and_a_leak_does() -> None:
    flat = [(float(t), 100.0 + (3.0 if t % 2 else -3.0)) for t in range(200)]
    assert not grows_without_bound(flat)
    # rose at start (warm-up), flat after: the second half decides
    warm = [(float(t), min(100.0, float(t))) for t in range(400)]
    assert not grows_without_bound(warm)
    leak = [(float(t), 100.0 + 0.2 * t) for t in range(200)]  # +20 over the second half of ~120
    assert grows_without_bound(leak)
    assert not grows_without_bound(leak, floor=50.0)  # a rise below the floor is not growth
    assert not grows_without_bound(leak[:6])  # too few points to tell


def test_recovery_summary() -> None:
    out = recovery_summary({"stall": [1.0, 3.0, 2.0], "refuse": [None, 4.0], "blackhole": [None]})
    assert out["stall"] == {"injected": 3, "recovered": 3, "median_s": 2.0, "worst_s": 3.0}
    assert out["refuse"] == {"injected": 2, "recovered": 1, "median_s": 4.0, "worst_s": 4.0}
    assert out["blackhole"] == {"injected": 1, "recovered": 0, "median_s": None, "worst_s": None}
