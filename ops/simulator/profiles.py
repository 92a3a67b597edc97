"""Venue profiles: which venue the simulator stands in for, and what differs between them. Pure.

=================== ================================ ================================================================
venue               WebSocket                        REST
=================== ================================ ================================================================
``binance``         ``/ws/...``, ``/stream?streams=`` ``/api/v3/...`` (spot; the simulator's original face)
``binance_usdm``    ``/public/...`` and ``/market/``  ``/fapi/v1/...`` (USD-M futures)
                    prefixes, and the unrouted paths
``binance_coinm``   as USD-M                          ``/dapi/v1/...`` (COIN-M futures: for its captures)
``okx``             ``/ws/v5/public``                 ``/api/v5/market/...`` (:mod:`.okx`)
=================== ================================ ================================================================

The Binance family runs on :class:`~ops.simulator.server.Simulator` with a :class:`BinanceProfile`; OKX, whose
protocol shares nothing with Binance's, on :class:`~ops.simulator.okx.OkxSimulator`.  :data:`VENUE_DEFAULTS` holds
each venue's own limits, which ``market simulate --venue`` applies (a :class:`~ops.simulator.SimulatorConfig`
built in code takes what it is given, Binance spot's by default).

Futures (both): no ``@trade`` stream (a ``SUBSCRIBE`` to one gets Binance's invalid-request error, an URL with one
HTTP 400); ``@bookTicker`` carries ``E`` and ``T``; ``@depth@100ms``/``@depth`` diffs carry ``T`` and ``pu`` (the
previous diff's ``u``, also across a diff removed by a depth fault); ``@markPrice@1s`` (and ``@markPrice``, every
3 s) sends ``markPriceUpdate`` with mark, index, estimated settle price, funding rate and next funding time; kline
intervals without ``1s``; ``/fapi/v1/depth`` takes only 5, 10, 20, 50, 100, 500, 1000 levels and snapshots carry
``E`` and ``T``.  Routes (Binance's split of ``fstream.binance.com``): ``/public`` serves ``bookTicker`` and
``depth`` streams, ``/market`` every other one; a stream asked for on a route that does not serve it is
acknowledged and never delivered, as Binance does; the unrouted ``/ws`` and ``/stream`` serve every stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "BINANCE",
    "VENUES",
    "VENUE_DEFAULTS",
    "BinanceProfile",
    "Route",
    "binance_profile",
    "check_venue",
    "symbol_pattern",
]

#: every venue ``market simulate --venue`` knows, the default first
VENUES: Final = ("binance", "binance_usdm", "binance_coinm", "okx")

Route = Literal["public", "market", "all"]

_FUTURES_STREAM: Final = re.compile(
    r"^(?P<symbol>[a-z0-9_]+)@(?P<kind>aggTrade|bookTicker|markPrice(?:@1s)?"
    r"|kline_(?:1m|3m|5m|15m|30m|1h|2h|4h|6h|8h|12h|1d|3d|1w|1M)"
    r"|depth(?:5|10|20)?(?:@100ms|@250ms|@500ms)?|miniTicker|ticker|forceOrder)$"
)
_PUBLIC_KINDS: Final = ("bookTicker", "depth")


@dataclass(frozen=True, slots=True)
class BinanceProfile:
    """What a venue of the Binance family changes in :class:`~ops.simulator.server.Simulator`."""

    venue: str
    #: the REST prefix: ``/api/v3``, ``/fapi/v1`` or ``/dapi/v1``
    api: str
    futures: bool

    @property
    def stream_pattern(self) -> re.Pattern[str] | None:
        """The stream names the venue has (None: spot's, :mod:`.protocol`'s own)."""
        return _FUTURES_STREAM if self.futures else None

    def split_route(self, path: str) -> tuple[Route, str]:
        """A WebSocket request path -> its route and the path without the route's prefix (futures only route)."""
        if self.futures:
            for route in ("public", "market"):
                prefix = f"/{route}"
                if path.startswith(prefix + "/"):
                    return route, path[len(prefix):]
        return "all", path

    @staticmethod
    def route_of(stream: str) -> Route:
        """The route that delivers ``stream``: ``public`` for book tickers and depth, ``market`` otherwise."""
        kind = stream.partition("@")[2]
        return "public" if kind.startswith(_PUBLIC_KINDS) else "market"

    def delivers(self, route: Route, stream: str) -> bool:
        return route == "all" or self.route_of(stream) == route

    def rest_path(self, path: str) -> str | None:
        """A REST request path -> the simulator's own (spot's) name for the endpoint, or None for a path of
        another venue (a futures venue serves no ``/api/v3`` path); spot's paths are their own names."""
        if not self.futures:
            return path
        prefix = self.api + "/"
        if path.startswith(prefix):
            name = path[len(prefix):]
            return "/api/v3/" + name if name in _FUTURES_ENDPOINTS else None
        if path.startswith("/api/") or path == "/ping":
            return None
        return path


#: the REST endpoints a futures profile serves under its prefix (no raw trades: USD-M and COIN-M repair from
#: aggregate trades)
_FUTURES_ENDPOINTS: Final = frozenset({"ping", "time", "exchangeInfo", "aggTrades", "klines", "depth"})

BINANCE: Final = BinanceProfile("binance", "/api/v3", futures=False)
_PROFILES: Final = {
    "binance": BINANCE,
    "binance_usdm": BinanceProfile("binance_usdm", "/fapi/v1", futures=True),
    "binance_coinm": BinanceProfile("binance_coinm", "/dapi/v1", futures=True),
}


def check_venue(venue: object) -> str:
    """``venue`` if the simulator knows it, else ValueError naming the ones it knows."""
    if not isinstance(venue, str) or venue not in VENUES:
        raise ValueError(f"unknown venue {venue!r}; known venues: {', '.join(VENUES)}")
    return venue


def binance_profile(venue: str) -> BinanceProfile:
    """The profile of a venue of the Binance family (KeyError for ``okx``)."""
    return _PROFILES[venue]


_SYMBOLS: Final = {
    "binance": re.compile(r"^[A-Z0-9]{2,32}$"),
    "binance_usdm": re.compile(r"^[A-Z0-9_]{2,32}$"),
    "binance_coinm": re.compile(r"^[A-Z0-9_]{2,32}$"),
    "okx": re.compile(r"^[A-Z0-9]{1,16}(?:-[A-Z0-9]{1,16}){1,3}$"),
}


def symbol_pattern(venue: str) -> re.Pattern[str]:
    """What a symbol of ``venue`` looks like (OKX: an ``instId`` such as ``BTC-USDT`` or ``BTC-USDT-SWAP``)."""
    return _SYMBOLS[venue]


#: each venue's own limits and symbols, as ``market simulate --venue`` applies them (keyword arguments of
#: :class:`~ops.simulator.SimulatorConfig`)
VENUE_DEFAULTS: Final[dict[str, dict[str, Any]]] = {
    "binance": {"symbols": ("BTCUSDT", "ETHUSDT"), "rest_weight_limit": 6000},
    # USD-M: 10 incoming messages a second, 1024 streams, a ping every 3 minutes and a close without a pong
    # within 10, 2400 request weight a minute
    "binance_usdm": {
        "symbols": ("BTCUSDT", "ETHUSDT"), "rest_weight_limit": 2400, "max_incoming_per_s": 10,
        "ping_interval": 180.0, "pong_timeout": 600.0,
    },
    "binance_coinm": {
        "symbols": ("BTCUSD_PERP", "ETHUSD_PERP"), "rest_weight_limit": 2400, "max_incoming_per_s": 10,
        "ping_interval": 180.0, "pong_timeout": 600.0,
    },
    # OKX: closes a connection silent for 30 s; 3 new connections a second, 480 subscribe operations an hour
    "okx": {
        "symbols": ("BTC-USDT", "BTC-USDT-SWAP"), "idle_timeout": 30.0,
        "max_connects_per_s": 3, "max_ops_per_hour": 480,
    },
}
