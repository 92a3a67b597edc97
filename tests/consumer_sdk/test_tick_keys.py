"""consumer_sdk.core.keys and consumer_sdk.core.tick: stream keys, entry IDs, patterns, the tick's wire form."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.core.errors import ConfigError, InvalidTick
from consumer_sdk.core.keys import (
    DEFAULT_PREFIX,
    Pattern,
    StreamName,
    entry_id,
    parse_entry_id,
    parse_key,
    stream_key,
)
from consumer_sdk.core.tick import (
    BASE_FIELDS,
    SCHEMA_VERSION,
    Tick,
    channel_fields,
    decode_tick,
    encode_tick,
    is_valid_channel,
)

# -- keys ------------------------------------------------------------------------------------------------


def test_stream_key_layout() -> None:
    assert DEFAULT_PREFIX == "md"
    assert stream_key("binance", "BTCUSDT", "trade") == "md:binance:BTCUSDT:trade"
    assert stream_key("binance", "ETHUSDT", "kline_1m", prefix="t1") == "t1:binance:ETHUSDT:kline_1m"
    name = StreamName("binance", "ETHUSDT", "kline_1m")
    assert name.key() == "md:binance:ETHUSDT:kline_1m"
    assert name.key("x") == "x:binance:ETHUSDT:kline_1m"
    assert str(name) == "binance:ETHUSDT:kline_1m"


@pytest.mark.parametrize(
    ("key", "prefix", "want"),
    [
        ("md:binance:BTCUSDT:trade", "md", StreamName("binance", "BTCUSDT", "trade")),
        ("md:binance:BTCUSD_PERP:kline_1m", "md", StreamName("binance", "BTCUSD_PERP", "kline_1m")),
        ("test-7:binance:ETHUSDT:book_ticker", "test-7", StreamName("binance", "ETHUSDT", "book_ticker")),
    ],
)
def test_parse_key(key: str, prefix: str, want: StreamName) -> None:
    got = parse_key(key, prefix)
    assert got == want
    assert got.key(prefix) == key


@given(
    venue=st.from_regex(r"\A[a-z0-9_.\-]{1,10}\Z"),
    symbol=st.from_regex(r"\A[A-Z0-9_.\-]{1,16}\Z"),
    channel=st.from_regex(r"\A[a-z0-9_]{1,12}\Z"),
)
def test_stream_key_parse_key_round_trip(venue: str, symbol: str, channel: str) -> None:
    assert parse_key(stream_key(venue, symbol, channel)) == StreamName(venue, symbol, channel)


@pytest.mark.parametrize(
    ("key", "prefix"),
    [
        ("md:binance:BTCUSDT", "md"),  # three parts
        ("md:binance:BTCUSDT:trade:x", "md"),  # five parts
        ("xx:binance:BTCUSDT:trade", "md"),  # another prefix
        ("md:binance:BTCUSDT:trade", "xx"),
        ("md:binance::trade", "md"),  # empty symbol
        (":binance:BTCUSDT:trade", "md"),
        ("md:binance:BTC USDT:trade", "md"),  # space
        ("md:binance:BTCUSDT:*", "md"),  # a glob is not a key
        ("", "md"),
    ],
)
def test_parse_key_refuses(key: str, prefix: str) -> None:
    with pytest.raises(ConfigError):
        parse_key(key, prefix)


# -- entry IDs -------------------------------------------------------------------------------------------


@given(ms=st.integers(0, 2**64 - 1), seq=st.integers(0, 2**64 - 1))
def test_entry_id_round_trip(ms: int, seq: int) -> None:
    text = entry_id(ms, seq)
    assert text == f"{ms}-{seq}"
    assert parse_entry_id(text) == (ms, seq)
    assert parse_entry_id(text.encode()) == (ms, seq)


def test_entry_id_without_seq_part() -> None:
    assert parse_entry_id("1700000000000") == (1700000000000, 0)
    assert parse_entry_id(b"1700000000000-0") == (1700000000000, 0)


# -- patterns --------------------------------------------------------------------------------------------

BTC_TRADE = StreamName("binance", "BTCUSDT", "trade")
BTC_AGG = StreamName("binance", "BTCUSDT", "agg_trade")
BTC_K1M = StreamName("binance", "BTCUSDT", "kline_1m")
ETH_K1H = StreamName("binance", "ETHUSDT", "kline_1h")
ETH_BOOK = StreamName("binance", "ETHUSDT", "book_ticker")
BYBIT_K1M = StreamName("bybit", "BTCUSDT", "kline_1m")
ALL = [BTC_TRADE, BTC_AGG, BTC_K1M, ETH_K1H, ETH_BOOK, BYBIT_K1M]


@pytest.mark.parametrize(
    ("text", "matching"),
    [
        ("binance:*:kline_*", {BTC_K1M, ETH_K1H}),
        ("binance:BTCUSDT:trade", {BTC_TRADE}),
        ("*:*:*", set(ALL)),
        ("binance:btcusdt:*", {BTC_TRADE, BTC_AGG, BTC_K1M}),  # the symbol is upper-cased
        ("*:BTCUSDT:kline_1m", {BTC_K1M, BYBIT_K1M}),
        ("binance:*:*trade", {BTC_TRADE, BTC_AGG}),
        ("binance:???USDT:book_ticker", {ETH_BOOK}),
        ("binance:[BE]*:kline_1?", {BTC_K1M, ETH_K1H}),
        ("binance:ETHUSDT:trade", set()),
        ("BINANCE:BTCUSDT:trade", set()),  # the venue is matched as written
    ],
)
def test_pattern_matches(text: str, matching: set[StreamName]) -> None:
    pattern = Pattern(text)
    assert {name for name in ALL if pattern.matches(name)} == matching
    assert {name for name in ALL if pattern.matches(str(name))} == matching


def test_literal_pattern() -> None:
    literal = Pattern("binance:BTCUSDT:trade")
    assert literal.is_literal
    assert not literal.matches("binance:BTCUSDT:trades")
    assert not literal.matches("binance:BTCUSDT:agg_trade")
    assert not Pattern("binance:*:trade").is_literal
    assert not Pattern("binance:BTCUSD?:trade").is_literal
    assert not Pattern("binance:BTCUSD[T]:trade").is_literal


def test_pattern_symbol_is_upper_cased() -> None:
    lower = Pattern("binance:btcusdt:trade")
    upper = Pattern("binance:BTCUSDT:trade")
    assert lower.text == "binance:BTCUSDT:trade"
    assert lower == upper
    assert hash(lower) == hash(upper)
    assert lower.matches(BTC_TRADE)
    assert Pattern("binance:*:kline_1m") != Pattern("binance:*:kline_1M")  # channels keep their case


def test_pattern_redis_glob() -> None:
    assert Pattern("binance:*:kline_*").redis_glob() == "md:binance:*:kline_*"
    assert Pattern("binance:btcusdt:trade").redis_glob("t9") == "t9:binance:BTCUSDT:trade"


@pytest.mark.parametrize(
    "text",
    ["a:b", "a::c", "a:b:c:d", "", "::", "binance:BTCUSDT:", ":BTCUSDT:trade", "binance:BTC USDT:trade",
     " binance:BTCUSDT:trade", "binance:BTCUSDT:trade ", "binance/BTCUSDT/trade", "binance:BTC,ETH:trade"],
)
def test_invalid_patterns_raise(text: str) -> None:
    with pytest.raises(ConfigError):
        Pattern(text)


# -- channels --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["trade", "agg_trade", "book_ticker", "depth", "kline_1m", "kline_1s", "kline_1h",
                                     "kline_1d", "kline_1w", "kline_1M"])
def test_valid_channels(channel: str) -> None:
    assert is_valid_channel(channel)


@pytest.mark.parametrize("channel", ["kline_7m", "kline_", "kline", "depth@100ms", "", "Trade", "aggTrade",
                                     "bookTicker", "kline_1min", "trade "])
def test_invalid_channels(channel: str) -> None:
    assert not is_valid_channel(channel)


def test_channel_fields() -> None:
    assert channel_fields("trade") == ("trade_id", "price", "qty", "side")
    assert channel_fields("agg_trade") == (
        "trade_id", "price", "qty", "side", "first_trade_id", "last_trade_id",
    )
    assert channel_fields("book_ticker") == ("bid_px", "bid_qty", "ask_px", "ask_qty", "update_id")
    kline = ("open_time", "close_time", "open", "high", "low", "close", "volume", "quote_volume", "trades",
             "closed")
    assert channel_fields("kline_1m") == kline
    assert channel_fields("kline_1h") == kline
    assert channel_fields("depth") == ("kind", "first", "pu", "reason", "link", "bids", "asks")
    with pytest.raises(InvalidTick):
        channel_fields("depth@100ms")


# -- the tick on the wire ------------------------------------------------------------------------------------

TRADE_TICK: dict[str, Any] = {
    "v": 1, "venue": "binance", "symbol": "BTCUSDT", "channel": "trade", "seq": 42,
    "ts_event": 1_700_000_000_123_000, "ts_recv": 1_700_000_000_124_567,
    "trade_id": 42, "price": "43000.10000000", "qty": "0.00120000", "side": "buy",
}


def test_schema_version() -> None:
    assert SCHEMA_VERSION == 1
    assert BASE_FIELDS == ("v", "venue", "symbol", "channel", "seq", "ts_event", "ts_recv")


def test_encode_decode_round_trip() -> None:
    tick: Tick = TRADE_TICK  # type: ignore[assignment]
    raw = encode_tick(tick)
    assert isinstance(raw, bytes)
    assert orjson.loads(raw) == TRADE_TICK
    assert decode_tick(raw) == TRADE_TICK
    assert decode_tick(raw.decode()) == TRADE_TICK


def with_field(name: str, value: Any) -> bytes:
    return orjson.dumps({**TRADE_TICK, name: value})


def missing(name: str) -> bytes:
    return orjson.dumps({k: v for k, v in TRADE_TICK.items() if k != name})


BAD_PAYLOADS = {
    "not JSON": b"{nope",
    "empty": b"",
    "a list": b"[1, 2]",
    "a string": b'"tick"',
    "null": b"null",
    "v 2": with_field("v", 2),
    "v 0": with_field("v", 0),
    "v string": with_field("v", "1"),
    "v null": with_field("v", None),
    "v true": with_field("v", True),
    "v float": with_field("v", 1.0),
    "seq negative": with_field("seq", -1),
    "seq string": with_field("seq", "42"),
    "seq float": with_field("seq", 42.0),
    "seq bool": with_field("seq", True),
    "venue not a string": with_field("venue", 1),
    "ts_event float": with_field("ts_event", 1.5),
    "ts_recv string": with_field("ts_recv", "1"),
    **{f"missing {name}": missing(name) for name in BASE_FIELDS},
}


@pytest.mark.parametrize("raw", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_decode_tick_rejects(raw: bytes) -> None:
    with pytest.raises(InvalidTick):
        decode_tick(raw)


def test_invalid_tick_is_a_value_error() -> None:
    assert issubclass(InvalidTick, ValueError)
    assert issubclass(ConfigError, ValueError)
