"""Tests of the Binance-compatible venue simulator: the pure parts fed directly, then a real
websockets client and plain HTTP against a live Simulator on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.protocol import State

import ops.simulator as simulator
from ops.simulator import (
    CaptureError,
    FaultRates,
    Simulator,
    SimulatorConfig,
    SimulatorConfigError,
    SyntheticMarket,
    run_simulator,
)
from ops.simulator.control import ControlCommand, parse_control
from ops.simulator.market import format_decimal, kline_open_time, scheduled_ticks, split_symbol
from ops.simulator.protocol import (
    FaultInjector,
    IncomingRateLimiter,
    StreamCatalog,
    StreamSubscriptions,
    WsTarget,
    parse_request,
    parse_ws_path,
    text_frame,
)
from ops.simulator.replay import capture_symbols, frames_due, load_capture
from ops.simulator.rest import (
    ALL_PATHS,
    RestApi,
    RestFault,
    RestFaults,
    fault_response,
    parse_rest_faults,
    parse_rest_schedule,
)
from ops.simulator.wire import SimulatorBase

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "binance-spot-2021-10-12.jsonl"

UNIT = 1.0  # every timeout below is a multiple of this; raise it on a slow machine
T0 = 1_699_999_980_000  # an epoch millisecond on a whole minute
DECIMAL = re.compile(r"^\d+\.\d{8}$")


# -- helpers --


async def wait_until(condition: Callable[[], bool], timeout: float = 5 * UNIT) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)  # poll


async def recv_json(ws: ClientConnection, timeout: float = 5 * UNIT) -> Any:
    async with asyncio.timeout(timeout):
        return orjson.loads(await ws.recv())


async def recv_reply(ws: ClientConnection, request_id: int) -> Any:
    """Skip stream frames until the reply to ``request_id`` arrives."""
    async with asyncio.timeout(5 * UNIT):
        while True:
            msg = orjson.loads(await ws.recv())
            if isinstance(msg, dict) and msg.get("id") == request_id and ("result" in msg or "error" in msg):
                return msg


async def request(ws: ClientConnection, method: str, params: list[Any] | None, request_id: int) -> Any:
    body: dict[str, Any] = {"method": method, "id": request_id}
    if params is not None:
        body["params"] = params
    await ws.send(orjson.dumps(body).decode())
    return await recv_reply(ws, request_id)


async def http_get_raw(url: str) -> tuple[bytes, bytes]:
    """A plain HTTP/1.1 GET; the response's head (status line and headers) and its body, as they came."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    async with asyncio.timeout(5 * UNIT):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


async def http_get(url: str) -> tuple[int, Any]:
    """A plain HTTP/1.1 GET; returns the status and the decoded JSON body."""
    head, body = await http_get_raw(url)
    status = int(head.split(b" ", 2)[1])
    assert b"application/json" in head.lower()
    return status, orjson.loads(body)


async def collect(ws: ClientConnection, n: int, keep: Callable[[Any], bool] = lambda m: True) -> list[Any]:
    out: list[Any] = []
    async with asyncio.timeout(5 * UNIT):
        while len(out) < n:
            msg = orjson.loads(await ws.recv())
            if keep(msg):
                out.append(msg)
    return out


def is_trade(msg: Any) -> bool:
    return isinstance(msg, dict) and msg.get("e") == "trade"


SimT = TypeVar("SimT", bound=SimulatorBase[Any, Any])


@contextlib.asynccontextmanager
async def running(make: Callable[[SimulatorConfig], SimT], **defaults: Any) -> AsyncIterator[
    Callable[..., Awaitable[SimT]]
]:
    """A factory of running simulators on free ports (``make`` of the config of ``defaults`` and the settings
    given), all closed on leaving."""
    started: list[SimT] = []

    async def start(**settings: Any) -> SimT:
        sim = make(SimulatorConfig(**{**defaults, **settings}))
        await sim.__aenter__()
        started.append(sim)
        return sim

    yield start
    for sim in reversed(started):
        if sim.state == "open":
            await sim.__aexit__(None, None, None)


@pytest.fixture
async def sims() -> AsyncIterator[Callable[..., Awaitable[Simulator]]]:
    """A factory of running simulators on free ports, all closed at the end of the test."""
    async with running(Simulator, rate=2000.0) as start:
        yield start


# -- public API --


def test_public_api_is_pinned() -> None:
    assert sorted(simulator.__all__) == [
        "CaptureError",
        "FaultRates",
        "RestFault",
        "RestFaults",
        "Simulator",
        "SimulatorConfig",
        "SimulatorConfigError",
        "SimulatorError",
        "SimulatorStats",
        "SymbolSpec",
        "SyntheticMarket",
        "run_simulator",
    ]


def test_config_defaults_and_validation() -> None:
    cfg = SimulatorConfig()
    assert (cfg.host, cfg.port, cfg.symbols, cfg.rate, cfg.seed) == ("127.0.0.1", 0, ("BTCUSDT", "ETHUSDT"), 1000.0, 1)
    assert (cfg.ping_interval, cfg.pong_timeout, cfg.max_connection_age) == (20.0, 60.0, 86400.0)
    assert (cfg.max_incoming_per_s, cfg.max_streams_per_connection, cfg.history) == (5, 1024, 200_000)
    assert SimulatorConfig(symbols=("btcusdt",)).symbols == ("BTCUSDT",)
    bad: list[dict[str, Any]] = [
        {"symbols": ()},
        {"symbols": ("BTC-USDT",)},
        {"symbols": ("BTCUSDT", "btcusdt")},
        {"rate": -1},
        {"kline_intervals": ("1M",)},
        {"kline_intervals": ("7m",)},
        {"port": 70000},
        {"fault_duplicate": 1.5},
        {"weights": (1.0,)},
        {"history": 0},
        {"preallocate_history": 1},
        {"burst_every": 1.0, "burst_duration": 2.0},
    ]
    for settings in bad:
        with pytest.raises(SimulatorConfigError):
            SimulatorConfig(**settings)
    with pytest.raises(ValueError):  # a config error is also a ValueError
        SimulatorConfig(rate=float("nan"))


# -- synthetic market --


def test_format_decimal_is_exact() -> None:
    assert format_decimal(0) == "0.00000000"
    assert format_decimal(1) == "0.00000001"
    assert format_decimal(2_712_345_000_000) == "27123.45000000"
    assert format_decimal(10**8 * 123_456_789 + 99) == "123456789.00000099"


def test_symbols_split_into_assets() -> None:
    assert split_symbol("BTCUSDT") == ("BTC", "USDT")
    assert split_symbol("BNBBTC") == ("BNB", "BTC")
    assert split_symbol("ETHFDUSD") == ("ETH", "FDUSD")


def test_generation_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[bytes]:
        market = SyntheticMarket(["BTCUSDT", "ETHUSDT"], seed=seed)
        return [orjson.dumps(e) for i in range(50) for e in market.step(37, T0 + i * 700)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_step_returns_exactly_n_events_split_by_weight() -> None:
    market = SyntheticMarket(["BTCUSDT", "ETHUSDT"], weights=[3.0, 1.0])
    per_symbol = {"BTCUSDT": 0, "ETHUSDT": 0}
    for i, n in enumerate([1, 2, 3, 5, 7, 11, 0, 13, 1000, 1]):
        events = market.step(n, T0 + i)
        assert len(events) == n
        for _, _, payload in events:
            per_symbol[payload["s"]] += 1
    total = sum(per_symbol.values())
    assert abs(per_symbol["BTCUSDT"] - total * 3 / 4) <= 1
    assert market.generated == total == sum(market.counts().values())


def test_ids_are_contiguous_and_agg_trades_cover_their_trades() -> None:
    market = SyntheticMarket(["BTCUSDT", "ETHUSDT"], seed=3)
    events = [e for i in range(200) for e in market.step(50, T0 + 10 * i)]
    for symbol in ("BTCUSDT", "ETHUSDT"):
        mine = [p for _, _, p in events if p.get("s") == symbol]
        trades = [p for p in mine if p.get("e") == "trade"]
        aggs = [p for p in mine if p.get("e") == "aggTrade"]
        books = [p for p in mine if "u" in p]
        assert len(trades) > 100 and len(aggs) > 50 and len(books) > 100
        ids = [t["t"] for t in trades]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert 1_000_000 <= ids[0] < 10_000_000
        assert [a["a"] for a in aggs] == list(range(aggs[0]["a"], aggs[0]["a"] + len(aggs)))
        assert [b["u"] for b in books] == list(range(books[0]["u"], books[0]["u"] + len(books)))
        by_id = {t["t"]: t for t in trades}
        expected_first = aggs[0]["f"]
        for agg in aggs:
            assert agg["f"] == expected_first and agg["l"] >= agg["f"]
            covered = [by_id[i] for i in range(agg["f"], agg["l"] + 1)]
            assert 1 <= len(covered) <= 8
            assert {t["p"] for t in covered} == {agg["p"]}
            assert {t["m"] for t in covered} == {agg["m"]}
            assert sum(int(t["q"].replace(".", "")) for t in covered) == int(agg["q"].replace(".", ""))
            expected_first = agg["l"] + 1
        times = [p.get("E", 0) for p in mine if "E" in p]
        assert times == sorted(times)


def test_payloads_have_binance_field_names_and_types() -> None:
    market = SyntheticMarket(["BTCUSDT"], kline_intervals=("1m", "5m"), kline_update_ms=100)
    events = [e for i in range(100) for e in market.step(20, T0 + 50 * i)]
    kinds = {kind: payload for kind, _, payload in events}
    assert set(kinds) == {"trade", "aggTrade", "bookTicker", "kline"}
    streams = {stream for _, stream, _ in events}
    assert streams == {
        "btcusdt@trade", "btcusdt@aggTrade", "btcusdt@bookTicker", "btcusdt@kline_1m", "btcusdt@kline_5m",
    }  # fmt: skip

    def types(d: dict[str, Any]) -> dict[str, type]:
        return {k: type(v) for k, v in d.items()}

    s, i, b = str, int, bool
    assert types(kinds["trade"]) == {"e": s, "E": i, "s": s, "t": i, "p": s, "q": s, "T": i, "m": b, "M": b}
    assert types(kinds["aggTrade"]) == {
        "e": s, "E": i, "s": s, "a": i, "p": s, "q": s, "f": i, "l": i, "T": i, "m": b, "M": b,
    }  # fmt: skip
    assert types(kinds["bookTicker"]) == {"u": i, "s": s, "b": s, "B": s, "a": s, "A": s}
    kline = kinds["kline"]
    assert types(kline) == {"e": s, "E": i, "s": s, "k": dict}
    assert types(kline["k"]) == {
        "t": i, "T": i, "s": s, "i": s, "f": i, "L": i, "o": s, "c": s, "h": s, "l": s, "v": s, "n": i,
        "x": b, "q": s, "V": s, "Q": s, "B": s,
    }  # fmt: skip
    assert list(kinds["trade"]) == ["e", "E", "s", "t", "p", "q", "T", "m", "M"]
    assert list(kinds["bookTicker"]) == ["u", "s", "b", "B", "a", "A"]
    for payload in (kinds["trade"], kinds["aggTrade"]):
        assert DECIMAL.match(payload["p"]) and DECIMAL.match(payload["q"])
    book = kinds["bookTicker"]
    assert all(DECIMAL.match(book[k]) for k in "bBaA")
    assert int(book["a"].replace(".", "")) > int(book["b"].replace(".", ""))
    k = kline["k"]
    assert all(DECIMAL.match(k[f]) for f in "ochlvqVQ")
    interval_ms = {"1m": 60_000, "5m": 300_000}[k["i"]]
    assert k["t"] % interval_ms == 0 and k["T"] == k["t"] + interval_ms - 1


def test_kline_closes_with_the_trades_of_its_interval() -> None:
    market = SyntheticMarket(["BTCUSDT"], kline_update_ms=1000)
    events = []
    for i in range(250):  # 0.5 s steps across two whole minutes
        events += market.step(40, T0 + 500 * i)
    trades = [p for _, _, p in events if p.get("e") == "trade"]
    closed = [p["k"] for _, _, p in events if p.get("e") == "kline" and p["k"]["x"]]
    assert [k["t"] for k in closed] == [T0, T0 + 60_000]
    open_updates = [p for _, _, p in events if p.get("e") == "kline" and not p["k"]["x"]]
    assert open_updates, "open klines are pushed while the interval runs"
    for k in closed:
        mine = [t for t in trades if k["t"] <= t["T"] <= k["T"]]
        assert k["n"] == len(mine) and k["f"] == mine[0]["t"] and k["L"] == mine[-1]["t"]
        assert k["o"] == mine[0]["p"] and k["c"] == mine[-1]["p"]
        prices = [int(t["p"].replace(".", "")) for t in mine]
        assert int(k["h"].replace(".", "")) == max(prices) and int(k["l"].replace(".", "")) == min(prices)
        assert int(k["v"].replace(".", "")) == sum(int(t["q"].replace(".", "")) for t in mine)
        taker_buys = [t for t in mine if not t["m"]]
        assert int(k["V"].replace(".", "")) == sum(int(t["q"].replace(".", "")) for t in taker_buys)
    # only the last update of an interval is closed
    for p in open_updates:
        assert p["E"] < p["k"]["T"] + 1


def test_kline_open_times_are_aligned() -> None:
    assert kline_open_time(T0 + 59_999, "1m") == T0
    assert kline_open_time(T0 + 61_000, "1m") == T0 + 60_000
    monday = 1_699_833_600_000  # 2023-11-13 00:00 UTC, a Monday
    assert kline_open_time(monday + 3 * 86_400_000, "1w") == monday


def test_schedule_is_exact_and_bursts_multiply_the_rate() -> None:
    assert scheduled_ticks(0.0, 1000) == 0
    assert scheduled_ticks(1.0, 1000) == 1000
    assert scheduled_ticks(2.5, 1000) == 2500
    assert scheduled_ticks(1.0, 0) == 0
    burst = {"burst_every": 10.0, "burst_duration": 2.0, "burst_multiplier": 5.0}
    assert scheduled_ticks(8.0, 100, **burst) == 800
    assert scheduled_ticks(10.0, 100, **burst) == 800 + 2 * 500
    assert scheduled_ticks(20.0, 100, **burst) == 2 * 1800
    counts = [scheduled_ticks(t / 10, 333.3, **burst) for t in range(300)]
    assert counts == sorted(counts)


def test_history_is_bounded_and_answers_by_id_and_time() -> None:
    market = SyntheticMarket(["BTCUSDT"], history=100)
    events = [e for i in range(100) for e in market.step(10, T0 + i)]
    trades = [p for _, _, p in events if p.get("e") == "trade"]
    history = market.history("BTCUSDT")
    oldest, end = history.trade_id_range
    assert end - oldest == 100 and end == trades[-1]["t"] + 1
    assert history.trades(from_id=trades[0]["t"], limit=5)[0][0] == oldest  # older ids are gone
    assert [r[0] for r in history.trades(from_id=None, limit=3)] == [end - 3, end - 2, end - 1]
    mid = trades[-50]
    row = history.trades(from_id=mid["t"], limit=1)[0]
    assert (row[0], format_decimal(row[1]), format_decimal(row[2]), row[3], row[4]) == (
        mid["t"], mid["p"], mid["q"], mid["T"], mid["m"],
    )  # fmt: skip
    aggs = history.agg_trades(start_ms=T0 + 90, end_ms=T0 + 95, limit=1000)
    assert aggs and all(T0 + 90 <= a[5] <= T0 + 95 for a in aggs)
    ids = [a[0] for a in aggs]
    assert ids == list(range(ids[0], ids[0] + len(ids)))


@pytest.mark.parametrize("steps", [5, 10, 37])
def test_a_preallocated_history_answers_as_a_grown_one_and_holds_its_size(steps: int) -> None:
    grown = SyntheticMarket(["BTCUSDT"], history=100)
    full = SyntheticMarket(["BTCUSDT"], history=100, preallocate=True)
    for i in range(steps):
        assert grown.step(10, T0 + i) == full.step(10, T0 + i)
    a, b = grown.history("BTCUSDT"), full.history("BTCUSDT")
    assert (a.trade_id_range, a.agg_id_range) == (b.trade_id_range, b.agg_id_range)
    assert a.trades(from_id=None, limit=1000) == b.trades(from_id=None, limit=1000)
    assert a.agg_trades(limit=1000) == b.agg_trades(limit=1000)
    assert a.agg_trades(start_ms=T0 + 2, end_ms=T0 + 4, limit=1000) == b.agg_trades(
        start_ms=T0 + 2, end_ms=T0 + 4, limit=1000)
    assert all(len(col) == 100 for col in b._trades._cols + b._aggs._cols)  # allocated once, never grown


def test_rest_api_shapes_and_errors() -> None:
    market = SyntheticMarket(["BTCUSDT", "ETHUSDT"])
    for i in range(50):
        market.step(20, T0 + 1000 * i)
    api = RestApi(market, lambda: T0)

    def get(path: str, query: str = "") -> tuple[int, Any]:
        answer = api.handle(path, parse_qs(query, keep_blank_values=True))
        return answer.status, orjson.loads(answer.body)

    assert get("/api/v3/ping") == (200, {}) and get("/api/v3/time") == (200, {"serverTime": T0})
    status, info = get("/api/v3/exchangeInfo")
    assert status == 200
    assert [(s["symbol"], s["status"], s["baseAsset"], s["quoteAsset"]) for s in info["symbols"]] == [
        ("BTCUSDT", "TRADING", "BTC", "USDT"), ("ETHUSDT", "TRADING", "ETH", "USDT"),
    ]  # fmt: skip
    assert get("/api/v3/exchangeInfo", 'symbols=["ETHUSDT"]')[1]["symbols"][0]["symbol"] == "ETHUSDT"
    status, trades = get("/api/v3/trades", "symbol=BTCUSDT&limit=3")
    assert status == 200 and len(trades) == 3
    assert set(trades[0]) == {"id", "price", "qty", "quoteQty", "time", "isBuyerMaker", "isBestMatch"}
    assert [t["id"] for t in trades] == list(range(trades[0]["id"], trades[0]["id"] + 3))
    status, aggs = get("/api/v3/aggTrades", "symbol=BTCUSDT&limit=2")
    assert status == 200 and set(aggs[0]) == {"a", "p", "q", "f", "l", "T", "m", "M"}
    status, klines = get("/api/v3/klines", "symbol=BTCUSDT&interval=1m&limit=1000")
    assert status == 200 and len(klines) == 1 and len(klines[0]) == 12
    assert klines[0][6] == klines[0][0] + 59_999 and klines[0][11] == "0"
    assert get("/api/v3/klines", "symbol=BTCUSDT&interval=5m")[1] == []  # valid, not kept
    assert get("/api/v3/trades", "symbol=NOPE") == (400, {"code": -1121, "msg": "Invalid symbol."})
    assert get("/api/v3/trades")[1]["code"] == -1102
    assert get("/api/v3/trades", "symbol=BTCUSDT&limit=x")[1]["code"] == -1100
    assert get("/api/v3/klines", "symbol=BTCUSDT&interval=7m") == (400, {"code": -1120, "msg": "Invalid interval."})
    assert get("/api/v3/aggTrades", "symbol=BTCUSDT&fromId=1&startTime=1")[1]["code"] == -1128
    assert get("/api/v3/aggTrades", "symbol=BTCUSDT&startTime=0&endTime=3600001")[1]["code"] == -1127
    assert get("/api/v3/nothing")[0] == 404


# -- REST faults --


def test_rest_fault_schedules_are_parsed_from_text() -> None:
    assert parse_rest_schedule("400, 418,429:30,503,close") == (
        RestFault(400), RestFault(418), RestFault(429, 30), RestFault(503), RestFault(None),
    )
    assert parse_rest_schedule("") == ()
    assert parse_rest_faults("historicalTrades=429:2,close; /api/v3/aggTrades=500;*=503") == {
        "/api/v3/historicalTrades": (RestFault(429, 2), RestFault(None)),
        "/api/v3/aggTrades": (RestFault(500),),
        ALL_PATHS: (RestFault(503),),
    }
    assert ",".join(map(str, parse_rest_schedule("429:2,close,503"))) == "429:2,close,503"
    for bad in ("299", "600", "499", "429:-1", "429:x", "teapot", "close:3"):
        with pytest.raises(SimulatorConfigError):
            parse_rest_schedule(bad)
    for bad in ("aggTrades", "a b=503", "=503"):
        with pytest.raises(SimulatorConfigError):
            parse_rest_faults(bad)
    with pytest.raises(SimulatorConfigError, match="no REST endpoint"):
        Simulator(SimulatorConfig(rest_faults="klinez=503"))
    with pytest.raises(SimulatorConfigError):
        SimulatorConfig(rest_faults="aggTrades=42")


def test_rest_faults_are_taken_one_per_request_in_order_then_for_any_path() -> None:
    faults = RestFaults(parse_rest_faults("aggTrades=429:1,close;*=503"))
    agg, trades = "/api/v3/aggTrades", "/api/v3/historicalTrades"
    assert faults.pending() == {agg: "429:1,close", ALL_PATHS: "503"}
    assert [faults.take(agg) for _ in range(4)] == [RestFault(429, 1), RestFault(None), RestFault(503), None]
    assert faults.take(trades) is None  # the schedule for any path was used up by aggTrades
    faults.schedule(trades, [RestFault(400)])
    faults.schedule(trades, [RestFault(418)])  # replaces
    assert faults.take(trades) == RestFault(418) and faults.take(trades) is None
    faults.schedule(agg, [RestFault(500)])
    faults.schedule(agg, [])  # clears
    assert faults.take(agg) is None
    assert faults.state() == {"pending": {}, "requests": {agg: 5, trades: 3}, "injected": {agg: 3, trades: 1}}


def test_fault_answers_carry_binance_error_bodies_and_retry_after() -> None:
    def answer(fault: RestFault) -> tuple[int, Any, dict[str, str]]:
        r = fault_response(fault, T0)
        return r.status, orjson.loads(r.body), dict(r.headers)

    assert answer(RestFault(429, 7)) == (429, {"code": -1003, "msg": answer(RestFault(429))[1]["msg"]},
                                         {"Retry-After": "7"})
    status, body, headers = answer(RestFault(418))
    assert status == 418 and body["code"] == -1003 and f"banned until {T0 + 120_000}" in body["msg"] and not headers
    assert answer(RestFault(400))[:2] == (400, {"code": -1100, "msg": "Illegal characters found in a parameter."})
    assert answer(RestFault(503))[1]["code"] == answer(RestFault(500))[1]["code"] == -1001
    assert answer(RestFault(404))[1]["code"] == -1000
    with pytest.raises(ValueError):
        fault_response(RestFault(None), T0)


# -- protocol --


CATALOG = StreamCatalog(["BTCUSDT", "ETHUSDT"])


def test_stream_names_and_paths() -> None:
    assert CATALOG.problem("btcusdt@trade") is None
    assert CATALOG.problem("ethusdt@kline_15m") is None
    assert CATALOG.problem("btcusdt@depth@100ms") is None  # valid, quiet here
    assert "unknown symbol" in str(CATALOG.problem("xrpusdt@trade"))
    assert CATALOG.problem("BTCUSDT@trade") is not None
    assert CATALOG.problem("btcusdt@nothing") is not None
    assert parse_ws_path("/ws", CATALOG, max_streams=5) == WsTarget((), False)
    assert parse_ws_path("/ws/btcusdt@trade/ethusdt@aggTrade", CATALOG, max_streams=5) == WsTarget(
        ("btcusdt@trade", "ethusdt@aggTrade"), False
    )
    assert parse_ws_path("/stream?streams=btcusdt@trade/btcusdt@trade", CATALOG, max_streams=5) == WsTarget(
        ("btcusdt@trade",), True
    )
    assert parse_ws_path("/stream", CATALOG, max_streams=5) == WsTarget((), True)
    assert isinstance(parse_ws_path("/ws/xrpusdt@trade", CATALOG, max_streams=5), str)
    assert isinstance(parse_ws_path("/stream?streams=btcusdt@trade/ethusdt@trade", CATALOG, max_streams=1), str)
    assert parse_ws_path("/api/v3/time", CATALOG, max_streams=5) is None


def test_live_requests_and_binance_error_replies() -> None:
    subs = StreamSubscriptions(CATALOG, WsTarget((), False), max_streams=3)

    def send(obj: Any) -> Any:
        raw = obj if isinstance(obj, str) else orjson.dumps(obj).decode()
        return orjson.loads(subs.handle(raw).reply)

    assert send({"method": "SUBSCRIBE", "params": ["btcusdt@trade", "btcusdt@aggTrade"], "id": 1}) == {
        "result": None, "id": 1,
    }  # fmt: skip
    assert send({"method": "LIST_SUBSCRIPTIONS", "id": 3}) == {"result": ["btcusdt@trade", "btcusdt@aggTrade"], "id": 3}
    assert send({"method": "UNSUBSCRIBE", "params": ["btcusdt@trade"], "id": 4}) == {"result": None, "id": 4}
    assert send({"method": "LIST_SUBSCRIPTIONS", "id": "x"}) == {"result": ["btcusdt@aggTrade"], "id": "x"}
    assert send({"method": "GET_PROPERTY", "params": ["combined"], "id": 5}) == {"result": False, "id": 5}
    assert send({"method": "SET_PROPERTY", "params": ["combined", True], "id": 6}) == {"result": None, "id": 6}
    assert subs.combined is True

    def error(obj: Any) -> tuple[int, Any]:
        reply = send(obj)
        assert set(reply) == {"error", "id"} and set(reply["error"]) == {"code", "msg"}
        return reply["error"]["code"], reply["id"]

    assert error({"method": "SET_PROPERTY", "params": ["nope", True], "id": 7}) == (0, 7)
    assert error({"method": "SET_PROPERTY", "params": ["combined", "yes"], "id": 8}) == (1, 8)
    assert error({"method": "SUBSCRIBE", "params": ["xrpusdt@trade"], "id": 9}) == (2, 9)
    assert error({"method": "FROB", "id": 10}) == (2, 10)
    assert error({"params": [], "id": 11}) == (2, 11)
    assert error({"method": "SUBSCRIBE", "params": "btcusdt@trade", "id": 12}) == (2, 12)
    assert error({"method": "LIST_SUBSCRIPTIONS", "id": -1}) == (2, None)
    assert error({"method": "LIST_SUBSCRIPTIONS", "id": 13, "extra": 1}) == (2, 13)
    assert error("{not json") == (3, None)
    # the stream limit: 1 held + 3 asked > 3; nothing is applied
    too_many = ["ethusdt@trade", "ethusdt@aggTrade", "ethusdt@bookTicker"]
    assert error({"method": "SUBSCRIBE", "params": too_many, "id": 14}) == (2, 14)
    assert list(subs.streams) == ["btcusdt@aggTrade"]
    outcome = subs.handle(orjson.dumps({"method": "SUBSCRIBE", "params": too_many[:2], "id": 15}))
    assert outcome.added == ("ethusdt@trade", "ethusdt@aggTrade")
    assert isinstance(parse_request(b'{"method":"SUBSCRIBE","params":[],"id":1}'), simulator.protocol.ClientRequest)


def test_incoming_rate_limiter() -> None:
    limiter = IncomingRateLimiter(5)
    assert all(limiter.allow(10.0 + i * 0.01) for i in range(5))
    assert not limiter.allow(10.5)
    assert limiter.allow(11.001)  # the first message left the one-second window


def test_text_frames() -> None:
    assert text_frame(b"{}") == b"\x81\x02{}"
    assert text_frame(b"x" * 125)[:2] == b"\x81\x7d"
    assert text_frame(b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert text_frame(b"x" * 65536)[:10] == b"\x81\x7f" + (65536).to_bytes(8, "big")


def test_fault_injector_over_batches() -> None:
    def injector(**rates: float) -> FaultInjector[tuple[str, int]]:
        return FaultInjector(
            random.Random(1), stream_of=lambda it: it[0], corrupt=lambda it: (it[0], -1), rates=FaultRates(**rates)
        )

    items = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]
    assert injector().apply(items, 0.0) == items
    assert injector(duplicate=1.0).apply(items, 0.0) == [x for it in items for x in (it, it)]
    assert injector(malformed=1.0).apply(items, 0.0) == [("a", -1), ("b", -1), ("a", -1), ("b", -1), ("a", -1)]
    # out of order: each held item goes out right after the next one of its stream, across batches
    swapping = injector(out_of_order=1.0)
    assert swapping.apply([("a", 1)], 0.0) == []
    assert swapping.apply([("b", 1), ("a", 2)], 0.1) == [("a", 2), ("a", 1)]
    assert swapping.apply([("a", 3)], 0.2) == []
    assert swapping.apply([], 0.8) == [("b", 1), ("a", 3)]  # held too long: out late, in order
    swapping.rates = FaultRates()
    assert swapping.apply([("a", 4)], 0.9) == [("a", 4)] and not swapping.active
    with pytest.raises(ValueError):
        FaultRates(malformed=2.0)


def test_control_requests() -> None:
    assert parse_control("/control/state", {}) == ControlCommand("state")
    assert parse_control("/control/stall", {"seconds": ["1.5"]}) == ControlCommand("stall", seconds=1.5)
    assert parse_control("/control/close_all", {"abort": ["true"]}) == ControlCommand("close_all", abort=True)
    assert parse_control("/control/faults", {"duplicate": ["0.1"]}) == ControlCommand(
        "faults", rates={"duplicate": 0.1}
    )
    assert parse_control("/control/rest_faults", {"path": ["aggTrades"], "schedule": ["429:2,close"]}) == (
        ControlCommand("rest_faults", path="/api/v3/aggTrades", rest_faults=(RestFault(429, 2), RestFault(None)))
    )
    assert parse_control("/control/rest_faults", {}) == ControlCommand("rest_faults", path=ALL_PATHS)
    for path, query in [
        ("/control/nope", {}),
        ("/control/stall", {}),
        ("/control/refuse", {"seconds": ["-1"]}),
        ("/control/faults", {"malformed": ["2"]}),
        ("/control/faults", {"typo": ["0.1"]}),
        ("/control/rest_faults", {"schedule": ["2xx"]}),
        ("/control/rest_faults", {"path": ["a b"]}),
        ("/control/rest_faults", {"status": ["503"]}),
    ]:
        assert isinstance(parse_control(path, query), str)


def test_capture_loading_and_pacing(tmp_path: Path) -> None:
    frames = load_capture(FIXTURE)
    assert len(frames) == 265 and frames[0].offset == 0.0
    assert sorted(capture_symbols(frames)) == ["BLZETH", "LRCBTC", "NKNUSDT", "RUNEEUR"]
    assert frames_due(frames, 0, 0.0, 1.0) >= 1
    assert frames_due(frames, 0, 1e9, 1.0) == 265
    assert frames_due(frames, 0, 1.0, 1.0) < frames_due(frames, 0, 1.0, 10.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"recv_ts": 1.0}\n')
    with pytest.raises(CaptureError, match=r"bad\.jsonl:1"):
        load_capture(bad)
    with pytest.raises(CaptureError):
        load_capture(tmp_path / "missing.jsonl")


# -- live simulator: streams --


async def test_combined_stream_frames(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims()
    assert sim.ws_url == f"ws://127.0.0.1:{sim.port}" and sim.rest_url == f"http://127.0.0.1:{sim.port}"
    async with connect(f"{sim.ws_url}/stream?streams=btcusdt@trade/ethusdt@bookTicker") as ws:
        frames = await collect(ws, 60)
    assert {f["stream"] for f in frames} == {"btcusdt@trade", "ethusdt@bookTicker"}
    for f in frames:
        assert set(f) == {"stream", "data"}
        if f["stream"] == "btcusdt@trade":
            assert f["data"]["e"] == "trade" and f["data"]["s"] == "BTCUSDT"
        else:
            assert f["data"]["s"] == "ETHUSDT" and "u" in f["data"]
    trade_ids = [f["data"]["t"] for f in frames if f["stream"] == "btcusdt@trade"]
    assert trade_ids == list(range(trade_ids[0], trade_ids[0] + len(trade_ids)))


async def test_raw_stream_and_live_requests(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims()
    async with connect(f"{sim.ws_url}/ws/btcusdt@trade") as ws:
        trades = await collect(ws, 20)
        assert all(is_trade(t) for t in trades)
        assert await request(ws, "LIST_SUBSCRIPTIONS", None, 1) == {"result": ["btcusdt@trade"], "id": 1}
        assert await request(ws, "SUBSCRIBE", ["ethusdt@aggTrade"], 2) == {"result": None, "id": 2}
        aggs = await collect(ws, 3, keep=lambda m: m.get("e") == "aggTrade")
        assert {a["s"] for a in aggs} == {"ETHUSDT"}
        assert await request(ws, "UNSUBSCRIBE", ["btcusdt@trade"], 3) == {"result": None, "id": 3}
        reply = await request(ws, "LIST_SUBSCRIPTIONS", [], 4)
        assert reply == {"result": ["ethusdt@aggTrade"], "id": 4}
    async with connect(f"{sim.ws_url}/ws") as ws:
        reply = await request(ws, "SUBSCRIBE", ["xrpusdt@trade"], 5)
        assert reply["error"]["code"] == 2 and reply["error"]["msg"].startswith("Invalid request")
        await ws.send("{oops")
        assert (await recv_json(ws))["error"]["code"] == 3
        # switch a raw connection to combined frames
        assert await request(ws, "SET_PROPERTY", ["combined", True], 6) == {"result": None, "id": 6}
        assert await request(ws, "SUBSCRIBE", ["btcusdt@bookTicker"], 7) == {"result": None, "id": 7}
        frame = (await collect(ws, 1, keep=lambda m: "stream" in m))[0]
        assert frame["stream"] == "btcusdt@bookTicker" and frame["data"]["s"] == "BTCUSDT"


async def test_invalid_or_too_many_streams_in_the_url(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(max_streams_per_connection=2)
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{sim.ws_url}/ws/xrpusdt@trade"):
            pass
    assert info.value.response.status_code == 400
    with pytest.raises(InvalidStatus):
        async with connect(f"{sim.ws_url}/stream?streams=btcusdt@trade/btcusdt@aggTrade/ethusdt@trade"):
            pass
    async with connect(f"{sim.ws_url}/stream?streams=btcusdt@trade/btcusdt@aggTrade") as ws:
        reply = await request(ws, "SUBSCRIBE", ["ethusdt@trade"], 1)
        assert reply["error"]["code"] == 2


async def test_more_than_five_messages_a_second_disconnects(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=0)
    async with connect(f"{sim.ws_url}/ws") as ws:
        for i in range(6):
            await ws.send(orjson.dumps({"method": "LIST_SUBSCRIPTIONS", "id": i}).decode())
        replies = []
        with pytest.raises(ConnectionClosedError) as info:
            async with asyncio.timeout(5 * UNIT):
                while True:
                    replies.append(orjson.loads(await ws.recv()))
    assert [r["id"] for r in replies] == [0, 1, 2, 3, 4]
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    await wait_until(lambda: sim.stats().rate_limit_closes == 1)


async def test_rate_is_never_exceeded(sims: Callable[..., Awaitable[Simulator]]) -> None:
    loop = asyncio.get_running_loop()
    before = loop.time()
    sim = await sims(rate=4000.0)
    await wait_until(lambda: sim.stats().ticks_total >= 1000)
    stats = sim.stats()
    assert stats.ticks_total <= 4000 * (loop.time() - before) + 1
    assert sum(stats.ticks_generated.values()) == stats.ticks_total
    assert stats.ticks_generated["trade"] > 0 and stats.ticks_generated["bookTicker"] > 0


# -- live simulator: REST --


async def test_rest_matches_what_was_streamed(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=5000.0)
    async with connect(f"{sim.ws_url}/stream?streams=btcusdt@trade/btcusdt@aggTrade") as ws:
        frames = await collect(ws, 400)
    trades = [f["data"] for f in frames if f["stream"] == "btcusdt@trade"]
    aggs = [f["data"] for f in frames if f["stream"] == "btcusdt@aggTrade"]
    base = sim.rest_url
    status, rest = await http_get(
        f"{base}/api/v3/historicalTrades?symbol=BTCUSDT&fromId={trades[0]['t']}&limit={len(trades)}"
    )
    assert status == 200
    assert [(r["id"], r["price"], r["qty"], r["time"], r["isBuyerMaker"]) for r in rest] == [
        (t["t"], t["p"], t["q"], t["T"], t["m"]) for t in trades
    ]
    status, rest_aggs = await http_get(
        f"{base}/api/v3/aggTrades?symbol=BTCUSDT&fromId={aggs[0]['a']}&limit={len(aggs)}"
    )
    assert status == 200
    assert rest_aggs == [{k: a[k] for k in ("a", "p", "q", "f", "l", "T", "m", "M")} for a in aggs]
    status, latest = await http_get(f"{base}/api/v3/trades?symbol=BTCUSDT&limit=5")
    ids = [t["id"] for t in latest]
    assert status == 200 and ids == list(range(ids[0], ids[0] + 5)) and ids[-1] >= trades[-1]["t"]
    status, klines = await http_get(f"{base}/api/v3/klines?symbol=BTCUSDT&interval=1m")
    assert status == 200 and klines and klines[-1][8] > 0
    status, info = await http_get(f"{base}/api/v3/exchangeInfo")
    assert status == 200 and [s["symbol"] for s in info["symbols"]] == ["BTCUSDT", "ETHUSDT"]
    assert await http_get(f"{base}/api/v3/trades?symbol=DOGEUSDT") == (400, {"code": -1121, "msg": "Invalid symbol."})
    assert (await http_get(f"{base}/no/such/path"))[0] == 404
    assert await http_get(f"{base}/ping") == (200, {})
    status, server_time = await http_get(f"{base}/api/v3/time")
    assert status == 200 and isinstance(server_time["serverTime"], int)


# -- live simulator: replay --


async def test_replay_sends_the_capture_at_its_pace(sims: Callable[..., Awaitable[Simulator]]) -> None:
    recorded = [orjson.loads(line)["frame"] for line in FIXTURE.read_bytes().splitlines()]
    streams = sorted({orjson.loads(f)["stream"] for f in recorded})
    sim = await sims(replay=FIXTURE, replay_speed=200.0)
    _status, info = await http_get(f"{sim.rest_url}/api/v3/exchangeInfo")
    assert {s["symbol"] for s in info["symbols"]} == {"NKNUSDT", "LRCBTC", "BLZETH", "RUNEEUR"}
    loop = asyncio.get_running_loop()
    async with connect(f"{sim.ws_url}/stream?streams={'/'.join(streams)}") as ws:
        started = loop.time()
        got: list[str | bytes] = []
        async with asyncio.timeout(5 * UNIT):
            while len(got) < len(recorded):
                got.append(await ws.recv())
        elapsed = loop.time() - started
    assert got == recorded  # the recorded bytes, in order
    assert elapsed >= 30.0 / 200 * 0.9  # the capture spans 30 s


async def test_replay_to_a_raw_subscriber(sims: Callable[..., Awaitable[Simulator]]) -> None:
    recorded = [orjson.loads(orjson.loads(line)["frame"]) for line in FIXTURE.read_bytes().splitlines()]
    wanted = [f["data"] for f in recorded if f["stream"] == "nknusdt@bookTicker"]
    sim = await sims(replay=FIXTURE, replay_speed=500.0)
    async with connect(f"{sim.ws_url}/ws/nknusdt@bookTicker") as ws:
        got = await collect(ws, len(wanted))
    assert got == wanted
    await wait_until(lambda: sim.stats().replayed_frames == len(recorded))


# -- live simulator: Binance's connection rules --


async def test_pings_answered_keep_the_connection_and_silence_closes_it(
    sims: Callable[..., Awaitable[Simulator]],
) -> None:
    # No market data: a client that leaves data unread stops reading its socket, and so its pings too.
    sim = await sims(rate=0, ping_interval=0.05 * UNIT, pong_timeout=0.2 * UNIT, close_timeout=0.2 * UNIT)
    async with connect(f"{sim.ws_url}/ws", ping_interval=None) as good:
        async with connect(f"{sim.ws_url}/ws", ping_interval=None) as silent:
            silent.transport.pause_reading()  # never sees a ping, so never answers
            await wait_until(lambda: sim.stats().connections == 1)
            silent.transport.resume_reading()
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5 * UNIT):
                    while True:
                        await silent.recv()
        pongs = sim.stats().pongs_received
        await wait_until(lambda: sim.stats().pongs_received >= pongs + 5)
        assert good.state is State.OPEN
        assert await request(good, "LIST_SUBSCRIPTIONS", None, 1) == {"result": [], "id": 1}


async def test_connection_age_limit_sends_server_shutdown_first(
    sims: Callable[..., Awaitable[Simulator]],
) -> None:
    sim = await sims(rate=0, max_connection_age=0.3 * UNIT, shutdown_notice=0.1 * UNIT)
    for path in ("/ws", "/stream"):
        async with connect(sim.ws_url + path) as ws:
            event = await recv_json(ws)
            assert set(event) == {"e", "E"} and event["e"] == "serverShutdown" and isinstance(event["E"], int)
            with pytest.raises(ConnectionClosedOK):
                await recv_json(ws)


async def test_planned_shutdown_announces_itself() -> None:
    async with Simulator(SimulatorConfig(rate=0)) as sim, connect(f"{sim.ws_url}/stream?streams=btcusdt@trade") as ws:
        await sim.__aexit__(None, None, None)
        assert (await recv_json(ws))["e"] == "serverShutdown"
        with pytest.raises(ConnectionClosedOK) as info:
            await recv_json(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001


async def test_slow_consumer_is_closed(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=50_000.0, max_send_buffer=64 * 1024)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", sim.port))
    async with connect(f"{sim.ws_url}/ws/btcusdt@trade/ethusdt@bookTicker", sock=sock) as ws:
        ws.transport.pause_reading()
        await wait_until(lambda: sim.stats().slow_consumer_closes == 1, timeout=10 * UNIT)
        ws.transport.resume_reading()
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5 * UNIT):
                while True:
                    await ws.recv()


async def test_run_simulator_until_cancelled() -> None:
    ready: asyncio.Future[Simulator] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_simulator(SimulatorConfig(rate=0), ready=ready.set_result))
    sim = await asyncio.wait_for(ready, 5 * UNIT)
    assert await http_get(f"{sim.rest_url}/api/v3/ping") == (200, {})
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- live simulator: faults --


async def test_close_all_through_the_control_endpoint(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims()
    async with (
        connect(f"{sim.ws_url}/ws/btcusdt@trade") as a,
        connect(f"{sim.ws_url}/stream?streams=btcusdt@trade") as b,
    ):
        await wait_until(lambda: sim.stats().connections == 2)
        status, state = await http_get(f"{sim.rest_url}/control/close_all")
        assert status == 200 and "stats" in state
        for ws in (a, b):
            with pytest.raises(ConnectionClosedOK) as info:
                async with asyncio.timeout(5 * UNIT):
                    while True:
                        await ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    async with connect(f"{sim.ws_url}/ws/btcusdt@trade") as c:
        await wait_until(lambda: sim.stats().connections == 1)
        assert sim.close_all(abort=True) == 1
        with pytest.raises(ConnectionClosedError) as dropped:
            async with asyncio.timeout(5 * UNIT):
                while True:
                    await c.recv()
        assert dropped.value.rcvd is None  # no close frame: the TCP connection was dropped


async def test_stall_sends_nothing_and_answers_no_ping(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=2000.0)
    loop = asyncio.get_running_loop()
    async with connect(f"{sim.ws_url}/ws/btcusdt@trade", ping_interval=None) as ws:
        before = await collect(ws, 5)
        status, state = await http_get(f"{sim.rest_url}/control/stall?seconds={0.4 * UNIT}")
        stalled_at = loop.time()
        assert status == 200 and state["stalled"] is True
        pong = await ws.ping()
        await asyncio.wait_for(pong, 5 * UNIT)
        assert loop.time() - stalled_at >= 0.35 * UNIT  # the pong waited for the stall to end
        after = await collect(ws, 100)
    trades = before + after
    gaps = [(a, b) for a, b in itertools.pairwise(trades) if b["E"] - a["E"] >= 300 * UNIT]
    assert len(gaps) == 1, "one silence, the length of the stall"
    last_before, first_after = gaps[0]
    assert first_after["t"] - last_before["t"] > 20  # trades went on meanwhile, unsent
    assert not sim.stalled


async def test_refuse_new_connections_for_a_while(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=0, refuse_for=30.0)
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{sim.ws_url}/ws"):
            pass
    assert info.value.response.status_code == 503
    assert (await http_get(f"{sim.rest_url}/api/v3/ping"))[0] == 200  # REST keeps answering
    _status, state = await http_get(f"{sim.rest_url}/control/refuse?seconds={0.2 * UNIT}")
    assert state["refusing"] is True
    await http_get(f"{sim.rest_url}/control/clear")
    async with connect(f"{sim.ws_url}/ws") as ws:
        assert await request(ws, "LIST_SUBSCRIPTIONS", None, 1) == {"result": [], "id": 1}
    sim.refuse(0.1 * UNIT)
    connected = False
    async with asyncio.timeout(5 * UNIT):
        while not connected:
            try:
                async with connect(f"{sim.ws_url}/ws"):
                    connected = True
            except InvalidStatus as exc:
                assert exc.response.status_code == 503
                await asyncio.sleep(0.02)  # poll


async def test_malformed_duplicate_and_out_of_order_frames(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=4000.0)
    base = sim.rest_url
    async with connect(f"{sim.ws_url}/ws/btcusdt@trade") as ws:
        status, state = await http_get(f"{base}/control/faults?malformed=1")
        assert status == 200 and state["rates"]["malformed"] == 1.0
        async with asyncio.timeout(5 * UNIT):
            while True:  # frames written before the switch may still be in flight
                try:
                    orjson.loads(await ws.recv())
                except orjson.JSONDecodeError:
                    break
        await http_get(f"{base}/control/faults?malformed=0&duplicate=1")
        texts: list[str] = []
        async with asyncio.timeout(5 * UNIT):
            while not any(a == b for a, b in itertools.pairwise(texts)):
                texts.append(str(await ws.recv()))
        await http_get(f"{base}/control/faults?duplicate=0&out_of_order=0.5")
        ids: list[int] = []
        async with asyncio.timeout(5 * UNIT):
            while not any(b < a for a, b in itertools.pairwise(ids)):
                ids.append(orjson.loads(await ws.recv())["t"])
        status, state = await http_get(f"{base}/control/clear")
        assert state["rates"] == {"malformed": 0.0, "duplicate": 0.0, "out_of_order": 0.0}
    assert sim.fault_rates == FaultRates()
    status, error = await http_get(f"{base}/control/faults?malformed=7")
    assert status == 400 and "malformed" in error["error"]


async def test_faults_from_the_config(sims: Callable[..., Awaitable[Simulator]]) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    sim = await sims(rate=0, stall_for=0.3 * UNIT)
    async with connect(f"{sim.ws_url}/ws", ping_interval=None) as ws:
        assert sim.stalled
        pong = await ws.ping()
        await asyncio.wait_for(pong, 5 * UNIT)
        assert loop.time() - started >= 0.3 * UNIT
        assert not sim.stalled
    sim = await sims(rate=0, close_every=0.1 * UNIT)
    for _ in range(2):  # every connection, again and again
        async with connect(f"{sim.ws_url}/ws") as ws:
            with pytest.raises(ConnectionClosedOK) as info:
                await recv_json(ws)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    sim = await sims(rate=1000.0, fault_duplicate=1.0)
    async with connect(f"{sim.ws_url}/ws/btcusdt@bookTicker") as ws:
        first, second = await recv_json(ws), await recv_json(ws)
        assert first == second


async def raw_get(url: str) -> bytes:
    """Everything the server sends back to one HTTP/1.1 GET, until it closes the connection."""
    parts = urlsplit(url)
    async with asyncio.timeout(5 * UNIT):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""
        finally:
            writer.close()
            with contextlib.suppress(ConnectionResetError):
                await writer.wait_closed()


async def test_rest_faults_through_the_control_endpoint(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=2000.0)
    base, path = sim.rest_url, "/api/v3/historicalTrades?symbol=BTCUSDT&limit=5"
    def btc_trades() -> int:
        first, after = sim.market.history("BTCUSDT").trade_id_range
        return after - first

    await wait_until(lambda: btc_trades() >= 5)  # the page asked for below is full
    schedule = "400,418,429:30,503,close"
    status, state = await http_get(f"{base}/control/rest_faults?path=historicalTrades&schedule={schedule}")
    assert status == 200
    assert state["rest_faults"]["pending"] == {"/api/v3/historicalTrades": schedule}
    for want in (400, 418, 429, 503):
        assert (await http_get(base + path))[0] == want
    assert await raw_get(base + path) == b""  # closed with no answer at all
    status, trades = await http_get(base + path)
    assert status == 200 and len(trades) == 5  # the schedule is used up: answers again
    head = (await raw_get(f"{base}/api/v3/ping")).partition(b"\r\n\r\n")[0]
    assert b"Retry-After" not in head
    await http_get(f"{base}/control/rest_faults?path=aggTrades&schedule=429:30")
    head = (await raw_get(f"{base}/api/v3/aggTrades?symbol=BTCUSDT")).partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 429 ") and b"\r\nRetry-After: 30" in head
    await http_get(f"{base}/control/rest_faults?schedule=503")  # any path
    assert (await http_get(f"{base}/api/v3/time"))[0] == 503
    status, error = await http_get(f"{base}/control/rest_faults?path=klinez&schedule=503")
    assert status == 400 and "no REST endpoint" in error["error"]
    await http_get(f"{base}/control/rest_faults?path=trades&schedule=503")
    _status, state = await http_get(f"{base}/control/clear")
    assert state["rest_faults"]["pending"] == {}
    assert (await http_get(f"{base}/api/v3/trades?symbol=BTCUSDT"))[0] == 200
    faults = sim.rest_faults
    assert faults.injected == {"/api/v3/historicalTrades": 5, "/api/v3/aggTrades": 1, "/api/v3/time": 1}
    assert faults.requests["/api/v3/historicalTrades"] == 6 and faults.requests["/api/v3/ping"] == 1


async def test_rest_faults_from_the_config(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=0, rest_faults="ping=503;*=close")
    assert (await http_get(f"{sim.rest_url}/api/v3/ping"))[0] == 503
    assert await raw_get(f"{sim.rest_url}/api/v3/time") == b""
    assert (await http_get(f"{sim.rest_url}/api/v3/time"))[0] == 200


def test_market_simulate_refuses_a_bad_rest_fault_schedule() -> None:
    for bad, needle in (("aggTrades=42", "bad REST fault '42'"), ("klinez=503", "no REST endpoint")):
        proc = subprocess.run(
            [sys.executable, "-m", "ops.cli", "simulate", "--port", "0", "--rest-faults", bad],
            capture_output=True, text=True, timeout=60,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
