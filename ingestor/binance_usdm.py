"""Binance USD-M futures (``fstream.binance.com``, ``fapi.binance.com``) as a :class:`~ingestor.venue.Venue`: pure.

Venue name ``binance_usdm``; ticks of the channels spot also has keep spot's shape exactly
(:mod:`ingestor.binance`, whose value checks, :mod:`ingestor.fields`, are used here unchanged, so a USD-M tick
holds exactly what a spot tick may).  Channels and their streams:

=============== ============================ ======= ====================================================
channel         stream                       route   ``seq``
=============== ============================ ======= ====================================================
``agg_trade``   ``<symbol>@aggTrade``        market  the aggregate trade id ``a`` (contiguous: gaps repaired)
``book_ticker`` ``<symbol>@bookTicker``      public  the book update id ``u`` (skips by design)
``kline_<i>``   ``<symbol>@kline_<i>``       market  the event time ``E`` in ms, as spot's klines
``mark_price``  ``<symbol>@markPrice@1s``    market  the event time ``E`` in ms (below)
``depth``       ``<symbol>@depth@100ms``     public  none here: see "Depth" below
=============== ============================ ======= ====================================================

``trade`` is refused (:class:`UnsupportedChannel`): Binance documents no raw trade stream for USD-M futures,
only aggregate trades, and no ``historicalTrades`` to repair one from.  Kline intervals are spot's without
``1s``, which USD-M does not have.

**Routes.**  Binance split ``fstream.binance.com`` into routed paths (its "Important WebSocket Change Notice --
Base URL Split & Migration", 2026-03): ``/public`` carries the high-frequency book data (``bookTicker``,
``depth``), ``/market`` the rest (``aggTrade``, ``kline``, ``markPrice``).  The unrouted ``/ws`` and ``/stream``
were retired on 2026-04-23, and a stream asked for on a path that does not serve it is acknowledged and never
delivered.  So one :class:`BinanceUsdm` serves one route: its ``ws_path`` is that route's combined-stream path
and it names only that route's streams (:data:`BINANCE_USDM_MARKET`, :data:`BINANCE_USDM_PUBLIC`;
:func:`split_by_route` groups a stream list).  ``route="all"`` keeps the unrouted ``/stream`` for hosts that
still serve every stream on it (a test venue, recorded captures).

**Mark price.**  ``mark_price`` ticks carry ``mark_px`` (``p``), ``index_px`` (``i``), ``est_settle_px``
(``P``, the estimated settlement price, only meaningful in the hour before a delivery contract settles),
``funding_rate`` (``r``) and ``next_funding_time`` (``T``, µs): prices the venue's decimal strings untouched;
the funding rate a signed decimal string, or ``None`` where the contract has no funding (Binance sends ``""``
for delivery contracts), and the next funding time ``None`` where Binance sends ``0``.  The stream has no id:
its ``seq`` is the event time ``E`` in ms, which strictly increases per symbol (one update a second), so two
ingestors and a restarted one derive the same ``seq`` for the same update with no state to carry.  The
sequencer treats it as it treats klines (not contiguous: :func:`~consumer_sdk.core.sequencing.is_contiguous_channel`):
a later ``E`` is taken whatever the jump, an ``E`` equal to the last is the same update delivered again
(dropped as a duplicate) and an older one a late frame (dropped).  A jump is never a lost tick to repair:
the mark price is a state, and the next update replaces what a missed one said.

**Depth.**  ``depthUpdate`` frames (``U``, ``u``, ``pu``) feed an order book (:class:`~ingestor.depth_books.DepthBooks`
with the futures rule: drop ``u < lastUpdateId``, the first diff applied has ``U <= lastUpdateId <= u``, then each
``pu`` is the previous ``u``; snapshots from ``/fapi/v1/depth``).  :func:`parse_frame_depth` reads them into
:class:`~ingestor.depth.DepthDiff` for the pipeline that keeps books; :func:`parse_frame` returns ``None`` for
them (counted ``unsupported``, never ``malformed``, whatever the frame holds).

**Limits** (Binance's USD-M WebSocket page): 10 incoming messages a second per connection
(:data:`MAX_MESSAGES_PER_S`); at most :data:`MAX_STREAMS_PER_CONNECTION` streams per connection (200: the
page once said 200 and now says 1024; 200 holds under both); connections close at 24 h; the server pings every
3 minutes and drops a connection that sent no pong for 10.  REST: ``/fapi/v1/aggTrades`` costs weight 20
(:data:`AGG_TRADES_WEIGHT`) for up to 1000 rows, the same row shape as spot's ``/api/v3/aggTrades``.

**Errors** (:func:`classify_rest_error`): Binance's HTTP statuses and ``{"code", "msg"}`` bodies to a kind and
whether asking again may help (429 and -1003 rate limit, 418 banned, both after ``Retry-After``; -1121 an invalid
symbol, which retrying cannot fix).  :func:`classify_reply_error` does the same for a refused SUBSCRIBE.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.tick import KLINE_INTERVALS, SCHEMA_VERSION, MarkPriceTick, Tick
from ingestor.depth import DepthDiff, parse_depth_update
from ingestor.fields import SIGNED as _RATE
from ingestor.fields import boolean as _bool
from ingestor.fields import event as _event
from ingestor.fields import ms as _ms
from ingestor.fields import nonneg as _nonneg
from ingestor.fields import nonneg_int as _int
from ingestor.fields import pos as _pos
from ingestor.fields import price as _price
from ingestor.fields import refused_decimal as _refused_decimal
from ingestor.fields import symbol as _symbol
from ingestor.lifecycle import parse_retry_after
from ingestor.subscriptions import subscribe_requests
from ingestor.venue import Heartbeat, MalformedFrame, Reply, RestCall, ServerShutdown, VenueRequest

__all__ = [
    "AGG_TRADES_MAX_LIMIT",
    "AGG_TRADES_WEIGHT",
    "BINANCE_USDM_ALL",
    "BINANCE_USDM_MARKET",
    "BINANCE_USDM_PUBLIC",
    "DEPTH_LIMITS",
    "MARK_PRICE_FIELDS",
    "MAX_MESSAGES_PER_S",
    "MAX_STREAMS_PER_CONNECTION",
    "REST_ERROR_KINDS",
    "REST_URL",
    "USDM_CHANNELS",
    "USDM_KLINE_INTERVALS",
    "VENUE",
    "WS_URL",
    "BinanceUsdm",
    "MarkPriceTick",
    "RestVerdict",
    "Route",
    "UnsupportedChannel",
    "channel_route",
    "channel_to_stream",
    "check_channel",
    "classify_reply_error",
    "classify_rest_error",
    "parse_frame",
    "parse_frame_as",
    "parse_frame_depth",
    "parse_frame_depth_as",
    "split_by_route",
    "stream_to_channel",
]

VENUE: Final = "binance_usdm"
WS_URL: Final = "wss://fstream.binance.com"
REST_URL: Final = "https://fapi.binance.com"
_V: Final = SCHEMA_VERSION

#: a connection's route: Binance's ``/public`` or ``/market`` path, or ``all`` for the unrouted ``/stream``
Route = Literal["public", "market", "all"]

#: our fixed channel name -> (Binance stream suffix, route)
USDM_CHANNELS: Final[dict[str, tuple[str, Route]]] = {
    "agg_trade": ("aggTrade", "market"),
    "book_ticker": ("bookTicker", "public"),
    "mark_price": ("markPrice@1s", "market"),
    "depth": ("depth@100ms", "public"),
}
_SUFFIX_TO_CHANNEL: Final = {suffix: channel for channel, (suffix, _) in USDM_CHANNELS.items()}
#: kline intervals USD-M has: spot's without ``1s``
USDM_KLINE_INTERVALS: Final = KLINE_INTERVALS - {"1s"}

#: a ``mark_price`` tick's fields after the base ones
MARK_PRICE_FIELDS: Final = ("mark_px", "index_px", "est_settle_px", "funding_rate", "next_funding_time")

MAX_STREAMS_PER_CONNECTION: Final = 200
MAX_MESSAGES_PER_S: Final = 10
AGG_TRADES_WEIGHT: Final = 20
AGG_TRADES_MAX_LIMIT: Final = 1000
#: the ``limit`` values ``/fapi/v1/depth`` takes
DEPTH_LIMITS: Final = (5, 10, 20, 50, 100, 500, 1000)


class UnsupportedChannel(ConfigError):
    """A channel this venue (or this connection's route) does not carry: a setting that cannot work."""


# ------------------------------------------------------------------------------------------------ channels


def check_channel(channel: str, venue: str = VENUE) -> str:
    """``channel`` if USD-M carries it; :class:`UnsupportedChannel` naming why not otherwise (``venue``: the name
    the message gives, COIN-M's for its channels, which are the same)."""
    if channel in USDM_CHANNELS:
        return channel
    if channel == "trade":
        raise UnsupportedChannel(
            f"channel 'trade' is not available on {venue}: Binance futures publish no raw trade stream; "
            "use agg_trade (aggregate trades, repaired over REST)"
        )
    if channel.startswith("kline_"):
        if channel[6:] in USDM_KLINE_INTERVALS:
            return channel
        raise UnsupportedChannel(
            f"unknown channel {channel!r} on {venue}: kline intervals are "
            + ", ".join(sorted(USDM_KLINE_INTERVALS, key=_interval_order))
        )
    raise UnsupportedChannel(
        f"unknown channel {channel!r} on {venue}: expected agg_trade, book_ticker, mark_price, depth or "
        "kline_<interval> (e.g. kline_1m)"
    )


def _interval_order(interval: str) -> tuple[int, int]:
    unit = "smhdwM".index(interval[-1])
    return unit, int(interval[:-1])


def channel_route(channel: str) -> Route:
    """The route ``/public`` or ``/market`` that serves ``channel``; :class:`UnsupportedChannel` for one not carried."""
    fixed = USDM_CHANNELS.get(check_channel(channel))
    return "market" if fixed is None else fixed[1]  # klines ride the market route


def channel_to_stream(symbol: str, channel: str) -> str:
    """``("BTCUSDT", "mark_price")`` -> ``"btcusdt@markPrice@1s"``; :class:`UnsupportedChannel` for a channel
    not carried."""
    fixed = USDM_CHANNELS.get(check_channel(channel))
    return f"{symbol.lower()}@{channel if fixed is None else fixed[0]}"


def stream_to_channel(stream: str) -> tuple[str, str]:
    """``"btcusdt@markPrice@1s"`` -> ``("BTCUSDT", "mark_price")``; ValueError for a stream not carried
    (``@trade``, another depth or mark price speed, a kline interval USD-M lacks)."""
    symbol, _, suffix = stream.partition("@")
    channel = _SUFFIX_TO_CHANNEL.get(suffix)
    if channel is None and suffix.startswith("kline_") and suffix[6:] in USDM_KLINE_INTERVALS:
        channel = suffix
    if channel is None or not symbol:
        raise ValueError(f"not a stream {VENUE} carries: {stream!r}")
    return symbol.upper(), channel


def split_by_route(streams: Iterable[str]) -> dict[Route, list[str]]:
    """Stream names grouped by the route serving them, in order (``public`` and ``market``; a route with none
    is absent): one set of connections per route.  ValueError for a stream not carried."""
    out: dict[Route, list[str]] = {}
    for stream in streams:
        out.setdefault(channel_route(stream_to_channel(stream)[1]), []).append(stream)
    return out


# ------------------------------------------------------------------------------------------------ frames

def _rate(value: Any) -> str | None:
    """A funding rate: a signed decimal string (:data:`~ingestor.fields.SIGNED`, within the bounds of every other
    decimal a tick holds), or None for ``""`` (a contract with no funding)."""
    if type(value) is str:
        if _RATE(value) is not None:
            return value
        if not value:
            return None
    raise _refused_decimal(value, "a signed")


def parse_frame(raw: str | bytes, ts_recv: int) -> Tick | Reply | ServerShutdown | None:
    """One frame (raw or combined-stream wrapped) received at ``ts_recv`` (µs) -> a tick, a reply, a shutdown
    notice, or ``None`` (an event not carried: ``depthUpdate`` among them); :class:`MalformedFrame` with spot's
    kinds (:data:`ingestor.binance.PARSE_REFUSALS`) otherwise.  Cost: one JSON parse and the tick's dict."""
    data = _event(raw)
    try:
        return _parse_event(data, ts_recv, VENUE)
    except (KeyError, TypeError) as exc:
        raise MalformedFrame(f"missing or bad field {exc}") from None


def parse_frame_depth(raw: str | bytes, ts_recv: int) -> Tick | Reply | ServerShutdown | DepthDiff | None:
    """As :func:`parse_frame`, and a ``depthUpdate`` -> a :class:`~ingestor.depth.DepthDiff` (with its ``pu``), for a
    pipeline that keeps order books by the futures rule (:class:`~ingestor.depth.DepthRule`)."""
    return parse_frame_depth_as(raw, ts_recv, VENUE)


def parse_frame_as(raw: str | bytes, ts_recv: int, venue: str) -> Tick | Reply | ServerShutdown | None:
    """:func:`parse_frame`, its ticks carrying the venue name ``venue`` (Binance COIN-M sends the same events)."""
    data = _event(raw)
    try:
        return _parse_event(data, ts_recv, venue)
    except (KeyError, TypeError) as exc:
        raise MalformedFrame(f"missing or bad field {exc}") from None


def parse_frame_depth_as(
    raw: str | bytes, ts_recv: int, venue: str
) -> Tick | Reply | ServerShutdown | DepthDiff | None:
    """:func:`parse_frame_depth`, its ticks carrying the venue name ``venue``."""
    data = _event(raw)
    try:
        if data.get("e") == "depthUpdate":
            return parse_depth_update(data)
        return _parse_event(data, ts_recv, venue)
    except (KeyError, TypeError) as exc:
        raise MalformedFrame(f"missing or bad field {exc}") from None


def _parse_event(d: dict[str, Any], ts_recv: int, venue: str) -> Tick | Reply | ServerShutdown | None:
    e = d.get("e")
    if e == "bookTicker":
        u = _int(d["u"])
        book: dict[str, Any] = {
            "v": _V, "venue": venue, "symbol": _symbol(d["s"]), "channel": "book_ticker", "seq": u,
            "ts_event": _ms(d["E"]) * 1000, "ts_recv": ts_recv,
            "bid_px": _price(d["b"]), "bid_qty": _pos(d["B"]),
            "ask_px": _price(d["a"]), "ask_qty": _pos(d["A"]), "update_id": u,
        }
        return book  # type: ignore[return-value]
    if e == "depthUpdate":
        return None  # the book builder's, not a tick (see the module doc)
    if e == "aggTrade":
        a = _int(d["a"])
        agg: dict[str, Any] = {
            "v": _V, "venue": venue, "symbol": _symbol(d["s"]), "channel": "agg_trade", "seq": a,
            "ts_event": _ms(d["T"]) * 1000, "ts_recv": ts_recv,
            "trade_id": a, "price": _price(d["p"]), "qty": _pos(d["q"]),
            "side": "sell" if _bool(d["m"]) else "buy",
            "first_trade_id": _int(d["f"]), "last_trade_id": _int(d["l"]),
        }
        return agg  # type: ignore[return-value]
    if e == "markPriceUpdate":
        event_ms = _ms(d["E"])
        next_funding = _ms(d["T"])
        mark: dict[str, Any] = {
            "v": _V, "venue": venue, "symbol": _symbol(d["s"]), "channel": "mark_price", "seq": event_ms,
            "ts_event": event_ms * 1000, "ts_recv": ts_recv,
            "mark_px": _pos(d["p"]), "index_px": _nonneg(d["i"]), "est_settle_px": _nonneg(d["P"]),
            "funding_rate": _rate(d["r"]), "next_funding_time": next_funding * 1000 if next_funding else None,
        }
        return mark  # type: ignore[return-value]
    if e == "kline":
        k = d["k"]
        interval = k["i"]
        if type(interval) is not str or interval not in USDM_KLINE_INTERVALS:
            raise MalformedFrame(f"expected a kline interval, got {interval!r}")
        event_ms = _ms(d["E"])
        kline: dict[str, Any] = {
            "v": _V, "venue": venue, "symbol": _symbol(d["s"]), "channel": "kline_" + interval, "seq": event_ms,
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


# ------------------------------------------------------------------------------------------------ errors

#: every kind :func:`classify_rest_error` and :func:`classify_reply_error` answer
REST_ERROR_KINDS: Final = (
    "rate_limit", "banned", "waf_blocked", "invalid_symbol", "bad_request", "timeout", "unavailable", "refused",
)
#: Binance error codes that say the venue, not the request, failed: asking again may succeed
_VENUE_SIDE: Final = frozenset({-1000, -1001, -1006, -1007, -1008})


@dataclass(frozen=True, slots=True)
class RestVerdict:
    """What a refused request means: ``kind`` (one of :data:`REST_ERROR_KINDS`); whether asking again may
    succeed, after ``retry_after`` seconds when the venue named them; Binance's ``code`` and ``msg`` when its
    body carried them."""

    kind: str
    retryable: bool
    retry_after: float | None = None
    code: int | None = None
    message: str = ""


def _error_body(body: bytes | str) -> tuple[int | None, str]:
    """Binance's ``{"code": -1121, "msg": "Invalid symbol."}``, or ``(None, "")`` for any other body."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, ""
    if type(obj) is not dict:
        return None, ""
    code, msg = obj.get("code"), obj.get("msg")
    return (code if type(code) is int else None), (msg[:200] if type(msg) is str else "")


def classify_rest_error(status: int, body: bytes | str, retry_after: str | None = None) -> RestVerdict:
    """An HTTP error answer from ``fapi.binance.com`` (``status``, its body, its ``Retry-After`` header).

    429 or code -1003: ``rate_limit``; 418 (the IP was banned for going on after a 429): ``banned``; both
    retryable after ``Retry-After``.  403 (Binance's web application firewall): ``waf_blocked``, not soon
    retryable.  408: ``timeout``; 5xx or a venue-side code (-1000, -1001, -1006, -1007, -1008): ``unavailable``;
    both retryable.  -1121: ``invalid_symbol`` (the symbol is not a USD-M contract: a setting to fix).  Any
    other 4xx: ``bad_request``; anything else ``refused``; neither retryable.  Cost: one JSON parse of the body.
    """
    code, msg = _error_body(body)
    wait = parse_retry_after(retry_after)
    if status == 429 or code == -1003:
        return RestVerdict("rate_limit", True, wait, code, msg)
    if status == 418:
        return RestVerdict("banned", True, wait, code, msg)
    if code == -1121:
        return RestVerdict("invalid_symbol", False, None, code, msg)
    if status == 403:
        return RestVerdict("waf_blocked", False, wait, code, msg)
    if status == 408:
        return RestVerdict("timeout", True, wait, code, msg)
    if status >= 500 or code in _VENUE_SIDE:
        return RestVerdict("unavailable", True, wait, code, msg)
    if 400 <= status < 500:
        return RestVerdict("bad_request", False, None, code, msg)
    return RestVerdict("refused", False, None, code, msg)


def classify_reply_error(error: Any) -> RestVerdict:
    """The ``error`` of a :class:`~ingestor.venue.Reply` to SUBSCRIBE or UNSUBSCRIBE (``{"code": 2, "msg":
    "Invalid request: ..."}``; codes 0 to 3 say the message itself was wrong): ``bad_request``, not retryable;
    a rate limit code (-1003) ``rate_limit``.  A stream name Binance does not know is not refused this way:
    it is acknowledged and never delivers (the session's stale check is what notices)."""
    code = error.get("code") if type(error) is dict else None
    msg = error.get("msg") if type(error) is dict else None
    code = code if type(code) is int else None
    text = msg[:200] if type(msg) is str else str(error)[:200]
    if code == -1003:
        return RestVerdict("rate_limit", True, None, code, text)
    return RestVerdict("bad_request", False, None, code, text)


# ------------------------------------------------------------------------------------------------ the venue

def _requests(method: str, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
    """Spot's messages: ``{"method": ..., "params": [...], "id": n}``, at most ``per_request`` streams each."""
    return [
        VenueRequest(req["id"], req["params"], orjson.dumps(req).decode())
        for req in subscribe_requests(streams, first_id, per_request=per_request, method=method)
    ]


_PATHS: Final[dict[Route, str]] = {"public": "/public/stream", "market": "/market/stream", "all": "/stream"}


class BinanceUsdm:
    """Binance USD-M futures as a :class:`~ingestor.venue.Venue`, for connections of one ``route`` (see the module
    doc): combined streams on the route's ``/stream`` path, spot's SUBSCRIBE/UNSUBSCRIBE messages, the venue's
    WebSocket pings answered by the library.  Immutable; :data:`BINANCE_USDM_MARKET` and
    :data:`BINANCE_USDM_PUBLIC` serve every session of their route.
    """

    __slots__ = ("route", "ws_path")

    name: Final = VENUE
    heartbeat: Final = Heartbeat.WS_PING

    #: the module's function itself, not a method wrapping it: it runs once per frame
    parse_frame = staticmethod(parse_frame)
    #: the same, reading ``depthUpdate`` events too (for a pipeline that keeps order books)
    parse_frame_depth = staticmethod(parse_frame_depth)

    def __init__(self, route: Route = "market") -> None:
        if route not in _PATHS:
            raise ConfigError(f"unknown {VENUE} route {route!r}: expected public, market or all")
        #: which streams this venue's connections carry
        self.route: Final[Route] = route
        #: appended to the WebSocket base (``wss://fstream.binance.com``)
        self.ws_path: Final = _PATHS[route]

    def __repr__(self) -> str:
        return f"BinanceUsdm({self.route!r})"

    def _on_route(self, channel: str) -> None:
        route = channel_route(channel)
        if self.route != "all" and route != self.route:
            raise UnsupportedChannel(
                f"{VENUE} serves {channel} on its /{route} route; this connection is on /{self.route}"
            )

    def stream_name(self, symbol: str, channel: str) -> str:
        """:func:`channel_to_stream`, for a channel on this route (:class:`UnsupportedChannel` otherwise)."""
        self._on_route(channel)
        return channel_to_stream(symbol, channel)

    def split_stream(self, stream: str) -> tuple[str, str]:
        """:func:`stream_to_channel`, for a stream on this route (ValueError otherwise)."""
        symbol, channel = stream_to_channel(stream)
        try:
            self._on_route(channel)
        except UnsupportedChannel as exc:
            raise ValueError(str(exc)) from None
        return symbol, channel

    def subscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        return _requests("SUBSCRIBE", streams, first_id, per_request)

    def unsubscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        return _requests("UNSUBSCRIBE", streams, first_id, per_request)

    def backfill_call(self, channel: str, symbol: str, from_id: int, limit: int) -> RestCall | None:
        """``/fapi/v1/aggTrades`` for ``agg_trade`` (at most :data:`AGG_TRADES_MAX_LIMIT` rows a call, weight
        :data:`AGG_TRADES_WEIGHT`); None for every other channel (no contiguous ids to fetch)."""
        return futures_backfill_call("/fapi/v1", channel, symbol, from_id, limit)

    def snapshot_call(self, symbol: str, limit: int) -> RestCall:
        """``/fapi/v1/depth`` with the smallest limit it takes that holds ``limit`` levels (at most 1000)."""
        return futures_snapshot_call("/fapi/v1", symbol, limit)



def futures_backfill_call(api: str, channel: str, symbol: str, from_id: int, limit: int) -> RestCall | None:
    """``<api>/aggTrades`` for ``agg_trade`` (Binance futures, ``/fapi/v1`` or ``/dapi/v1``); None otherwise."""
    if channel != "agg_trade":
        return None
    query: dict[str, str | int] = {"symbol": symbol, "fromId": from_id, "limit": min(limit, AGG_TRADES_MAX_LIMIT)}
    return RestCall(f"{api}/aggTrades", query)


def futures_snapshot_call(api: str, symbol: str, limit: int) -> RestCall:
    """``<api>/depth`` with the smallest limit it takes that holds ``limit`` levels (at most 1000)."""
    levels = next((n for n in DEPTH_LIMITS if n >= limit), DEPTH_LIMITS[-1])
    return RestCall(f"{api}/depth", {"symbol": symbol, "limit": levels})

#: USD-M's ``/market`` route: aggregate trades, klines, mark prices (stateless, shared)
BINANCE_USDM_MARKET: Final = BinanceUsdm("market")
#: USD-M's ``/public`` route: book tickers and depth (stateless, shared)
BINANCE_USDM_PUBLIC: Final = BinanceUsdm("public")
#: every USD-M stream on the unrouted ``/stream`` (hosts that still serve it; recorded captures)
BINANCE_USDM_ALL: Final = BinanceUsdm("all")
