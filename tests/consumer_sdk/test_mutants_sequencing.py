"""Sequencing edges that mutation testing showed unchecked (docs/testing.md, "Mutation testing").

Holes filled at their exact ends, seeding from several sources in any order, and the
:class:`~ingestor.sequencer.Sequencer` calls the repairer and the unsubscribe path use.
"""

from __future__ import annotations

from itertools import permutations

from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.core.sequencing import SeqTracker, Verdict
from consumer_sdk.core.tick import Tick
from ingestor.sequencer import GapReport, Sequencer, SequenceStats

OK, GAP, DUP, LATE = Verdict.OK, Verdict.GAP, Verdict.DUPLICATE, Verdict.LATE
STREAM = ("binance", "BTCUSDT", "trade")


def trade(seq: int, symbol: str = "BTCUSDT", channel: str = "trade") -> Tick:
    return {"venue": "binance", "symbol": symbol, "channel": channel, "seq": seq}  # type: ignore[typeddict-item]


# -- SeqTracker.fill ----------------------------------------------------------------------------------------------


def test_fill_that_starts_on_a_holes_last_id_repairs_that_id_only() -> None:
    tracker = SeqTracker()
    for s in (10, 20):
        tracker.observe(s)  # hole 11..19
    tracker.fill(19, 25)
    assert tracker.holes() == [(11, 18)]
    assert tracker.observe(19) is DUP
    assert tracker.observe(18) is LATE


def test_fill_that_ends_on_a_holes_first_id_repairs_that_id_only() -> None:
    tracker = SeqTracker()
    for s in (10, 20):
        tracker.observe(s)
    tracker.fill(5, 11)
    assert tracker.holes() == [(12, 19)]
    assert tracker.observe(11) is DUP
    assert tracker.observe(12) is LATE


@given(
    seqs=st.lists(st.integers(0, 80), min_size=1, max_size=SeqTracker.MAX_HOLES - 1),
    first=st.integers(0, 80),
    length=st.integers(0, 30),
)
def test_fill_forgets_exactly_the_ids_in_its_range(seqs: list[int], first: int, length: int) -> None:
    """Against a set of missing ids: after ``fill(first, last)`` an id is late iff it was missing and is
    outside ``first..last``."""
    last = first + length
    tracker = SeqTracker()
    missing: set[int] = set()
    top: int | None = None
    for s in seqs:
        if tracker.observe(s).accepted:
            if top is not None:
                missing.update(range(top + 1, s))
            top = s
    tracker.fill(first, last)
    expected = missing - set(range(first, last + 1))
    assert {i for lo, hi in tracker.holes() for i in range(lo, hi + 1)} == expected
    for i in range(0, 81):
        if top is not None and i <= top:
            assert tracker.observe(i) is (LATE if i in expected else DUP)


# -- Sequencer.seed: the newest source wins, whatever the order ---------------------------------------------------


def test_seeding_from_redis_then_the_spill_log_gives_the_newer() -> None:
    seq = Sequencer()
    seq.seed(*STREAM, 100)  # Redis holds up to 100
    seq.seed(*STREAM, 140)  # the spill log holds up to 140, not yet in Redis
    assert seq.last_seq(*STREAM) == 140
    assert seq.accept(trade(140)) is DUP
    assert seq.accept(trade(141)) is OK


def test_seeding_from_the_spill_log_then_redis_gives_the_newer() -> None:
    seq = Sequencer()
    seq.seed(*STREAM, 140)
    seq.seed(*STREAM, 100)  # older: must not move the stream back (121 would be taken again)
    assert seq.last_seq(*STREAM) == 140
    assert seq.accept(trade(121)) is DUP
    assert seq.accept(trade(141)) is OK


@given(seeds=st.lists(st.integers(0, 10**12), min_size=1, max_size=5))
def test_any_order_of_seeds_continues_after_the_newest(seeds: list[int]) -> None:
    newest = max(seeds)
    for order in set(permutations(seeds)):
        seq = Sequencer()
        for s in order:
            seq.seed(*STREAM, s)
        assert seq.last_seq(*STREAM) == newest
        assert seq.accept(trade(newest)) is DUP
        assert seq.accept(trade(newest + 1)) is OK


def test_seeding_a_live_stream_keeps_its_counters_and_holes() -> None:
    seq = Sequencer()
    for s in (1, 2, 5):
        seq.accept(trade(s))
    seq.seed(*STREAM, 3)  # older than what the stream accepted: nothing changes
    assert seq.last_seq(*STREAM) == 5
    assert seq.accept(trade(4)) is LATE  # the hole 3..4 is still remembered
    seq.seed(*STREAM, 9)
    assert seq.last_seq(*STREAM) == 9
    assert seq.stats().accepted == 3 and seq.stats().gaps == 1


def test_seeding_one_stream_leaves_the_others_alone() -> None:
    seq = Sequencer()
    seq.seed("binance", "BTCUSDT", "trade", 100)
    seq.seed("binance", "ETHUSDT", "trade", 7)
    seq.seed("binance", "BTCUSDT", "agg_trade", 50)
    assert seq.last_seq("binance", "BTCUSDT", "trade") == 100
    assert seq.last_seq("binance", "ETHUSDT", "trade") == 7
    assert seq.last_seq("binance", "BTCUSDT", "agg_trade") == 50
    assert seq.last_seq("binance", "SOLUSDT", "trade") is None


def test_a_seeded_book_ticker_stream_accepts_jumps_silently() -> None:
    seq = Sequencer()
    seq.seed("binance", "BTCUSDT", "book_ticker", 1000)
    assert seq.accept(trade(1500, channel="book_ticker")) is OK
    assert seq.last_gap is None


# -- forget_holes, release, trackers -------------------------------------------------------------------------------


def test_a_repaired_hole_turns_late_arrivals_into_duplicates() -> None:
    seq = Sequencer()
    seq.accept(trade(1))
    assert seq.accept(trade(6)) is GAP
    assert seq.last_gap == GapReport("binance", "BTCUSDT", "trade", 2, 5)
    seq.forget_holes(STREAM, 2, 3)
    assert seq.accept(trade(2)) is DUP
    assert seq.accept(trade(3)) is DUP
    assert seq.accept(trade(4)) is LATE  # not repaired
    seq.forget_holes(("binance", "NOPE", "trade"), 2, 3)  # an unknown stream: nothing to forget, no error


def test_release_forgets_a_stream_and_tolerates_an_unknown_one() -> None:
    seq = Sequencer()
    seq.accept(trade(10))
    seq.release(*STREAM)
    assert seq.last_seq(*STREAM) is None
    assert seq.accept(trade(3)) is OK  # starts again
    seq.release("binance", "NOPE", "trade")
    assert seq.last_seq(*STREAM) == 3


def test_trackers_lists_every_stream_with_its_tracker() -> None:
    seq = Sequencer()
    seq.accept(trade(10))
    seq.seed("binance", "ETHUSDT", "trade", 4)
    got = {ident: t.last for ident, t in seq.trackers()}
    assert got == {STREAM: 10, ("binance", "ETHUSDT", "trade"): 4}


# -- Sequencer.retract ---------------------------------------------------------------------------------------------


def test_retract_takes_back_the_tick_that_revealed_a_hole_and_the_hole() -> None:
    seq = Sequencer()
    assert [seq.check(trade(s)) for s in (8, 9, 10)] == [OK, OK, OK]
    gap = seq.check(trade(1_000_000))
    assert gap == GapReport(*STREAM, 11, 999_999)
    seq.retract(gap)
    assert seq.last_seq(*STREAM) == 10
    assert seq.stats() == SequenceStats(accepted=3, gaps=0, gap_ticks=0, duplicates=0, out_of_order=0)
    assert seq.check(trade(11)) is OK  # the stream goes on after 10, with no hole left to fill
    assert seq.check(trade(13)) == GapReport(*STREAM, 12, 12)


def test_retract_of_anything_but_the_last_accepted_jump_changes_nothing() -> None:
    seq = Sequencer()
    assert seq.check(trade(10)) is OK
    gap = seq.check(trade(20))
    assert isinstance(gap, GapReport)
    assert seq.check(trade(21)) is OK  # the jump is no longer the stream's last tick
    before = seq.stats()
    seq.retract(gap)
    seq.retract(GapReport("binance", "ETHUSDT", "trade", 1, 2))  # a stream it never saw
    assert (seq.stats(), seq.last_seq(*STREAM)) == (before, 21)
