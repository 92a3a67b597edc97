"""Binance frames to ticks: pure functions, no I/O.

:func:`parse_frame` takes one WebSocket text frame (raw payload or combined-stream
wrapped ``{"stream": ..., "data": ...}``) and the receive time, and returns

- a tick (``dict``, see :mod:`consumer_sdk.core.tick`) for ``trade``, ``aggTrade``,
  ``bookTicker`` and ``kline`` events;
- a :class:`Reply` for answers to our requests (``{"result": ..., "id": ...}``
  or ``{"error": ..., "id": ...}``);
- a :class:`ServerShutdown` when the venue announces a planned close;
- ``None`` for events this project does not carry (``depthUpdate`` ...).

:func:`parse_frame_depth` is the same, but reads a ``depthUpdate`` into an :class:`~ingestor.depth.DepthDiff`
(:func:`ingestor.depth.parse_depth_update`): a pipeline that keeps order books
(:class:`~ingestor.depth_books.DepthBooks`) parses with it.  The stream of channel ``depth`` is
``<symbol>@depth@100ms`` (or ``<symbol>@depth``, one update a second, with ``depth_ms=1000``).

:class:`BinanceSpot` is Binance spot as a :class:`~ingestor.venue.Venue`: these functions, its
stream names, its SUBSCRIBE/UNSUBSCRIBE messages and its REST calls, for the session and the pipeline.

A frame that is not valid JSON or lacks a field its event type requires raises
:class:`MalformedFrame`; the caller counts and skips it.  Prices and quantities
are copied as the venue's strings; times become microseconds.

Nothing a tick may not hold gets through, each refusal named by its ``kind`` (:data:`PARSE_REFUSALS`):
``invalid_utf8`` (bytes that are not UTF-8), ``too_deep`` (JSON nested deeper than orjson's limit of
1024), ``bad_number`` (a ``NaN`` or ``Infinity`` literal, a number beyond a double, an id beyond int64, a
price or quantity that is not a plain decimal of at most 20 integer and 18 fraction digits: ``"NaN"``,
``"1e5"`` (Binance never writes an exponent), 100k digits), ``bad_value`` (a zero or negative price or
quantity, a negative id or time), and ``malformed`` for the rest (not JSON, a field missing or of the
wrong type; a symbol that is not 1 to 64 letters, digits, ``_``, ``.`` or ``-``, since it names the stream
key; a kline interval Binance does not have).  Prices and quantities of trades and book tickers and a kline's
prices must be above zero; a kline's volumes may be zero.

``seq`` is the venue's own monotonic id: trade id, aggregate id, book update id.  Klines carry
no id; their ``seq`` is the event time in milliseconds (``E``), which strictly increases per
kline stream, so every ingestor derives the same ``seq`` for the same update, and a restart
needs no state to continue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

from consumer_sdk.core.tick import SCHEMA_VERSION, Tick, is_valid_channel
from ingestor.depth import DepthDiff, parse_depth_update
from ingestor.fields import boolean as _bool
from ingestor.fields import event as _event
from ingestor.fields import ms as _ms
from ingestor.fields import nonneg as _nonneg
from ingestor.fields import nonneg_int as _int
from ingestor.fields import pos as _pos
from ingestor.fields import price as _price
from ingestor.fields import symbol as _symbol
from ingestor.subscriptions import subscribe_requests
from ingestor.venue import Heartbeat, MalformedFrame, Reply, RestCall, ServerShutdown, VenueRequest

__all__ = [
    "BINANCE_CHANNELS",
    "BINANCE_SPOT",
    "DEPTH_SPEEDS",
    "PARSE_REFUSALS",
    "BinanceSpot",
    "MalformedFrame",
    "Reply",
    "ServerShutdown",
    "channel_to_stream",
    "parse_frame",
    "parse_frame_depth",
    "stream_to_channel",
]

VENUE: Final = "binance"
_V: Final = SCHEMA_VERSION

#: our channel name -> Binance stream suffix (klines: ``kline_<i>`` -> ``kline_<i>``)
BINANCE_CHANNELS: Final = {
    "trade": "trade", "agg_trade": "aggTrade", "book_ticker": "bookTicker", "depth": "depth@100ms",
}
#: the diff depth stream's update speeds (ms) -> its suffix
DEPTH_SPEEDS: Final = {100: "depth@100ms", 1000: "depth"}
_SUFFIX_TO_CHANNEL: Final = {**{v: k for k, v in BINANCE_CHANNELS.items()}, "depth": "depth"}


def channel_to_stream(symbol: str, channel: str, depth_ms: int = 100) -> str:
    """``("BTCUSDT", "agg_trade")`` -> ``"btcusdt@aggTrade"``; ``("BTCUSDT", "depth")`` ->
    ``"btcusdt@depth@100ms"`` (``"btcusdt@depth"`` with ``depth_ms=1000``)."""
    suffix = DEPTH_SPEEDS[depth_ms] if channel == "depth" else BINANCE_CHANNELS.get(channel, channel)
    return f"{symbol.lower()}@{suffix}"


def stream_to_channel(stream: str) -> tuple[str, str]:
    """``"btcusdt@kline_1m"`` -> ``("BTCUSDT", "kline_1m")``; raise ValueError for other streams."""
    symbol, _, suffix = stream.partition("@")
    if suffix.startswith("kline_"):
        return symbol.upper(), suffix
    try:
        return symbol.upper(), _SUFFIX_TO_CHANNEL[suffix]
    except KeyError:
        raise ValueError(f"not a stream this project carries: {stream!r}") from None


#: the kinds of :class:`MalformedFrame` :func:`parse_frame` raises (see the module doc)
PARSE_REFUSALS: Final = ("malformed", "invalid_utf8", "too_deep", "bad_number", "bad_value")


def parse_frame(raw: str | bytes, ts_recv: int) -> Tick | Reply | ServerShutdown | None:
    """One frame -> a tick, a reply, a shutdown notice, or ``None`` (an event we do not carry)."""
    data = _event(raw)
    try:
        return _parse_event(data, ts_recv)
    except (KeyError, TypeError) as exc:
        raise MalformedFrame(f"missing or bad field {exc}") from None


def parse_frame_depth(raw: str | bytes, ts_recv: int) -> Tick | Reply | ServerShutdown | DepthDiff | None:
    """As :func:`parse_frame`, and a ``depthUpdate`` -> a :class:`~ingestor.depth.DepthDiff`."""
    data = _event(raw)
    try:
        if data.get("e") == "depthUpdate":
            return parse_depth_update(data)
        return _parse_event(data, ts_recv)
    except (KeyError, TypeError) as exc:
        raise MalformedFrame(f"missing or bad field {exc}") from None


def _parse_event(d: dict[str, Any], ts_recv: int) -> Tick | Reply | ServerShutdown | None:
    e = d.get("e")
    if e == "trade":
        t = _int(d["t"])
        trade: dict[str, Any] = {
            "v": _V, "venue": VENUE, "symbol": _symbol(d["s"]), "channel": "trade", "seq": t,
            "ts_event": _ms(d["T"]) * 1000, "ts_recv": ts_recv,
            "trade_id": t, "price": _price(d["p"]), "qty": _pos(d["q"]),
            "side": "sell" if _bool(d["m"]) else "buy",
        }
        return trade  # type: ignore[return-value]
    if e == "aggTrade":
        a = _int(d["a"])
        agg: dict[str, Any] = {
            "v": _V, "venue": VENUE, "symbol": _symbol(d["s"]), "channel": "agg_trade", "seq": a,
            "ts_event": _ms(d["T"]) * 1000, "ts_recv": ts_recv,
            "trade_id": a, "price": _price(d["p"]), "qty": _pos(d["q"]),
            "side": "sell" if _bool(d["m"]) else "buy",
            "first_trade_id": _int(d["f"]), "last_trade_id": _int(d["l"]),
        }
        return agg  # type: ignore[return-value]
    if (e is None and "u" in d and "b" in d) or e == "bookTicker":
        u = _int(d["u"])
        # Spot bookTicker carries no time; futures carry E (event) and T (transaction).
        ev = d.get("E")
        book: dict[str, Any] = {
            "v": _V, "venue": VENUE, "symbol": _symbol(d["s"]), "channel": "book_ticker", "seq": u,
            "ts_event": ts_recv if ev is None else _ms(ev) * 1000, "ts_recv": ts_recv,
            "bid_px": _price(d["b"]), "bid_qty": _pos(d["B"]),
            "ask_px": _price(d["a"]), "ask_qty": _pos(d["A"]), "update_id": u,
        }
        return book  # type: ignore[return-value]
    if e == "kline":
        k = d["k"]
        interval = k["i"]
        channel = "kline_" + interval if type(interval) is str else ""
        if not is_valid_channel(channel):
            raise MalformedFrame(f"expected a kline interval, got {interval!r}")
        event_ms = _ms(d["E"])
        kline: dict[str, Any] = {
            "v": _V, "venue": VENUE, "symbol": _symbol(d["s"]), "channel": channel, "seq": event_ms,
            "ts_event": event_ms * 1000, "ts_recv": ts_recv,
            "open_time": _ms(k["t"]) * 1000, "close_time": _ms(k["T"]) * 1000,
            "open": _pos(k["o"]), "high": _pos(k["h"]), "low": _pos(k["l"]), "close": _pos(k["c"]),
            "volume": _nonneg(k["v"]), "quote_volume": _nonneg(k["q"]), "trades": _int(k["n"]),
            "closed": _bool(k["x"]),
        }
        return kline  # type: ignore[return-value]
    if "id" in d and ("result" in d or "error" in d):
        return Reply(id=d["id"], result=d.get("result"), error=d.get("error"))
    if e == "serverShutdown":
        return ServerShutdown(_ms(d.get("E", 0)) * 1000)
    return None


#: REST paths of the ids a gap can be backfilled with, by channel
_BACKFILL: Final = {"trade": "/api/v3/historicalTrades", "agg_trade": "/api/v3/aggTrades"}


def _requests(method: str, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
    return [
        VenueRequest(req["id"], req["params"], orjson.dumps(req).decode())
        for req in subscribe_requests(streams, first_id, per_request=per_request, method=method)
    ]


class BinanceSpot:
    """Binance spot (``stream.binance.com``, ``api.binance.com``) as a :class:`~ingestor.venue.Venue`.

    Combined streams on ``/stream``; ``{"method": "SUBSCRIBE", "params": [...], "id": n}`` messages,
    answered ``{"result": null, "id": n}``; the venue's WebSocket pings answered by the library.
    Stateless: one instance (:data:`BINANCE_SPOT`) serves every session.
    """

    __slots__ = ()

    name: Final = VENUE
    ws_path: Final = "/stream"
    heartbeat: Final = Heartbeat.WS_PING

    #: the module's function itself, not a method wrapping it: it runs once per frame
    parse_frame = staticmethod(parse_frame)
    #: the same, reading ``depthUpdate`` events too (for a pipeline that keeps order books)
    parse_frame_depth = staticmethod(parse_frame_depth)

    def stream_name(self, symbol: str, channel: str) -> str:
        return channel_to_stream(symbol, channel)

    def split_stream(self, stream: str) -> tuple[str, str]:
        return stream_to_channel(stream)

    def subscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        return _requests("SUBSCRIBE", streams, first_id, per_request)

    def unsubscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        return _requests("UNSUBSCRIBE", streams, first_id, per_request)

    def backfill_call(self, channel: str, symbol: str, from_id: int, limit: int) -> RestCall | None:
        path = _BACKFILL.get(channel)
        return None if path is None else RestCall(path, {"symbol": symbol, "fromId": from_id, "limit": limit})

    def snapshot_call(self, symbol: str, limit: int) -> RestCall:
        return RestCall("/api/v3/depth", {"symbol": symbol, "limit": limit})


#: the Binance spot venue (stateless, shared)
BINANCE_SPOT: Final = BinanceSpot()
