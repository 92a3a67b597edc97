"""The checks every venue parser applies to untrusted frame fields, each refusal a :class:`MalformedFrame`
naming the field's problem.

A value that passes is returned as it came (prices and quantities stay the venue's strings); one that does not
raises (or, for the ``refused_*`` functions, returns) a :class:`~ingestor.venue.MalformedFrame` whose ``kind``
says why, by the parsers' refusal kinds (:data:`ingestor.binance.PARSE_REFUSALS`): ``bad_number`` for what no
tick may hold (a decimal that is not plain or too long, an integer beyond its range), ``bad_value`` for a number
of the wrong sign, ``malformed`` for a value of the wrong type; :func:`not_json` also tells ``invalid_utf8`` and
``too_deep``.

Decimals are plain: at most 20 integer and 18 fraction digits, no sign, no exponent (:data:`POSITIVE`,
:data:`NON_NEGATIVE`; :data:`SIGNED` is asked only of a value already refused).  A symbol is 1 to 64 letters,
digits, ``_``, ``.`` or ``-`` (:data:`SYMBOL`), since it names a stream key.  Integers sent as JSON numbers are
within ``0..INT64_MAX`` (:func:`nonneg_int`), times in ms within :data:`MS_MAX` so their µs fit an int64
(:func:`ms`).

These run once per value on the hot path: each is a plain function, one regex match or type check on the way
through; the parsers import them as module-level names.  A venue repeats its symbols in every frame and its prices
on every update until the market moves (its quantities far less), and a set lookup costs a fraction of a regex
match, so :func:`price` (:func:`pos` for a price) and :func:`symbol` remember the strings they passed: a value seen
before is taken on one lookup.  Only a value the check passed enters its set, so every verdict is the check's
whatever the set holds.  Each set is emptied once it holds :data:`SEEN_MAX` strings: a venue sending ever new
values costs at most about 1 MB (the two sets of 4,096 strings of the longest values the checks pass) and, once
every 4,096 new values, the emptying, about 0.1 ms.  :func:`check_symbol` is :func:`symbol` remembering nothing
(``market bench parse``'s baseline, with :func:`pos` for :func:`price`).
"""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

from ingestor.venue import MalformedFrame

__all__ = [
    "INT64_MAX",
    "MS_MAX",
    "NON_NEGATIVE",
    "POSITIVE",
    "SEEN_MAX",
    "SIGNED",
    "SYMBOL",
    "boolean",
    "check_symbol",
    "decode",
    "event",
    "forget_seen",
    "ms",
    "nonneg",
    "nonneg_int",
    "not_json",
    "pos",
    "price",
    "refused_decimal",
    "refused_int",
    "symbol",
]

INT64_MAX: Final = (1 << 63) - 1
#: the latest time in ms whose µs still fit an int64
MS_MAX: Final = INT64_MAX // 1000
#: a plain decimal above zero, at most 20 integer and 18 fraction digits: the hot path's one check per value
POSITIVE: Final = re.compile(r"(?=[0-9.]*[1-9])[0-9]{1,20}(?:\.[0-9]{0,18})?").fullmatch
#: a plain decimal, zero or more, within the same bounds
NON_NEGATIVE: Final = re.compile(r"[0-9]{1,20}(?:\.[0-9]{0,18})?").fullmatch
#: a decimal with a sign (only asked once the value was refused: zero or negative, or not a decimal at all)
SIGNED: Final = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{0,18})?").fullmatch
#: a symbol that is one part of a stream key
SYMBOL: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}").fullmatch
#: the most strings each set of values already passed holds before it is emptied
SEEN_MAX: Final = 4_096

# The strings each check has passed (owned by the thread that parses: the event loop's).
_price_seen: set[str] = set()
_symbol_seen: set[str] = set()


def forget_seen() -> None:
    """Empty the sets of values already passed (tests and the bench; a process never needs to)."""
    _price_seen.clear()
    _symbol_seen.clear()


def _remember(seen: set[str], value: str) -> None:
    if len(seen) >= SEEN_MAX:
        seen.clear()
    seen.add(value)


def nonneg_int(value: Any, limit: int = INT64_MAX) -> int:
    """An id, a count or a time sent as a JSON number: within ``0..limit``."""
    if type(value) is not int or not 0 <= value <= limit:
        raise refused_int(value, limit)
    return value


def refused_int(value: Any, limit: int) -> MalformedFrame:
    """The refusal of ``value``, which :func:`nonneg_int` did not take (the rare path)."""
    if type(value) is int and value > limit:
        return MalformedFrame(f"integer out of range (at most {limit}), got {value!r}", "bad_number")
    kind = "malformed"
    if type(value) is int:
        kind = "bad_value"  # below zero
    elif type(value) is float and not value < INT64_MAX:
        kind = "bad_number"  # orjson reads an integer beyond 64 bits as a double
    return MalformedFrame(f"expected a non-negative integer, got {value!r}", kind)


def ms(value: Any) -> int:
    """A time in ms whose µs fit an int64."""
    return nonneg_int(value, MS_MAX)


def symbol(value: Any) -> str:
    """A symbol (see :data:`SYMBOL`), remembering the strings it passed."""
    if type(value) is str and value in _symbol_seen:
        return value
    checked = check_symbol(value)
    _remember(_symbol_seen, checked)
    return checked


def check_symbol(value: Any) -> str:
    """:func:`symbol` remembering nothing: the regex every time."""
    if type(value) is str and SYMBOL(value):
        return value
    raise MalformedFrame(f"expected a symbol, got {value!r}")


def refused_decimal(value: Any, what: str) -> MalformedFrame:
    """The refusal of ``value`` as ``what`` decimal (``"a positive"``, ``"a non-negative"``, ...): ``bad_value`` for a
    decimal of the wrong sign, ``bad_number`` for a string that is no plain decimal (its first 40 characters shown)."""
    if type(value) is not str:
        return MalformedFrame(f"expected a decimal string, got {value!r}")
    if SIGNED(value) is not None:
        return MalformedFrame(f"expected {what} decimal, got {value!r}", "bad_value")
    return MalformedFrame(f"expected {what} plain decimal, got {value[:40]!r} ({len(value)} chars)", "bad_number")


def pos(value: Any) -> str:
    """A price or quantity: a plain decimal string above zero."""
    if type(value) is str and POSITIVE(value) is not None:
        return value
    raise refused_decimal(value, "a positive")


def price(value: Any) -> str:
    """A price: :func:`pos`, remembering the strings it passed."""
    if type(value) is str and value in _price_seen:
        return value
    checked = pos(value)
    _remember(_price_seen, checked)
    return checked


def nonneg(value: Any) -> str:
    """A volume or a size: a plain decimal string, zero or more."""
    if type(value) is str and NON_NEGATIVE(value) is not None:
        return value
    raise refused_decimal(value, "a non-negative")


def boolean(value: Any) -> bool:
    if type(value) is not bool:
        raise MalformedFrame(f"expected a boolean, got {value!r}")
    return value


def not_json(raw: str | bytes, exc: orjson.JSONDecodeError) -> MalformedFrame:
    """The refusal of a frame orjson could not read, by what it said (the rare path)."""
    msg = str(exc)
    if "UTF-8" in msg:
        kind = "invalid_utf8"
    elif "depth" in msg:  # orjson: "depth limit exceeded"
        kind = "too_deep"
    elif "number" in msg:
        kind = "bad_number"
    else:  # a NaN or Infinity literal (for -Infinity orjson points after the sign)
        if isinstance(raw, str):
            literal = raw.startswith(("NaN", "Infinity"), exc.pos)
        else:
            literal = raw.startswith((b"NaN", b"Infinity"), exc.pos)
        kind = "bad_number" if literal else "malformed"
    return MalformedFrame(f"not JSON: {msg}", kind)  # orjson's messages are one short line


def decode(raw: str | bytes) -> dict[str, Any]:
    """A frame's JSON object, as sent (OKX's pushes keep ``data`` beside ``arg``)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise not_json(raw, exc) from None
    if type(obj) is not dict:
        raise MalformedFrame("not a JSON object")
    return obj


def event(raw: str | bytes) -> dict[str, Any]:
    """A Binance frame's JSON object: the one under ``data`` when it is combined-stream wrapped, else the frame's."""
    obj = decode(raw)
    data = obj.get("data")
    return data if type(data) is dict else obj
