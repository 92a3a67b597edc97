"""The venues the ingestor can run on, by name: what the composition root needs to know of each, pure.

A :class:`VenueProfile` is one venue as a whole, around its :class:`~ingestor.venue.Venue` seam(s): its default
hosts, which channels it carries, its stream names, which :class:`~ingestor.venue.Venue` a connection carrying a
channel uses (Binance USD-M serves its streams on two routed paths, so it has two), the one whose REST calls repair
gaps and fetch book snapshots, the rule its order books follow, and how many streams a connection may carry.
:func:`venue_profile` looks one up by the name settings give (``venue = "binance_usdm"``).

===================== ================================ ================================= ========== =========
name                  WebSocket                        REST                              depth rule streams
===================== ================================ ================================= ========== =========
``binance``           ``wss://stream.binance.com:9443``  ``https://api.binance.com`` (v3)  spot       1024
``binance_usdm``      ``wss://fstream.binance.com``    ``https://fapi.binance.com``      futures    200
``binance_coinm``     ``wss://dstream.binance.com``    ``https://dapi.binance.com``      futures    200
``okx``               ``wss://ws.okx.com:8443``        ``https://www.okx.com`` (v5)      okx        240
===================== ================================ ================================= ========== =========

Stream keys are ``<prefix>:<name>:<SYMBOL>:<channel>`` (``md:binance_usdm:BTCUSDT:mark_price``); OKX's symbols are
its instrument ids (``md:okx:BTC-USDT:trade``, ``md:okx:BTC-USDT-SWAP:book_ticker``).

``okx`` (:class:`ingestor.okx.OkxV5`, path ``/ws/v5/public``) carries ``trade`` (``trades``, gaps repaired over
``/api/v5/market/history-trades`` where the venue still has the ids, marked otherwise), ``book_ticker``
(``bbo-tbt``) and ``depth`` (``books``, stream ``books:<instId>``: rule :data:`~ingestor.depth.DepthRule.OKX`, the
snapshot a message of the stream, a broken book subscribed again; ``depth.speed_ms`` does not apply, OKX's
``books`` has one speed).  Its connections keep OKX's limits (3 new connections a second, 480 subscribe operations
an hour each, a book's resubscription included) and its text ``ping`` heartbeat; 240 streams a connection keeps a
reconnect's resubscription to 3 requests.

:meth:`VenueProfile.check_symbol` says whether a symbol has the venue's form (Binance: ``BTCUSDT``; OKX:
``BTC-USDT``, ``BTC-USDT-SWAP``, ``BTC-USD-220527``); whether the venue lists it only the venue knows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.tick import is_valid_channel
from ingestor.binance import BINANCE_SPOT, DEPTH_SPEEDS
from ingestor.binance import VENUE as SPOT
from ingestor.binance import channel_to_stream as spot_stream
from ingestor.binance_coinm import BINANCE_COINM
from ingestor.binance_coinm import REST_URL as COINM_REST_URL
from ingestor.binance_coinm import VENUE as COINM
from ingestor.binance_coinm import WS_URL as COINM_WS_URL
from ingestor.binance_usdm import (
    BINANCE_USDM_MARKET,
    BINANCE_USDM_PUBLIC,
    MAX_STREAMS_PER_CONNECTION,
    channel_route,
    check_channel,
)
from ingestor.binance_usdm import REST_URL as USDM_REST_URL
from ingestor.binance_usdm import VENUE as USDM
from ingestor.binance_usdm import WS_URL as USDM_WS_URL
from ingestor.binance_usdm import channel_to_stream as usdm_stream
from ingestor.depth import DepthRule
from ingestor.okx import OKX_V5
from ingestor.okx import REST_BASE as OKX_REST_URL
from ingestor.okx import WS_BASE as OKX_WS_URL
from ingestor.venue import Venue

__all__ = [
    "VENUES",
    "VenueProfile",
    "known_venues",
    "venue_profile",
]


@dataclass(frozen=True, slots=True)
class VenueProfile:
    """One venue, by name (see the module doc).  Immutable, shared."""

    name: str
    #: the default WebSocket base (a ``url`` setting overrides it)
    ws_url: str
    #: the venue's own REST base, taken when the WebSocket base is on the venue's domain and none is set
    rest_url: str
    #: the domain its own hosts are under (``binance.com``)
    domain: str
    depth_rule: DepthRule
    #: at most this many streams on one connection (the venue's limit)
    max_streams: int
    #: the :class:`~ingestor.venue.Venue` whose REST calls (gap repair, book snapshots) are asked
    rest_venue: Venue
    #: ``channel`` -> None, or :class:`ConfigError` saying why the venue does not carry it
    _check: Callable[[str], None]
    #: ``channel`` -> the :class:`~ingestor.venue.Venue` a connection carrying it uses
    _route: Callable[[str], Venue]
    #: ``(symbol, channel, depth_ms)`` -> the venue's stream name
    _stream: Callable[[str, str, int], str]
    #: the diff depth speeds (ms) it has (empty: its book stream has one, ``depth.speed_ms`` does not apply)
    depth_speeds: tuple[int, ...] = (100,)
    #: the form of its symbols (a full match), and how a message describes it
    symbol_form: str = r"[A-Z0-9_]{1,40}"
    symbol_example: str = "letters, digits and _ (BTCUSDT)"

    def check_symbol(self, symbol: str) -> None:
        """:class:`ConfigError` when ``symbol`` does not have the venue's form (see the module doc)."""
        if re.fullmatch(self.symbol_form, symbol) is None:
            raise ConfigError(f"invalid symbol {symbol!r} for {self.name}: expected {self.symbol_example}")

    def check_channels(self, channels: Iterable[str], depth_ms: int = 100) -> None:
        """:class:`ConfigError` naming the first channel the venue does not carry, or a depth speed it lacks."""
        for channel in channels:
            self._check(channel)
            if channel == "depth" and self.depth_speeds and depth_ms not in self.depth_speeds:
                raise ConfigError(
                    f"depth.speed_ms {depth_ms} is not available on {self.name}: expected "
                    + " or ".join(str(ms) for ms in self.depth_speeds)
                )

    def venue_for(self, channel: str) -> Venue:
        """The :class:`~ingestor.venue.Venue` a connection carrying ``channel`` uses (its path, its stream names)."""
        return self._route(channel)

    def stream_name(self, symbol: str, channel: str, depth_ms: int = 100) -> str:
        """``("BTCUSDT", "agg_trade")`` -> the venue's stream name (``"btcusdt@aggTrade"``)."""
        return self._stream(symbol, channel, depth_ms)

    def default_rest_url(self, ws_url: str) -> str:
        """The venue's REST base for a WebSocket base on its own domain; otherwise the same host and port over
        http(s) (a test venue, a proxy)."""
        parts = urlsplit(ws_url)
        host = parts.hostname or ""
        if host == self.domain or host.endswith("." + self.domain):
            return self.rest_url
        scheme = "https" if parts.scheme == "wss" else "http"
        return f"{scheme}://{parts.netloc}"


def _spot_check(channel: str) -> None:
    if channel == "mark_price":
        raise ConfigError(
            "channel 'mark_price' is not available on binance (spot has no mark price): it is a futures channel "
            "(venue binance_usdm or binance_coinm)"
        )
    if not is_valid_channel(channel):
        raise ConfigError(
            f"unknown channel {channel!r}: expected trade, agg_trade, book_ticker, depth or kline_<interval> "
            "(e.g. kline_1m)"
        )


def _spot_stream(symbol: str, channel: str, depth_ms: int) -> str:
    return spot_stream(symbol, channel, depth_ms)


def _usdm_check(channel: str) -> None:
    check_channel(channel)


def _usdm_route(channel: str) -> Venue:
    route = channel_route(channel)
    return BINANCE_USDM_PUBLIC if route == "public" else BINANCE_USDM_MARKET


def _usdm_stream(symbol: str, channel: str, depth_ms: int) -> str:
    return usdm_stream(symbol, channel)


def _coinm_check(channel: str) -> None:
    check_channel(channel, COINM)


def _coinm_stream(symbol: str, channel: str, depth_ms: int) -> str:
    return BINANCE_COINM.stream_name(symbol, channel)


#: the channels OKX public carries here (``depth``: its ``books``, kept by :mod:`ingestor.depth_ws`)
OKX_CARRIED: Final = ("trade", "book_ticker", "depth")


def _okx_check(channel: str) -> None:
    if channel in OKX_CARRIED:
        return
    raise ConfigError(f"channel {channel!r} is not available on okx: expected " + " or ".join(OKX_CARRIED))


def _okx_stream(symbol: str, channel: str, depth_ms: int) -> str:
    return OKX_V5.stream_name(symbol, channel)


#: every venue the ingestor runs on, by name
VENUES: Final[Mapping[str, VenueProfile]] = {
    p.name: p
    for p in (
        VenueProfile(
            name=SPOT, ws_url="wss://stream.binance.com:9443", rest_url="https://api.binance.com",
            domain="binance.com", depth_rule=DepthRule.SPOT, max_streams=1024, rest_venue=BINANCE_SPOT,
            _check=_spot_check, _route=lambda channel: BINANCE_SPOT, _stream=_spot_stream,
            depth_speeds=tuple(DEPTH_SPEEDS),
        ),
        VenueProfile(
            name=USDM, ws_url=USDM_WS_URL, rest_url=USDM_REST_URL,
            domain="binance.com", depth_rule=DepthRule.FUTURES,
            max_streams=MAX_STREAMS_PER_CONNECTION, rest_venue=BINANCE_USDM_MARKET,
            _check=_usdm_check, _route=_usdm_route, _stream=_usdm_stream,
        ),
        VenueProfile(
            name=COINM, ws_url=COINM_WS_URL, rest_url=COINM_REST_URL,
            domain="binance.com", depth_rule=DepthRule.FUTURES,
            max_streams=MAX_STREAMS_PER_CONNECTION, rest_venue=BINANCE_COINM,
            _check=_coinm_check, _route=lambda channel: BINANCE_COINM, _stream=_coinm_stream,
        ),
        VenueProfile(
            name=OKX_V5.name, ws_url=OKX_WS_URL, rest_url=OKX_REST_URL, domain="okx.com",
            depth_rule=DepthRule.OKX, max_streams=240, rest_venue=OKX_V5,
            _check=_okx_check, _route=lambda channel: OKX_V5, _stream=_okx_stream, depth_speeds=(),
            symbol_form=r"[A-Z0-9]{1,20}(?:-[A-Z0-9]{1,20}){1,4}",
            symbol_example="an OKX instrument id, e.g. BTC-USDT, BTC-USDT-SWAP or BTC-USD-220527",
        ),
    )
}


def known_venues() -> str:
    """The venue names, for a message: ``binance, binance_coinm, binance_usdm or okx``."""
    names = sorted(VENUES)
    return ", ".join(names[:-1]) + " or " + names[-1]


def venue_profile(name: str) -> VenueProfile:
    """The venue called ``name``; :class:`ConfigError` naming the known ones otherwise."""
    profile = VENUES.get(name)
    if profile is None:
        raise ConfigError(f"unknown venue {name!r}: expected {known_venues()}")
    return profile
