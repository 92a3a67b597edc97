"""The simulator's venue profiles against real websockets clients and plain HTTP: Binance USD-M (and COIN-M, for its
capture) futures and OKX v5 public.  Frames are read with the project's own venue parsers (:mod:`ingestor.okx`,
:mod:`ingestor.binance_usdm`, :mod:`ingestor.binance_coinm`), so the simulator and the ingestor agree on each
venue's format; the faults are real (closed sockets, removed updates, refused handshakes)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ingestor import binance_coinm, binance_usdm, okx
from ingestor.depth import DepthDiff, DepthRule
from ingestor.depth_books import DepthBooks
from ingestor.venue import MalformedFrame, Reply, ServerShutdown
from ops.simulator import Simulator, SimulatorConfig, SimulatorConfigError
from ops.simulator.depth_faults import parse_depth_faults
from ops.simulator.okx import OkxSimulator, load_okx_capture
from ops.simulator.okx_protocol import ConnectLimiter, OpsLimiter, history_trades, okx_decimal
from ops.simulator.profiles import VENUES, binance_profile
from tests.ops.test_simulator import http_get_raw, running

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OKX_CAPTURE = FIXTURES / "okx-2022-05-13.jsonl"
COINM_CAPTURE = FIXTURES / "binance-coinm-2021-07-22.jsonl"
COINM_DEPTH = FIXTURES / "binance-coinm-2021-07-22.depth.jsonl"
UNIT = 1.0  # every timeout below is a multiple of this; raise it on a slow machine


def now_us() -> int:
    return time.time_ns() // 1000


async def wait_until(condition: Callable[[], bool], timeout: float = 5 * UNIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)  # poll


async def http_get(url: str) -> tuple[int, Any]:
    """A plain HTTP/1.1 GET; the status and the decoded JSON body."""
    head, body = await http_get_raw(url)
    return int(head.split(b" ", 2)[1]), orjson.loads(body)


async def http_head(url: str) -> bytes:
    return (await http_get_raw(url))[0]


async def recv_text(ws: ClientConnection, timeout: float = 5 * UNIT) -> str:
    async with asyncio.timeout(timeout):
        message = await ws.recv()
    assert isinstance(message, str)
    return message


@pytest.fixture
async def okx_sims() -> AsyncIterator[Callable[..., Awaitable[OkxSimulator]]]:
    async with running(OkxSimulator, venue="okx", rate=1000.0, symbols=("BTC-USDT", "BTC-USDT-SWAP")) as start:
        yield start


@pytest.fixture
async def futures_sims() -> AsyncIterator[Callable[..., Awaitable[Simulator]]]:
    async with running(Simulator, rate=1000.0, venue="binance_usdm") as start:
        yield start


def subscribe(args: list[tuple[str, str]], request_id: str = "1", op: str = "subscribe") -> str:
    return orjson.dumps(
        {"id": request_id, "op": op, "args": [{"channel": c, "instId": i} for c, i in args]}
    ).decode()


# ------------------------------------------------------------------------------------------------ profiles


def test_the_venues_and_their_config() -> None:
    assert VENUES == ("binance", "binance_usdm", "binance_coinm", "okx")
    assert SimulatorConfig().venue == "binance"
    with pytest.raises(SimulatorConfigError, match="known venues: binance, binance_usdm, binance_coinm, okx"):
        SimulatorConfig(venue="kraken")
    with pytest.raises(SimulatorConfigError, match="invalid okx symbol"):
        SimulatorConfig(venue="okx", symbols=("BTCUSDT",))
    with pytest.raises(SimulatorConfigError, match="invalid binance symbol"):
        SimulatorConfig(symbols=("BTC-USDT",))
    assert SimulatorConfig(venue="okx", symbols=("btc-usdt-swap",)).symbols == ("BTC-USDT-SWAP",)
    assert SimulatorConfig(venue="binance_coinm", symbols=("BTCUSD_PERP",)).book_config().futures
    with pytest.raises(SimulatorConfigError, match="idle_timeout"):
        SimulatorConfig(venue="okx", symbols=("BTC-USDT",), idle_timeout=0)
    with pytest.raises(SimulatorConfigError, match="okx"):
        Simulator(SimulatorConfig(venue="okx", symbols=("BTC-USDT",)))
    with pytest.raises(SimulatorConfigError, match="okx venue"):
        OkxSimulator(SimulatorConfig())


def test_futures_routes_and_rest_paths() -> None:
    usdm = binance_profile("binance_usdm")
    assert usdm.split_route("/public/stream?streams=a") == ("public", "/stream?streams=a")
    assert usdm.split_route("/market/ws/btcusdt@aggTrade") == ("market", "/ws/btcusdt@aggTrade")
    assert usdm.split_route("/stream?streams=a") == ("all", "/stream?streams=a")
    assert [usdm.route_of(s) for s in ("x@bookTicker", "x@depth@100ms", "x@aggTrade", "x@markPrice@1s")] == [
        "public", "public", "market", "market",
    ]
    assert usdm.rest_path("/fapi/v1/aggTrades") == "/api/v3/aggTrades"
    assert usdm.rest_path("/fapi/v1/historicalTrades") is None
    assert usdm.rest_path("/api/v3/aggTrades") is None
    assert binance_profile("binance_coinm").rest_path("/dapi/v1/depth") == "/api/v3/depth"
    assert binance_profile("binance").rest_path("/api/v3/trades") == "/api/v3/trades"
    assert binance_profile("binance").split_route("/public/stream") == ("all", "/public/stream")


def test_okx_limits_and_decimals() -> None:
    ops = OpsLimiter(2, window=10.0)
    assert [ops.allow(t) for t in (0.0, 1.0, 2.0, 10.5)] == [True, True, False, True]
    connects = ConnectLimiter(2)
    assert [connects.allow("a", t) for t in (0.0, 0.1, 0.2, 1.05)] == [True, True, False, True]
    assert connects.allow("b", 0.2)
    assert [okx_decimal(u) for u in (2712345000000, 100_000, 500_000_000, 0)] == ["27123.45", "0.001", "5", "0"]


def test_history_trades_pages_by_trade_id_as_okx() -> None:
    rows = [(100 + i, 1_000_000_000 + i, 100_000, 1_700_000_000_000 + i, i % 2 == 0) for i in range(250)]

    def source(inst: str, lo: int | None, hi: int | None) -> Any:
        if lo is None or hi is None:
            return (100, 350)
        return [r for r in rows if lo <= r[0] < hi]

    def ids(query: dict[str, list[str]]) -> list[int]:
        status, body = history_trades(query, ("BTC-USDT",), source)
        assert status == 200, body
        return [int(r["tradeId"]) for r in orjson.loads(body)["data"]]

    base = {"instId": ["BTC-USDT"], "type": ["1"]}
    assert ids(base) == list(range(349, 249, -1))  # newest first, 100 at most
    assert ids({**base, "after": ["200"], "limit": ["10"]}) == list(range(199, 189, -1))
    assert ids({**base, "before": ["340"]}) == list(range(349, 340, -1))
    assert ids({**base, "after": ["110"], "before": ["104"]}) == [109, 108, 107, 106, 105]
    assert ids({**base, "after": ["100"]}) == []
    assert ids({**base, "limit": ["500"]}) == list(range(349, 249, -1))
    for query, code in (
        ({"type": ["1"]}, "50014"), ({"instId": ["ETH-USDT"]}, "51001"), ({**base, "after": ["x"]}, "51000"),
        ({**base, "type": ["3"]}, "51000"),
    ):
        status, body = history_trades(query, ("BTC-USDT",), source)
        assert status == 400 and orjson.loads(body)["code"] == code


# ------------------------------------------------------------------------------------------------ okx live


async def test_okx_subscribe_acks_each_arg_and_sends_frames_the_okx_parser_accepts(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(depth=True)
    streams = [("trades", "BTC-USDT"), ("bbo-tbt", "BTC-USDT-SWAP"), ("books", "BTC-USDT")]
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        await ws.send(subscribe(streams, "42"))
        acks = [okx.parse_message(await recv_text(ws), now_us()) for _ in streams]
        assert acks == [Reply(42, result={"event": "subscribe", "stream": f"{c}:{i}"}) for c, i in streams]
        by_channel: dict[str, list[dict[str, Any]]] = {"trade": [], "book_ticker": [], "depth": []}
        async with asyncio.timeout(10 * UNIT):
            while min(len(v) for v in by_channel.values()) < 5:
                parsed = okx.parse_message(await recv_text(ws), now_us())
                assert isinstance(parsed, list), parsed
                for tick in parsed:
                    by_channel[tick["channel"]].append(dict(tick))
    trades = by_channel["trade"]
    assert {t["symbol"] for t in trades} == {"BTC-USDT"}
    assert [t["seq"] for t in trades] == list(range(trades[0]["seq"], trades[0]["seq"] + len(trades)))
    assert {t["symbol"] for t in by_channel["book_ticker"]} == {"BTC-USDT-SWAP"}
    seqs = [t["seq"] for t in by_channel["book_ticker"]]
    assert seqs == sorted(set(seqs))
    depth = by_channel["depth"]
    assert depth[0]["snapshot"] and depth[0]["prev_update_id"] == -1 and len(depth[0]["bids"]) > 25
    for before, after in itertools.pairwise(depth):
        assert not after["snapshot"] and after["prev_update_id"] == before["update_id"] < after["update_id"]
    assert {t["checksum"] for t in depth} == {0}  # today's form


async def test_okx_wrong_subscribe_gets_an_error_event_and_subscribes_nothing(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=0)
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        for request, code in (
            (subscribe([("trades", "BTC-USDT"), ("candle7m", "BTC-USDT")], "5"), "60018"),
            (subscribe([("trades", "DOGE-USDT")], "6"), "60018"),
            ('{"op":"subscribe","args":[{"channel":"trades","instId":"BTC-USDT"}]', "60012"),
            ('{"op":"login","args":[]}', "60012"),
        ):
            await ws.send(request)
            event = orjson.loads(await recv_text(ws))
            assert event["event"] == "error" and event["code"] == code and event["msg"], event
            parsed = okx.parse_message(orjson.dumps(event), now_us())
            assert isinstance(parsed, Reply) and parsed.error is not None and parsed.error["code"] == code
        await ws.send(subscribe([("trades", "BTC-USDT")], "7", op="unsubscribe"))
        assert orjson.loads(await recv_text(ws))["event"] == "unsubscribe"
    assert not sim._subs  # the refused requests subscribed nothing


async def test_okx_answers_ping_and_closes_a_connection_silent_for_the_idle_timeout(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=0, idle_timeout=1.0 * UNIT)
    async with connect(f"{sim.ws_url}/ws/v5/public") as talker, connect(f"{sim.ws_url}/ws/v5/public") as silent:
        await talker.send("ping")
        assert await recv_text(talker) == "pong"
        assert okx.parse_message("pong", now_us()) is None
        pings = 0

        async def keep_talking() -> None:
            nonlocal pings
            while True:
                await talker.send("ping")
                assert await recv_text(talker) == "pong"
                pings += 1
                await asyncio.sleep(0.1 * UNIT)  # a client's heartbeat period, well inside the idle timeout

        task = asyncio.create_task(keep_talking())
        try:
            with pytest.raises(ConnectionClosed) as closed:
                await recv_text(silent, timeout=5 * UNIT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
            # the talker outlived the silent one by its own pings, which kept it past several idle timeouts
            await wait_until(lambda: pings >= 25, timeout=15 * UNIT)
            assert not task.done()
        finally:
            task.cancel()
    assert sim.fault_state()["idle_closes"] == 1


async def test_okx_refuses_subscribe_operations_beyond_the_hourly_limit(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=0, max_ops_per_hour=3)
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        for n in range(3):
            await ws.send(subscribe([("trades", "BTC-USDT")], str(n)))
            assert orjson.loads(await recv_text(ws))["event"] == "subscribe"
        await ws.send(subscribe([("books", "BTC-USDT")], "9"))
        event = orjson.loads(await recv_text(ws))
        assert (event["event"], event["code"], event["id"]) == ("error", "60014", "9")
        assert okx.classify_error(okx.parse_message(orjson.dumps(event), 0)) is not None  # type: ignore[arg-type]
    assert "books:BTC-USDT" not in sim._subs


async def test_okx_refuses_new_connections_beyond_the_rate_per_second(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=0, max_connects_per_s=2)
    url = f"{sim.ws_url}/ws/v5/public"

    async def attempt() -> int:
        try:
            async with connect(url):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    statuses = await asyncio.gather(*(attempt() for _ in range(6)))  # one burst: well within a second
    assert statuses.count(101) >= 2 and statuses.count(429) >= 1 and set(statuses) <= {101, 429}, statuses
    assert sim.fault_state()["connects_refused"] == statuses.count(429)
    with pytest.raises(InvalidStatus) as wrong:
        async with connect(f"{sim.ws_url}/ws/v5/private"):
            pass
    assert wrong.value.response.status_code == 404


async def test_okx_history_trades_pages_back_over_contiguous_trade_ids(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=3000, symbols=("BTC-USDT-SWAP",))
    history = sim.market.history("BTC-USDT-SWAP")
    await wait_until(lambda: history.trade_id_range[1] - history.trade_id_range[0] > 350)
    base = f"{sim.rest_url}/api/v5/market/history-trades?instId=BTC-USDT-SWAP&type=1"
    status, body = await http_get(base)
    assert status == 200 and body["code"] == "0" and len(body["data"]) == 100
    newest = int(body["data"][0]["tradeId"])
    pages: list[int] = []
    after = newest + 1
    for _ in range(3):
        call = okx.OKX_V5.backfill_call("trade", "BTC-USDT-SWAP", after - 100, 100)
        assert call is not None
        status, body = await http_get(f"{base}&after={call.params['after']}&limit={call.params['limit']}")
        ticks = okx.history_trades_to_ticks(body, "BTC-USDT-SWAP", now_us(), after - 100)
        assert [t["seq"] for t in ticks] == list(range(after - 100, after))
        pages = [t["seq"] for t in ticks] + pages
        after -= 100
    assert pages == list(range(newest - 299, newest + 1))
    status, body = await http_get(f"{base}&before={newest - 5}&after={newest}")
    assert [int(r["tradeId"]) for r in body["data"]] == [newest - 1, newest - 2, newest - 3, newest - 4]
    status, body = await http_get(f"{sim.rest_url}/api/v5/market/history-trades?instId=NOPE-USDT")
    assert status == 400 and body["code"] == "51001"


async def test_okx_books_carry_the_crc32_checksum_when_asked_and_a_removed_update_breaks_the_chain(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=2000, depth=True, book_checksum=True, symbols=("BTC-USDT",))
    bids: dict[Decimal, list[str]] = {}
    asks: dict[Decimal, list[str]] = {}

    def apply(side: dict[Decimal, list[str]], levels: list[list[str]]) -> None:
        for price, size in levels:
            if size == "0":
                side.pop(Decimal(price), None)
            else:
                side[Decimal(price)] = [price, size]

    def checksum() -> int:
        return okx.okx_checksum(
            [bids[p] for p in sorted(bids, reverse=True)[:25]], [asks[p] for p in sorted(asks)[:25]]
        )

    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        await ws.send(subscribe([("books", "BTC-USDT")]))
        assert orjson.loads(await recv_text(ws))["event"] == "subscribe"
        last: int | None = None
        checked = broken = 0
        resyncing = False
        async with asyncio.timeout(20 * UNIT):
            while checked < 30 or not broken:
                parsed = okx.parse_message(await recv_text(ws), now_us())
                if isinstance(parsed, Reply):
                    assert parsed.error is None
                    continue
                assert isinstance(parsed, list) and len(parsed) == 1
                tick: Any = parsed[0]
                if resyncing and not tick["snapshot"]:
                    continue  # sent before the unsubscribe was read
                resyncing = False
                if okx.continues(last, tick) is False:
                    broken += 1  # the removed update: the chain breaks; resync from a new snapshot
                    await ws.send(subscribe([("books", "BTC-USDT")], op="unsubscribe"))
                    await ws.send(subscribe([("books", "BTC-USDT")]))
                    resyncing = True
                    continue
                if tick["snapshot"]:
                    bids.clear()
                    asks.clear()
                apply(bids, tick["bids"])
                apply(asks, tick["asks"])
                assert tick["checksum"] != 0 and tick["checksum"] == checksum()
                last = tick["update_id"]
                checked += 1
                if checked == 10:
                    sim.set_depth_faults(parse_depth_faults("drop@BTC-USDT"))
    assert broken == 1
    assert sim.depth is not None and sim.depth.book("BTC-USDT").dropped == 1


async def test_okx_rest_books_and_a_planned_close_with_the_64008_notice(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=500, depth=True, symbols=("BTC-USDT",))
    status, body = await http_get(f"{sim.rest_url}/api/v5/market/books?instId=BTC-USDT&sz=5")
    assert status == 200 and body["code"] == "0"
    book = body["data"][0]
    assert len(book["bids"]) == len(book["asks"]) == 5
    assert Decimal(book["bids"][0][0]) < Decimal(book["asks"][0][0])
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        await ws.send(subscribe([("trades", "BTC-USDT")]))
        await sim.__aexit__(None, None, None)
        seen: list[Any] = []
        with pytest.raises(ConnectionClosed):
            while True:
                seen.append(okx.parse_message(await recv_text(ws), now_us()))
        assert any(isinstance(item, ServerShutdown) for item in seen)


async def test_okx_close_all_and_stall_from_the_control_endpoint(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=500)
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        await ws.send(subscribe([("trades", "BTC-USDT")]))
        await recv_text(ws)
        status, state = await http_get(f"{sim.rest_url}/control/stall?seconds=60")
        assert status == 200 and state["stalled"] and state["venue"] == "okx"
        await ws.send("ping")  # not read while stalled
        status, state = await http_get(f"{sim.rest_url}/control/clear")
        assert not state["stalled"]
        async with asyncio.timeout(5 * UNIT):
            while await ws.recv() != "pong":
                pass
        status, _ = await http_get(f"{sim.rest_url}/control/close_all")
        assert status == 200
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv_text(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


async def test_okx_replays_its_capture_frame_for_frame(okx_sims: Callable[..., Awaitable[OkxSimulator]]) -> None:
    frames = load_okx_capture(OKX_CAPTURE)
    sim = await okx_sims(replay=OKX_CAPTURE, replay_speed=50.0)
    assert set(sim.instruments) == {"BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP"}
    streams = sorted({f.stream for f in frames})
    received: list[bytes] = []
    async with connect(f"{sim.ws_url}/ws/v5/public", max_size=2**24) as ws:
        await ws.send(subscribe([tuple(s.split(":", 1)) for s in streams]))  # type: ignore[misc]
        for _ in streams:
            assert orjson.loads(await recv_text(ws))["event"] == "subscribe"
        async with asyncio.timeout(30 * UNIT):
            while len(received) < len(frames):
                received.append((await recv_text(ws)).encode())
    assert received == [f.raw for f in frames]
    counts: dict[str, int] = {}
    for raw in received:
        parsed = okx.parse_message(raw, now_us())
        assert isinstance(parsed, list) and parsed
        channel = orjson.loads(raw)["arg"]["channel"]
        counts[channel] = counts.get(channel, 0) + 1
    # every push of the capture, its 18 subscribe acknowledgements left out
    assert counts == {"books": 290, "trades": 74, "tickers": 28}


# ------------------------------------------------------------------------------------------------ usd-m live


async def test_usdm_routes_deliver_their_streams_in_futures_shapes(
    futures_sims: Callable[..., Awaitable[Simulator]],
) -> None:
    sim = await futures_sims(depth=True)
    market = "btcusdt@aggTrade/btcusdt@markPrice@1s/btcusdt@bookTicker"
    kinds: dict[str, int] = {}
    async with connect(f"{sim.ws_url}/market/stream?streams={market}") as ws:
        async with asyncio.timeout(10 * UNIT):
            while kinds.get("mark_price", 0) < 2 or kinds.get("agg_trade", 0) < 20:
                tick: Any = binance_usdm.parse_frame(await recv_text(ws), now_us())
                assert isinstance(tick, dict)
                kinds[tick["channel"]] = kinds.get(tick["channel"], 0) + 1
                if tick["channel"] == "mark_price":
                    assert tick["funding_rate"] == "0.00010000" and tick["next_funding_time"]
                    assert Decimal(tick["mark_px"]) > Decimal(tick["index_px"]) > 0
    assert "book_ticker" not in kinds  # acknowledged on /market, delivered only on /public
    last_u: int | None = None
    diffs = tickers = 0
    async with connect(f"{sim.ws_url}/public/stream?streams=btcusdt@depth@100ms/btcusdt@bookTicker") as ws:
        async with asyncio.timeout(10 * UNIT):
            while diffs < 5 or tickers < 5:
                text = await recv_text(ws)
                item = binance_usdm.parse_frame_depth(text, now_us())
                if isinstance(item, DepthDiff):
                    data = orjson.loads(text)["data"]
                    assert "T" in data
                    if last_u is not None:
                        assert data["pu"] == last_u
                    last_u = data["u"]
                    diffs += 1
                else:
                    assert isinstance(item, dict) and item["channel"] == "book_ticker"
                    data = orjson.loads(text)["data"]
                    assert data["e"] == "bookTicker" and data["E"] and data["T"]
                    tickers += 1


async def test_usdm_has_no_trade_stream(futures_sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await futures_sims(rate=0)
    async with connect(f"{sim.ws_url}/market/ws") as ws:
        await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":3}')
        reply = binance_usdm.parse_frame(await recv_text(ws), now_us())
        assert isinstance(reply, Reply) and reply.id == 3 and reply.error is not None and reply.error["code"] == 2
        await ws.send('{"method":"SUBSCRIBE","params":["btcusdt@markPrice@1s"],"id":4}')
        assert binance_usdm.parse_frame(await recv_text(ws), now_us()) == Reply(4, result=None)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{sim.ws_url}/market/stream?streams=btcusdt@trade"):
            pass
    assert refused.value.response.status_code == 400


async def test_usdm_rest_pages_agg_trades_and_serves_depth_with_futures_weights(
    futures_sims: Callable[..., Awaitable[Simulator]],
) -> None:
    sim = await futures_sims(rate=3000, depth=True, rest_weight_limit=2400)
    history = sim.market.history("BTCUSDT")
    await wait_until(lambda: history.agg_id_range[1] - history.agg_id_range[0] > 60)
    first = history.agg_id_range[0]
    ids: list[int] = []
    from_id = first
    for _ in range(3):
        call = binance_usdm.BINANCE_USDM_MARKET.backfill_call("agg_trade", "BTCUSDT", from_id, 20)
        assert call is not None and call.path == "/fapi/v1/aggTrades"
        query = "&".join(f"{k}={v}" for k, v in call.params.items())
        status, rows = await http_get(f"{sim.rest_url}{call.path}?{query}")
        assert status == 200
        assert all(set(r) == {"a", "p", "q", "f", "l", "T", "m"} for r in rows)  # USD-M's rows: no "M"
        ids += [r["a"] for r in rows]
        from_id = rows[-1]["a"] + 1
    assert ids == list(range(first, first + 60))
    head = await http_head(f"{sim.rest_url}/fapi/v1/aggTrades?symbol=BTCUSDT&limit=1")
    assert b"X-MBX-USED-WEIGHT-1M: 80" in head
    status, snap = await http_get(f"{sim.rest_url}/fapi/v1/depth?symbol=BTCUSDT&limit=5")
    assert status == 200 and len(snap["bids"]) == 5 and snap["E"] and snap["T"]
    status, body = await http_get(f"{sim.rest_url}/fapi/v1/depth?symbol=BTCUSDT&limit=7")
    assert status == 400 and body["code"] == -1130
    for path in ("/api/v3/aggTrades?symbol=BTCUSDT", "/fapi/v1/historicalTrades?symbol=BTCUSDT"):
        assert (await http_get(f"{sim.rest_url}{path}"))[0] == 404


async def test_usdm_a_removed_depth_diff_breaks_pu(futures_sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await futures_sims(rate=1000, depth=True, symbols=("BTCUSDT",))
    breaks = diffs = 0
    last_u: int | None = None
    async with connect(f"{sim.ws_url}/public/ws/btcusdt@depth@100ms") as ws:
        async with asyncio.timeout(10 * UNIT):
            while diffs < 8:
                data = orjson.loads(await recv_text(ws))
                if last_u is not None and data["pu"] != last_u:
                    breaks += 1
                last_u = data["u"]
                diffs += 1
                if diffs == 3:
                    assert (await http_get(f"{sim.rest_url}/control/depth_faults?schedule=drop@BTCUSDT"))[0] == 200
    assert breaks == 1


async def test_coinm_capture_is_served_as_coinm_serves_it(futures_sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await futures_sims(venue="binance_coinm", replay=COINM_CAPTURE, replay_rest=COINM_DEPTH, replay_speed=20.0)
    wanted = ("ethusd_210924@depth@100ms", "ethusd_210924@bookTicker")
    recorded = [
        orjson.loads(line)["frame"] for line in COINM_CAPTURE.read_bytes().splitlines()
        if orjson.loads(orjson.loads(line)["frame"])["stream"] in wanted
    ]  # fmt: skip
    received: list[str] = []
    async with connect(f"{sim.ws_url}/stream?streams={'/'.join(wanted)}") as ws:
        async with asyncio.timeout(60 * UNIT):
            while len(received) < len(recorded):
                received.append(await recv_text(ws))
    assert received == recorded  # the recorded bytes, on the unrouted path a capture was made on
    last_u: int | None = None
    for text in received:
        item = binance_coinm.parse_frame_depth(text, now_us())
        if isinstance(item, DepthDiff):
            data = orjson.loads(text)["data"]
            assert last_u is None or data["pu"] == last_u
            last_u = data["u"]
        else:
            assert isinstance(item, dict) and item["channel"] == "book_ticker"
    status, snap = await http_get(f"{sim.rest_url}/dapi/v1/depth?symbol=ETHUSD_210924&limit=1000")
    assert status == 200 and snap["lastUpdateId"] > 0 and snap["bids"]
    assert (await http_get(f"{sim.rest_url}/dapi/v1/depth?symbol=ETHUSD_210924&limit=7"))[1]["code"] == -1130
    assert (await http_get(f"{sim.rest_url}/api/v3/depth?symbol=ETHUSD_210924"))[0] == 404


# ------------------------------------------------------------------------------------------------ command line


def test_market_simulate_names_the_known_venues_for_an_unknown_one() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "simulate", "--port", "0", "--venue", "kraken"],
        capture_output=True, text=True, timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "kraken" in lines[0] and "binance, binance_usdm, binance_coinm, okx" in lines[0]


def test_market_simulate_refuses_a_symbol_of_another_venue() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "simulate", "--port", "0", "--venue", "okx", "--symbols", "BTCUSDT"],
        capture_output=True, text=True, timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "invalid okx symbol" in lines[0], proc.stderr


async def test_market_simulate_venue_okx_serves_okx_with_its_limits() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "simulate", "--venue", "okx", "--port", "0", "--rate", "500",
        "--idle-timeout", "0.5", "--book-checksum", stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(30 * UNIT):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "the simulator ended before it listened"
                if "simulator listening on " in line:
                    break
        ws_url = line.split("simulator listening on ", 1)[1].split(" ", 1)[0]
        async with connect(f"{ws_url}/ws/v5/public") as ws:
            await ws.send(subscribe([("books", "BTC-USDT-SWAP"), ("trades", "BTC-USDT")]))
            seen = {orjson.loads(await recv_text(ws))["arg"]["channel"] for _ in range(3)}
            assert seen == {"books", "trades"}  # two acks, then the book's snapshot
            books = 0
            while books < 3:  # a busy connection is never idle: data keeps being pushed
                frame = orjson.loads(await recv_text(ws))
                if frame.get("arg", {}).get("channel") == "books" and "data" in frame:
                    assert frame["data"][0]["checksum"] != 0
                    books += 1
            await ws.send(subscribe([("books", "BTC-USDT-SWAP"), ("trades", "BTC-USDT")], op="unsubscribe"))
            with pytest.raises(ConnectionClosed) as closed:
                while True:  # the rest of what was pushed, the two acks, then nothing: closed 0.5 s later
                    await recv_text(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
    finally:
        proc.terminate()
        await proc.wait()


async def test_rest_faults_by_each_venue_s_own_paths(
    okx_sims: Callable[..., Awaitable[OkxSimulator]], futures_sims: Callable[..., Awaitable[Simulator]]
) -> None:
    okx_sim = await okx_sims(rate=0, rest_faults="/api/v5/market/history-trades=429:3")
    status, body = await http_get(f"{okx_sim.rest_url}/api/v5/market/history-trades?instId=BTC-USDT")
    assert status == 429
    status, body = await http_get(f"{okx_sim.rest_url}/api/v5/market/history-trades?instId=BTC-USDT")
    assert status == 200 and body["code"] == "0"
    usdm = await futures_sims(rate=0, depth=True, rest_faults="/fapi/v1/aggTrades=503;depth=418")
    assert (await http_get(f"{usdm.rest_url}/fapi/v1/aggTrades?symbol=BTCUSDT"))[0] == 503
    assert (await http_get(f"{usdm.rest_url}/fapi/v1/aggTrades?symbol=BTCUSDT"))[0] == 200
    assert (await http_get(f"{usdm.rest_url}/fapi/v1/depth?symbol=BTCUSDT"))[0] == 418
    assert (await http_get(f"{usdm.rest_url}/fapi/v1/depth?symbol=BTCUSDT"))[0] == 200
    with pytest.raises(SimulatorConfigError, match="no REST endpoint"):
        usdm.set_rest_faults("/fapi/v1/historicalTrades", [])


async def test_okx_rotates_a_connection_with_the_64008_notice_first(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=0, max_connection_age=1.0 * UNIT, shutdown_notice=0.5 * UNIT, idle_timeout=30.0)
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        notice = orjson.loads(await recv_text(ws, timeout=5 * UNIT))
        assert (notice["event"], notice["code"]) == ("notice", "64008")
        assert isinstance(okx.parse_message(orjson.dumps(notice), now_us()), ServerShutdown)
        with pytest.raises(ConnectionClosed) as closed:
            await recv_text(ws, timeout=5 * UNIT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


async def test_okx_a_stall_does_not_count_as_the_client_s_silence(
    okx_sims: Callable[..., Awaitable[OkxSimulator]],
) -> None:
    sim = await okx_sims(rate=0, idle_timeout=1.0 * UNIT)
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        sim.stall(2.5 * UNIT)  # two and a half idle timeouts in which nothing the client sends is read
        pongs = 0
        async with asyncio.timeout(10 * UNIT):
            while sim.stalled or pongs < 5:
                await ws.send("ping")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1 * UNIT):
                        while await ws.recv() == "pong":
                            pongs += 1
        assert sim.fault_state()["idle_closes"] == 0
        await ws.send("ping")
        assert await recv_text(ws) == "pong"


async def test_okx_tickers_and_the_instruments_it_lists(okx_sims: Callable[..., Awaitable[OkxSimulator]]) -> None:
    sim = await okx_sims(rate=2000, symbols=("BTC-USDT", "BTC-USDT-SWAP", "BTC-USD-260327"))
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        await ws.send(subscribe([("tickers", "BTC-USDT-SWAP")]))
        assert orjson.loads(await recv_text(ws))["event"] == "subscribe"
        ticks: list[Any] = []
        async with asyncio.timeout(10 * UNIT):
            while len(ticks) < 5:
                text = await recv_text(ws)
                assert orjson.loads(text)["data"][0]["instType"] == "SWAP"
                parsed = okx.parse_message(text, now_us())
                assert isinstance(parsed, list) and len(parsed) == 1
                ticks.append(parsed[0])
    assert {t["channel"] for t in ticks} == {"book_ticker"} and {t["symbol"] for t in ticks} == {"BTC-USDT-SWAP"}
    times = [t["ts_event"] for t in ticks]
    assert all(later - earlier >= 100_000 for earlier, later in itertools.pairwise(times))  # at most every 100 ms
    listed: dict[str, list[str]] = {}
    for kind in ("SPOT", "SWAP", "FUTURES"):
        status, body = await http_get(f"{sim.rest_url}/api/v5/public/instruments?instType={kind}")
        assert status == 200 and all(row["state"] == "live" for row in body["data"])
        listed[kind] = [row["instId"] for row in body["data"]]
    assert listed == {"SPOT": ["BTC-USDT"], "SWAP": ["BTC-USDT-SWAP"], "FUTURES": ["BTC-USD-260327"]}
    assert (await http_get(f"{sim.rest_url}/api/v5/public/instruments"))[1]["code"] == "50014"


async def test_okx_wire_faults_from_the_control_endpoint(okx_sims: Callable[..., Awaitable[OkxSimulator]]) -> None:
    sim = await okx_sims(rate=1000, symbols=("BTC-USDT",))
    async with connect(f"{sim.ws_url}/ws/v5/public") as ws:
        await ws.send(subscribe([("trades", "BTC-USDT")]))
        assert orjson.loads(await recv_text(ws))["event"] == "subscribe"
        assert (await http_get(f"{sim.rest_url}/control/faults?duplicate=1"))[0] == 200
        texts = [await recv_text(ws) for _ in range(40)]
        ids = [orjson.loads(t)["data"][0]["tradeId"] for t in texts]
        pairs = [ids[i] == ids[i + 1] for i in range(len(ids) - 1)]
        assert sum(pairs) >= 15  # after the switch, every frame twice in a row
        assert (await http_get(f"{sim.rest_url}/control/faults?duplicate=0&malformed=1"))[0] == 200
        async with asyncio.timeout(5 * UNIT):
            while True:
                text = await recv_text(ws)
                try:
                    okx.parse_message(text, now_us())
                except MalformedFrame:
                    break
        status, _ = await http_get(f"{sim.rest_url}/control/close_all?abort=true")
        assert status == 200
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await recv_text(ws)
        assert closed.value.rcvd is None  # dropped, no close frame


@pytest.mark.parametrize("book_checksum", [False, True])
async def test_the_project_s_okx_books_follow_the_simulator_and_resync_once_on_a_removed_update(
    okx_sims: Callable[..., Awaitable[OkxSimulator]], book_checksum: bool
) -> None:
    """``DepthBooks`` with OKX's rule on the simulator's ``books``: never a resync on the continuous stream, exactly
    one (``gap``) when an update is removed, and live again from the snapshot of the subscription made anew."""
    sim = await okx_sims(rate=2000, depth=True, book_checksum=book_checksum, symbols=("BTC-USDT-SWAP",))
    resyncs: list[tuple[str, str]] = []
    resubscribe: list[str] = []
    books = DepthBooks(
        "okx", ["BTC-USDT-SWAP"], rule=DepthRule.OKX, on_resync=lambda s, r, d: resyncs.append((s, r)),
        on_resubscribe=lambda s, r: resubscribe.append(s),
    )
    applied = 0
    async with connect(f"{sim.ws_url}/ws/v5/public", max_size=2**24) as ws:
        await ws.send(subscribe([("books", "BTC-USDT-SWAP")]))
        async with asyncio.timeout(30 * UNIT):
            while applied < 60:
                item = okx.parse_frame_depth(await recv_text(ws), now_us())
                if not isinstance(item, DepthDiff):
                    continue
                books.on_diff(item, now_us())
                applied += 1
                if applied == 20:
                    assert resyncs == [] and books.book("BTC-USDT-SWAP") is not None
                    sim.set_depth_faults(parse_depth_faults("drop@BTC-USDT-SWAP"))
                if resubscribe:
                    resubscribe.clear()
                    await ws.send(subscribe([("books", "BTC-USDT-SWAP")], op="unsubscribe"))
                    await ws.send(subscribe([("books", "BTC-USDT-SWAP")]))
    assert resyncs == [("BTC-USDT-SWAP", "gap")]
    live = books.book("BTC-USDT-SWAP")
    assert live is not None
    bids, asks = live.top(25)
    assert len(bids) == len(asks) == 25 and Decimal(bids[0][0]) < Decimal(asks[0][0])
    if book_checksum:
        assert books.checksums["mismatch"] == 0 and books.checksums["equal"] >= 50
