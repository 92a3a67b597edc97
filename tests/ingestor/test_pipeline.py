"""The ingest pipeline alone: frames in, ticks and events out, no I/O (ingestor/pipeline.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.core.sequencing import Verdict
from consumer_sdk.core.tick import Tick
from ingestor.binance import BINANCE_SPOT, BinanceSpot, parse_frame
from ingestor.pipeline import BadFrame, GapFound, Ingested, IngestPipeline, LoopError, PipelineStats
from ingestor.sequencer import GapReport, Sequencer
from ingestor.venue import Reply, ServerShutdown

TS = 1_700_000_000_000_000
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "binance-spot-2021-10-12.jsonl"


def trade(tid: int, symbol: str = "BTCUSDT") -> bytes:
    return orjson.dumps({
        "stream": f"{symbol.lower()}@trade",
        "data": {"e": "trade", "E": tid, "s": symbol, "t": tid, "p": "1.5", "q": "2", "T": tid, "m": False},
    })


def book(u: int, symbol: str = "BTCUSDT") -> bytes:
    return orjson.dumps({
        "stream": f"{symbol.lower()}@bookTicker",
        "data": {"u": u, "s": symbol, "b": "1", "B": "2", "a": "3", "A": "4"},
    })


def seqs(ticks: list[Tick]) -> list[int]:
    return [t["seq"] for t in ticks]


def pipeline(holding: Any = None) -> IngestPipeline:
    return IngestPipeline(BINANCE_SPOT, Sequencer(), holding)


def test_one_read_becomes_its_ticks_in_order_and_is_counted() -> None:
    p = pipeline()
    out = p.process(TS, [trade(1), book(10), trade(2), book(12)])
    assert out == Ingested(out.ticks, [], None, 4)
    assert [(t["channel"], t["seq"], t["ts_recv"]) for t in out.ticks] == [
        ("trade", 1, TS), ("book_ticker", 10, TS), ("trade", 2, TS), ("book_ticker", 12, TS),
    ]
    assert p.stats() == PipelineStats(frames=4, ticks=4, rejected=0, malformed=0, unsupported=0, last_frame_us=TS)


def test_duplicates_and_late_ticks_are_dropped_and_counted() -> None:
    p = pipeline()
    out = p.process(TS, [trade(1), trade(2), trade(2), trade(1), book(5), book(4), book(5)])
    assert seqs(out.ticks) == [1, 2, 5] and out.event is None
    assert (p.ticks, p.rejected) == (3, 4)


def test_a_gap_stops_the_read_after_the_tick_that_revealed_it() -> None:
    p = pipeline()
    frames = [trade(1), trade(2), trade(6), trade(7), trade(9)]
    out = p.process(TS, frames)
    assert seqs(out.ticks) == [1, 2] and out.held == [] and out.resume == 3
    assert isinstance(out.event, GapFound)
    assert out.event.gap == GapReport("binance", "BTCUSDT", "trade", 3, 5)
    assert out.event.tick["seq"] == 6
    rest = p.process(TS, frames, out.resume)
    assert seqs(rest.ticks) == [7] and rest.resume == 5
    assert isinstance(rest.event, GapFound) and rest.event.gap.first == rest.event.gap.last == 8
    last = p.process(TS, frames, rest.resume)
    assert last == Ingested([], [], None, 5)
    # the frames of one read are counted once, whatever the number of calls; the gap ticks were accepted
    assert (p.frames, p.ticks) == (5, 5)


def test_jumps_where_ids_skip_by_design_are_no_gap() -> None:
    out = pipeline().process(TS, [book(1), book(50), book(51), book(4000)])
    assert seqs(out.ticks) == [1, 50, 51, 4000] and out.event is None


def test_replies_and_shutdown_notices_stop_the_read_where_they_came() -> None:
    p = pipeline()
    frames = [trade(1), b'{"result":null,"id":7}', trade(2), b'{"e":"serverShutdown","E":5}', trade(3)]
    first = p.process(TS, frames)
    assert seqs(first.ticks) == [1] and first.event == Reply(id=7) and first.resume == 2
    second = p.process(TS, frames, first.resume)
    assert seqs(second.ticks) == [2] and second.event == ServerShutdown(5000) and second.resume == 4
    third = p.process(TS, frames, second.resume)
    assert seqs(third.ticks) == [3] and third.event is None and third.resume == 5


def test_malformed_frames_are_events_and_events_not_carried_are_counted() -> None:
    p = pipeline()
    frames = [b"not json", trade(1), b'{"e":"depthUpdate","s":"BTCUSDT"}', trade(2)]
    out = p.process(TS, frames)
    assert out.ticks == [] and out.resume == 1
    assert isinstance(out.event, BadFrame) and out.event.raw == b"not json" and out.event.error.startswith("not JSON")
    out = p.process(TS, frames, out.resume)
    assert seqs(out.ticks) == [1, 2] and out.event is None
    assert (p.malformed, p.unsupported, p.ticks) == (1, 1, 2)


def test_ticks_of_a_stream_under_repair_are_held_gaps_and_all() -> None:
    holding: dict[tuple[str, str, str], list[Tick]] = {}
    p = pipeline(holding)
    assert seqs(p.process(TS, [trade(1), trade(1, "ETHUSDT")]).ticks) == [1, 1]
    holding[("binance", "BTCUSDT", "trade")] = []
    out = p.process(TS, [trade(2), trade(2, "ETHUSDT"), trade(9), trade(2)])
    # BTCUSDT's 9 jumps, but its stream is held already: the repairer marks that hole when it releases
    assert [(t["symbol"], t["seq"]) for t in out.ticks] == [("ETHUSDT", 2)]
    assert seqs(out.held) == [2, 9] and out.event is None
    assert (p.ticks, p.rejected) == (5, 1)


def test_an_unexpected_exception_ends_the_read_keeping_what_went_before() -> None:
    class Broken(BinanceSpot):
        __slots__ = ()

        @staticmethod
        def parse_frame(raw: str | bytes, ts_recv: int) -> Any:
            if raw == b"boom":
                raise RuntimeError("a bug")
            return parse_frame(raw, ts_recv)

    p = IngestPipeline(Broken(), Sequencer())
    out = p.process(TS, [trade(1), trade(2), b"boom", trade(3)])
    assert seqs(out.ticks) == [1, 2] and out.resume == 3
    assert isinstance(out.event, LoopError) and str(out.event.error) == "a bug"
    assert p.ticks == 2


def test_recorded_binance_frames_give_what_parse_and_accept_give() -> None:
    """On real venue bytes: the pipeline's ticks are exactly what the parser and the sequencer let through."""
    records = [orjson.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    frames = [r["frame"].encode() for r in records]
    reference: list[Tick] = []
    seq = Sequencer()
    for raw in frames:
        t = parse_frame(raw, TS)
        if isinstance(t, dict) and seq.accept(t).accepted:
            reference.append(t)
    p = pipeline()
    got: list[Tick] = []
    start = 0
    while True:
        out = p.process(TS, frames, start)
        got += out.ticks
        if isinstance(out.event, GapFound):
            got.append(out.event.tick)
        if out.event is None:
            break
        start = out.resume
    assert got == reference and len(got) > 50
    assert p.frames == len(frames) and p.ticks == len(reference)
    assert p.unsupported == sum(1 for raw in frames if parse_frame(raw, TS) is None)


@given(st.lists(st.integers(min_value=0, max_value=40), max_size=60), st.integers(min_value=1, max_value=9))
def test_in_reads_of_any_size_the_pipeline_lets_through_what_the_sequencer_accepts(ids: list[int], size: int) -> None:
    """Any ids, cut into reads of ``size``: the ticks (gap ticks in place) and the holes reported are the
    sequencer's accepted ticks and its ``last_gap`` after each ``GAP``."""
    frames = [trade(i) for i in ids]
    reference_seq = Sequencer()
    expected: list[int] = []
    expected_gaps: list[GapReport] = []
    for i in ids:
        tick = parse_frame(trade(i), TS)
        assert isinstance(tick, dict)
        verdict = reference_seq.accept(tick)
        if verdict.accepted:
            expected.append(i)
        if verdict is Verdict.GAP:
            assert reference_seq.last_gap is not None
            expected_gaps.append(reference_seq.last_gap)
    p = pipeline()
    got: list[int] = []
    gaps: list[GapReport] = []
    for k in range(0, len(frames), size):
        read = frames[k : k + size]
        start = 0
        while True:
            out = p.process(TS, read, start)
            got += seqs(out.ticks)
            if isinstance(out.event, GapFound):
                got.append(out.event.tick["seq"])
                gaps.append(out.event.gap)
            if out.event is None:
                break
            start = out.resume
    assert got == expected and gaps == expected_gaps
    assert p.frames == len(ids) and p.ticks == len(expected) and p.rejected == len(ids) - len(expected)
