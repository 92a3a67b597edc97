"""OKX ``books`` kept by the project's book machinery (:class:`~ingestor.depth_books.DepthBooks`, rule
:data:`~ingestor.depth.DepthRule.OKX`, :class:`~ingestor.depth_ws.WsBookSync`, :class:`~consumer_sdk.book.Book`).

The real capture proves the book against the venue itself: every one of its 290 ``books`` messages carries OKX's
checksum of the venue's own book, and the general book must give the same number after each.  Generated streams in
today's form (``seqId``/``prevSeqId``, ``checksum`` 0) prove the continuity rule, a resync and the book after the
fresh snapshot, against a book built here independently (a dict keyed by :class:`~decimal.Decimal` price).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.book import Book
from consumer_sdk.book_stream import decode, rebuild
from consumer_sdk.core.tick import Tick, encode_tick
from ingestor.depth import Action, DepthDiff, DepthRule, DepthSnapshot, DepthSync, SyncState
from ingestor.depth_books import DepthBooks
from ingestor.depth_ws import WS_RESYNC_REASONS, WsBookSync, new_sync
from ingestor.okx import depth_diff, okx_checksum, parse_frame_depth
from ingestor.venue import Reply

CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "okx-2022-05-13.jsonl"
TS = 1_700_000_000_000_000
INSTRUMENTS = ("BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP")


def capture_messages() -> list[DepthDiff]:
    """The capture's ``books`` messages as the pipeline hands them to the books, in order."""
    out = []
    for line in CAPTURE.read_text().splitlines():
        rec = orjson.loads(line)
        parsed = parse_frame_depth(rec["frame"], int(rec["recv_ts"] * 1e6))
        if isinstance(parsed, DepthDiff):
            out.append(parsed)
    return out


CAPTURED = capture_messages()


class Recorder:
    """What the books asked of the I/O layer: resyncs logged, streams to subscribe again."""

    def __init__(self) -> None:
        self.resyncs: list[tuple[str, str]] = []
        self.resubscribe: list[tuple[str, str]] = []

    def books(self, symbols: Sequence[str]) -> DepthBooks:
        return DepthBooks(
            "okx", symbols, rule=DepthRule.OKX, on_resync=lambda s, r, d: self.resyncs.append((s, r)),
            on_resubscribe=lambda s, r: self.resubscribe.append((s, r)),
        )


def feed(books: DepthBooks, messages: Sequence[DepthDiff]) -> list[Tick]:
    out: list[Tick] = []
    for m in messages:
        out += books.on_diff(m, TS)
    return out


def replayed(entries: Sequence[Tick], symbol: str) -> Book:
    """The book the stored stream of ``symbol`` rebuilds to (as ``market book`` reads it)."""
    return rebuild([decode(encode_tick(e)) for e in entries if e["symbol"] == symbol])


def signed_crc(text: str) -> int:
    return int(struct.unpack("<i", struct.pack("<I", zlib.crc32(text.encode())))[0])


# -- the capture: the venue's own checksums --------------------------------------------------------------------


def test_the_general_book_gives_the_venue_checksum_after_every_message_of_the_capture() -> None:
    assert len(CAPTURED) == 290 and all(m.checksum for m in CAPTURED)
    assert sum(m.snapshot for m in CAPTURED) == 3
    rec = Recorder()
    books = rec.books(INSTRUMENTS)
    entries = feed(books, CAPTURED)
    assert books.checksums == {"equal": 290, "mismatch": 0}
    assert books.resyncs == {} and rec.resyncs == [] and rec.resubscribe == []
    assert books.stats().live == 3
    for inst in INSTRUMENTS:
        live = books.book(inst)
        assert live is not None and live.check() == []
        assert okx_checksum(*live.top(25)) == [m.checksum for m in CAPTURED if m.symbol == inst][-1]
        # The stored stream: a start snapshot, then diffs following by pu; it rebuilds to the live book.
        mine = [e for e in entries if e["symbol"] == inst]
        assert [e.get("reason") for e in mine if e["kind"] == "snapshot"] == ["start"]
        assert replayed(entries, inst) == live.copy()
    spot = books.book("BTC-USDT")
    assert spot is not None and spot.depth() == (400, 400)  # 400 levels a side, as the channel sends


@pytest.mark.parametrize("at", ["snapshot", "update"])
def test_a_level_altered_is_caught_by_the_checksum_and_resyncs_that_book_only(at: str) -> None:
    """A size changed at the best bid (a snapshot's, or one set by an update): the venue's checksum of that
    message no longer matches, the book is void, counted ``checksum``, and its stream is to be subscribed again;
    the other books go on verified."""
    inst = "UNI-USD-SWAP"
    idx = [i for i, m in enumerate(CAPTURED) if m.symbol == inst]
    k = idx[0] if at == "snapshot" else idx[len(idx) // 2]
    rec = Recorder()
    books = rec.books(INSTRUMENTS)
    before = feed(books, CAPTURED[:k])
    m = CAPTURED[k]
    if at == "snapshot":
        (price, size), *rest = m.bids
        altered = DepthDiff(m.symbol, m.first_id, m.last_id, m.prev_id, m.event_ms, ((price, size + "1"), *rest),
                            m.asks, snapshot=True, checksum=m.checksum)
    else:
        live = books.book(inst)
        assert live is not None
        best = live.best_bid()
        assert best is not None
        altered = DepthDiff(m.symbol, m.first_id, m.last_id, m.prev_id, m.event_ms, (*m.bids, (best[0], "123.456")),
                            m.asks, checksum=m.checksum)
    assert books.on_diff(altered, TS) == []  # the message that failed its checksum is not stored
    assert books.resyncs == {(inst, "checksum"): 1}
    assert rec.resubscribe == [(inst, "checksum")] and books.resubscribing == [inst]
    assert books.book(inst) is None and books.checksums["mismatch"] == 1
    after = feed(books, CAPTURED[k + 1:])
    assert books.resyncs == {(inst, "checksum"): 1}  # the updates of a void book are dropped, not counted again
    assert books.checksums == {"equal": 290 - (len(idx) - idx.index(k)), "mismatch": 1}
    assert not any(e["symbol"] == inst for e in after)
    assert {e["symbol"] for e in after} == set(INSTRUMENTS) - {inst}
    assert all(books.book(i) is not None for i in INSTRUMENTS if i != inst)
    assert before or at == "snapshot"


def test_after_a_mismatch_the_fresh_snapshot_of_the_new_subscription_is_stored_as_a_resync() -> None:
    """The venue's book at message j (rebuilt from the unaltered capture, its checksum the venue's) arrives as the
    snapshot of the new subscription; the updates after it verify again, and the stream rebuilds to that book."""
    inst = "BTC-USD-220527"
    idx = [i for i, m in enumerate(CAPTURED) if m.symbol == inst]
    k, j = idx[len(idx) // 3], idx[2 * len(idx) // 3]
    truth = Recorder().books([inst])
    feed(truth, [m for m in CAPTURED[: j + 1] if m.symbol == inst])
    venue_book = truth.book(inst)
    assert venue_book is not None
    bids, asks = venue_book.levels()
    m = CAPTURED[j]
    fresh = DepthDiff(inst, m.last_id, m.last_id, None, m.event_ms, bids, asks, snapshot=True, checksum=m.checksum)
    rec = Recorder()
    books = rec.books([inst])
    mine = [m for m in CAPTURED if m.symbol == inst]
    entries = feed(books, mine[: idx.index(k)])
    bad = CAPTURED[k]
    entries += books.on_diff(DepthDiff(inst, bad.first_id, bad.last_id, bad.prev_id, bad.event_ms,
                                       (*bad.bids, (bids[0][0], "99999")), bad.asks, checksum=bad.checksum), TS)
    entries += feed(books, mine[idx.index(k) + 1: idx.index(j) + 1])  # dropped: no book until the snapshot
    entries += books.on_diff(fresh, TS)
    entries += feed(books, mine[idx.index(j) + 1:])
    feed(truth, [m for m in CAPTURED[j + 1:] if m.symbol == inst])
    assert truth.checksums == {"equal": len(idx), "mismatch": 0} and books.checksums["mismatch"] == 1
    assert books.resyncs == {(inst, "checksum"): 1} and books.resubscribing == []
    assert [e.get("reason") for e in entries if e["kind"] == "snapshot"] == ["start", "resync:checksum"]
    live = books.book(inst)
    assert live is not None and live == truth.book(inst)
    assert replayed(entries, inst) == live.copy()


# -- today's form: seqId / prevSeqId, checksum 0 ----------------------------------------------------------------

PRICE = st.integers(1, 99).map(lambda n: f"{100 + n / 10:g}")
SIZE = st.sampled_from(["1", "2.5", "0.010", "7"])


@st.composite
def stream(draw: st.DrawFn) -> list[DepthDiff]:
    """A snapshot and updates of one instrument in OKX's current form: seqId rising by random steps, each update's
    prevSeqId the seqId before it, bids below 110 and asks from 110 (never crossed), checksum 0."""
    seq = draw(st.integers(0, 10**12))
    snap_bids = draw(st.dictionaries(PRICE, SIZE, max_size=6))
    snap_asks = draw(st.dictionaries(PRICE.map(lambda p: str(Decimal(p) + 10)), SIZE, max_size=6))
    out = [DepthDiff("BTC-USDT", seq, seq, None, 1_700_000_000_000, tuple(snap_bids.items()),
                     tuple(snap_asks.items()), snapshot=True)]
    for n in range(draw(st.integers(2, 14))):
        prev, seq = seq, seq + draw(st.integers(1, 1000))
        bids = draw(st.lists(st.tuples(PRICE, st.sampled_from(["0", "1", "3.25"])), max_size=4))
        asks = draw(st.lists(st.tuples(PRICE.map(lambda p: str(Decimal(p) + 10)), st.sampled_from(["0", "2"])),
                             max_size=4))
        out.append(DepthDiff("BTC-USDT", seq, seq, prev, 1_700_000_000_001 + n, tuple(bids), tuple(asks)))
    return out


def reference(messages: Sequence[DepthDiff]) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
    """The book the messages make, built without the project's book: Decimal price -> Decimal size, best first."""
    sides: list[dict[Decimal, Decimal]] = [{}, {}]
    for m in messages:
        if m.snapshot:
            sides = [{}, {}]
        for side, levels in zip(sides, (m.bids, m.asks), strict=True):
            for price, size in levels:
                if Decimal(size):
                    side[Decimal(price)] = Decimal(size)
                else:
                    side.pop(Decimal(price), None)
    bids, asks = sides
    return sorted(bids.items(), reverse=True), sorted(asks.items())


def numbers(book: Any) -> tuple[list[tuple[Decimal, Decimal]], list[tuple[Decimal, Decimal]]]:
    bids, asks = book.levels()
    return [(Decimal(p), Decimal(s)) for p, s in bids], [(Decimal(p), Decimal(s)) for p, s in asks]


def snapshot_of(messages: Sequence[DepthDiff]) -> DepthDiff:
    """What a new subscription sends after ``messages``: the book they make, at the last one's seqId."""
    bids, asks = reference(messages)
    last = messages[-1]
    return DepthDiff(last.symbol, last.last_id, last.last_id, None, last.event_ms,
                     tuple((str(p), str(s)) for p, s in bids), tuple((str(p), str(s)) for p, s in asks), snapshot=True)


@given(messages=stream())
def test_a_continuous_stream_never_resyncs_and_is_stored_diff_by_diff(messages: list[DepthDiff]) -> None:
    rec = Recorder()
    books = rec.books(["BTC-USDT"])
    entries = feed(books, messages)
    assert books.resyncs == {} and rec.resubscribe == [] and books.checksums == {"equal": 0, "mismatch": 0}
    assert [e["kind"] for e in entries] == ["snapshot"] + ["diff"] * (len(messages) - 1)
    assert [e.get("pu") for e in entries[1:]] == [m.prev_id for m in messages[1:]]
    assert not any("first" in e for e in entries)  # OKX sends no first id: the diffs follow by pu alone
    live = books.book("BTC-USDT")
    assert live is not None and numbers(live) == reference(messages)
    assert replayed(entries, "BTC-USDT") == live.copy()


@given(messages=stream(), data=st.data())
def test_one_update_removed_resyncs_once_and_the_fresh_snapshot_gives_the_venue_book(
    messages: list[DepthDiff], data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, len(messages) - 2), label="removed update")
    j = data.draw(st.integers(k + 1, len(messages) - 1), label="the new subscription's snapshot at")
    rec = Recorder()
    books = rec.books(["BTC-USDT"])
    entries = feed(books, messages[:k])
    entries += feed(books, messages[k + 1: j + 1])  # the first of these breaks the chain; the rest are dropped
    assert books.resyncs == {("BTC-USDT", "gap"): 1}
    assert rec.resubscribe == [("BTC-USDT", "gap")] and books.book("BTC-USDT") is None
    entries += books.on_diff(snapshot_of(messages[: j + 1]), TS)
    entries += feed(books, messages[j + 1:])
    assert books.resyncs == {("BTC-USDT", "gap"): 1} and rec.resubscribe == [("BTC-USDT", "gap")]
    live = books.book("BTC-USDT")
    assert live is not None and numbers(live) == reference(messages)
    assert [e.get("reason") for e in entries if e["kind"] == "snapshot"] == ["start", "resync:gap"]
    assert replayed(entries, "BTC-USDT") == live.copy()


def test_a_keepalive_changes_nothing_and_the_chain_goes_on_across_it() -> None:
    books = Recorder().books(["BTC-USDT"])
    snap = DepthDiff("BTC-USDT", 5, 5, None, 1, (("100", "1"),), (("101", "1"),), snapshot=True)
    quiet = DepthDiff("BTC-USDT", 5, 5, 5, 2, (), ())
    nxt = DepthDiff("BTC-USDT", 6, 6, 5, 3, (("100", "2"),), ())
    entries = feed(books, [snap, quiet, quiet, nxt])
    assert [(e["kind"], e["seq"]) for e in entries] == [("snapshot", 5), ("diff", 6)] and books.resyncs == {}


def test_a_snapshot_that_comes_unasked_replaces_the_book_and_is_stored_as_such_not_counted() -> None:
    rec = Recorder()
    books = rec.books(["BTC-USDT"])
    msgs = [
        DepthDiff("BTC-USDT", 5, 5, None, 1, (("100", "1"),), (("101", "1"),), snapshot=True),
        DepthDiff("BTC-USDT", 6, 6, 5, 2, (("99", "1"),), ()),
        DepthDiff("BTC-USDT", 9, 9, None, 3, (("98", "1"),), (("101", "2"),), snapshot=True),
        DepthDiff("BTC-USDT", 10, 10, 9, 4, (("98", "3"),), ()),
    ]
    entries = feed(books, msgs)
    assert [(e.get("reason") or e["kind"], e["seq"]) for e in entries] == [
        ("start", 5), ("diff", 6), ("resync:snapshot", 9), ("diff", 10)]
    assert books.resyncs == {} and rec.resubscribe == []
    assert replayed(entries, "BTC-USDT") == books.book("BTC-USDT")


def test_an_update_naming_the_last_seq_as_its_own_with_levels_is_applied_not_a_reset() -> None:
    rec = Recorder()
    books = rec.books(["BTC-USDT"])
    feed(books, [DepthDiff("BTC-USDT", 5, 5, None, 1, (("100", "1"),), (("101", "1"),), snapshot=True),
                 DepthDiff("BTC-USDT", 5, 5, 5, 2, (("100", "4"),), ())])
    live = books.book("BTC-USDT")
    assert live is not None and live.best_bid() == ("100", "4") and books.resyncs == {}


def test_a_sequence_reset_is_followed_by_the_book_and_marked_in_the_stored_stream() -> None:
    """OKX's maintenance: seqId falls below prevSeqId (which still names the last seqId), and the ids go on from
    there.  The book follows (no resubscribe); the stream, whose seq only rises, stores nothing until the ids pass
    its last seq, then a ``resync:seq_reset`` snapshot of the live book."""
    rec = Recorder()
    books = rec.books(["BTC-USDT"])
    msgs = [
        DepthDiff("BTC-USDT", 100, 100, None, 1, (("100", "1"),), (("101", "1"),), snapshot=True),
        DepthDiff("BTC-USDT", 110, 110, 100, 2, (("99", "1"),), ()),
        DepthDiff("BTC-USDT", 3, 3, 110, 3, (("98", "1"),), ()),       # the reset
        DepthDiff("BTC-USDT", 50, 50, 3, 4, (("100", "0"),), ()),
        DepthDiff("BTC-USDT", 111, 111, 50, 5, (), (("102", "4"),)),   # past the last seq stored (110)
        DepthDiff("BTC-USDT", 112, 112, 111, 6, (), (("103", "4"),)),
    ]
    entries = feed(books, msgs)
    assert rec.resubscribe == [] and books.resyncs == {("BTC-USDT", "seq_reset"): 1}
    assert [(e.get("reason") or e["kind"], e["seq"]) for e in entries] == [
        ("start", 100), ("diff", 110), ("resync:seq_reset", 111), ("diff", 112)]
    live = books.book("BTC-USDT")
    assert live is not None and numbers(live) == reference(msgs)
    assert replayed(entries, "BTC-USDT") == live.copy()


def test_a_reconnect_voids_the_book_without_resubscribing_and_the_next_snapshot_restores_it() -> None:
    rec = Recorder()
    books = rec.books(["BTC-USDT"])
    feed(books, [DepthDiff("BTC-USDT", 5, 5, None, 1, (("100", "1"),), (("101", "1"),), snapshot=True)])
    books.on_reconnect(["BTC-USDT"])
    assert books.book("BTC-USDT") is None and rec.resubscribe == [] and books.resyncs == {("BTC-USDT", "reconnect"): 1}
    assert books.on_diff(DepthDiff("BTC-USDT", 9, 9, 8, 2, (("100", "2"),), ()), TS) == []
    out = books.on_diff(DepthDiff("BTC-USDT", 9, 9, None, 3, (("100", "2"),), (("101", "1"),), snapshot=True), TS)
    assert [(e.get("reason"), e["seq"]) for e in out] == [("resync:reconnect", 9)]


def test_a_crossed_book_and_a_refused_level_ask_for_a_new_subscription() -> None:
    rec = Recorder()
    books = rec.books(["BTC-USDT"])
    snap = DepthDiff("BTC-USDT", 5, 5, None, 1, (("100", "1"),), (("101", "1"),), snapshot=True)
    feed(books, [snap, DepthDiff("BTC-USDT", 6, 6, 5, 2, (("101", "1"),), ())])
    feed(books, [snap, DepthDiff("BTC-USDT", 7, 7, 5, 3, (("100.123456789", "1"),), ())])
    assert rec.resubscribe == [("BTC-USDT", "crossed"), ("BTC-USDT", "bad_level")]
    assert books.resyncs == {("BTC-USDT", "crossed"): 1, ("BTC-USDT", "bad_level"): 1}


def test_the_book_keeps_the_latest_strings_of_a_level_so_the_checksum_uses_them() -> None:
    """OKX computes its checksum from its own strings: ``"0.10"`` and ``"0.1"`` are one level, and the book gives
    back exactly the strings of the message that set it last."""
    book = Book()
    book.apply_snapshot(1, [("0.10", "1.0")], [("0.20", "3")])
    assert book.top(25) == ((("0.10", "1.0"),), (("0.20", "3"),))
    assert okx_checksum(*book.top(25)) == signed_crc("0.10:1.0:0.20:3")
    book.apply_diff([("0.1", "2")], [], 2)
    assert book.top(25) == ((("0.1", "2"),), (("0.20", "3"),)) and book.depth() == (1, 1)
    assert okx_checksum(*book.top(25)) == signed_crc("0.1:2:0.20:3")


def test_the_book_moves_below_its_update_id_only_when_told_the_ids_were_reset() -> None:
    book = Book()
    book.apply_snapshot(10, [("1", "1")], [])
    with pytest.raises(ValueError, match="below"):
        book.apply_diff([("1", "2")], [], 9)
    book.apply_diff([("1", "2")], [], 9, reset=True)
    assert book.update_id == 9 and book.best_bid() == ("1", "2")


# -- the pure rule ----------------------------------------------------------------------------------------------


def upd(seq: int, prev: int | None, bids: Any = (("1", "1"),), asks: Any = ()) -> DepthDiff:
    return DepthDiff("X", seq, seq, prev, 1, tuple(bids), tuple(asks))


def live_at(last: int) -> WsBookSync:
    sync = WsBookSync("X")
    assert sync.on_diff(DepthDiff("X", last, last, None, 1, (), (), snapshot=True)).action is Action.LOAD
    return sync


IDS = st.integers(0, 2**40)


@given(last=IDS, prev=IDS, seq=IDS)
def test_follows_is_exactly_prev_seq_id_equal_to_the_last_seq_id(last: int, prev: int, seq: int) -> None:
    assert WsBookSync.follows(last, upd(seq, prev)) is (prev == last)
    assert WsBookSync.follows(last, upd(seq, last)) is True
    assert WsBookSync.follows(last, upd(seq, last + 1)) is False
    assert WsBookSync.follows(last + 1, upd(seq, last)) is False
    assert WsBookSync.follows(last, upd(seq, None)) is None
    assert WsBookSync.is_reset(upd(seq, prev)) is (seq < prev)


@given(last=IDS)
def test_a_keepalive_is_exactly_seq_equal_prev_equal_last_without_levels(last: int) -> None:
    assert WsBookSync.is_keepalive(last, upd(last, last, ()))
    assert not WsBookSync.is_keepalive(last, upd(last, last))  # a level: not a keep-alive
    assert not WsBookSync.is_keepalive(last, upd(last, last, (), (("2", "1"),)))
    assert not WsBookSync.is_keepalive(last, upd(last + 1, last, ()))
    assert not WsBookSync.is_keepalive(last + 1, upd(last, last, ()))
    assert not WsBookSync.is_keepalive(last, upd(last, last + 1, ()))


@given(last=IDS, prev=IDS, seq=IDS, levels=st.booleans())
def test_an_update_on_a_live_book_is_applied_dropped_or_resubscribed_by_the_rule(
    last: int, prev: int, seq: int, levels: bool
) -> None:
    sync = live_at(last)
    m = upd(seq, prev, (("1", "1"),) if levels else ())
    d = sync.on_diff(m)
    if prev == last and seq == last and not levels:
        assert (d.action, d.reason, sync.last_update_id) == (Action.DROPPED, "keepalive", last)
    elif prev == last:
        assert (d.action, d.diffs, sync.last_update_id, sync.synced) == (Action.APPLY, (m,), seq, True)
        assert d.reason == ("seq_reset" if seq < prev else "") and sync.resets == (seq < prev)
    elif prev < last and seq <= last:  # a copy of an update the book holds (a rotation's second connection)
        assert (d.action, d.reason, sync.last_update_id, sync.synced) == (Action.DROPPED, "duplicate", last, True)
    else:
        assert (d.action, d.reason, d.void_book) == (Action.RESUBSCRIBE, "gap", True)
        assert sync.wants_resubscribe and not sync.synced and sync.last_update_id is None
        assert sync.stats().resyncs == {**dict.fromkeys(WS_RESYNC_REASONS, 0), "gap": 1}


def test_a_rotation_s_two_connections_deliver_each_message_twice_and_the_book_takes_it_once() -> None:
    """Make-before-break: the old connection's updates and the new one's snapshot, then both connections' copies of
    the same updates, interleaved: no resync, the stored stream as from one connection."""
    rec = Recorder()
    books = rec.books(["BTC-USDT"])
    snap = DepthDiff("BTC-USDT", 5, 5, None, 1, (("100", "1"),), (("101", "1"),), snapshot=True)
    u6 = DepthDiff("BTC-USDT", 6, 6, 5, 2, (("99", "1"),), ())
    u7 = DepthDiff("BTC-USDT", 7, 7, 6, 3, (("98", "1"),), ())
    u8 = DepthDiff("BTC-USDT", 8, 8, 7, 4, (("100", "2"),), ())
    new_snap = DepthDiff("BTC-USDT", 6, 6, None, 2, (("100", "1"), ("99", "1")), (("101", "1"),), snapshot=True)
    entries = feed(books, [snap, u6, u7, new_snap, u7, u8, u8])
    assert [(e.get("reason") or e["kind"], e["seq"]) for e in entries] == [
        ("start", 5), ("diff", 6), ("diff", 7), ("diff", 8)]
    assert books.resyncs == {} and rec.resubscribe == []
    live = books.book("BTC-USDT")
    assert live is not None and live.best_bid() == ("100", "2") and replayed(entries, "BTC-USDT") == live
    assert books.state("BTC-USDT").sync.stats().dropped == 3  # the snapshot behind the book, u7 and u8 again


def test_the_procedure_from_no_book_to_live_and_back() -> None:
    sync = WsBookSync("X")
    assert (sync.state, sync.synced, sync.wants_snapshot, sync.wants_resubscribe) == (
        SyncState.BUFFERING, False, False, False)
    d = sync.on_diff(upd(5, 4))
    assert (d.action, d.reason) == (Action.DROPPED, "no_snapshot")
    d = sync.on_diff(DepthDiff("X", 7, 7, None, 1, (("1", "1"),), (("2", "1"),), snapshot=True, checksum=-3))
    assert d.action is Action.LOAD and d.snapshot is not None
    assert (d.snapshot.last_update_id, d.snapshot.bids, d.snapshot.checksum) == (7, (("1", "1"),), -3)
    assert sync.last_update_id == 7 and sync.synced
    assert sync.on_diff(upd(9, 7)).action is Action.APPLY
    assert sync.on_diff(upd(12, 9)).action is Action.APPLY and sync.last_update_id == 12
    d = sync.on_checksum_mismatch("x")
    assert (d.action, d.reason, d.void_book, sync.wants_resubscribe) == (Action.RESUBSCRIBE, "checksum", True, True)
    assert sync.on_diff(upd(13, 12)).reason == "no_snapshot"  # no book: nothing chains until the snapshot
    with pytest.raises(RuntimeError):
        sync.on_crossed()
    d = sync.on_diff(DepthDiff("X", 20, 20, None, 1, (), (), snapshot=True))
    assert d.action is Action.LOAD and not sync.wants_resubscribe
    d = sync.on_crossed()
    assert (d.action, d.reason) == (Action.RESUBSCRIBE, "crossed")
    d = sync.on_reconnect()
    assert (d.action, d.reason, d.void_book, sync.wants_resubscribe) == (Action.RESYNC, "reconnect", False, False)
    assert sync.on_refused("bad").action is Action.RESUBSCRIBE
    assert sync.stats().resyncs == {"gap": 0, "reconnect": 1, "crossed": 1, "checksum": 1, "bad_level": 1}
    assert sync.on_snapshot(1, DepthSnapshot("X", 1, (), ())).action is Action.IGNORED  # no REST reply is asked
    assert sync.on_snapshot_failed(1, "x").action is Action.IGNORED
    with pytest.raises(RuntimeError):
        sync.request_snapshot()
    with pytest.raises(ValueError):
        sync.on_diff(DepthDiff("Y", 1, 1, None, 1, (), (), snapshot=True))


def test_an_update_without_ids_is_taken_as_following_and_stored_with_the_previous_seq_as_pu() -> None:
    sync = live_at(40)
    d = sync.on_diff(upd(41, None))
    assert d.action is Action.APPLY and d.diffs[0].prev_id == 40 and sync.last_update_id == 41


def test_each_rule_has_its_own_procedure() -> None:
    assert isinstance(new_sync("X", DepthRule.OKX, 10), WsBookSync)
    assert isinstance(new_sync("X", "spot", 10), DepthSync) and isinstance(new_sync("X", "futures", 10), DepthSync)
    with pytest.raises(ValueError):
        DepthSync("X", DepthRule.OKX)
    with pytest.raises(ValueError):
        WsBookSync("X", DepthRule.SPOT)


# -- parsing into the books' messages ------------------------------------------------------------------------------


def test_books_frames_become_the_messages_the_books_keep() -> None:
    def frame(action: str, seq: int, prev: int, bids: Any) -> bytes:
        return orjson.dumps({"arg": {"channel": "books", "instId": "BTC-USDT"}, "action": action, "data": [
            {"asks": [["101", "2", "0", "1"]], "bids": bids, "ts": "1700000000123", "checksum": -5,
             "prevSeqId": prev, "seqId": seq}]})

    snap = parse_frame_depth(frame("snapshot", 10, -1, [["100.10", "1", "0", "3"]]), TS)
    assert snap == DepthDiff("BTC-USDT", 10, 10, None, 1_700_000_000_123, (("100.10", "1"),), (("101", "2"),),
                             snapshot=True, checksum=-5)
    up = parse_frame_depth(frame("update", 12, 10, []), TS)
    assert up == DepthDiff("BTC-USDT", 12, 12, 10, 1_700_000_000_123, (), (("101", "2"),), checksum=-5)
    assert parse_frame_depth(b'{"event":"subscribe","arg":{"channel":"books","instId":"BTC-USDT"}}', TS) == Reply(
        None, result={"event": "subscribe", "stream": "books:BTC-USDT"})
    keepalive = orjson.dumps({"arg": {"channel": "books", "instId": "BTC-USDT"}, "action": "update", "data": [
        {"asks": [], "bids": [], "ts": "1700000000123", "checksum": 0, "prevSeqId": 10, "seqId": 10}]})
    assert parse_frame_depth(keepalive, TS) is None
    tick: Any = {"symbol": "A", "update_id": 3, "prev_update_id": 2, "snapshot": False, "ts_event": 5_000,
                 "bids": [["1", "0"]], "asks": [], "checksum": 0}
    assert depth_diff(tick) == DepthDiff("A", 3, 3, 2, 5, (("1", "0"),), ())
