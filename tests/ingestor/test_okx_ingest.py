"""OKX v5 public through a running ingestor and a real session: the capture into Redis, the text heartbeat against a
real WebSocket server, the venue's error answers, gap repair over ``history-trades``.

The replay feeds the real capture (``okx-2022-05-13.jsonl``: subscribe acks, ``tickers``, ``trades`` and ``books``
of a spot, a future and a swap) through an in-memory connection into the real pipeline and the real Redis, and
checks every stored trade against the frame it came from, field by field, built here from the frame's JSON (not
by the ingestor's parser).  The heartbeat and error tests run a real WebSocket server in the test that speaks OKX's
subscribe protocol and goes silent, never answers ``ping``, or answers a subscribe with ``{"event": "error"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.server import ServerConnection, serve

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import stream_key
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import decode_tick, is_gap_marker
from distributor.ingress import IngressQueue
from ingestor.config import IngestSettings
from ingestor.depth import DepthRule
from ingestor.memory import MemoryConnector
from ingestor.okx import OKX_V5
from ingestor.repair import RepairSettings
from ingestor.rest import VenueRest
from ingestor.sequencer import Sequencer
from ingestor.service import Ingestor
from ingestor.session import SessionSettings, VenueSession
from ingestor.venues import venue_profile

CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "okx-2022-05-13.jsonl"
SYMBOLS = ("BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP")


def load_capture() -> list[tuple[bytes, int]]:
    out = []
    for line in CAPTURE.read_bytes().splitlines():
        rec = orjson.loads(line)
        out.append((rec["frame"].encode(), int(rec["recv_ts"] * 1e6)))
    return out


FRAMES = load_capture()


def okx_acks(message: str) -> list[bytes]:
    """OKX's answer to a subscribe request: one ack per stream, each echoing the request's id; to ``ping``,
    ``pong``."""
    if message == "ping":
        return [b"pong"]
    req = orjson.loads(message)
    return [orjson.dumps({"event": req["op"], "arg": arg, "id": req["id"]}) for arg in req["args"]]


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.005)  # poll the condition
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@contextlib.asynccontextmanager
async def running(
    settings: IngestSettings, aredis: aioredis.Redis, repair_rest: VenueRest | None = None
) -> AsyncIterator[tuple[Ingestor, MemoryConnector]]:
    connector = MemoryConnector(okx_acks)
    ingestor = Ingestor(settings, redis=aredis, connector=connector, repair_rest=repair_rest)
    task = asyncio.create_task(ingestor.run())
    try:
        await ingestor.started.wait()
        yield ingestor, connector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def okx_settings(prefix: str, channels: tuple[str, ...] = ("trade", "book_ticker"), **kw: Any) -> IngestSettings:
    return IngestSettings(
        venue="okx", url="ws://venue.test:8443", rest_url="http://venue.test", symbols=SYMBOLS, channels=channels,
        prefix=prefix, spill_dir="", session=SessionSettings(backoff_base=0.01, backoff_cap=0.02, healthy_after=0.01),
        **kw,
    )


def expected_trades() -> list[dict[str, Any]]:
    """Every trade of the capture as the tick its frame says it is (built from the JSON, not by the parser)."""
    out = []
    for raw, _ in FRAMES:
        frame = orjson.loads(raw)
        if frame.get("arg", {}).get("channel") != "trades" or "data" not in frame:
            continue
        for d in frame["data"]:
            out.append({
                "v": 1, "venue": "okx", "symbol": frame["arg"]["instId"], "channel": "trade",
                "seq": int(d["tradeId"]), "trade_id": int(d["tradeId"]), "ts_event": int(d["ts"]) * 1000,
                "price": d["px"], "qty": d["sz"], "side": d["side"],
            })
    return out


async def stored(aredis: aioredis.Redis, key: str) -> list[dict[str, Any]]:
    items: Any = await aredis.xrange(key, "-", "+")
    return [dict(decode_tick(fields[b"d"])) for _, fields in items]


async def stored_trades(aredis: aioredis.Redis, prefix: str, n: int) -> list[dict[str, Any]]:
    keys = [stream_key("okx", s, "trade", prefix) for s in SYMBOLS]

    async def count() -> int:
        return sum([await aredis.xlen(k) for k in keys])

    async with asyncio.timeout(20):
        while await count() < n:
            await asyncio.sleep(0.01)  # poll Redis
    out = []
    for key in keys:
        out += await stored(aredis, key)
    return out


def by_stream(ticks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for t in ticks:
        out.setdefault(t["symbol"], []).append(t)
    return out


async def replay(ingestor: Ingestor, connector: MemoryConnector, frames: list[tuple[bytes, int]]) -> None:
    link = await connector.link(0)
    await until(lambda: ingestor.sessions[0].state.value == "live", "the connection is live")
    session = ingestor.sessions[0]
    for raw, ts in frames:
        link.feed([raw], ts=ts)
    await until(lambda: session.frames >= len(frames), "every frame read")


async def test_the_capture_stores_every_trade_as_its_frame_says(aredis: aioredis.Redis, prefix: str) -> None:
    want = expected_trades()
    assert len(want) == 74
    async with running(okx_settings(prefix), aredis) as (ingestor, connector):
        assert [sorted(s.streams) for s in ingestor.sessions] == [sorted(
            f"{c}:{s}" for s in SYMBOLS for c in ("trades", "bbo-tbt")
        )]
        assert (await connector.link(0)).url == "ws://venue.test:8443/ws/v5/public"
        await replay(ingestor, connector, FRAMES)
        got = await stored_trades(aredis, prefix, len(want))
        session = ingestor.sessions[0]
        # the capture's own acks (to requests without an id) and its books (not subscribed here) are refused,
        # never stored; nothing else is
        assert session.refused.get("unsubscribed") == 290
        assert session.unexpected_replies == 18
        book = await stored(aredis, stream_key("okx", "BTC-USDT", "book_ticker", prefix))
    assert not any(is_gap_marker(t) for t in got)  # type: ignore[arg-type]
    for t in got:
        assert t.pop("ts_recv") > 0
    assert by_stream(got) == by_stream(want)
    assert book and {t["channel"] for t in book} == {"book_ticker"}, "tickers stored as the book ticker"


async def test_pushes_of_several_trades_store_the_same_as_one_each(aredis: aioredis.Redis, prefix: str) -> None:
    """The capture's BTC-USDT trades merged three to a push: the same ticks, in the same order."""
    pushes: list[tuple[bytes, int]] = []
    batch: list[Any] = []
    last_ts = 0
    for raw, ts in FRAMES:
        frame = orjson.loads(raw)
        if "data" in frame and frame["arg"]["channel"] == "trades" and frame["arg"]["instId"] == "BTC-USDT":
            batch += frame["data"]
            last_ts = ts
            if len(batch) == 3:
                pushes.append((orjson.dumps({"arg": frame["arg"], "data": batch}), ts))
                batch = []
    if batch:
        pushes.append((orjson.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": batch}), last_ts))
    want = [t for t in expected_trades() if t["symbol"] == "BTC-USDT"]
    async with running(okx_settings(prefix, ("trade",)), aredis) as (ingestor, connector):
        await replay(ingestor, connector, pushes)
        got = await stored_trades(aredis, prefix, len(want))
        assert ingestor.sessions[0].ticks == len(want) and not ingestor.sessions[0].refused
    for t in got:
        del t["ts_recv"]
    assert got == want


def history_row(tid: int) -> dict[str, str]:
    return {"instId": "BTC-USDT", "side": "sell", "sz": "0.01", "px": f"{30000 + tid}.5", "tradeId": str(tid),
            "ts": str(1652459224000 + tid)}


def trade_push(*tids: int) -> bytes:
    return orjson.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": [history_row(t) for t in tids]})


async def test_a_trade_gap_is_repaired_over_history_trades_and_marked_where_the_venue_has_none(
    aredis: aioredis.Redis, prefix: str
) -> None:
    asked: list[httpx.URL] = []
    has = {3, 4, 5, 7, 8}  # and 6, a row counting two trades: left out, its id marked

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        assert request.url.path == "/api/v5/market/history-trades" and request.url.params["type"] == "1"
        after, limit = int(request.url.params["after"]), int(request.url.params["limit"])
        rows: list[dict[str, str]] = [history_row(t) for t in sorted(has | {6}, reverse=True) if t < after][:limit]
        for row in rows:
            if row["tradeId"] == "6":
                row["count"] = "2"
        body = orjson.dumps({"code": "0", "msg": "", "data": rows})
        return httpx.Response(200, stream=httpx.ByteStream(body), headers={"Content-Type": "application/json"})

    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(answer), venue=OKX_V5)
    settings = okx_settings(prefix, ("trade",), repair=RepairSettings(hold_s=10.0))
    async with running(settings, aredis, repair_rest=rest) as (ingestor, connector):
        link = await connector.link(0)
        await until(lambda: ingestor.sessions[0].state.value == "live", "the connection is live")
        link.feed([trade_push(1, 2), trade_push(9)])
        key = stream_key("okx", "BTC-USDT", "trade", prefix)
        async with asyncio.timeout(20):
            while await aredis.xlen(key) < 9:
                await asyncio.sleep(0.01)  # poll Redis
        got = await stored(aredis, key)
    seqs = [(t["seq"], is_gap_marker(t)) for t in got]  # type: ignore[arg-type]
    assert seqs == [(1, False), (2, False), (3, False), (4, False), (5, False), (6, True), (7, False), (8, False),
                    (9, False)]
    marker = got[5]
    assert (marker["gap_first"], marker["gap_last"]) == (6, 6)
    assert got[2]["price"] == "30003.5" and got[2]["venue"] == "okx", "as fetched"
    assert asked and asked[0].params["instId"] == "BTC-USDT"


def test_okx_channels_and_symbols_of_its_profile() -> None:
    profile = venue_profile("okx")
    profile.check_channels(["trade", "book_ticker", "depth"])
    profile.check_channels(["depth"], depth_ms=1000)  # OKX's books have one speed: depth.speed_ms does not apply
    assert profile.depth_rule is DepthRule.OKX
    assert profile.stream_name("BTC-USDT", "depth") == "books:BTC-USDT"
    with pytest.raises(ConfigError, match="expected trade or book_ticker or depth"):
        profile.check_channels(["agg_trade"])
    for symbol in ("BTC-USDT", "BTC-USDT-SWAP", "BTC-USD-220527"):
        profile.check_symbol(symbol)
    with pytest.raises(ConfigError, match="invalid symbol 'BTCUSDT' for okx: expected an OKX instrument id"):
        profile.check_symbol("BTCUSDT")
    assert profile.default_rest_url("wss://ws.okx.com:8443") == "https://www.okx.com"
    assert profile.stream_name("BTC-USDT-SWAP", "book_ticker") == "bbo-tbt:BTC-USDT-SWAP"


# -- a real WebSocket server speaking OKX's protocol ---------------------------------------------------------------


@dataclass
class OkxServer:
    """Acks subscribes as OKX does; answers ``ping`` with ``pong`` unless ``pong`` is False; answers a subscribe of
    an instrument in ``refuse`` with ``{"event": "error"}`` (code ``refuse[instId]``) instead."""

    pong: bool = True
    refuse: dict[str, str] = field(default_factory=dict)
    #: every text message received, by connection number
    received: list[list[str]] = field(default_factory=list)
    url: str = ""

    async def handler(self, ws: ServerConnection) -> None:
        mine: list[str] = []
        self.received.append(mine)
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                assert isinstance(message, str)
                mine.append(message)
                if message == "ping":
                    if self.pong:
                        await ws.send("pong")
                    continue
                req = orjson.loads(message)
                for arg in req["args"]:
                    code = self.refuse.pop(arg["instId"], None)
                    if code is not None:
                        await ws.send(orjson.dumps({"event": "error", "code": code, "msg": "refused",
                                                    "id": req["id"]}).decode())
                    else:
                        await ws.send(orjson.dumps({"event": req["op"], "arg": arg, "id": req["id"]}).decode())


@contextlib.asynccontextmanager
async def okx_server(server: OkxServer) -> AsyncIterator[OkxServer]:
    async with serve(server.handler, "127.0.0.1", 0, ping_interval=None) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        server.url = f"ws://127.0.0.1:{port}"
        yield server


@contextlib.asynccontextmanager
async def okx_session(server: OkxServer, streams: list[str], **kw: Any) -> AsyncIterator[VenueSession]:
    session = VenueSession(
        ws_base=server.url, streams=streams, ingress=IngressQueue(1000), sequencer=Sequencer(),
        ingest_latency=LatencyHistogram(), venue=OKX_V5,
        settings=SessionSettings(ping_interval=0.3, ping_timeout=0.5, stall_timeout=60.0, backoff_base=0.01,
                                 backoff_cap=0.05, healthy_after=0.1, **kw),
    )
    task = asyncio.create_task(session.run())
    try:
        yield session
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_silent_connection_gets_the_text_ping_and_stays_up_on_pong() -> None:
    async with okx_server(OkxServer()) as server, okx_session(server, ["trades:BTC-USDT"]) as session:
        await until(lambda: session.pings_sent >= 3 and len(server.received[0]) >= 4, "three pings on a silent link")
        assert session.state.value == "live" and session.reconnects == 0
        assert server.received[0][0].startswith('{"id":"1","op":"subscribe"')
        assert server.received[0][1:4] == ["ping"] * 3, "the text ping, nothing else, while nothing arrives"
        assert "no_pong" not in session.refused
        # the server answered each ping; its third pong may still be on the wire when the third ping has arrived
        await until(lambda: session.unsupported >= 3, "each pong read, never stored")
        assert session.ticks == 0 and session.state.value == "live" and session.reconnects == 0


async def test_a_ping_left_unanswered_drops_the_connection_which_reconnects_and_resubscribes() -> None:
    async with okx_server(OkxServer(pong=False)) as server, okx_session(server, ["trades:BTC-USDT"]) as session:
        await until(lambda: len(server.received) >= 2 and len(server.received[1]) >= 1, "a second connection")
        await until(lambda: session.state.value == "live", "live again")
        assert session.refused["no_pong"] >= 1 and session.reconnects >= 1
        assert any(key.startswith("heartbeat") for key in session.reconnect_reasons)
        first, second = server.received[0], server.received[1]
        assert first[1] == "ping"
        assert orjson.loads(second[0])["args"] == [{"channel": "trades", "instId": "BTC-USDT"}], "resubscribed"


async def test_an_error_answer_is_counted_and_retried_when_retryable_not_when_not() -> None:
    server = OkxServer(refuse={"ETH-USDT": "60014", "NOPE-USDT": "60018"})
    async with okx_server(server), okx_session(
        server, ["trades:BTC-USDT", "trades:ETH-USDT", "trades:NOPE-USDT"], params_per_request=1
    ) as session:
        # BTC acked; ETH refused for too many requests (retryable), NOPE as an instrument that does not exist
        await until(lambda: session.venue_errors == {"60014": 1, "60018": 1}, "both errors counted")
        await until(lambda: session.state.value == "live", "live with what the venue has")
        def requests() -> list[str]:
            return [m for m in server.received[0] if m != "ping"]

        await until(lambda: len(requests()) == 4, "ETH asked again")
        asked = [a["instId"] for m in requests() for a in orjson.loads(m)["args"]]
        assert asked == ["BTC-USDT", "ETH-USDT", "NOPE-USDT", "ETH-USDT"]
        assert session.subscribe_errors == 2 and session.reconnects == 0


def test_an_okx_ingestor_refuses_a_symbol_that_is_not_an_instrument_id() -> None:
    with pytest.raises(ConfigError, match="invalid symbol 'BTCUSDT' for okx: expected an OKX instrument id"):
        Ingestor(IngestSettings(venue="okx", symbols=("BTC-USDT", "BTCUSDT"), channels=("trade",), spill_dir=""))
    with pytest.raises(ConfigError, match="channel 'mark_price' is not available on okx"):
        Ingestor(IngestSettings(venue="okx", symbols=("BTC-USDT",), channels=("mark_price",), spill_dir=""))


# -- pure parts: several ticks in one frame, the rate windows ------------------------------------------------------


def test_a_gap_in_the_middle_of_a_push_stops_there_and_the_rest_of_the_push_follows() -> None:
    from ingestor.pipeline import BadFrame, GapFound, IngestPipeline

    pipe = IngestPipeline(OKX_V5, Sequencer())
    carried = {"BTC-USDT": {"trade"}}
    frames = [trade_push(1, 2, 5, 6), trade_push(7), trade_push(8, 2**41, 9)]
    out = pipe.process(10, frames, 0, carried)
    assert [t["seq"] for t in out.ticks] == [1, 2]
    assert type(out.event) is GapFound and out.event.tick["seq"] == 5 and out.resume == 1
    assert (out.event.gap.first, out.event.gap.last) == (3, 4)
    out = pipe.process(10, frames, out.resume, carried)  # 6 (the rest of the first push), then 7 and 8
    assert [t["seq"] for t in out.ticks] == [6, 7, 8]
    assert type(out.event) is BadFrame and out.event.kind == "id_jump" and out.resume == 3
    out = pipe.process(10, frames, out.resume, carried)  # 9: the rest of the push after the refused id
    assert [t["seq"] for t in out.ticks] == [9] and out.event is None and out.resume == 3
    assert (pipe.frames, pipe.ticks, pipe.refused) == (3, 7, {"id_jump": 1})  # 1, 2, 5..9
    # a push of a stream not subscribed is refused whole, once
    out = pipe.process(11, [trade_push(10, 11)], 0, {"BTC-USDT": {"book_ticker"}})
    assert out.ticks == [] and type(out.event) is BadFrame and out.event.kind == "unsubscribed"
    assert pipe.process(11, [trade_push(10, 11)], 1, carried).ticks == [], "nothing of it left over"
