"""consumer_sdk.book: the L2 book held to a trivially simple reference on the venues' own sequences.

The reference (:class:`SortedDict`) is written here, apart from the code under test: a dict keyed by
:class:`decimal.Decimal` prices, fully sorted whenever it is read.  The real captures (Binance spot and COIN-M
futures with the REST snapshots recorded beside them, OKX with its checksums) are applied to both, and the two
must agree level for level after every diff.
"""

from __future__ import annotations

import re
import zlib
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.book import (
    MAX_SCALE,
    PRICE_CACHE,
    Book,
    BookError,
    decimal_parser,
    format_units,
    parse_decimal,
)
from consumer_sdk.core.errors import Fatal

OKX = Path(__file__).resolve().parents[1] / "fixtures" / "okx-2022-05-13.jsonl"


class SortedDict:
    """The naive book: levels by Decimal price, sorted in full on every read; size zero deletes."""

    def __init__(self, bids: list[Any], asks: list[Any]) -> None:
        self.bids = {Decimal(p): (p, s) for p, s in bids}
        self.asks = {Decimal(p): (p, s) for p, s in asks}

    def apply(self, bids: list[Any], asks: list[Any]) -> None:
        for side, levels in ((self.bids, bids), (self.asks, asks)):
            for p, s in levels:
                if Decimal(s) == 0:
                    side.pop(Decimal(p), None)
                else:
                    side[Decimal(p)] = (p, s)

    def levels(self) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
        return (
            tuple(self.bids[k] for k in sorted(self.bids, reverse=True)),
            tuple(self.asks[k] for k in sorted(self.asks)),
        )

    def spread_units(self, scale: int) -> int | None:
        if not self.bids or not self.asks:
            return None
        return int((min(self.asks) - max(self.bids)) * 10**scale)


def assert_same(book: Book, ref: SortedDict) -> None:
    bids, asks = ref.levels()
    assert book.levels() == (bids, asks)
    assert book.depth() == (len(bids), len(asks))
    assert book.top(5) == (bids[:5], asks[:5])
    assert book.best_bid() == (bids[0] if bids else None)
    assert book.best_ask() == (asks[0] if asks else None)
    assert book.spread() == ref.spread_units(book.scale)


# -- the real captures -----------------------------------------------------------------------------------------


def test_real_captures_match_the_sorted_dict_after_every_diff(depth_captures: list[Any]) -> None:
    """Each symbol's REST snapshot, then every diff that follows it by the venue's rules (the fixture checks that
    each follows: a hole fails the test), applied to the book and to the reference."""
    applied: dict[str, int] = {}
    for cap in depth_captures:
        applied[cap.symbol] = 0
        book, ref = Book(), SortedDict(cap.bids, cap.asks)
        book.apply_snapshot(cap.last_update_id, cap.bids, cap.asks)
        assert_same(book, ref)
        assert book.check() == []
        for d in cap.continuous():
            book.apply_diff(d["b"], d["a"], d["u"])
            ref.apply(d["b"], d["a"])
            assert_same(book, ref)
            assert not book.crossed(), (cap.symbol, d["u"], book.best_bid(), book.best_ask())
            assert book.update_id == d["u"]
            applied[cap.symbol] += 1
        assert book.check() == []
    assert len(applied) >= 4 and all(n > 0 for n in applied.values()), applied


def test_okx_books_match_the_venues_checksum_after_every_message() -> None:
    """OKX sends the crc32 of its own top 25 levels with every books message: the book's strings and order must
    give the same number (and the naive book agrees level for level)."""
    books: dict[str, tuple[Book, SortedDict]] = {}
    checked = 0
    for n, line in enumerate(OKX.read_bytes().splitlines()):
        frame = orjson.loads(line)["frame"]
        msg = orjson.loads(frame) if frame.startswith("{") else {}
        if msg.get("arg", {}).get("channel") != "books" or "data" not in msg:
            continue
        data = msg["data"][0]
        bids = [level[:2] for level in data["bids"]]
        asks = [level[:2] for level in data["asks"]]
        inst = msg["arg"]["instId"]
        if msg["action"] == "snapshot":
            book = Book()
            book.apply_snapshot(n, bids, asks)
            books[inst] = (book, SortedDict(bids, asks))
        else:
            books[inst][0].apply_diff(bids, asks, n)
            books[inst][1].apply(bids, asks)
        book, ref = books[inst]
        assert_same(book, ref)
        top_bids, top_asks = book.top(25)
        parts: list[str] = []
        for i in range(25):
            for side in (top_bids, top_asks):
                if i < len(side):
                    parts.extend(side[i])
        crc = zlib.crc32(":".join(parts).encode())
        assert crc - (1 << 32 if crc >= 1 << 31 else 0) == data["checksum"], (inst, n)
        checked += 1
    assert len(books) == 3 and checked > 250


# -- parsing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "scale", "units"),
    [
        ("0.35280000", 8, 35_280_000),
        ("0.3528", 8, 35_280_000),
        ("29450.1", 8, 2_945_010_000_000),
        ("7", 0, 7),
        ("7.", 2, 700),
        ("0.10000000000000000000", 1, 1),
        ("00012.50", 3, 12_500),
        ("0", 8, 0),
        ("99999999999999999999.123456789012345678", 18, 99999999999999999999123456789012345678),
    ],
)
def test_parse_decimal_is_exact(text: str, scale: int, units: int) -> None:
    assert parse_decimal(text, scale) == units
    assert decimal_parser(scale)(text) == units
    with localcontext(prec=100):
        assert Decimal(units) / Decimal(10) ** scale == Decimal(text)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("-1", "not a plain decimal"),
        ("+1", "not a plain decimal"),
        ("1e5", "not a plain decimal"),
        ("NaN", "not a plain decimal"),
        ("", "not a plain decimal"),
        (" 1", "not a plain decimal"),
        (".5", "not a plain decimal"),
        ("1_000", "not a plain decimal"),
        ("\u0661", "not a plain decimal"),
        ("0.000000001", "more than 8 significant decimals"),
        ("1" * 21, "too many digits"),
        ("1." + "0" * 49, "too many digits"),
        (1, "expected a decimal string, got int"),
        (0.5, "expected a decimal string, got float"),
        (None, "expected a decimal string, got NoneType"),
        (b"1", "expected a decimal string, got bytes"),
    ],
)
def test_parse_decimal_refuses_naming_the_field_and_value(value: object, says: str) -> None:
    with pytest.raises(BookError, match=re.escape(says)) as caught:
        parse_decimal(value, 8, field="bid price")
    assert str(caught.value).startswith("bid price: ")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, Fatal)


@pytest.mark.parametrize("scale", [-1, MAX_SCALE + 1, "8", True, None])
def test_a_bad_scale_is_refused(scale: Any) -> None:
    with pytest.raises(BookError, match="scale"):
        Book(scale)


def test_format_units() -> None:
    assert format_units(4, 2) == "0.04"
    assert format_units(-12_345, 3) == "-12.345"
    assert format_units(35_280_000) == "0.35280000"
    assert format_units(7, 0) == "7"


# -- the book --------------------------------------------------------------------------------------------------


def small_book() -> Book:
    book = Book()
    book.apply_snapshot(100, [["10.5", "1"], ["10.4", "2"], ["9", "3"]], [["10.6", "4"], ["11", "5"]])
    return book


def test_top_best_spread_and_depth() -> None:
    book = small_book()
    assert book.top(2) == ((("10.5", "1"), ("10.4", "2")), (("10.6", "4"), ("11", "5")))
    assert book.top(0) == ((), ())
    assert book.top(10) == book.levels()
    assert book.best_bid() == ("10.5", "1")
    assert book.best_ask() == ("10.6", "4")
    assert book.spread() == 10_000_000
    assert format_units(book.spread() or 0) == "0.10000000"
    assert book.depth() == (3, 2)
    assert not book.crossed()
    assert book.update_id == 100
    with pytest.raises(BookError):
        book.top(-1)


def test_an_empty_book() -> None:
    book = Book()
    assert book.update_id is None
    assert book.levels() == ((), ())
    assert book.best_bid() is None and book.best_ask() is None and book.spread() is None
    assert not book.crossed() and book.check() == []
    book.apply_diff([["1", "2"]], [], 5)
    assert book.levels() == ((("1", "2"),), ()) and book.spread() is None


def test_a_diff_sets_deletes_and_ignores_absent_deletes() -> None:
    book = small_book()
    book.apply_diff([["10.5", "0"], ["10.55", "7"], ["8", "0.000"]], [["11", "6"], ["12", "0"]], 101)
    assert book.levels() == (
        (("10.55", "7"), ("10.4", "2"), ("9", "3")),
        (("10.6", "4"), ("11", "6")),
    )
    assert book.update_id == 101


def test_the_same_price_spelled_otherwise_is_the_same_level_and_keeps_the_newest_string() -> None:
    book = small_book()
    book.apply_diff([["10.50000000", "8"]], [["10.600", "0"]], 101)
    assert book.levels()[0][0] == ("10.50000000", "8")
    assert book.depth() == (3, 1)


def test_a_crossed_book_is_reported() -> None:
    book = small_book()
    book.apply_diff([["10.6", "1"]], [], 101)
    assert book.crossed()
    assert book.spread() == 0
    assert book.check() == ["crossed: best bid 10.6 >= best ask 10.6"]


def test_check_finds_a_corrupted_book() -> None:
    book = small_book()
    book._bids[1_000_000_000] = ("10", "0")  # a level with no place in the order, and of size zero
    problems = book.check()
    assert "bids: the order holds 3 prices, the levels 4" in problems
    assert "bids: a level of size zero at 10" in problems
    book = small_book()
    book._ask_keys.reverse()
    assert book.check() == ["asks: the order is not strictly ascending"]


def test_snapshot_refusals_leave_the_book_as_it_was() -> None:
    book = small_book()
    before = book.copy()
    with pytest.raises(BookError, match=r"asks\[1\] size: a snapshot level of size zero"):
        book.apply_snapshot(200, [["1", "1"]], [["2", "1"], ["3", "0"]])
    with pytest.raises(BookError, match="given twice"):
        book.apply_snapshot(200, [["1", "1"], ["1.0", "2"]], [])
    with pytest.raises(BookError, match="update_id"):
        book.apply_snapshot(-1, [], [])
    assert book == before and book.levels() == before.levels()
    book.apply_snapshot(50, [["1", "1"]], [])  # a resync may go back
    assert book.update_id == 50 and book.levels() == ((("1", "1"),), ())


def test_diff_refusals_leave_the_book_as_it_was() -> None:
    book = small_book()
    before = book.copy()
    cases: list[tuple[Any, Any, Any, str]] = [
        ([["10.1", "1"], ["10.2", "-1"]], [], 101, r"bids[1] size: not a plain decimal: '-1'"),
        ([["10.1", "1"]], [["x", "1"]], 101, "asks[0] price: not a plain decimal: 'x'"),
        ([["10.1", "1"], ["10.2"]], [], 101, "bids[1] level: expected a (price, size) pair"),
        ([["10.1", "1"], "12"], [], 101, "bids[1] level: expected a (price, size) pair, got str"),
        ([["10.1", "1", "0", "3"]], [], 101, "bids[0] level: expected a (price, size) pair"),
        (None, [], 101, "bids: expected a list of (price, size) pairs, got NoneType"),
        ([], [], 99, "update_id: 99 is below the book's 100"),
        ([], [], "101", "update_id: expected a non-negative integer"),
        ([], [], True, "update_id: expected a non-negative integer"),
    ]
    for bids, asks, uid, says in cases:
        with pytest.raises(BookError) as caught:
            book.apply_diff(bids, asks, uid)
        assert says in str(caught.value)
        assert book == before and book.levels() == before.levels() and book.update_id == 100


def test_copy_is_independent_and_equality_is_by_value() -> None:
    book = small_book()
    twin = book.copy()
    assert twin == book and twin is not book
    twin.apply_diff([["10.5", "0"]], [], 101)
    assert book.depth() == (3, 2) and twin.depth() == (2, 2)
    assert twin != book
    book.apply_diff([["10.5", "0"]], [], 101)
    assert twin == book
    book.apply_diff([["10.4", "2.000"]], [], 101)  # the same size written otherwise
    assert book == twin
    book.apply_diff([], [], 102)
    assert book != twin  # another update id
    wide = Book(12)
    wide.apply_snapshot(102, [["10.4", "2"], ["9", "3"]], [["10.6", "4"], ["11", "5"]])
    assert wide == book and book == wide
    assert book != "a book"
    with pytest.raises(TypeError):
        hash(book)


def test_the_price_cache_forgets_and_stays_right() -> None:
    book = Book()
    book.apply_snapshot(0, [], [])
    ref = SortedDict([], [])
    for i in range(PRICE_CACHE + 10):
        level = [[f"{i}.5", "1"]]
        book.apply_diff(level, [], i + 1)
        ref.apply(level, [])
    assert len(book._keys_of) <= PRICE_CACHE
    assert_same(book, ref)


def test_repr_names_the_state() -> None:
    assert repr(small_book()) == "Book(update_id=100, bids=3, asks=2, best_bid=('10.5', '1'), best_ask=('10.6', '4'))"


# -- properties ------------------------------------------------------------------------------------------------


def spell(units: int, decimals: int, extra_zeros: int) -> str:
    """``units / 10**decimals`` written with ``decimals`` places (none when 0) and ``extra_zeros`` zeros after."""
    whole, frac = divmod(units, 10**decimals)
    if decimals == 0:
        return f"{whole}." + "0" * extra_zeros if extra_zeros else str(whole)
    return f"{whole}.{frac:0{decimals}d}" + "0" * extra_zeros


#: a price: a tick of 0.01 between 0.01 and 3.00, written with 2 decimals and up to 14 zeros more
prices = st.builds(spell, st.integers(1, 300), st.just(2), st.integers(0, 14))
#: a size of up to 8 decimals; zero is written many ways
sizes = st.one_of(
    st.builds(spell, st.integers(1, 10**12), st.integers(0, 8), st.integers(0, 4)),
    st.sampled_from(["0", "0.0", "0.00000000", "00", "0.", "0.000000000000"]),
)
positive_sizes = st.builds(spell, st.integers(1, 10**12), st.integers(0, 8), st.integers(0, 4))
side = st.lists(st.tuples(prices, sizes).map(list), max_size=12)
snapshot_side = st.dictionaries(st.integers(1, 300), positive_sizes, max_size=40).map(
    lambda levels: [[spell(p, 2, 0), s] for p, s in levels.items()]
)


@given(snapshot_side, snapshot_side, st.lists(st.tuples(side, side), max_size=25), st.sampled_from([8, 12, 18]))
def test_random_diffs_match_the_sorted_dict(
    bids: list[list[str]], asks: list[list[str]], diffs: list[tuple[list[Any], list[Any]]], scale: int
) -> None:
    book, ref = Book(scale), SortedDict(bids, asks)
    book.apply_snapshot(7, bids, asks)
    assert_same(book, ref)
    for uid, (b, a) in enumerate(diffs, start=8):
        book.apply_diff(b, a, uid)
        ref.apply(b, a)
        assert_same(book, ref)
        assert book.crossed() == (bool(ref.bids) and bool(ref.asks) and max(ref.bids) >= min(ref.asks))
        assert [p for p in book.check() if not p.startswith("crossed")] == []


_PLAIN_OK = re.compile(r"[0-9]{1,20}(?:\.[0-9]*)?")
hostile = st.one_of(
    st.sampled_from(
        ["", " ", "-1", "+1", "-0", "1e5", "1E-5", "NaN", "nan", "inf", "-Infinity", "0x10", "1_000", "1 ", "\t1",
         "1.2.3", ".5", "1,5", "--1", "\u0661", "\uff11", "1\x00", "0.123456789", "1" * 21]
    ),
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
    st.integers(1, 9).map(lambda d: "0." + "0" * 8 + str(d)),
    prices.map(lambda p: "-" + p),
    prices.map(lambda p: p + "e0"),
    st.text(max_size=10).filter(
        lambda s: not _PLAIN_OK.fullmatch(s) or len(s.partition(".")[2].rstrip("0")) > 8
    ),
)


@given(snapshot_side, snapshot_side, side, st.sampled_from(["bids", "asks"]), st.sampled_from([0, 1]), hostile,
       st.booleans())
def test_hostile_values_are_refused_and_change_nothing(
    bids: list[list[str]], asks: list[list[str]], levels: list[list[str]], where: str, field: int, bad: object,
    snapshot: bool,
) -> None:
    """A refused value anywhere in a side: the error names the side, the level's index and the field, and the book
    is unchanged (the levels before it were valid and are not applied either)."""
    book = Book()
    book.apply_snapshot(7, bids, asks)
    before = book.copy()
    if snapshot:  # a snapshot's levels: no size zero, no price twice
        levels = list({Decimal(p): [p, s] for p, s in levels if Decimal(s)}.values())
    position = len(levels) // 2
    level: list[Any] = ["1.00", "1"]
    level[field] = bad
    given = {"bids": [], "asks": [], where: [*levels[:position], level, *levels[position:]]}
    with pytest.raises(BookError) as caught:
        if snapshot:
            book.apply_snapshot(9, given["bids"], given["asks"])
        else:
            book.apply_diff(given["bids"], given["asks"], 9)
    assert str(caught.value).startswith(f"{where}[{position}] {('price', 'size')[field]}: "), str(caught.value)
    assert book == before and book.levels() == before.levels() and book.update_id == 7
