"""A pure L2 order book: price levels as the venue's own decimal strings, ordered by exact integers.

Prices and sizes arrive as decimal strings (Binance ``"0.35280000"``, OKX ``"29450.1"``).  The book keeps the
strings exactly as sent, for output, and orders the levels by an exact integer key: the price scaled by
``10**scale`` (``scale`` per book, 8 by default), so ``"0.3528"`` and ``"0.35280000"`` are the same level.
A level set again keeps the strings of the update that set it last (OKX's checksum is computed over them).
No float is ever made.  :func:`parse_decimal` is the one parser; it refuses, with a :class:`BookError` naming
the field and the value, anything that is not a string, not a plain decimal (a sign, an exponent, ``NaN``,
spaces, an empty string, non-ASCII digits), more than 20 integer digits, or more significant decimals than
the scale (up to 40 zeros beyond it are fine).

Storage, per side: a dict ``key -> (price, size)`` and a list of the keys sorted ascending, best level
last (bids keyed by the price, asks by minus the price).  An update is one dict operation plus, for a new
or removed level, a binary search and a C-speed ``list.insert``/``del``; activity sits near the best price,
at the end of the list, so the memory moved is small.  :meth:`Book.top` slices ``n`` keys off the end;
nothing is ever re-sorted after a snapshot.  A book remembers the integer of the last few thousand price
strings it parsed (:data:`PRICE_CACHE`), since diffs keep touching the same prices near the top.

Every mutation checks all of its input before it changes anything: a refused snapshot or diff leaves the
book as it was.  A :class:`Book` has one owner (no locks).  Sequencing (which diff follows which) is the
caller's: the book only refuses an update id below the one it is at (unless told the venue reset its ids).
"""

from __future__ import annotations

import re
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import Final, TypeAlias

from consumer_sdk.core.errors import Fatal

__all__ = [
    "DEFAULT_SCALE",
    "MAX_SCALE",
    "PRICE_CACHE",
    "Book",
    "BookError",
    "Level",
    "Levels",
    "decimal_parser",
    "format_units",
    "parse_decimal",
]

#: decimals kept by default: Binance quotes at most 8
DEFAULT_SCALE: Final = 8
#: the largest scale a book takes
MAX_SCALE: Final = 30

#: a price level as output: ``(price, size)``, the venue's strings
Level: TypeAlias = tuple[str, str]
#: levels as input: any iterable of ``(price, size)`` pairs (lists, as JSON gives them, or tuples)
Levels: TypeAlias = Iterable[Sequence[str]]

#: what a refused value is, when the scale's own pattern refused it (the slow path, for the message)
_PLAIN: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?").fullmatch
_POW10: Final[tuple[int, ...]] = tuple(10**i for i in range(MAX_SCALE + 1))
#: distinct price strings a book remembers the key of, before it forgets them all and starts again
PRICE_CACHE: Final = 4096


class BookError(Fatal, ValueError):
    """A price, size, level, update id or scale the book refuses; the book is left as it was."""


def _kind(value: object) -> str:
    return type(value).__name__


def _check_scale(scale: object) -> int:
    if type(scale) is not int or not 0 <= scale <= MAX_SCALE:
        raise BookError(f"scale: expected an integer from 0 to {MAX_SCALE}, got {scale!r}")
    return scale


def _pattern(scale: int) -> re.Pattern[str]:
    """A plain decimal: 1 to 20 integer digits, at most ``scale`` decimals, then at most 40 zeros."""
    return re.compile(rf"([0-9]{{1,20}})(?:\.([0-9]{{0,{scale}}})0{{0,40}})?")


def _refusal(value: object, scale: int) -> BookError:
    """Why ``value`` was refused (called only once it was)."""
    if type(value) is not str:
        return BookError(f"expected a decimal string, got {_kind(value)} {value!r:.40}")
    if _PLAIN(value) is not None:
        whole, _, frac = value.partition(".")
        if len(frac.rstrip("0")) > scale:
            return BookError(f"more than {scale} significant decimals: {value[:40]!r}")
        if len(whole) > 20:
            return BookError(f"too many digits (at most 20 before the point): {value[:40]!r} ({len(value)} chars)")
        return BookError(f"too many digits (at most {scale + 40} after the point): {value[:40]!r} ({len(value)} chars)")
    return BookError(f"not a plain decimal: {value[:40]!r}")


def decimal_parser(scale: int) -> Callable[[object], int]:
    """The parser of decimal strings into integers in units of ``10**-scale``.

    Raises :class:`BookError` saying what is wrong and quoting (at most 40 characters of) the value.
    Cost: one regex match and one ``int()`` of a short string.
    """
    scale = _check_scale(scale)
    full = _pattern(scale).fullmatch
    pow10 = _POW10

    def parse(value: object) -> int:
        if type(value) is str and (m := full(value)) is not None:
            frac: str | None = m[2]
            if not frac:
                return int(m[1]) * pow10[scale]
            return int(m[1] + frac) * pow10[scale - len(frac)]
        raise _refusal(value, scale)

    return parse


def parse_decimal(value: object, scale: int = DEFAULT_SCALE, field: str = "value") -> int:
    """``value`` (a decimal string) as an integer in units of ``10**-scale``: ``("0.3528", 8)`` -> ``35280000``.

    Raises :class:`BookError` naming ``field`` and the value when it is refused (see the module doc).
    """
    try:
        return decimal_parser(scale)(value)
    except BookError as exc:
        raise BookError(f"{field}: {exc}") from None


def format_units(units: int, scale: int = DEFAULT_SCALE) -> str:
    """An integer in units of ``10**-scale`` as a decimal string with ``scale`` decimals: ``(4, 2)`` -> ``"0.04"``."""
    _check_scale(scale)
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), _POW10[scale])
    return f"{sign}{whole}.{frac:0{scale}d}" if scale else f"{sign}{whole}"


def _update_id(value: object) -> int:
    if type(value) is not int or value < 0:
        raise BookError(f"update_id: expected a non-negative integer, got {value!r:.40}")
    return value


#: one parsed input level: the key, and the stored pair (``None``: delete)
_Parsed: TypeAlias = list[tuple[int, Level | None]]


class Book:
    """One instrument's L2 book: levels by exact price, the venue's strings kept, the last update id applied.

    :meth:`apply_snapshot` replaces the whole book; :meth:`apply_diff` sets levels (size ``"0"`` deletes, and
    deleting an absent level is fine, as on Binance).  Reads: :meth:`top`, :meth:`best_bid`, :meth:`best_ask`,
    :meth:`spread` (an exact integer in units of ``10**-scale``), :meth:`crossed`, :meth:`check`,
    :meth:`depth`, :meth:`levels`, :attr:`update_id`.  Two books are equal when they hold the same prices
    with the same sizes (compared as numbers) at the same update id.
    """

    __slots__ = ("_ask_keys", "_asks", "_bid_keys", "_bids", "_keys_of", "_match", "_parse", "_scale", "update_id")

    def __init__(self, scale: int = DEFAULT_SCALE) -> None:
        self._parse = decimal_parser(scale)
        self._scale = scale
        self._match = _pattern(scale).fullmatch
        #: price string -> its integer, for strings seen lately (at most PRICE_CACHE, then cleared)
        self._keys_of: dict[str, int] = {}
        #: key -> (price, size); bids keyed by price, asks by minus the price
        self._bids: dict[int, Level] = {}
        self._asks: dict[int, Level] = {}
        #: the keys, ascending: the best level is the last
        self._bid_keys: list[int] = []
        self._ask_keys: list[int] = []
        #: the update id of the last snapshot or diff applied; None before the first
        self.update_id: int | None = None

    @property
    def scale(self) -> int:
        """Decimals of the integer keys: prices and sizes are held in units of ``10**-scale``."""
        return self._scale

    # ------------------------------------------------------------ updates

    def _parse_side(self, levels: Levels, side: str, sign: int, snapshot: bool) -> _Parsed:
        """Every level of one side parsed and checked, before anything is changed.

        Cost per level: a dict look-up for a price seen lately (else a parse), a regex match of the size and a
        ``str.strip`` telling a zero size (a valid decimal with no digit but 0 is zero)."""
        parse, match, keys_of = self._parse, self._match, self._keys_of
        out: _Parsed = []
        field = "level"
        try:
            for level in levels:  # ``field`` is "level" here: the pair, or the iterable failing to give one
                if (type(level) is not list and type(level) is not tuple) or len(level) != 2:
                    raise BookError(f"expected a (price, size) pair, got {_kind(level)} {level!r:.60}")
                price, size = level
                field = "price"
                key = keys_of.get(price) if type(price) is str else None
                if key is None:
                    key = parse(price)
                    if len(keys_of) >= PRICE_CACHE:
                        keys_of.clear()
                    keys_of[price] = key
                field = "size"
                if type(size) is not str or match(size) is None:
                    raise _refusal(size, self._scale)
                if size.strip("0."):
                    out.append((key * sign, (price, size)))
                elif snapshot:
                    raise BookError(f"a snapshot level of size zero: {size!r} at price {price!r}")
                else:
                    out.append((key * sign, None))
                field = "level"
        except BookError as exc:
            raise BookError(f"{side}[{len(out)}] {field}: {exc}") from None
        except TypeError:
            raise BookError(f"{side}: expected a list of (price, size) pairs, got {_kind(levels)}") from None
        return out

    def apply_snapshot(self, update_id: int, bids: Levels, asks: Levels) -> None:
        """Replace the whole book with ``bids`` and ``asks`` at ``update_id`` (which may be below the current
        one: a resync).  A level of size zero or a price given twice on one side is refused.
        Cost: O(n log n) for n levels, once."""
        update_id = _update_id(update_id)
        sides: list[dict[int, Level]] = []
        for name, levels, sign in (("bids", bids, 1), ("asks", asks, -1)):
            parsed = self._parse_side(levels, name, sign, True)
            book: dict[int, Level] = {}
            for key, pair in parsed:
                assert pair is not None  # a snapshot level is never a delete
                if key in book:
                    raise BookError(f"{name}: price {book[key][0]!r} given twice in a snapshot")
                book[key] = pair
            sides.append(book)
        self._bids, self._asks = sides
        self._bid_keys = sorted(self._bids)
        self._ask_keys = sorted(self._asks)
        self.update_id = update_id

    def apply_diff(self, bids: Levels, asks: Levels, update_id: int, *, reset: bool = False) -> None:
        """Set each level given (size ``"0"`` deletes it; deleting an absent level does nothing) and move to
        ``update_id``, which may not be below the book's unless ``reset`` (the venue restarted its ids, as OKX
        may after maintenance, the caller having checked the diff follows).  Cost per level: a dict operation,
        plus a binary search and a list insert or delete when a level appears or goes."""
        update_id = _update_id(update_id)
        if not reset and self.update_id is not None and update_id < self.update_id:
            raise BookError(f"update_id: {update_id} is below the book's {self.update_id}")
        parsed_bids = self._parse_side(bids, "bids", 1, False)
        parsed_asks = self._parse_side(asks, "asks", -1, False)
        _apply(self._bids, self._bid_keys, parsed_bids)
        _apply(self._asks, self._ask_keys, parsed_asks)
        self.update_id = update_id

    # ------------------------------------------------------------ reads

    def top(self, n: int) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        """The best ``n`` levels of each side, best first: ``(bids, asks)``. Cost: O(n)."""
        if type(n) is not int or n < 0:
            raise BookError(f"n: expected a non-negative integer, got {n!r}")
        bids, asks = self._bids, self._asks
        return (
            tuple([bids[k] for k in self._bid_keys[: -n - 1 : -1]]),
            tuple([asks[k] for k in self._ask_keys[: -n - 1 : -1]]),
        )

    def best_bid(self) -> Level | None:
        """The highest bid ``(price, size)``, or None when there is no bid. Cost: O(1)."""
        return self._bids[self._bid_keys[-1]] if self._bid_keys else None

    def best_ask(self) -> Level | None:
        """The lowest ask ``(price, size)``, or None when there is no ask. Cost: O(1)."""
        return self._asks[self._ask_keys[-1]] if self._ask_keys else None

    def spread(self) -> int | None:
        """Best ask minus best bid, exactly, in units of ``10**-scale`` (negative when the book is crossed);
        None when a side is empty.  :func:`format_units` writes it as a decimal string."""
        if not self._bid_keys or not self._ask_keys:
            return None
        return -self._ask_keys[-1] - self._bid_keys[-1]

    def crossed(self) -> bool:
        """Whether the best bid is at or above the best ask."""
        spread = self.spread()
        return spread is not None and spread <= 0

    def depth(self) -> tuple[int, int]:
        """How many levels each side holds: ``(bids, asks)``."""
        return len(self._bid_keys), len(self._ask_keys)

    def levels(self) -> tuple[tuple[Level, ...], tuple[Level, ...]]:
        """The whole book, each side best first: ``(bids, asks)``. Cost: O(n)."""
        bids, asks = self._bids, self._asks
        return tuple([bids[k] for k in reversed(self._bid_keys)]), tuple([asks[k] for k in reversed(self._ask_keys)])

    def check(self) -> list[str]:
        """What is wrong with the book, as sentences; empty when nothing is: crossed, a level of size zero, an
        order that does not match the levels. Cost: O(n), a parse of every size."""
        problems: list[str] = []
        if self.crossed():
            bid, ask = self.best_bid(), self.best_ask()
            assert bid is not None and ask is not None
            problems.append(f"crossed: best bid {bid[0]} >= best ask {ask[0]}")
        sides = (("bids", self._bids, self._bid_keys, 1), ("asks", self._asks, self._ask_keys, -1))
        for name, book, keys, sign in sides:
            if len(keys) != len(book) or set(keys) != book.keys():
                problems.append(f"{name}: the order holds {len(keys)} prices, the levels {len(book)}")
            if any(a >= b for a, b in pairwise(keys)):
                problems.append(f"{name}: the order is not strictly ascending")
            for key, (price, size) in book.items():
                if self._parse(price) * sign != key:
                    problems.append(f"{name}: level {price!r} is filed under another price")
                if not self._parse(size):
                    problems.append(f"{name}: a level of size zero at {price}")
        return problems

    # ------------------------------------------------------------ copies and comparison

    def copy(self) -> Book:
        """An independent copy (dicts and lists copied at C speed; the level tuples are shared, immutable)."""
        other = Book(self._scale)
        other._keys_of = self._keys_of.copy()
        other._bids, other._asks = self._bids.copy(), self._asks.copy()
        other._bid_keys, other._ask_keys = self._bid_keys.copy(), self._ask_keys.copy()
        other.update_id = self.update_id
        return other

    def _numeric(self, scale: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        parse, up = decimal_parser(scale), _POW10[scale - self._scale]
        return (
            [(k * up, parse(self._bids[k][1])) for k in self._bid_keys],
            [(k * up, parse(self._asks[k][1])) for k in self._ask_keys],
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Book):
            return NotImplemented
        if self.update_id != other.update_id or self.depth() != other.depth():
            return False
        if self._scale == other._scale:
            if self._bid_keys != other._bid_keys or self._ask_keys != other._ask_keys:
                return False
            if all(self._bids[k][1] == other._bids[k][1] for k in self._bid_keys) and all(
                self._asks[k][1] == other._asks[k][1] for k in self._ask_keys
            ):
                return True
        scale = max(self._scale, other._scale)
        return self._numeric(scale) == other._numeric(scale)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        nb, na = self.depth()
        return (
            f"Book(update_id={self.update_id}, bids={nb}, asks={na}, "
            f"best_bid={self.best_bid()}, best_ask={self.best_ask()})"
        )


def _apply(book: dict[int, Level], keys: list[int], parsed: _Parsed) -> None:
    """Apply one side's parsed levels: set or delete, keeping ``keys`` sorted without a re-sort."""
    for key, pair in parsed:
        if pair is None:
            if book.pop(key, None) is not None:
                del keys[bisect_left(keys, key)]
        else:
            if key not in book:
                insort(keys, key)
            book[key] = pair
