"""Binance COIN-M futures (``dstream.binance.com``, ``dapi.binance.com``) as a :class:`~ingestor.venue.Venue`: pure.

Venue name ``binance_coinm``.  COIN-M sends the events USD-M sends, field for field (``aggTrade``, ``bookTicker``
with ``E`` and ``T``, ``kline``, ``markPriceUpdate``, ``depthUpdate`` with ``U``, ``u`` and ``pu``; COIN-M adds
``ps``, the pair, which no tick carries), so its frames are read by :mod:`ingestor.binance_usdm`'s parser with
this venue's name in the ticks, and its channels, stream names and kline intervals are USD-M's
(:data:`~ingestor.binance_usdm.USDM_CHANNELS`).  What differs:

- the hosts: ``wss://dstream.binance.com`` (combined streams on the unrouted ``/stream``: the route split of
  USD-M's ``fstream`` does not concern ``dstream``) and ``https://dapi.binance.com``;
- the REST paths: ``/dapi/v1/aggTrades`` repairs an aggregate trade gap, ``/dapi/v1/depth`` gives a book's
  snapshot (``lastUpdateId`` with ``E`` and ``T``; limits 5 to 1000 as USD-M's);
- the symbols: ``<PAIR>_PERP`` for perpetuals, ``<PAIR>_<YYMMDD>`` for delivery contracts (``BTCUSD_PERP``,
  ``ETHUSD_210924``): the ``_`` is a symbol character everywhere (stream keys, patterns, settings).

Order books follow Binance's futures rule (:class:`~ingestor.depth.DepthRule` ``futures``), as USD-M's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import orjson

from consumer_sdk.core.tick import Tick
from ingestor.binance_usdm import (
    channel_to_stream as usdm_channel_to_stream,
)
from ingestor.binance_usdm import (
    check_channel,
    futures_backfill_call,
    futures_snapshot_call,
    parse_frame_as,
    parse_frame_depth_as,
)
from ingestor.binance_usdm import (
    stream_to_channel as usdm_stream_to_channel,
)
from ingestor.depth import DepthDiff
from ingestor.subscriptions import subscribe_requests
from ingestor.venue import Heartbeat, Reply, RestCall, ServerShutdown, VenueRequest

__all__ = [
    "BINANCE_COINM",
    "REST_URL",
    "VENUE",
    "WS_URL",
    "BinanceCoinm",
    "parse_frame",
    "parse_frame_depth",
]

VENUE: Final = "binance_coinm"
WS_URL: Final = "wss://dstream.binance.com"
REST_URL: Final = "https://dapi.binance.com"


def parse_frame(raw: str | bytes, ts_recv: int) -> Tick | Reply | ServerShutdown | None:
    """USD-M's :func:`~ingestor.binance_usdm.parse_frame`, its ticks named ``binance_coinm``."""
    return parse_frame_as(raw, ts_recv, VENUE)


def parse_frame_depth(raw: str | bytes, ts_recv: int) -> Tick | Reply | ServerShutdown | DepthDiff | None:
    """USD-M's :func:`~ingestor.binance_usdm.parse_frame_depth`, its ticks named ``binance_coinm``."""
    return parse_frame_depth_as(raw, ts_recv, VENUE)


def _requests(method: str, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
    return [
        VenueRequest(req["id"], req["params"], orjson.dumps(req).decode())
        for req in subscribe_requests(streams, first_id, per_request=per_request, method=method)
    ]


class BinanceCoinm:
    """Binance COIN-M futures as a :class:`~ingestor.venue.Venue` (see the module doc).  Stateless: one instance
    (:data:`BINANCE_COINM`) serves every session."""

    __slots__ = ()

    name: Final = VENUE
    ws_path: Final = "/stream"
    heartbeat: Final = Heartbeat.WS_PING

    parse_frame = staticmethod(parse_frame)
    parse_frame_depth = staticmethod(parse_frame_depth)

    def __repr__(self) -> str:
        return "BinanceCoinm()"

    def stream_name(self, symbol: str, channel: str) -> str:
        """``("BTCUSD_PERP", "depth")`` -> ``"btcusd_perp@depth@100ms"``; :class:`UnsupportedChannel
        <ingestor.binance_usdm.UnsupportedChannel>` for a channel not carried (``trade`` among them)."""
        return usdm_channel_to_stream(symbol, check_channel(channel, VENUE))

    def split_stream(self, stream: str) -> tuple[str, str]:
        symbol, channel = usdm_stream_to_channel(stream)
        return symbol, channel

    def subscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        return _requests("SUBSCRIBE", streams, first_id, per_request)

    def unsubscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        return _requests("UNSUBSCRIBE", streams, first_id, per_request)

    def backfill_call(self, channel: str, symbol: str, from_id: int, limit: int) -> RestCall | None:
        """``/dapi/v1/aggTrades`` for ``agg_trade``; None for every other channel."""
        return futures_backfill_call("/dapi/v1", channel, symbol, from_id, limit)

    def snapshot_call(self, symbol: str, limit: int) -> RestCall:
        """``/dapi/v1/depth`` with the smallest limit it takes that holds ``limit`` levels (at most 1000)."""
        return futures_snapshot_call("/dapi/v1", symbol, limit)


#: the Binance COIN-M futures venue (stateless, shared)
BINANCE_COINM: Final = BinanceCoinm()
