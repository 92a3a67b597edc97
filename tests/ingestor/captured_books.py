"""What the order book tests of a Binance capture share: the capture, the test's own model of the venue's books,
a running ingestor on an in-memory connection, and the checks of what it stored.

The model is plain dicts of Decimal built from the recorded REST snapshots and the recorded diffs by the venue's
rule (never the ingestor's DepthSync or Book): spot drops ``u <= lastUpdateId`` and wants each diff to follow the
one before (``U <= previous u + 1``); futures drops ``u < lastUpdateId``, wants the first diff applied to straddle
``lastUpdateId`` and then each ``pu`` to be the previous ``u``.  A snapshot request is answered with the venue's
book as of the last diff handed to the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from consumer_sdk.book_stream import BookEntry, decode_all, rebuild
from consumer_sdk.core.keys import stream_key
from ingestor.config import IngestSettings
from ingestor.memory import MemoryConnector, MemoryLink
from ingestor.rest import VenueRest
from ingestor.service import Ingestor
from ingestor.session import SessionSettings

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
#: a session that reconnects at once (the tests close links on purpose)
QUICK_SESSION = SessionSettings(backoff_base=0.01, backoff_cap=0.02, healthy_after=0.01)

Side = dict[Decimal, Decimal]


@dataclass
class Diff:
    symbol: str
    first: int
    last: int
    #: the previous diff's ``u`` (futures only)
    pu: int | None
    raw: bytes
    ts: int
    bids: list[list[str]]
    asks: list[list[str]]


def load_diffs(frames: Path) -> list[Diff]:
    """The ``depthUpdate`` frames of a capture, in the order received."""
    out = []
    for line in frames.read_bytes().splitlines():
        rec = orjson.loads(line)
        data = orjson.loads(rec["frame"])["data"]
        if data.get("e") == "depthUpdate":
            out.append(Diff(data["s"], data["U"], data["u"], data.get("pu"), rec["frame"].encode(),
                            int(rec["recv_ts"] * 1e6), data["b"], data["a"]))
    return out


def load_snapshots(snapshots: Path, path: str) -> dict[str, dict[str, Any]]:
    """The recorded REST snapshots by symbol; each was asked of ``path``."""
    out = {}
    for line in snapshots.read_bytes().splitlines():
        rec = orjson.loads(line)
        url = httpx.URL(rec["url"])
        assert url.path == path, url
        out[url.params["symbol"]] = orjson.loads(rec["body"])
    return out


def apply(side: Side, levels: list[list[str]]) -> None:
    for price, qty in levels:
        if Decimal(qty) == 0:
            side.pop(Decimal(price), None)
        else:
            side[Decimal(price)] = Decimal(qty)


def reply(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    """A response whose body is streamed, as from a socket (the client reads it as it arrives)."""
    return httpx.Response(status, stream=httpx.ByteStream(body), headers={"Content-Type": "application/json",
                                                                          **(headers or {})})


@dataclass
class VenueModel:
    """The venue's books as the test knows them (see the module doc).

    ``futures`` picks the rule; ``path`` is the snapshot request's path; ``extra`` adds fields to each snapshot
    body (the futures venues send ``E``, ``T``, ``symbol`` and ``pair``)."""

    snapshots: dict[str, dict[str, Any]]
    diffs: list[Diff]
    futures: bool = False
    path: str = "/api/v3/depth"
    extra: Callable[[str], Mapping[str, Any]] = lambda symbol: {}
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
                if d.symbol != symbol:
                    continue
                if self.futures:
                    if d.last < snapshot_id:
                        continue  # the futures rule: u < lastUpdateId is in the snapshot already
                    if last is None:
                        assert d.first <= snapshot_id <= d.last, "the first diff applied straddles the snapshot"
                    else:
                        assert d.pu == last, "the capture is continuous after each recorded snapshot"
                else:
                    if d.last <= (snapshot_id if last is None else last):
                        continue
                    assert d.first <= (snapshot_id if last is None else last) + 1, "the capture is continuous"
                apply(bids, d.bids)
                apply(asks, d.asks)
                at[d.last] = (dict(bids), dict(asks))
                last = d.last

    def hand(self, diff: Diff) -> None:
        self.handed[diff.symbol] = diff.last

    def answer(self, request: httpx.Request) -> httpx.Response:
        """The snapshot request: the book as of the last diff handed over (the recorded snapshot before it)."""
        assert request.url.path == self.path, request.url
        symbol = request.url.params["symbol"]
        assert request.url.params["limit"] == "1000"
        self.requests.append(symbol)
        last = max(self.snapshots[symbol]["lastUpdateId"], self.handed.get(symbol, 0))
        bids, asks = self.books[symbol][last]
        body = {
            "lastUpdateId": last, **self.extra(symbol),
            "bids": [[f"{p:f}", f"{q:f}"] for p, q in sorted(bids.items(), reverse=True)],
            "asks": [[f"{p:f}", f"{q:f}"] for p, q in sorted(asks.items())],
        }
        return reply(200, orjson.dumps(body))


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

    async def live(self, index: int = 0) -> MemoryLink:
        """The ``index``-th connection opened, once its session is live."""
        link = await self.connector.link(index)
        await until(lambda: self.ingestor.sessions[0].state.value == "live", f"connection {index} is live")
        return link

    async def feed(self, link: MemoryLink, diffs: list[Diff], venue: VenueModel | None = None) -> None:
        """Each diff as one socket read, once the one before it was read; handed to ``venue`` first."""
        for d in diffs:
            if venue is not None:
                venue.hand(d)
            link.feed([d.raw], ts=d.ts)
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


async def stored(aredis: aioredis.Redis, prefix: str, venue: str, symbol: str) -> list[BookEntry]:
    items: Any = await aredis.xrange(stream_key(venue, symbol, "depth", prefix), "-", "+")
    return decode_all((entry_id, fields[b"d"]) for entry_id, fields in items)


async def wait_stored(aredis: aioredis.Redis, prefix: str, venue: str, last: dict[str, int]) -> None:
    """Until each symbol's stream ends at its last diff's id."""

    async def done() -> bool:
        for symbol, u in last.items():
            top: Any = await aredis.xrevrange(stream_key(venue, symbol, "depth", prefix), "+", "-", count=1)
            if not top or int(top[0][0].split(b"-")[1]) != u:
                return False
        return True

    async with asyncio.timeout(30):
        while not await done():
            await asyncio.sleep(0.01)  # poll Redis


def check_stream(entries: list[BookEntry], model: VenueModel, venue: str, symbol: str) -> list[str]:
    """After every stored entry, the stream rebuilds to the venue's book at that entry's seq; the snapshots'
    reasons, in order."""
    assert entries, f"{symbol}: nothing stored"
    assert entries[0].is_snapshot and entries[0].reason == "start", entries[0]
    books = model.books[symbol]
    for i, entry in enumerate(entries):
        assert entry.symbol == symbol and entry.venue == venue
        book = rebuild(entries[: i + 1])
        assert book.update_id == entry.seq
        assert as_sides(book.levels()) == books[entry.seq], f"{symbol} seq {entry.seq}: not the venue's book"
    seqs = [e.seq for e in entries]
    assert seqs == sorted(set(seqs)), "seq strictly increases"
    return [e.reason or "" for e in entries if e.is_snapshot]


def last_ids(diffs: list[Diff]) -> dict[str, int]:
    return {d.symbol: d.last for d in diffs}
