"""The venues by name (:mod:`ingestor.venues`), Binance COIN-M on its capture, and the REST client asking each
venue's own backfill request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern, parse_key, stream_key
from consumer_sdk.core.tick import channel_fields, decode_tick, encode_tick, is_valid_channel
from distributor.control.state import parse_target
from ingestor.binance import BINANCE_SPOT
from ingestor.binance_coinm import BINANCE_COINM
from ingestor.binance_usdm import BINANCE_USDM_MARKET, BINANCE_USDM_PUBLIC, UnsupportedChannel
from ingestor.depth import DepthDiff, DepthRule
from ingestor.rest import RestRefused, VenueRest, agg_trades_to_ticks
from ingestor.venue import RestCall
from ingestor.venues import VENUES, known_venues, venue_profile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
COINM = FIXTURES / "binance-coinm-2021-07-22.jsonl"


def coinm_frames(event: str) -> list[tuple[bytes, dict[str, Any]]]:
    out = []
    for line in COINM.read_bytes().splitlines():
        frame = orjson.loads(line)["frame"].encode()
        data = orjson.loads(frame)["data"]
        if data.get("e") == event:
            out.append((frame, data))
    return out


# -- profiles -----------------------------------------------------------------------------------------------------


def test_the_venues_by_name() -> None:
    assert sorted(VENUES) == ["binance", "binance_coinm", "binance_usdm", "okx"]
    assert known_venues() == "binance, binance_coinm, binance_usdm or okx"
    spot, usdm, coinm = venue_profile("binance"), venue_profile("binance_usdm"), venue_profile("binance_coinm")
    assert (spot.depth_rule, usdm.depth_rule, coinm.depth_rule) == (DepthRule.SPOT, DepthRule.FUTURES,
                                                                   DepthRule.FUTURES)
    assert spot.rest_venue is BINANCE_SPOT and usdm.rest_venue is BINANCE_USDM_MARKET
    assert coinm.rest_venue is BINANCE_COINM
    assert (spot.max_streams, usdm.max_streams, coinm.max_streams) == (1024, 200, 200)


def test_an_unknown_venue_is_one_line_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as refused:
        venue_profile("binance_options")
    assert str(refused.value) == (
        "unknown venue 'binance_options': expected binance, binance_coinm, binance_usdm or okx"
    )


def test_stream_names_and_the_connection_each_channel_rides() -> None:
    spot, usdm, coinm = venue_profile("binance"), venue_profile("binance_usdm"), venue_profile("binance_coinm")
    assert spot.stream_name("BTCUSDT", "depth", 1000) == "btcusdt@depth"
    assert spot.stream_name("BTCUSDT", "agg_trade") == "btcusdt@aggTrade"
    assert usdm.stream_name("BTCUSDT", "mark_price") == "btcusdt@markPrice@1s"
    assert usdm.stream_name("BTCUSDT", "depth") == "btcusdt@depth@100ms"
    assert coinm.stream_name("BTCUSD_PERP", "depth") == "btcusd_perp@depth@100ms"
    assert coinm.stream_name("ETHUSD_210924", "kline_1m") == "ethusd_210924@kline_1m"
    assert spot.venue_for("depth") is BINANCE_SPOT
    assert usdm.venue_for("agg_trade") is BINANCE_USDM_MARKET
    assert usdm.venue_for("mark_price") is BINANCE_USDM_MARKET
    assert usdm.venue_for("kline_1h") is BINANCE_USDM_MARKET
    assert usdm.venue_for("book_ticker") is BINANCE_USDM_PUBLIC
    assert usdm.venue_for("depth") is BINANCE_USDM_PUBLIC
    assert coinm.venue_for("depth") is coinm.venue_for("agg_trade") is BINANCE_COINM
    assert BINANCE_COINM.split_stream("btcusd_perp@markPrice@1s") == ("BTCUSD_PERP", "mark_price")


@pytest.mark.parametrize(
    ("venue", "channel", "message"),
    [
        ("binance", "mark_price", "'mark_price' is not available on binance"),
        ("binance", "funding", "unknown channel 'funding': expected trade, agg_trade"),
        ("binance_usdm", "trade", "'trade' is not available on binance_usdm"),
        ("binance_usdm", "kline_1s", "unknown channel 'kline_1s' on binance_usdm"),
        ("binance_coinm", "trade", "'trade' is not available on binance_coinm"),
        ("binance_coinm", "depth5", "unknown channel 'depth5' on binance_coinm"),
    ],
)
def test_each_venue_refuses_the_channels_it_lacks(venue: str, channel: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        venue_profile(venue).check_channels(["agg_trade", channel])


def test_each_venue_takes_its_channels_and_depth_speeds() -> None:
    venue_profile("binance").check_channels(["trade", "agg_trade", "book_ticker", "depth", "kline_1s"], 1000)
    for name in ("binance_usdm", "binance_coinm"):
        venue_profile(name).check_channels(["agg_trade", "book_ticker", "depth", "mark_price", "kline_1M"], 100)
        with pytest.raises(ConfigError, match=f"depth.speed_ms 1000 is not available on {name}: expected 100"):
            venue_profile(name).check_channels(["depth"], 1000)
    with pytest.raises(UnsupportedChannel):
        BINANCE_COINM.stream_name("BTCUSD_PERP", "trade")


def test_the_rest_base_follows_the_venue_for_its_own_hosts() -> None:
    usdm, coinm, spot = venue_profile("binance_usdm"), venue_profile("binance_coinm"), venue_profile("binance")
    assert usdm.default_rest_url("wss://fstream.binance.com") == "https://fapi.binance.com"
    assert coinm.default_rest_url("wss://dstream.binance.com") == "https://dapi.binance.com"
    assert spot.default_rest_url("wss://stream.binance.com:9443") == "https://api.binance.com"
    assert usdm.default_rest_url("ws://venue.test:9443") == "http://venue.test:9443"
    assert coinm.default_rest_url("wss://proxy.example:443") == "https://proxy.example:443"


def test_the_rest_calls_of_each_venue() -> None:
    assert BINANCE_COINM.snapshot_call("BTCUSD_PERP", 1000) == RestCall(
        "/dapi/v1/depth", {"symbol": "BTCUSD_PERP", "limit": 1000}
    )
    assert BINANCE_COINM.snapshot_call("BTCUSD_PERP", 300).params["limit"] == 500
    assert BINANCE_COINM.backfill_call("agg_trade", "BTCUSD_PERP", 7, 5000) == RestCall(
        "/dapi/v1/aggTrades", {"symbol": "BTCUSD_PERP", "fromId": 7, "limit": 1000}
    )
    assert BINANCE_COINM.backfill_call("mark_price", "BTCUSD_PERP", 7, 10) is None
    assert BINANCE_USDM_PUBLIC.snapshot_call("BTCUSDT", 1000).path == "/fapi/v1/depth"


# -- symbols, keys, channels ----------------------------------------------------------------------------------------


def test_futures_symbols_and_venues_with_an_underscore_make_keys_and_patterns() -> None:
    key = stream_key("binance_coinm", "BTCUSD_PERP", "depth", "md")
    assert key == "md:binance_coinm:BTCUSD_PERP:depth"
    name = parse_key(key, "md")
    assert (name.venue, name.symbol, name.channel) == ("binance_coinm", "BTCUSD_PERP", "depth")
    assert Pattern("binance_coinm:*_PERP:depth").matches("binance_coinm:BTCUSD_PERP:depth")
    assert Pattern("binance_usdm:*:mark_price").matches("binance_usdm:BTCUSDT:mark_price")
    parse_target("binance_usdm:*:mark_price")  # the control plane knows the channel


def test_mark_price_is_a_channel_with_its_fields() -> None:
    assert is_valid_channel("mark_price")
    assert channel_fields("mark_price") == (
        "mark_px", "index_px", "est_settle_px", "funding_rate", "next_funding_time"
    )
    tick: Any = {
        "v": 1, "venue": "binance_usdm", "symbol": "BTCUSDT", "channel": "mark_price", "seq": 5, "ts_event": 5000,
        "ts_recv": 6000, "mark_px": "1.5", "index_px": "1.4", "est_settle_px": "0", "funding_rate": None,
        "next_funding_time": None,
    }
    assert decode_tick(encode_tick(tick)) == tick


# -- COIN-M on its capture ------------------------------------------------------------------------------------------


def test_coinm_depth_frames_read_as_futures_diffs() -> None:
    frames = coinm_frames("depthUpdate")
    assert len(frames) == 2047
    for raw, data in frames:
        diff = BINANCE_COINM.parse_frame_depth(raw, 1)
        assert isinstance(diff, DepthDiff)
        assert (diff.symbol, diff.first_id, diff.last_id, diff.prev_id) == (data["s"], data["U"], data["u"],
                                                                           data["pu"])
        assert BINANCE_COINM.parse_frame(raw, 1) is None, "no tick: the book's"


def test_coinm_ticks_carry_its_name() -> None:
    (raw, data), *_ = coinm_frames("aggTrade")
    tick: Any = BINANCE_COINM.parse_frame(raw, 7)
    assert tick["venue"] == "binance_coinm" and tick["symbol"] == data["s"] and tick["seq"] == data["a"]
    for event in ("bookTicker", "kline"):
        for raw, data in coinm_frames(event):
            parsed: Any = BINANCE_COINM.parse_frame(raw, 7)
            assert parsed["venue"] == "binance_coinm" and parsed["symbol"] == data["s"]
    usdm: Any = BINANCE_USDM_MARKET.parse_frame(raw, 7)
    assert usdm["venue"] == "binance_usdm", "the same frame read as USD-M's is named USD-M"


# -- the REST client asks the venue's request -----------------------------------------------------------------------


def _agg_rows(start: int, n: int) -> list[dict[str, Any]]:
    return [{"a": a, "p": "1.5", "q": "2", "f": a, "l": a, "T": 1_700_000_000_000 + a, "m": True}
            for a in range(start, start + n)]


@pytest.mark.parametrize(
    ("venue", "path"),
    [(BINANCE_SPOT, "/api/v3/aggTrades"), (BINANCE_USDM_MARKET, "/fapi/v1/aggTrades"),
     (BINANCE_COINM, "/dapi/v1/aggTrades")],
)
async def test_fetch_asks_the_venues_backfill_request(venue: Any, path: str) -> None:
    asked: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        body = orjson.dumps(_agg_rows(int(request.url.params["fromId"]), 3))
        return httpx.Response(200, stream=httpx.ByteStream(body))  # streamed, as from a socket

    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(answer), venue=venue)
    try:
        rows = await rest.fetch("agg_trade", "BTCUSD_PERP", 40, 3)
    finally:
        await rest.aclose()
    assert [(u.path, dict(u.params)) for u in asked] == [
        (path, {"symbol": "BTCUSD_PERP", "fromId": "40", "limit": "3"})
    ]
    ticks: Any = agg_trades_to_ticks(rows, venue.name, "BTCUSD_PERP", 1)
    assert [t["seq"] for t in ticks] == [40, 41, 42] and {t["venue"] for t in ticks} == {venue.name}
    assert rest.backfills("agg_trade") and not rest.backfills("book_ticker")


async def test_fetch_refuses_without_asking_for_a_channel_the_venue_cannot_backfill() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise AssertionError("nothing may be asked")

    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(answer), venue=BINANCE_USDM_MARKET)
    with pytest.raises(RestRefused, match="binance_usdm has no REST request for the ids of trade"):
        await rest.fetch("trade", "BTCUSDT", 1, 10)
    assert rest.stats.requests == 0
    await rest.aclose()
