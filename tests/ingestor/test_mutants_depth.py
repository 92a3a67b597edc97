"""Book synchronization and snapshot pacing edges that mutation testing showed unchecked (docs/testing.md,
"Mutation testing").

The exact bounds of every id, time and setting; the error messages, which name the field and the value (they
end up in the logs, one line each); the ``detail`` of each resync; every counter of ``stats()`` across more than
one sync; the defaults of the public parameters; and the pacer's backoff, which a seeded generator makes
reproducible.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import pytest

from consumer_sdk.core.backoff import Backoff
from ingestor.depth import (
    RESYNC_REASONS,
    Action,
    DepthDiff,
    DepthRule,
    DepthSnapshot,
    DepthSync,
    DepthSyncStats,
    SnapshotPolicy,
    SyncState,
    parse_depth_snapshot,
    parse_depth_update,
    snapshot_phase_ms,
)
from ingestor.depth_pacer import SnapshotPacer, depth_weight
from ingestor.venue import MalformedFrame

INT64_MAX = (1 << 63) - 1
#: the latest venue time in ms the parsers accept (its µs still fit an int64)
MS_MAX = INT64_MAX // 1000

GOOD: dict[str, Any] = {
    "e": "depthUpdate", "E": 1626916403873, "T": 1626916403864, "s": "BCHUSD_PERP", "U": 167006084465,
    "u": 167006084895, "pu": 167006084238, "b": [["427.27", "0"], ["427.53", "260"]], "a": [["427.90", "669"]],
}
BODY: dict[str, Any] = {
    "lastUpdateId": 10, "symbol": "BCHUSD_PERP", "E": 5, "bids": [["1.5", "2"]], "asks": [["1.6", "3"]],
}
LONG = "x" * 50


def refused(data: dict[str, Any]) -> MalformedFrame:
    with pytest.raises(MalformedFrame) as info:
        parse_depth_update(data)
    return info.value


def refused_snapshot(body: dict[str, Any], symbol: str = "BCHUSD_PERP") -> MalformedFrame:
    with pytest.raises(MalformedFrame) as info:
        parse_depth_snapshot(body, symbol)
    return info.value


# ------------------------------------------------------------------------------------------------ ids and times


def test_ids_from_zero_to_int64_max_and_times_up_to_the_last_ms_are_accepted() -> None:
    zero = parse_depth_update({**GOOD, "U": 0, "u": 0, "pu": 0, "E": 0, "T": 0})
    assert (zero.first_id, zero.last_id, zero.prev_id, zero.event_ms, zero.transaction_ms) == (0, 0, 0, 0, 0)
    top = parse_depth_update({**GOOD, "U": INT64_MAX, "u": INT64_MAX, "pu": INT64_MAX, "E": MS_MAX, "T": MS_MAX})
    assert (top.first_id, top.last_id, top.prev_id, top.event_ms, top.transaction_ms) == (
        INT64_MAX, INT64_MAX, INT64_MAX, MS_MAX, MS_MAX
    )
    snap = parse_depth_snapshot({**BODY, "lastUpdateId": 0, "E": MS_MAX}, "BCHUSD_PERP")
    assert (snap.last_update_id, snap.event_ms) == (0, MS_MAX)
    assert parse_depth_snapshot({**BODY, "lastUpdateId": INT64_MAX}, "BCHUSD_PERP").last_update_id == INT64_MAX


@pytest.mark.parametrize("name", ["E", "T"])
def test_a_time_one_ms_past_the_last_is_refused_naming_the_limit(name: str) -> None:
    error = refused({**GOOD, name: MS_MAX + 1})
    assert error.kind == "bad_number"
    assert str(error) == f"expected a non-negative integer up to {MS_MAX}, got {MS_MAX + 1}"


def test_a_snapshot_time_one_ms_past_the_last_is_refused_naming_the_limit() -> None:
    error = refused_snapshot({**BODY, "E": MS_MAX + 1})
    assert error.kind == "bad_number"
    assert str(error) == f"expected a non-negative integer up to {MS_MAX}, got {MS_MAX + 1}"


@pytest.mark.parametrize(
    ("value", "kind", "shown"),
    [
        (-1, "bad_value", "-1"),
        (INT64_MAX + 1, "bad_number", str(INT64_MAX + 1)),
        ("7" * 50, "malformed", "7" * 40),  # the value is cut to 40 characters
        (1.5, "malformed", "1.5"),
    ],
)
def test_an_id_out_of_range_is_named_in_the_error(value: Any, kind: str, shown: str) -> None:
    error = refused({**GOOD, "u": value})
    assert error.kind == kind
    assert str(error) == f"expected a non-negative integer up to {INT64_MAX}, got {shown}"


def test_first_id_after_last_id_names_both() -> None:
    error = refused({**GOOD, "U": 167006084896})
    assert error.kind == "bad_value"
    assert str(error) == "first update id 167006084896 after the last 167006084895"


# ------------------------------------------------------------------------------------------------ other fields


def test_a_symbol_that_is_not_one_is_named_cut_to_40_characters() -> None:
    assert str(refused({**GOOD, "s": "A" * 65})) == f"expected a symbol, got {'A' * 40!r}"
    assert str(refused({**GOOD, "s": 7})) == "expected a symbol, got '7'"


def test_a_frame_that_is_not_an_object_or_another_event_says_so() -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_depth_update([0] * 20)  # type: ignore[arg-type]
    assert str(info.value) == f"expected an event object, got {'[' + '0, ' * 13}"
    assert str(refused({**GOOD, "e": "bookTicker"})) == "not a depthUpdate event: 'bookTicker'"
    assert str(refused({**GOOD, "e": LONG})) == f"not a depthUpdate event: {'x' * 40!r}"


@pytest.mark.parametrize("name", ["e", "U", "u", "s", "E", "b", "a"])
def test_a_missing_field_of_a_diff_is_named(name: str) -> None:
    error = refused({k: v for k, v in GOOD.items() if k != name})
    assert (error.kind, str(error)) == ("malformed", f"missing field {name!r}")


@pytest.mark.parametrize("name", ["lastUpdateId", "bids", "asks"])
def test_a_missing_field_of_a_snapshot_is_named(name: str) -> None:
    error = refused_snapshot({k: v for k, v in BODY.items() if k != name})
    assert (error.kind, str(error)) == ("malformed", f"missing field {name!r}")


def test_a_snapshot_of_another_symbol_names_both() -> None:
    assert str(refused_snapshot(BODY, "BTCUSD_PERP")) == "snapshot of 'BCHUSD_PERP', asked for 'BTCUSD_PERP'"
    assert str(refused_snapshot({**BODY, "symbol": "E" * 50})) == (
        f"snapshot of {'E' * 40!r}, asked for 'BCHUSD_PERP'"
    )


# ------------------------------------------------------------------------------------------------ levels


@pytest.mark.parametrize("side", ["bids", "asks"])
def test_a_side_that_is_not_a_list_of_pairs_is_named_in_the_error(side: str) -> None:
    key = side[0]
    assert str(refused({**GOOD, key: LONG})) == f"{side}: expected a list of levels, got {'x' * 40}"
    assert str(refused({**GOOD, key: [["1"] * 20]})) == (
        f"{side}: expected a [price, quantity] pair, got {str(['1'] * 20)[:40]}"
    )
    assert str(refused_snapshot({**BODY, side: LONG})) == f"{side}: expected a list of levels, got {'x' * 40}"
    assert str(refused_snapshot({**BODY, side: [["1.5"]]})) == f"{side}: expected a [price, quantity] pair, got ['1.5']"


@pytest.mark.parametrize(
    ("level", "kind", "message"),
    [
        ([1.5, "1"], "malformed", "expected a positive decimal string, got 1.5"),
        ([[0] * 20, "1"], "malformed", f"expected a positive decimal string, got {'[' + '0, ' * 13}"),
        (["1", 2], "malformed", "expected a non-negative decimal string, got 2"),
        (["0", "1"], "bad_value", "expected a positive decimal, got '0'"),
        (["-1.5", "1"], "bad_value", "expected a positive decimal, got '-1.5'"),
        (["1", "-1"], "bad_value", "expected a non-negative decimal, got '-1'"),
        (["1e5", "1"], "bad_number", "expected a positive plain decimal, got '1e5' (3 chars)"),
        (["1", "9" * 50], "bad_number", f"expected a non-negative plain decimal, got {'9' * 40!r} (50 chars)"),
    ],
)
def test_a_diffs_level_that_is_not_a_plain_decimal_pair_is_named_in_the_error(
    level: list[Any], kind: str, message: str
) -> None:
    """A diff's price is positive, its quantity non-negative (``"0"`` removes the level)."""
    for key in ("b", "a"):
        error = refused({**GOOD, key: [level]})
        assert (error.kind, str(error)) == (kind, message)


@pytest.mark.parametrize("side", ["bids", "asks"])
def test_a_snapshots_levels_are_all_positive(side: str) -> None:
    """A book holds no empty level: a snapshot's quantity ``"0"`` is refused on either side."""
    error = refused_snapshot({**BODY, side: [["1.5", "0"]]})
    assert (error.kind, str(error)) == ("bad_value", "expected a positive decimal, got '0'")
    error = refused_snapshot({**BODY, side: [["1.5", "-0.1"]]})
    assert (error.kind, str(error)) == ("bad_value", "expected a positive decimal, got '-0.1'")
    assert parse_depth_snapshot({**BODY, side: [["1.5", "0.001"]]}, "BCHUSD_PERP") is not None


# ------------------------------------------------------------------------------------------------ the procedure

SYMBOL = "BTCUSDT"


def d(first: int, last: int, prev: int | None = None, symbol: str = SYMBOL) -> DepthDiff:
    return DepthDiff(symbol, first, last, prev, 0, (("1", "1"),), ())


def snap(last_update_id: int, symbol: str = SYMBOL) -> DepthSnapshot:
    return DepthSnapshot(symbol, last_update_id, (("1", "1"),), (("2", "1"),))


def test_the_buffer_holds_1000_diffs_by_default() -> None:
    sync = DepthSync(SYMBOL)
    assert sync.max_buffer == 1000
    assert {sync.on_diff(d(i, i)).action for i in range(1, 1001)} == {Action.BUFFERED}
    decision = sync.on_diff(d(1001, 1001))
    assert (decision.action, decision.reason, decision.detail) == (Action.RESYNC, "buffer_overflow", "1000 diffs held")
    assert (sync.stats().buffered, sync.stats().overflowed) == (1000, 1)


def test_misuse_is_refused_naming_the_symbol_and_the_state() -> None:
    with pytest.raises(ValueError) as info:
        DepthSync(SYMBOL, max_buffer=0)
    assert str(info.value) == "max_buffer must be at least 1, got 0"
    assert DepthSync(SYMBOL, max_buffer=1).max_buffer == 1
    for okx in (DepthRule.OKX, "okx"):  # OKX books resync over the socket: a REST sync is refused, named
        with pytest.raises(ValueError) as info:
            DepthSync(SYMBOL, okx)
        assert str(info.value) == "DepthRule.OKX books are kept by ingestor.depth_ws.WsBookSync"
    sync = DepthSync(SYMBOL)
    with pytest.raises(ValueError) as info:
        sync.on_diff(d(1, 2, symbol="ETHUSDT"))
    assert str(info.value) == "a diff of ETHUSDT fed to the book of BTCUSDT"
    with pytest.raises(RuntimeError) as state:
        sync.request_snapshot()
    assert str(state.value) == "BTCUSDT: no snapshot wanted (buffering, outstanding None)"
    with pytest.raises(RuntimeError) as state:
        sync.on_crossed()
    assert str(state.value) == "BTCUSDT: crossed reported while no book is held"
    sync.on_diff(d(1, 2))
    request = sync.request_snapshot()
    with pytest.raises(RuntimeError) as state:
        sync.request_snapshot()
    assert str(state.value) == f"BTCUSDT: no snapshot wanted (buffering, outstanding {request})"
    with pytest.raises(ValueError) as info:
        sync.on_snapshot(request, snap(1, "ETHUSDT"))
    assert str(info.value) == "a snapshot of ETHUSDT given to the book of BTCUSDT"


def test_counters_add_up_across_two_syncs() -> None:
    """Every ``stats()`` field after a sync (loaded with a diff), a resync, and a second sync (loaded with none,
    then joined by a diff): each counter is the sum of both, not the last."""
    sync = DepthSync(SYMBOL)
    sync.on_diff(d(10, 12))
    sync.on_diff(d(12, 12))  # a repeat while buffering
    assert sync.on_snapshot(sync.request_snapshot(), snap(11)).action is Action.LOAD
    assert sync.on_diff(d(13, 13)).action is Action.APPLY
    assert sync.on_diff(d(13, 13)).reason == "duplicate"
    assert sync.on_diff(d(11, 12)).reason == "duplicate"
    assert sync.stats() == DepthSyncStats(
        SYMBOL, SyncState.LIVE, applied=2, dropped=3, overflowed=0, buffered=0, requests=1, loads=1, ignored=0,
        resyncs=dict.fromkeys(RESYNC_REASONS, 0),
    )
    sync.on_reconnect()
    sync.on_diff(d(20, 21))
    sync.on_diff(d(22, 25))
    assert sync.on_diff(d(24, 25)).reason == "duplicate"  # a repeat while buffering, with drops counted before
    assert sync.on_snapshot(sync.request_snapshot(), snap(25)).diffs == ()  # both in it: dropped, loaded alone
    assert sync.on_diff(d(24, 25)).reason == "stale"
    assert sync.on_diff(d(26, 27)).action is Action.APPLY  # joins the loaded snapshot
    assert sync.stats() == DepthSyncStats(
        SYMBOL, SyncState.LIVE, applied=3, dropped=7, overflowed=0, buffered=0, requests=2, loads=2, ignored=0,
        resyncs={**dict.fromkeys(RESYNC_REASONS, 0), "reconnect": 1},
    )
    sync.on_crossed()
    sync.on_diff(d(28, 29))
    sync.on_diff(d(30, 31))
    assert len(sync.on_snapshot(sync.request_snapshot(), snap(28)).diffs) == 2
    stats = sync.stats()
    assert (stats.applied, stats.loads, stats.requests, stats.dropped) == (5, 3, 3, 7)


def test_each_resync_says_where_it_broke() -> None:
    live = DepthSync(SYMBOL)
    live.on_diff(d(10, 12))
    live.on_snapshot(live.request_snapshot(), snap(11))
    live.on_diff(d(13, 13))
    gap = live.on_diff(d(15, 16))
    assert (gap.reason, gap.detail) == ("gap", "after 13: 15..16 pu=None")
    futures = DepthSync(SYMBOL, "futures")
    futures.on_diff(d(10, 12, 5))
    futures.on_snapshot(futures.request_snapshot(), snap(11))
    assert futures.on_diff(d(20, 21, 14)).detail == "after 12: 20..21 pu=14"

    loaded = DepthSync(SYMBOL)
    loaded.on_diff(d(10, 12))
    loaded.on_snapshot(loaded.request_snapshot(), snap(20))
    gap = loaded.on_diff(d(22, 23))
    assert (gap.reason, gap.detail) == ("gap", "snapshot 20, next diff 22..23")

    buffering = DepthSync(SYMBOL)
    buffering.on_diff(d(10, 12))
    gap = buffering.on_diff(d(14, 15))
    assert (gap.reason, gap.detail) == ("gap", "held up to 12, then 14")

    crossed = DepthSync(SYMBOL)
    crossed.on_diff(d(10, 12))
    crossed.on_snapshot(crossed.request_snapshot(), snap(11))
    decision = crossed.on_crossed()
    assert (decision.reason, decision.detail) == ("crossed", "at 12")
    decision = crossed.on_reconnect()
    assert (decision.reason, decision.detail, decision.void_book) == ("reconnect", "", False)


def test_a_stale_snapshot_says_why() -> None:
    older = DepthSync(SYMBOL)
    older.on_diff(d(10, 12))
    decision = older.on_snapshot(older.request_snapshot(), snap(8))
    assert (decision.reason, decision.detail) == ("stale_snapshot", "snapshot 8, first diff held 10")

    emptied = DepthSync(SYMBOL)
    emptied.on_diff(d(10, 12))
    request = emptied.request_snapshot()
    emptied.on_reconnect()
    decision = emptied.on_snapshot(request, snap(12))
    assert (decision.reason, decision.detail) == ("stale_snapshot", "snapshot 12, no diff held")


def test_after_a_restart_the_next_overflow_is_counted_again() -> None:
    """A reconnect starts a new run: its first overflow is a resync of its own, with no request in between."""
    sync = DepthSync(SYMBOL, max_buffer=2)
    for i in range(1, 4):
        sync.on_diff(d(i, i))
    sync.on_reconnect()
    actions = [sync.on_diff(d(i, i)) for i in range(10, 14)]
    assert [a.action for a in actions] == [Action.BUFFERED] * 2 + [Action.RESYNC, Action.BUFFERED]
    assert actions[2].reason == "buffer_overflow"
    stats = sync.stats()
    assert (stats.overflowed, stats.resyncs["buffer_overflow"], stats.resyncs["reconnect"]) == (3, 2, 1)


# ------------------------------------------------------------------------------------------------ stored snapshots


def test_snapshot_policy_takes_its_smallest_settings_and_names_a_bad_one() -> None:
    # the phase shifts the period's boundaries: due when (event + phase) crosses one, not event itself
    minute = SnapshotPolicy(every_s=60)
    assert minute.due(0, 59_000, 60_000) and not minute.due(0, 59_000, 60_000, phase_ms=1_000)
    assert minute.due(0, 59_000, 59_000 + 1, phase_ms=999) and not minute.due(0, 59_000, 59_000, phase_ms=999)
    assert not minute.due(0, 0, 29_999, phase_ms=30_000) and minute.due(0, 0, 30_000, phase_ms=30_000)
    assert minute.phase_ms("BTCUSDT") == snapshot_phase_ms("BTCUSDT", 60_000) == zlib.crc32(b"BTCUSDT") % 60_000
    assert SnapshotPolicy(every_updates=5).phase_ms("BTCUSDT") == 0
    assert SnapshotPolicy(every_s=1).phase_ms("ETHUSDT") == zlib.crc32(b"ETHUSDT") % 1000
    assert snapshot_phase_ms("BTCUSDT", 0) == 0 and snapshot_phase_ms("BTCUSDT", 1) == 0
    # spread: 100 symbols of a connection fall in many different seconds of the minute, the same in every process
    phases = {snapshot_phase_ms(f"S{i:03d}USDT", 60_000) // 1000 for i in range(100)}
    assert len(phases) > 40
    every = SnapshotPolicy(every_updates=1)
    assert not every.due(0, 0, 0) and every.due(1, 0, 0)
    per_ms = SnapshotPolicy(every_s=0.001)
    assert not per_ms.due(0, 5, 5) and per_ms.due(0, 5, 6)
    with pytest.raises(ValueError) as info:
        SnapshotPolicy(every_updates=0)
    assert str(info.value) == "every_updates must be at least 1, got 0"
    with pytest.raises(ValueError) as info:
        SnapshotPolicy(every_s=0.0009)
    assert str(info.value) == "every_s must be at least 0.001 (a millisecond), got 0.0009"


def test_snapshot_policy_is_exact_for_every_time_the_parser_accepts() -> None:
    """Past 2**53 ms a float no longer holds every integer: the boundary is found in integers, to the ms."""
    per_ms = SnapshotPolicy(every_s=0.001)
    last = (1 << 53) + 3  # as a float, rounded up to 2**53 + 4
    assert per_ms.due(0, last, last + 1)
    assert not per_ms.due(0, last, last)
    assert per_ms.due(0, MS_MAX - 1, MS_MAX)


# ------------------------------------------------------------------------------------------------ pacing


def test_a_depth_limit_the_venue_refuses_is_named_with_what_it_takes() -> None:
    with pytest.raises(ValueError) as info:
        depth_weight(7, "futures")
    assert str(info.value) == "futures depth limit must be one of [5, 10, 20, 50, 100, 500, 1000], got 7"
    for limit in (0, 5001):
        with pytest.raises(ValueError) as info:
            depth_weight(limit)
        assert str(info.value) == f"spot depth limit must be 1 to 5000, got {limit}"


def test_bad_settings_are_named() -> None:
    for share in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError) as info:
            SnapshotPacer(share=share)
        assert str(info.value) == f"share must be in (0, 1], got {share}"
    for bad, message in [
        ({"weight_per_minute": 1, "share": 0.5}, "no budget: 1 x 0.5 per 60.0 s"),
        ({"window_s": 0.0}, "no budget: 6000 x 0.5 per 0.0 s"),
    ]:
        with pytest.raises(ValueError) as info:
            SnapshotPacer(**bad)  # type: ignore[arg-type]
        assert str(info.value) == message


def test_the_smallest_budget_and_a_window_under_a_second_work() -> None:
    one = SnapshotPacer(weight_per_minute=2, share=0.5)
    assert one.budget == 1
    assert one.acquire(0.0, 1) and one.next_allowed(0.0, 1) == 60.0
    short = SnapshotPacer(window_s=0.5)
    assert short.acquire(0.0, 3000) and short.next_allowed(0.0, 5) == 0.5


def test_a_weight_from_1_to_the_whole_budget_is_accepted_and_others_named() -> None:
    pacer = SnapshotPacer(weight_per_minute=400, share=0.5)
    assert pacer.next_allowed(3.0, 1) == 3.0 and pacer.next_allowed(3.0, 200) == 3.0
    assert pacer.acquire(3.0, 200) and pacer.next_allowed(3.0, 1) == 63.0
    for weight in (0, 201):
        with pytest.raises(ValueError) as info:
            pacer.next_allowed(3.0, weight)
        assert str(info.value) == f"weight {weight} outside 1..200 (the budget per window)"


def test_the_default_waits_after_a_429_and_a_418() -> None:
    assert SnapshotPacer().on_failure(SYMBOL, 5.0, status=429) == 65.0
    assert SnapshotPacer().on_failure(SYMBOL, 5.0, status=418) == 125.0


def test_the_default_backoff_goes_from_1_to_60_seconds() -> None:
    pacer = SnapshotPacer()
    waits = [pacer.on_failure(SYMBOL, 0.0) for _ in range(9)]
    ceilings = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True)), waits


def test_the_backoff_is_the_shared_schedule_drawn_from_the_generator_given() -> None:
    """Seeded, a pacer's waits are reproducible: the same as :class:`Backoff` with the pacer's settings and the
    same seed, and as another pacer's with that seed."""
    reference = Backoff(base=1.0, cap=60.0, rng=random.Random(7), floor=0.5)
    expected = [reference.next_delay() for _ in range(9)]
    for _ in range(2):
        pacer = SnapshotPacer(rng=random.Random(7))
        assert [pacer.on_failure(SYMBOL, 0.0) for _ in range(9)] == expected
    other = Backoff(base=0.25, cap=3.0, rng=random.Random(7), floor=0.5)
    pacer = SnapshotPacer(backoff_base=0.25, backoff_cap=3.0, rng=random.Random(7))
    assert [pacer.on_failure(SYMBOL, 0.0) for _ in range(6)] == [other.next_delay() for _ in range(6)]


def test_a_symbol_whose_backoff_ended_may_go_at_once() -> None:
    pacer = SnapshotPacer(rng=random.Random(1))
    retry = pacer.on_failure(SYMBOL, 0.0)
    assert retry <= 1.0
    assert pacer.next_allowed(10.0, 5, SYMBOL) == 10.0 and pacer.acquire(10.0, 5, SYMBOL)


def test_a_429_while_a_symbol_backs_off_keeps_the_later_of_the_two() -> None:
    pacer = SnapshotPacer()
    assert pacer.on_failure(SYMBOL, 0.0, status=503, retry_after=100.0) == 100.0
    assert pacer.on_failure(SYMBOL, 1.0, status=429, retry_after=10.0) == 100.0
    assert pacer.on_failure("ETHUSDT", 1.0, status=429, retry_after=10.0) == 11.0


def test_a_grant_leaving_the_window_at_that_moment_frees_nothing_more() -> None:
    """At 60 s the grant of 0 s has left the window (it is not counted), so only the grant of 30 s can make room."""
    pacer = SnapshotPacer()  # 3000 a minute
    assert pacer.acquire(0.0, 250) and pacer.acquire(30.0, 2750)
    assert pacer.next_allowed(60.0, 300) == 90.0
    assert pacer.next_allowed(60.0, 250) == 60.0


def test_stats_count_grants_failures_and_what_is_spent_to_the_instant() -> None:
    pacer = SnapshotPacer(rng=random.Random(2))
    assert pacer.acquire(0.0, 250, SYMBOL) and pacer.acquire(10.0, 50)
    assert not pacer.acquire(10.0, 2800)
    assert pacer.stats(10.0).spent == 300
    assert pacer.stats(59.999).spent == 300 and pacer.stats(60.0).spent == 50 and pacer.stats(70.0).spent == 0
    for symbol, wait in ((SYMBOL, 30.0), ("ETHUSDT", 40.0), (SYMBOL, 30.0)):
        assert pacer.on_failure(symbol, 20.0, status=503, retry_after=wait) == 20.0 + wait
    pacer.on_failure("XRPUSDT", 20.0, status=429, retry_after=1.0)
    stats = pacer.stats(20.0)
    assert (stats.budget, stats.granted, stats.failures, stats.rate_limited, stats.backing_off) == (3000, 2, 3, 1, 2)
    assert [pacer.stats(t).backing_off for t in (49.999, 50.0, 59.999, 60.0)] == [2, 1, 1, 0]


def test_a_backoff_ends_at_the_time_given() -> None:
    """The instant a symbol may go again it is no longer counted backing off."""
    pacer = SnapshotPacer()
    retry = pacer.on_failure(SYMBOL, 0.0, retry_after=30.0)
    assert retry == 30.0
    assert pacer.stats(29.999).backing_off == 1 and pacer.stats(30.0).backing_off == 0
    assert pacer.next_allowed(29.0, 5, SYMBOL) == 30.0


def test_success_of_a_symbol_that_never_failed_is_nothing_to_reset() -> None:
    pacer = SnapshotPacer()
    pacer.on_success(SYMBOL)
    pacer.on_failure(SYMBOL, 0.0, status=429)  # halts every symbol; no backoff of its own
    pacer.on_success(SYMBOL)
    assert pacer.stats(0.0).backing_off == 0 and pacer.next_allowed(0.0, 5, SYMBOL) == 60.0
