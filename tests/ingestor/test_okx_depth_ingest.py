"""OKX ``books`` (channel ``depth``) through a running ingestor into the real Redis.

Against the simulator's OKX profile (real WebSockets, ``books`` in today's form: ``seqId``/``prevSeqId``, checksum 0
or, with ``book_checksum``, OKX's crc32): a continuous stream never resyncs and the stored stream rebuilds to the
venue's book; an update removed by the venue (``drop``) resyncs that book once, by unsubscribing and subscribing
its stream again on the same connection, and the stored stream carries a ``resync:gap`` snapshot and is whole;
a connection lost resyncs every book it carried without a resubscription.  The venue's book is read from the
simulator's own state at the ``seqId`` the ingestor's book is at (the simulator's books keep changing).

The real capture (``okx-2022-05-13.jsonl``, OKX's checksum on every one of its 290 ``books`` messages) through an
in-memory connection: every checksum equal, no resync; a level altered in one message: one ``checksum`` resync of
that book, its stream alone subscribed again (the venue refusing the unsubscribe changes nothing of that).  The
metrics are read from the ingestor's exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from consumer_sdk.book import Level
from consumer_sdk.book_stream import BookEntry, Rebuilder, decode_all, rebuild
from consumer_sdk.core.keys import stream_key
from ingestor.config import IngestSettings
from ingestor.memory import MemoryConnector, MemoryLink
from ingestor.metrics import IngestorCollector
from ingestor.okx import OkxV5
from ingestor.service import Ingestor
from ingestor.session import SessionSettings, VenueSession
from ops.simulator.config import SimulatorConfig
from ops.simulator.depth_faults import parse_depth_faults
from ops.simulator.okx import OkxSimulator
from ops.simulator.okx_protocol import okx_decimal

CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "okx-2022-05-13.jsonl"
CAPTURED = ("BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP")
SYMBOLS = ("BTC-USDT", "BTC-USDT-SWAP")
QUICK = SessionSettings(backoff_base=0.01, backoff_cap=0.02, healthy_after=0.01)
TOP = 50


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.002)  # poll the condition
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@contextlib.asynccontextmanager
async def simulator(**settings: Any) -> AsyncIterator[OkxSimulator]:
    settings.setdefault("rate", 1000.0)
    async with OkxSimulator(SimulatorConfig(venue="okx", symbols=SYMBOLS, depth=True, **settings)) as sim:
        yield sim


@contextlib.asynccontextmanager
async def running(settings: IngestSettings, aredis: aioredis.Redis,
                  connector: MemoryConnector | None = None) -> AsyncIterator[Ingestor]:
    ingestor = Ingestor(settings, redis=aredis, connector=connector)
    task = asyncio.create_task(ingestor.run())
    try:
        started = asyncio.ensure_future(ingestor.started.wait())
        async with asyncio.timeout(20):
            await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if task.done():
            task.result()  # it failed before it started: its error
        assert ingestor.started.is_set()
        yield ingestor
    finally:
        task.cancel()
        try:
            async with asyncio.timeout(30):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        except TimeoutError:
            raise AssertionError("the ingestor did not stop within 30 s of its cancellation") from None


def depth_settings(url: str, prefix: str, symbols: tuple[str, ...] = SYMBOLS,
                   session: SessionSettings = QUICK) -> IngestSettings:
    return IngestSettings(
        venue="okx", url=url, rest_url=url.replace("ws", "http", 1), symbols=symbols, channels=("depth",),
        prefix=prefix, spill_dir="", session=session,
    )


def scrape(ingestor: Ingestor) -> str:
    registry = CollectorRegistry()
    registry.register(IngestorCollector(ingestor))
    return generate_latest(registry).decode()


def venue_top(sim: OkxSimulator, symbol: str) -> tuple[int, tuple[Level, ...], tuple[Level, ...]]:
    """The simulator's book now: its last ``seqId`` sent and its best ``TOP`` levels a side, as OKX writes them."""
    assert sim.depth is not None
    book = sim.depth.book(symbol)
    tick = book.tick_size
    bids = tuple((okx_decimal(p * tick), okx_decimal(book.bids[p])) for p in sorted(book.bids, reverse=True)[:TOP])
    asks = tuple((okx_decimal(p * tick), okx_decimal(book.asks[p])) for p in sorted(book.asks)[:TOP])
    return book.prev_u, bids, asks


async def caught(ingestor: Ingestor, sim: OkxSimulator, symbol: str) -> tuple[int, tuple[Level, ...],
                                                                            tuple[Level, ...]]:
    """The venue's book at the first instant the ingestor's book is at the same ``seqId`` (both read in one step
    of the loop), and the ingestor's live book equal to it then."""
    assert ingestor.depth is not None
    seen: list[tuple[int, tuple[Level, ...], tuple[Level, ...]]] = []

    def same() -> bool:
        assert ingestor.depth is not None
        seq, bids, asks = venue_top(sim, symbol)
        if ingestor.depth.last_update_id(symbol) != seq:
            return False
        seen.append((seq, bids, asks))
        return True

    await until(same, f"{symbol}'s book at the venue's seqId")
    seq, bids, asks = seen[0]
    live = ingestor.book(symbol)
    assert live is not None and live.top(TOP) == (bids, asks), "the live book is the venue's"
    return seq, bids, asks


async def stored(aredis: aioredis.Redis, prefix: str, symbol: str, at_least: int) -> list[BookEntry]:
    """The symbol's stored ``depth`` entries, once one with ``seq`` at or above ``at_least`` is in."""
    key = stream_key("okx", symbol, "depth", prefix)
    async with asyncio.timeout(20):
        while True:
            top: Any = await aredis.xrevrange(key, "+", "-", count=1)
            if top and decode_all([(top[0][0], top[0][1][b"d"])])[0].seq >= at_least:
                break
            await asyncio.sleep(0.01)  # poll Redis
    items: Any = await aredis.xrange(key, "-", "+")
    return decode_all([(eid, fields[b"d"]) for eid, fields in items])


def whole(entries: list[BookEntry]) -> list[str]:
    """The stream read from its first entry with the SDK's rebuilder (raises on a break); its snapshots' reasons
    (the ``periodic`` ones, which the snapshot policy places, left out)."""
    rebuilder = Rebuilder()
    for entry in entries:
        rebuilder.feed(entry)
    assert rebuilder.book is not None and rebuilder.breaks == 0
    return [e.reason or "" for e in entries if e.is_snapshot and e.reason != "periodic"]


async def test_a_continuous_books_stream_never_resyncs_and_the_stored_stream_rebuilds_to_the_venues_book(
    aredis: aioredis.Redis, prefix: str
) -> None:
    async with simulator(book_checksum=True) as sim, running(depth_settings(sim.ws_url, prefix), aredis) as ingestor:
        depth = ingestor.depth
        assert depth is not None and ingestor.depth_fetcher is None, "no REST snapshot is fetched for OKX"
        assert [s.streams for s in ingestor.sessions] == [["books:BTC-USDT", "books:BTC-USDT-SWAP"]]
        await until(lambda: depth.diffs_stored >= 80, "80 diffs stored")
        at = {symbol: await caught(ingestor, sim, symbol) for symbol in SYMBOLS}
        stats = ingestor.snapshot().depth
        assert stats is not None
        assert stats.resyncs == {} and stats.resubscribing == () and stats.live == 2
        assert stats.checksums["mismatch"] == 0 and stats.checksums["equal"] >= 80
        assert ingestor.sessions[0].resubscribes == 0 and ingestor.sessions[0].reconnects == 0
        for symbol, (seq, bids, asks) in at.items():
            entries = await stored(aredis, prefix, symbol, seq)
            assert whole(entries) == ["start"]  # one snapshot, then diffs, each following the one before
            assert rebuild(entries, seq=seq).top(TOP) == (bids, asks), "the stored stream rebuilds to the venue's"


@pytest.mark.parametrize("book_checksum", [False, True])
async def test_an_update_removed_resyncs_that_book_once_by_subscribing_its_stream_again(
    aredis: aioredis.Redis, prefix: str, book_checksum: bool
) -> None:
    async with simulator(book_checksum=book_checksum) as sim, \
            running(depth_settings(sim.ws_url, prefix), aredis) as ingestor:
        depth = ingestor.depth
        assert depth is not None
        session = ingestor.sessions[0]
        await until(lambda: depth.diffs_stored >= 20, "20 diffs stored")
        sim.set_depth_faults(parse_depth_faults("drop@BTC-USDT"))
        await until(lambda: bool(depth.resyncs), "the removed update seen")
        assert depth.resyncs == {("BTC-USDT", "gap"): 1}
        await until(lambda: depth.book("BTC-USDT") is not None, "the book back from its new subscription's snapshot")
        assert session.resubscribes == 1 and session.reconnects == 0 and depth.resubscribing == []
        assert sim.depth is not None and sim.depth.book("BTC-USDT").dropped == 1
        at = {symbol: await caught(ingestor, sim, symbol) for symbol in SYMBOLS}
        assert depth.resyncs == {("BTC-USDT", "gap"): 1}, "one resync, of that book only"
        assert depth.checksums["mismatch"] == 0 and (depth.checksums["equal"] > 0) is book_checksum
        for symbol, (seq, bids, asks) in at.items():
            entries = await stored(aredis, prefix, symbol, seq)
            assert whole(entries) == (["start", "resync:gap"] if symbol == "BTC-USDT" else ["start"])
            assert rebuild(entries, seq=seq).top(TOP) == (bids, asks)
        text = scrape(ingestor)
        assert 'market_book_resync_total{reason="gap",symbol="BTC-USDT",venue="okx"} 1.0' in text
        assert text.count("market_book_resync_total{") == 1
        assert 'market_venue_resubscribes_total{venue="okx"} 1.0' in text
        assert 'market_books_resubscribing{venue="okx"} 0.0' in text
        assert 'market_book_checksums_total{result="mismatch",venue="okx"} 0.0' in text
        assert "market_book_snapshot_failures_total{" not in text


async def test_a_connection_lost_resyncs_every_book_it_carried_without_subscribing_again(
    aredis: aioredis.Redis, prefix: str
) -> None:
    async with simulator() as sim, running(depth_settings(sim.ws_url, prefix), aredis) as ingestor:
        depth = ingestor.depth
        assert depth is not None
        session = ingestor.sessions[0]
        await until(lambda: depth.diffs_stored >= 20, "20 diffs stored")
        sim.close_all()
        await until(lambda: session.reconnects == 1 and depth.stats().live == 2, "both books back after a reconnect")
        assert depth.resyncs == {("BTC-USDT", "reconnect"): 1, ("BTC-USDT-SWAP", "reconnect"): 1}
        assert session.resubscribes == 0
        # stored in place of the first update after the new snapshot (which may be at the seqId last stored)
        await until(lambda: depth.stats().snapshots_stored.get("resync") == 2, "both resync snapshots stored")
        for symbol in SYMBOLS:
            seq, bids, asks = await caught(ingestor, sim, symbol)
            entries = await stored(aredis, prefix, symbol, seq)
            assert whole(entries) == ["start", "resync:reconnect"]
            assert rebuild(entries, seq=seq).top(TOP) == (bids, asks)


# -- the capture, through an in-memory connection ----------------------------------------------------------------


def capture() -> list[tuple[bytes, int]]:
    out = []
    for line in CAPTURE.read_bytes().splitlines():
        rec = orjson.loads(line)
        out.append((rec["frame"].encode(), int(rec["recv_ts"] * 1e6)))
    return out


def okx_acks(message: str) -> list[bytes]:
    if message == "ping":
        return [b"pong"]
    req = orjson.loads(message)
    return [orjson.dumps({"event": req["op"], "arg": arg, "id": req["id"]}) for arg in req["args"]]


async def replay(ingestor: Ingestor, connector: MemoryConnector, frames: list[tuple[bytes, int]]) -> MemoryLink:
    link = await connector.link(0)
    session = ingestor.sessions[0]
    await until(lambda: session.state.value == "live", "the connection is live")
    start = session.frames
    for raw, ts in frames:
        link.feed([raw], ts=ts)
    await until(lambda: session.frames >= start + len(frames), "every frame read")
    return link


async def test_the_capture_s_290_checksums_are_equal_through_the_running_ingestor(
    aredis: aioredis.Redis, prefix: str
) -> None:
    connector = MemoryConnector(okx_acks)
    quiet_soon = SessionSettings(backoff_base=0.01, backoff_cap=0.02, healthy_after=0.01, ping_interval=0.5)
    settings = depth_settings("ws://venue.test:8443", prefix, CAPTURED, quiet_soon)
    async with running(settings, aredis, connector) as ingestor:
        await replay(ingestor, connector, capture())
        await until(lambda: ingestor.sessions[0].pings_sent >= 1, "a text ping once the capture is over")
        text = scrape(ingestor)
        assert 'market_book_checksums_total{result="equal",venue="okx"} 290.0' in text
        assert 'market_book_checksums_total{result="mismatch",venue="okx"} 0.0' in text
        assert 'market_venue_pings_sent_total{venue="okx"}' in text and "market_venue_errors_total{" not in text
        assert ingestor.sessions[0].reconnects == 0, "the pong answered it"
        stats = ingestor.snapshot().depth
        assert stats is not None
        assert stats.checksums == {"equal": 290, "mismatch": 0}
        assert stats.resyncs == {} and stats.live == 3
        assert ingestor.sessions[0].refused.get("unsubscribed") == 74 + 28, "its trades and tickers: not asked for"
        for symbol in CAPTURED:
            last = ingestor.depth.last_update_id(symbol)  # type: ignore[union-attr]
            assert last is not None
            entries = await stored(aredis, prefix, symbol, last)
            assert whole(entries) == ["start"]
            live = ingestor.book(symbol)
            assert live is not None and rebuild(entries).levels() == live.levels()


def tampered(frames: list[tuple[bytes, int]], symbol: str, nth: int) -> tuple[list[tuple[bytes, int]], int]:
    """``frames`` with the best bid's size of ``symbol``'s ``nth`` update raised by one unit of its last digit."""
    out = list(frames)
    n = 0
    for i, (raw, ts) in enumerate(frames):
        frame = orjson.loads(raw)
        if frame.get("arg") != {"channel": "books", "instId": symbol} or frame.get("action") != "update":
            continue
        n += 1
        bids = frame["data"][0]["bids"]
        if n >= nth and bids and bids[0][1] != "0":
            size = bids[0][1]
            bids[0][1] = size[:-1] + str((int(size[-1]) + 1) % 10) if size[-1] != "9" else size + "1"
            out[i] = (orjson.dumps(frame), ts)
            return out, i
    raise AssertionError(f"no update of {symbol} to alter")


async def test_a_level_altered_in_the_capture_resyncs_that_book_by_its_checksum_and_subscribes_it_again(
    aredis: aioredis.Redis, prefix: str
) -> None:
    frames, _ = tampered(capture(), "BTC-USD-220527", 10)

    def refuse_unsubscribe(message: str) -> list[bytes]:
        """OKX's answers, and an error event to an unsubscribe (it asks nothing that a subscribe needs)."""
        if message != "ping" and orjson.loads(message)["op"] == "unsubscribe":
            rid = orjson.loads(message)["id"]
            return [orjson.dumps({"event": "error", "code": "60012", "msg": "Invalid request", "id": rid})]
        return okx_acks(message)

    connector = MemoryConnector(refuse_unsubscribe)
    settings = depth_settings("ws://venue.test:8443", prefix, CAPTURED)
    async with running(settings, aredis, connector) as ingestor:
        depth = ingestor.depth
        assert depth is not None
        link = await replay(ingestor, connector, frames)
        session = ingestor.sessions[0]
        await until(lambda: session.resubscribes == 1, "the stream subscribed again")
        assert depth.resyncs == {("BTC-USD-220527", "checksum"): 1} and depth.checksums["mismatch"] == 1
        asked = [orjson.loads(m) for m in link.sent if m != "ping"][-2:]
        assert [(m["op"], m["args"]) for m in asked] == [
            ("unsubscribe", [{"channel": "books", "instId": "BTC-USD-220527"}]),
            ("subscribe", [{"channel": "books", "instId": "BTC-USD-220527"}]),
        ]
        # the capture sends no new snapshot: the book waits for it, the others are in step
        assert depth.resubscribing == ["BTC-USD-220527"] and depth.book("BTC-USD-220527") is None
        assert depth.book("BTC-USDT") is not None and depth.book("UNI-USD-SWAP") is not None
        assert ingestor.snapshot().depth.resubscribing == ("BTC-USD-220527",)  # type: ignore[union-attr]
        text = scrape(ingestor)
        assert 'market_book_resync_total{reason="checksum",symbol="BTC-USD-220527",venue="okx"} 1.0' in text
        assert 'market_book_checksums_total{result="mismatch",venue="okx"} 1.0' in text
        assert 'market_books_resubscribing{venue="okx"} 1.0' in text
        assert 'market_venue_errors_total{code="60012",venue="okx"} 1.0' in text
        assert session.reconnects == 0


class _FewOps(OkxV5):
    """OKX with an hourly budget of 3 subscribe operations a connection."""

    max_ops_per_hour = 3  # type: ignore[misc]


async def test_a_resubscription_keeps_to_the_connections_hourly_operations(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first subscribe and one resubscription (unsubscribe, subscribe) are the 3 operations of the hour: the
    next resubscription's unsubscribe waits for the window (logged), unsent."""
    from consumer_sdk.core.latency import LatencyHistogram
    from distributor.ingress import IngressQueue
    from ingestor.sequencer import Sequencer

    connector = MemoryConnector(okx_acks)
    session = VenueSession(
        ws_base="ws://venue.test", streams=["books:BTC-USDT"], ingress=IngressQueue(100), sequencer=Sequencer(),
        ingest_latency=LatencyHistogram(), venue=_FewOps(), connector=connector, settings=QUICK,
    )
    task = asyncio.create_task(session.run())
    try:
        await until(lambda: session.state.value == "live", "live")
        link = await connector.link(0)
        session.resubscribe(["books:BTC-USDT"])
        session.resubscribe(["books:BTC-USDT"])  # already being subscribed again: not asked twice
        await until(lambda: session.resubscribes == 1, "subscribed again")
        with caplog.at_level(logging.WARNING, logger="session"):
            session.resubscribe(["books:BTC-USDT"])
            await until(lambda: "subscribe_ops_limit" in caplog.text, "the hourly limit reached")
        ops = [orjson.loads(m)["op"] for m in link.sent if m != "ping"]
        assert ops == ["subscribe", "unsubscribe", "subscribe"]
        assert session.resubscribes == 1
        session.resubscribe(["books:ETH-USDT"])  # not carried: nothing
        assert [m for m in link.sent if m != "ping"] == link.sent[: len(ops)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_rotation_on_the_venue_s_64008_notice_keeps_every_book_without_a_resync(
    aredis: aioredis.Redis, prefix: str
) -> None:
    """Make-before-break: the new connection's snapshots and updates overlap the old one's; the books take each
    message once (an update already applied, or a snapshot behind the book, is dropped) and never resync."""
    async with simulator(max_connection_age=2.0, shutdown_notice=1.5, book_checksum=True) as sim, \
            running(depth_settings(sim.ws_url, prefix), aredis) as ingestor:
        depth = ingestor.depth
        assert depth is not None
        session = ingestor.sessions[0]
        await until(lambda: session.rotations >= 1, "rotated on the notice")
        rotated_at = depth.diffs_stored
        await until(lambda: depth.diffs_stored >= rotated_at + 20, "20 diffs stored after the rotation")
        assert depth.resyncs == {} and session.resubscribes == 0 and depth.checksums["mismatch"] == 0
        assert session.reconnects == 0
        for symbol in SYMBOLS:
            seq, bids, asks = await caught(ingestor, sim, symbol)
            entries = await stored(aredis, prefix, symbol, seq)
            assert set(whole(entries)) <= {"start", "resync:snapshot"}
            assert rebuild(entries, seq=seq).top(TOP) == (bids, asks)
