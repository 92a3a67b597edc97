"""The field checks remember the strings they passed: the same verdict as the check alone, in bounded memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import ingestor.fields as F
from ingestor import binance_usdm, okx
from ingestor.venue import MalformedFrame

CHECKS: dict[str, tuple[Callable[[Any], str], Callable[[str], object], set[str], Callable[[Any], str]]] = {
    "price": (F.price, F.POSITIVE, F._price_seen, F.pos),
    "symbol": (F.symbol, F.SYMBOL, F._symbol_seen, F.check_symbol),
}

decimals = st.from_regex(r"-?[0-9]{0,22}(\.[0-9]{0,20})?", fullmatch=True)
values = st.one_of(decimals, st.text(max_size=70), st.integers(), st.none(), st.floats(allow_nan=True))


@pytest.fixture(autouse=True)
def _empty_sets() -> Iterator[None]:
    F.forget_seen()
    yield
    F.forget_seen()


def verdict(check: Callable[[Any], str], value: Any) -> tuple[str, Any]:
    try:
        return "ok", check(value)
    except MalformedFrame as exc:
        return exc.kind, str(exc)


@pytest.mark.parametrize("name", CHECKS)
@given(value=values)
@example(value="0")
@example(value="0.00000000")
@example(value="1")
@example(value="BTCUSDT")
@example(value="٣")  # a digit outside ASCII: a decimal string is ASCII digits only
def test_a_value_gets_the_checks_verdict_whether_it_was_seen_before_or_not(name: str, value: Any) -> None:
    check, pattern, seen, alone = CHECKS[name]
    F.forget_seen()  # the fixture runs once a test, not once an example
    passes = type(value) is str and pattern(value) is not None
    first = verdict(check, value)
    again = verdict(check, value)
    assert first == again == verdict(alone, value)  # the same verdict, the same refusal, as the check alone
    assert (first[0] == "ok") is passes
    if passes:
        assert first[1] is value
        assert value in seen  # remembered: the next time costs one lookup
    else:
        assert type(value) is not str or value not in seen  # a refused value is never remembered


def test_each_check_remembers_only_what_it_passed_itself() -> None:
    """``"0"`` passes as a volume (non-negative) but not as a price; a symbol is never taken for a price."""
    assert F.nonneg("0") == "0"
    with pytest.raises(MalformedFrame) as refused:
        F.price("0")
    assert refused.value.kind == "bad_value"
    assert "0" not in F._price_seen
    assert F.price("2.5") == "2.5"
    assert "2.5" in F._price_seen and "2.5" not in F._symbol_seen
    assert F.symbol("ETHUSDT") == "ETHUSDT"
    assert "ETHUSDT" in F._symbol_seen and "ETHUSDT" not in F._price_seen
    with pytest.raises(MalformedFrame) as bad_symbol:
        F.symbol("BTC/USDT")
    assert bad_symbol.value.kind == "malformed"
    with pytest.raises(MalformedFrame):
        F.price("ETHUSDT")
    F.pos("3.5")
    F.nonneg("4.5")
    assert "3.5" not in F._price_seen and "4.5" not in F._price_seen  # the plain checks remember nothing


def test_the_bound_is_the_documented_one() -> None:
    assert F.SEEN_MAX == 4_096  # ingestor/fields.py and the changelog give the memory and the emptying for it


@pytest.mark.parametrize("name", CHECKS)
def test_the_remembered_values_stay_bounded_whatever_the_venue_sends(name: str) -> None:
    check, _, seen, _alone = CHECKS[name]
    for i in range(1, F.SEEN_MAX + 1):
        check(f"{i}.5")
    assert len(seen) == F.SEEN_MAX  # full, not yet emptied
    check("1.5")  # already there: nothing added, nothing dropped
    assert len(seen) == F.SEEN_MAX
    check(f"{F.SEEN_MAX + 1}.5")  # one more new value: the set starts again from it
    assert seen == {f"{F.SEEN_MAX + 1}.5"}
    for i in range(3 * F.SEEN_MAX):
        check(f"{i + 1}.25")
        assert len(seen) <= F.SEEN_MAX


@pytest.mark.parametrize("name", CHECKS)
def test_the_check_alone_remembers_nothing(name: str) -> None:
    _, _, seen, alone = CHECKS[name]
    assert alone("12.5") == "12.5"
    assert not seen


def test_forget_seen_empties_every_set() -> None:
    F.price("1")
    F.symbol("X")
    assert F._price_seen and F._symbol_seen
    F.forget_seen()
    assert not F._price_seen and not F._symbol_seen


def test_an_okx_books_push_leaves_the_sets_as_they_were_and_its_ticker_prices_are_remembered() -> None:
    """Hundreds of levels a push, rarely repeating: checked by the regex alone, so they do not push out the
    repeating trade and ticker prices."""
    books = {"arg": {"channel": "books", "instId": "BTC-USDT"}, "action": "snapshot",
             "data": [{"asks": [["3366.8", "9", "0", "3"], ["3368", "0", "0", "1"]],
                       "bids": [["3366.1", "7", "0", "3"]], "ts": "1700000000000", "checksum": 0}]}
    tick: Any = okx.parse_frame(orjson.dumps(books), 1)
    assert tick["asks"] == [["3366.8", "9"], ["3368", "0"]]
    assert not F._price_seen
    with pytest.raises(MalformedFrame):  # still checked
        okx.parse_frame(orjson.dumps({**books, "data": [{**books["data"][0], "bids": [["0", "7"]]}]}), 1)
    ticker = {"arg": {"channel": "tickers", "instId": "BTC-USDT"},
              "data": [{"instId": "BTC-USDT", "bidPx": "3366.1", "bidSz": "7", "askPx": "3366.8", "askSz": "9",
                        "ts": "1700000000000"}]}
    assert okx.parse_frame(orjson.dumps(ticker), 1) is not None
    assert F._price_seen == {"3366.1", "3366.8"}  # the prices; the sizes are checked alone


def test_a_mark_price_leaves_the_sets_as_they_were() -> None:
    """One a second, nearly always new: checked by the regex alone."""
    mark = {"e": "markPriceUpdate", "E": 1562305380000, "s": "BTCUSDT", "p": "11794.15000000", "i": "11784.62659091",
            "P": "11784.25641265", "r": "0.00038167", "T": 1562306400000}
    tick: Any = binance_usdm.parse_frame(orjson.dumps(mark), 1)
    assert tick["mark_px"] == "11794.15000000"
    assert not F._price_seen
    with pytest.raises(MalformedFrame):
        binance_usdm.parse_frame(orjson.dumps({**mark, "p": "0"}), 1)
