"""Binance spot as a Venue, and the parser's range and shape checks, held to exact values (docs/testing.md,
"Mutation testing"): the stream names, subscribe messages and REST calls the session and the repairer send, and the
error each refused field gets (it ends up in the logs, one line each)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ingestor.binance import BINANCE_SPOT, MalformedFrame, parse_frame
from ingestor.venue import RestCall, VenueRequest

TS = 1_700_000_000_000_000
MAX_ID = 2**63 - 1
MAX_MS = MAX_ID // 1000


def trade(**over: Any) -> bytes:
    return orjson.dumps({"e": "trade", "s": "BTCUSDT", "t": 1, "T": 1, "p": "1", "q": "2", "m": False, **over})


def refusal(raw: bytes) -> str:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(raw, TS)
    return str(info.value)


def test_stream_names_both_ways() -> None:
    assert BINANCE_SPOT.stream_name("BTCUSDT", "trade") == "btcusdt@trade"
    assert BINANCE_SPOT.stream_name("ETHUSDT", "kline_1m") == "ethusdt@kline_1m"
    assert BINANCE_SPOT.split_stream("btcusdt@aggTrade") == ("BTCUSDT", "agg_trade")
    assert BINANCE_SPOT.split_stream("ethusdt@kline_1m") == ("ETHUSDT", "kline_1m")
    assert (BINANCE_SPOT.name, BINANCE_SPOT.ws_path) == ("binance", "/stream")


def test_subscribe_and_unsubscribe_messages_are_exactly_binances() -> None:
    got = BINANCE_SPOT.subscribe_requests(["btcusdt@trade", "ethusdt@trade", "solusdt@trade"], 7, 2)
    assert got == [
        VenueRequest(7, ["btcusdt@trade", "ethusdt@trade"],
                     '{"method":"SUBSCRIBE","params":["btcusdt@trade","ethusdt@trade"],"id":7}'),
        VenueRequest(8, ["solusdt@trade"], '{"method":"SUBSCRIBE","params":["solusdt@trade"],"id":8}'),
    ]
    [one] = BINANCE_SPOT.unsubscribe_requests(["btcusdt@trade"], 3, 200)
    assert one == VenueRequest(3, ["btcusdt@trade"], '{"method":"UNSUBSCRIBE","params":["btcusdt@trade"],"id":3}')
    assert BINANCE_SPOT.subscribe_requests([], 1, 200) == []


def test_rest_calls_are_exactly_binances() -> None:
    assert BINANCE_SPOT.backfill_call("trade", "BTCUSDT", 42, 1000) == RestCall(
        "/api/v3/historicalTrades", {"symbol": "BTCUSDT", "fromId": 42, "limit": 1000})
    assert BINANCE_SPOT.backfill_call("agg_trade", "ETHUSDT", 0, 500) == RestCall(
        "/api/v3/aggTrades", {"symbol": "ETHUSDT", "fromId": 0, "limit": 500})
    assert BINANCE_SPOT.backfill_call("book_ticker", "BTCUSDT", 1, 10) is None  # no history to fetch
    assert BINANCE_SPOT.snapshot_call("BTCUSDT", 1000) == RestCall(
        "/api/v3/depth", {"symbol": "BTCUSDT", "limit": 1000})


def test_ids_reach_int64_and_no_further() -> None:
    tick = parse_frame(trade(t=MAX_ID), TS)
    assert isinstance(tick, dict) and tick["seq"] == MAX_ID
    assert refusal(trade(t=MAX_ID + 1)) == f"integer out of range (at most {MAX_ID}), got {MAX_ID + 1}"


def test_times_in_ms_must_fit_int64_as_microseconds() -> None:
    tick = parse_frame(trade(T=MAX_MS), TS)
    assert isinstance(tick, dict) and tick["ts_event"] == MAX_MS * 1000
    assert refusal(trade(T=MAX_MS + 1)) == f"integer out of range (at most {MAX_MS}), got {MAX_MS + 1}"


@pytest.mark.parametrize("bad", [5, "", "BTC:USDT", "A" * 65, None])
def test_a_symbol_that_is_not_one_key_part_is_named(bad: Any) -> None:
    assert refusal(trade(s=bad)) == f"expected a symbol, got {bad!r}"


@pytest.mark.parametrize("bad", [5, None, "x:y"])
def test_a_kline_interval_that_is_not_a_channel_is_named(bad: Any) -> None:
    raw = orjson.dumps({"e": "kline", "E": 1, "s": "BTCUSDT", "k": {
        "t": 0, "T": 59_999, "s": "BTCUSDT", "i": bad, "o": "1", "c": "1", "h": "1", "l": "1", "v": "1", "n": 1,
        "x": False, "q": "1"}})
    assert refusal(raw) == f"expected a kline interval, got {bad!r}"


def refused(raw: str | bytes) -> MalformedFrame:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(raw, TS)
    return info.value


@pytest.mark.parametrize("as_text", [False, True])
@pytest.mark.parametrize(("literal", "kind"), [("NaN", "bad_number"), ("Infinity", "bad_number"),
                                                ("-Infinity", "bad_number"), ("nope", "malformed")])
def test_json_that_orjson_refuses_is_named_by_kind(literal: str, kind: str, as_text: bool) -> None:
    text = '{"e":"trade","s":"BTCUSDT","t":1,"T":1,"p":' + literal + ',"q":"2","m":false}'
    exc = refused(text if as_text else text.encode())
    assert exc.kind == kind and str(exc).startswith("not JSON: ")


def test_json_too_deep_and_not_utf8_are_named_by_kind() -> None:
    deep = refused(b"[" * 100_000 + b"]" * 100_000)
    assert (deep.kind, str(deep)) == ("too_deep", "not JSON: depth limit exceeded: line 1 column 1026 (char 1025)")
    assert refused(b'{"e":"\xff"}').kind == "invalid_utf8"
    assert refused(b"1" * 5000).kind == "bad_number"


@pytest.mark.parametrize(("bad", "kind"), [("7", "malformed"), (-1, "bad_value"), (2.0**64, "bad_number"),
                                            (1.5, "malformed"), (MAX_ID + 1, "bad_number")])
def test_a_refused_id_is_counted_by_kind(bad: Any, kind: str) -> None:
    assert refused(trade(t=bad)).kind == kind


def test_a_refused_price_or_volume_names_what_was_expected() -> None:
    negative = refused(trade(p="-1"))
    assert (negative.kind, str(negative)) == ("bad_value", "expected a positive decimal, got '-1'")
    zero = refused(trade(q="0.0"))
    assert (zero.kind, str(zero)) == ("bad_value", "expected a positive decimal, got '0.0'")
    long = "1" * 100
    huge = refused(trade(p=long))
    assert (huge.kind, str(huge)) == ("bad_number", f"expected a positive plain decimal, got {long[:40]!r} (100 chars)")
    kline = {"e": "kline", "E": 1, "s": "BTCUSDT", "k": {
        "t": 0, "T": 59_999, "s": "BTCUSDT", "i": "1m", "o": "1", "c": "1", "h": "1", "l": "1", "v": "-2", "n": 1,
        "x": False, "q": "1"}}
    volume = refused(orjson.dumps(kline))
    assert (volume.kind, str(volume)) == ("bad_value", "expected a non-negative decimal, got '-2'")
