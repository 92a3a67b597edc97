"""What ``market book`` and ``market replay --at`` print of an order book: pure functions, no I/O.

:func:`render_ladder` draws the ladder: a header (the key, the book's seq, its age, what the last entry did),
then the asks above the bids with the best of each in the middle, around a line giving the spread::

    md:binance:NKNUSDT:depth  seq 499869757  age 1.2 s  diff
           price            size
    ask    0.35290000   1290.00000000
    ask    0.35280000     10.00000000
    ------ spread 0.00070000 ------  (609 bids, 1000 asks)
    bid    0.35210000    672.00000000
    bid    0.35200000   1144.00000000

:func:`frame` wraps a ladder for a terminal (redrawn in place) or for a pipe (one block per update);
:func:`book_document` is the JSON form of a book at a position.
"""

from __future__ import annotations

from typing import Any, Final

from consumer_sdk.book import Book, Level, format_units

__all__ = ["CLEAR", "book_document", "format_age", "frame", "render_ladder"]

#: cursor home and clear to the end of the screen: the next frame draws over the last one
CLEAR: Final = "\x1b[H\x1b[J"


def format_age(age_us: int) -> str:
    """A duration in µs, short: ``850 ms``, ``1.2 s``, ``3 min 05 s``, ``2 h 07 min``; negative (the writer's clock
    ahead of this one) with a minus sign."""
    if age_us < 0:
        return "-" + format_age(-age_us)
    ms = age_us // 1000
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    s = ms // 1000
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _header(key: str, seq: int | None, ts_event_us: int | None, now_us: int, note: str) -> str:
    parts = [key]
    if seq is not None:
        parts.append(f"seq {seq}")
    if ts_event_us is not None:
        parts.append(f"age {format_age(now_us - ts_event_us)}")
    if note:
        parts.append(note)
    return "  ".join(parts)


def _aligned(values: list[str]) -> list[str]:
    """Decimal strings lined up on their points (``"100.5"`` over ``"100.55"``), all of one width."""
    parts = [v.partition(".") for v in values]
    wi = max((len(i) for i, _, _ in parts), default=0)
    wf = max((len(d) + len(f) for _, d, f in parts), default=0)
    return [f"{i:>{wi}}{d + f:<{wf}}" for i, d, f in parts]


def _decimals(price: str) -> int:
    return len(price.partition(".")[2])


def _spread_text(units: int, scale: int, decimals: int) -> str:
    """``units`` (a spread in ``10**-scale``) written with ``decimals`` decimals: those of the prices it is between,
    so nothing but zeros is cut."""
    text = format_units(units, scale)
    if decimals >= scale:
        return text
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac[:decimals]}" if decimals else whole


def render_ladder(
    key: str, book: Book | None, *, levels: int, now_us: int, seq: int | None = None, ts_event_us: int | None = None,
    note: str = "",
) -> str:
    """The ladder of ``book``'s best ``levels`` a side (no trailing newline), prices and sizes lined up on their
    decimal points.  ``seq`` defaults to the book's update id; ``ts_event_us`` (the venue's time of the book, µs)
    and ``now_us`` give the age; ``note`` (what the last entry did, or why there is no book) ends the header.
    Without a book: the header and ``no book``.  Cost: O(levels)."""
    if levels < 1:
        raise ValueError(f"levels: expected at least 1, got {levels}")
    if book is None:
        return f"{_header(key, seq, ts_event_us, now_us, '')}\nno book: {note or 'waiting for a snapshot'}"
    bids, asks = book.top(levels)
    seq = book.update_id if seq is None else seq
    rows: list[tuple[str, Level]] = [("ask", level) for level in reversed(asks)] + [("bid", level) for level in bids]
    prices = _aligned([p for _, (p, _s) in rows])
    sizes = _aligned([s for _, (_p, s) in rows])
    pw = max([len("price"), *map(len, prices)])
    sw = max([len("size"), *map(len, sizes)])
    spread = book.spread()
    if spread is None:
        middle = "no bids" if not bids and asks else "no asks" if bids and not asks else "empty book"
    else:
        decimals = max(_decimals(bids[0][0]), _decimals(asks[0][0]))
        middle = (f"CROSSED by {_spread_text(-spread, book.scale, decimals)}" if spread <= 0
                  else f"spread {_spread_text(spread, book.scale, decimals)}")
    nb, na = book.depth()
    lines = [_header(key, seq, ts_event_us, now_us, note), f"{'':3}  {'price':>{pw}}  {'size':>{sw}}"]
    body = [f"{side}  {p:>{pw}}  {s:>{sw}}".rstrip() for (side, _), p, s in zip(rows, prices, sizes, strict=True)]
    lines += body[: len(asks)]
    lines.append(f"------ {middle} ------  ({nb} bids, {na} asks)")
    lines += body[len(asks):]
    return "\n".join(lines)


def frame(ladder: str, *, tty: bool) -> str:
    """What to write for one update: on a terminal the ladder drawn over the last one, else the ladder as a block
    followed by an empty line."""
    return f"{CLEAR}{ladder}\n" if tty else f"{ladder}\n\n"


def book_document(
    key: str, book: Book, *, entry_id: str, seq: int, ts_event: int, snapshot_id: str, diffs: int,
    levels: int | None = None,
) -> dict[str, Any]:
    """The JSON form of a book at a position: where it is, and its levels each side best first as ``[price,
    size]`` (the venue's strings), the best ``levels`` a side, or all of them when None."""
    bids, asks = book.levels() if levels is None else book.top(levels)
    return {
        "key": key, "id": entry_id, "seq": seq, "ts_event": ts_event, "snapshot_id": snapshot_id, "diffs": diffs,
        "depth": list(book.depth()), "bids": [list(level) for level in bids], "asks": [list(level) for level in asks],
    }
