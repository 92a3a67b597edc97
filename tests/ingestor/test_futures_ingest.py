"""Binance futures through a running ingestor: COIN-M order books by the futures rule, USD-M ticks, USD-M repair.

The order book tests replay the depth frames of the real COIN-M capture (``dstream``; ``depthUpdate`` with ``U``,
``u`` and ``pu``, the fields USD-M sends too) through an in-memory connection, answer the snapshot requests
(``/dapi/v1/depth``) from the recorded snapshots, and check every stored entry against the test's own model of each
book: plain dicts of Decimal built from the recorded snapshot and the recorded diffs by Binance's futures rule (drop
``u < lastUpdateId``; the first diff applied has ``U <= lastUpdateId <= u``; then each ``pu`` is the previous
``u``), never the ingestor's DepthSync or Book.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk.book_stream import BookEntry, decode_all, rebuild
from consumer_sdk.core.keys import stream_key
from consumer_sdk.core.tick import decode_tick, is_gap_marker
from ingestor.binance_coinm import BINANCE_COINM
from ingestor.binance_usdm import BINANCE_USDM_MARKET, BINANCE_USDM_PUBLIC
from ingestor.config import IngestSettings
from ingestor.memory import MemoryConnector, MemoryLink
from ingestor.repair import RepairSettings
from ingestor.rest import VenueRest
from ingestor.service import Ingestor
from ingestor.session import SessionSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FRAMES = FIXTURES / "binance-coinm-2021-07-22.jsonl"
SNAPSHOTS = FIXTURES / "binance-coinm-2021-07-22.depth.jsonl"
VENUE = "binance_coinm"

Side = dict[Decimal, Decimal]


@dataclass
class Diff:
    symbol: str
    first: int
    last: int
    pu: int
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
            out.append(Diff(data["s"], data["U"], data["u"], data["pu"], rec["frame"].encode(),
                            int(rec["recv_ts"] * 1e6), data["b"], data["a"]))
    return out


def load_snapshots() -> dict[str, dict[str, Any]]:
    out = {}
    for line in SNAPSHOTS.read_bytes().splitlines():
        rec = orjson.loads(line)
        url = httpx.URL(rec["url"])
        assert url.path == "/dapi/v1/depth"
        out[url.params["symbol"]] = orjson.loads(rec["body"])
    return out


SNAPSHOT_BODIES = load_snapshots()
SYMBOLS = tuple(sorted(SNAPSHOT_BODIES))


def apply(side: Side, levels: list[list[str]]) -> None:
    for price, qty in levels:
        if Decimal(qty) == 0:
            side.pop(Decimal(price), None)
        else:
            side[Decimal(price)] = Decimal(qty)


@dataclass
class VenueModel:
    """The venue's books as the test knows them: the recorded snapshot, then the recorded diffs by the futures rule."""

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
            snapshot_id = snap["lastUpdateId"]
            at = self.books[symbol] = {snapshot_id: (dict(bids), dict(asks))}
            last: int | None = None
            for d in self.diffs:
                if d.symbol != symbol or d.last < snapshot_id:
                    continue  # the futures rule: u < lastUpdateId is in the snapshot already
                if last is None:
                    assert d.first <= snapshot_id <= d.last, "the first diff applied straddles the snapshot"
                else:
                    assert d.pu == last, "the capture is continuous after each recorded snapshot"
                apply(bids, d.bids)
                apply(asks, d.asks)
                at[d.last] = (dict(bids), dict(asks))
                last = d.last

    def hand(self, diff: Diff) -> None:
        self.handed[diff.symbol] = diff.last

    def answer(self, request: httpx.Request) -> httpx.Response:
        """``/dapi/v1/depth``: the book as of the last diff handed over (the recorded snapshot before it)."""
        assert request.url.path == "/dapi/v1/depth", request.url
        symbol = request.url.params["symbol"]
        assert request.url.params["limit"] == "1000"
        self.requests.append(symbol)
        last = max(self.snapshots[symbol]["lastUpdateId"], self.handed.get(symbol, 0))
        bids, asks = self.books[symbol][last]
        body = {
            "lastUpdateId": last, "E": 1626916404580, "T": 1626916404574, "symbol": symbol,
            "pair": symbol.split("_")[0],
            "bids": [[f"{p:f}", f"{q:f}"] for p, q in sorted(bids.items(), reverse=True)],
            "asks": [[f"{p:f}", f"{q:f}"] for p, q in sorted(asks.items())],
        }
        return reply(200, orjson.dumps(body))


def reply(status: int, body: bytes) -> httpx.Response:
    """A response whose body is streamed, as from a socket."""
    return httpx.Response(status, stream=httpx.ByteStream(body), headers={"Content-Type": "application/json"})


def as_sides(levels: Any) -> tuple[Side, Side]:
    """``(bids, asks)`` of ``(price, qty)`` strings -> two dicts of Decimal."""
    bids, asks = levels
    return {Decimal(p): Decimal(q) for p, q in bids}, {Decimal(p): Decimal(q) for p, q in asks}


def answer_ok(message: str) -> list[bytes]:
    return [orjson.dumps({"result": None, "id": orjson.loads(message)["id"]})]


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
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
    fed: int = 0

    def frames(self) -> int:
        return sum(s.frames for s in self.ingestor.sessions)

    async def feed(self, link: MemoryLink, frames: list[tuple[bytes, int]], hand: Callable[[int], None]) -> None:
        """Each frame as one socket read, once the one before it was read."""
        for i, (raw, ts) in enumerate(frames):
            hand(i)
            link.feed([raw], ts=ts)
            self.fed += 1
            await until(lambda: self.frames() >= self.fed, f"frame {self.fed} read")


@contextlib.asynccontextmanager
async def running(
    settings: IngestSettings, aredis: aioredis.Redis, depth_rest: VenueRest | None = None,
    repair_rest: VenueRest | None = None,
) -> AsyncIterator[Run]:
    connector = MemoryConnector(answer_ok)
    ingestor = Ingestor(settings, redis=aredis, connector=connector, depth_rest=depth_rest, repair_rest=repair_rest)
    task = asyncio.create_task(ingestor.run())
    try:
        await ingestor.started.wait()
        yield Run(ingestor, connector)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def coinm_settings(prefix: str) -> IngestSettings:
    return IngestSettings(
        venue=VENUE, url="ws://venue.test:9443", rest_url="http://venue.test", symbols=SYMBOLS,
        channels=("depth",), prefix=prefix, spill_dir="",
        session=SessionSettings(backoff_base=0.01, backoff_cap=0.02, healthy_after=0.01),
    )


async def stored(aredis: aioredis.Redis, prefix: str, symbol: str) -> list[BookEntry]:
    items: Any = await aredis.xrange(stream_key(VENUE, symbol, "depth", prefix), "-", "+")
    return decode_all((entry_id, fields[b"d"]) for entry_id, fields in items)


async def wait_stored(aredis: aioredis.Redis, prefix: str, last: dict[str, int]) -> None:
    """Until each symbol's stream ends at its last diff's id."""

    async def done() -> bool:
        for symbol, u in last.items():
            top: Any = await aredis.xrevrange(stream_key(VENUE, symbol, "depth", prefix), "+", "-", count=1)
            if not top or int(top[0][0].split(b"-")[1]) != u:
                return False
        return True

    async with asyncio.timeout(30):
        while not await done():
            await asyncio.sleep(0.01)  # poll Redis


def check_stream(entries: list[BookEntry], venue: VenueModel, symbol: str) -> list[str]:
    """After every stored entry, the stream rebuilds to the venue's book at that entry's seq; the snapshots'
    reasons, in order."""
    assert entries, f"{symbol}: nothing stored"
    assert entries[0].is_snapshot and entries[0].reason == "start", entries[0]
    books = venue.books[symbol]
    for i, entry in enumerate(entries):
        assert entry.symbol == symbol and entry.venue == VENUE
        book = rebuild(entries[: i + 1])
        assert book.update_id == entry.seq
        assert as_sides(book.levels()) == books[entry.seq], f"{symbol} seq {entry.seq}: not the venue's book"
    seqs = [e.seq for e in entries]
    assert seqs == sorted(set(seqs)), "seq strictly increases"
    return [e.reason or "" for e in entries if e.is_snapshot]


def last_ids(diffs: list[Diff]) -> dict[str, int]:
    return {d.symbol: d.last for d in diffs}


async def replay(run: Run, venue: VenueModel, diffs: list[Diff], skip: int | None = None) -> None:
    """Feed every diff to the connection, each handed to the venue model first; the one at ``skip`` is handed
    (the venue applied it) but never delivered."""
    link = await run.connector.link(0)
    await until(lambda: run.ingestor.sessions[0].state.value == "live", "the connection is live")
    assert link.url == "ws://venue.test:9443/stream"
    fed = [d for i, d in enumerate(diffs) if i != skip]

    def hand(i: int) -> None:
        if skip is not None and fed[i] is diffs[skip + 1]:
            venue.hand(diffs[skip])
        venue.hand(fed[i])

    await run.feed(link, [(d.raw, d.ts) for d in fed], hand)


# -- COIN-M order books by the futures rule -----------------------------------------------------------------------


@pytest.mark.slow
async def test_the_coinm_capture_is_stored_by_the_futures_rule_and_rebuilds_to_the_venues_book(
    aredis: aioredis.Redis, prefix: str
) -> None:
    diffs = load_diffs()
    venue = VenueModel(SNAPSHOT_BODIES, diffs)
    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(venue.answer))
    async with running(coinm_settings(prefix), aredis, depth_rest=rest) as run:
        ing = run.ingestor
        assert ing.depth is not None and ing.depth.link == "prev", "diffs stored linked by pu (the futures rule)"
        assert ing.depth_fetcher is not None and ing.depth_fetcher.venue is BINANCE_COINM
        await replay(run, venue, diffs)
        await wait_stored(aredis, prefix, last_ids(diffs))
        assert ing.depth.resyncs == {}, "zero resyncs: the capture is continuous"
        for symbol in SYMBOLS:
            live = ing.book(symbol)
            assert live is not None
            assert as_sides(live.levels()) == venue.books[symbol][last_ids(diffs)[symbol]]
    for symbol in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, symbol), venue, symbol)
        assert reasons[0] == "start" and not [r for r in reasons if r.startswith("resync")], reasons
    assert sorted(venue.requests) == sorted(SYMBOLS), "one snapshot a book"


@pytest.mark.slow
async def test_a_removed_coinm_diff_resyncs_that_book_once(aredis: aioredis.Redis, prefix: str) -> None:
    diffs = load_diffs()
    venue = VenueModel(SNAPSHOT_BODIES, diffs)
    symbol = "ETHUSD_210924"
    own = [i for i, d in enumerate(diffs) if d.symbol == symbol]
    gone = own[len(own) // 2]
    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(venue.answer))
    async with running(coinm_settings(prefix), aredis, depth_rest=rest) as run:
        ing = run.ingestor
        await replay(run, venue, diffs, skip=gone)
        await wait_stored(aredis, prefix, last_ids(diffs))
        assert ing.depth is not None and ing.depth.resyncs == {(symbol, "gap"): 1}
    for other in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, other), venue, other)
        resyncs = [r for r in reasons if r.startswith("resync")]
        assert resyncs == (["resync:gap"] if other == symbol else []), (other, reasons)
    entries = await stored(aredis, prefix, symbol)
    assert diffs[gone].last not in {e.seq for e in entries if not e.is_snapshot}, "the missing diff is not stored"
    assert venue.requests.count(symbol) == 2 and len(venue.requests) == len(SYMBOLS) + 1


# -- USD-M ticks and repair ---------------------------------------------------------------------------------------

T0_MS = 1_700_000_000_000


def agg_trade(a: int, symbol: str = "BTCUSDT") -> bytes:
    return orjson.dumps({"stream": f"{symbol.lower()}@aggTrade", "data": {
        "e": "aggTrade", "E": T0_MS + a, "s": symbol, "a": a, "p": f"{60000 + a}.1", "q": "0.002",
        "f": 10 * a, "l": 10 * a + 1, "T": T0_MS + a, "m": a % 2 == 0,
    }})


def agg_row(a: int) -> dict[str, Any]:
    """The ``/fapi/v1/aggTrades`` row of the aggregate trade :func:`agg_trade` sends live."""
    return {"a": a, "p": f"{60000 + a}.1", "q": "0.002", "f": 10 * a, "l": 10 * a + 1, "T": T0_MS + a,
            "m": a % 2 == 0}


def mark_price(second: int, symbol: str = "BTCUSDT") -> bytes:
    return orjson.dumps({"stream": f"{symbol.lower()}@markPrice@1s", "data": {
        "e": "markPriceUpdate", "E": T0_MS + 1000 * second, "s": symbol, "p": "60001.25000000",
        "i": "60000.10000000", "P": "60010.00000000", "r": "0.00010000", "T": T0_MS + 8 * 3600 * 1000,
    }})


def usdm_settings(prefix: str, channels: tuple[str, ...]) -> IngestSettings:
    return IngestSettings(
        venue="binance_usdm", url="ws://venue.test:9443", rest_url="http://venue.test", symbols=("BTCUSDT",),
        channels=channels, prefix=prefix, spill_dir="",
        session=SessionSettings(backoff_base=0.01, backoff_cap=0.02, healthy_after=0.01),
        repair=RepairSettings(hold_s=10.0),
    )


async def stored_ticks(aredis: aioredis.Redis, key: str) -> list[dict[str, Any]]:
    items: Any = await aredis.xrange(key, "-", "+")
    return [dict(decode_tick(fields[b"d"])) for _, fields in items]


async def wait_len(aredis: aioredis.Redis, key: str, n: int) -> None:
    async with asyncio.timeout(20):
        while await aredis.xlen(key) < n:
            await asyncio.sleep(0.01)  # poll Redis


async def test_a_usdm_ingestor_stores_agg_trades_and_mark_prices_under_its_venue(
    aredis: aioredis.Redis, prefix: str
) -> None:
    settings = usdm_settings(prefix, ("agg_trade", "mark_price", "book_ticker"))
    async with running(settings, aredis) as run:
        ing = run.ingestor
        # /market carries aggregate trades and mark prices, /public book tickers: one connection each
        routes = {s.venue: sorted(s.streams) for s in ing.sessions}
        assert routes == {
            BINANCE_USDM_MARKET: ["btcusdt@aggTrade", "btcusdt@markPrice@1s"],
            BINANCE_USDM_PUBLIC: ["btcusdt@bookTicker"],
        }
        links = [await run.connector.link(i) for i in range(2)]
        market = next(link for link in links if link.url.endswith("/market/stream"))
        assert {link.url for link in links} == {"ws://venue.test:9443/market/stream",
                                                "ws://venue.test:9443/public/stream"}
        await until(lambda: all(s.state.value == "live" for s in ing.sessions), "both connections live")
        market.feed([agg_trade(1), agg_trade(2), mark_price(1), agg_trade(3), mark_price(2)])
        trades = stream_key("binance_usdm", "BTCUSDT", "agg_trade", prefix)
        marks = stream_key("binance_usdm", "BTCUSDT", "mark_price", prefix)
        await wait_len(aredis, trades, 3)
        await wait_len(aredis, marks, 2)
    got = await stored_ticks(aredis, trades)
    assert [t["seq"] for t in got] == [1, 2, 3]
    assert {t["venue"] for t in got} == {"binance_usdm"} and got[0]["price"] == "60001.1"
    mp = await stored_ticks(aredis, marks)
    assert [t["seq"] for t in mp] == [T0_MS + 1000, T0_MS + 2000]
    assert mp[0] == {
        "v": 1, "venue": "binance_usdm", "symbol": "BTCUSDT", "channel": "mark_price", "seq": T0_MS + 1000,
        "ts_event": (T0_MS + 1000) * 1000, "ts_recv": mp[0]["ts_recv"], "mark_px": "60001.25000000",
        "index_px": "60000.10000000", "est_settle_px": "60010.00000000", "funding_rate": "0.00010000",
        "next_funding_time": (T0_MS + 8 * 3600 * 1000) * 1000,
    }
    assert not await aredis.exists(stream_key("binance", "BTCUSDT", "agg_trade", prefix))


async def test_a_usdm_agg_trade_gap_is_repaired_over_fapi(aredis: aioredis.Redis, prefix: str) -> None:
    asked: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        assert request.url.path == "/fapi/v1/aggTrades"
        start = int(request.url.params["fromId"])
        rows = [agg_row(a) for a in range(start, 7)][: int(request.url.params["limit"])]  # the venue has 1..6
        return reply(200, orjson.dumps(rows))

    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(answer), venue=BINANCE_USDM_MARKET)
    async with running(usdm_settings(prefix, ("agg_trade",)), aredis, repair_rest=rest) as run:
        link = await run.connector.link(0)
        await until(lambda: run.ingestor.sessions[0].state.value == "live", "the connection is live")
        link.feed([agg_trade(1), agg_trade(2), agg_trade(5), agg_trade(6)])
        key = stream_key("binance_usdm", "BTCUSDT", "agg_trade", prefix)
        await wait_len(aredis, key, 6)
    got = await stored_ticks(aredis, key)
    assert [t["seq"] for t in got] == [1, 2, 3, 4, 5, 6] and not any(is_gap_marker(t) for t in got)  # type: ignore[arg-type]
    assert (got[2]["venue"], got[2]["trade_id"], got[2]["price"]) == ("binance_usdm", 3, "60003.1"), "as fetched"
    assert [(u.path, u.params["symbol"], u.params["fromId"]) for u in asked] == [
        ("/fapi/v1/aggTrades", "BTCUSDT", "3")
    ]


@pytest.mark.parametrize("channel", ["trade", "kline_1s"])
def test_a_usdm_ingestor_refuses_a_channel_usdm_lacks(channel: str) -> None:
    from consumer_sdk.core.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{channel}.*binance_usdm"):
        Ingestor(IngestSettings(venue="binance_usdm", symbols=("BTCUSDT",), channels=(channel,), spill_dir=""))
