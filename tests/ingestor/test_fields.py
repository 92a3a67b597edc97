"""The field checks remember the strings they passed: the same verdict as the check alone, in bounded memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import ingestor.fields as F
from ingestor.venue import MalformedFrame

CHECKS: dict[str, tuple[Callable[[Any], str], Callable[[str], object], set[str], Callable[[Any], str]]] = {
    "pos": (F.pos, F.POSITIVE, F._pos_seen, F.check_pos),
    "nonneg": (F.nonneg, F.NON_NEGATIVE, F._nonneg_seen, F.check_nonneg),
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
    """``"0"`` is a volume (non-negative) but no price: the volume check passing it leaves the price check
    refusing it."""
    assert F.nonneg("0") == "0"
    assert "0" in F._nonneg_seen
    with pytest.raises(MalformedFrame) as refused:
        F.pos("0")
    assert refused.value.kind == "bad_value"
    assert "0" not in F._pos_seen
    assert F.pos("2.5") == "2.5"
    assert "2.5" in F._pos_seen and "2.5" not in F._nonneg_seen and "2.5" not in F._symbol_seen
    assert F.symbol("ETHUSDT") == "ETHUSDT"
    assert "ETHUSDT" in F._symbol_seen and "ETHUSDT" not in F._pos_seen
    with pytest.raises(MalformedFrame) as bad_symbol:
        F.symbol("BTC/USDT")
    assert bad_symbol.value.kind == "malformed"


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
    F.pos("1")
    F.nonneg("1")
    F.symbol("X")
    F.forget_seen()
    assert not F._pos_seen and not F._nonneg_seen and not F._symbol_seen

