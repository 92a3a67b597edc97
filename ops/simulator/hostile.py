"""Hostile frames, on demand: what a venue should never send, built for one connection; pure code.

``/control/hostile?kind=K[&count=N][&seconds=S][&jump=J]`` (or :meth:`Simulator.hostile`) puts ``count``
of kind ``K`` into the live stream of every connection, between its regular frames:

================  ====================================================================================
``big_frame``     one text frame of 50 MB (a trade padded with a 50 MB string)
``invalid_utf8``  a trade whose symbol holds bytes that are not UTF-8
``binary``        a trade, well formed, sent as a binary frame
``deep_json``     ``[[[...]]]`` nested 100k deep
``huge_number``   a trade id, a price and a quantity of 100k digits (three frames)
``nan``           ``NaN`` and ``Infinity`` as literals and as strings in price and quantity (four frames)
``zero_price``    a trade priced ``0.00000000``
``negative_qty``  a trade of quantity ``-1.00000000``
``id_jump``       a trade whose id is the last one plus ``jump`` (default 2^63)
``id_back``       a trade with an id already sent (ten before the last one), at another price
``unsubscribed_stream``  a frame of a stream of the connection's symbol it did not subscribe to
``unknown_symbol``  a trade of a symbol the venue does not list, under its own stream name and under
                  the connection's
``ping_flood``    ``count`` pings (default 10,000) in one write
``no_pong``       our pongs withheld for ``seconds`` (default 30): the client's pings go unanswered
================  ====================================================================================

Every hostile trade (but ``id_back``) carries an id the venue has not used yet, the next one, so a
client that took it would store a trade the venue never made: its price, :data:`HOSTILE_PRICE`, shows.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = [
    "DEFAULT_COUNTS",
    "HOSTILE_KINDS",
    "HOSTILE_PRICE",
    "HostileRequest",
    "hostile_frames",
    "parse_hostile",
    "ping_flood",
    "ws_frame",
]

HOSTILE_KINDS: Final = (
    "big_frame", "invalid_utf8", "binary", "deep_json", "huge_number", "nan", "zero_price", "negative_qty",
    "id_jump", "id_back", "unsubscribed_stream", "unknown_symbol", "ping_flood", "no_pong",
)
#: how many of a kind one request sends when it names no count
DEFAULT_COUNTS: Final = {"ping_flood": 10_000}
#: the price of every hostile trade: no synthetic trade has it
HOSTILE_PRICE: Final = "13.13131313"
#: the symbol of ``unknown_symbol``
UNKNOWN_SYMBOL: Final = "NOPEUSDT"
BIG_FRAME: Final = 50 * 1024 * 1024
DEPTH: Final = 100_000
DIGITS: Final = 100_000
_OP_TEXT: Final = 0x1
_OP_BINARY: Final = 0x2
_OP_PING: Final = 0x9


@dataclass(frozen=True, slots=True)
class HostileRequest:
    """One hostile request: the kind, how many, for how long (``no_pong``), the jump (``id_jump``)."""

    kind: str
    count: int = 1
    seconds: float = 30.0
    jump: int = 1 << 63


def parse_hostile(
    kind: str | None, count: str | None, seconds: str | None, jump: str | None
) -> HostileRequest | str:
    """The control endpoint's parameters -> a :class:`HostileRequest`, or the error in one line."""
    if kind not in HOSTILE_KINDS:
        return f"unknown hostile kind {kind!r}; expected one of " + ", ".join(HOSTILE_KINDS)
    try:
        n = int(count) if count is not None else DEFAULT_COUNTS.get(kind, 1)
        secs = float(seconds) if seconds is not None else 30.0
        step = int(jump) if jump is not None else 1 << 63
    except ValueError:
        return f"count and jump must be integers and seconds a number, got {count!r}, {jump!r}, {seconds!r}"
    most = 4 if kind == "big_frame" else 100_000
    if not 1 <= n <= most:
        return f"count must be between 1 and {most} for {kind}, got {n}"
    if not 0 < secs <= 3600:
        return f"seconds must be above 0 and at most 3600, got {secs}"
    if not 1 <= step < 1 << 64:
        return f"jump must be between 1 and 2^64 - 1, got {step}"
    return HostileRequest(kind, n, secs, step)


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, unfragmented WebSocket frame (server to client)."""
    n = len(payload)
    head = bytes((0x80 | opcode,))
    if n < 126:
        return head + bytes((n,)) + payload
    if n < 65536:
        return head + b"\x7e" + n.to_bytes(2, "big") + payload
    return head + b"\x7f" + n.to_bytes(8, "big") + payload


def _trade(symbol: str, trade_id: int | bytes, now_ms: int, price: str = HOSTILE_PRICE, qty: str = "1.00000000",
           **extra: Any) -> dict[str, Any]:
    return {"e": "trade", "E": now_ms, "s": symbol, "t": trade_id, "p": price, "q": qty, "T": now_ms, "m": False,
            "M": True, **extra}


def _wrap(stream: str, data: bytes, combined: bool) -> bytes:
    return b'{"stream":' + orjson.dumps(stream) + b',"data":' + data + b"}" if combined else data


def hostile_frames(
    kind: str, *, symbol: str, subscribed: Collection[str], combined: bool, last_trade_id: int, now_ms: int,
    jump: int = 1 << 63,
) -> list[bytes]:
    """One of ``kind`` (not ``ping_flood``, ``no_pong``: the server's own) for a connection subscribed to
    ``subscribed`` streams, ``symbol`` (upper case) one of theirs, as whole WebSocket frames."""
    stream = f"{symbol.lower()}@trade"
    nxt = last_trade_id + 1

    def text(data: bytes, name: str = stream) -> bytes:
        return ws_frame(_OP_TEXT, _wrap(name, data, combined))

    def trade(**fields: Any) -> bytes:
        base = _trade(symbol, nxt, now_ms)
        base.update(fields)
        return orjson.dumps(base)

    if kind == "big_frame":
        return [text(trade(pad="x" * BIG_FRAME))]
    if kind == "invalid_utf8":
        return [text(trade().replace(symbol.encode(), symbol[:3].encode() + b"\xff\xfe" + symbol[3:].encode()))]
    if kind == "binary":
        return [ws_frame(_OP_BINARY, _wrap(stream, trade(), combined))]
    if kind == "deep_json":
        return [ws_frame(_OP_TEXT, b"[" * DEPTH + b"]" * DEPTH)]
    if kind == "huge_number":
        digits = b"9" * DIGITS
        return [
            text(trade().replace(b'"t":%d' % nxt, b'"t":' + digits)),
            text(trade(p="1" * DIGITS)),
            text(trade().replace(b'"q":"1.00000000"', b'"q":' + digits)),
        ]
    if kind == "nan":
        return [
            text(trade().replace(b'"p":"%s"' % HOSTILE_PRICE.encode(), b'"p":NaN')),
            text(trade().replace(b'"q":"1.00000000"', b'"q":Infinity')),
            text(trade(p="NaN")),
            text(trade(q="-Infinity")),
        ]
    if kind == "zero_price":
        return [text(trade(p="0.00000000"))]
    if kind == "negative_qty":
        return [text(trade(q="-1.00000000"))]
    if kind == "id_jump":
        return [text(trade(t=last_trade_id + jump))]
    if kind == "id_back":
        return [text(trade(t=max(1, last_trade_id - 10)))]
    if kind == "unsubscribed_stream":
        lower = symbol.lower()
        for name, event in ((f"{lower}@aggTrade", "aggTrade"), (f"{lower}@bookTicker", "bookTicker"),
                            (f"{lower}@trade", "trade")):
            if name in subscribed:
                continue
            if event == "aggTrade":
                data = {"e": "aggTrade", "E": now_ms, "s": symbol, "a": nxt, "p": HOSTILE_PRICE, "q": "1.00000000",
                        "f": nxt, "l": nxt, "T": now_ms, "m": False, "M": True}
            elif event == "bookTicker":
                data = {"u": nxt, "s": symbol, "b": HOSTILE_PRICE, "B": "1.00000000", "a": HOSTILE_PRICE,
                        "A": "1.00000000"}
            else:
                data = _trade(symbol, nxt, now_ms)
            return [text(orjson.dumps(data), name)]
        return []  # subscribed to every stream of its symbol
    if kind == "unknown_symbol":
        other = orjson.dumps(_trade(UNKNOWN_SYMBOL, nxt, now_ms))
        return [text(other, f"{UNKNOWN_SYMBOL.lower()}@trade"), text(other)]
    raise ValueError(f"not a frame kind: {kind!r}")


def ping_flood(count: int) -> bytes:
    """``count`` pings, each with its number as payload, in one buffer."""
    return b"".join(ws_frame(_OP_PING, b"%d" % i) for i in range(count))
