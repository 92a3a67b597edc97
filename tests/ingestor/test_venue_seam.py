"""The session on its two seams, with their in-memory fakes: the venue (Binance spot) and the connector
(:mod:`ingestor.memory`), and the store behind the distributor (:mod:`distributor.memory`).

The session's real connect, subscribe, read, rotate, back-off and repair hand-off run here without a
socket; tests/ingestor/test_session_faults.py and tests/test_survival.py drive the same code over real sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import Tick, is_gap_marker
from distributor.ingress import IngressQueue, Policy
from distributor.memory import MemorySink
from distributor.service import Distributor
from distributor.sink import StreamSink
from distributor.writer import StreamWriter
from ingestor.binance import BINANCE_SPOT, RestCall
from ingestor.lifecycle import SessionState
from ingestor.memory import MemoryConnector, MemoryLink
from ingestor.repair import GapRepairer
from ingestor.sequencer import Sequencer
from ingestor.session import SessionSettings, VenueSession
from ingestor.subscriptions import subscribe_requests
from ingestor.venue import Heartbeat
from ingestor.wsframes import HandshakeRefused

TS = 1_700_000_000_000_000
T0_MS = 1_700_000_000_000
#: bound for every wait on a condition; generous so a slow machine does not flake
WAIT = 5.0
SETTINGS = SessionSettings(backoff_base=0.001, backoff_cap=0.002, requests_per_s=1000.0, healthy_after=0.0)


def trade(tid: int, symbol: str = "BTCUSDT") -> bytes:
    return orjson.dumps({
        "stream": f"{symbol.lower()}@trade",
        "data": {
            "e": "trade", "E": T0_MS + tid, "s": symbol, "t": tid, "p": f"{100 + tid}.5", "q": "0.25",
            "T": T0_MS + tid, "m": tid % 2 == 0,
        },
    })


def trade_row(tid: int) -> dict[str, Any]:
    """The ``historicalTrades`` row of the trade :func:`trade` sends live."""
    return {
        "id": tid, "price": f"{100 + tid}.5", "qty": "0.25", "quoteQty": "1", "time": T0_MS + tid,
        "isBuyerMaker": tid % 2 == 0, "isBestMatch": True,
    }


def answer_ok(message: str) -> list[bytes]:
    """The venue confirms every request at once."""
    return [orjson.dumps({"result": None, "id": orjson.loads(message)["id"]})]


def describe(ticks: list[Tick]) -> list[Any]:
    return [(t["gap_first"], t["gap_last"]) if is_gap_marker(t) else t["seq"] for t in ticks]  # type: ignore[typeddict-item]


async def until(condition: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.001)  # poll
    except TimeoutError:
        raise AssertionError(f"timed out after {WAIT} s waiting for: {what}") from None


async def take(ingress: IngressQueue[Tick], n: int) -> list[Tick]:
    """The next ``n`` items put into the ingress, waiting for them."""
    out: list[Tick] = []
    async with asyncio.timeout(WAIT):
        while len(out) < n:
            out += await ingress.get_batch(n - len(out))
    return out


class Rig:
    """A session on a fake connector, and what it feeds."""

    def __init__(self, streams: list[str], *, capacity: int = 1000, repair: Any = False,
                 answer: Any = answer_ok) -> None:
        self.connector = MemoryConnector(answer)
        self.ingress: IngressQueue[Tick] = IngressQueue(capacity, Policy.BLOCK)
        self.sequencer = Sequencer()
        self.latency = LatencyHistogram()
        self.repairer = None if repair is False else GapRepairer(repair, self.ingress, self.sequencer)
        self.session = VenueSession(
            ws_base="ws://venue.test/", streams=streams, ingress=self.ingress, sequencer=self.sequencer,
            ingest_latency=self.latency, repairer=self.repairer, settings=SETTINGS, connector=self.connector,
            sample_every=1,
        )

    async def live(self, n: int) -> MemoryLink:
        """The ``n``-th connection, once the session is live on it."""
        link = await self.connector.link(n)
        await until(lambda: self.session.state is SessionState.LIVE and self.connector.links[-1] is link,
                    f"live on connection {n}")
        return link


@asynccontextmanager
async def running(venue: Rig) -> AsyncIterator[asyncio.Task[None]]:
    tasks = [asyncio.create_task(venue.session.run())]
    if venue.repairer is not None:
        tasks.append(asyncio.create_task(venue.repairer.run()))
    try:
        yield tasks[0]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- connect, subscribe, read ------------------------------------------------------------------------------------
async def test_the_session_subscribes_with_the_venues_messages_and_stores_what_it_reads() -> None:
    v = Rig(["btcusdt@trade", "ethusdt@bookTicker"])
    async with running(v):
        link = await v.live(0)
        assert link.url == "ws://venue.test/stream"
        assert link.sent == ['{"method":"SUBSCRIBE","params":["btcusdt@trade","ethusdt@bookTicker"],"id":1}']
        assert v.connector.options == {
            "open_timeout": SETTINGS.open_timeout, "ping_interval": SETTINGS.ping_interval,
            "ping_timeout": SETTINGS.ping_timeout,
        }
        link.feed([trade(1), trade(2), b'{"e":"depthUpdate"}', trade(2), trade(3)], ts=TS)
        assert describe(await take(v.ingress, 3)) == [1, 2, 3]
        s = v.session
        # the subscribe confirmation was a frame too
        assert (s.frames, s.ticks, s.rejected, s.unsupported, s.malformed) == (6, 3, 1, 1, 0)
        assert s.last_frame_us == TS and v.latency.count == 3
        assert s.pipeline.stats().ticks == 3


async def test_a_malformed_frame_is_counted_and_the_connection_goes_on() -> None:
    v = Rig(["btcusdt@trade"])
    async with running(v):
        link = await v.live(0)
        link.feed([trade(1), b'{"stream":"btcusdt@trade","data":{"e":"trade","s":"BTCUSDT"}}', trade(2)])
        assert describe(await take(v.ingress, 2)) == [1, 2]
        assert v.session.malformed == 1 and v.session.reconnects == 0 and link.closed is None


async def test_a_full_ingress_under_block_stops_the_reading_until_there_is_room() -> None:
    v = Rig(["btcusdt@trade"], capacity=2)
    async with running(v):
        link = await v.live(0)
        link.feed([trade(i) for i in range(1, 7)])
        await until(lambda: len(v.ingress) == 2, "the ingress full")
        assert v.ingress.backpressure_events >= 1
        assert describe(await take(v.ingress, 6)) == [1, 2, 3, 4, 5, 6]


# -- reconnects ---------------------------------------------------------------------------------------------------
async def test_a_venue_close_reconnects_resubscribes_and_the_overlap_is_dropped() -> None:
    v = Rig(["btcusdt@trade"])
    async with running(v):
        first = await v.live(0)
        first.feed([trade(1), trade(2)])
        assert describe(await take(v.ingress, 2)) == [1, 2]
        first.close_from_venue(1001, "going away")
        second = await v.live(1)
        assert second.sent == ['{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":2}']
        second.feed([trade(2), trade(3)])
        assert describe(await take(v.ingress, 1)) == [3]
        s = v.session
        assert s.reconnects == 1 and s.connects == 2 and s.rejected == 1
        assert list(s.reconnect_reasons) == ["connection closed"]


async def test_a_refused_handshake_before_the_url_ever_worked_stops_the_session() -> None:
    v = Rig(["btcusdt@trade"])
    v.connector.fail_next(
        ConnectionRefusedError(111, "Connection refused"),
        HandshakeRefused("server rejected WebSocket connection: HTTP 404", 404, None),
    )
    with pytest.raises(ConfigError, match="HTTP 404"):
        async with asyncio.timeout(WAIT):
            await v.session.run()
    assert v.connector.attempts == 2 and v.session.reconnect_reasons == {"ConnectionRefusedError": 1}
    assert v.session.state is SessionState.CLOSED


async def test_the_same_refusal_once_live_is_an_outage_and_retried() -> None:
    v = Rig(["btcusdt@trade"])
    async with running(v):
        first = await v.live(0)
        v.connector.fail_next(HandshakeRefused("server rejected WebSocket connection: HTTP 404", 404, None))
        first.close_from_venue()
        await v.live(1)
        assert v.connector.attempts == 3 and v.session.reconnects == 2


async def test_a_shutdown_notice_rotates_make_before_break() -> None:
    v = Rig(["btcusdt@trade"])
    async with running(v):
        old = await v.live(0)
        old.feed([trade(1), trade(2), b'{"e":"serverShutdown","E":1700000000000}'])
        new = await v.live(1)
        await until(lambda: old.closed == "us", "the old connection closed by us")
        assert new.sent == ['{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":2}']
        new.feed([trade(2), trade(3)])
        assert describe(await take(v.ingress, 3)) == [1, 2, 3]
        assert v.session.rotations == 1 and v.session.reconnects == 0


async def test_a_rotation_the_venue_refuses_after_a_shutdown_notice_is_tried_again_after_the_rotation_timeout() -> None:
    """The notice is taken once: a new connection refused is tried again ``rotation_timeout`` later (for the same
    reason), not at once and again as fast as connects fail, while the old connection keeps delivering."""
    v = Rig(["btcusdt@trade"])
    v.session.settings = dataclasses.replace(SETTINGS, rotation_timeout=0.2)
    refused = HandshakeRefused("server rejected WebSocket connection: HTTP 503", 503, None)
    async with running(v):
        old = await v.live(0)
        v.connector.fail_next(refused, refused, refused)
        tried: list[float] = []
        old.feed([b'{"e":"serverShutdown","E":1700000000000}'])
        for n in range(2, 5):  # the first connect, then the three refused
            await until(lambda n=n: v.connector.attempts >= n, f"connect attempt {n}")  # type: ignore[misc]
            tried.append(time.monotonic())
            if n == 2:
                old.feed([trade(1)])
                assert describe(await take(v.ingress, 1)) == [1], "the old connection keeps delivering"
        new = await v.live(1)
        await until(lambda: old.closed == "us", "the old connection closed once the rotation succeeded")
        new.feed([trade(2)])
        assert describe(await take(v.ingress, 1)) == [2]
        assert v.connector.attempts == 5 and v.session.rotations == 1 and v.session.reconnects == 0
        # each retry waited about the rotation timeout (0.2 s; seen by polling, so a little less may show), where
        # a notice taken again at every round would retry at once
        assert all(b - a >= 0.15 for a, b in itertools.pairwise(tried)), tried


async def test_a_rotation_while_the_ingress_is_full_loses_none_of_the_old_connections_ticks() -> None:
    """The old connection is waiting for room with ticks the sequencer took: it finishes them before it
    is closed, and the new connection's newer ticks go in after them."""
    v = Rig(["btcusdt@trade"], capacity=2)
    async with running(v):
        old = await v.live(0)
        old.feed([b'{"e":"serverShutdown","E":1700000000000}'])
        old.feed([trade(i) for i in range(1, 7)])
        new = await v.connector.link(1)
        await until(lambda: len(v.ingress) == 2 and v.session.ticks == 6, "the old connection waiting for room")
        new.feed([trade(i) for i in range(1, 9)])
        assert describe(await take(v.ingress, 8)) == [1, 2, 3, 4, 5, 6, 7, 8]
        await until(lambda: old.closed == "us" and v.session.state is SessionState.LIVE, "the rotation done")
        assert v.session.rotations == 1 and v.session.rejected == 6


async def test_streams_added_and_removed_while_live() -> None:
    v = Rig(["btcusdt@trade"])
    async with running(v):
        link = await v.live(0)
        v.session.add_streams(["ethusdt@trade"])
        await until(lambda: len(link.sent) == 2, "the second request")
        assert link.sent[1] == '{"method":"SUBSCRIBE","params":["ethusdt@trade"],"id":2}'
        link.feed([trade(5, "ETHUSDT")])
        await take(v.ingress, 1)
        assert v.sequencer.last_seq("binance", "ETHUSDT", "trade") == 5
        v.session.remove_streams(["ethusdt@trade"])
        await until(lambda: v.sequencer.last_seq("binance", "ETHUSDT", "trade") is None, "the stream released")
        assert link.sent[2] == '{"method":"UNSUBSCRIBE","params":["ethusdt@trade"],"id":3}'
        assert v.session.streams == ["btcusdt@trade"] and v.session.unexpected_replies == 0


async def test_a_refused_subscription_is_asked_again() -> None:
    refusals = [1]

    def answer(message: str) -> list[bytes]:
        req = orjson.loads(message)
        if refusals:
            refusals.pop()
            return [orjson.dumps({"error": {"code": 2, "msg": "Invalid request"}, "id": req["id"]})]
        return answer_ok(message)

    v = Rig(["btcusdt@trade"], answer=answer)
    async with running(v):
        link = await v.live(0)
        assert [orjson.loads(m)["id"] for m in link.sent] == [1, 2]
        assert v.session.subscribe_errors == 1


# -- gaps and the repairer ----------------------------------------------------------------------------------------
async def test_an_unrepaired_gap_is_marked_after_the_ticks_before_it() -> None:
    v = Rig(["btcusdt@trade"], repair=None)  # a repairer without REST: every gap is marked
    async with running(v):
        link = await v.live(0)
        link.feed([trade(1), trade(2), trade(6), trade(7)])
        out = await take(v.ingress, 5)
        assert describe(out) == [1, 2, (3, 5), 6, 7]
        assert out[2]["ts_recv"] == out[3]["ts_recv"]  # type: ignore[typeddict-item]
        assert v.repairer is not None and v.repairer.gaps_unrepaired == 1
        assert v.latency.count == 4  # the ticks, not the marker


class Rows:
    """``historicalTrades`` from memory: the ids in ``have``."""

    def __init__(self, have: range) -> None:
        self.have = have
        self.calls: list[int] = []

    async def fetch(self, channel: str, symbol: str, from_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        self.calls.append(from_id)
        return [trade_row(i) for i in self.have if i >= from_id][:limit]

    async def aclose(self) -> None:
        return None


async def test_a_gap_is_held_repaired_and_released_in_order_with_the_later_ticks() -> None:
    rest = Rows(range(3, 6))
    v = Rig(["btcusdt@trade", "ethusdt@trade"], repair=rest)
    async with running(v):
        link = await v.live(0)
        link.feed([trade(1), trade(2), trade(6), trade(1, "ETHUSDT"), trade(7), trade(8)])
        out = await take(v.ingress, 9)
        btc = [t["seq"] for t in out if t["symbol"] == "BTCUSDT"]
        assert btc == [1, 2, 3, 4, 5, 6, 7, 8] and not any(is_gap_marker(t) for t in out)
        assert [t["seq"] for t in out if t["symbol"] == "ETHUSDT"] == [1]
        assert v.repairer is not None and v.repairer.gaps_repaired == 1 and rest.calls[0] == 3
        assert v.session.ticks == 6  # accepted from the venue; the repaired ones came over REST


# -- the public entry without a connection (market bench ingest) ---------------------------------------------------
async def test_ingest_takes_frames_through_the_real_path_without_a_connection() -> None:
    v = Rig([])
    assert await v.session.ingest(TS, [trade(1), trade(2), b'{"result":null,"id":9}', trade(2), trade(3)]) is None
    assert describe(await take(v.ingress, 3)) == [1, 2, 3]
    assert v.session.unexpected_replies == 1 and v.session.ticks == 3 and v.latency.count == 3


# -- the store behind the distributor ---------------------------------------------------------------------------
def test_the_writer_is_a_stream_sink() -> None:
    assert StreamSink in StreamWriter.__mro__ and StreamSink in MemorySink.__mro__


async def test_the_distributor_hands_batches_to_its_sink_and_waits_when_it_is_full() -> None:
    ingress: IngressQueue[Tick] = IngressQueue(100, Policy.BLOCK)
    sink = MemorySink(capacity=3)
    distributor = Distributor(ingress, sink, max_batch=2)
    task = asyncio.create_task(distributor.run())
    try:
        session = VenueSession(ws_base="ws://venue.test", streams=[], ingress=ingress, sequencer=Sequencer(),
                               ingest_latency=LatencyHistogram(), connector=MemoryConnector())
        assert await session.ingest(TS, [trade(i) for i in range(1, 8)]) is None
        await until(lambda: sink.refused >= 1, "the sink refusing a batch")
        got = sink.take()
        await until(lambda: len(got) + len(sink.stored) == 7 and not ingress, "every tick stored")
        got += sink.take()
        assert [t["seq"] for t in got] == [1, 2, 3, 4, 5, 6, 7]
        await sink.drain()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- Binance spot as a venue ----------------------------------------------------------------------------------------
def test_binance_spot_names_streams_and_builds_its_requests() -> None:
    b = BINANCE_SPOT
    assert (b.name, b.ws_path, b.heartbeat) == ("binance", "/stream", Heartbeat.WS_PING)
    for symbol, channel, stream in [("BTCUSDT", "agg_trade", "btcusdt@aggTrade"),
                                    ("ETHUSDT", "book_ticker", "ethusdt@bookTicker"),
                                    ("BNBUSDT", "kline_1m", "bnbusdt@kline_1m"), ("BTCUSDT", "trade", "btcusdt@trade"),
                                    ("BTCUSDT", "depth", "btcusdt@depth@100ms")]:
        assert b.stream_name(symbol, channel) == stream and b.split_stream(stream) == (symbol, channel)
    with pytest.raises(ValueError, match="not a stream"):
        b.split_stream("btcusdt@depth20")
    streams = [f"s{i}@trade" for i in range(5)]
    reqs = b.subscribe_requests(streams, 7, 2)
    assert [(r.id, r.streams) for r in reqs] == [(7, streams[:2]), (8, streams[2:4]), (9, streams[4:])]
    expected = subscribe_requests(streams, 7, per_request=2)
    assert [r.message for r in reqs] == [orjson.dumps(d).decode() for d in expected]
    gone = b.unsubscribe_requests(streams[:1], 3, 200)
    assert [r.message for r in gone] == ['{"method":"UNSUBSCRIBE","params":["s0@trade"],"id":3}']


def test_binance_spot_rest_calls() -> None:
    b = BINANCE_SPOT
    assert b.backfill_call("trade", "BTCUSDT", 5, 1000) == RestCall(
        "/api/v3/historicalTrades", {"symbol": "BTCUSDT", "fromId": 5, "limit": 1000}
    )
    assert b.backfill_call("agg_trade", "BTCUSDT", 0, 10) == RestCall(
        "/api/v3/aggTrades", {"symbol": "BTCUSDT", "fromId": 0, "limit": 10}
    )
    assert b.backfill_call("book_ticker", "BTCUSDT", 1, 10) is None
    assert b.snapshot_call("BTCUSDT", 100) == RestCall("/api/v3/depth", {"symbol": "BTCUSDT", "limit": 100})
