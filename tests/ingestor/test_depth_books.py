"""The ingestor's order books and the entries they store (ingestor/depth_books.py), fed by hand: pure."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from consumer_sdk.book_stream import decode, rebuild
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.tick import Tick, encode_tick
from ingestor.binance import BINANCE_SPOT
from ingestor.depth import DepthDiff, DepthRule, DepthSnapshot, SnapshotPolicy
from ingestor.depth_books import DepthBooks
from ingestor.okx import OKX_V5
from ingestor.pipeline import BadFrame, IngestPipeline
from ingestor.sequencer import Sequencer

TS = 1_700_000_000_000_000
BIDS = (("100.0", "1"), ("99.5", "2"))
ASKS = (("100.5", "1"), ("101.0", "3"))


def diff(first: int, last: int, bids: Any = (), asks: Any = (), symbol: str = "BTCUSDT", ms: int = 1000) -> DepthDiff:
    return DepthDiff(symbol, first, last, None, ms + last, tuple(bids), tuple(asks))


def snapshot(last: int, symbol: str = "BTCUSDT") -> DepthSnapshot:
    return DepthSnapshot(symbol, last, BIDS, ASKS)


def kinds(ticks: list[Tick]) -> list[tuple[str, int]]:
    entries: list[dict[str, Any]] = ticks  # type: ignore[assignment]  # depth entries, read as plain dicts
    return [(t.get("reason") or t["kind"], t["seq"]) for t in entries]


def synced(books: DepthBooks, symbol: str = "BTCUSDT", at: int = 10) -> list[Tick]:
    """Buffer a diff ending at ``at``, answer with a snapshot at ``at``: the book is loaded, in step."""
    assert books.on_diff(diff(at - 1, at, symbol=symbol), TS) == []
    assert books.wanted == [symbol] or symbol in books.wanted
    return books.on_snapshot(symbol, books.request(symbol), snapshot(at, symbol), TS)


def test_a_book_is_stored_from_a_start_snapshot_then_diff_by_diff() -> None:
    wants: list[int] = []
    books = DepthBooks("binance", ["BTCUSDT", "ETHUSDT"], on_want=lambda: wants.append(1))
    assert books.book("BTCUSDT") is None
    assert books.on_diff(diff(5, 9), TS) == [] and wants == [1] and books.wanted == ["BTCUSDT"]
    assert books.on_diff(diff(10, 12, bids=[("100.0", "5")]), TS) == []
    request = books.request("BTCUSDT")
    out = books.on_snapshot("BTCUSDT", request, snapshot(10), TS)
    # the snapshot at 10 drops 5..9; 10..12 joins it; the book after it is stored as the start snapshot, at 12
    assert kinds(out) == [("start", 12)]
    live = books.book("BTCUSDT")
    assert live is not None and live is books.book("BTCUSDT") and live.update_id == 12
    out += books.on_diff(diff(13, 13, asks=[("100.5", "0")]), TS)
    out += books.on_diff(diff(14, 15, bids=[("100.2", "1")]), TS)
    assert kinds(out) == [("start", 12), ("diff", 13), ("diff", 15)]
    entries = [decode(encode_tick(t)) for t in out]
    assert rebuild(entries) == live
    assert entries[1].first == 13 and entries[0].link == "next"
    assert books.on_diff(diff(14, 15), TS) == [], "a repeat changes nothing"
    assert books.resyncs == {} and books.stats().live == 1 and books.stats().diffs_stored == 2


def test_a_snapshot_no_held_diff_joins_is_stored_at_once_at_the_time_of_the_last_diff_seen() -> None:
    books = DepthBooks("binance", ["BTCUSDT"])
    out = synced(books, at=10)
    assert kinds(out) == [("start", 10)] and out[0]["ts_event"] == (1000 + 10) * 1000
    out = books.on_diff(diff(11, 12), TS)
    assert kinds(out) == [("diff", 12)]


def test_a_gap_resyncs_that_book_only_and_is_stored_as_a_resync_snapshot() -> None:
    resyncs: list[tuple[str, str]] = []
    books = DepthBooks("binance", ["BTCUSDT", "ETHUSDT"], on_resync=lambda s, r, d: resyncs.append((s, r)))
    synced(books, "BTCUSDT")
    synced(books, "ETHUSDT")
    assert books.on_diff(diff(13, 14), TS) == [] and books.book("BTCUSDT") is None
    assert resyncs == [("BTCUSDT", "gap")] and books.wanted == ["BTCUSDT"]
    assert kinds(books.on_diff(diff(11, 11, symbol="ETHUSDT"), TS)) == [("diff", 11)]
    out = books.on_snapshot("BTCUSDT", books.request("BTCUSDT"), snapshot(13), TS)
    assert kinds(out) == [("resync:gap", 14)]
    assert books.resyncs == {("BTCUSDT", "gap"): 1}


def test_a_crossed_book_is_not_stored_and_starts_over() -> None:
    books = DepthBooks("binance", ["BTCUSDT"])
    synced(books)
    assert books.on_diff(diff(11, 11, bids=[("100.7", "1")]), TS) == [], "the diff that crossed is not stored"
    assert books.resyncs == {("BTCUSDT", "crossed"): 1} and books.book("BTCUSDT") is None
    assert books.on_diff(diff(12, 12), TS) == []
    out = books.on_snapshot("BTCUSDT", books.request("BTCUSDT"), snapshot(12), TS)
    assert kinds(out) == [("resync:crossed", 12)]


def test_a_value_the_book_refuses_starts_that_book_over() -> None:
    books = DepthBooks("binance", ["BTCUSDT"])
    synced(books)
    # more decimals than the book's scale (8) holds: refused whole, the symbol starts over
    assert books.on_diff(diff(11, 11, bids=[("100.000000001", "1")]), TS) == []
    assert books.resyncs == {("BTCUSDT", "bad_level"): 1} and books.book("BTCUSDT") is None
    assert books.on_diff(diff(12, 12), TS) == [] and books.wanted == ["BTCUSDT"]
    out = books.on_snapshot("BTCUSDT", books.request("BTCUSDT"), snapshot(12), TS)
    assert kinds(out) == [("resync:bad_level", 12)]


def test_a_reconnect_resyncs_each_book_it_carried() -> None:
    books = DepthBooks("binance", ["BTCUSDT", "ETHUSDT"])
    synced(books, "BTCUSDT")
    books.on_reconnect(["BTCUSDT", "SOLUSDT"])
    assert books.resyncs == {("BTCUSDT", "reconnect"): 1}
    books.on_diff(diff(20, 21), TS)
    out = books.on_snapshot("BTCUSDT", books.request("BTCUSDT"), snapshot(20), TS)
    assert kinds(out) == [("resync:reconnect", 21)]


def test_what_the_stream_holds_already_is_applied_not_stored() -> None:
    books = DepthBooks("binance", ["BTCUSDT"])
    books.seed("BTCUSDT", 12)
    assert synced(books, at=10) == [], "a snapshot at 10 is not above the stream's 12"
    assert books.on_diff(diff(11, 12), TS) == []
    out = books.on_diff(diff(13, 13), TS)
    assert kinds(out) == [("start", 13)], "the first point above the stream's last is a snapshot"
    assert books.stats().not_stored == 1


def test_periodic_snapshots_replace_every_nth_diff() -> None:
    books = DepthBooks("binance", ["BTCUSDT"], policy=SnapshotPolicy(every_updates=3))
    out = synced(books)
    for u in range(11, 18):
        out += books.on_diff(diff(u, u), TS)
    assert kinds(out) == [("start", 10), ("diff", 11), ("diff", 12), ("periodic", 13), ("diff", 14), ("diff", 15),
                          ("periodic", 16), ("diff", 17)]
    entries = [decode(encode_tick(t)) for t in out]
    assert rebuild(entries) == books.book("BTCUSDT")
    assert books.stats().snapshots_stored == {"start": 1, "periodic": 2}


def test_a_failed_snapshot_leaves_the_book_waiting_for_another() -> None:
    books = DepthBooks("binance", ["BTCUSDT"])
    books.on_diff(diff(9, 10), TS)
    request = books.request("BTCUSDT")
    assert books.wanted == []
    books.on_snapshot_failed("BTCUSDT", request, "http_status: 429")
    assert books.wanted == ["BTCUSDT"] and books.resyncs == {("BTCUSDT", "snapshot_error"): 1}
    assert kinds(books.on_snapshot("BTCUSDT", books.request("BTCUSDT"), snapshot(10), TS)) == [("start", 10)]


def frame(symbol: str, first: int, last: int, bids: Any = ()) -> bytes:
    data = {"e": "depthUpdate", "E": 1_700_000_000_000, "s": symbol, "U": first, "u": last, "b": list(bids),
            "a": []}
    return orjson.dumps({"stream": f"{symbol.lower()}@depth@100ms", "data": data})


def test_the_pipeline_hands_diffs_to_the_books_and_refuses_what_none_is_kept_for() -> None:
    books = DepthBooks("binance", ["BTCUSDT"])
    p = IngestPipeline(BINANCE_SPOT, Sequencer(), depth=books)
    out = p.process(TS, [frame("BTCUSDT", 9, 10), frame("ETHUSDT", 1, 2), frame("BTCUSDT", 11, 11)])
    assert out.ticks == [] and isinstance(out.event, BadFrame) and out.event.kind == "unknown_symbol"
    out = p.process(TS, [frame("BTCUSDT", 9, 10), frame("ETHUSDT", 1, 2), frame("BTCUSDT", 11, 11)], out.resume)
    assert out.event is None and p.refused == {"unknown_symbol": 1}
    loaded = books.on_snapshot("BTCUSDT", books.request("BTCUSDT"), snapshot(10), TS)
    assert kinds(loaded) == [("start", 11)]
    out = p.process(TS, [frame("BTCUSDT", 12, 12, [["99.0", "1"]]), frame("BTCUSDT", 13, 13, [["x", "1"]])])
    assert kinds(out.ticks) == [("diff", 12)] and isinstance(out.event, BadFrame) and out.event.kind == "bad_number"
    # subscribed streams are checked as for any channel
    out = p.process(TS, [frame("BTCUSDT", 14, 14)], carried={"BTCUSDT": {"trade"}})
    assert isinstance(out.event, BadFrame) and out.event.kind == "unsubscribed"


def test_without_books_a_depth_update_is_an_event_not_carried() -> None:
    p = IngestPipeline(BINANCE_SPOT, Sequencer())
    assert p.process(TS, [frame("BTCUSDT", 9, 10)]).ticks == [] and p.unsupported == 1


class _TradesOnly:
    """A venue that parses trades and has no book parsing (no ``parse_frame_depth``)."""

    name = "trades_only"
    parse_frame = staticmethod(OKX_V5.parse_frame)


def test_a_venue_without_depth_parsing_is_refused() -> None:
    venue: Any = _TradesOnly()
    assert not hasattr(venue, "parse_frame_depth")
    with pytest.raises(ConfigError, match=r"venue trades_only: order books .* are not carried"):
        IngestPipeline(venue, Sequencer(), depth=DepthBooks("trades_only", ["BTC-USDT"]))


def test_okx_parses_its_books_for_the_pipeline_a_push_at_a_time() -> None:
    """OKX has book parsing: a ``books`` push is one message for the books; a push of several entries is refused
    (``batched``), while a push of several trades is still several ticks."""
    books = DepthBooks("okx", ["BTC-USDT"], rule=DepthRule.OKX)
    p = IngestPipeline(OKX_V5, Sequencer(), depth=books)
    entry = {"asks": [["101", "1", "0", "1"]], "bids": [["100", "2", "0", "1"]], "ts": "1652459224000",
             "checksum": 0, "seqId": 7, "prevSeqId": -1}
    snap = orjson.dumps({"arg": {"channel": "books", "instId": "BTC-USDT"}, "action": "snapshot", "data": [entry]})
    out = p.process(TS, [snap])
    assert out.event is None and [t["channel"] for t in out.ticks] == ["depth"] and books.book("BTC-USDT")
    update = {**entry, "asks": [], "bids": [["100", "3", "0", "1"]], "seqId": 8, "prevSeqId": 7}
    two = orjson.dumps({"arg": {"channel": "books", "instId": "BTC-USDT"}, "action": "update",
                        "data": [update, {**update, "seqId": 9, "prevSeqId": 8}]})
    out = p.process(TS, [two])
    assert isinstance(out.event, BadFrame) and out.event.kind == "batched" and books.resyncs == {}
    trades = orjson.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": [
        {"instId": "BTC-USDT", "tradeId": str(i), "px": "100", "sz": "1", "side": "buy", "ts": "1652459224000"}
        for i in (1, 2)
    ]})
    assert [t["seq"] for t in p.process(TS, [trades]).ticks] == [1, 2]


def test_entries_not_stored_make_the_next_diff_a_resync_snapshot_of_the_live_book() -> None:
    resyncs: list[tuple[str, str]] = []
    wants: list[int] = []
    books = DepthBooks("binance", ["BTCUSDT", "ETHUSDT"], on_resync=lambda s, r, d: resyncs.append((s, r)),
                       on_want=lambda: wants.append(1))
    synced(books, at=10)
    wants.clear()
    out = books.on_diff(diff(11, 11, bids=[("100.0", "4")]), TS)
    assert kinds(out) == [("diff", 11)]
    books.on_store_break("binance", "BTCUSDT", "paused")
    books.on_store_break("okx", "BTCUSDT", "dropped")  # another venue's book: not this one
    books.on_store_break("binance", "XRPUSDT", "dropped")  # a symbol not kept
    assert books.resyncs == {("BTCUSDT", "paused"): 1} and resyncs == [("BTCUSDT", "paused")]
    assert wants == [] and books.wanted == [], "the live book is in step: nothing is fetched"
    assert books.book("BTCUSDT") is not None
    out = books.on_diff(diff(12, 13, asks=[("100.5", "2")]), TS) + books.on_diff(diff(14, 14), TS)
    assert kinds(out) == [("resync:paused", 13), ("diff", 14)]
    live = books.book("BTCUSDT")
    assert live is not None and rebuild([decode(encode_tick(t)) for t in out]) == live
    assert books.stats().snapshots_stored == {"start": 1, "resync": 1}


def test_a_book_waiting_for_its_first_snapshot_keeps_its_reason() -> None:
    books = DepthBooks("binance", ["BTCUSDT"])
    books.on_store_break("binance", "BTCUSDT", "dropped")
    assert books.resyncs == {("BTCUSDT", "dropped"): 1}
    assert kinds(synced(books, at=10)) == [("start", 10)]
