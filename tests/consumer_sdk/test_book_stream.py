"""consumer_sdk.book_stream: the stored depth entries, their checks and the rebuild, on the real captures.

:func:`stream_of` plays the writer: a start snapshot, then every diff that follows by the venue's rules, every
``period``-th one stored as a periodic snapshot in its place, each entry encoded to bytes and given its entry ID.
It keeps the live book after every entry, which every rebuild must match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.book import Book
from consumer_sdk.book_stream import (
    CHANNEL,
    BookBreak,
    BookEntry,
    HistoryTrimmed,
    InvalidBookEntry,
    ReadSpan,
    Rebuilder,
    Verdict,
    decode,
    decode_all,
    encode_diff,
    encode_snapshot,
    read_span,
    rebuild,
)
from consumer_sdk.core.errors import ConfigError, InvalidTick, TrimmedError
from consumer_sdk.core.tick import decode_tick, encode_tick


@dataclass
class Stream:
    ids: list[str]
    raw: list[bytes]
    entries: list[BookEntry]
    #: the live book after each entry
    live: list[Book]
    #: diffs applied to the REST book before the start snapshot was stored: their u is its lastUpdateId
    folded: int = 0


def stream_of(cap: Any, period: int, *, lose: range = range(0), resync_after: int | None = None) -> Stream:
    """What a writer stores for ``cap``: diffs by index in ``lose`` are never seen; with ``resync_after``, the
    writer notices the hole at that diff and stores a ``resync:gap`` snapshot of the venue's book there instead."""
    link = "prev" if cap.futures else "next"
    diffs = cap.continuous()
    book = Book()
    book.apply_snapshot(cap.last_update_id, cap.bids, cap.asks)
    out = Stream([], [], [], [])
    last_ms = 0

    def store(tick: Any) -> None:
        nonlocal last_ms
        last_ms = max(last_ms, tick["ts_event"] // 1000)  # the writer holds entry IDs' ms non-decreasing
        entry_id, raw = f"{last_ms}-{tick['seq']}", encode_tick(tick)
        out.ids.append(entry_id)
        out.raw.append(raw)
        out.entries.append(decode(raw, entry_id))
        out.live.append(book.copy())

    # Binance futures: the first diff may end at lastUpdateId itself; the venue's rule applies it, and it can
    # change the REST book (LINKUSD_PERP, TRXUSD_PERP), so it goes into the start snapshot, stored at that id.
    while out.folded < len(diffs) and diffs[out.folded]["u"] <= cap.last_update_id:
        d = diffs[out.folded]
        book.apply_diff(d["b"], d["a"], d["u"])
        out.folded += 1
    assert book.update_id == cap.last_update_id
    ts = diffs[0]["E"] * 1000
    store(encode_snapshot(book, "start", venue="binance", symbol=cap.symbol, link=link, ts_event=ts, ts_recv=ts))
    for n, d in enumerate(diffs[out.folded:], start=out.folded + 1):
        book.apply_diff(d["b"], d["a"], d["u"])
        if n - 1 in lose:
            continue
        assert d["u"] > out.entries[-1].seq
        ts_event, ts_recv = d["E"] * 1000, d["recv_us"]
        if n - 1 == resync_after:
            tick: Any = encode_snapshot(book, "resync:gap", venue="binance", symbol=cap.symbol, link=link,
                                        ts_event=ts_event, ts_recv=ts_recv)
        elif n % period == 0:
            tick = encode_snapshot(book, "periodic", venue="binance", symbol=cap.symbol, link=link,
                                   ts_event=ts_event, ts_recv=ts_recv)
        else:
            tick = encode_diff("binance", cap.symbol, seq=d["u"], first=d["U"], pu=d.get("pu"), ts_event=ts_event,
                               ts_recv=ts_recv, bids=d["b"], asks=d["a"])
        store(tick)
    return out


def checkpoints(s: Stream, every: int = 5) -> list[int]:
    """Entries to rebuild at (each rebuild applies a whole snapshot): every ``every``-th, the last, and each
    snapshot with the entries either side of it."""
    out = {*range(0, len(s.entries), every), len(s.entries) - 1}
    for i, e in enumerate(s.entries):
        if e.is_snapshot:
            out |= {i - 1, i, i + 1}
    return sorted(j for j in out if 0 <= j < len(s.entries))


def same(a: Book | None, b: Book) -> bool:
    """The same levels, written the same, at the same update id."""
    return a is not None and a.update_id == b.update_id and a.levels() == b.levels()


# -- the round trip on the real captures -----------------------------------------------------------------------


def test_round_trip_from_every_snapshot_matches_the_live_book_after_every_entry(depth_captures: list[Any]) -> None:
    for cap in depth_captures:
        s = stream_of(cap, period=25)
        seqs = [e.seq for e in s.entries]
        assert seqs == sorted(set(seqs))
        assert all(decode_tick(raw)["seq"] == e.seq for raw, e in zip(s.raw, s.entries, strict=True))
        starts = [i for i, e in enumerate(s.entries) if e.is_snapshot]
        assert starts[0] == 0
        assert len(starts) == 1 + (len(cap.continuous()) - s.folded) // 25
        for i in starts:
            rebuilder = Rebuilder()
            for j in range(i, len(s.entries)):
                verdict = rebuilder.feed(s.entries[j])
                assert verdict is (Verdict.RESET if s.entries[j].is_snapshot else Verdict.APPLIED)
                assert same(rebuilder.book, s.live[j]), (cap.symbol, i, j)
                assert rebuilder.book is not None and not rebuilder.book.crossed()
            assert rebuilder.breaks == rebuilder.skipped == 0
        for j in checkpoints(s):
            entry = s.entries[j]
            assert same(rebuild(s.entries, seq=entry.seq), s.live[j])
            last_at_ms = max(k for k, e in enumerate(s.entries) if e.ms <= entry.ms)
            assert same(rebuild(s.entries, ms=entry.ms), s.live[last_at_ms])
        assert same(rebuild(s.entries), s.live[-1])
        assert decode_all(zip(s.ids, s.raw, strict=True)) == s.entries
        if not cap.futures:
            assert s.folded == 0


def test_a_missing_diff_is_a_break(depth_captures: list[Any]) -> None:
    for cap in depth_captures:
        s = stream_of(cap, period=25)
        holes = [j for j in range(1, len(s.entries) - 1) if not s.entries[j].is_snapshot
                 and not s.entries[j + 1].is_snapshot]
        assert holes or len(s.entries) < 3
        # the diff right after each snapshot (its successor is checked by the straddle rule), and every 4th
        for j in [j for j in holes if s.entries[j - 1].is_snapshot or j % 4 == 0]:
            entries = s.entries[:j] + s.entries[j + 1:]
            with pytest.raises(BookBreak) as caught:
                rebuild(entries, seq=s.entries[j + 1].seq)
            assert caught.value.kind == "gap"
            assert (caught.value.seq, caught.value.after) == (s.entries[j + 1].seq, s.entries[j - 1].seq)
            assert same(rebuild(entries, seq=s.entries[j - 1].seq), s.live[j - 1])
            # past the next snapshot the hole no longer matters: what is before that snapshot is not read
            later = next((i for i in range(j + 1, len(s.entries)) if s.entries[i].is_snapshot), None)
            if later is not None:
                assert same(rebuild(entries, seq=s.entries[later].seq), s.live[later])
                assert same(rebuild(entries), s.live[-1])


def test_after_a_break_the_book_is_lost_until_the_next_snapshot(depth_captures: list[Any]) -> None:
    cap = max(depth_captures, key=lambda c: len(c.continuous()))
    s = stream_of(cap, period=25)
    rebuilder = Rebuilder()
    rebuilder.feed(s.entries[0])
    rebuilder.feed(s.entries[1])
    with pytest.raises(BookBreak):
        rebuilder.feed(s.entries[3])
    assert rebuilder.book is None and rebuilder.breaks == 1
    nxt = next(i for i in range(4, len(s.entries)) if s.entries[i].is_snapshot)
    for j in range(4, nxt):
        assert rebuilder.feed(s.entries[j]) is Verdict.WAITING
    assert rebuilder.skipped == nxt - 4
    assert rebuilder.feed(s.entries[nxt]) is Verdict.RESET
    assert same(rebuilder.book, s.live[nxt])
    for j in range(nxt + 1, len(s.entries)):
        rebuilder.feed(s.entries[j])
        assert same(rebuilder.book, s.live[j])


def test_a_resync_snapshot_discards_the_old_book(depth_captures: list[Any]) -> None:
    """The writer misses diffs 10..19, notices at diff 20 and stores the venue's book there as ``resync:gap``:
    the rebuild goes through without a break, and the book jumps to the new one."""
    for cap in depth_captures:
        if len(cap.continuous()) < 25:
            continue
        s = stream_of(cap, period=1000, lose=range(10, 20), resync_after=20)
        k = next(i for i, e in enumerate(s.entries) if e.reason == "resync:gap")
        assert not same(s.live[k - 1], s.live[k])  # the lost diffs changed the book
        for j in checkpoints(s):
            assert same(rebuild(s.entries, seq=s.entries[j].seq), s.live[j])
        rebuilder = Rebuilder()
        for j in range(k):
            rebuilder.feed(s.entries[j])
        assert rebuilder.feed(s.entries[k]) is Verdict.RESET
        for j in range(k, len(s.entries)):
            if j > k:
                assert rebuilder.feed(s.entries[j]) is Verdict.APPLIED
            assert same(rebuilder.book, s.live[j])
        without = stream_of(cap, period=1000, lose=range(10, 20))
        with pytest.raises(BookBreak):
            rebuild(without.entries)


def test_trimmed_history_is_reported(depth_captures: list[Any]) -> None:
    for cap in depth_captures:
        s = stream_of(cap, period=25)
        starts = [i for i, e in enumerate(s.entries) if e.is_snapshot]
        if len(starts) < 2:
            continue
        trimmed = s.entries[1:]  # MAXLEN took the start snapshot
        for j in range(1, starts[1]):
            with pytest.raises(HistoryTrimmed) as caught:
                rebuild(trimmed, seq=s.entries[j].seq, key=f"md:binance:{cap.symbol}:depth")
            assert isinstance(caught.value, TrimmedError)
            assert caught.value.oldest == s.entries[1]
            assert str(caught.value) == (
                f"md:binance:{cap.symbol}:depth: entries from seq {s.entries[j].seq} (no snapshot at or before it) "
                f"were trimmed away; oldest available is seq {s.entries[1].seq} ({s.ids[1]})"
            )
        for j in checkpoints(s):
            if j >= starts[1]:
                assert same(rebuild(trimmed, seq=s.entries[j].seq), s.live[j])
        diffs_only = [e for e in s.entries if not e.is_snapshot]
        for target in (None, s.entries[-1].seq):
            with pytest.raises(HistoryTrimmed):
                rebuild(diffs_only, seq=target)
        with pytest.raises(HistoryTrimmed, match=r"ms 5 \(no snapshot"):
            rebuild(s.entries, ms=5)
    with pytest.raises(HistoryTrimmed, match="oldest available is none"):
        rebuild([])


# -- the rebuilder's rules -------------------------------------------------------------------------------------


def entry(kind: str, seq: int, *, first: int | None = None, pu: int | None = None, link: str = "next",
          bids: tuple[tuple[str, str], ...] = (), asks: tuple[tuple[str, str], ...] = (), symbol: str = "X",
          reason: str = "start") -> BookEntry:
    if kind == "snapshot":
        return BookEntry("snapshot", "binance", symbol, seq, seq, seq, seq, bids, asks, reason=reason,
                         link=link)  # type: ignore[arg-type]
    return BookEntry("diff", "binance", symbol, seq, seq, seq, seq, bids, asks, first, pu)


def feed_all(entries: list[BookEntry]) -> Rebuilder:
    rebuilder = Rebuilder()
    for e in entries:
        rebuilder.feed(e)
    return rebuilder


def test_next_link_rules() -> None:
    snap = entry("snapshot", 100, bids=(("1", "1"),))
    assert feed_all([snap, entry("diff", 105, first=90)]).applied == 1  # the first diff straddles 101
    assert feed_all([snap, entry("diff", 105, first=101), entry("diff", 106, first=106)]).applied == 2
    for bad in ([snap, entry("diff", 105, first=102)],
                [snap, entry("diff", 105, first=101), entry("diff", 107, first=107)],
                [snap, entry("diff", 105, first=101), entry("diff", 107, first=105)],
                [snap, entry("diff", 105, pu=100)]):
        with pytest.raises(BookBreak) as caught:
            feed_all(bad)
        assert caught.value.kind == "gap"


def test_prev_link_rules() -> None:
    snap = entry("snapshot", 100, link="prev", asks=(("2", "1"),))
    assert feed_all([snap, entry("diff", 105, first=98, pu=95)]).applied == 1  # straddles 100
    assert feed_all([snap, entry("diff", 105, first=103, pu=100)]).applied == 1  # follows it exactly
    assert feed_all([snap, entry("diff", 105, first=103, pu=100), entry("diff", 109, first=108, pu=105)]).applied == 2
    assert feed_all([snap, entry("diff", 105, pu=100), entry("diff", 109, pu=105)]).applied == 2  # OKX: no first
    for bad in ([snap, entry("diff", 105, first=101, pu=99)],
                [snap, entry("diff", 105, first=103, pu=100), entry("diff", 109, first=104, pu=104)],
                [snap, entry("diff", 105, first=101)]):
        with pytest.raises(BookBreak, match="does not follow"):
            feed_all(bad)


def test_disorder_is_refused_without_losing_the_book() -> None:
    rebuilder = feed_all([entry("snapshot", 100, bids=(("1", "1"),)), entry("diff", 105, first=101)])
    for seq in (105, 104, 3):
        with pytest.raises(BookBreak) as caught:
            rebuilder.feed(entry("diff", seq, first=seq))
        assert caught.value.kind == "disorder"
    assert rebuilder.book is not None and rebuilder.book.update_id == 105 and rebuilder.breaks == 0
    assert rebuilder.feed(entry("diff", 106, first=106)) is Verdict.APPLIED


def test_entries_before_the_first_snapshot_wait_and_other_streams_are_refused() -> None:
    rebuilder = Rebuilder()
    assert rebuilder.feed(entry("diff", 5, first=1)) is Verdict.WAITING
    assert rebuilder.book is None and rebuilder.skipped == 1
    assert rebuilder.feed(entry("snapshot", 7)) is Verdict.RESET
    with pytest.raises(InvalidBookEntry, match="is of binance:Y, not binance:X"):
        rebuilder.feed(entry("diff", 8, first=8, symbol="Y"))
    assert rebuilder.book is not None and rebuilder.stream == ("binance", "X")


def test_levels_the_book_refuses_lose_the_book_and_never_half_apply() -> None:
    rebuilder = feed_all([entry("snapshot", 100, bids=(("1", "1"),))])
    with pytest.raises(InvalidBookEntry, match=r"diff seq 101: bids\[1\] price: more than 8 significant decimals"):
        rebuilder.feed(entry("diff", 101, first=101, bids=(("2", "1"), ("0.000000001", "1"))))
    assert rebuilder.book is None
    with pytest.raises(InvalidBookEntry, match="snapshot seq 102: asks"):
        rebuilder.feed(entry("snapshot", 102, asks=(("3", "0"),)))
    assert rebuilder.book is None and rebuilder.breaks == 2
    wide = Rebuilder(scale=9)
    wide.feed(entry("snapshot", 100, bids=(("0.000000001", "1"),)))
    assert wide.book is not None and wide.book.levels() == ((("0.000000001", "1"),), ())


# -- decoding --------------------------------------------------------------------------------------------------


def valid_diff() -> dict[str, Any]:
    return dict(encode_diff("binance", "NKNUSDT", seq=20, first=18, pu=17, ts_event=5_000, ts_recv=6_000,
                            bids=[["0.35200000", "1290.00000000"]], asks=[["0.35300000", "0"]]))


def valid_snapshot() -> dict[str, Any]:
    book = Book()
    book.apply_snapshot(20, [["1.5", "2"], ["1.4", "1"]], [["1.6", "3"]])
    tick = encode_snapshot(book, "periodic", venue="binance", symbol="NKNUSDT", link="prev", ts_event=5_000,
                           ts_recv=6_000)
    return orjson.loads(encode_tick(tick))  # type: ignore[no-any-return]


def test_decode_reads_what_encode_wrote() -> None:
    diff = decode(encode_tick(valid_diff()), "7-20")  # type: ignore[arg-type]
    assert diff == BookEntry("diff", "binance", "NKNUSDT", 20, 7, 5_000, 6_000,
                             (("0.35200000", "1290.00000000"),), (("0.35300000", "0"),), 18, 17)
    assert decode(valid_diff()).ms == 5  # without the entry ID: ts_event's millisecond
    snap = decode(orjson.dumps(valid_snapshot()).decode(), b"5-20")
    assert snap == BookEntry("snapshot", "binance", "NKNUSDT", 20, 5, 5_000, 6_000,
                             (("1.5", "2"), ("1.4", "1")), (("1.6", "3"),), reason="periodic", link="prev")
    assert snap.is_snapshot and not diff.is_snapshot
    assert list(valid_diff()) == ["v", "venue", "symbol", "channel", "seq", "ts_event", "ts_recv", "kind", "first",
                                  "pu", "bids", "asks"]
    assert valid_snapshot()["channel"] == CHANNEL == "depth"


def bad(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not ...}


@pytest.mark.parametrize(
    ("obj", "says"),
    [
        (b"{", "not JSON"),
        (b"[1]", "expected a JSON object, got list"),
        (bad(valid_diff(), v=2), "unsupported schema version 2"),
        (bad(valid_diff(), v=True), "unsupported schema version True"),
        (bad(valid_diff(), channel="trade"), "channel 'trade', not 'depth'"),
        (bad(valid_diff(), venue=""), "'venue': expected 1 to 64"),
        (bad(valid_diff(), symbol="A:B"), "'symbol': expected 1 to 64"),
        (bad(valid_diff(), seq=-1), "'seq': expected an integer"),
        (bad(valid_diff(), seq=2**64), "'seq': expected an integer"),
        (bad(valid_diff(), seq=20.0), "'seq': expected an integer"),
        (bad(valid_diff(), ts_event=...), "'ts_event': expected an integer"),
        (bad(valid_diff(), ts_recv="1"), "'ts_recv': expected an integer"),
        (bad(valid_diff(), kind="trade"), "'kind': expected 'diff' or 'snapshot'"),
        (bad(valid_diff(), first=..., pu=...), "names neither"),
        (bad(valid_diff(), first=21), "'first' 21 is above 'seq' 20"),
        (bad(valid_diff(), first=None), "'first': expected an integer"),
        (bad(valid_diff(), pu=18), "'pu' 18 is not below"),
        (bad(valid_diff(), bids=None), "'bids': expected a list of [price, size] pairs, got NoneType"),
        (bad(valid_diff(), asks=[["1", "2", "3"]]), "asks[0]: expected a [price, size] pair"),
        (bad(valid_diff(), asks=[{"1": "2"}]), "asks[0]: expected a [price, size] pair"),
        (bad(valid_diff(), bids=[["1", 2]]), "bids[0] size: expected a plain decimal string, got 2"),
        (bad(valid_diff(), bids=[["1e3", "2"]]), "bids[0] price: expected a plain decimal string, got '1e3'"),
        (bad(valid_diff(), bids=[["NaN", "2"]]), "bids[0] price: expected a plain decimal string"),
        (bad(valid_diff(), bids=[["-1", "2"]]), "bids[0] price: expected a plain decimal string"),
        (bad(valid_snapshot(), reason="resync:"), "'reason': expected start, periodic or resync:<why>"),
        (bad(valid_snapshot(), reason="resync:Gap"), "'reason'"),
        (bad(valid_snapshot(), reason=...), "'reason'"),
        (bad(valid_snapshot(), link="both"), "'link': expected one of ('next', 'prev')"),
        (bad(valid_snapshot(), first=19), "a snapshot carries no 'first'"),
        (bad(valid_snapshot(), pu=19), "a snapshot carries no 'pu'"),
    ],
)
def test_decode_refuses_with_a_clear_error(obj: Any, says: str) -> None:
    with pytest.raises(InvalidBookEntry) as caught:
        decode(obj)
    assert says in str(caught.value)
    assert str(caught.value).startswith("not a depth entry: ")
    assert isinstance(caught.value, InvalidTick)


@pytest.mark.parametrize("entry_id", ["7-21", "7", "x-20", b"7-19", "-7-20", "7-20-1"])
def test_decode_refuses_an_entry_id_of_another_seq(entry_id: str | bytes) -> None:
    with pytest.raises(InvalidBookEntry, match="does not name seq 20"):
        decode(valid_diff(), entry_id)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@given(st.sampled_from(["diff", "snapshot"]), st.data())
def test_any_field_replaced_by_any_value_decodes_or_is_refused_cleanly(kind: str, data: st.DataObject) -> None:
    """Hostile input: one field (or a new one) set to any JSON value.  decode either returns a whole entry whose
    fields are those given, or raises InvalidBookEntry; nothing else escapes."""
    obj = valid_diff() if kind == "diff" else valid_snapshot()
    name = data.draw(st.sampled_from([*obj, "first", "pu", "reason", "link", "extra"]))
    obj[name] = data.draw(json_values)
    raw = orjson.dumps(obj)
    try:
        got = decode(raw)
    except InvalidBookEntry:
        return
    assert got.kind == obj["kind"] and got.seq == obj["seq"] and got.symbol == obj["symbol"]
    assert [list(level) for level in got.bids] == obj["bids"] and [list(level) for level in got.asks] == obj["asks"]


@given(st.binary(max_size=64))
def test_random_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidBookEntry):
        decode(raw)


# -- random streams --------------------------------------------------------------------------------------------

prices = st.integers(1, 60).map(lambda n: f"{n}.{n % 7}")
sizes = st.sampled_from(["0", "1", "2.5", "0.00000001", "30"])
levels = st.lists(st.tuples(prices, sizes), max_size=6)


@given(
    st.lists(st.tuples(levels, levels, st.integers(1, 4), st.booleans()), min_size=1, max_size=40),
    st.sampled_from(["next", "prev"]),
    st.data(),
)
def test_random_streams_rebuild_to_the_live_book_at_any_seq(
    diffs: list[tuple[list[Any], list[Any], int, bool]], link: str, data: st.DataObject
) -> None:
    """Diffs of random levels with update ids that jump (by the rule of the link), some stored as periodic
    snapshots; the rebuild at any seq, or between two entries, is the live book at the entry at or before it."""
    book = Book()
    book.apply_snapshot(10, [["100", "1"]], [["200", "1"]])
    entries = [BookEntry("snapshot", "v", "S", 10, 0, 0, 0, *book.levels(), reason="start",
                         link=link)]  # type: ignore[arg-type]
    live = [book.copy()]
    for bids, asks, step, periodic in diffs:
        last = entries[-1].seq
        seq = last + step
        book.apply_diff(bids, asks, seq)
        if periodic:
            tick: Any = encode_snapshot(book, "periodic", venue="v", symbol="S", link=link,  # type: ignore[arg-type]
                                        ts_event=seq * 1000, ts_recv=0)
        elif link == "next":
            tick = encode_diff("v", "S", seq=seq, first=last + 1, ts_event=seq * 1000, ts_recv=0, bids=bids, asks=asks)
        else:
            tick = encode_diff("v", "S", seq=seq, first=seq, pu=last, ts_event=seq * 1000, ts_recv=0, bids=bids,
                               asks=asks)
        entries.append(decode(encode_tick(tick)))
        live.append(book.copy())
    target = data.draw(st.integers(10, entries[-1].seq + 2))
    at = max(i for i, e in enumerate(entries) if e.seq <= target)
    assert same(rebuild(entries, seq=target), live[at])
    assert same(rebuild(entries, ms=target), live[at])


# -- encoding and positions ------------------------------------------------------------------------------------


def test_encode_refuses_what_cannot_be_stored() -> None:
    with pytest.raises(ConfigError, match="first update id"):
        encode_diff("v", "S", seq=1, first=None, ts_event=0, ts_recv=0, bids=[], asks=[])
    with pytest.raises(ConfigError, match="no update id"):
        encode_snapshot(Book(), "start", venue="v", symbol="S", link="next", ts_event=0, ts_recv=0)
    book = Book()
    book.apply_snapshot(1, [], [])
    for reason, link, says in (("restart", "next", "reason"), ("resync:", "next", "reason"),
                               ("start", "pu", "link")):
        with pytest.raises(ConfigError, match=says):
            encode_snapshot(book, reason, venue="v", symbol="S", link=link, ts_event=0,  # type: ignore[arg-type]
                            ts_recv=0)
    tick = encode_snapshot(book, "resync:reconnect.2", venue="v", symbol="S", link="next", ts_event=0, ts_recv=0)
    assert decode(encode_tick(tick)).reason == "resync:reconnect.2"


def test_read_span() -> None:
    assert read_span("1000-50", seq=70) == ReadSpan("1000-50", "+", 70)
    assert read_span((1000, 50), seq=50) == ReadSpan("1000-50", "+", 50)
    assert read_span(b"1000-50", ms=1200) == ReadSpan("1000-50", "1200", None)
    assert read_span("1000-50", end_id="1100-64") == ReadSpan("1000-50", "1100-64", 64)
    assert read_span("1000-50") == ReadSpan("1000-50", "+", None)
    for kwargs, says in (
        ({"seq": 49}, "after the target seq 49"),
        ({"ms": 999}, "after the target ms 999"),
        ({"end_id": "1000-49"}, "after the target entry 1000-49"),
        ({"seq": 60, "ms": 2000}, "give one target"),
        ({"seq": -1}, "seq: expected an integer"),
        ({"end_id": "later"}, "end_id: expected an entry ID"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)):
            read_span("1000-50", **kwargs)
    with pytest.raises(ConfigError, match="snapshot_id"):
        read_span("1000_50", seq=60)


def test_read_span_selects_what_rebuild_needs(depth_captures: list[Any]) -> None:
    """The span from the newest snapshot at or before each entry, applied as the span says, is the live book."""
    for cap in depth_captures:
        s = stream_of(cap, period=25)
        for j in checkpoints(s):
            target = s.entries[j]
            snap = max(i for i in range(j + 1) if s.entries[i].is_snapshot)
            span = read_span(s.ids[snap], seq=target.seq)
            start = s.ids.index(span.start)
            picked = [e for e in s.entries[start:] if span.last_seq is None or e.seq <= span.last_seq]
            assert same(rebuild(picked), s.live[j])
            by_time = read_span(s.ids[snap], ms=target.ms)
            picked = [e for e in s.entries[start:] if e.ms <= int(by_time.end)]
            assert same(rebuild(picked), s.live[max(k for k, e in enumerate(s.entries) if e.ms <= target.ms)])


def test_entries_keep_their_own_fields() -> None:
    e = decode(valid_diff())
    with pytest.raises(AttributeError):
        e.seq = 5  # type: ignore[misc]
    assert replace(e, seq=21).seq == 21
