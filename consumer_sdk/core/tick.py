"""The tick: schema version 1, as stored in the stream field ``d``.

A tick is a plain ``dict`` at run time (orjson encodes it without a copy or a
custom hook); the ``TypedDict`` classes below give it a type for readers and
for mypy at no run-time cost.  Prices and quantities are the venue's decimal
strings, untouched.  All times are integer microseconds since the Unix epoch.
"""

from __future__ import annotations

from typing import Any, Final, Literal, TypedDict, cast

import orjson

from consumer_sdk.core.errors import InvalidTick

__all__ = [
    "BASE_FIELDS",
    "CHANNEL_FIELDS",
    "FIXED_CHANNELS",
    "SCHEMA_VERSION",
    "AggTradeTick",
    "BookTickerTick",
    "GapMarker",
    "KlineTick",
    "MarkPriceTick",
    "Tick",
    "TradeTick",
    "channel_fields",
    "decode_tick",
    "encode_tick",
    "is_gap_marker",
    "is_valid_channel",
    "make_gap_marker",
]

SCHEMA_VERSION: Final = 1

FIXED_CHANNELS: Final = ("trade", "agg_trade", "book_ticker", "depth", "mark_price")
KLINE_INTERVALS: Final = frozenset(
    {"1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M"}
)

BASE_FIELDS: Final = ("v", "venue", "symbol", "channel", "seq", "ts_event", "ts_recv")
_TRADE = ("trade_id", "price", "qty", "side")
CHANNEL_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "trade": _TRADE,
    "agg_trade": (*_TRADE, "first_trade_id", "last_trade_id"),
    "book_ticker": ("bid_px", "bid_qty", "ask_px", "ask_qty", "update_id"),
    #: an order book's entries (:mod:`consumer_sdk.book_stream`): a diff carries ``kind``, ``first`` and/or ``pu``,
    #: ``bids``, ``asks``; a snapshot ``kind``, ``reason``, ``link``, ``bids``, ``asks``
    "depth": ("kind", "first", "pu", "reason", "link", "bids", "asks"),
    #: a futures contract's mark price (Binance USD-M and COIN-M ``markPriceUpdate``); ``funding_rate`` and
    #: ``next_funding_time`` are None for a contract with no funding
    "mark_price": ("mark_px", "index_px", "est_settle_px", "funding_rate", "next_funding_time"),
    "kline": (
        "open_time", "close_time", "open", "high", "low", "close",
        "volume", "quote_volume", "trades", "closed",
    ),
}


class Tick(TypedDict):
    """Fields every tick carries."""

    v: int
    venue: str
    symbol: str
    channel: str
    seq: int
    ts_event: int
    ts_recv: int


class TradeTick(Tick):
    trade_id: int
    price: str
    qty: str
    side: Literal["buy", "sell"]


class AggTradeTick(TradeTick):
    first_trade_id: int
    last_trade_id: int


class BookTickerTick(Tick):
    bid_px: str
    bid_qty: str
    ask_px: str
    ask_qty: str
    update_id: int


class KlineTick(Tick):
    open_time: int
    close_time: int
    open: str
    high: str
    low: str
    close: str
    volume: str
    quote_volume: str
    trades: int
    closed: bool


class MarkPriceTick(Tick):
    """A futures contract's mark price, index price and funding (one a second; ``seq`` is the event time in ms)."""

    mark_px: str
    index_px: str
    est_settle_px: str
    funding_rate: str | None
    next_funding_time: int | None


class GapMarker(Tick):
    """Stored in place of venue ids that could not be recovered: ``gap_first..gap_last`` are lost.

    Its ``seq`` is ``gap_last``, so the stream's seq order holds and the next tick follows it.
    Consumers see it as an explicit signal, never as a price.
    """

    gap_first: int
    gap_last: int
    reason: str


def make_gap_marker(
    venue: str, symbol: str, channel: str, first: int, last: int, ts_event: int, ts_recv: int, reason: str
) -> GapMarker:
    return {
        "v": SCHEMA_VERSION, "venue": venue, "symbol": symbol, "channel": channel, "seq": last,
        "ts_event": ts_event, "ts_recv": ts_recv, "gap_first": first, "gap_last": last, "reason": reason,
    }


def is_gap_marker(tick: Tick) -> bool:
    return "gap_first" in tick


def is_valid_channel(channel: str) -> bool:
    """``trade``, ``agg_trade``, ``book_ticker``, ``depth``, ``mark_price`` or ``kline_<interval>`` with a Binance
    interval: a channel some venue carries (which venue carries which: :mod:`ingestor.venues`)."""
    if channel in FIXED_CHANNELS:
        return True
    return channel.startswith("kline_") and channel[6:] in KLINE_INTERVALS


def channel_fields(channel: str) -> tuple[str, ...]:
    """The channel-specific fields of a tick on ``channel`` (after the base fields); for ``depth``, every field
    an entry may carry (each carries those of its ``kind``)."""
    if channel.startswith("kline_"):
        return CHANNEL_FIELDS["kline"]
    try:
        return CHANNEL_FIELDS[channel]
    except KeyError:
        raise InvalidTick(f"unknown channel {channel!r}") from None


def encode_tick(tick: Tick) -> bytes:
    """The bytes stored in the stream field ``d``."""
    return orjson.dumps(tick)


def decode_tick(raw: bytes | str) -> Tick:
    """Parse and check the field ``d`` of a stream entry; raise :class:`InvalidTick` when it is not a tick."""
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidTick(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidTick("not a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise InvalidTick(f"unsupported schema version {version!r}")
    seq = obj.get("seq")
    if type(seq) is not int or seq < 0:
        raise InvalidTick(f"bad seq {seq!r}")
    for name in ("venue", "symbol", "channel"):
        if type(obj.get(name)) is not str:
            raise InvalidTick(f"missing or bad {name!r}")
    for name in ("ts_event", "ts_recv"):
        if type(obj.get(name)) is not int:
            raise InvalidTick(f"missing or bad {name!r}")
    return cast(Tick, obj)
