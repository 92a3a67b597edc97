"""ingestor.binance_usdm: Binance USD-M futures as a venue, on real frames and on Binance's documented ones.

The real frames are the COIN-M capture (``binance-coinm-2021-07-22.jsonl``): COIN-M is USD-M's ``dapi`` sibling and
sends aggTrade, bookTicker, kline and depthUpdate frames of the same shape.  Expectations are derived here from
the raw frame (Binance's documented field names), never by calling the parser under test.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.sequencing import Verdict
from consumer_sdk.core.tick import BASE_FIELDS, Tick, channel_fields, decode_tick, encode_tick
from distributor.ingress import IngressQueue, Policy
from ingestor import binance
from ingestor.binance import PARSE_REFUSALS
from ingestor.binance_usdm import (
    BINANCE_USDM_ALL,
    BINANCE_USDM_MARKET,
    BINANCE_USDM_PUBLIC,
    MARK_PRICE_FIELDS,
    REST_ERROR_KINDS,
    VENUE,
    BinanceUsdm,
    RestVerdict,
    UnsupportedChannel,
    channel_route,
    channel_to_stream,
    check_channel,
    classify_reply_error,
    classify_rest_error,
    parse_frame,
    split_by_route,
    stream_to_channel,
)
from ingestor.lifecycle import SessionState
from ingestor.memory import MemoryConnector
from ingestor.pipeline import IngestPipeline
from ingestor.rest import agg_trades_to_ticks, check_against, check_page
from ingestor.sequencer import Sequencer
from ingestor.session import SessionSettings, VenueSession
from ingestor.venue import Heartbeat, MalformedFrame, Reply, RestCall, ServerShutdown, Venue, VenueRequest

COINM = Path(__file__).resolve().parents[1] / "fixtures" / "binance-coinm-2021-07-22.jsonl"
#: the event counts the fixtures' README publishes for the capture
README_COUNTS = {"bookTicker": 2240, "depthUpdate": 2047, "aggTrade": 51, "kline": 33}
TS_RECV = 1_700_000_000_123_456


def load(path: Path) -> list[tuple[int, str]]:
    """``(ts_recv in µs, raw frame text)`` for every line of a capture."""
    out = []
    for line in path.read_text().splitlines():
        rec = orjson.loads(line)
        out.append((int(rec["recv_ts"] * 1e6), rec["frame"]))
    return out


def expected_tick(data: dict[str, Any], ts_recv: int) -> dict[str, Any] | None:
    """The tick the contract asks for, from Binance's documented field names; None for a frame not a tick."""
    e = data["e"]
    base = {"v": 1, "venue": "binance_usdm", "symbol": data["s"], "ts_recv": ts_recv}
    if e == "aggTrade":
        return {
            **base, "channel": "agg_trade", "seq": data["a"], "ts_event": data["T"] * 1000, "trade_id": data["a"],
            "price": data["p"], "qty": data["q"], "side": "sell" if data["m"] else "buy",
            "first_trade_id": data["f"], "last_trade_id": data["l"],
        }
    if e == "bookTicker":
        return {
            **base, "channel": "book_ticker", "seq": data["u"], "ts_event": data["E"] * 1000,
            "bid_px": data["b"], "bid_qty": data["B"], "ask_px": data["a"], "ask_qty": data["A"],
            "update_id": data["u"],
        }
    if e == "kline":
        k = data["k"]
        return {
            **base, "channel": "kline_" + k["i"], "seq": data["E"], "ts_event": data["E"] * 1000,
            "open_time": k["t"] * 1000, "close_time": k["T"] * 1000, "open": k["o"], "high": k["h"],
            "low": k["l"], "close": k["c"], "volume": k["v"], "quote_volume": k["q"], "trades": k["n"],
            "closed": k["x"],
        }
    if e == "markPriceUpdate":
        return {
            **base, "channel": "mark_price", "seq": data["E"], "ts_event": data["E"] * 1000,
            "mark_px": data["p"], "index_px": data["i"], "est_settle_px": data["P"],
            "funding_rate": data["r"] or None, "next_funding_time": data["T"] * 1000 or None,
        }
    return None


def fields_of(channel: str) -> set[str]:
    return {*BASE_FIELDS, *(MARK_PRICE_FIELDS if channel == "mark_price" else channel_fields(channel))}


def no_float(value: Any) -> bool:
    if isinstance(value, float):
        return False
    if isinstance(value, dict):
        return all(no_float(v) for v in value.values())
    return True


# -- the real capture ------------------------------------------------------------------------------------------------


def test_every_captured_aggtrade_bookticker_and_kline_frame_parses_field_by_field() -> None:
    frames = load(COINM)
    seen: Counter[str] = Counter()
    for n, (ts_recv, raw) in enumerate(frames, 1):
        wrapper = orjson.loads(raw)
        data = wrapper["data"]
        where = f"{COINM.name} line {n}: {raw[:120]}"
        seen[data["e"]] += 1
        tick = parse_frame(raw, ts_recv)
        want = expected_tick(data, ts_recv)
        if want is None:
            assert data["e"] == "depthUpdate" and tick is None, where
            continue
        assert isinstance(tick, dict), where
        assert tick == want, where
        # exactly the contract's fields, the decimal strings as sent (compared as text), no float anywhere
        assert set(tick) == fields_of(tick["channel"]), where
        assert no_float(tick), where
        for name, value in tick.items():
            if isinstance(value, str) and name not in ("venue", "symbol", "channel", "side"):
                assert f'"{value}"' in raw, where
        # the stream it came in on names its symbol and channel, on the route that serves that channel
        assert stream_to_channel(wrapper["stream"]) == (tick["symbol"], tick["channel"]), where
        route = BINANCE_USDM_PUBLIC if channel_route(tick["channel"]) == "public" else BINANCE_USDM_MARKET
        assert route.split_stream(wrapper["stream"]) == (tick["symbol"], tick["channel"]), where
        # bytes parse the same; spot's parser makes the same tick but for the venue's name
        assert parse_frame(raw.encode(), ts_recv) == tick, where
        assert {**binance.parse_frame(raw, ts_recv), "venue": VENUE} == tick, where  # type: ignore[dict-item]
    assert seen == README_COUNTS


def test_the_whole_capture_through_the_pipeline_refuses_nothing_and_skips_only_depth() -> None:
    frames = [raw.encode() for _, raw in load(COINM)]
    pipeline = IngestPipeline(BINANCE_USDM_ALL, Sequencer())
    start, events = 0, []
    while start < len(frames):
        out = pipeline.process(TS_RECV, frames, start)
        if out.event is not None:
            events.append(out.event)
        start = out.resume
    stats = pipeline.stats()
    assert events == []
    assert (stats.frames, stats.malformed, stats.refused) == (len(frames), 0, {})
    assert stats.unsupported == README_COUNTS["depthUpdate"]
    assert stats.ticks + stats.rejected == len(frames) - README_COUNTS["depthUpdate"]


def test_depth_frames_are_never_malformed_whatever_they_hold() -> None:
    for data in [
        {"e": "depthUpdate", "E": 1, "T": 1, "s": "BTCUSDT", "U": 157, "u": 160, "pu": 149,
         "b": [["0.0024", "10"]], "a": [["0.0026", "100"]]},
        {"e": "depthUpdate"},
        {"e": "depthUpdate", "U": "x", "u": -1, "pu": 1e300, "b": 0.5, "a": None, "s": ""},
    ]:
        assert parse_frame(orjson.dumps({"stream": "btcusdt@depth@100ms", "data": data}), TS_RECV) is None
        assert parse_frame(orjson.dumps(data), TS_RECV) is None


# -- mark price ------------------------------------------------------------------------------------------------------

#: Binance's documented USD-M example (Mark Price Stream)
MARK: dict[str, Any] = {
    "e": "markPriceUpdate", "E": 1562305380000, "s": "BTCUSDT", "p": "11794.15000000", "i": "11784.62659091",
    "P": "11784.25641265", "r": "0.00038167", "T": 1562306400000,
}
#: a delivery contract's update: no funding (Binance's COIN-M example shape, on a USD-M dated contract)
MARK_DELIVERY: dict[str, Any] = {**MARK, "s": "BTCUSDT_240628", "r": "", "T": 0}


def frame(data: dict[str, Any], stream: str | None = None) -> bytes:
    return orjson.dumps(data if stream is None else {"stream": stream, "data": data})


@pytest.mark.parametrize("wrapped", [False, True], ids=["raw", "combined"])
def test_the_documented_mark_price_frame(wrapped: bool) -> None:
    tick = parse_frame(frame(MARK, "btcusdt@markPrice@1s" if wrapped else None), TS_RECV)
    assert tick == {
        "v": 1, "venue": "binance_usdm", "symbol": "BTCUSDT", "channel": "mark_price", "seq": 1562305380000,
        "ts_event": 1562305380000000, "ts_recv": TS_RECV, "mark_px": "11794.15000000",
        "index_px": "11784.62659091", "est_settle_px": "11784.25641265", "funding_rate": "0.00038167",
        "next_funding_time": 1562306400000000,
    }
    assert tick == expected_tick(MARK, TS_RECV)
    assert isinstance(tick, dict) and decode_tick(encode_tick(tick)) == tick


def test_a_contract_without_funding_has_none_for_its_rate_and_next_funding_time() -> None:
    tick: Any = parse_frame(frame(MARK_DELIVERY), TS_RECV)
    assert (tick["funding_rate"], tick["next_funding_time"]) == (None, None)
    assert set(tick) == fields_of("mark_price")
    assert orjson.loads(encode_tick(tick))["funding_rate"] is None


POSITIVE = st.from_regex(r"\A[0-9]{1,20}(\.[0-9]{0,18})?\Z").filter(lambda text: text.strip("0.") != "")
NON_NEGATIVE = st.from_regex(r"\A[0-9]{1,20}(\.[0-9]{0,18})?\Z")
SIGNED = st.from_regex(r"\A-?[0-9]{1,20}(\.[0-9]{0,18})?\Z")


@given(p=POSITIVE, i=NON_NEGATIVE, settle=NON_NEGATIVE, r=SIGNED)
def test_mark_price_decimal_strings_survive_unchanged(p: str, i: str, settle: str, r: str) -> None:
    tick: Any = parse_frame(frame({**MARK, "p": p, "i": i, "P": settle, "r": r}), TS_RECV)
    assert (tick["mark_px"], tick["index_px"], tick["est_settle_px"], tick["funding_rate"]) == (p, i, settle, r)
    back = orjson.loads(encode_tick(tick))
    assert no_float(back) and back == tick


def test_a_negative_funding_rate_is_kept_as_sent() -> None:
    tick: Any = parse_frame(frame({**MARK, "r": "-0.00012500"}), TS_RECV)
    assert tick["funding_rate"] == "-0.00012500"


def mark_at(event_ms: int) -> bytes:
    return frame({**MARK, "E": event_ms}, "btcusdt@markPrice@1s")


def test_mark_price_seq_is_the_event_time_and_an_equal_or_older_one_is_dropped() -> None:
    seq = Sequencer()
    verdicts = []
    for event_ms in (1000, 2000, 2000, 1500, 7000, 6999, 8000):
        tick: Any = parse_frame(mark_at(event_ms), TS_RECV)
        assert tick["seq"] == event_ms and tick["ts_event"] == event_ms * 1000
        verdicts.append(seq.check(tick))
    d, late, ok = Verdict.DUPLICATE, Verdict.LATE, Verdict.OK
    # a jump (2000 -> 7000) is no gap: the mark price is a state, the next update replaces a missed one
    assert verdicts == [ok, ok, d, late, ok, late, ok]
    assert seq.stats().gaps == 0 and seq.last_seq(VENUE, "BTCUSDT", "mark_price") == 8000


def test_the_same_update_twice_is_stored_once() -> None:
    pipeline = IngestPipeline(BINANCE_USDM_MARKET, Sequencer())
    out = pipeline.process(TS_RECV, [mark_at(1000), mark_at(2000), mark_at(2000), mark_at(3000)])
    assert [t["seq"] for t in out.ticks] == [1000, 2000, 3000] and out.event is None
    assert (pipeline.rejected, pipeline.malformed) == (1, 0)


# -- the other channels' documented frames ---------------------------------------------------------------------------

#: Binance's documented USD-M examples
AGG: dict[str, Any] = {
    "e": "aggTrade", "E": 123456789, "s": "BTCUSDT", "a": 5933014, "p": "0.001", "q": "100", "f": 100, "l": 105,
    "T": 123456785, "m": True,
}
BOOK: dict[str, Any] = {
    "e": "bookTicker", "u": 400900217, "E": 1568014460893, "T": 1568014460891, "s": "BNBUSDT", "b": "25.35190000",
    "B": "31.21000000", "a": "25.36520000", "A": "40.66000000",
}
KLINE: dict[str, Any] = {
    "e": "kline", "E": 1638747660000, "s": "BTCUSDT",
    "k": {
        "t": 1638747660000, "T": 1638747719999, "s": "BTCUSDT", "i": "1m", "f": 100, "L": 200, "o": "0.0010",
        "c": "0.0020", "h": "0.0025", "l": "0.0015", "v": "1000", "n": 100, "x": False, "q": "1.0000",
        "V": "500", "Q": "0.500", "B": "123456",
    },
}


@pytest.mark.parametrize("data", [AGG, BOOK, KLINE], ids=["aggTrade", "bookTicker", "kline"])
def test_documented_frames(data: dict[str, Any]) -> None:
    tick = parse_frame(frame(data), TS_RECV)
    assert tick == expected_tick(data, TS_RECV)
    assert isinstance(tick, dict) and set(tick) == fields_of(tick["channel"])


def test_events_not_carried_replies_and_shutdown() -> None:
    trade = {"e": "trade", "E": 1, "s": "BTCUSDT", "t": 1, "p": "1", "q": "1", "T": 1, "m": True}
    assert parse_frame(frame(trade), TS_RECV) is None  # no such stream here: never a tick
    assert parse_frame(frame({"e": "forceOrder", "E": 1}), TS_RECV) is None
    assert parse_frame(b'{"stream":"!markPrice@arr@1s","data":[{"e":"markPriceUpdate"}]}', TS_RECV) is None
    assert parse_frame(b'{"result":null,"id":7}', TS_RECV) == Reply(id=7)
    err = {"code": 2, "msg": "Invalid request: unknown variable"}
    assert parse_frame(orjson.dumps({"error": err, "id": 8}), TS_RECV) == Reply(id=8, error=err)
    assert parse_frame(frame({"e": "serverShutdown", "E": 1700000000123}), TS_RECV) == ServerShutdown(
        1700000000123 * 1000
    )


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


#: what no tick may hold, by the kind it is refused as
REFUSED = {
    **{f"markPrice without {k}": (frame(without(MARK, k)), "malformed") for k in ("E", "s", "p", "i", "P", "r", "T")},
    "a float funding rate": (frame({**MARK, "r": 0.0001}), "malformed"),
    "a null funding rate": (frame({**MARK, "r": None}), "malformed"),
    "an exponent funding rate": (frame({**MARK, "r": "1e-4"}), "bad_number"),
    "a NaN funding rate": (frame({**MARK, "r": "NaN"}), "bad_number"),
    "a plus-signed funding rate": (frame({**MARK, "r": "+0.0001"}), "bad_number"),
    "a funding rate of 100k digits": (frame({**MARK, "r": "1" * 100_000}), "bad_number"),
    "a zero mark price": (frame({**MARK, "p": "0.00000000"}), "bad_value"),
    "a negative mark price": (frame({**MARK, "p": "-1"}), "bad_value"),
    "a negative index price": (frame({**MARK, "i": "-0.5"}), "bad_value"),
    "a float settle price": (frame({**MARK, "P": 1.5}), "malformed"),
    "a string next funding time": (frame({**MARK, "T": "1562306400000"}), "malformed"),
    "a negative event time": (frame({**MARK, "E": -1}), "bad_value"),
    "an event time whose microseconds overflow int64": (frame({**MARK, "E": (1 << 63) // 1000 + 1}), "bad_number"),
    "a bookTicker without E": (frame(without(BOOK, "E")), "malformed"),
    "a bookTicker with a zero bid": (frame({**BOOK, "b": "0"}), "bad_value"),
    "a kline of 1s (spot only)": (frame({**KLINE, "k": {**KLINE["k"], "i": "1s"}}), "malformed"),
    "a kline of 2m": (frame({**KLINE, "k": {**KLINE["k"], "i": "2m"}}), "malformed"),
    "an aggTrade id beyond int64": (frame({**AGG, "a": 1 << 63}), "bad_number"),
    "an aggTrade with a float price": (frame({**AGG, "p": 0.001}), "malformed"),
    "invalid UTF-8": (frame(MARK).replace(b"BTCUSDT", b"BTC\xff\xfeUSDT"), "invalid_utf8"),
    "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
    "a NaN literal": (frame(MARK).replace(b'"11794.15000000"', b"NaN"), "bad_number"),
    "a symbol with a colon": (frame({**MARK, "s": "BTC:USDT"}), "malformed"),
    "not JSON": (b'{"e":"markPriceUpdate",', "malformed"),
    "a list": (b"[1,2,3]", "malformed"),
}


@pytest.mark.parametrize(("raw", "kind"), REFUSED.values(), ids=REFUSED.keys())
def test_values_no_tick_may_hold_are_refused_by_kind(raw: bytes, kind: str) -> None:
    with pytest.raises(MalformedFrame) as refused:
        parse_frame(raw, TS_RECV)
    assert refused.value.kind == kind and kind in PARSE_REFUSALS


# -- channels, stream names, routes, messages ------------------------------------------------------------------------

STREAMS = [
    ("BTCUSDT", "agg_trade", "btcusdt@aggTrade", "market"),
    ("BTCUSDT", "mark_price", "btcusdt@markPrice@1s", "market"),
    ("ETHUSDT", "kline_1m", "ethusdt@kline_1m", "market"),
    ("ETHUSDT", "kline_1M", "ethusdt@kline_1M", "market"),
    ("BNBUSDT", "book_ticker", "bnbusdt@bookTicker", "public"),
    ("BTCUSDT_240628", "depth", "btcusdt_240628@depth@100ms", "public"),
]


@pytest.mark.parametrize(("symbol", "channel", "stream", "route"), STREAMS, ids=[s[1] for s in STREAMS])
def test_stream_names_round_trip_on_their_route(symbol: str, channel: str, stream: str, route: str) -> None:
    assert channel_to_stream(symbol, channel) == stream and stream_to_channel(stream) == (symbol, channel)
    assert channel_route(channel) == route
    own, other = (BINANCE_USDM_MARKET, BINANCE_USDM_PUBLIC) if route == "market" else (
        BINANCE_USDM_PUBLIC, BINANCE_USDM_MARKET)
    assert own.stream_name(symbol, channel) == stream and own.split_stream(stream) == (symbol, channel)
    assert BINANCE_USDM_ALL.stream_name(symbol, channel) == stream
    # asked on the other route, Binance would acknowledge it and never deliver: refused here instead
    with pytest.raises(UnsupportedChannel, match=f"/{route} route"):
        other.stream_name(symbol, channel)
    with pytest.raises(ValueError, match=f"/{route} route"):
        other.split_stream(stream)


@pytest.mark.parametrize("venue", [BINANCE_USDM_MARKET, BINANCE_USDM_PUBLIC, BINANCE_USDM_ALL], ids=repr)
def test_the_trade_channel_is_refused_with_a_clear_error(venue: BinanceUsdm) -> None:
    calls: list[Callable[[], str]] = [
        lambda: check_channel("trade"), lambda: channel_to_stream("BTCUSDT", "trade"),
        lambda: venue.stream_name("BTCUSDT", "trade"),
    ]
    for call in calls:
        with pytest.raises(UnsupportedChannel, match="no raw trade stream; use agg_trade") as refused:
            call()
        assert isinstance(refused.value, ConfigError)  # one line, exit status 2, where settings are checked
    with pytest.raises(ValueError, match="not a stream binance_usdm carries"):
        venue.split_stream("btcusdt@trade")


@pytest.mark.parametrize("channel", ["kline_1s", "kline_2m", "ticker", "depth@100ms", "", "agg_trades"])
def test_channels_usdm_does_not_have_are_refused(channel: str) -> None:
    with pytest.raises(UnsupportedChannel, match="binance_usdm"):
        check_channel(channel)


@pytest.mark.parametrize("stream", ["btcusdt@trade", "btcusdt@depth", "btcusdt@depth@500ms", "btcusdt@markPrice",
                                    "btcusdt@kline_1s", "btcusdt@ticker", "@aggTrade", "btcusdt", "!markPrice@arr"])
def test_streams_not_carried_are_refused(stream: str) -> None:
    with pytest.raises(ValueError, match="not a stream"):
        stream_to_channel(stream)
    with pytest.raises(ValueError):
        BINANCE_USDM_ALL.split_stream(stream)


def test_streams_split_by_route_in_order() -> None:
    streams = ["btcusdt@aggTrade", "btcusdt@bookTicker", "ethusdt@markPrice@1s", "btcusdt@depth@100ms",
               "ethusdt@kline_5m"]
    assert split_by_route(streams) == {
        "market": ["btcusdt@aggTrade", "ethusdt@markPrice@1s", "ethusdt@kline_5m"],
        "public": ["btcusdt@bookTicker", "btcusdt@depth@100ms"],
    }
    assert split_by_route([]) == {}
    with pytest.raises(ValueError):
        split_by_route(["btcusdt@trade"])


def test_the_venue_and_its_messages() -> None:
    venues: list[Venue] = [BINANCE_USDM_MARKET, BINANCE_USDM_PUBLIC, BINANCE_USDM_ALL]
    assert [(v.name, v.ws_path, v.heartbeat) for v in venues] == [
        ("binance_usdm", "/market/stream", Heartbeat.WS_PING),
        ("binance_usdm", "/public/stream", Heartbeat.WS_PING),
        ("binance_usdm", "/stream", Heartbeat.WS_PING),
    ]
    got = BINANCE_USDM_MARKET.subscribe_requests(
        ["btcusdt@aggTrade", "btcusdt@markPrice@1s", "ethusdt@kline_1m"], 7, 2
    )
    assert got == [
        VenueRequest(7, ["btcusdt@aggTrade", "btcusdt@markPrice@1s"],
                     '{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","btcusdt@markPrice@1s"],"id":7}'),
        VenueRequest(8, ["ethusdt@kline_1m"], '{"method":"SUBSCRIBE","params":["ethusdt@kline_1m"],"id":8}'),
    ]
    assert BINANCE_USDM_PUBLIC.unsubscribe_requests(["btcusdt@bookTicker"], 3, 200) == [
        VenueRequest(3, ["btcusdt@bookTicker"], '{"method":"UNSUBSCRIBE","params":["btcusdt@bookTicker"],"id":3}')
    ]
    assert BINANCE_USDM_MARKET.subscribe_requests([], 1, 200) == []
    with pytest.raises(ConfigError, match="unknown binance_usdm route 'spot'"):
        BinanceUsdm("spot")  # type: ignore[arg-type]


# -- REST ------------------------------------------------------------------------------------------------------------


def test_gap_repair_asks_fapi_agg_trades() -> None:
    for venue in (BINANCE_USDM_MARKET, BINANCE_USDM_ALL):
        assert venue.backfill_call("agg_trade", "BTCUSDT", 5933014, 1000) == RestCall(
            "/fapi/v1/aggTrades", {"symbol": "BTCUSDT", "fromId": 5933014, "limit": 1000}
        )
    # at most 1000 rows a call: Binance refuses a larger limit
    assert BINANCE_USDM_MARKET.backfill_call("agg_trade", "ETHUSDT", 0, 5000) == RestCall(
        "/fapi/v1/aggTrades", {"symbol": "ETHUSDT", "fromId": 0, "limit": 1000}
    )
    for channel in ("trade", "book_ticker", "mark_price", "kline_1m", "depth"):
        assert BINANCE_USDM_MARKET.backfill_call(channel, "BTCUSDT", 1, 1000) is None


@pytest.mark.parametrize(("asked", "sent"), [(1, 5), (5, 5), (20, 20), (100, 100), (101, 500), (1000, 1000),
                                             (5000, 1000)])
def test_snapshots_ask_fapi_depth_with_a_limit_it_takes(asked: int, sent: int) -> None:
    assert BINANCE_USDM_PUBLIC.snapshot_call("BTCUSDT", asked) == RestCall(
        "/fapi/v1/depth", {"symbol": "BTCUSDT", "limit": sent}
    )


def test_fapi_agg_trade_rows_make_the_same_ticks_as_the_live_frames() -> None:
    """``/fapi/v1/aggTrades`` rows have the stream's fields without ``e``, ``E`` and ``s``: the project's REST
    converter turns them into exactly the live parser's ticks, so a repair fills a hole with ticks of the same shape."""
    live: dict[str, list[Any]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for _, raw in load(COINM):
        data = orjson.loads(raw)["data"]
        if data["e"] == "aggTrade":
            live.setdefault(data["s"], []).append(parse_frame(raw, TS_RECV))
            rows.setdefault(data["s"], []).append({k: data[k] for k in ("a", "p", "q", "f", "l", "T", "m")})
    assert sum(map(len, rows.values())) == README_COUNTS["aggTrade"]
    for symbol, page in rows.items():
        fetched = agg_trades_to_ticks(page, VENUE, symbol, TS_RECV)
        assert fetched == live[symbol], symbol
        check_page(fetched, page[0]["a"], 1000)
        check_against(fetched, live[symbol])


# -- errors ----------------------------------------------------------------------------------------------------------

VERDICTS = {
    "429 with Retry-After": ((429, b'{"code":-1003,"msg":"Too many requests."}', "7"),
                             RestVerdict("rate_limit", True, 7.0, -1003, "Too many requests.")),
    "-1003 on another status": ((400, b'{"code":-1003,"msg":"Too much request weight used"}', None),
                                RestVerdict("rate_limit", True, None, -1003, "Too much request weight used")),
    "418 banned": ((418, b"", "120"), RestVerdict("banned", True, 120.0)),
    "-1121 invalid symbol": ((400, b'{"code":-1121,"msg":"Invalid symbol."}', None),
                             RestVerdict("invalid_symbol", False, None, -1121, "Invalid symbol.")),
    "403 WAF": ((403, b"<html>blocked</html>", None), RestVerdict("waf_blocked", False)),
    "408 timeout": ((408, b"", "1"), RestVerdict("timeout", True, 1.0)),
    "503 venue side": ((503, b'{"code":-1001,"msg":"Internal error"}', None),
                       RestVerdict("unavailable", True, None, -1001, "Internal error")),
    "a venue-side code on a 4xx": ((400, b'{"code":-1007,"msg":"Timeout"}', None),
                                   RestVerdict("unavailable", True, None, -1007, "Timeout")),
    "a bad parameter": ((400, b'{"code":-1130,"msg":"Invalid data sent for a parameter."}', None),
                        RestVerdict("bad_request", False, None, -1130, "Invalid data sent for a parameter.")),
    "a 404 without JSON": ((404, b"Not Found", None), RestVerdict("bad_request", False)),
    "a code of the wrong type": ((400, b'{"code":"-1121","msg":5}', None), RestVerdict("bad_request", False)),
    "a redirect": ((302, b"", None), RestVerdict("refused", False)),
    "a garbage Retry-After": ((429, b"[]", "soon"), RestVerdict("rate_limit", True)),
}


@pytest.mark.parametrize(("answer", "verdict"), VERDICTS.values(), ids=VERDICTS.keys())
def test_rest_errors_are_classified(answer: tuple[int, bytes, str | None], verdict: RestVerdict) -> None:
    got = classify_rest_error(*answer)
    assert got == verdict and got.kind in REST_ERROR_KINDS


def test_subscribe_refusals_are_classified() -> None:
    assert classify_reply_error({"code": 2, "msg": "Invalid request: unknown variable"}) == RestVerdict(
        "bad_request", False, None, 2, "Invalid request: unknown variable"
    )
    assert classify_reply_error({"code": -1003, "msg": "slow down"}) == RestVerdict(
        "rate_limit", True, None, -1003, "slow down"
    )
    assert classify_reply_error("nope") == RestVerdict("bad_request", False, None, None, "nope")


# -- the real session on the in-memory connector ---------------------------------------------------------------------

WAIT = 5.0
SETTINGS = SessionSettings(backoff_base=0.001, backoff_cap=0.002, requests_per_s=1000.0, healthy_after=0.0)


def answer_ok(message: str) -> list[bytes]:
    return [orjson.dumps({"result": None, "id": orjson.loads(message)["id"]})]


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.001)  # poll
    except TimeoutError:
        raise AssertionError(f"timed out after {WAIT} s waiting for: {what}") from None


async def session_reads(venue: BinanceUsdm, streams: list[str], frames: list[bytes], n: int) -> tuple[
        VenueSession, list[str], str, list[Tick]]:
    """A session on ``venue`` subscribes ``streams``, reads ``frames`` in one read: the session, what it sent,
    the URL it connected to and the first ``n`` ticks it stored."""
    connector = MemoryConnector(answer_ok)
    ingress: IngressQueue[Tick] = IngressQueue(1000, Policy.BLOCK)
    session = VenueSession(
        ws_base="wss://fstream.binance.com", streams=streams, ingress=ingress, sequencer=Sequencer(),
        ingest_latency=LatencyHistogram(), settings=SETTINGS, connector=connector, venue=venue,
    )
    task = asyncio.create_task(session.run())
    try:
        link = await connector.link(0)
        await until(lambda: session.state is SessionState.LIVE, "the session live")
        link.feed(frames, ts=TS_RECV)
        out: list[Tick] = []
        async with asyncio.timeout(WAIT):
            while len(out) < n:
                out += await ingress.get_batch(n - len(out))
        await until(lambda: session.frames == len(frames) + 1, "every frame read")  # and the subscribe reply
        return session, list(link.sent), link.url, out
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_session_on_the_market_route_subscribes_and_stores_usdm_ticks() -> None:
    streams = ["btcusdt@aggTrade", "btcusdt@markPrice@1s", "btcusdt@kline_1m"]
    frames = [frame(AGG, streams[0]), mark_at(1000), mark_at(2000), mark_at(2000),
              frame({**KLINE, "s": "BTCUSDT"}, streams[2]), frame({**BOOK, "s": "BTCUSDT"}, "btcusdt@bookTicker")]
    session, sent, url, ticks = await session_reads(BINANCE_USDM_MARKET, streams, frames, 4)
    assert url == "wss://fstream.binance.com/market/stream"
    assert sent == ['{"method":"SUBSCRIBE","params":["btcusdt@aggTrade","btcusdt@markPrice@1s","btcusdt@kline_1m"],'
                    '"id":1}']
    assert [(t["venue"], t["channel"], t["seq"]) for t in ticks] == [
        (VENUE, "agg_trade", 5933014), (VENUE, "mark_price", 1000), (VENUE, "mark_price", 2000),
        (VENUE, "kline_1m", 1638747660000),
    ]
    # the repeated mark price dropped; the book ticker not subscribed here refused, never stored
    assert (session.rejected, session.malformed) == (1, 0)
    assert session.pipeline.refused == {"unsubscribed": 1}


async def test_a_session_on_the_public_route_carries_book_tickers_and_takes_depth_without_complaint() -> None:
    streams = ["bnbusdt@bookTicker", "bnbusdt@depth@100ms"]
    depth = {"e": "depthUpdate", "E": 1, "T": 1, "s": "BNBUSDT", "U": 157, "u": 160, "pu": 149,
             "b": [["0.0024", "10"]], "a": []}
    frames = [frame(depth, streams[1]), frame(BOOK, streams[0]), frame(depth, streams[1])]
    session, sent, url, ticks = await session_reads(BINANCE_USDM_PUBLIC, streams, frames, 1)
    assert url == "wss://fstream.binance.com/public/stream"
    assert sent == ['{"method":"SUBSCRIBE","params":["bnbusdt@bookTicker","bnbusdt@depth@100ms"],"id":1}']
    assert ticks == [expected_tick(BOOK, TS_RECV)]
    assert (session.unsupported, session.malformed, session.pipeline.refused) == (2, 0, {})
