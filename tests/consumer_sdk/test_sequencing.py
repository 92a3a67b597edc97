"""consumer_sdk.core.sequencing (SeqTracker, Verdict) and ingestor.sequencer (Sequencer, GapReport)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.core.sequencing import SeqTracker, Verdict, is_contiguous_channel
from consumer_sdk.core.tick import Tick
from ingestor.binance import parse_frame
from ingestor.sequencer import GapReport, Sequencer, SequenceStats

OK, GAP, DUP, LATE = Verdict.OK, Verdict.GAP, Verdict.DUPLICATE, Verdict.LATE

# -- Verdict -------------------------------------------------------------------------------------------------


def test_only_ok_and_gap_are_accepted() -> None:
    assert {v for v in Verdict if v.accepted} == {OK, GAP}


# -- SeqTracker ----------------------------------------------------------------------------------------------


def observe_all(tracker: SeqTracker, seqs: list[int]) -> list[Verdict]:
    return [tracker.observe(s) for s in seqs]


def test_first_seq_is_ok_whatever_it_is() -> None:
    tracker = SeqTracker()
    assert tracker.last is None
    assert tracker.observe(1_000_000) is OK
    assert tracker.last == 1_000_000
    assert tracker.holes() == []


def test_contiguous_run() -> None:
    tracker = SeqTracker()
    assert observe_all(tracker, [5, 6, 7, 8]) == [OK] * 4
    assert (tracker.last, tracker.accepted, tracker.gaps, tracker.gap_ticks) == (8, 4, 0, 0)
    assert (tracker.duplicates, tracker.late) == (0, 0)


def test_gap_then_late_then_duplicates() -> None:
    tracker = SeqTracker()
    assert observe_all(tracker, [1, 2, 6]) == [OK, OK, GAP]
    assert tracker.holes() == [(3, 5)]
    assert (tracker.gaps, tracker.gap_ticks, tracker.last) == (1, 3, 6)
    assert tracker.observe(4) is LATE  # inside the hole: out of order
    assert tracker.observe(6) is DUP  # the last accepted
    assert tracker.observe(2) is DUP  # accepted long ago
    assert tracker.observe(0) is DUP  # below everything seen, not in a hole
    assert tracker.observe(7) is OK
    assert (tracker.accepted, tracker.duplicates, tracker.late) == (4, 3, 1)
    assert tracker.last == 7  # rejected seqs never move it


def test_holes_are_kept_oldest_first() -> None:
    tracker = SeqTracker()
    assert observe_all(tracker, [10, 12, 20, 21, 30]) == [OK, GAP, GAP, OK, GAP]
    assert tracker.holes() == [(11, 11), (13, 19), (22, 29)]
    assert (tracker.gaps, tracker.gap_ticks) == (3, 1 + 7 + 8)
    assert [tracker.observe(s) for s in (11, 13, 19, 22, 29)] == [LATE] * 5
    assert [tracker.observe(s) for s in (10, 12, 20, 21, 30)] == [DUP] * 5


def test_seeded_tracker_continues_after_last() -> None:
    tracker = SeqTracker(last=100)
    assert tracker.observe(100) is DUP
    assert tracker.observe(50) is DUP
    assert tracker.observe(101) is OK
    assert tracker.observe(105) is GAP
    assert tracker.holes() == [(102, 104)]


@pytest.mark.parametrize(
    ("first", "last", "holes_after", "now_duplicate", "still_late"),
    [
        (13, 19, [(11, 11), (22, 29)], [13, 16, 19], [11, 22]),  # a whole hole
        (15, 16, [(11, 11), (13, 14), (17, 19), (22, 29)], [15, 16], [13, 14, 17, 19]),  # the middle of one
        (13, 15, [(11, 11), (16, 19), (22, 29)], [13, 15], [16]),  # its start
        (18, 19, [(11, 11), (13, 17), (22, 29)], [18, 19], [17]),  # its end
        (0, 100, [], [11, 13, 22, 29], []),  # all of them
        (40, 50, [(11, 11), (13, 19), (22, 29)], [], [11, 13, 22]),  # none of them
        (17, 25, [(11, 11), (13, 16), (26, 29)], [17, 20, 25], [16, 26]),  # across two
    ],
)
def test_fill(
    first: int, last: int, holes_after: list[tuple[int, int]], now_duplicate: list[int], still_late: list[int]
) -> None:
    tracker = SeqTracker()
    observe_all(tracker, [10, 12, 20, 21, 30])
    tracker.fill(first, last)
    assert tracker.holes() == holes_after
    assert [tracker.observe(s) for s in now_duplicate] == [DUP] * len(now_duplicate)
    assert [tracker.observe(s) for s in still_late] == [LATE] * len(still_late)


def test_holes_are_bounded_oldest_forgotten_first() -> None:
    tracker = SeqTracker()
    n = SeqTracker.MAX_HOLES + 3
    observe_all(tracker, [2 * i for i in range(n + 1)])  # 0, 2, 4, ...: a one-seq hole before each
    holes = tracker.holes()
    assert len(holes) == SeqTracker.MAX_HOLES
    assert holes[-1] == (2 * n - 1, 2 * n - 1)
    assert holes[0] == (2 * (n - SeqTracker.MAX_HOLES) + 1,) * 2
    assert tracker.gaps == n  # counted even when no longer remembered
    assert tracker.observe(1) is DUP  # its hole was forgotten
    assert tracker.observe(holes[0][0]) is LATE


def reference(seqs: list[int]) -> list[Verdict]:
    """The verdicts the module docstring describes, computed another way (holes as a set)."""
    last: int | None = None
    holes: set[int] = set()
    out = []
    for s in seqs:
        if last is None or s == last + 1:
            out.append(OK)
        elif s > last:
            holes.update(range(last + 1, s))
            out.append(GAP)
        else:
            out.append(LATE if s in holes else DUP)
            continue
        last = s
    return out


# Fewer observations than MAX_HOLES, so no hole is ever forgotten and the reference needs no bound.
SEQ_LISTS = st.lists(st.integers(0, 60), max_size=SeqTracker.MAX_HOLES - 1)


@given(seqs=SEQ_LISTS)
def test_property_every_seq_classified_once(seqs: list[int]) -> None:
    tracker = SeqTracker()
    verdicts = observe_all(tracker, seqs)
    assert verdicts == reference(seqs)
    accepted = [s for s, v in zip(seqs, verdicts, strict=True) if v.accepted]
    assert all(a < b for a, b in pairwise(accepted))
    assert tracker.accepted + tracker.duplicates + tracker.late == len(seqs)
    assert tracker.accepted == len(accepted)
    assert tracker.gaps == verdicts.count(GAP)
    assert tracker.duplicates == verdicts.count(DUP)
    assert tracker.late == verdicts.count(LATE)
    assert tracker.last == (accepted[-1] if accepted else None)
    assert tracker.gap_ticks == sum(b - a - 1 for a, b in pairwise(accepted))
    # The holes are exactly what lies between accepted seqs and was never accepted.
    if accepted:
        in_holes = {s for lo, hi in tracker.holes() for s in range(lo, hi + 1)}
        assert in_holes == set(range(accepted[0], accepted[-1] + 1)) - set(accepted)


@given(seqs=st.lists(st.integers(-5, 2**62), max_size=200))
def test_property_accepted_strictly_increase_for_any_ints(seqs: list[int]) -> None:
    tracker = SeqTracker()
    accepted = [s for s in seqs if tracker.observe(s).accepted]
    assert all(a < b for a, b in pairwise(accepted))
    assert tracker.accepted + tracker.duplicates + tracker.late == len(seqs)
    assert len(tracker.holes()) <= SeqTracker.MAX_HOLES


# -- SeqTracker on a non-contiguous id ----------------------------------------------------------------------


def test_contiguity_per_channel() -> None:
    assert all(is_contiguous_channel(c) for c in ("trade", "agg_trade"))
    assert not any(is_contiguous_channel(c) for c in ("book_ticker", "kline_1m"))


def test_non_contiguous_tracker_accepts_jumps_silently() -> None:
    tracker = SeqTracker(contiguous=False)
    assert observe_all(tracker, [100, 101, 150, 400]) == [OK] * 4
    assert (tracker.gaps, tracker.gap_ticks, tracker.holes()) == (0, 0, [])
    assert tracker.observe(400) is DUP
    assert tracker.observe(120) is LATE
    assert tracker.observe(401) is OK
    assert (tracker.accepted, tracker.duplicates, tracker.late, tracker.last) == (5, 1, 1, 401)


@given(seqs=st.lists(st.integers(0, 60), max_size=100))
def test_property_non_contiguous(seqs: list[int]) -> None:
    tracker = SeqTracker(contiguous=False)
    verdicts = observe_all(tracker, seqs)
    best: int | None = None
    for s, v in zip(seqs, verdicts, strict=True):
        want = OK if best is None or s > best else DUP if s == best else LATE
        assert v is want
        if want is OK:
            best = s
    assert GAP not in verdicts
    assert tracker.accepted + tracker.duplicates + tracker.late == len(seqs)


# -- Sequencer -----------------------------------------------------------------------------------------------


def tick(channel: str, seq: int, symbol: str = "BTCUSDT", venue: str = "binance", event_ms: int = 0) -> Tick:
    t: dict[str, Any] = {
        "v": 1, "venue": venue, "symbol": symbol, "channel": channel, "seq": seq,
        "ts_event": (1_700_000_000_000 + event_ms) * 1000, "ts_recv": (1_700_000_000_000 + event_ms) * 1000 + 100,
    }
    return t  # type: ignore[return-value]


def test_kline_seq_is_its_event_time_and_repeats_are_duplicates() -> None:
    seq = Sequencer()
    first, again, older, nxt = (tick("kline_1m", 1_700_000_000_000 + ms, event_ms=ms) for ms in (10, 10, 5, 11))
    assert seq.accept(first) is OK
    assert seq.accept(again) is DUP
    assert seq.accept(older) is LATE
    assert seq.accept(nxt) is OK  # a jump in event time is no gap
    assert seq.last_gap is None
    assert seq.stats() == SequenceStats(accepted=2, gaps=0, gap_ticks=0, duplicates=1, out_of_order=1)


def test_kline_continues_after_seed() -> None:
    seq = Sequencer()
    seq.seed("binance", "BTCUSDT", "kline_1m", 1_700_000_000_005)
    assert seq.accept(tick("kline_1m", 1_700_000_000_005, event_ms=5)) is DUP  # stored before the restart
    assert seq.accept(tick("kline_1m", 1_700_000_000_006, event_ms=6)) is OK
    assert seq.accept(tick("kline_1m", 1_700_000_000_001, "ETHUSDT", event_ms=1)) is OK  # other streams untouched


def load_capture(name: str) -> list[tuple[dict[str, Any], Tick]]:
    """``(raw data, parsed tick)`` for every tick-bearing frame of a capture."""
    path = Path(__file__).resolve().parents[1] / "fixtures" / name
    out = []
    for line in path.read_text().splitlines():
        rec = orjson.loads(line)
        t = parse_frame(rec["frame"], int(rec["recv_ts"] * 1e6))
        if isinstance(t, dict):
            out.append((orjson.loads(rec["frame"])["data"], t))
    return out


@pytest.mark.parametrize("name", ["binance-spot-2021-10-12.jsonl", "binance-coinm-2021-07-22.jsonl"])
def test_captured_ticks_sequenced(name: str) -> None:
    seq = Sequencer()
    prev: dict[tuple[str, str], int] = {}
    numbered: dict[tuple[str, str], list[int]] = {}
    for data, t in load_capture(name):
        stream = (t["symbol"], t["channel"])
        verdict = seq.accept(t)
        before = prev.get(stream)
        if t["channel"].startswith("kline_"):
            # Known by event time, which is its seq.
            assert t["seq"] == data["E"]
            want = OK if before is None or data["E"] > before else (DUP if data["E"] == before else LATE)
            if want is OK:
                prev[stream] = data["E"]
                numbered.setdefault(stream, []).append(t["seq"])
        else:
            ident = data["u"] if t["channel"] == "book_ticker" else data["a"]
            if before is None or ident == before + 1:
                want = OK
            elif ident > before:
                want = OK if t["channel"] == "book_ticker" else GAP  # book update ids skip by design
            else:
                want = DUP if ident == before else LATE
            if want.accepted:
                prev[stream] = ident
        assert verdict is want, (name, data)
    assert numbered, "the capture holds klines"
    for numbers in numbered.values():
        assert numbers == sorted(set(numbers))


def test_venue_seq_checked_and_gaps_reported() -> None:
    seq = Sequencer()
    reports = []
    for s in (1, 2, 5, 4, 5, 6, 9, 3, 10, 12):
        verdict = seq.accept(tick("trade", s))
        reports.append((verdict, seq.last_gap))
    gap_3_4 = GapReport("binance", "BTCUSDT", "trade", 3, 4)
    gap_7_8 = GapReport("binance", "BTCUSDT", "trade", 7, 8)
    gap_11 = GapReport("binance", "BTCUSDT", "trade", 11, 11)
    assert reports == [
        (OK, None), (OK, None), (GAP, gap_3_4), (LATE, gap_3_4), (DUP, gap_3_4), (OK, gap_3_4),
        (GAP, gap_7_8), (LATE, gap_7_8), (OK, gap_7_8), (GAP, gap_11),
    ]
    assert seq.stats() == SequenceStats(accepted=7, gaps=3, gap_ticks=5, duplicates=1, out_of_order=2)
    assert seq.last_seq("binance", "BTCUSDT", "trade") == 12


def test_book_ticker_jumps_are_not_gaps() -> None:
    seq = Sequencer()
    assert [seq.accept(tick("book_ticker", u)) for u in (100, 104, 250, 250, 200, 251)] == [OK, OK, OK, DUP, LATE, OK]
    assert seq.last_gap is None
    assert seq.stats() == SequenceStats(accepted=4, gaps=0, gap_ticks=0, duplicates=1, out_of_order=1)


def test_venue_streams_are_independent() -> None:
    seq = Sequencer()
    assert seq.accept(tick("trade", 100)) is OK
    assert seq.accept(tick("trade", 5000, "ETHUSDT")) is OK  # first of its own stream: no gap
    assert seq.accept(tick("agg_trade", 7)) is OK
    assert seq.accept(tick("trade", 101)) is OK
    assert seq.accept(tick("trade", 9, venue="other")) is OK
    assert seq.last_gap is None


def test_seeded_venue_stream() -> None:
    seq = Sequencer()
    seq.seed("binance", "BTCUSDT", "trade", 100)
    assert seq.accept(tick("trade", 100)) is DUP
    assert seq.accept(tick("trade", 101)) is OK
    assert seq.accept(tick("trade", 104)) is GAP
    assert seq.last_gap == GapReport("binance", "BTCUSDT", "trade", 102, 103)


def test_seeded_book_ticker_stays_non_contiguous() -> None:
    seq = Sequencer()
    seq.seed("binance", "BTCUSDT", "book_ticker", 100)
    assert seq.accept(tick("book_ticker", 100)) is DUP
    assert seq.accept(tick("book_ticker", 140)) is OK
    assert seq.last_gap is None


def test_release_forgets_a_stream() -> None:
    seq = Sequencer()
    seq.accept(tick("trade", 10))
    seq.release("binance", "BTCUSDT", "trade")
    assert seq.last_seq("binance", "BTCUSDT", "trade") is None
    assert seq.accept(tick("trade", 3)) is OK  # starts again: no duplicate, no gap
    assert seq.last_gap is None


def test_venue_seq_is_never_rewritten() -> None:
    seq = Sequencer()
    t = tick("book_ticker", 400900217)
    seq.accept(t)
    assert t["seq"] == 400900217


@given(steps=st.lists(st.integers(1, 5), min_size=1, max_size=60), start=st.integers(0, 10**12))
def test_property_gap_reports_cover_exactly_the_missing_seqs(steps: list[int], start: int) -> None:
    seqs = [start]
    for step in steps:
        seqs.append(seqs[-1] + step)
    seq = Sequencer()
    reports = []
    for s in seqs:
        verdict = seq.accept(tick("agg_trade", s))
        assert verdict.accepted
        if verdict is GAP:
            assert seq.last_gap is not None
            reports.append(seq.last_gap)
    missing = {s for g in reports for s in range(g.first, g.last + 1)}
    assert missing == set(range(start, seqs[-1] + 1)) - set(seqs)
    assert all(g.first <= g.last for g in reports)
    assert len(reports) == sum(step > 1 for step in steps)
    assert seq.stats().gap_ticks == len(missing)
