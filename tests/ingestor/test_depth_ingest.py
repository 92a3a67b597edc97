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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from consumer_sdk.book_stream import BookEntry, decode_all, rebuild
from consumer_sdk.core.keys import stream_key
from consumer_sdk.core.tick import Tick
from distributor.control import LimitPolicy
from distributor.ingress import Policy
from ingestor.binance import BINANCE_SPOT
from ingestor.config import DepthSettings, IngestSettings
from ingestor.control_plane import update_state
from ingestor.depth import DepthDiff
from ingestor.depth_books import BookView, DepthBooks
from ingestor.depth_fetch import DepthFetcher
from ingestor.depth_pacer import SnapshotPacer
from ingestor.memory import MemoryConnector, MemoryLink
from ingestor.metrics import IngestorCollector
from ingestor.rest import VenueRest
from ingestor.service import Ingestor
from ingestor.session import SessionSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FRAMES = FIXTURES / "binance-spot-2021-10-12.jsonl"
SNAPSHOTS = FIXTURES / "binance-spot-2021-10-12.depth.jsonl"
SYMBOLS = ("NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR")

Side = dict[Decimal, Decimal]


@dataclass
class Diff:
    symbol: str
    first: int
    last: int
    raw: bytes
    ts: int
    bids: list[list[str]]
    asks: list[list[str]]


def load_diffs() -> list[Diff]:
    out = []
    for line in FRAMES.read_bytes().splitlines():
        rec = orjson.loads(line)
        data = orjson.loads(rec["frame"])["data"]
        if data.get("e") == "depthUpdate":
            out.append(Diff(data["s"], data["U"], data["u"], rec["frame"].encode(), int(rec["recv_ts"] * 1e6),
                            data["b"], data["a"]))
    return out


def load_snapshots() -> dict[str, dict[str, Any]]:
    out = {}
    for line in SNAPSHOTS.read_bytes().splitlines():
        rec = orjson.loads(line)
        symbol = httpx.URL(rec["url"]).params["symbol"]
        out[symbol] = orjson.loads(rec["body"])
    return out


def apply(side: Side, levels: list[list[str]]) -> None:
    for price, qty in levels:
        if Decimal(qty) == 0:
            side.pop(Decimal(price), None)
        else:
            side[Decimal(price)] = Decimal(qty)


@dataclass
class VenueModel:
    """The venue's books as the test knows them: the recorded snapshot, then every recorded diff after it."""

    snapshots: dict[str, dict[str, Any]]
    diffs: list[Diff]
    #: per symbol: update id -> (bids, asks) after it, from the snapshot's id on
    books: dict[str, dict[int, tuple[Side, Side]]] = field(default_factory=dict)
    #: per symbol: the last update id handed to the connection
    handed: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for symbol, snap in self.snapshots.items():
            bids: Side = {Decimal(p): Decimal(q) for p, q in snap["bids"]}
            asks: Side = {Decimal(p): Decimal(q) for p, q in snap["asks"]}
            last = snap["lastUpdateId"]
            at = self.books[symbol] = {last: (dict(bids), dict(asks))}
            for d in self.diffs:
                if d.symbol != symbol or d.last <= last:
                    continue
                assert d.first <= last + 1, "the capture is continuous after each recorded snapshot"
                apply(bids, d.bids)
                apply(asks, d.asks)
                at[d.last] = (dict(bids), dict(asks))
                last = d.last

    def hand(self, diff: Diff) -> None:
        self.handed[diff.symbol] = diff.last

    def answer(self, request: httpx.Request) -> httpx.Response:
        """``/api/v3/depth``: the book as of the last diff handed over (the recorded snapshot before it)."""
        assert request.url.path == "/api/v3/depth"
        symbol = request.url.params["symbol"]
        assert request.url.params["limit"] == "1000"
        self.requests.append(symbol)
        at = self.books[symbol]
        last = max(self.snapshots[symbol]["lastUpdateId"], self.handed.get(symbol, 0))
        bids, asks = at[last]
        body = {
            "lastUpdateId": last,
            "bids": [[f"{p:f}", f"{q:f}"] for p, q in sorted(bids.items(), reverse=True)],
            "asks": [[f"{p:f}", f"{q:f}"] for p, q in sorted(asks.items())],
        }
        return reply(200, orjson.dumps(body))


def reply(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """A response whose body is streamed, as from a socket (the client reads it as it arrives)."""
    return httpx.Response(status, stream=httpx.ByteStream(body), headers={"Content-Type": "application/json",
                                                                          **(headers or {})})


def as_sides(book: BookView) -> tuple[Side, Side]:
    bids, asks = book.levels()
    return {Decimal(p): Decimal(q) for p, q in bids}, {Decimal(p): Decimal(q) for p, q in asks}


def answer_ok(message: str) -> list[bytes]:
    return [orjson.dumps({"result": None, "id": orjson.loads(message)["id"]})]


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.005)  # poll the condition
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@dataclass
class Run:
    ingestor: Ingestor
    connector: MemoryConnector
    venue: VenueModel
    fed: int = 0

    def frames(self) -> int:
        return sum(s.frames for s in self.ingestor.sessions)

    async def feed(self, link: MemoryLink, diffs: list[Diff]) -> None:
        """Each diff as one socket read, once the one before it was read."""
        for d in diffs:
            self.venue.hand(d)
            link.feed([d.raw], ts=d.ts)
            self.fed += 1
            await until(lambda: self.frames() >= self.fed, f"frame {self.fed} read")


@contextlib.asynccontextmanager
async def running(aredis: aioredis.Redis, prefix: str, venue: VenueModel, **settings_: Any) -> AsyncIterator[Run]:
    settings = IngestSettings(
        url="ws://venue.test:9443", rest_url="http://venue.test", symbols=SYMBOLS, channels=("depth",),
        prefix=prefix, spill_dir="", depth=DepthSettings(),
        session=SessionSettings(backoff_base=0.01, backoff_cap=0.02, healthy_after=0.01), **settings_,
    )
    connector = MemoryConnector(answer_ok)
    rest = VenueRest(settings.rest_url, transport=httpx.MockTransport(venue.answer))
    ingestor = Ingestor(settings, redis=aredis, connector=connector, depth_rest=rest)
    task = asyncio.create_task(ingestor.run())
    try:
        await ingestor.started.wait()
        yield Run(ingestor, connector, venue)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def stored(aredis: aioredis.Redis, prefix: str, symbol: str) -> list[BookEntry]:
    items: Any = await aredis.xrange(stream_key("binance", symbol, "depth", prefix), "-", "+")
    return decode_all((entry_id, fields[b"d"]) for entry_id, fields in items)


async def wait_stored(aredis: aioredis.Redis, prefix: str, last: dict[str, int]) -> None:
    """Until each symbol's stream ends at its last diff's id."""

    async def done() -> bool:
        for symbol, u in last.items():
            top: Any = await aredis.xrevrange(stream_key("binance", symbol, "depth", prefix), "+", "-", count=1)
            if not top or int(top[0][0].split(b"-")[1]) != u:
                return False
        return True

    async with asyncio.timeout(20):
        while not await done():
            await asyncio.sleep(0.01)  # poll Redis


def check_stream(entries: list[BookEntry], venue: VenueModel, symbol: str) -> list[str]:
    """Every entry rebuilds to the venue's book at its seq; the snapshots' reasons, in order."""
    assert entries, f"{symbol}: nothing stored"
    assert entries[0].is_snapshot and entries[0].reason == "start", entries[0]
    books = venue.books[symbol]
    for i, entry in enumerate(entries):
        assert entry.symbol == symbol and entry.venue == "binance"
        book = rebuild(entries[: i + 1])
        assert book.update_id == entry.seq
        assert as_sides(book) == books[entry.seq], f"{symbol} seq {entry.seq}: the rebuilt book is not the venue's"
    seqs = [e.seq for e in entries]
    assert seqs == sorted(set(seqs)), "seq strictly increases"
    return [e.reason or "" for e in entries if e.is_snapshot]


def last_ids(diffs: list[Diff]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in diffs:
        out[d.symbol] = d.last
    return out


# -- the capture, continuous ------------------------------------------------------------------------------------


async def test_the_captured_depth_stream_is_stored_and_rebuilds_to_the_venues_book(
    aredis: aioredis.Redis, prefix: str
) -> None:
    diffs = load_diffs()
    venue = VenueModel(load_snapshots(), diffs)
    seen: list[Tick] = []
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        ing.subscribe(seen.append, "binance:*:depth", policy="block")
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs)
        await wait_stored(aredis, prefix, last_ids(diffs))
        depth = ing.depth
        assert depth is not None
        assert depth.resyncs == {}, "zero resyncs: the capture is continuous"
        for symbol in SYMBOLS:
            live = ing.book(symbol)
            assert live is not None and live is ing.book(symbol), "the live book itself, not a copy"
            assert as_sides(live) == venue.books[symbol][last_ids(diffs)[symbol]]
        held = {symbol: await stored(aredis, prefix, symbol) for symbol in SYMBOLS}
        await until(lambda: len(seen) == sum(len(e) for e in held.values()), "the subscriber fed every entry")
    for symbol in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, symbol), venue, symbol)
        assert reasons[0] == "start" and set(reasons[1:]) <= {"periodic"}, reasons
    # the capture crosses a minute of venue time: the busiest book stored a periodic snapshot there
    assert "periodic" in check_stream(await stored(aredis, prefix, "NKNUSDT"), venue, "NKNUSDT")
    assert sorted(set(venue.requests)) == sorted(SYMBOLS) and len(venue.requests) == len(SYMBOLS)
    # the co-located subscriber got every entry stored, as ticks of the channel depth
    assert {t["channel"] for t in seen} == {"depth"}
    for symbol in SYMBOLS:
        assert [t["seq"] for t in seen if t["symbol"] == symbol] == [e.seq for e in held[symbol]]


async def test_one_diff_missing_resyncs_that_book_only(
    aredis: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    diffs = load_diffs()
    venue = VenueModel(load_snapshots(), diffs)
    nkn = [i for i, d in enumerate(diffs) if d.symbol == "NKNUSDT"]
    gone = nkn[len(nkn) // 2]
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:gone])
        venue.hand(diffs[gone])  # the venue applied it; the connection never delivers it
        await run.feed(link, diffs[gone + 1:])
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
    diffs = load_diffs()
    venue = VenueModel(load_snapshots(), diffs)
    half = 2 * len(diffs) // 3
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        depth = ing.depth
        assert depth is not None
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:half])
        await until(lambda: all(ing.book(s) is not None for s in SYMBOLS), "every book in step")
        await wait_stored(aredis, prefix, last_ids(diffs[:half]))
        link.close_from_venue()
        second = await run.connector.link(1)
        await until(lambda: ing.sessions[0].state.value == "live", "the new connection is live")
        assert all(ing.book(s) is None for s in SYMBOLS), "no book is offered while it is out of step"
        await run.feed(second, diffs[half:])
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
    diffs = load_diffs()
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
        run = Run(ingestor, connector, venue)
        link = await connector.link(0)
        await until(lambda: ingestor.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs)
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
    diffs = load_diffs()
    venue = VenueModel(load_snapshots(), diffs)
    half = len(diffs) // 2
    async with running(aredis, prefix, venue) as run:
        link = await run.connector.link(0)
        await until(lambda: run.ingestor.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:half])
        await wait_stored(aredis, prefix, last_ids(diffs[:half]))
    before = {symbol: len(await stored(aredis, prefix, symbol)) for symbol in SYMBOLS}
    async with running(aredis, prefix, venue) as run:
        link = await run.connector.link(0)
        await until(lambda: run.ingestor.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[half:])
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
    diffs = load_diffs()
    venue = VenueModel(load_snapshots(), diffs)
    third = len(diffs) // 3
    middle = diffs[third: 2 * third]
    paused_nkn = sum(1 for d in middle if d.symbol == "NKNUSDT")
    assert paused_nkn > 10
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs[:third])
        await wait_stored(aredis, prefix, last_ids(diffs[:third]))
        await update_state(aredis, prefix, lambda s: s.with_pause("binance:NKNUSDT:depth", who="t", at=1.0),
                           who="t@h", action="pause")
        await until(lambda: ing.control.stats().pauses == 1, "the pause is in force")
        await run.feed(link, middle)
        await until(lambda: ing.control.stats().paused_by_stream.get("binance:NKNUSDT:depth") == paused_nkn,
                    "every NKNUSDT entry of the pause reached the gate")
        await update_state(aredis, prefix, lambda s: s.without_pause("binance:NKNUSDT:depth"), who="t@h",
                           action="resume")
        await until(lambda: ing.control.stats().pauses == 0, "the pause is lifted")
        await run.feed(link, diffs[2 * third:])
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
    diffs = load_diffs()
    venue = VenueModel(load_snapshots(), diffs)
    async with running(aredis, prefix, venue) as run:
        ing = run.ingestor
        await update_state(aredis, prefix, lambda s: s.with_limit("binance:*:depth", 1.0, policy, who="t", at=1.0),
                           who="t@h", action="limit")
        await until(lambda: ing.control.stats().limits == 1, "the limit is in force")
        link = await run.connector.link(0)
        await until(lambda: ing.sessions[0].state.value == "live", "the connection is live")
        await run.feed(link, diffs)
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
    diffs = load_diffs()
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
        await run.feed(link, diffs[:half])
        await wait_stored(aredis, prefix, last_ids(diffs[:half]))
        assert ing.ingress.dropped == 0
        # one socket read of 40 frames: its entries go to the queue with no await between them, so 8 fit
        for d in burst:
            venue.hand(d)
        link.feed([d.raw for d in burst], ts=burst[-1].ts)
        run.fed += len(burst)
        await until(lambda: run.frames() >= run.fed, "the burst read")
        assert ing.ingress.dropped == len(burst) - 8
        await run.feed(link, rest)
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
