"""Order-book edges that mutation testing showed unchecked (docs/testing.md, "Mutation testing").

consumer_sdk.book: the exact refusal messages (they name the side, the level's index, the field and the value),
the bounds of scales and decimals, prices beyond a float's 53 bits, the price cache at its size, equality of books
that differ in one place only, and what :meth:`Book.check` reports.
consumer_sdk.book_stream: decoding at the bounds of each field, the rebuilder's counters and continuity at
exact boundaries, the messages of breaks and trimmed history, and the read span's limits.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from consumer_sdk.book import (
    DEFAULT_SCALE,
    MAX_SCALE,
    PRICE_CACHE,
    Book,
    BookError,
    decimal_parser,
    format_units,
    parse_decimal,
)
from consumer_sdk.book_stream import (
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
from consumer_sdk.core.errors import ConfigError

#: a price of 28 digits in units of 10**-8: far beyond the 2**53 a float holds exactly
BIG = "99999999999999999999.99999999"
BIG_UNITS = 9_999_999_999_999_999_999_999_999_999


def book_of(bids: list[list[str]], asks: list[list[str]], update_id: int = 100, scale: int = DEFAULT_SCALE) -> Book:
    book = Book(scale)
    book.apply_snapshot(update_id, bids, asks)
    return book


def refusal(call: Any, *args: Any) -> str:
    with pytest.raises(BookError) as caught:
        call(*args)
    return str(caught.value)


# -- parsing and formatting ------------------------------------------------------------------------------------


def test_a_refused_value_is_quoted_to_40_characters() -> None:
    assert refusal(parse_decimal, "x" * 50) == f"value: not a plain decimal: {'x' * 40!r}"
    assert refusal(parse_decimal, "1." + "1" * 49) == f"value: more than 8 significant decimals: {'1.' + '1' * 38!r}"
    assert refusal(parse_decimal, "1" * 50) == (
        f"value: too many digits (at most 20 before the point): {'1' * 40!r} (50 chars)"
    )


def test_zeros_past_the_scale_are_refused_for_what_they_are() -> None:
    """Up to 40 zeros after the scale's decimals are fine; one more is refused as too many digits after the point,
    not as too many decimals (the significant ones are within the scale) nor before the point."""
    assert parse_decimal("1.12345678" + "0" * 40) == 112_345_678
    value = "1.12345678" + "0" * 41
    assert refusal(parse_decimal, value) == (
        f"value: too many digits (at most 48 after the point): {value[:40]!r} (51 chars)"
    )
    assert parse_decimal("1." + "0" * 42, 2) == 100
    assert refusal(parse_decimal, "1." + "0" * 43, 2, "size") == (
        f"size: too many digits (at most 42 after the point): {'1.' + '0' * 38!r} (45 chars)"
    )
    twenty = "9" * 20 + "." + "0" * 49
    assert refusal(parse_decimal, twenty) == (
        f"value: too many digits (at most 48 after the point): {twenty[:40]!r} (70 chars)"
    )
    assert refusal(parse_decimal, "9" * 21 + ".0") == (
        f"value: too many digits (at most 20 before the point): {'9' * 21 + '.0'!r} (23 chars)"
    )


def test_scales_from_zero_to_max_scale_are_taken() -> None:
    assert Book(0).scale == 0 and Book(MAX_SCALE).scale == MAX_SCALE
    assert parse_decimal("0." + "0" * 29 + "1", MAX_SCALE) == 1
    assert decimal_parser(0)("12") == 12
    assert format_units(1, MAX_SCALE) == "0." + "0" * 29 + "1"
    for scale in (-1, MAX_SCALE + 1):
        assert refusal(Book, scale) == f"scale: expected an integer from 0 to {MAX_SCALE}, got {scale}"
    assert refusal(parse_decimal, "1", 31) == f"value: scale: expected an integer from 0 to {MAX_SCALE}, got 31"


def test_format_units_writes_zero_and_one_unit_without_a_sign() -> None:
    assert format_units(0) == "0.00000000"
    assert format_units(0, 2) == "0.00"
    assert format_units(1, 2) == "0.01"
    assert format_units(-1, 2) == "-0.01"
    assert format_units(0, 0) == "0"


# -- updates ---------------------------------------------------------------------------------------------------


def test_a_price_given_twice_in_a_snapshot_is_named_as_first_given() -> None:
    book = Book()
    assert refusal(book.apply_snapshot, 1, [["2", "1"], ["1", "5"], ["1.0", "2"]], []) == (
        "bids: price '1' given twice in a snapshot"
    )
    assert refusal(book.apply_snapshot, 1, [], [["3.50", "1"], ["3.5", "7"]]) == (
        "asks: price '3.50' given twice in a snapshot"
    )
    assert book.update_id is None and book.levels() == ((), ())


def test_levels_given_lazily_that_fail_are_named_by_the_level_they_failed_at() -> None:
    """Levels may come from a generator (any iterable); when it raises a BookError itself, say parsing the venue's
    own format, the error names the level it was to give, and nothing given before it is applied."""

    def levels(good: list[list[str]]) -> Iterator[list[str]]:
        yield from good
        raise BookError("not a level: '?'")

    book = book_of([["1", "1"]], [["2", "1"]])
    for n in (0, 1, 2):
        given = [[f"1.{i}", "3"] for i in range(n)]
        assert refusal(book.apply_diff, levels(given), [], 101) == f"bids[{n}] level: not a level: '?'"
        assert refusal(book.apply_diff, [], levels(given), 101) == f"asks[{n}] level: not a level: '?'"
        assert refusal(book.apply_snapshot, 101, levels(given), []) == f"bids[{n}] level: not a level: '?'"
    assert book == book_of([["1", "1"]], [["2", "1"]])


def test_levels_that_are_not_iterable_are_named_by_their_type() -> None:
    book = book_of([["1", "1"]], [])
    assert refusal(book.apply_diff, 5, [], 101) == "bids: expected a list of (price, size) pairs, got int"
    assert refusal(book.apply_snapshot, 101, [], None) == "asks: expected a list of (price, size) pairs, got NoneType"


def test_a_level_beyond_a_floats_precision_is_set_and_deleted_exactly() -> None:
    book = book_of([["1", "1"]], [["2", "1"]])
    near = "99999999999999999999.99999998"
    book.apply_diff([[BIG, "1"], [near, "2"]], [[BIG, "3"], [near, "4"]], 101)
    assert book.depth() == (3, 3) and book.best_bid() == (BIG, "1") and book.best_ask() == ("2", "1")
    book.apply_diff([[BIG, "0"]], [[near, "0"]], 102)
    assert book.levels() == (((near, "2"), ("1", "1")), (("2", "1"), (BIG, "3")))


def test_a_price_that_is_not_a_string_is_named_even_when_unhashable() -> None:
    book = book_of([["1", "1"]], [])
    assert refusal(book.apply_diff, [[["1"], "1"]], [], 101) == (
        "bids[0] price: expected a decimal string, got list ['1']"
    )
    assert refusal(book.apply_diff, [], [[{"1": 1}, "1"]], 101) == (
        "asks[0] price: expected a decimal string, got dict {'1': 1}"
    )
    assert refusal(book.apply_diff, [[1, "1"]], [], 101) == "bids[0] price: expected a decimal string, got int 1"


def counted(book: Book) -> list[object]:
    """The values ``book`` parses from now on (prices; sizes are only matched)."""
    seen: list[object] = []
    parse = book._parse

    def counting(value: object) -> int:
        seen.append(value)
        return parse(value)

    book._parse = counting
    return seen


def test_a_price_seen_lately_is_not_parsed_again() -> None:
    book = Book()
    parsed = counted(book)
    book.apply_snapshot(1, [["10.5", "1"]], [["11", "1"]])
    book.apply_diff([["10.5", "2"], ["10.4", "1"]], [["11", "0"], ["11.0", "1"]], 2)
    book.apply_diff([["10.4", "0"]], [["11.0", "0"]], 3)
    assert parsed == ["10.5", "11", "10.4", "11.0"]
    assert book.levels() == ((("10.5", "2"),), ())


def test_the_price_cache_holds_price_cache_strings_then_starts_again() -> None:
    book = Book()
    book.apply_snapshot(0, [], [])
    parsed = counted(book)
    prices = [f"{i}.5" for i in range(PRICE_CACHE + 1)]
    for i, price in enumerate(prices[:PRICE_CACHE], start=1):
        book.apply_diff([[price, "1"]], [], i)
    book.apply_diff([[prices[0], "2"], [prices[PRICE_CACHE - 1], "2"]], [], PRICE_CACHE + 1)
    assert parsed == prices[:PRICE_CACHE]  # all of them remembered
    book.apply_diff([[prices[PRICE_CACHE], "1"]], [], PRICE_CACHE + 2)  # one more: the cache starts again
    book.apply_diff([[prices[PRICE_CACHE], "2"], [prices[0], "3"]], [], PRICE_CACHE + 3)
    assert parsed == [*prices, prices[0]]
    assert book.depth() == (PRICE_CACHE + 1, 0) and book.best_bid() == (prices[-1], "2")


# -- reads -----------------------------------------------------------------------------------------------------


def test_a_negative_or_non_integer_n_is_named_in_the_error() -> None:
    book = book_of([["1", "1"]], [])
    assert refusal(book.top, -1) == "n: expected a non-negative integer, got -1"
    assert refusal(book.top, 1.0) == "n: expected a non-negative integer, got 1.0"


# -- equality --------------------------------------------------------------------------------------------------


def test_books_with_other_prices_on_one_side_are_not_equal() -> None:
    """Same update id and depth, a bid (or an ask) at another price: not equal, whichever side differs."""
    book = book_of([["10", "1"], ["9", "1"]], [["11", "1"]])
    assert book != book_of([["10", "1"], ["8", "1"]], [["11", "1"]])
    assert book != book_of([["10", "1"], ["9", "1"]], [["12", "1"]])
    assert book != book_of([["10", "1"], ["8", "1"]], [["12", "1"]])


def test_books_with_other_sizes_on_one_side_are_not_equal() -> None:
    """The same prices, every size of one side different (or one of them): not equal."""
    book = book_of([["10", "1"], ["9", "2"]], [["11", "3"], ["12", "4"]])
    assert book != book_of([["10", "5"], ["9", "6"]], [["11", "3"], ["12", "4"]])
    assert book != book_of([["10", "1"], ["9", "2"]], [["11", "7"], ["12", "8"]])
    assert book != book_of([["10", "1"], ["9", "2"]], [["11", "3"], ["12", "9"]])
    assert book != book_of([["10", "1"], ["9", "9"]], [["11", "3"], ["12", "4"]])
    assert book == book_of([["10", "1.0"], ["9", "2.00"]], [["11", "3"], ["12", "4.000"]])


# -- check -----------------------------------------------------------------------------------------------------


def test_check_passes_a_book_of_prices_beyond_a_floats_precision() -> None:
    book = book_of([["99999999999999999999.99999998", "1"], ["1", "1"]], [[BIG, "1"]])
    assert book.check() == []
    assert book.spread() == 1 and not book.crossed()
    assert parse_decimal(BIG) == BIG_UNITS


def test_check_names_an_order_of_other_prices_than_the_levels() -> None:
    book = book_of([["10.5", "1"], ["10.4", "2"], ["9", "3"]], [["11", "1"]])
    book._bid_keys[0] = parse_decimal("8")  # the same count, one price that is not a level
    assert book.check() == ["bids: the order holds 3 prices, the levels 3"]


def test_check_names_a_price_given_twice_in_the_order() -> None:
    book = book_of([["10.5", "1"], ["10.4", "2"], ["9", "3"]], [["11", "1"], ["12", "1"]])
    book._ask_keys[0] = book._ask_keys[1]
    assert book.check() == [
        "asks: the order holds 2 prices, the levels 2",
        "asks: the order is not strictly ascending",
    ]


def test_check_names_a_level_filed_under_another_price() -> None:
    book = book_of([["10.5", "1"], ["10.4", "2"]], [["11", "1"]])
    book._bids[parse_decimal("10.5")] = ("10.45", "1")
    book._asks[-parse_decimal("11")] = ("11.5", "1")
    assert book.check() == [
        "bids: level '10.45' is filed under another price",
        "asks: level '11.5' is filed under another price",
    ]


# -- book_stream: encoding and decoding ------------------------------------------------------------------------


def a_diff(**changes: Any) -> dict[str, Any]:
    tick = dict(encode_diff("binance", "NKNUSDT", seq=20, first=18, pu=17, ts_event=5_999, ts_recv=6_000,
                            bids=[["0.352", "1290"]], asks=[]))
    tick.update(changes)
    return {k: v for k, v in tick.items() if v is not ...}


def invalid(obj: Any, entry_id: Any = None) -> str:
    with pytest.raises(InvalidBookEntry) as caught:
        decode(obj, entry_id)
    return str(caught.value)


def test_an_empty_book_cannot_be_stored() -> None:
    with pytest.raises(ConfigError) as caught:
        encode_snapshot(Book(), "start", venue="v", symbol="S", link="next", ts_event=0, ts_recv=0)
    assert str(caught.value) == "a book that has had no snapshot or diff has no update id to store it at"


def test_a_diff_without_ids_cannot_be_stored() -> None:
    with pytest.raises(ConfigError) as caught:
        encode_diff("v", "S", seq=1, first=None, ts_event=0, ts_recv=0, bids=[], asks=[])
    assert str(caught.value) == "a diff needs its first update id, the previous one (pu), or both"


def test_a_diff_must_name_an_id_and_its_ids_must_be_in_order() -> None:
    assert invalid(a_diff(first=..., pu=...)) == (
        "not a depth entry: a diff names neither its first update id ('first') nor the previous one ('pu')"
    )
    assert decode(a_diff(first=20, pu=...)).first == 20  # a diff of one update
    assert invalid(a_diff(first=..., pu=20)) == "not a depth entry: 'pu' 20 is not below 'first' and 'seq' (None, 20)"
    assert invalid(a_diff(first=18, pu=18)) == "not a depth entry: 'pu' 18 is not below 'first' and 'seq' (18, 20)"
    assert decode(a_diff(first=..., pu=19)).pu == 19


def test_a_bad_venue_or_symbol_is_quoted_in_the_error() -> None:
    names = "expected 1 to 64 letters, digits, '_', '.' or '-'"
    assert invalid(a_diff(venue="bin ance")) == f"not a depth entry: 'venue': {names}, got 'bin ance'"
    assert invalid(a_diff(symbol="A" * 65)) == f"not a depth entry: 'symbol': {names}, got '{'A' * 39}"
    assert invalid(a_diff(symbol=7)) == f"not a depth entry: 'symbol': {names}, got 7"


def test_an_entry_id_of_bytes_that_are_not_utf8_is_refused_naming_it() -> None:
    assert invalid(a_diff(), b"\xff-20") == "not a depth entry: entry ID '\ufffd-20' does not name seq 20"
    assert decode(a_diff(), b"7-20").ms == 7


def test_decode_all_checks_each_entry_against_its_id_and_takes_its_millisecond() -> None:
    entries = decode_all([("9-20", a_diff()), (b"12-21", a_diff(seq=21, first=21, pu=20))])
    assert [(e.ms, e.seq) for e in entries] == [(9, 20), (12, 21)]
    with pytest.raises(InvalidBookEntry, match="entry ID '9-21' does not name seq 20"):
        decode_all([("9-21", a_diff())])


def test_decode_takes_each_field_from_zero_to_its_largest() -> None:
    top = decode(a_diff(seq=2**64 - 1, first=2**64 - 1, pu=2**64 - 2, ts_event=2**63 - 1, ts_recv=2**63 - 1))
    assert (top.seq, top.first, top.pu, top.ts_event, top.ts_recv) == (2**64 - 1, 2**64 - 1, 2**64 - 2, 2**63 - 1,
                                                                     2**63 - 1)
    zero = decode(a_diff(seq=0, first=0, pu=..., ts_event=0, ts_recv=0))
    assert (zero.seq, zero.first, zero.pu, zero.ts_event, zero.ts_recv, zero.ms) == (0, 0, None, 0, 0, 0)
    okx = decode(a_diff(first=..., pu=0))
    assert (okx.first, okx.pu) == (None, 0)
    ids, times = f"expected an integer from 0 to {2**64 - 1}", f"expected an integer from 0 to {2**63 - 1}"
    assert invalid(a_diff(seq=2**64)) == f"not a depth entry: 'seq': {ids}, got {2**64}"
    assert invalid(a_diff(first=2**64)) == f"not a depth entry: 'first': {ids}, got {2**64}"
    assert invalid(a_diff(pu=None)) == f"not a depth entry: 'pu': {ids}, got None"
    assert invalid(a_diff(ts_event=2**63)) == f"not a depth entry: 'ts_event': {times}, got {2**63}"
    assert invalid(a_diff(ts_recv=-1)) == f"not a depth entry: 'ts_recv': {times}, got -1"


def test_an_entrys_millisecond_is_its_times_whole_millisecond() -> None:
    entry = decode(a_diff())
    assert entry.ms == 5 and type(entry.ms) is int


def test_levels_that_are_not_a_list_are_named_by_their_type() -> None:
    assert invalid(a_diff(bids={"1": "2"})) == (
        "not a depth entry: 'bids': expected a list of [price, size] pairs, got dict"
    )
    assert invalid(a_diff(asks="1,2")) == "not a depth entry: 'asks': expected a list of [price, size] pairs, got str"


# -- book_stream: rebuilding -----------------------------------------------------------------------------------


def snapshot(seq: int, *, link: str = "next", bids: tuple[tuple[str, str], ...] = (), ms: int | None = None,
             reason: str = "start") -> BookEntry:
    at = seq if ms is None else ms
    return BookEntry("snapshot", "binance", "X", seq, at, at, at, bids, (), reason=reason,
                     link=link)  # type: ignore[arg-type]


def diff(seq: int, *, first: int | None = None, pu: int | None = None, ms: int | None = None,
         bids: tuple[tuple[str, str], ...] = ()) -> BookEntry:
    at = seq if ms is None else ms
    return BookEntry("diff", "binance", "X", seq, at, at, at, bids, (), first, pu)


def test_trimmed_history_names_each_target_given() -> None:
    entries = [diff(10, first=10), snapshot(20)]
    with pytest.raises(HistoryTrimmed) as caught:
        rebuild(entries, seq=15, ms=12)
    assert caught.value.wanted == "seq 15 and ms 12" and caught.value.oldest == entries[0]
    assert str(caught.value) == (
        "depth: entries from seq 15 and ms 12 (no snapshot at or before it) were trimmed away; "
        "oldest available is seq 10 (10-10)"
    )
    with pytest.raises(HistoryTrimmed) as caught:
        rebuild(entries, ms=12)
    assert caught.value.wanted == "ms 12"
    assert str(caught.value).startswith("depth: entries from ms 12 (no snapshot at or before it) were trimmed away")
    with pytest.raises(HistoryTrimmed) as caught:
        rebuild(entries, seq=15, key="md:binance:X:depth")
    assert caught.value.wanted == "seq 15"
    assert str(caught.value).startswith("md:binance:X:depth: entries from seq 15 (no snapshot at or before it)")
    with pytest.raises(HistoryTrimmed) as caught:
        rebuild([])
    assert caught.value.wanted == "the end" and caught.value.oldest is None
    assert str(caught.value) == (
        "depth: entries from the end (no snapshot at or before it) were trimmed away; "
        "oldest available is none (stream empty)"
    )


def gap(*entries: BookEntry) -> BookBreak:
    rebuilder = Rebuilder()
    for e in entries[:-1]:
        rebuilder.feed(e)
    with pytest.raises(BookBreak) as caught:
        rebuilder.feed(entries[-1])
    assert caught.value.kind == "gap" and rebuilder.book is None and rebuilder.breaks == 1
    return caught.value


def test_a_break_says_why_the_diff_does_not_follow() -> None:
    nxt, prev = snapshot(100), snapshot(100, link="prev")
    cases: list[tuple[tuple[BookEntry, ...], str]] = [
        ((nxt, diff(105, pu=100)), "it has no 'first' in a stream whose diffs follow by 'first'"),
        ((nxt, diff(105, first=102)), "first 102 is above 101 after the snapshot"),
        ((nxt, diff(105, first=101), diff(107, first=107)), "first 107 is not 106"),
        ((prev, diff(105, first=101)), "it has no 'pu' in a stream whose diffs follow by 'pu'"),
        ((prev, diff(105, first=101, pu=99)), "pu 99 is not 100 and first is above it"),
        ((prev, diff(105, pu=99)), "pu 99 is not 100"),  # OKX: no first to straddle with
        ((prev, diff(105, first=101, pu=100), diff(109, first=104, pu=104)), "pu 104 is not 105"),
    ]
    for entries, why in cases:
        caught = gap(*entries)
        last = entries[-2].seq
        assert str(caught) == f"diff seq {entries[-1].seq} does not follow seq {last}: {why}"
        assert (caught.seq, caught.after) == (entries[-1].seq, last)


def test_a_new_rebuilder_holds_nothing_and_has_counted_nothing() -> None:
    rebuilder = Rebuilder()
    assert (rebuilder.book, rebuilder.link, rebuilder.last_seq, rebuilder.stream) == (None, None, None, None)
    assert (rebuilder.applied, rebuilder.snapshots, rebuilder.skipped, rebuilder.breaks) == (0, 0, 0, 0)


def test_the_rebuilder_counts_snapshots_diffs_skips_and_breaks() -> None:
    rebuilder = Rebuilder()
    verdicts = [rebuilder.feed(e) for e in (diff(1, first=1), snapshot(5), diff(6, first=6), snapshot(9, ms=9),
                                            diff(10, first=10), diff(11, first=11))]
    assert verdicts == [Verdict.WAITING, Verdict.RESET, Verdict.APPLIED, Verdict.RESET, Verdict.APPLIED,
                        Verdict.APPLIED]
    assert (rebuilder.applied, rebuilder.snapshots, rebuilder.skipped, rebuilder.breaks) == (3, 2, 1, 0)
    assert rebuilder.last_seq == 11 and rebuilder.link == "next" and rebuilder.stream == ("binance", "X")


def test_disorder_names_the_seq_and_the_last_one() -> None:
    rebuilder = Rebuilder()
    rebuilder.feed(snapshot(100))
    for seq in (100, 99):
        with pytest.raises(BookBreak) as caught:
            rebuilder.feed(diff(seq, first=seq))
        assert str(caught.value) == f"seq {seq} is not above the last one, 100"
        assert (caught.value.kind, caught.value.seq, caught.value.after) == ("disorder", seq, 100)
    assert rebuilder.breaks == 0 and rebuilder.book is not None


def test_after_a_prev_snapshot_a_diff_from_its_very_id_follows_whatever_its_pu() -> None:
    """Binance futures: the first diff after a snapshot at S may start at S itself (``U <= S``)."""
    rebuilder = Rebuilder()
    rebuilder.feed(snapshot(100, link="prev", bids=(("1", "1"),)))
    assert rebuilder.feed(diff(105, first=100, pu=90, bids=(("2", "1"),))) is Verdict.APPLIED
    assert rebuilder.book is not None and rebuilder.book.levels() == ((("2", "1"), ("1", "1")), ())
    assert str(gap(snapshot(100, link="prev"), diff(105, first=101, pu=90))) == (
        "diff seq 105 does not follow seq 100: pu 90 is not 100 and first is above it"
    )


# -- book_stream: read spans -----------------------------------------------------------------------------------

MAX_ID = 2**64 - 1


def config_error(**kwargs: Any) -> str:
    snapshot_id = kwargs.pop("snapshot_id", "1000-50")
    with pytest.raises(ConfigError) as caught:
        read_span(snapshot_id, **kwargs)
    return str(caught.value)


def test_read_span_takes_every_id_from_zero_to_the_largest() -> None:
    assert read_span((0, 0), seq=0) == ReadSpan("0-0", "+", 0)
    assert read_span("0-0", ms=0) == ReadSpan("0-0", "0", None)
    assert read_span((MAX_ID, MAX_ID), seq=MAX_ID) == ReadSpan(f"{MAX_ID}-{MAX_ID}", "+", MAX_ID)
    assert read_span((MAX_ID, MAX_ID), ms=MAX_ID) == ReadSpan(f"{MAX_ID}-{MAX_ID}", str(MAX_ID), None)
    assert read_span((0, 0), end_id=(MAX_ID, MAX_ID)) == ReadSpan("0-0", f"{MAX_ID}-{MAX_ID}", MAX_ID)


def test_read_span_to_the_snapshot_itself() -> None:
    assert read_span("1000-50", end_id="1000-50") == ReadSpan("1000-50", "1000-50", 50)
    assert read_span("1000-50", ms=1000) == ReadSpan("1000-50", "1000", None)
    assert read_span("1000-50", seq=50) == ReadSpan("1000-50", "+", 50)


def test_read_span_refusals_name_the_argument_and_the_value() -> None:
    limit = f"an integer from 0 to {MAX_ID}"
    assert config_error(seq=1, ms=2) == "give one target: seq, ms or end_id"
    assert config_error(seq=1, end_id="1-1") == "give one target: seq, ms or end_id"
    assert config_error(snapshot_id=(-1, 5)) == f"snapshot_id ms: expected {limit}, got -1"
    assert config_error(snapshot_id=(5, MAX_ID + 1)) == f"snapshot_id seq: expected {limit}, got {MAX_ID + 1}"
    assert config_error(end_id=(MAX_ID + 1, 5)) == f"end_id ms: expected {limit}, got {MAX_ID + 1}"
    assert config_error(end_id=(2000, -1)) == f"end_id seq: expected {limit}, got -1"
    assert config_error(seq=MAX_ID + 1) == f"seq: expected {limit}, got {MAX_ID + 1}"
    assert config_error(ms=-1) == f"ms: expected {limit}, got -1"
    assert config_error(ms="5") == f"ms: expected {limit}, got '5'"
    assert config_error(snapshot_id="1000_50") == "snapshot_id: expected an entry ID <ms>-<seq>, got '1000_50'"
    assert config_error(snapshot_id=b"\xff-50") == "snapshot_id: expected an entry ID <ms>-<seq>, got '\ufffd-50'"
    assert config_error(end_id=b"7-\xfe") == "end_id: expected an entry ID <ms>-<seq>, got '7-\ufffd'"
