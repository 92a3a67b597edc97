"""The simulator serving order books: ``<symbol>@depth@100ms`` and ``<symbol>@depth`` diffs over WebSocket and
``GET /api/v3/depth`` snapshots, Binance's request weight with 429 and 418, the depth faults, recorded snapshots
in replay, and ``market bench book``.

The live tests use a real websockets client and plain HTTP on loopback against a running :class:`Simulator`.  The
client keeps its book the way Binance documents it, in plain dicts of the venue's strings, and is compared with
the simulator's own :class:`~ops.simulator.book.DepthBooks` once both stand at the same update id.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from ops.simulator import Simulator, SimulatorConfig, SimulatorConfigError, SyntheticMarket
from ops.simulator.book import BookConfig, DepthBooks, SymbolBook
from ops.simulator.control import parse_control
from ops.simulator.depth_faults import DepthFault, apply_depth_faults, parse_depth_faults
from ops.simulator.market import format_decimal
from ops.simulator.weights import REST_WEIGHTS, WeightBudget, request_weight

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPOT_FRAMES = FIXTURES / "binance-spot-2021-10-12.jsonl"
SPOT_DEPTH = FIXTURES / "binance-spot-2021-10-12.depth.jsonl"

UNIT = 1.0  # every timeout below is a multiple of this; raise it on a slow machine
T0 = 1_699_999_980_000  # an epoch millisecond on a whole minute
ZERO = "0.00000000"

Levels = dict[str, str]


# ---------------------------------------------------------------------------------------------- helpers


async def http(url: str) -> tuple[int, dict[str, str], Any]:
    """A plain HTTP/1.1 GET: the status, the headers (lower-case names) and the decoded JSON body."""
    parts = urlsplit(url)
    async with asyncio.timeout(5 * UNIT):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ", 2)[1]), headers, orjson.loads(body)


async def http_raw(url: str) -> bytes:
    """The body bytes of one GET, as sent."""
    parts = urlsplit(url)
    async with asyncio.timeout(5 * UNIT):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    return data.partition(b"\r\n\r\n")[2]


async def recv(ws: ClientConnection) -> Any:
    async with asyncio.timeout(5 * UNIT):
        return orjson.loads(await ws.recv())


async def next_diff(ws: ClientConnection, stream: str | None = None) -> dict[str, Any]:
    """The next ``depthUpdate`` (of ``stream`` on a combined connection), skipping anything else."""
    while True:
        msg = await recv(ws)
        if stream is not None:
            if msg.get("stream") != stream:
                continue
            msg = msg["data"]
        if msg.get("e") == "depthUpdate":
            result: dict[str, Any] = msg
            return result


def sim_levels(book: SymbolBook) -> tuple[Levels, Levels]:
    """The simulator's own book in the venue's strings."""
    tick = book.tick_size
    return (
        {format_decimal(p * tick): format_decimal(q) for p, q in book.bids.items()},
        {format_decimal(p * tick): format_decimal(q) for p, q in book.asks.items()},
    )


class Client:
    """A client's book by Binance's documented procedure, in plain dicts of strings: buffer the diffs, load a
    snapshot, drop the diffs with ``u <= lastUpdateId``, the first applied one spans ``lastUpdateId + 1``, each
    next one starts at the previous ``u + 1``."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.last_id: int = snapshot["lastUpdateId"]
        self.synced = False
        self.bids: Levels = dict(snapshot["bids"])
        self.asks: Levels = dict(snapshot["asks"])

    def apply(self, diff: dict[str, Any]) -> None:
        if diff["u"] <= self.last_id:
            return
        if self.synced:
            assert diff["U"] == self.last_id + 1, "a gap in the diffs"
        else:
            assert diff["U"] <= self.last_id + 1 <= diff["u"], "the snapshot and the diffs do not meet"
            self.synced = True
        for side, levels in ((self.bids, diff["b"]), (self.asks, diff["a"])):
            for price, qty in levels:
                if qty == ZERO:
                    side.pop(price, None)
                else:
                    side[price] = qty
        self.last_id = diff["u"]


async def start_sim(clock_ms: Callable[[], int] | None = None, **settings: Any) -> Simulator:
    settings.setdefault("rate", 2000.0)
    settings.setdefault("depth", settings.get("replay") is None)  # books are asked for, as market simulate does
    settings.setdefault("rest_weight_limit", 6000)
    sim = Simulator(SimulatorConfig(**settings), clock_ms=clock_ms)
    await sim.__aenter__()
    return sim


@pytest.fixture
async def sims() -> AsyncIterator[Callable[..., Awaitable[Simulator]]]:
    """A factory of running simulators on free ports, all closed at the end of the test."""
    started: list[Simulator] = []

    async def start(clock_ms: Callable[[], int] | None = None, **settings: Any) -> Simulator:
        sim = await start_sim(clock_ms, **settings)
        started.append(sim)
        return sim

    yield start
    for sim in reversed(started):
        if sim.state == "open":
            await sim.__aexit__(None, None, None)


def books_of(sim: Simulator) -> DepthBooks:
    assert sim.depth is not None
    return sim.depth


# ---------------------------------------------------------------------------------------------- live: the procedure


@pytest.mark.parametrize(("stream", "intervals"), [("btcusdt@depth@100ms", 25), ("btcusdt@depth", 3)])
async def test_a_client_following_binances_procedure_holds_the_simulators_book(
    sims: Callable[..., Awaitable[Simulator]], stream: str, intervals: int
) -> None:
    sim = await sims(rate=3000.0, depth_levels=200)
    book = books_of(sim).book("BTCUSDT")
    touches: set[tuple[Decimal, Decimal]] = set()
    async with connect(f"{sim.ws_url}/stream?streams={stream}") as ws:
        buffered = [await next_diff(ws, stream)]
        while True:
            status, _, snapshot = await http(f"{sim.rest_url}/api/v3/depth?symbol=BTCUSDT&limit=5000")
            assert status == 200
            if snapshot["lastUpdateId"] >= buffered[0]["U"]:
                break
            buffered.append(await next_diff(ws, stream))  # the snapshot is older than the diffs: get another
        client = Client(snapshot)
        for diff in buffered:
            client.apply(diff)
        applied = 0
        async with asyncio.timeout(10 * UNIT):
            while True:
                diff = await next_diff(ws, stream)
                assert set(diff) == {"e", "E", "s", "U", "u", "b", "a"} and diff["s"] == "BTCUSDT"
                client.apply(diff)
                applied += 1
                touch = max(map(Decimal, client.bids)), min(map(Decimal, client.asks))
                assert touch[0] < touch[1]  # never crossed
                touches.add(touch)
                if applied >= intervals and client.last_id == book.prev_u == book.last_id:
                    break  # the simulator has changed nothing since the diff just applied
    assert client.synced
    assert (client.bids, client.asks) == sim_levels(book)
    assert len(touches) > 1  # the book's mid moves with the market's bookTicker
    assert books_of(sim).state()["BTCUSDT"]["dropped"] == 0


async def test_depth_streams_are_subscribed_and_unsubscribed_by_method(
    sims: Callable[..., Awaitable[Simulator]],
) -> None:
    sim = await sims(rate=2000.0, depth_levels=100)
    book = books_of(sim).book("ETHUSDT")
    async with connect(f"{sim.ws_url}/stream") as ws:  # combined, no stream yet
        await ws.send('{"method":"SUBSCRIBE","params":["ethusdt@depth@100ms","ethusdt@depth"],"id":1}')
        assert await recv(ws) == {"result": None, "id": 1}
        slow = await next_diff(ws, "ethusdt@depth")
        fast = await next_diff(ws, "ethusdt@depth@100ms")
        assert slow["E"] % 1000 == 0 and fast["E"] % 100 == 0 and slow["s"] == fast["s"] == "ETHUSDT"
        await ws.send('{"method":"UNSUBSCRIBE","params":["ethusdt@depth@100ms","ethusdt@depth"],"id":2}')
        while (msg := await recv(ws)).get("id") != 2:
            assert msg["data"]["e"] == "depthUpdate"  # sent before the unsubscribe was read
        assert msg == {"result": None, "id": 2}
        await ws.send('{"method":"SUBSCRIBE","params":["ethusdt@bookTicker"],"id":3}')
        assert await recv(ws) == {"result": None, "id": 3}
        sent = book.sent
        async with asyncio.timeout(5 * UNIT):
            while book.sent < sent + 3:  # three batches go out while only the ticker is subscribed
                assert (await recv(ws))["stream"] == "ethusdt@bookTicker"
    assert fast["U"] > slow["u"]


# ---------------------------------------------------------------------------------------------- live: weight


async def test_depth_weight_over_the_budget_gets_429_with_retry_after_then_a_418_ban(
    sims: Callable[..., Awaitable[Simulator]],
) -> None:
    now = [T0 + 45_000]  # 15 s before the next minute
    sim = await sims(clock_ms=lambda: now[0], rate=0.0, rest_weight_limit=300, depth_levels=50)
    url = f"{sim.rest_url}/api/v3/depth?symbol=BTCUSDT"
    used = []
    for limit in (100, 500, 1000, 5000):  # weights 5, 25, 50 and 250: 330 with the next, over 300
        status, headers, _ = await http(f"{url}&limit={limit}")
        if status != 200:
            break
        used.append(int(headers["x-mbx-used-weight-1m"]))
    assert used == [5, 30, 80]
    assert (status, headers["retry-after"]) == (429, "15")
    status, headers, body = await http(f"{url}&limit=5")  # it would fit, but the minute's budget is spent
    assert (status, headers["retry-after"], body["code"]) == (429, "15", -1003)
    status, headers, body = await http(f"{url}&limit=5")  # not backing off: banned
    assert (status, headers["retry-after"], body["code"]) == (418, "120", -1003)
    assert str(T0 + 45_000 + 120_000) in body["msg"]
    now[0] += 60_000  # a new minute, still banned: every path
    status, headers, _ = await http(f"{sim.rest_url}/api/v3/ping?")
    assert (status, headers["retry-after"]) == (418, "60")
    now[0] += 60_000
    status, headers, _ = await http(f"{url}&limit=1000")
    assert (status, headers["x-mbx-used-weight-1m"]) == (200, "50")
    status, _, state = await http(f"{sim.rest_url}/control/state?")
    assert state["rest_weight"]["refused"] == {"429": 2, "418": 2}


async def test_the_other_endpoints_count_their_weight_and_clear_forgets_it(
    sims: Callable[..., Awaitable[Simulator]],
) -> None:
    sim = await sims(clock_ms=lambda: T0 + 1_000, rate=0.0, rest_weight_limit=60)
    base = sim.rest_url
    status, headers, _ = await http(f"{base}/api/v3/exchangeInfo?")
    assert (status, headers["x-mbx-used-weight-1m"]) == (200, "20")
    status, headers, _ = await http(f"{base}/api/v3/trades?symbol=BTCUSDT")
    assert (status, headers["x-mbx-used-weight-1m"]) == (200, "45")
    assert (await http(f"{base}/api/v3/historicalTrades?symbol=BTCUSDT"))[0] == 429
    await http(f"{base}/control/clear?")
    status, headers, _ = await http(f"{base}/api/v3/historicalTrades?symbol=BTCUSDT")
    assert (status, headers["x-mbx-used-weight-1m"]) == (200, "25")
    status, _, _ = await http(f"{base}/control/rest_faults?path=depth&schedule=503")
    assert status == 200
    assert (await http(f"{base}/api/v3/depth?symbol=BTCUSDT"))[0] == 503  # REST faults reach depth too
    status, headers, _ = await http(f"{base}/api/v3/depth?symbol=BTCUSDT")
    assert (status, headers["x-mbx-used-weight-1m"]) == (200, "30")  # a fault's answer costs nothing


# ---------------------------------------------------------------------------------------------- live: faults


def jumps(diffs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """``(u, next U)`` wherever a diff does not start at the previous ``u + 1``."""
    return [(a["u"], b["U"]) for a, b in itertools.pairwise(diffs) if b["U"] != a["u"] + 1]


async def test_a_dropped_diff_shows_as_a_jump_on_both_streams(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=2000.0, depth_levels=100)
    book = books_of(sim).book("BTCUSDT")
    fast, slow = "btcusdt@depth@100ms", "btcusdt@depth"
    seen: dict[str, list[dict[str, Any]]] = {fast: [], slow: []}
    async with connect(f"{sim.ws_url}/stream?streams={fast}/{slow}") as ws:

        async def until(condition: Callable[[], bool]) -> None:
            async with asyncio.timeout(10 * UNIT):
                while not condition():
                    msg = await recv(ws)
                    seen[msg["stream"]].append(msg["data"])

        await until(lambda: len(seen[slow]) >= 1 and len(seen[fast]) >= 1)
        status, _, _ = await http(f"{sim.rest_url}/control/depth_faults?schedule=drop@BTCUSDT")
        assert status == 200
        # until a slow diff after the dropped batch's ids has come
        await until(lambda: bool(jumps(seen[fast])) and seen[slow][-1]["U"] > jumps(seen[fast])[0][1] - 1)
    assert book.dropped == 1
    for name in (fast, slow):
        found = jumps(seen[name])
        assert len(found) == 1, (name, found)
        assert found[0][1] > found[0][0] + 1  # the dropped batch's ids are skipped, never re-used
    assert books_of(sim).state()["ETHUSDT"]["dropped"] == 0


async def test_a_stale_snapshot_is_older_than_the_buffered_diffs(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=2000.0, depth_levels=100)
    book = books_of(sim).book("BTCUSDT")
    async with asyncio.timeout(5 * UNIT):
        while book.sent < 3:  # batches before the client comes, for the stale snapshot to reach back to
            await asyncio.sleep(0.01)  # poll
    async with connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
        buffered = [await next_diff(ws) for _ in range(3)]
        status, _, _ = await http(f"{sim.rest_url}/control/depth_faults?schedule=stale:100")
        assert status == 200
        status, _, stale = await http(f"{sim.rest_url}/api/v3/depth?symbol=BTCUSDT&limit=1000")
        assert status == 200 and book.stale_served == 1
        assert stale["lastUpdateId"] < buffered[0]["U"] - 1  # older than anything buffered: the client must refetch
        status, _, fresh = await http(f"{sim.rest_url}/api/v3/depth?symbol=BTCUSDT&limit=1000")
        assert fresh["lastUpdateId"] >= buffered[0]["U"]
        client = Client(fresh)
        for diff in buffered:
            client.apply(diff)
        async with asyncio.timeout(10 * UNIT):
            while not (client.synced and client.last_id == book.prev_u == book.last_id):
                client.apply(await next_diff(ws))
    assert (client.bids, client.asks) == sim_levels(book)


async def test_depth_faults_from_the_config_and_bad_ones_refused(sims: Callable[..., Awaitable[Simulator]]) -> None:
    sim = await sims(rate=500.0, depth_levels=50, depth_faults="stale:2@ETHUSDT")
    async with connect(f"{sim.ws_url}/ws/ethusdt@depth@100ms") as ws:
        await next_diff(ws)
        await next_diff(ws)
    status, _, snapshot = await http(f"{sim.rest_url}/api/v3/depth?symbol=ETHUSDT&limit=5")
    assert status == 200 and len(snapshot["bids"]) == 5
    assert books_of(sim).state()["ETHUSDT"]["stale_served"] == 1
    status, _, error = await http(f"{sim.rest_url}/control/depth_faults?schedule=drop@DOGEUSDT")
    assert status == 400 and "no book of DOGEUSDT" in error["error"]
    status, _, error = await http(f"{sim.rest_url}/control/depth_faults?schedule=explode")
    assert status == 400 and "bad depth fault" in error["error"]
    sim.set_depth_faults(parse_depth_faults("drop"))
    sim.clear_faults()  # disarms the drop before it acts
    _, _, state = await http(f"{sim.rest_url}/control/clear?")
    assert set(state["depth"]) == {"BTCUSDT", "ETHUSDT"}
    async with connect(f"{sim.ws_url}/ws/btcusdt@depth@100ms") as ws:
        first = await next_diff(ws)
        second = await next_diff(ws)
    assert second["U"] == first["u"] + 1 and books_of(sim).state()["BTCUSDT"]["dropped"] == 0
    with pytest.raises(SimulatorConfigError, match="depth books"):
        SimulatorConfig(replay=SPOT_FRAMES, depth_faults="drop")


# ---------------------------------------------------------------------------------------------- live: replay


async def test_replay_passes_depth_frames_and_answers_recorded_snapshots(
    sims: Callable[..., Awaitable[Simulator]], tmp_path: Path
) -> None:
    records = [orjson.loads(line) for line in SPOT_DEPTH.read_bytes().splitlines()]
    nkn = next(r for r in records if "NKNUSDT" in r["url"])
    start = orjson.loads(SPOT_FRAMES.read_bytes().splitlines()[0])["recv_ts"]
    later = dict(nkn, recv_ts=start + 20.0, body=nkn["body"].replace('"lastUpdateId":499869752',
                                                                      '"lastUpdateId":499869999'))
    recording = tmp_path / "two.depth.jsonl"
    recording.write_bytes(b"\n".join(orjson.dumps(r) for r in [*records, later]) + b"\n")
    recorded = [orjson.loads(orjson.loads(line)["frame"]) for line in SPOT_FRAMES.read_bytes().splitlines()]
    wanted = [f["data"] for f in recorded if f["stream"] == "nknusdt@depth@100ms"]

    sim = await sims(replay=SPOT_FRAMES, replay_rest=recording, replay_speed=100.0)
    url = f"{sim.rest_url}/api/v3/depth?symbol=NKNUSDT&limit=1000"
    assert await http_raw(url) == nkn["body"].encode()  # not started: the first recorded, byte for byte
    status, _, cut = await http(f"{sim.rest_url}/api/v3/depth?symbol=NKNUSDT&limit=5")
    assert status == 200 and cut["bids"] == orjson.loads(nkn["body"])["bids"][:5]
    status, _, error = await http(f"{sim.rest_url}/api/v3/depth?symbol=BTCUSDT")
    assert (status, error["code"]) == (400, -1121)
    async with connect(f"{sim.ws_url}/ws/nknusdt@depth@100ms") as ws:
        got = [await recv(ws) for _ in wanted]
    assert got == wanted  # the capture's depth frames, passed through
    client = Client(orjson.loads(nkn["body"]))
    for diff in got:
        client.apply(diff)
    assert client.synced  # the recorded snapshot meets the recorded diffs
    async with asyncio.timeout(5 * UNIT):
        while sim.stats().replayed_frames < len(recorded):
            await asyncio.sleep(0.01)  # poll
    snapshot = orjson.loads(await http_raw(url))  # played past 20 s of capture time: the later recording
    assert snapshot["lastUpdateId"] == 499869999


# ---------------------------------------------------------------------------------------------- pure parts


def test_the_slow_stream_aggregates_the_fast_one_to_the_same_book() -> None:
    market = SyntheticMarket(("BTCUSDT", "XRPUSDT"), seed=3, history=1000)
    books = DepthBooks.for_market(market, seed=3, config=BookConfig(depth=40, slow_interval_ms=1000))
    assert books.streams() == ("btcusdt@depth@100ms", "xrpusdt@depth@100ms", "btcusdt@depth", "xrpusdt@depth")
    snap = orjson.loads(books.answer({"symbol": ["XRPUSDT"], "limit": ["5000"]}).body)
    fast, slow = Client(snap), Client(snap)
    now = T0
    books.advance(now)
    slow_count = 0
    while slow_count < 20:
        now += 20
        books.observe(market.step(5, now))
        for _, stream, diff in books.advance(now):
            if diff["s"] != "XRPUSDT":
                continue
            if stream == "xrpusdt@depth":
                slow.apply(diff)
                slow_count += 1
                assert diff["E"] % 1000 == 0 and slow.last_id == fast.last_id
                assert (slow.bids, slow.asks) == (fast.bids, fast.asks) == sim_levels(books.book("XRPUSDT"))
            else:
                fast.apply(diff)
    books.drop_next_diff("XRPUSDT")
    before = slow.last_id
    while slow.last_id == before:
        now += 20
        books.observe(market.step(5, now))
        for _, stream, diff in books.advance(now):
            if stream == "xrpusdt@depth":
                assert diff["U"] > before + 1  # the interval with the dropped batch is not sent
                slow.last_id = diff["u"]


def test_a_slow_interval_that_cannot_work_is_refused() -> None:
    for slow in (100, 150, 50):
        with pytest.raises(SimulatorConfigError, match="slow_interval_ms"):
            BookConfig(interval_ms=100, slow_interval_ms=slow)


def test_depth_faults_are_parsed_from_text_and_armed() -> None:
    assert parse_depth_faults(" drop , stale:3@btcusdt,stale@XRPUSDT,") == (
        DepthFault("drop"), DepthFault("stale", "BTCUSDT", 3), DepthFault("stale", "XRPUSDT", 1),
    )
    assert [str(f) for f in parse_depth_faults("drop@ETHUSDT,stale:2,stale")] == ["drop@ETHUSDT", "stale:2", "stale"]
    for bad in ("drop:2", "stale:0", "stale:x", "burn", "drop@"):
        with pytest.raises(SimulatorConfigError, match="depth fault"):
            parse_depth_faults(bad)
    market = SyntheticMarket(("BTCUSDT", "ETHUSDT"), seed=1)
    books = DepthBooks.for_market(market)
    with pytest.raises(SimulatorConfigError, match="no book of XRPUSDT"):
        apply_depth_faults(books, parse_depth_faults("drop,drop@XRPUSDT"))
    books.advance(T0)
    books.advance(T0 + 100)  # nothing was armed by the refused schedule
    assert all(s["dropped"] == 0 for s in books.state().values())
    apply_depth_faults(books, parse_depth_faults("drop@ETHUSDT"))
    now = T0 + 100
    while books.state()["ETHUSDT"]["dropped"] == 0:  # the next batch that changes something
        now += 100
        books.advance(now)
    assert books.state()["BTCUSDT"]["dropped"] == 0
    command = parse_control("/control/depth_faults", {"schedule": ["stale:4@BTCUSDT"]})
    assert not isinstance(command, str) and command.depth_faults == (DepthFault("stale", "BTCUSDT", 4),)
    assert "unknown parameter 'x'" in str(parse_control("/control/depth_faults", {"x": ["1"]}))
    assert "bad depth fault" in str(parse_control("/control/depth_faults", {"schedule": ["nope"]}))


def test_request_weights_are_binances() -> None:
    depth = "/api/v3/depth"
    assert [request_weight(depth, {"limit": [n]}) for n in ("1", "100", "101", "500", "1000", "1001", "99999")] == [
        5, 5, 25, 25, 50, 250, 250]
    assert request_weight(depth, {}) == request_weight(depth, {"limit": ["x"]}) == 5
    assert (REST_WEIGHTS["/api/v3/exchangeInfo"], REST_WEIGHTS["/api/v3/aggTrades"]) == (20, 4)
    assert request_weight("/api/v3/historicalTrades", {}) == 25 and request_weight("/unknown", {}) == 1


def test_the_weight_budget_counts_per_client_and_clock_minute() -> None:
    budget = WeightBudget(100, ban_ms=90_000)
    assert budget.charge("a", 60, T0) is None and budget.charge("b", 100, T0) is None
    refused = budget.charge("a", 50, T0 + 59_001)
    assert refused is not None and refused.status == 429 and dict(refused.headers) == {"Retry-After": "1"}
    assert budget.used("a", T0) == 60  # a refused request costs nothing
    assert budget.charge("a", 1, T0 + 60_000) is None and budget.used("a", T0 + 60_000) == 1  # backed off: served
    refused = budget.charge("a", 100, T0 + 60_001)
    assert refused is not None and refused.status == 429 and dict(refused.headers) == {"Retry-After": "60"}
    again = budget.charge("a", 1, T0 + 60_002)  # it fits, but the minute's budget is spent for this client
    assert again is not None and again.status == 429
    ban = budget.charge("a", 1, T0 + 60_003)  # the second request before its Retry-After: banned
    assert ban is not None and ban.status == 418 and dict(ban.headers) == {"Retry-After": "90"}
    assert f"banned until {T0 + 150_003}".encode() in ban.body
    assert budget.charge("a", 1, T0 + 150_002) is not None
    assert budget.charge("a", 1, T0 + 150_003) is None
    assert budget.charge("b", 100, T0 + 150_003) is None
    assert budget.refused == {429: 3, 418: 2}
    unlimited = WeightBudget(0)
    assert unlimited.charge("a", 10**9, T0) is None and unlimited.used("a", T0) == 10**9
    with pytest.raises(ValueError):
        WeightBudget(-1)


def test_the_depth_settings_are_checked() -> None:
    assert SimulatorConfig().book_config() == BookConfig(interval_ms=100, slow_interval_ms=1000)
    for settings, needle in (
        ({"depth_levels": 0}, "depth_levels must be"),
        ({"depth": True, "depth_faults": "drop@DOGEUSDT"}, "DOGEUSDT is not one of the symbols"),
        ({"depth_faults": "drop"}, "depth books"),  # books are off unless asked for
        ({"depth": False, "depth_faults": "drop"}, "depth books"),
        ({"replay_rest": SPOT_DEPTH}, "needs replay"),
        ({"rest_weight_limit": -1}, "rest_weight_limit"),
    ):
        with pytest.raises(SimulatorConfigError, match=needle):
            SimulatorConfig(**settings)


async def test_without_depth_the_venue_has_no_books_and_no_depth_endpoint(
    sims: Callable[..., Awaitable[Simulator]],
) -> None:
    sim = await sims(depth=False, rate=100.0)
    assert sim.depth is None
    assert (await http(f"{sim.rest_url}/api/v3/depth?symbol=BTCUSDT"))[0] == 404
    status, _, error = await http(f"{sim.rest_url}/control/depth_faults?schedule=drop")
    assert status == 400 and "no depth books" in error["error"]


# ---------------------------------------------------------------------------------------------- command line


def test_market_bench_book_prints_one_json_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "bench", "book", "--json", "--updates", "300", "--depth", "40"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = orjson.loads(lines[0])
    for run in (result, result["capture"]):
        assert run["updates"] == 300 and run["equal"] is True
        assert run["updates_per_s"] > 0 and run["baseline_updates_per_s"] > 0 and run["ratio"] > 0
        assert run["p50_us"] <= run["p99_us"]
    assert (result["source"], result["capture"]["source"]) == ("synthetic", "capture:NKNUSDT")
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "bench", "book", "--updates", "300", "--depth", "40"],
        capture_output=True, text=True, timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and [line.split(":")[0] for line in lines] == ["synthetic", "capture"], proc.stdout
    assert all("updates/s against" in line and line.endswith("books equal: True") for line in lines)


@pytest.mark.parametrize(("args", "needle"), [
    (["--depth-faults", "burn"], "bad depth fault 'burn'"),
    (["--replay-rest", str(SPOT_DEPTH)], "--replay-rest: needs --replay"),
])
def test_market_simulate_refuses_bad_depth_options(args: list[str], needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "simulate", "--port", "0", *args], capture_output=True, text=True,
        timeout=60,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
