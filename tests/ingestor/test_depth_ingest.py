"""Order books end to end: the depth frames of the real spot capture through a running ingestor (an in-memory
connection, REST snapshots answered from the recorded ones) into the real Redis, read back and rebuilt.

The test plays the venue with its own model of each book, plain dicts of Decimal built from the recorded REST
snapshot and the recorded diffs (never the ingestor's DepthSync or Book): a snapshot request is answered with the
venue's book as of the last diff handed to the connection, and every stored entry is checked against the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from captured_books import (
    FIXTURES,
    QUICK_SESSION,
    Run,
    VenueModel,
    answer_ok,
    as_sides,
    last_ids,
    load_diffs,
    reply,
    until,
)
from captured_books import check_stream as check_venue_stream
from captured_books import load_snapshots as load_venue_snapshots
from captured_books import running as running_settings
from captured_books import stored as stored_venue
from captured_books import wait_stored as wait_venue_stored
from prometheus_client import CollectorRegistry, generate_latest

from consumer_sdk.book_stream import BookEntry
from consumer_sdk.core.keys import stream_key
from consumer_sdk.core.tick import Tick
from distributor.control import LimitPolicy
from distributor.ingress import Policy
from ingestor.binance import BINANCE_SPOT
from ingestor.config import DepthSettings, IngestSettings
from ingestor.control_plane import update_state
from ingestor.depth import DepthDiff
from ingestor.depth_books import DepthBooks
from ingestor.depth_fetch import DepthFetcher
from ingestor.depth_pacer import SnapshotPacer
from ingestor.memory import MemoryConnector
from ingestor.metrics import IngestorCollector
from ingestor.rest import VenueRest
from ingestor.service import Ingestor

FRAMES = FIXTURES / "binance-spot-2021-10-12.jsonl"
SNAPSHOTS = FIXTURES / "binance-spot-2021-10-12.depth.jsonl"
SYMBOLS = ("NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR")


def load_snapshots() -> dict[str, dict[str, Any]]:
    return load_venue_snapshots(SNAPSHOTS, "/api/v3/depth")


@contextlib.asynccontextmanager
async def running(aredis: aioredis.Redis, prefix: str, venue: VenueModel, **settings_: Any) -> AsyncIterator[Run]:
    settings = IngestSettings(
        url="ws://venue.test:9443", rest_url="http://venue.test", symbols=SYMBOLS, channels=("depth",),
        prefix=prefix, spill_dir="", depth=settings_.pop("depth", DepthSettings()), session=QUICK_SESSION,
        **settings_,
    )
    rest = VenueRest(settings.rest_url, transport=httpx.MockTransport(venue.answer))
    async with running_settings(settings, aredis, depth_rest=rest) as run:
        yield run


async def stored(aredis: aioredis.Redis, prefix: str, symbol: str) -> list[BookEntry]:
    return await stored_venue(aredis, prefix, "binance", symbol)


async def wait_stored(aredis: aioredis.Redis, prefix: str, last: dict[str, int]) -> None:
    await wait_venue_stored(aredis, prefix, "binance", last)


def check_stream(entries: list[BookEntry], venue: VenueModel, symbol: str) -> list[str]:
    return check_venue_stream(entries, venue, "binance", symbol)


# -- the capture, continuous ------------------------------------------------------------------------------------


async def test_the_captured_depth_stream_is_stored_and_rebuilds_to_the_venues_book(
    aredis: aioredis.Redis, prefix: str
) -> None:
    diffs = load_diffs(FRAMES)
    venue = VenueModel(load_snapshots(), diffs)
    seen: list[Tick] = []
    async with running(aredis, prefix, venue, depth=DepthSettings(snapshot_every_s=10.0)) as run:
        ing = run.ingestor
        ing.subscribe(seen.append, "binance:*:depth", policy="block")
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs, venue)
        await wait_stored(aredis, prefix, last_ids(diffs))
        depth = ing.depth
        assert depth is not None
        assert depth.resyncs == {}, "zero resyncs: the capture is continuous"
        for symbol in SYMBOLS:
            live = ing.book(symbol)
            assert live is not None and live is ing.book(symbol), "the live book itself, not a copy"
            assert as_sides(live.levels()) == venue.books[symbol][last_ids(diffs)[symbol]]
        held = {symbol: await stored(aredis, prefix, symbol) for symbol in SYMBOLS}
        await until(lambda: len(seen) == sum(len(e) for e in held.values()), "the subscriber fed every entry")
    for symbol in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, symbol), venue, symbol)
        assert reasons[0] == "start" and set(reasons[1:]) <= {"periodic"}, reasons
    # a periodic snapshot every 10 s of venue time, at the symbol's own phase: the 30 s capture crosses such
    # boundaries, so the busiest book stored periodic snapshots there
    assert "periodic" in check_stream(await stored(aredis, prefix, "NKNUSDT"), venue, "NKNUSDT")
    assert sorted(set(venue.requests)) == sorted(SYMBOLS) and len(venue.requests) == len(SYMBOLS)
    # the co-located subscriber got every entry stored, as ticks of the channel depth
    assert {t["channel"] for t in seen} == {"depth"}
    for symbol in SYMBOLS:
        assert [t["seq"] for t in seen if t["symbol"] == symbol] == [e.seq for e in held[symbol]]


async def test_one_diff_missing_resyncs_that_book_only(
    aredis: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    diffs = load_diffs(FRAMES)
    venue = VenueModel(load_snapshots(), diffs)
    nkn = [i for i, d in enumerate(diffs) if d.symbol == "NKNUSDT"]
    gone = nkn[len(nkn) // 2]
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:gone], venue)
        venue.hand(diffs[gone])  # the venue applied it; the connection never delivers it
        await run.feed(link, diffs[gone + 1:], venue)
        await wait_stored(aredis, prefix, last_ids(diffs))
        assert ing.depth is not None and ing.depth.resyncs == {("NKNUSDT", "gap"): 1}
        snap = ing.snapshot().depth
        assert snap is not None and snap.resyncs == {("NKNUSDT", "gap"): 1} and snap.live == len(SYMBOLS)
        registry = CollectorRegistry()
        registry.register(IngestorCollector(ing))
        text = generate_latest(registry).decode()
        assert 'market_book_resync_total{reason="gap",symbol="NKNUSDT",venue="binance"} 1.0' in text
        assert text.count("market_book_resync_total{") == 1
        assert [r.getMessage() for r in caplog.records if r.getMessage() == "book_resync"] == ["book_resync"]
    for symbol in SYMBOLS:
        entries = await stored(aredis, prefix, symbol)
        reasons = check_stream(entries, venue, symbol)
        resyncs = [r for r in reasons if r.startswith("resync")]
        assert resyncs == (["resync:gap"] if symbol == "NKNUSDT" else []), (symbol, reasons)
    # the missing diff is not stored, the book went on from the resync snapshot
    nkn_entries = await stored(aredis, prefix, "NKNUSDT")
    assert diffs[gone].last not in {e.seq for e in nkn_entries if not e.is_snapshot}
    assert venue.requests.count("NKNUSDT") == 2 and len(venue.requests) == len(SYMBOLS) + 1


async def test_a_reconnect_mid_stream_stores_a_resync_snapshot_and_the_stream_goes_on(
    aredis: aioredis.Redis, prefix: str
) -> None:
    diffs = load_diffs(FRAMES)
    venue = VenueModel(load_snapshots(), diffs)
    half = 2 * len(diffs) // 3
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        depth = ing.depth
        assert depth is not None
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:half], venue)
        await until(lambda: all(ing.book(s) is not None for s in SYMBOLS), "every book in step")
        await wait_stored(aredis, prefix, last_ids(diffs[:half]))
        link.close_from_venue()
        second = await run.connector.link(1)
        await until(lambda: ing.sessions[0].state.value == "live", "the new connection is live")
        assert all(ing.book(s) is None for s in SYMBOLS), "no book is offered while it is out of step"
        await run.feed(second, diffs[half:], venue)
        await wait_stored(aredis, prefix, last_ids(diffs))
        after = {d.symbol for d in diffs[half:]}
        assert depth.resyncs == {(s, "reconnect"): 1 for s in SYMBOLS}
    for symbol in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, symbol), venue, symbol)
        resyncs = [r for r in reasons if r.startswith("resync")]
        assert resyncs == (["resync:reconnect"] if symbol in after else []), (symbol, reasons)


@pytest.mark.parametrize(
    ("status", "headers", "body", "kind"),
    [
        (429, {"Retry-After": "0"}, b'{"code":-1003,"msg":"Too many requests"}', "http_status"),
        (418, {"Retry-After": "0"}, b'{"code":-1003,"msg":"banned"}', "http_status"),
        (200, {}, b'{"lastUpdateId":1,"bids":[["1.0","2"]', "bad_json"),
        (200, {}, b'{"code":-1121,"msg":"Invalid symbol."}', "bad_snapshot"),
        (200, {}, b'{"lastUpdateId":5,"bids":[["x","1"]],"asks":[]}', "bad_snapshot"),
    ],
    ids=["429", "418", "truncated", "error-body", "bad-level"],
)
async def test_a_bad_snapshot_reply_is_counted_and_asked_again(
    aredis: aioredis.Redis, prefix: str, status: int, headers: dict[str, str], body: bytes, kind: str
) -> None:
    diffs = load_diffs(FRAMES)
    venue = VenueModel(load_snapshots(), diffs)
    bad = {"left": 1}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.params["symbol"] == "NKNUSDT" and bad["left"]:
            bad["left"] -= 1
            return reply(status, body, headers)
        return venue.answer(request)

    settings = IngestSettings(
        url="ws://venue.test:9443", rest_url="http://venue.test", symbols=SYMBOLS, channels=("depth",),
        prefix=prefix, spill_dir="",
    )
    connector = MemoryConnector(answer_ok)
    rest = VenueRest(settings.rest_url, transport=httpx.MockTransport(answer))
    ingestor = Ingestor(settings, redis=aredis, connector=connector, depth_rest=rest)
    task = asyncio.create_task(ingestor.run())
    try:
        run = Run(ingestor, connector)
        link = await connector.link(0)
        await until(lambda: ingestor.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs, venue)
        await wait_stored(aredis, prefix, last_ids(diffs))
        snap = ingestor.snapshot().depth
        assert snap is not None and snap.failures == {kind: 1}
        assert snap.resyncs == {("NKNUSDT", "snapshot_error"): 1}, "only that book waited for another snapshot"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for symbol in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, symbol), venue, symbol)
        assert not [r for r in reasons if r.startswith("resync")], "the book was not stored before it was in step"


async def test_a_restart_continues_each_stream_after_what_redis_holds(aredis: aioredis.Redis, prefix: str) -> None:
    diffs = load_diffs(FRAMES)
    venue = VenueModel(load_snapshots(), diffs)
    half = len(diffs) // 2
    async with running(aredis, prefix, venue) as run:
        link = await run.connector.link(0)
        await until(lambda: run.ingestor.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:half], venue)
        await wait_stored(aredis, prefix, last_ids(diffs[:half]))
    before = {symbol: len(await stored(aredis, prefix, symbol)) for symbol in SYMBOLS}
    async with running(aredis, prefix, venue) as run:
        link = await run.connector.link(0)
        await until(lambda: run.ingestor.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[half:], venue)
        await wait_stored(aredis, prefix, last_ids(diffs))
        assert run.ingestor.depth is not None and run.ingestor.depth.resyncs == {}
    for symbol in SYMBOLS:
        entries = await stored(aredis, prefix, symbol)
        reasons = check_stream(entries, venue, symbol)
        assert entries[before[symbol]].reason == "start", "the new writer's first entry is a start snapshot"
        assert [r for r in reasons if r != "periodic"] == ["start", "start"], reasons


async def test_many_books_wanting_snapshots_at_once_stay_within_the_weight_budget() -> None:
    """Five books want a snapshot; the budget holds two requests a minute: two go, the rest wait their turn."""
    symbols = [f"S{i}USDT" for i in range(5)]
    books = DepthBooks("binance", symbols)
    answered: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        answered.append(request.url.params["symbol"])
        body = {"lastUpdateId": 10, "bids": [["1.0", "1"]], "asks": [["2.0", "1"]]}
        return reply(200, orjson.dumps(body))

    stored_ticks: list[Tick] = []

    async def store(symbol: str, ticks: list[Tick]) -> None:
        stored_ticks.extend(ticks)

    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(answer))
    pacer = SnapshotPacer(weight_per_minute=100, share=1.0)  # a 1000-level snapshot weighs 50: two a minute
    fetcher = DepthFetcher(books, rest, BINANCE_SPOT, store, limit=1000, pacer=pacer)
    for symbol in symbols:
        books.on_diff(DepthDiff(symbol, 10, 10, None, 1, (), ()), 0)
    task = asyncio.create_task(fetcher.run())
    try:
        await until(lambda: len(stored_ticks) == 2, "two books loaded")
        assert fetcher.requests == 2 and len(answered) == 2 and len(books.wanted) == 3
        now = time.monotonic()
        assert pacer.stats(now).spent == 100
        assert all(pacer.next_allowed(now, 50, s) > now + 50 for s in books.wanted), "the rest wait for the window"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await fetcher.aclose()


# -- under the operator's controls and the ingress policy -------------------------------------------------------


async def raw_entries(aredis: aioredis.Redis, prefix: str, symbol: str) -> list[dict[str, Any]]:
    items: Any = await aredis.xrange(stream_key("binance", symbol, "depth", prefix), "-", "+")
    return [orjson.loads(fields[b"d"]) for _, fields in items]


def resync_metric(ing: Ingestor) -> str:
    registry = CollectorRegistry()
    registry.register(IngestorCollector(ing))
    return generate_latest(registry).decode()


async def test_a_paused_book_resumes_with_a_resync_snapshot_and_no_marker(aredis: aioredis.Redis, prefix: str) -> None:
    diffs = load_diffs(FRAMES)
    venue = VenueModel(load_snapshots(), diffs)
    third = len(diffs) // 3
    middle = diffs[third: 2 * third]
    paused_nkn = sum(1 for d in middle if d.symbol == "NKNUSDT")
    assert paused_nkn > 10
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:third], venue)
        await wait_stored(aredis, prefix, last_ids(diffs[:third]))
        await update_state(aredis, prefix, lambda s: s.with_pause("binance:NKNUSDT:depth", who="t", at=1.0),
                           who="t@h", action="pause")
        await until(lambda: ing.control.stats().pauses == 1, "the pause is in force")
        await run.feed(link, middle, venue)
        await until(lambda: ing.control.stats().paused_by_stream.get("binance:NKNUSDT:depth") == paused_nkn,
                    "every NKNUSDT entry of the pause reached the gate")
        await update_state(aredis, prefix, lambda s: s.without_pause("binance:NKNUSDT:depth"), who="t@h",
                           action="resume")
        await until(lambda: ing.control.stats().pauses == 0, "the pause is lifted")
        await run.feed(link, diffs[2 * third:], venue)
        await wait_stored(aredis, prefix, last_ids(diffs))
        assert ing.depth is not None and ing.depth.resyncs == {("NKNUSDT", "paused"): 1}
        assert ing.control.stats().markers == 0 and ing.control.stats().books_broken == 0
        text = resync_metric(ing)
        assert 'market_book_resync_total{reason="paused",symbol="NKNUSDT",venue="binance"} 1.0' in text
    for symbol in SYMBOLS:
        raw = await raw_entries(aredis, prefix, symbol)
        assert not any("gap_first" in t or t.get("kind") not in ("diff", "snapshot") for t in raw), "no gap marker"
        reasons = check_stream(await stored(aredis, prefix, symbol), venue, symbol)  # rebuilds at every entry
        if symbol == "NKNUSDT":
            assert reasons.count("resync:paused") == 1, reasons
            seqs = [t["seq"] for t in raw]
            assert not any(d.last in seqs for d in middle if d.symbol == symbol), "nothing stored while paused"
        else:
            assert set(reasons) <= {"start", "periodic"}, reasons


@pytest.mark.parametrize("policy", list(LimitPolicy))
async def test_a_limit_on_books_leaves_them_whole(aredis: aioredis.Redis, prefix: str, policy: LimitPolicy) -> None:
    diffs = load_diffs(FRAMES)
    venue = VenueModel(load_snapshots(), diffs)
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        await update_state(aredis, prefix, lambda s: s.with_limit("binance:*:depth", 1.0, policy, who="t", at=1.0),
                           who="t@h", action="limit")
        await until(lambda: ing.control.stats().limits == 1, "the limit is in force")
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs, venue)
        await wait_stored(aredis, prefix, last_ids(diffs))
        stats = ing.control.stats()
        assert stats.limited_dropped == stats.limited_conflated == stats.held == 0
        assert ing.depth is not None and ing.depth.resyncs == {}
    for symbol in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, symbol), venue, symbol)
        assert set(reasons) <= {"start", "periodic"}, reasons
    assert len(await stored(aredis, prefix, "NKNUSDT")) > 100, "every NKNUSDT diff stored, far above 1 a second"


@pytest.mark.parametrize("policy", [Policy.DROP_OLDEST, Policy.DROP_NEWEST])
async def test_entries_the_ingress_drops_resync_their_books(aredis: aioredis.Redis, prefix: str,
                                                             policy: Policy) -> None:
    diffs = load_diffs(FRAMES)
    venue = VenueModel(load_snapshots(), diffs)
    half = len(diffs) // 2
    # the burst: 40 NKNUSDT diffs of the second half; the rest after it, each symbol's diffs in their order
    burst = [d for d in diffs[half:] if d.symbol == "NKNUSDT"][:40]
    rest = [d for d in diffs[half:] if d not in burst]
    assert sum(1 for d in rest if d.symbol == "NKNUSDT") > 10
    async with running(aredis, prefix, venue, queue_capacity=8, queue_policy=policy) as run:
        ing = run.ingestor
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:half], venue)
        await wait_stored(aredis, prefix, last_ids(diffs[:half]))
        assert ing.ingress.dropped == 0
        # one socket read of 40 frames: its entries go to the queue with no await between them, so 8 fit
        for d in burst:
            venue.hand(d)
        link.feed([d.raw for d in burst], ts=burst[-1].ts)
        run.fed += len(burst)
        await until(lambda: run.frames() >= run.fed, "the burst read")
        assert ing.ingress.dropped == len(burst) - 8
        await run.feed(link, rest, venue)
        await wait_stored(aredis, prefix, last_ids(diffs))
        depth = ing.depth
        assert depth is not None and depth.resyncs == {("NKNUSDT", "dropped"): 1}
        assert ing.control.stats().books_broken == 0
        text = resync_metric(ing)
        assert 'market_book_resync_total{reason="dropped",symbol="NKNUSDT",venue="binance"} 1.0' in text
    for symbol in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, symbol), venue, symbol)  # rebuilds at every entry
        assert set(reasons) <= {"start", "periodic", "resync:dropped"}, reasons
    assert "resync:dropped" in check_stream(await stored(aredis, prefix, "NKNUSDT"), venue, "NKNUSDT")
