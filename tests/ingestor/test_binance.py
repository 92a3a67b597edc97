"""ingestor.binance: real venue captures and hand-made frames, checked field by field.

Expectations are derived here from the raw frame (Binance's documented field names),
never by calling the parser, so a parser mistake cannot hide in its own output.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.core.tick import BASE_FIELDS, channel_fields, decode_tick, encode_tick
from ingestor.binance import (
    PARSE_REFUSALS,
    MalformedFrame,
    Reply,
    ServerShutdown,
    channel_to_stream,
    parse_frame,
    parse_frame_depth,
    stream_to_channel,
)
from ingestor.depth import DepthDiff

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPOT = FIXTURES / "binance-spot-2021-10-12.jsonl"
COINM = FIXTURES / "binance-coinm-2021-07-22.jsonl"

# The event counts published in the fixtures' README table.
README_COUNTS = {
    SPOT.name: {"total": 265, "depthUpdate": 177, "aggTrade": 2, "kline": 2},
    COINM.name: {"total": 4371, "bookTicker": 2240, "depthUpdate": 2047, "aggTrade": 51, "kline": 33},
}


def load(path: Path) -> list[tuple[int, str]]:
    """``(ts_recv in µs, raw frame text)`` for every line of a capture."""
    out = []
    for line in path.read_text().splitlines():
        rec = orjson.loads(line)
        out.append((int(rec["recv_ts"] * 1e6), rec["frame"]))
    return out


def expected_tick(data: dict[str, Any], ts_recv: int) -> dict[str, Any] | None:
    """The tick the contract asks for, from Binance's documented field names."""
    e = data.get("e")
    base = {"v": 1, "venue": "binance", "symbol": data.get("s"), "ts_recv": ts_recv}
    if e in ("trade", "aggTrade"):
        ident = data["t"] if e == "trade" else data["a"]
        tick = {
            **base,
            "channel": "trade" if e == "trade" else "agg_trade",
            "seq": ident,
            "ts_event": data["T"] * 1000,
            "trade_id": ident,
            "price": data["p"],
            "qty": data["q"],
            "side": "sell" if data["m"] else "buy",
        }
        if e == "aggTrade":
            tick["first_trade_id"] = data["f"]
            tick["last_trade_id"] = data["l"]
        return tick
    if e == "bookTicker" or (e is None and "u" in data):
        return {
            **base,
            "channel": "book_ticker",
            "seq": data["u"],
            "ts_event": data["E"] * 1000 if "E" in data else ts_recv,
            "bid_px": data["b"],
            "bid_qty": data["B"],
            "ask_px": data["a"],
            "ask_qty": data["A"],
            "update_id": data["u"],
        }
    if e == "kline":
        k = data["k"]
        return {
            **base,
            "channel": "kline_" + k["i"],
            "seq": data["E"],
            "ts_event": data["E"] * 1000,
            "open_time": k["t"] * 1000,
            "close_time": k["T"] * 1000,
            "open": k["o"],
            "high": k["h"],
            "low": k["l"],
            "close": k["c"],
            "volume": k["v"],
            "quote_volume": k["q"],
            "trades": k["n"],
            "closed": k["x"],
        }
    return None


def event_name(data: dict[str, Any]) -> str:
    # Spot bookTicker frames carry no "e"; every other event in the captures names itself.
    return str(data.get("e", "bookTicker"))


# -- real captures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SPOT, COINM], ids=lambda p: p.name)
def test_every_captured_frame_parses_field_by_field(path: Path) -> None:
    frames = load(path)
    assert frames, f"{path} holds no frames"
    for n, (ts_recv, raw) in enumerate(frames, 1):
        wrapper = orjson.loads(raw)
        data = wrapper["data"]
        tick = parse_frame(raw, ts_recv)
        want = expected_tick(data, ts_recv)
        where = f"{path.name} line {n}: {raw[:120]}"
        if want is None:
            assert data["e"] == "depthUpdate", where
            assert tick is None, where
            continue
        assert isinstance(tick, dict), where
        assert tick == want, where
        # Exactly the contract's fields, in the contract's types: no float anywhere.
        assert set(tick) == {*BASE_FIELDS, *channel_fields(tick["channel"])}, where
        assert not any(isinstance(v, float) for v in tick.values()), where
        # The stream the frame came in on names the tick's symbol and channel.
        assert stream_to_channel(wrapper["stream"]) == (tick["symbol"], tick["channel"]), where
        # Bytes also parse (the WebSocket library may hand either).
        assert parse_frame(raw.encode(), ts_recv) == tick, where


@pytest.mark.parametrize("path", [SPOT, COINM], ids=lambda p: p.name)
def test_capture_event_counts_match_the_readme(path: Path) -> None:
    counts: Counter[str] = Counter()
    frames = load(path)
    for ts_recv, raw in frames:
        tick = parse_frame(raw, ts_recv)
        if tick is None:
            counts["depthUpdate"] += 1
            continue
        assert isinstance(tick, dict)
        channel = tick["channel"]
        counts["kline" if channel.startswith("kline_") else channel] += 1
    readme = README_COUNTS[path.name]
    assert len(frames) == readme["total"]
    book_ticker = readme.get(
        "bookTicker", readme["total"] - readme["depthUpdate"] - readme["aggTrade"] - readme["kline"]
    )
    assert counts == {
        "depthUpdate": readme["depthUpdate"],
        "agg_trade": readme["aggTrade"],
        "kline": readme["kline"],
        "book_ticker": book_ticker,
    }
    # The parser's classification agrees with the frames' own event names.
    raw_counts = Counter(event_name(orjson.loads(raw)["data"]) for _, raw in frames)
    assert raw_counts == {
        "depthUpdate": counts["depthUpdate"],
        "aggTrade": counts["agg_trade"],
        "kline": counts["kline"],
        "bookTicker": counts["book_ticker"],
    }


# -- hand-made frames -----------------------------------------------------------------------------------

TRADE: dict[str, Any] = {
    "e": "trade", "E": 1672515782136, "s": "BNBBTC", "t": 12345, "p": "0.001", "q": "100",
    "b": 88, "a": 50, "T": 1672515782134, "m": True, "M": True,
}
AGG: dict[str, Any] = {
    "e": "aggTrade", "E": 1672515782136, "s": "BNBBTC", "a": 12345, "p": "0.001", "q": "100",
    "f": 100, "l": 105, "T": 1672515782134, "m": False, "M": True,
}
BOOK_SPOT: dict[str, Any] = {"u": 400900217, "s": "BNBUSDT", "b": "25.35190000", "B": "31.21000000", "a": "25.36520000",
             "A": "40.66000000"}
BOOK_FUTURES: dict[str, Any] = {**BOOK_SPOT, "e": "bookTicker", "E": 1568014460893, "T": 1568014460891, "ps": "BNBUSD"}
KLINE: dict[str, Any] = {
    "e": "kline", "E": 1672515782136, "s": "BNBBTC",
    "k": {
        "t": 1672515780000, "T": 1672515839999, "s": "BNBBTC", "i": "1m", "f": 100, "L": 200,
        "o": "0.0010", "c": "0.0020", "h": "0.0025", "l": "0.0015", "v": "1000", "n": 100,
        "x": False, "q": "1.0000", "V": "500", "Q": "0.500", "B": "123456",
    },
}
TS_RECV = 1_700_000_000_123_456


def frame(data: dict[str, Any], stream: str | None = None) -> bytes:
    return orjson.dumps(data if stream is None else {"stream": stream, "data": data})


@pytest.mark.parametrize("data", [TRADE, AGG, BOOK_SPOT, BOOK_FUTURES, KLINE],
                         ids=["trade", "aggTrade", "bookTicker-spot", "bookTicker-futures", "kline"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["raw", "combined"])
def test_documented_frames(data: dict[str, Any], wrapped: bool) -> None:
    tick = parse_frame(frame(data, "bnbbtc@x" if wrapped else None), TS_RECV)
    assert tick == expected_tick(data, TS_RECV)


def test_trade_side_is_the_takers() -> None:
    # m: the buyer is the maker, so the taker sold.
    buy = parse_frame(frame({**TRADE, "m": False}), TS_RECV)
    sell = parse_frame(frame({**TRADE, "m": True}), TS_RECV)
    assert isinstance(buy, dict) and isinstance(sell, dict)
    assert (buy["side"], sell["side"]) == ("buy", "sell")  # type: ignore[typeddict-item]


def test_spot_book_ticker_takes_receive_time_futures_takes_event_time() -> None:
    spot = parse_frame(frame(BOOK_SPOT), TS_RECV)
    fut = parse_frame(frame(BOOK_FUTURES), TS_RECV)
    assert isinstance(spot, dict) and isinstance(fut, dict)
    assert spot["ts_event"] == TS_RECV
    assert fut["ts_event"] == BOOK_FUTURES["E"] * 1000


def test_closed_kline() -> None:
    tick = parse_frame(frame({**KLINE, "k": {**KLINE["k"], "x": True, "i": "1h"}}), TS_RECV)
    assert isinstance(tick, dict)
    assert tick["channel"] == "kline_1h"
    assert tick["closed"] is True  # type: ignore[typeddict-item]


def test_depth_update_is_not_carried() -> None:
    depth = {"e": "depthUpdate", "E": 1, "s": "BNBBTC", "U": 157, "u": 160, "b": [["0.0024", "10"]], "a": []}
    assert parse_frame(frame(depth, "bnbbtc@depth"), TS_RECV) is None


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


MALFORMED = {
    "not JSON": b"{not json",
    "truncated": frame(TRADE)[:-5],
    "a list": b"[1, 2, 3]",
    "a string": b'"trade"',
    "empty": b"",
    "trade without p": frame(without(TRADE, "p")),
    "trade without m": frame(without(TRADE, "m")),
    "trade without T": frame(without(TRADE, "T")),
    "trade without s": frame(without(TRADE, "s")),
    "aggTrade without f": frame(without(AGG, "f")),
    "bookTicker without A": frame(without(BOOK_SPOT, "A")),
    "kline without k": frame(without(KLINE, "k")),
    "kline without k.x": frame({**KLINE, "k": without(KLINE["k"], "x")}),
    "kline k not an object": frame({**KLINE, "k": [1, 2]}),
    "string trade id": frame({**TRADE, "t": "12345"}),
    "string update id": frame({**BOOK_SPOT, "u": "400900217"}),
    "negative trade id": frame({**TRADE, "t": -1}),
    "negative agg id": frame({**AGG, "a": -5}),
    "boolean trade id": frame({**TRADE, "t": True}),
    "float trade id": frame({**TRADE, "t": 12345.0}),
    "float price": frame({**TRADE, "p": 0.001}),
    "float qty": frame({**AGG, "q": 100.0}),
    "float bid": frame({**BOOK_SPOT, "b": 25.3519}),
    "float kline close": frame({**KLINE, "k": {**KLINE["k"], "c": 0.002}}),
    "integer price": frame({**TRADE, "p": 1}),
    "null price": frame({**TRADE, "p": None}),
    "wrapped, data missing a field": frame(without(TRADE, "q"), "bnbbtc@trade"),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_raise(raw: bytes) -> None:
    with pytest.raises(MalformedFrame):
        parse_frame(raw, TS_RECV)


def test_malformed_frame_is_a_value_error() -> None:
    assert issubclass(MalformedFrame, ValueError)


#: what no tick may hold, by the kind it is refused as
REFUSED = {
    "invalid UTF-8": (frame(TRADE).replace(b"BNBBTC", b"BNB\xff\xfeBTC"), "invalid_utf8"),
    "a lone surrogate": (frame(TRADE).replace(b"BNBBTC", b"BNB\xed\xa0\x80BTC"), "invalid_utf8"),
    "nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
    "a NaN literal": (frame(TRADE).replace(b'"0.001"', b"NaN"), "bad_number"),
    "an Infinity literal": (frame(TRADE).replace(b'"0.001"', b"-Infinity"), "bad_number"),
    "a number beyond a double": (frame(TRADE).replace(b"12345", b"9" * 100_000), "bad_number"),
    "an id beyond 64 bits": (frame(TRADE).replace(b"12345", str(1 << 64).encode()), "bad_number"),
    "an id beyond int64": (frame({**TRADE, "t": 1 << 63}), "bad_number"),
    "a time whose microseconds overflow int64": (frame({**TRADE, "T": (1 << 63) // 1000 + 1}), "bad_number"),
    "a price of 100k digits": (frame({**TRADE, "p": "1" * 100_000}), "bad_number"),
    "a quantity of 19 fraction digits": (frame({**TRADE, "q": "0." + "1" * 19}), "bad_number"),
    "a NaN string": (frame({**TRADE, "p": "NaN"}), "bad_number"),
    "an Infinity string": (frame({**AGG, "q": "Infinity"}), "bad_number"),
    "an exponent": (frame({**TRADE, "p": "1e-5"}), "bad_number"),
    "a space": (frame({**TRADE, "p": " 1.5"}), "bad_number"),
    "an underscore": (frame({**TRADE, "p": "1_000"}), "bad_number"),
    "an Arabic digit": (frame({**TRADE, "p": "\u0661"}), "bad_number"),
    "a zero price": (frame({**TRADE, "p": "0.00000000"}), "bad_value"),
    "a negative quantity": (frame({**TRADE, "q": "-1.5"}), "bad_value"),
    "a zero bid": (frame({**BOOK_SPOT, "b": "0"}), "bad_value"),
    "a negative ask quantity": (frame({**BOOK_FUTURES, "A": "-0.1"}), "bad_value"),
    "a zero kline close": (frame({**KLINE, "k": {**KLINE["k"], "c": "0.0"}}), "bad_value"),
    "a negative kline volume": (frame({**KLINE, "k": {**KLINE["k"], "v": "-1"}}), "bad_value"),
    "a negative id": (frame({**TRADE, "t": -1}), "bad_value"),
    "not JSON": (b'{"e":"trade",', "malformed"),
    "a missing field": (frame(without(TRADE, "q")), "malformed"),
}


@pytest.mark.parametrize(("raw", "kind"), REFUSED.values(), ids=REFUSED.keys())
def test_values_no_tick_may_hold_are_refused_by_kind(raw: bytes, kind: str) -> None:
    with pytest.raises(MalformedFrame) as refused:
        parse_frame(raw, TS_RECV)
    assert refused.value.kind == kind and kind in PARSE_REFUSALS


def test_a_kline_of_no_trades_has_zero_volumes() -> None:
    tick = parse_frame(frame({**KLINE, "k": {**KLINE["k"], "v": "0.00000000", "q": "0"}}), TS_RECV)
    assert isinstance(tick, dict) and (tick["volume"], tick["quote_volume"]) == ("0.00000000", "0")  # type: ignore[typeddict-item]


def test_replies() -> None:
    assert parse_frame(b'{"result":null,"id":1}', TS_RECV) == Reply(id=1, result=None, error=None)
    listed = parse_frame(b'{"result":["btcusdt@trade"],"id":3}', TS_RECV)
    assert listed == Reply(id=3, result=["btcusdt@trade"])
    err = parse_frame(b'{"error":{"code":2,"msg":"x"},"id":2}', TS_RECV)
    assert err == Reply(id=2, result=None, error={"code": 2, "msg": "x"})


def test_server_shutdown() -> None:
    got = parse_frame(frame({"e": "serverShutdown", "E": 1700000000123}), TS_RECV)
    assert got == ServerShutdown(1700000000123 * 1000)
    wrapped = parse_frame(frame({"e": "serverShutdown", "E": 1700000000123}, "!serverShutdown"), TS_RECV)
    assert wrapped == got


# -- stream names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("symbol", "channel", "stream"),
    [
        ("BTCUSDT", "trade", "btcusdt@trade"),
        ("BTCUSDT", "agg_trade", "btcusdt@aggTrade"),
        ("ETHUSDT", "book_ticker", "ethusdt@bookTicker"),
        ("ETHUSDT", "kline_1m", "ethusdt@kline_1m"),
        ("BTCUSD_PERP", "kline_1h", "btcusd_perp@kline_1h"),
        ("BTCUSDT", "depth", "btcusdt@depth@100ms"),
    ],
)
def test_stream_names_round_trip(symbol: str, channel: str, stream: str) -> None:
    assert channel_to_stream(symbol, channel) == stream
    assert stream_to_channel(stream) == (symbol, channel)


def test_the_depth_stream_at_one_update_a_second() -> None:
    assert channel_to_stream("BTCUSDT", "depth", depth_ms=1000) == "btcusdt@depth"
    assert stream_to_channel("btcusdt@depth") == ("BTCUSDT", "depth")
    with pytest.raises(KeyError):
        channel_to_stream("BTCUSDT", "depth", depth_ms=250)


def test_parse_frame_depth_reads_depth_updates_and_everything_else_as_parse_frame() -> None:
    depth = {"e": "depthUpdate", "E": 1, "s": "BNBBTC", "U": 157, "u": 160, "b": [["0.0024", "10"]], "a": []}
    diff = parse_frame_depth(frame(depth, "bnbbtc@depth@100ms"), TS_RECV)
    assert isinstance(diff, DepthDiff)
    assert (diff.symbol, diff.first_id, diff.last_id, diff.bids, diff.asks) == ("BNBBTC", 157, 160,
                                                                              (("0.0024", "10"),), ())
    assert parse_frame_depth(frame(TRADE), TS_RECV) == parse_frame(frame(TRADE), TS_RECV)
    with pytest.raises(MalformedFrame):
        parse_frame_depth(frame({**depth, "b": [["0.0024", "1e3"]]}), TS_RECV)
    with pytest.raises(MalformedFrame, match=r"^missing or bad field 'p'$"):
        parse_frame_depth(frame(without(TRADE, "p")), TS_RECV)
    with pytest.raises(MalformedFrame, match=r"^missing field 'U'$"):
        parse_frame_depth(frame(without(depth, "U")), TS_RECV)


@pytest.mark.parametrize("stream", ["btcusdt@depth5", "btcusdt@depth@500ms", "btcusdt@ticker", "btcusdt"])
def test_streams_not_carried_are_refused(stream: str) -> None:
    with pytest.raises(ValueError):
        stream_to_channel(stream)


# -- decimal strings stay exact ----------------------------------------------------------------------------

#: what a price or quantity may be: a plain decimal above zero (zero, a sign or an exponent is refused, below)
DECIMALS = st.one_of(
    st.from_regex(r"\A[0-9]{1,20}(\.[0-9]{0,12})?\Z").filter(lambda text: text.strip("0.") != ""),
    st.sampled_from(["0.00012300", "123", "00.10", "5.", "99999999999999999999.99999999",
                     "0.000000000000000001"]),
)

# (frame, the object holding the field (None: the frame itself), the frame's field, the tick's field)
DECIMAL_FIELDS = [
    (TRADE, None, "p", "price"),
    (TRADE, None, "q", "qty"),
    (AGG, None, "p", "price"),
    (AGG, None, "q", "qty"),
    (BOOK_SPOT, None, "b", "bid_px"),
    (BOOK_SPOT, None, "B", "bid_qty"),
    (BOOK_FUTURES, None, "a", "ask_px"),
    (BOOK_FUTURES, None, "A", "ask_qty"),
    *[(KLINE, "k", src, dst) for src, dst in [
        ("o", "open"), ("h", "high"), ("l", "low"), ("c", "close"), ("v", "volume"), ("q", "quote_volume"),
    ]],
]


def no_float(value: Any) -> bool:
    if isinstance(value, float):
        return False
    if isinstance(value, dict):
        return all(no_float(v) for v in value.values())
    if isinstance(value, list):
        return all(no_float(v) for v in value)
    return True


@pytest.mark.parametrize(("data", "nested", "src", "dst"), DECIMAL_FIELDS,
                         ids=[f"{d.get('e', 'bookTicker')}.{s}" for d, _, s, _ in DECIMAL_FIELDS])
@given(text=DECIMALS)
def test_decimal_strings_survive_unchanged(
    data: dict[str, Any], nested: str | None, src: str, dst: str, text: str
) -> None:
    raw = frame({**data, src: text} if nested is None else {**data, nested: {**data[nested], src: text}})
    tick = parse_frame(raw, TS_RECV)
    assert isinstance(tick, dict)
    assert tick[dst] == text  # type: ignore[literal-required]
    encoded = encode_tick(tick)
    assert no_float(orjson.loads(encoded))
    back = decode_tick(encoded)
    assert back == tick
    assert back[dst] == text  # type: ignore[literal-required]
