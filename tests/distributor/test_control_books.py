"""Order books (channel ``depth``) under the gate and the ingress queue: pure, no I/O, time passed in.

The gate's decisions are checked entry by entry, and then end to end against a real keeper (the ingestor's
:class:`~ingestor.depth_books.DepthBooks`): whatever the switches and the queue drop, what comes out of the gate
rebuilds (:func:`consumer_sdk.book_stream.rebuild`) with no break, to the keeper's live book.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from consumer_sdk.book_stream import Rebuilder, decode, rebuild
from consumer_sdk.core.keys import Pattern
from consumer_sdk.core.tick import Tick, encode_tick, is_gap_marker
from distributor.control import BOOK_BREAK_REASONS, ControlGate, ControlState, Level, LimitPolicy, OnResume
from distributor.control.degrade import stream_rule
from distributor.ingress import IngressQueue, Policy
from ingestor.depth import DepthDiff, DepthSnapshot
from ingestor.depth_books import BOOK_RESYNC_REASONS, DepthBooks

T0 = 1000.0
DEPTH = "binance:BTCUSDT:depth"
Break = tuple[str, str, str]


def entry(seq: int, kind: str = "diff", symbol: str = "BTCUSDT", channel: str = "depth") -> Tick:
    t: dict[str, Any] = {
        "v": 1, "venue": "binance", "symbol": symbol, "channel": channel, "seq": seq,
        "ts_event": 1_700_000_000_000_000 + seq, "ts_recv": 1_700_000_000_000_100 + seq, "kind": kind,
    }
    return t  # type: ignore[return-value]


def trade(seq: int, symbol: str = "BTCUSDT") -> Tick:
    t: dict[str, Any] = {
        "v": 1, "venue": "binance", "symbol": symbol, "channel": "trade", "seq": seq, "ts_event": seq,
        "ts_recv": seq, "trade_id": seq, "price": "1.0", "qty": "1", "side": "buy",
    }
    return t  # type: ignore[return-value]


def seqs(ticks: Any) -> list[int]:
    return [t["seq"] for t in ticks]


def recording_gate(**kwargs: Any) -> tuple[ControlGate, list[Break]]:
    asked: list[Break] = []
    return ControlGate(on_book_break=lambda v, s, w: asked.append((v, s, w)), **kwargs), asked


# -- the decisions, entry by entry ------------------------------------------------------------------------------


@pytest.mark.parametrize("on_resume", list(OnResume))
def test_a_paused_book_drops_everything_and_asks_for_a_resync_on_resume_never_a_marker(on_resume: OnResume) -> None:
    gate, asked = recording_gate(on_resume=on_resume)
    assert gate.filter([entry(1, "snapshot"), entry(2)], T0) == [entry(1, "snapshot"), entry(2)]
    gate.apply(ControlState().with_pause(DEPTH, who="op", at=T0))
    assert list(gate.filter([entry(3), entry(4, "snapshot"), entry(5), trade(1)], T0)) == [trade(1)]
    assert asked == [] and gate.stats().paused_dropped == 3 and gate.stats().books_broken == 1
    assert gate.stats().paused_by_stream == {DEPTH: 3}
    gate.apply(ControlState().with_pause(DEPTH, who="op", at=T0).without_pause(DEPTH))
    assert asked == [("binance", "BTCUSDT", "paused")], "asked once, as soon as the pause is lifted"
    released = gate.tick_pending(T0)
    assert not any(is_gap_marker(t) for t in released) and gate.stats().markers == 0
    # the diffs made before the keeper heard of it are dropped; its snapshot mends the book
    assert list(gate.filter([entry(6), entry(7)], T0)) == []
    assert list(gate.filter([entry(8, "snapshot"), entry(9), trade(2)], T0)) == [entry(8, "snapshot"), entry(9),
                                                                                  trade(2)]
    stats = gate.stats()
    assert stats.book_dropped == 2 and stats.books_broken == 0 and stats.book_breaks == {"paused": 1}
    assert asked == [("binance", "BTCUSDT", "paused")] and not gate.active


def test_a_pause_that_dropped_nothing_breaks_nothing() -> None:
    gate, asked = recording_gate()
    gate.apply(ControlState().with_pause(DEPTH, who="op", at=T0))
    assert list(gate.filter([trade(1)], T0)) == [trade(1)]
    gate.apply(ControlState())
    assert asked == [] and list(gate.filter([entry(3)], T0)) == [entry(3)] and not gate.active


def test_a_snapshot_asked_for_and_lost_to_a_new_pause_is_asked_for_again() -> None:
    gate, asked = recording_gate()
    paused = ControlState().with_pause(DEPTH, who="op", at=T0)
    gate.apply(paused)
    gate.filter([entry(1)], T0)
    gate.apply(ControlState())
    gate.apply(paused)
    assert list(gate.filter([entry(2, "snapshot")], T0)) == [], "the snapshot asked for, dropped by the pause"
    gate.apply(ControlState())
    assert asked == [("binance", "BTCUSDT", "paused")] * 2
    assert list(gate.filter([entry(3), entry(4, "snapshot"), entry(5)], T0)) == [entry(4, "snapshot"), entry(5)]


@pytest.mark.parametrize("policy", list(LimitPolicy))
def test_a_limit_does_not_apply_to_a_book(policy: LimitPolicy) -> None:
    gate, asked = recording_gate()
    gate.apply(ControlState().with_limit("binance:BTCUSDT:*", 1.0, policy, who="op", at=T0))
    batch = [entry(i) for i in range(1, 20)]
    assert list(gate.filter(batch, T0)) == batch
    # the same limit still holds the stream's trades to one a second
    assert seqs(gate.filter([trade(i) for i in range(1, 6)], T0)) == [1]
    assert asked == [] and gate.stats().book_dropped == 0


def test_the_conflate_level_passes_a_book_whole() -> None:
    gate, asked = recording_gate()
    gate.apply(ControlState().with_level(Level.CONFLATE, who="op", at=T0))
    batch = [entry(i) for i in range(1, 20)]
    assert list(gate.filter(batch, T0)) == batch and gate.tick_pending(T0 + 1) == [] and asked == []


def test_essential_drops_a_book_not_critical_and_resyncs_it_when_the_level_falls() -> None:
    gate, asked = recording_gate()
    essential = (ControlState().with_level(Level.ESSENTIAL, who="op", at=T0)
                 .with_critical(["binance:ETHUSDT:*"], who="op", at=T0))
    gate.apply(essential)
    out = gate.filter([entry(1), entry(1, symbol="ETHUSDT"), entry(2, "snapshot")], T0)
    assert list(out) == [entry(1, symbol="ETHUSDT")], "the critical book is kept whole"
    assert gate.stats().essential_dropped == 2 and asked == []
    gate.apply(essential.with_level(Level.CONFLATE, who="op", at=T0))
    assert asked == [("binance", "BTCUSDT", "degraded")]
    assert list(gate.filter([entry(3), entry(4, "snapshot")], T0)) == [entry(4, "snapshot")]


def test_stream_rule_for_a_book() -> None:
    critical = [Pattern("binance:ETHUSDT:*")]
    for level in Level:
        assert stream_rule(level, "depth", "binance:ETHUSDT:depth", critical) == (False, False)
        assert stream_rule(level, "depth", DEPTH, critical) == (False, level is Level.ESSENTIAL)


def test_an_entry_dropped_upstream_breaks_its_book_at_once() -> None:
    gate, asked = recording_gate()
    gate.dropped(trade(1))
    assert not gate.active and asked == [], "nothing to the gate but a book entry"
    gate.dropped(entry(5))
    assert gate.active and asked == [("binance", "BTCUSDT", "dropped")]
    gate.dropped(entry(6))
    assert asked == [("binance", "BTCUSDT", "dropped")], "the snapshot asked for is still to come"
    assert list(gate.filter([entry(7), trade(2), entry(7, symbol="ETHUSDT")], T0)) == [
        trade(2), entry(7, symbol="ETHUSDT")]
    gate.dropped(entry(8, "snapshot"))
    assert asked == [("binance", "BTCUSDT", "dropped")] * 2, "the snapshot that would have mended it was lost"
    assert list(gate.filter([entry(9), entry(10, "snapshot"), entry(11)], T0)) == [entry(10, "snapshot"), entry(11)]
    assert not gate.active and gate.stats().book_breaks == {"dropped": 2} and gate.stats().book_dropped == 2


def test_a_drop_upstream_while_paused_asks_on_resume() -> None:
    gate, asked = recording_gate()
    gate.apply(ControlState().with_pause(DEPTH, who="op", at=T0))
    gate.dropped(entry(5))
    assert asked == []
    gate.apply(ControlState())
    assert asked == [("binance", "BTCUSDT", "paused")]


def test_a_drop_upstream_under_essential_asks_when_the_level_falls() -> None:
    gate, asked = recording_gate()
    gate.apply(ControlState().with_level(Level.ESSENTIAL, who="op", at=T0))
    gate.dropped(entry(5))
    assert asked == [] and gate.stats().books_broken == 1
    gate.apply(ControlState())
    assert asked == [("binance", "BTCUSDT", "degraded")]


def test_a_snapshot_lost_upstream_while_paused_is_asked_for_again_on_resume() -> None:
    gate, asked = recording_gate()
    gate.dropped(entry(5))
    paused = ControlState().with_pause(DEPTH, who="op", at=T0)
    gate.apply(paused)
    gate.dropped(entry(6, "snapshot"))  # the one asked for
    gate.apply(ControlState())
    assert asked == [("binance", "BTCUSDT", "dropped"), ("binance", "BTCUSDT", "paused")]


def test_a_snapshot_older_than_an_entry_lost_passes_but_does_not_mend() -> None:
    gate, asked = recording_gate()
    gate.dropped(entry(5))
    gate.dropped(entry(8))  # the queue drops a diff newer than the snapshot on its way
    assert len(asked) == 1
    assert list(gate.filter([entry(7, "snapshot"), entry(9)], T0)) == [entry(7, "snapshot")]
    assert len(asked) == 2 and gate.stats().books_broken == 1
    assert list(gate.filter([entry(10, "snapshot"), entry(11)], T0)) == [entry(10, "snapshot"), entry(11)]
    assert gate.stats().books_broken == 0 and not gate.active


def test_any_snapshot_above_the_entry_lost_mends_the_book() -> None:
    gate, _ = recording_gate()
    gate.dropped(entry(0))
    assert list(gate.filter([entry(1, "snapshot"), entry(2)], T0)) == [entry(1, "snapshot"), entry(2)]
    assert gate.stats().books_broken == 0


def test_other_streams_stay_on_the_fast_path_while_a_book_is_broken() -> None:
    gate, _ = recording_gate()
    gate.dropped(entry(5))
    gate.filter([trade(1), trade(1, symbol="ETHUSDT")], T0)
    assert gate._streams[("binance", "BTCUSDT", "trade")] is None
    assert gate._streams[("binance", "ETHUSDT", "trade")] is None


def test_without_a_keeper_a_broken_book_waits_for_its_next_snapshot() -> None:
    gate = ControlGate()
    gate.dropped(entry(5))
    assert list(gate.filter([entry(6), entry(7, "snapshot"), entry(8)], T0)) == [entry(7, "snapshot"), entry(8)]
    assert gate.stats().book_breaks == {"dropped": 1}


@pytest.mark.parametrize("policy", [Policy.DROP_NEWEST, Policy.DROP_OLDEST])
def test_the_ingress_reports_each_tick_it_drops(policy: Policy) -> None:
    dropped: list[int] = []
    q: IngressQueue[int] = IngressQueue(2, policy, on_drop=dropped.append)
    for i in range(5):
        q.offer(i)
    assert dropped == ([2, 3, 4] if policy is Policy.DROP_NEWEST else [0, 1, 2])
    assert list(q.take(10)) == ([0, 1] if policy is Policy.DROP_NEWEST else [3, 4])


def test_the_break_reasons_are_counted_as_book_resyncs() -> None:
    assert set(BOOK_BREAK_REASONS) <= set(BOOK_RESYNC_REASONS)


# -- end to end with a real keeper ------------------------------------------------------------------------------

SYMBOLS = ("BTCUSDT", "ETHUSDT")
BIDS = (("100.0", "1"), ("99.5", "2"))
ASKS = (("100.5", "1"), ("101.0", "3"))


def venue_diff(symbol: str, u: int, rng: random.Random) -> DepthDiff:
    bid = f"{rng.randrange(90, 100)}.0"
    ask = f"{rng.randrange(101, 110)}.0"
    return DepthDiff(symbol, u, u, None, 1000 + u, ((bid, str(rng.randrange(0, 3))),),
                     ((ask, str(rng.randrange(0, 3))),))


@pytest.mark.parametrize("seed", [*range(12), 81])
def test_whatever_the_switches_and_drops_the_stored_books_rebuild_with_no_break(seed: int) -> None:
    rng = random.Random(seed)
    books = DepthBooks("binance", SYMBOLS)
    gate = ControlGate(on_book_break=books.on_store_break)
    queue: IngressQueue[Tick] = IngressQueue(6, rng.choice([Policy.DROP_NEWEST, Policy.DROP_OLDEST]),
                                             on_drop=gate.dropped)
    stored: dict[str, list[Tick]] = {s: [] for s in SYMBOLS}
    u = dict.fromkeys(SYMBOLS, 10)
    for symbol in SYMBOLS:
        books.on_diff(DepthDiff(symbol, 10, 10, None, 1010, (), ()), 0)
        for t in books.on_snapshot(symbol, books.request(symbol), DepthSnapshot(symbol, 10, BIDS, ASKS), 0):
            queue.offer(t)
    states = [
        ControlState(),
        ControlState().with_pause("binance:BTCUSDT:depth", who="op", at=T0),
        ControlState().with_pause("binance:*:*", who="op", at=T0),
        ControlState().with_limit("binance:*:depth", 1.0, LimitPolicy.DROP, who="op", at=T0),
        ControlState().with_level(Level.ESSENTIAL, who="op", at=T0),
        ControlState().with_level(Level.CONFLATE, who="op", at=T0),
    ]
    now = T0
    for step in range(600):
        now += 0.01
        roll = rng.random()
        if roll < 0.03:
            gate.apply(rng.choice(states))
        elif roll < 0.6:
            symbol = rng.choice(SYMBOLS)
            u[symbol] += 1
            for t in books.on_diff(venue_diff(symbol, u[symbol], rng), step):
                queue.offer(t)
        else:
            out = gate.tick_pending(now) + list(gate.filter(queue.take(rng.randrange(1, 5)), now))
            for t in out:
                assert t["channel"] == "depth" and not is_gap_marker(t)
                stored[t["symbol"]].append(t)
    gate.apply(ControlState())
    for _ in range(100):  # the end: no switch; the keepers' snapshots mend what is broken
        for symbol in SYMBOLS:
            u[symbol] += 1
            for t in books.on_diff(venue_diff(symbol, u[symbol], rng), 0):
                queue.offer(t)
        for t in gate.filter(queue.take(10), now):
            stored[t["symbol"]].append(t)
        if not len(queue) and gate.stats().books_broken == 0:
            break
    else:
        raise AssertionError(f"still broken: {gate.stats()}")
    for symbol in SYMBOLS:
        entries = [decode(encode_tick(t)) for t in stored[symbol]]
        rebuilder = Rebuilder()
        for e in entries:
            rebuilder.feed(e)  # raises at a break
        live = books.book(symbol)
        assert live is not None and rebuild(entries) == live, "the stored stream ends at the live book"
    assert queue.dropped > 0, "the run dropped entries in the queue"
    reasons = {r for (_, r) in books.resyncs}
    assert reasons and reasons <= set(BOOK_BREAK_REASONS)
