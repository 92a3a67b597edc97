"""ops.bench.book runs, on synthetic diffs and on the real spot capture, and both books end the same.

Only the shape and the agreement are checked: no timing is asserted (a busy machine is slow, not wrong).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from ops.bench.book import NaiveBook, Workload, bench_book, capture_workload, levels_digest, synthetic_workload

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
KEYS = {
    "source", "updates", "levels_per_update", "depth", "updates_per_s", "baseline_updates_per_s", "ratio",
    "p50_us", "p99_us", "baseline_p50_us", "baseline_p99_us", "book_update_id", "baseline_update_id",
    "book_digest", "baseline_digest", "equal",
}


def reference_digest(work: Workload) -> str:
    """The final book of ``work`` by a dict of Decimal prices sorted once at the end, digested as the bench does."""
    bids = {Decimal(p): (p, s) for p, s in work.bids}
    asks = {Decimal(p): (p, s) for p, s in work.asks}
    for b, a, _ in work.diffs:
        for side, levels in ((bids, b), (asks, a)):
            for p, s in levels:
                if Decimal(s):
                    side[Decimal(p)] = (p, s)
                else:
                    side.pop(Decimal(p), None)
    return levels_digest(
        (tuple(bids[k] for k in sorted(bids, reverse=True)), tuple(asks[k] for k in sorted(asks)))
    )


def check(result: dict[str, object], work: Workload) -> None:
    assert set(result) == KEYS
    assert result["source"] == work.source
    assert result["updates"] == len(work.diffs)
    # both sides processed the same updates, to the same last update id, and ended with the same book
    assert result["book_update_id"] == result["baseline_update_id"] == work.diffs[-1][2]
    assert result["book_digest"] == result["baseline_digest"] == reference_digest(work)
    assert result["equal"] is True
    for name in ("updates_per_s", "baseline_updates_per_s", "ratio", "p50_us", "baseline_p50_us"):
        assert isinstance(result[name], int | float) and result[name] > 0, name
    assert result["p99_us"] >= result["p50_us"]  # type: ignore[operator]
    assert result["baseline_p99_us"] >= result["baseline_p50_us"]  # type: ignore[operator]


def test_synthetic_run() -> None:
    work = synthetic_workload(60, depth=30, seed=3)
    assert len(work.diffs) == 60 and len(work.bids) == len(work.asks) == 30
    result = bench_book(work)
    check(result, work)
    assert result["levels_per_update"] == round(sum(len(b) + len(a) for b, a, _ in work.diffs) / 60, 2)


def test_the_default_workload_is_synthetic_and_seeded() -> None:
    result = bench_book(updates=40, depth=10, seed=5)
    check(result, synthetic_workload(40, depth=10, seed=5))
    assert synthetic_workload(40, depth=10, seed=5) == synthetic_workload(40, depth=10, seed=5)


def test_the_spot_capture_replayed() -> None:
    frames, snapshots = FIXTURES / "binance-spot-2021-10-12.jsonl", FIXTURES / "binance-spot-2021-10-12.depth.jsonl"
    work = capture_workload(frames, snapshots, 400)
    assert work.source == "capture:NKNUSDT"  # the symbol with the most diffs
    assert len(work.diffs) == 400
    ids = [u for _, _, u in work.diffs]
    assert ids == sorted(set(ids))  # every pass continues after the one before
    check(bench_book(work), work)
    small = capture_workload(frames, snapshots, 3, symbol="RUNEEUR")
    assert small.source == "capture:RUNEEUR" and len(small.diffs) == 3
    check(bench_book(small), small)


def test_the_baseline_is_a_plain_sorted_dict() -> None:
    naive = NaiveBook()
    naive.apply_snapshot(1, [["1.5", "2"], ["1.4", "1"]], [["1.6", "3"]])
    naive.apply_diff([["1.5", "0"], ["1.45", "4"], ["9", "0"]], [["1.7", "1"]], 2)
    assert naive.levels() == ((("1.45", "4"), ("1.4", "1")), (("1.6", "3"), ("1.7", "1")))
    assert naive.update_id == 2


def test_a_capture_without_diffs_after_the_snapshot_is_refused(tmp_path: Path) -> None:
    snapshots = FIXTURES / "binance-spot-2021-10-12.depth.jsonl"
    frames = tmp_path / "none.jsonl"
    frames.write_text("")
    with pytest.raises(ValueError, match="no diffs"):
        capture_workload(frames, snapshots, 10)
