"""ingestor.depth and ingestor.depth_pacer: Binance's book procedure, on the venue's own recorded sequences and by hand.

The real captures (``tests/fixtures/binance-*.jsonl`` with the REST snapshots recorded beside them in
``*.depth.jsonl``) are replayed in the order they were received, each snapshot given at the time it arrived.  What
must be applied is derived here from the raw frames with Binance's documented rules, never read back from the
module; a book kept by this test (a dict of levels) is checked against the venue's own ``bookTicker`` wherever one
carries the update id a diff ended at, so a wrong choice of diffs shows as a wrong best bid or ask.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingestor.depth import (
    RESYNC_REASONS,
    Action,
    Decision,
    DepthDiff,
    DepthRule,
    DepthSnapshot,
    DepthSync,
    SnapshotPolicy,
    SyncState,
    parse_depth_snapshot,
    parse_depth_update,
)
from ingestor.depth_pacer import SnapshotPacer, depth_weight
from ingestor.venue import MalformedFrame

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPOT = FIXTURES / "binance-spot-2021-10-12.jsonl"
COINM = FIXTURES / "binance-coinm-2021-07-22.jsonl"
CAPTURES = {"spot": (SPOT, DepthRule.SPOT), "coinm": (COINM, DepthRule.FUTURES)}

# ------------------------------------------------------------------------------------------------ the captures


def frames(path: Path) -> list[tuple[float, dict[str, Any]]]:
    """``(recv_ts, data)`` of every frame of a capture, combined-stream wrapper removed."""
    out = []
    for line in path.read_text().splitlines():
        rec = orjson.loads(line)
        obj = orjson.loads(rec["frame"])
        out.append((rec["recv_ts"], obj.get("data", obj)))
    return out


def snapshots(path: Path) -> list[tuple[float, str, dict[str, Any]]]:
    """``(recv_ts, symbol, body)`` of every REST reply recorded beside a capture."""
    out = []
    for line in path.with_suffix(".depth.jsonl").read_text().splitlines():
        rec = orjson.loads(line)
        symbol = rec["url"].split("symbol=")[1].split("&")[0]
        out.append((rec["recv_ts"], symbol, orjson.loads(rec["body"])))
    return out


def is_ticker(data: dict[str, Any]) -> bool:
    return data.get("e") in (None, "bookTicker") and "u" in data and "b" in data


class Book:
    """The smallest book that shows whether the right diffs were applied: levels by price, zero removes."""

    def __init__(self, snapshot: DepthSnapshot) -> None:
        self.bids = {Decimal(p): Decimal(q) for p, q in snapshot.bids}
        self.asks = {Decimal(p): Decimal(q) for p, q in snapshot.asks}

    def apply(self, diff: DepthDiff) -> None:
        for side, levels in ((self.bids, diff.bids), (self.asks, diff.asks)):
            for p, q in levels:
                price, qty = Decimal(p), Decimal(q)
                if qty:
                    side[price] = qty
                else:
                    side.pop(price, None)

    def best(self) -> tuple[Decimal, Decimal, Decimal, Decimal]:
        bid, ask = max(self.bids), min(self.asks)
        return bid, self.bids[bid], ask, self.asks[ask]

    def crossed(self) -> bool:
        return max(self.bids) >= min(self.asks)


@dataclass
class Replay:
    """What a replay of a capture did, per symbol."""

    syncs: dict[str, DepthSync] = field(default_factory=dict)
    applied: dict[str, list[DepthDiff]] = field(default_factory=lambda: defaultdict(list))
    resyncs: dict[str, list[Decision]] = field(default_factory=lambda: defaultdict(list))
    ticker_checks: Counter[str] = field(default_factory=Counter)


def replay(path: Path, rule: DepthRule, skip: Iterable[tuple[str, int]] = ()) -> Replay:
    """Feed a capture's diffs in recorded order, each snapshot at the time it was received; ``skip`` names
    diffs (symbol, ``U``) to leave out.  Books are kept and checked against the venue's book tickers."""
    left_out = set(skip)
    events: list[tuple[float, int, str, Any]] = []
    #: the venue's best bid and ask as of an update id, whenever the book ticker came
    tickers: dict[tuple[str, int], tuple[Decimal, ...]] = {}
    for n, (ts, data) in enumerate(frames(path)):
        if data.get("e") == "depthUpdate":
            diff = parse_depth_update(data)
            if (diff.symbol, diff.first_id) not in left_out:
                events.append((ts, n, "diff", diff))
        elif is_ticker(data):
            tickers[data["s"], data["u"]] = tuple(Decimal(data[k]) for k in ("b", "B", "a", "A"))
    for ts, symbol, body in snapshots(path):
        events.append((ts, -1, "snapshot", parse_depth_snapshot(body, symbol)))
    events.sort(key=lambda e: (e[0], e[1]))

    out = Replay()
    requests: dict[str, int] = {}
    books: dict[str, Book] = {}

    def handle(sync: DepthSync, decision: Decision) -> None:
        symbol = sync.symbol
        if decision.action is Action.RESYNC:
            out.resyncs[symbol].append(decision)
            if decision.void_book:
                del books[symbol]
            return
        if decision.action is Action.LOAD:
            assert decision.snapshot is not None
            books[symbol] = Book(decision.snapshot)
        for diff in decision.diffs:
            books[symbol].apply(diff)
            out.applied[symbol].append(diff)
            venue = tickers.get((symbol, diff.last_id))
            if venue is not None:
                assert books[symbol].best() == venue, (symbol, diff.last_id)
                out.ticker_checks[symbol] += 1
            if books[symbol].crossed():
                handle(sync, sync.on_crossed())
                return

    for _, _, kind, item in events:
        if kind == "diff":
            sync = out.syncs.get(item.symbol)
            if sync is None:
                sync = out.syncs[item.symbol] = DepthSync(item.symbol, rule)
            handle(sync, sync.on_diff(item))
            if sync.wants_snapshot:
                requests[sync.symbol] = sync.request_snapshot()
        else:
            sync = out.syncs[item.symbol]
            handle(sync, sync.on_snapshot(requests.pop(item.symbol), item))
    return out


def expected_applied(path: Path, rule: DepthRule) -> dict[str, list[tuple[int, int]]]:
    """Per symbol, the ``(U, u)`` of every recorded diff Binance's rules apply after the recorded snapshot."""
    diffs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, data in frames(path):
        if data.get("e") == "depthUpdate":
            diffs[data["s"]].append(data)
    out = {}
    for _, symbol, body in snapshots(path):
        last = body["lastUpdateId"]
        if rule is DepthRule.SPOT:
            kept = [d for d in diffs[symbol] if d["u"] > last]
            assert kept[0]["U"] <= last + 1 <= kept[0]["u"]
            assert all(b["U"] == a["u"] + 1 for a, b in pairwise(kept))
        else:
            kept = [d for d in diffs[symbol] if d["u"] >= last]
            assert kept[0]["U"] <= last <= kept[0]["u"]
            assert all(b["pu"] == a["u"] for a, b in pairwise(kept))
        out[symbol] = [(d["U"], d["u"]) for d in kept]
    return out


@pytest.mark.parametrize("capture", sorted(CAPTURES))
def test_a_continuous_capture_syncs_once_and_applies_every_diff_after_the_snapshot_once_in_order(capture: str) -> None:
    path, rule = CAPTURES[capture]
    expected = expected_applied(path, rule)
    run = replay(path, rule)
    assert sorted(run.syncs) == sorted(expected)
    for symbol, sync in run.syncs.items():
        assert [(d.first_id, d.last_id) for d in run.applied[symbol]] == expected[symbol], symbol
        assert run.resyncs[symbol] == [], symbol
        stats = sync.stats()
        assert stats.resyncs == dict.fromkeys(RESYNC_REASONS, 0)
        assert (stats.state, stats.requests, stats.loads, stats.applied) == (
            SyncState.LIVE, 1, 1, len(expected[symbol])
        )
    # the venue's own best bid and ask, wherever a book ticker names an update id a diff ended at
    assert sum(run.ticker_checks.values()) >= 20
    assert len(run.ticker_checks) >= 3


@pytest.mark.parametrize("capture", sorted(CAPTURES))
def test_one_diff_missing_after_sync_is_one_gap_for_that_symbol_only(capture: str) -> None:
    path, rule = CAPTURES[capture]
    full = replay(path, rule)
    symbol = max(full.applied, key=lambda s: len(full.applied[s]))
    missing = full.applied[symbol][3]
    run = replay(path, rule, skip=[(symbol, missing.first_id)])
    [resync] = run.resyncs[symbol]
    assert (resync.reason, resync.void_book) == ("gap", True)
    assert run.applied[symbol] == full.applied[symbol][:3]
    stats = run.syncs[symbol].stats()
    assert stats.resyncs == {**dict.fromkeys(RESYNC_REASONS, 0), "gap": 1}
    # it asked for a new snapshot at once, holding every diff since the break: the capture has none to give
    assert stats.state is SyncState.BUFFERING and stats.requests == 2 and run.syncs[symbol].outstanding == 2
    assert stats.buffered == len(full.applied[symbol]) - 4
    for other in full.applied:
        if other != symbol:
            assert run.applied[other] == full.applied[other] and run.resyncs[other] == [], other


def test_every_recorded_depth_frame_parses_to_its_raw_fields() -> None:
    seen = Counter[str]()
    for path in (SPOT, COINM):
        for _, data in frames(path):
            if data.get("e") != "depthUpdate":
                continue
            diff = parse_depth_update(data)
            assert (diff.symbol, diff.first_id, diff.last_id, diff.prev_id, diff.event_ms, diff.transaction_ms) == (
                data["s"], data["U"], data["u"], data.get("pu"), data["E"], data.get("T")
            )
            assert diff.bids == tuple(tuple(level) for level in data["b"])
            assert diff.asks == tuple(tuple(level) for level in data["a"])
            seen[path.name] += 1
    assert seen == {SPOT.name: 177, COINM.name: 2047}  # the fixtures' README table
    for path in (SPOT, COINM):
        for _, symbol, body in snapshots(path):
            snap = parse_depth_snapshot(body, symbol)
            assert (snap.symbol, snap.last_update_id, snap.event_ms) == (symbol, body["lastUpdateId"], body.get("E"))
            assert snap.bids == tuple(tuple(level) for level in body["bids"]) and len(snap.asks) == len(body["asks"])


# ------------------------------------------------------------------------------------------------ refusals

GOOD: dict[str, Any] = {
    "e": "depthUpdate", "E": 1626916403873, "T": 1626916403864, "s": "BCHUSD_PERP", "U": 167006084465,
    "u": 167006084895, "pu": 167006084238, "b": [["427.27", "0"], ["427.53", "260"]], "a": [["427.90", "669"]],
}


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        ({"e": "bookTicker"}, "malformed"),
        ({"U": None}, "malformed"),
        ({"u": "167006084895"}, "malformed"),
        ({"U": 167006084896}, "bad_value"),  # U after u
        ({"U": -1}, "bad_value"),
        ({"pu": -5}, "bad_value"),
        ({"pu": 1.5}, "malformed"),
        ({"u": 1 << 63}, "bad_number"),
        ({"u": 1e30}, "bad_number"),
        ({"E": -1}, "bad_value"),
        ({"E": (1 << 63) // 1000 + 1}, "bad_number"),
        ({"T": "now"}, "malformed"),
        ({"s": ""}, "malformed"),
        ({"s": "BTC USDT"}, "malformed"),
        ({"s": 7}, "malformed"),
        ({"b": {"427.27": "0"}}, "malformed"),
        ({"b": [["427.27"]]}, "malformed"),
        ({"b": [["427.27", "1", "2"]]}, "malformed"),
        ({"b": ["427.27"]}, "malformed"),
        ({"a": [[427.9, "669"]]}, "malformed"),
        ({"a": [["0", "669"]]}, "bad_value"),
        ({"a": [["-427.9", "669"]]}, "bad_value"),
        ({"a": [["427.90", "-1"]]}, "bad_value"),
        ({"a": [["NaN", "669"]]}, "bad_number"),
        ({"a": [["1e5", "669"]]}, "bad_number"),
        ({"a": [["427.90", "9" * 21]]}, "bad_number"),
    ],
)
def test_malformed_depth_frames_are_refused_with_their_kind(change: dict[str, Any], kind: str) -> None:
    with pytest.raises(MalformedFrame) as refused:
        parse_depth_update({**GOOD, **change})
    assert refused.value.kind == kind


@pytest.mark.parametrize("name", ["e", "E", "s", "U", "u", "b", "a"])
def test_a_depth_frame_missing_a_required_field_is_malformed(name: str) -> None:
    data = {k: v for k, v in GOOD.items() if k != name}
    with pytest.raises(MalformedFrame) as refused:
        parse_depth_update(data)
    assert refused.value.kind == "malformed"


def test_optional_fields_and_a_non_object() -> None:
    spot = parse_depth_update({k: v for k, v in GOOD.items() if k not in ("pu", "T")})
    assert (spot.prev_id, spot.transaction_ms) == (None, None)
    with pytest.raises(MalformedFrame) as refused:
        parse_depth_update(["depthUpdate"])  # type: ignore[arg-type]
    assert refused.value.kind == "malformed"


def test_snapshot_replies_are_checked() -> None:
    body: dict[str, Any] = {
        "lastUpdateId": 10, "symbol": "BTCUSD_PERP", "E": 5, "bids": [["1.5", "2"]], "asks": [["1.6", "3"]]
    }
    changes: list[tuple[dict[str, Any], str]] = [
        ({"symbol": "ETHUSD_PERP"}, "malformed"),  # another symbol's book
        ({"bids": [["1.5", "0"]]}, "bad_value"),  # a book holds no empty level
        ({"lastUpdateId": -1}, "bad_value"),
        ({"lastUpdateId": "10"}, "malformed"),
        ({"asks": None}, "malformed"),
    ]
    assert parse_depth_snapshot(body, "BTCUSD_PERP").last_update_id == 10
    for change, kind in changes:
        with pytest.raises(MalformedFrame) as refused:
            parse_depth_snapshot({**body, **change}, "BTCUSD_PERP")
        assert refused.value.kind == kind, change
    with pytest.raises(MalformedFrame):
        parse_depth_snapshot({"bids": [], "asks": []}, "BTCUSDT")


# ------------------------------------------------------------------------------------------------ the rules by hand

SYMBOL = "BTCUSDT"


def d(first: int, last: int, prev: int | None = None, symbol: str = SYMBOL) -> DepthDiff:
    return DepthDiff(symbol, first, last, prev, 0, (("1", "1"),), ())


def snap(last_update_id: int, symbol: str = SYMBOL) -> DepthSnapshot:
    return DepthSnapshot(symbol, last_update_id, (("1", "1"),), (("2", "1"),))


def ids(decision: Decision) -> list[tuple[int, int]]:
    return [(x.first_id, x.last_id) for x in decision.diffs]


def resyncs(sync: DepthSync) -> dict[str, int]:
    return {k: v for k, v in sync.stats().resyncs.items() if v}


def test_no_snapshot_is_wanted_before_a_diff_is_held() -> None:
    sync = DepthSync(SYMBOL)
    assert not sync.wants_snapshot and sync.last_update_id is None and not sync.synced
    with pytest.raises(RuntimeError):
        sync.request_snapshot()
    assert sync.on_diff(d(10, 12)).action is Action.BUFFERED
    assert sync.wants_snapshot
    first = sync.request_snapshot()
    assert not sync.wants_snapshot and sync.outstanding == first
    with pytest.raises(RuntimeError):
        sync.request_snapshot()


@pytest.mark.parametrize(
    ("snapshot_id", "loaded"),
    [
        (9, [(10, 12), (13, 15)]),  # L + 1 == U: the first diff joins
        (10, [(10, 12), (13, 15)]),
        (11, [(10, 12), (13, 15)]),  # straddles
        (12, [(13, 15)]),  # L == u: dropped, the next joins at its first id
        (14, [(13, 15)]),
    ],
)
def test_spot_first_diff_straddles_the_snapshot(snapshot_id: int, loaded: list[tuple[int, int]]) -> None:
    sync = DepthSync(SYMBOL, "spot")
    sync.on_diff(d(10, 12))
    sync.on_diff(d(13, 15))
    decision = sync.on_snapshot(sync.request_snapshot(), snap(snapshot_id))
    assert decision.action is Action.LOAD and decision.snapshot == snap(snapshot_id)
    assert ids(decision) == loaded
    assert (sync.state, sync.last_update_id) == (SyncState.LIVE, 15)
    assert sync.on_diff(d(16, 16)).diffs == (d(16, 16),)


@pytest.mark.parametrize(
    ("snapshot_id", "loaded"),
    [
        (10, [(10, 12), (15, 18)]),  # L == U
        (12, [(10, 12), (15, 18)]),  # L == u: kept (futures drop only u < L)
        (13, [(15, 18)]),  # between the symbol's events: dropped; the next has U > L and does not join
        (15, [(15, 18)]),
    ],
)
def test_futures_first_diff_straddles_the_snapshot(snapshot_id: int, loaded: list[tuple[int, int]]) -> None:
    sync = DepthSync(SYMBOL, "futures")
    sync.on_diff(d(10, 12, 7))
    sync.on_diff(d(15, 18, 12))
    decision = sync.on_snapshot(sync.request_snapshot(), snap(snapshot_id))
    if snapshot_id == 13:
        assert (decision.action, decision.reason, decision.void_book) == (Action.RESYNC, "stale_snapshot", False)
        assert resyncs(sync) == {"stale_snapshot": 1} and sync.wants_snapshot
        return
    assert decision.action is Action.LOAD and ids(decision) == loaded
    assert sync.on_diff(d(20, 21, 18)).action is Action.APPLY
    assert sync.on_diff(d(25, 26, 19)).reason == "gap"  # pu is not the previous u


@pytest.mark.parametrize(("rule", "older"), [("spot", 8), ("futures", 9)])
def test_a_snapshot_older_than_every_held_diff_is_asked_for_again(rule: str, older: int) -> None:
    sync = DepthSync(SYMBOL, rule)
    sync.on_diff(d(10, 12, 5))
    sync.on_diff(d(13, 14, 12))
    decision = sync.on_snapshot(sync.request_snapshot(), snap(older))
    assert (decision.action, decision.reason, decision.void_book) == (Action.RESYNC, "stale_snapshot", False)
    assert sync.state is SyncState.BUFFERING and sync.stats().buffered == 2 and sync.wants_snapshot
    second = sync.request_snapshot()
    assert ids(sync.on_snapshot(second, snap(11))) == [(10, 12), (13, 14)]
    stats = sync.stats()
    assert (stats.requests, stats.loads, stats.applied) == (2, 1, 2)
    assert resyncs(sync) == {"stale_snapshot": 1}


@pytest.mark.parametrize("rule", ["spot", "futures"])
def test_a_snapshot_newer_than_every_held_diff_drops_them_and_waits_for_the_one_that_joins(rule: str) -> None:
    spot = rule == "spot"
    sync = DepthSync(SYMBOL, rule)
    sync.on_diff(d(10, 12, 5))
    sync.on_diff(d(13, 14, 12))
    decision = sync.on_snapshot(sync.request_snapshot(), snap(20))
    assert decision.action is Action.LOAD and decision.diffs == ()
    assert (sync.state, sync.last_update_id, sync.synced) == (SyncState.LOADED, 20, True)
    assert sync.on_diff(d(15, 19, 14)).reason == "stale"
    boundary = d(20, 20, 19)  # u == L: in a spot snapshot; the joining event of a futures one
    assert sync.on_diff(boundary).action is (Action.DROPPED if spot else Action.APPLY)
    joining = d(21, 23, 20)
    assert sync.on_diff(joining).diffs == (joining,)
    assert sync.state is SyncState.LIVE and sync.stats().dropped == (4 if spot else 3)


@pytest.mark.parametrize("rule", ["spot", "futures"])
def test_a_diff_past_a_loaded_snapshot_is_a_gap(rule: str) -> None:
    sync = DepthSync(SYMBOL, rule)
    sync.on_diff(d(10, 12, 5))
    sync.on_snapshot(sync.request_snapshot(), snap(20))
    decision = sync.on_diff(d(22, 23, 21))  # neither 21 (spot) nor 20 (futures) is in it
    assert (decision.action, decision.reason, decision.void_book) == (Action.RESYNC, "gap", True)
    assert sync.state is SyncState.BUFFERING and sync.stats().buffered == 1 and sync.wants_snapshot


@pytest.mark.parametrize("rule", ["spot", "futures"])
def test_a_gap_while_live_holds_the_diff_that_showed_it_and_wants_a_snapshot(rule: str) -> None:
    sync = DepthSync(SYMBOL, rule)
    sync.on_diff(d(10, 12, 5))
    sync.on_snapshot(sync.request_snapshot(), snap(11))
    assert sync.on_diff(d(13, 13, 12)).action is Action.APPLY
    assert sync.on_diff(d(13, 13, 12)).reason == "duplicate"
    assert sync.on_diff(d(11, 12, 9)).reason == "duplicate"
    decision = sync.on_diff(d(15, 16, 14))
    assert (decision.action, decision.reason, decision.void_book) == (Action.RESYNC, "gap", True)
    assert sync.last_update_id is None and sync.wants_snapshot
    assert ids(sync.on_snapshot(sync.request_snapshot(), snap(15))) == [(15, 16)]
    assert resyncs(sync) == {"gap": 1}


def test_a_break_inside_the_buffer_keeps_only_what_follows_it() -> None:
    sync = DepthSync(SYMBOL)
    sync.on_diff(d(10, 12))
    request = sync.request_snapshot()
    assert sync.on_diff(d(12, 12)).reason == "duplicate"
    decision = sync.on_diff(d(14, 15))
    assert (decision.action, decision.reason, decision.void_book) == (Action.RESYNC, "gap", False)
    assert sync.stats().buffered == 1 and sync.outstanding == request  # the request stands: judged by its ids
    assert ids(sync.on_snapshot(request, snap(13))) == [(14, 15)]


def test_buffer_overflow_keeps_the_newest_and_counts_once_per_request() -> None:
    sync = DepthSync(SYMBOL, max_buffer=3)
    actions = [sync.on_diff(d(i, i)) for i in range(10, 16)]
    assert [a.action for a in actions] == [Action.BUFFERED] * 3 + [Action.RESYNC] + [Action.BUFFERED] * 2
    assert (actions[3].reason, actions[3].void_book) == ("buffer_overflow", False)
    stats = sync.stats()
    assert (stats.buffered, stats.overflowed, resyncs(sync)) == (3, 3, {"buffer_overflow": 1})
    request = sync.request_snapshot()
    assert sync.on_diff(d(16, 16)).reason == "buffer_overflow"  # a new request, a new count
    # a snapshot that joins only the diffs discarded is too old for what is held
    assert sync.on_snapshot(request, snap(11)).reason == "stale_snapshot"
    assert ids(sync.on_snapshot(sync.request_snapshot(), snap(13))) == [(14, 14), (15, 15), (16, 16)]
    assert resyncs(sync) == {"buffer_overflow": 2, "stale_snapshot": 1}
    with pytest.raises(ValueError):
        DepthSync(SYMBOL, max_buffer=0)


def test_a_reconnect_voids_a_held_book_and_drops_what_was_held() -> None:
    sync = DepthSync(SYMBOL)
    sync.on_diff(d(10, 12))
    request = sync.request_snapshot()
    buffering = sync.on_reconnect()
    assert (buffering.action, buffering.reason, buffering.void_book) == (Action.RESYNC, "reconnect", False)
    assert sync.stats().buffered == 0 and sync.outstanding == request
    # the reply to the request made before: nothing held since, so nothing shows it joins
    assert sync.on_snapshot(request, snap(12)).reason == "stale_snapshot"
    assert not sync.wants_snapshot
    sync.on_diff(d(20, 21))
    sync.on_snapshot(sync.request_snapshot(), snap(20))
    live = sync.on_reconnect()
    assert (live.action, live.reason, live.void_book) == (Action.RESYNC, "reconnect", True)
    assert (sync.state, sync.last_update_id, sync.wants_snapshot) == (SyncState.BUFFERING, None, False)
    assert resyncs(sync) == {"reconnect": 2, "stale_snapshot": 1}


def test_crossed_voids_the_book() -> None:
    sync = DepthSync(SYMBOL)
    with pytest.raises(RuntimeError):
        sync.on_crossed()
    sync.on_diff(d(10, 12))
    sync.on_snapshot(sync.request_snapshot(), snap(11))
    decision = sync.on_crossed()
    assert (decision.action, decision.reason, decision.void_book) == (Action.RESYNC, "crossed", True)
    assert sync.state is SyncState.BUFFERING and not sync.wants_snapshot
    assert sync.on_diff(d(13, 14)).action is Action.BUFFERED and sync.wants_snapshot
    assert resyncs(sync) == {"crossed": 1}


def test_a_failed_snapshot_keeps_the_diffs_and_is_asked_again_after_a_backoff() -> None:
    sync = DepthSync(SYMBOL)
    pacer = SnapshotPacer(backoff_base=1.0, backoff_cap=8.0, rng=random.Random(3))
    sync.on_diff(d(10, 12))
    now, waits = 100.0, []
    for _ in range(6):
        assert pacer.acquire(now, 50, SYMBOL)
        request = sync.request_snapshot()
        decision = sync.on_snapshot_failed(request, "HTTP 503")
        assert (decision.action, decision.reason, decision.detail) == (Action.RESYNC, "snapshot_error", "HTTP 503")
        assert sync.wants_snapshot and sync.stats().buffered == 1
        retry = pacer.on_failure(SYMBOL, now, status=503)
        assert not pacer.acquire(retry - 1e-6, 50, SYMBOL)
        assert pacer.next_allowed(now, 50, "ETHUSDT") == now  # another symbol is not held back
        waits.append(retry - now)
        assert pacer.stats(now).backing_off == 1
        now = pacer.next_allowed(retry, 50, SYMBOL)
        assert now == retry
    ceilings = [min(8.0, 2.0**n) for n in range(6)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings, strict=True))
    pacer.on_success(SYMBOL)
    assert pacer.stats(0.0).backing_off == 0
    assert 0.5 <= pacer.on_failure(SYMBOL, now) - now <= 1.0  # the backoff started over
    assert ids(sync.on_snapshot(sync.request_snapshot(), snap(11))) == [(10, 12)]
    assert resyncs(sync) == {"snapshot_error": 6}


def test_replies_to_no_outstanding_request_are_ignored() -> None:
    sync = DepthSync(SYMBOL)
    sync.on_diff(d(10, 12))
    request = sync.request_snapshot()
    assert sync.on_snapshot(request + 1, snap(11)).action is Action.IGNORED
    assert sync.on_snapshot_failed(request + 1, "late").action is Action.IGNORED
    assert sync.on_snapshot(request, snap(11)).action is Action.LOAD
    assert sync.on_snapshot(request, snap(11)).action is Action.IGNORED
    assert sync.stats().ignored == 3 and resyncs(sync) == {}


def test_another_symbols_diff_or_snapshot_is_a_bug() -> None:
    sync = DepthSync(SYMBOL)
    with pytest.raises(ValueError):
        sync.on_diff(d(1, 2, symbol="ETHUSDT"))
    sync.on_diff(d(1, 2))
    with pytest.raises(ValueError):
        sync.on_snapshot(sync.request_snapshot(), snap(1, "ETHUSDT"))
    with pytest.raises(ValueError):
        DepthSync(SYMBOL, "margin")


# ------------------------------------------------------------------------------------------------ properties


def chain(futures: bool, sizes: list[int], spacing: list[int], start: int = 100) -> list[DepthDiff]:
    """A continuous run of diffs: spot ids contiguous; futures ids spaced (other symbols' updates) and ``pu``
    chaining each to the one before."""
    out, prev = [], start - 1
    for size, space in zip(sizes, spacing, strict=True):
        first = prev + 1 + (space if futures else 0)
        out.append(d(first, first + size - 1, prev if futures else None))
        prev = first + size - 1
    return out


class Model:
    """Where the caller's book stands, from the decisions alone: every applied diff must continue it."""

    def __init__(self, futures: bool) -> None:
        self.futures = futures
        self.at: int | None = None
        self.loaded = False  # a snapshot loaded and no diff applied on it yet
        self.applied: list[DepthDiff] = []
        self.resyncs = 0

    def take(self, decision: Decision) -> None:
        self.resyncs += decision.action is Action.RESYNC
        if decision.action is Action.RESYNC and decision.void_book:
            self.at = None
        if decision.action is Action.LOAD:
            assert decision.snapshot is not None
            self.at, self.loaded = decision.snapshot.last_update_id, True
        if decision.action not in (Action.LOAD, Action.APPLY):
            assert decision.diffs == ()
        for diff in decision.diffs:
            assert self.at is not None, "applied with no book"
            if self.loaded:
                joint = self.at if self.futures else self.at + 1
                assert diff.first_id <= joint <= diff.last_id
            elif self.futures:
                assert diff.prev_id == self.at
            else:
                assert diff.first_id == self.at + 1
            self.at, self.loaded = diff.last_id, False
            self.applied.append(diff)


@settings(max_examples=300)
@given(
    futures=st.booleans(),
    shape=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=30),
    data=st.data(),
)
def test_any_interleaving_with_a_snapshot_applies_each_diff_once_in_order_and_ends_synced(
    futures: bool, shape: list[tuple[int, int]], data: st.DataObject
) -> None:
    diffs = chain(futures, [s for s, _ in shape], [g for _, g in shape])
    # the snapshot is the book at an id of some event of the symbol; asked after the first diff is held,
    # answered after any number of diffs more
    at = data.draw(st.sampled_from(diffs))
    snapshot_id = data.draw(st.integers(at.first_id, at.last_id))
    answered_after = data.draw(st.integers(1, len(diffs)))
    sync = DepthSync(SYMBOL, DepthRule.FUTURES if futures else DepthRule.SPOT, max_buffer=len(diffs))
    model = Model(futures)
    request = None
    for n, diff in enumerate(diffs, 1):
        model.take(sync.on_diff(diff))
        if sync.wants_snapshot:
            assert request is None
            request = sync.request_snapshot()
        if n == answered_after:
            assert request is not None
            model.take(sync.on_snapshot(request, snap(snapshot_id)))
    kept = [x for x in diffs if (x.last_id >= snapshot_id if futures else x.last_id > snapshot_id)]
    assert model.applied == kept
    # synced: live on the diffs, or (a spot snapshot at the last id) loaded and waiting for the next
    assert sync.synced and sync.state is (SyncState.LIVE if kept else SyncState.LOADED)
    assert sync.last_update_id == diffs[-1].last_id
    assert sync.stats().resyncs == dict.fromkeys(RESYNC_REASONS, 0)


@settings(max_examples=250)
@given(
    futures=st.booleans(),
    max_buffer=st.integers(1, 8),
    ops=st.lists(st.sampled_from(["diff"] * 8 + ["answer"] * 3 + ["skip", "dup", "reconnect", "fail", "cross"]),
                 max_size=80),
    data=st.data(),
)
def test_under_any_faults_no_diff_is_applied_out_of_turn_and_a_clean_run_syncs_again(
    futures: bool, max_buffer: int, ops: list[str], data: st.DataObject
) -> None:
    rule = DepthRule.FUTURES if futures else DepthRule.SPOT
    stream = chain(futures, [1 + n * 7 % 3 for n in range(100)], [n * 5 % 4 for n in range(100)])
    sync = DepthSync(SYMBOL, rule, max_buffer=max_buffer)
    model = Model(futures)
    sent: list[DepthDiff] = []
    position = 0
    request = None

    def feed(diff: DepthDiff) -> None:
        nonlocal request
        model.take(sync.on_diff(diff))
        if sync.wants_snapshot:
            request = sync.request_snapshot()

    for op in ops:
        if op == "diff":
            sent.append(stream[position])
            feed(stream[position])
            position += 1
        elif op == "skip":
            position += 1
        elif op == "dup" and sent:
            feed(data.draw(st.sampled_from(sent)))
        elif op == "reconnect":
            model.take(sync.on_reconnect())
        elif op == "cross" and sync.synced:
            model.take(sync.on_crossed())
        elif op in ("answer", "fail") and request is not None:
            done, request = request, None
            if op == "fail":
                model.take(sync.on_snapshot_failed(done, "boom"))
            else:
                # the venue's book a little before or after the newest diff sent
                newest = (sent[-1] if sent else stream[0]).last_id
                model.take(sync.on_snapshot(done, snap(max(0, newest + data.draw(st.integers(-8, 3))))))
            if sync.wants_snapshot:
                request = sync.request_snapshot()
    # then the venue behaves: a clean connection, and the snapshot answers at the first diff held
    model.take(sync.on_reconnect())
    if request is not None:
        model.take(sync.on_snapshot_failed(request, "abandoned"))
        request = None
    first = stream[position]
    feed(first)
    assert request is not None
    model.take(sync.on_snapshot(request, snap(first.last_id)))
    feed(stream[position + 1])
    assert sync.state is SyncState.LIVE and model.at == stream[position + 1].last_id
    counted = sync.stats().resyncs
    assert set(counted) == set(RESYNC_REASONS) and sum(counted.values()) == model.resyncs


# ------------------------------------------------------------------------------------------------ pacing


def test_depth_weights_are_binances() -> None:
    spot = {1: 5, 100: 5, 101: 25, 500: 25, 501: 50, 1000: 50, 1001: 250, 5000: 250}
    assert {limit: depth_weight(limit) for limit in spot} == spot
    futures = {5: 2, 10: 2, 20: 2, 50: 2, 100: 5, 500: 10, 1000: 20}
    assert {limit: depth_weight(limit, "futures") for limit in futures} == futures
    for limit, rule in [(0, "spot"), (5001, "spot"), (7, "futures"), (5000, "futures")]:
        with pytest.raises(ValueError):
            depth_weight(limit, rule)


def window_peak(grants: list[tuple[float, int]], window: float) -> int:
    """The most weight granted in any ``window`` seconds (the busiest window starts at a grant)."""
    return max(sum(w for t, w in grants if start <= t < start + window) for start, _ in grants)


def test_a_storm_of_200_symbols_never_spends_more_than_the_share_in_any_minute() -> None:
    pacer = SnapshotPacer(weight_per_minute=6000, share=0.5)
    weight = depth_weight(1000)
    pending = [f"S{i:03d}USDT" for i in range(200)]
    grants: list[tuple[float, int]] = []
    now = 0.0
    while pending:
        symbol = pending.pop(0)
        at = pacer.next_allowed(now, weight, symbol)
        assert at >= now
        if at > now:
            assert not pacer.acquire(at - 1e-6, weight, symbol)
        now = at
        assert pacer.acquire(now, weight, symbol)
        grants.append((now, weight))
    assert window_peak(grants, 60.0) <= 3000
    # and it spends all it may: each minute's whole share goes at once, the next a minute later
    per_minute = 3000 // weight
    assert [t for t, _ in grants[: per_minute + 1]] == [0.0] * per_minute + [60.0]
    assert grants[-1][0] == 60.0 * ((200 - 1) // per_minute)
    assert pacer.stats(now).spent <= 3000


def earliest(grants: list[tuple[float, int]], now: float, weight: int, budget: int, window: float) -> float:
    """By brute force: the first moment from ``now`` on when ``weight`` more keeps the window within ``budget``
    (only ``now`` and the moments a grant leaves the window can be it)."""
    moments = sorted({now} | {t + window for t, _ in grants if t + window > now})
    return next(m for m in moments if sum(w for t, w in grants if m < t + window) + weight <= budget)


@settings(max_examples=200)
@given(
    steps=st.lists(st.tuples(st.floats(0, 20), st.sampled_from([5, 25, 50, 250])), min_size=1, max_size=120),
    share=st.sampled_from([0.1, 0.5, 1.0]),
)
def test_any_sequence_of_requests_keeps_every_window_within_budget_and_waits_no_longer_than_needed(
    steps: list[tuple[float, int]], share: float
) -> None:
    pacer = SnapshotPacer(weight_per_minute=6000, share=share)
    grants: list[tuple[float, int]] = []
    now = 0.0
    for dt, weight in steps:
        now += dt
        allowed = pacer.next_allowed(now, weight)
        assert allowed == earliest(grants, now, weight, pacer.budget, 60.0)
        if pacer.acquire(now, weight):
            assert allowed == now
            grants.append((now, weight))
        else:
            assert allowed > now
            assert pacer.acquire(allowed, weight)  # it was right about when
            grants.append((allowed, weight))
            now = allowed
    assert window_peak(grants, 60.0) <= pacer.budget == int(6000 * share)


def test_a_failure_with_retry_after_waits_at_least_that_long() -> None:
    pacer = SnapshotPacer(backoff_base=1.0, rng=random.Random(1))
    assert pacer.on_failure("BTCUSDT", 5.0, status=503, retry_after=30.0) == 35.0
    assert pacer.next_allowed(6.0, 5, "BTCUSDT") == 35.0 and pacer.next_allowed(6.0, 5, "ETHUSDT") == 6.0
    assert pacer.stats(6.0).halted_until == 0.0  # a 503 holds that symbol back, not every request


def test_retry_after_of_a_429_stops_every_symbol_until_then() -> None:
    pacer = SnapshotPacer()
    assert pacer.acquire(10.0, 50, "BTCUSDT")
    assert pacer.on_failure("BTCUSDT", 10.0, status=429, retry_after=30.0) == 40.0
    for symbol in ("BTCUSDT", "ETHUSDT", None):
        assert pacer.next_allowed(11.0, 50, symbol) == 40.0
        assert not pacer.acquire(39.999, 5, symbol)
    # a shorter Retry-After later never shortens the stop
    assert pacer.on_failure("ETHUSDT", 12.0, status=429, retry_after=1.0) == 40.0
    assert pacer.stats(20.0).halted_until == 40.0 and pacer.stats(20.0).rate_limited == 2
    assert pacer.acquire(40.0, 50, "ETHUSDT")
    assert pacer.stats(40.0).halted_until == 0.0
    without = SnapshotPacer(default_retry_after=60.0)
    assert without.on_failure("BTCUSDT", 5.0, status=429) == 65.0


def test_a_418_ban_stops_everything_for_its_retry_after_or_the_default_ban() -> None:
    pacer = SnapshotPacer(default_ban=120.0)
    assert pacer.on_failure("BTCUSDT", 100.0, status=418) == 220.0
    assert [pacer.next_allowed(100.0, 5, s) for s in ("BTCUSDT", "XRPUSDT")] == [220.0, 220.0]
    banned = SnapshotPacer()
    assert banned.on_failure("BTCUSDT", 0.0, status=418, retry_after=7200.0) == 7200.0
    assert not banned.acquire(7199.0, 5, "XRPUSDT") and banned.acquire(7200.0, 5, "XRPUSDT")
    assert banned.stats(0.0).failures == 0  # a ban is no symbol's failure: nobody backs off for it
    assert banned.stats(0.0).backing_off == 0


def test_a_request_heavier_than_the_budget_is_refused() -> None:
    pacer = SnapshotPacer(weight_per_minute=400, share=0.5)
    with pytest.raises(ValueError):
        pacer.next_allowed(0.0, 250)
    with pytest.raises(ValueError):
        pacer.next_allowed(0.0, 0)
    for bad in ({"share": 0.0}, {"share": 1.5}, {"weight_per_minute": 1, "share": 0.5}, {"window_s": 0.0}):
        with pytest.raises(ValueError):
            SnapshotPacer(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ stored snapshots


def test_snapshot_policy_by_count_and_by_aligned_venue_time() -> None:
    by_count = SnapshotPolicy(every_updates=3)
    assert [by_count.due(n, 0, 10**9) for n in range(5)] == [False, False, False, True, True]
    by_time = SnapshotPolicy(every_s=60)
    assert not by_time.due(10**6, 60_000, 119_999)
    assert by_time.due(0, 60_000, 120_000)
    assert by_time.due(0, 119_999, 120_000)  # aligned on the minute, not 60 s after the last
    both = SnapshotPolicy(every_updates=100, every_s=1)
    assert both.due(100, 0, 1) and both.due(1, 999, 1000) and not both.due(99, 1000, 1999)
    assert not SnapshotPolicy().due(10**9, 0, 10**12)
    for bad in ({"every_updates": 0}, {"every_s": 0}, {"every_s": -1.0}):
        with pytest.raises(ValueError):
            SnapshotPolicy(**bad)
