"""ingestor.rest against real HTTP servers, and the gap repair it serves when the venue's REST is hostile.

The servers are real: the simulator's REST with its hostile answers (a 1 GiB body, a body trickled one
byte every 0.5 s, a redirect to another host, invalid JSON, another symbol's rows) and, for what the
simulator does not do (a compressed body, keep-alive), a minimal HTTP/1.1 server on a socket.  The client
is the real one.  Failures are asserted by kind and by the client's own accounting (its counters, the
time it measured), never by a stopwatch in the test; an outer ``asyncio.timeout`` only keeps a hang from
stalling the suite.  The drill at the end runs an ingestor process against a venue that drops the
connection every 10 s while its REST trickles, and counts what reached Redis.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk.core.sequencing import Verdict
from consumer_sdk.core.tick import Tick, decode_tick, is_gap_marker
from distributor.ingress import IngressQueue, Policy
from ingestor.repair import BreakerState, CircuitBreaker, GapRepairer, RepairSettings
from ingestor.rest import (
    READ_CHUNK,
    RestError,
    RestRefused,
    RestRetryable,
    VenueRest,
    agg_trades_to_ticks,
    check_against,
    check_page,
    trades_to_ticks,
)
from ingestor.sequencer import Sequencer
from ops.redis_server import free_port
from ops.simulator import Simulator, SimulatorConfig
from ops.simulator.control import parse_control
from ops.simulator.errors import SimulatorConfigError
from ops.simulator.rest import Hostile, RestFault, RestFaults, huge_body, parse_rest_schedule

SYMBOL = "BTCUSDT"
TRADES = "/api/v3/historicalTrades"
#: only a guard against a hang: every wait on a condition is bounded by this
HANG_GUARD = 30.0


# ------------------------------------------------------------------------------------------------ helpers


async def until(condition: Callable[[], bool], what: str, timeout: float = HANG_GUARD) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.005)  # poll
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for: {what}") from None


@asynccontextmanager
async def venue(symbols: tuple[str, ...] = (SYMBOL,), trades: int = 40) -> AsyncIterator[Simulator]:
    """A simulator whose REST history holds at least ``trades`` trades of each symbol."""
    async with Simulator(SimulatorConfig(symbols=symbols, rate=4000.0, seed=3)) as sim:
        await until(lambda: all(n_trades(sim, s) >= trades for s in symbols), f"{trades} trades at the venue")
        yield sim


def n_trades(sim: Simulator, symbol: str = SYMBOL) -> int:
    lo, nxt = sim.market.history(symbol).trade_id_range
    return nxt - lo


def oldest(sim: Simulator, symbol: str = SYMBOL) -> int:
    return sim.market.history(symbol).trade_id_range[0]


def requests_to(sim: Simulator, path: str = TRADES) -> int:
    return sim.rest_faults.requests.get(path, 0)


@asynccontextmanager
async def client(url: str, **kw: Any) -> AsyncIterator[VenueRest]:
    rest = VenueRest(url, **kw)
    try:
        yield rest
    finally:
        await rest.aclose()


async def refused(rest: VenueRest, sim: Simulator) -> RestError:
    """What one fetch of the first trades fails with (it must fail)."""
    with pytest.raises(RestError) as caught:
        async with asyncio.timeout(HANG_GUARD):
            await rest.fetch("trade", SYMBOL, oldest(sim), 1000)
    return caught.value


class RawServer:
    """A minimal HTTP/1.1 server on a free port: every request gets ``answer``; with ``keep_alive`` the
    connection stays open for the next request.  Counts connections and requests."""

    def __init__(self, answer: bytes, *, keep_alive: bool) -> None:
        self.answer = answer
        self.keep_alive = keep_alive
        self.connections = 0
        self.requests = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests += 1
                writer.write(self.answer)
                await writer.drain()
                if not self.keep_alive:
                    return
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RawServer]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


def http_answer(body: bytes, *headers: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


# ------------------------------------------------------------------------------------------------ the client


async def test_trickling_body_fails_at_the_clients_deadline_and_the_client_stays_usable() -> None:
    """One byte every 0.5 s: each read of the socket returns in time, so only a deadline over the whole
    request ends it.  The client's own clock and counters say how it ended."""
    async with venue() as sim, client(sim.rest_url, timeout=1.0) as rest:
        sim.set_rest_faults(TRADES, parse_rest_schedule("trickle"))
        err = await refused(rest, sim)
        assert isinstance(err, RestRetryable) and err.kind == "deadline"
        assert err.elapsed_s is not None and err.elapsed_s >= rest.timeout - 0.01
        assert rest.stats.refused == {"deadline": 1}
        assert 1 <= rest.stats.body_bytes < 100  # the body was arriving, a byte at a time
        rows = await asyncio.wait_for(rest.fetch("trade", SYMBOL, oldest(sim), 10), HANG_GUARD)
        assert [r["id"] for r in rows] == list(range(oldest(sim), oldest(sim) + 10))
        assert rest.stats.answered == 1


async def test_a_1_gib_body_is_refused_after_the_cap() -> None:
    """The body is never announced (chunked); the client stops reading one chunk past its cap at most."""
    cap = 1 << 20
    async with venue() as sim, client(sim.rest_url, timeout=HANG_GUARD, max_body=cap) as rest:
        sim.set_rest_faults(TRADES, parse_rest_schedule("huge"))
        err = await refused(rest, sim)
        assert isinstance(err, RestRefused) and err.kind == "too_large"
        assert cap < rest.stats.body_bytes_max <= cap + READ_CHUNK
        assert rest.stats.refused == {"too_large": 1}
        assert await asyncio.wait_for(rest.fetch("trade", SYMBOL, oldest(sim), 5), HANG_GUARD)


async def test_a_length_announced_over_the_cap_is_refused_before_reading() -> None:
    async with venue() as sim, client(sim.rest_url, timeout=HANG_GUARD, max_body=100) as rest:
        sim.set_rest_faults(TRADES, parse_rest_schedule("trickle"))  # a true Content-Length, then one byte a time
        err = await refused(rest, sim)
        assert isinstance(err, RestRefused) and err.kind == "too_large"
        assert rest.stats.body_bytes == 0


async def test_a_redirect_to_another_host_is_refused_not_followed() -> None:
    async with venue() as sim, client(sim.rest_url) as rest:
        sim.set_rest_faults(TRADES, parse_rest_schedule("redirect"))
        asked = requests_to(sim)
        err = await refused(rest, sim)
        assert isinstance(err, RestRefused) and (err.kind, err.status) == ("redirect", 302)
        assert "localhost" in str(err)  # the same simulator under another name: following it would work
        assert requests_to(sim) == asked + 1
        assert rest.stats.refused == {"redirect": 1}


async def test_invalid_json_is_refused() -> None:
    async with venue() as sim, client(sim.rest_url) as rest:
        sim.set_rest_faults(TRADES, parse_rest_schedule("bad_json"))
        err = await refused(rest, sim)
        assert isinstance(err, RestRefused) and err.kind == "bad_json"
        assert rest.stats.refused == {"bad_json": 1}


@pytest.mark.parametrize(
    ("fault", "retryable", "kind", "retry_after"),
    [
        ("400", False, "http_status", None),
        ("404", False, "http_status", None),
        ("418", True, "http_status", None),
        ("429:7", True, "http_status", 7.0),
        ("503", True, "http_status", None),
        ("close", True, "transport", None),
    ],
)
async def test_http_errors_are_mapped_to_one_tree(
    fault: str, retryable: bool, kind: str, retry_after: float | None
) -> None:
    async with venue() as sim, client(sim.rest_url) as rest:
        sim.set_rest_faults(TRADES, parse_rest_schedule(fault))
        err = await refused(rest, sim)
        assert type(err) is (RestRetryable if retryable else RestRefused)
        assert (err.retryable, err.kind, err.retry_after) == (retryable, kind, retry_after)
        assert rest.stats.refused == {kind: 1}


async def test_a_refused_connection_is_a_transport_failure() -> None:
    async with client(f"http://127.0.0.1:{free_port()}") as rest:
        with pytest.raises(RestRetryable) as caught:
            async with asyncio.timeout(HANG_GUARD):
                await rest.fetch("trade", SYMBOL, 1)
        assert caught.value.kind == "transport"


async def test_a_compressed_body_is_refused() -> None:
    """Decoding would let one read expand a thousandfold past the cap: the client asks for no encoding and
    refuses one it did not ask for."""
    answer = http_answer(b"\x1f\x8b\x08\x00junk", "Content-Encoding: gzip")
    async with RawServer(answer, keep_alive=False).running() as server, client(server.url) as rest:
        with pytest.raises(RestRefused) as caught:
            async with asyncio.timeout(HANG_GUARD):
                await rest.fetch("trade", SYMBOL, 1)
        assert caught.value.kind == "encoding"


async def test_requests_share_one_kept_alive_connection() -> None:
    answer = http_answer(b"[]")
    async with RawServer(answer, keep_alive=True).running() as server, client(server.url) as rest:
        async with asyncio.timeout(HANG_GUARD):
            for from_id in (1, 2, 3):
                assert await rest.fetch("trade", SYMBOL, from_id) == []
        assert (server.requests, server.connections) == (3, 1)


async def test_a_closed_client_refuses_use() -> None:
    rest = VenueRest("http://127.0.0.1:1")
    assert rest.state == "unopened"
    await rest.aclose()
    await rest.aclose()
    assert rest.state == "closed"
    with pytest.raises(RuntimeError, match="closed"):
        await rest.fetch("trade", SYMBOL, 1)


# ------------------------------------------------------------------------------------------------ rows (pure)


def trade_row(tid: int, price: str = "60000.10000000", time_ms: int = 1_700_000_000_000) -> dict[str, Any]:
    return {"id": tid, "price": price, "qty": "0.00100000", "quoteQty": "60.00010000", "time": time_ms,
            "isBuyerMaker": False, "isBestMatch": True}


@pytest.mark.parametrize(
    ("row", "named"),
    [
        ({"price": "1.0"}, "'id'"),
        (trade_row(5, price=60000.1), "'price'"),  # type: ignore[arg-type]
        (trade_row(5, price="6e4"), "'price'"),
        (trade_row(5, price="-1.0"), "'price'"),
        ({**trade_row(5), "id": True}, "'id'"),
        ({**trade_row(5), "id": -5}, "'id'"),
        ({**trade_row(5), "time": "1700000000000"}, "'time'"),
        ({**trade_row(5), "isBuyerMaker": 1}, "'isBuyerMaker'"),
    ],
)
def test_trade_rows_missing_a_field_or_of_a_wrong_type_are_refused(row: dict[str, Any], named: str) -> None:
    with pytest.raises(RestRefused, match=named) as caught:
        trades_to_ticks([trade_row(4), row], "binance", SYMBOL, 1)
    assert caught.value.kind == "bad_row"


def test_agg_rows_are_checked_too() -> None:
    row = {"a": 7, "p": "1.5", "q": "2", "f": 10, "l": 9, "T": 1, "m": True, "M": True}
    with pytest.raises(RestRefused, match="before first") as caught:
        agg_trades_to_ticks([row], "binance", SYMBOL, 1)
    assert caught.value.kind == "bad_row"
    with pytest.raises(RestRefused, match="'p'"):
        agg_trades_to_ticks([{**row, "l": 10, "p": None}], "binance", SYMBOL, 1)


@pytest.mark.parametrize("answer", [{"code": -1, "msg": "x"}, "[]", [trade_row(1), "x"], [[1, 2]]])
def test_an_answer_that_is_not_a_list_of_rows_is_refused(answer: Any) -> None:
    with pytest.raises(RestRefused) as caught:
        trades_to_ticks(answer, "binance", SYMBOL, 1)
    assert caught.value.kind == "bad_json"


def ticks_of(*ids: int, price: str = "60000.10000000", time_ms: int = 1_700_000_000_000) -> list[Tick]:
    return trades_to_ticks([trade_row(i, price, time_ms + i) for i in ids], "binance", SYMBOL, 1)


@pytest.mark.parametrize(
    ("ids", "from_id", "limit", "why"),
    [
        ((4, 5, 6), 5, 10, "before the id asked"),
        ((5, 7, 7), 5, 10, "not after the row before it"),
        ((5, 6, 5), 5, 10, "not after the row before it"),
        ((5, 6, 7), 5, 2, "3 rows for a limit of 2"),
    ],
)
def test_ids_outside_the_asked_range_are_refused(ids: tuple[int, ...], from_id: int, limit: int, why: str) -> None:
    with pytest.raises(RestRefused, match=why) as caught:
        check_page(ticks_of(*ids), from_id, limit)
    assert caught.value.kind == "bad_row"


def test_a_page_may_start_later_when_the_venue_no_longer_keeps_the_id_asked() -> None:
    check_page(ticks_of(8, 9, 10), 5, 3)
    check_page([], 5, 3)


def test_rows_that_disagree_with_the_live_ticks_are_another_symbols() -> None:
    live = ticks_of(10, 11, 12)
    check_against(ticks_of(*range(5, 14)), live)  # the same trades: agreed
    with pytest.raises(RestRefused, match="price") as caught:
        check_against(ticks_of(9, 10, 11, price="3000.10000000"), live)
    assert caught.value.kind == "wrong_symbol"
    with pytest.raises(RestRefused, match="after the live tick") as caught:
        check_against(ticks_of(8, 9, time_ms=1_700_000_001_000), live)  # before 10 by id, after it by time
    assert caught.value.kind == "wrong_symbol"


def test_a_marker_among_the_live_ticks_is_not_compared() -> None:
    marker: Any = {"v": 1, "venue": "binance", "symbol": SYMBOL, "channel": "trade", "seq": 10,
                   "ts_event": 1, "ts_recv": 1, "gap_first": 10, "gap_last": 10, "reason": "x"}
    check_against(ticks_of(9, 10, price="1.0"), [marker])


# ------------------------------------------------------------------------------ the simulator's hostile answers (pure)


def test_hostile_answers_are_parsed_with_repeats() -> None:
    assert parse_rest_schedule("huge, trickle, redirect,bad_json,other_symbol") == tuple(
        RestFault(None, hostile=h) for h in Hostile
    )
    assert parse_rest_schedule("503*2,trickle*") == (
        RestFault(503), RestFault(503), RestFault(None, hostile=Hostile.TRICKLE, forever=True)
    )
    assert str(RestFault(None, hostile=Hostile.HUGE, forever=True)) == "huge*"
    for bad in ("trickle*,503", "huge*0", "trickle:3", "hug", "503*1000001"):
        with pytest.raises(SimulatorConfigError):
            parse_rest_schedule(bad)
    with pytest.raises(SimulatorConfigError):
        RestFault(503, hostile=Hostile.TRICKLE)
    command = parse_control("/control/rest_faults", {"path": ["historicalTrades"], "schedule": ["trickle*"]})
    assert not isinstance(command, str)
    assert command.rest_faults == (RestFault(None, hostile=Hostile.TRICKLE, forever=True),)


def test_a_fault_for_every_request_stays_until_cleared() -> None:
    faults = RestFaults({TRADES: parse_rest_schedule("503*2,trickle*")})
    assert faults.pending() == {TRADES: "503*2,trickle*"}
    got = [str(faults.take(TRADES)) for _ in range(5)]
    assert got == ["503", "503", "trickle*", "trickle*", "trickle*"]
    faults.clear()
    assert faults.take(TRADES) is None


def dechunk(parts: Iterator[bytes]) -> bytes:
    data = b"".join(parts)
    out = bytearray()
    while True:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            assert data == b"\r\n"
            return bytes(out)
        out += data[:n]
        assert data[n : n + 2] == b"\r\n"
        data = data[n + 2 :]


def test_the_huge_body_is_one_valid_json_list_of_about_the_size_asked() -> None:
    body = dechunk(huge_body(300_000))
    assert 300_000 - 70_000 < len(body) <= 300_000
    rows = orjson.loads(body)
    assert rows[0]["price"] == "1.00000000" and len(rows) > 1000


# ---------------------------------------------------------------------------------------- the repair under hostile REST


class Feed:
    """A sequencer, an ingress and a repairer with the real client, wired as the venue session wires them."""

    def __init__(self, url: str, settings: RepairSettings, **client: Any) -> None:
        self.ingress: IngressQueue[Tick] = IngressQueue(10_000, Policy.BLOCK)
        self.sequencer = Sequencer()
        self.rest = VenueRest(url, **client)
        self.repairer = GapRepairer(self.rest, self.ingress, self.sequencer, settings)
        self.markers: list[Tick] = []

    def feed(self, t: Tick) -> Verdict:
        verdict = self.sequencer.accept(t)
        if verdict.accepted:
            ident = (t["venue"], t["symbol"], t["channel"])
            if self.repairer.holds and self.repairer.hold(ident, t):
                return verdict
            if verdict is Verdict.GAP and self.sequencer.last_gap is not None:
                marker = self.repairer.start(t, self.sequencer.last_gap)
                if marker is None:
                    return verdict
                self.markers.append(marker)
                assert self.ingress.offer(marker)
            assert self.ingress.offer(t)
        return verdict

    def drain(self) -> list[Tick]:
        return list(self.ingress.take(10**9))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Feed]:
        task = asyncio.create_task(self.repairer.run())
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self.repairer.aclose()

    async def released(self) -> None:
        await until(lambda: not self.repairer.holds, "the hold to be released")


async def live_ticks(sim: Simulator, n: int, symbol: str = SYMBOL) -> list[Tick]:
    """The venue's first ``n`` trades as the live stream carried them (built from its REST history)."""
    async with client(sim.rest_url) as rest:
        rows = await asyncio.wait_for(rest.fetch("trade", symbol, oldest(sim, symbol), n), HANG_GUARD)
    return trades_to_ticks(rows, "binance", symbol, 1)


def describe(out: list[Tick]) -> list[int | tuple[int, int]]:
    return [(t["gap_first"], t["gap_last"]) if is_gap_marker(t) else t["seq"] for t in out]  # type: ignore[typeddict-item]


@pytest.mark.parametrize(("hostile", "kind"), [("bad_json", "bad_json"), ("other_symbol", "wrong_symbol")])
async def test_invalid_json_and_another_symbols_rows_are_refused_counted_and_marked(hostile: str, kind: str) -> None:
    """Nothing of the answer is stored: the whole gap is marked, and the refusal counted by kind."""
    async with venue(symbols=(SYMBOL, "ETHUSDT")) as sim:
        ticks = await live_ticks(sim, 12)
        sim.set_rest_faults(TRADES, parse_rest_schedule(hostile))
        f = Feed(sim.rest_url, RepairSettings())
        async with f.running():
            f.feed(ticks[3])
            assert f.feed(ticks[9]) is Verdict.GAP
            await f.released()
    assert describe(f.drain()) == [ticks[3]["seq"], (ticks[4]["seq"], ticks[8]["seq"]), ticks[9]["seq"]]
    stats = f.repairer.stats()
    assert stats.refused == {kind: 1}
    assert (stats.ticks_repaired.get("trade", 0), stats.ticks_unrepaired) == (0, {"trade": 5})


async def test_other_symbols_rows_are_well_formed_so_only_the_live_ticks_tell() -> None:
    """The client cannot tell another symbol's rows: they parse and are in range; the live ticks do."""
    async with venue(symbols=(SYMBOL, "ETHUSDT")) as sim, client(sim.rest_url) as rest:
        ticks = await live_ticks(sim, 12)
        sim.set_rest_faults(TRADES, parse_rest_schedule("other_symbol"))
        rows = await asyncio.wait_for(rest.fetch("trade", SYMBOL, ticks[4]["seq"], 10), HANG_GUARD)
    fetched = trades_to_ticks(rows, "binance", SYMBOL, 1)
    check_page(fetched, ticks[4]["seq"], 10)
    with pytest.raises(RestRefused) as caught:
        check_against(fetched, ticks[9:])
    assert caught.value.kind == "wrong_symbol"


async def test_a_trickling_rest_holds_the_stream_no_longer_than_hold_s() -> None:
    """The client's own deadline is longer than the hold: the hold ends the repair, marks the gap and
    releases the held ticks; the request it cut is counted as a deadline."""
    async with venue() as sim:
        ticks = await live_ticks(sim, 12)
        sim.set_rest_faults(TRADES, parse_rest_schedule("trickle*"))
        f = Feed(sim.rest_url, RepairSettings(hold_s=1.0), timeout=HANG_GUARD)
        async with f.running():
            f.feed(ticks[3])
            f.feed(ticks[9])
            f.feed(ticks[10])  # held behind the repair
            await f.released()
    out = f.drain()
    assert describe(out) == [ticks[3]["seq"], (ticks[4]["seq"], ticks[8]["seq"]), ticks[9]["seq"], ticks[10]["seq"]]
    assert "held the stream for its 1 s" in out[1]["reason"]  # type: ignore[typeddict-item]
    stats = f.repairer.stats()
    assert (stats.hold_expired, stats.refused) == (1, {"deadline": 1})


async def test_a_failing_rest_server_is_skipped_then_tried_again() -> None:
    """Three repairs in a row refused open the breaker: the next gap is marked at once, holding nothing,
    and is counted; after the cool-down one repair is tried (half-open) and its success closes it."""
    settings = RepairSettings(breaker_failures=3, breaker_cooldown_s=0.3)
    async with venue() as sim:
        ticks = await live_ticks(sim, 30)
        sim.set_rest_faults(TRADES, parse_rest_schedule("400*"))
        f = Feed(sim.rest_url, settings)
        async with f.running():
            asked = requests_to(sim)
            f.feed(ticks[0])
            for i in (2, 4, 6):  # three gaps of one id, each repair refused
                f.feed(ticks[i])
                await f.released()
            assert f.repairer.breaker.state is BreakerState.OPEN
            f.feed(ticks[8])  # the venue's REST is skipped: marked at once
            assert not f.repairer.holds and len(f.markers) == 1
            assert "circuit open" in f.markers[0]["reason"]  # type: ignore[typeddict-item]
            assert requests_to(sim) == asked + 3
            sim.clear_faults()
            await until(lambda: f.repairer.breaker.retry_in(time.monotonic()) == 0, "the cool-down to pass")
            f.feed(ticks[10])  # half-open: this one is tried, and repaired
            await f.released()
    stats = f.repairer.stats()
    assert (stats.breaker, stats.breaker_opened, stats.breaker_skipped) == ("closed", 1, 1)
    assert stats.refused == {"http_status": 3}
    assert stats.gaps_repaired == 1 and stats.ticks_repaired == {"trade": 1}
    assert describe(f.drain())[-2:] == [ticks[9]["seq"], ticks[10]["seq"]]


def test_circuit_breaker() -> None:
    b = CircuitBreaker(failures=2, cooldown_s=10.0, max_cooldown_s=25.0)
    assert b.allow(0.0) and b.record(False, 0.0) is None
    assert b.record(False, 1.0) is BreakerState.OPEN
    assert not b.allow(5.0) and b.retry_in(5.0) == 6.0
    assert b.allow(11.0) and b.state is BreakerState.HALF_OPEN
    assert b.record(False, 11.0) is BreakerState.OPEN  # the trial failed: open for twice as long
    assert not b.allow(30.0) and b.allow(31.0)
    assert b.record(False, 31.0) is BreakerState.OPEN and b.cooldown_s == 25.0  # capped
    assert b.allow(56.0) and b.record(True, 56.0) is BreakerState.CLOSED
    assert (b.opened, b.skipped, b.consecutive, b.cooldown_s) == (3, 2, 0, 10.0)
    assert b.record(False, 57.0) is None  # one failure after a success: still closed
    assert b.record(True, 58.0) is None and b.consecutive == 0


# ------------------------------------------------------------------------------------------------ the drill


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_drill_a_trickling_rest_does_not_stall_the_stream(
    aredis: aioredis.Redis, redis_url: str, prefix: str, tmp_path: Any
) -> None:
    """The venue closes the connection every 10 s and its REST sends one byte every 0.5 s.  Of the trades
    the venue makes in a 30 s window, at least half are in Redis by its end; every id of the window is
    then stored or inside a gap marker; the ingestor logs no traceback, and its RSS grows by less than
    64 MiB over the window."""
    key = f"{prefix}:binance:{SYMBOL}:trade"
    config = SimulatorConfig(symbols=(SYMBOL,), rate=400.0, seed=9, close_every=10.0, rest_faults="*=trickle*")
    log_path = tmp_path / "ingest.log"
    async with Simulator(config) as sim:
        env = {**os.environ, "MARKET_REDIS_URL": redis_url}
        with open(log_path, "wb") as log_file:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ops.cli", "ingest", "--url", sim.ws_url, "--symbols", SYMBOL,
                "--channels", "trade", "--prefix", prefix, "--metrics-port", "0",
                "--spill-dir", str(tmp_path / "spill"), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
            )
        try:
            async with asyncio.timeout(HANG_GUARD):
                while not await aredis.xlen(key):
                    assert child.returncode is None, log_path.read_text()[-2000:]
                    await asyncio.sleep(0.05)  # poll
            rss_start = rss(child.pid)
            first = sim.market.history(SYMBOL).trade_id_range[1]
            await asyncio.sleep(30.0)  # pace: the window is 30 s of the venue's trading, no condition ends it
            end = sim.market.history(SYMBOL).trade_id_range[1]
            rss_end = rss(child.pid)
            stored = await stored_ids(aredis, key, first, end)
            fraction = len(stored) / (end - first)
            print(f"drill: {len(stored)} of {end - first} trades stored by the window's end ({fraction:.1%}); "
                  f"RSS {rss_start / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB")
            assert fraction >= 0.5
            covered: set[int] = set()
            try:
                async with asyncio.timeout(HANG_GUARD):  # the holds still open at the window's end are released
                    while len(covered) < end - first:
                        covered = await stored_ids(aredis, key, first, end, with_markers=True)
                        await asyncio.sleep(0.1)  # poll
            except TimeoutError:
                raise AssertionError(f"{end - first - len(covered)} ids of the window neither stored nor marked "
                                     f"{HANG_GUARD} s after it") from None
            markers = await marker_ranges(aredis, key, first, end)
        finally:
            if child.returncode is None:
                child.terminate()
            await asyncio.wait_for(child.wait(), HANG_GUARD)
    log = log_path.read_text()
    assert markers, "the reconnects' gaps were not marked"
    assert "Traceback" not in log, log[-3000:]
    assert '"level":"error"' not in log, log[-3000:]
    assert rss_end - rss_start < 64 * 2**20


def rss(pid: int) -> int:
    """The resident set size of process ``pid`` in bytes, from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def stored_ids(
    r: aioredis.Redis, key: str, first: int, end: int, *, with_markers: bool = False
) -> set[int]:
    """The ids in ``[first, end)`` the stream holds as ticks (and with ``with_markers``, inside markers)."""
    out: set[int] = set()
    for _, fields in await r.xrange(key):
        t: Any = decode_tick(fields[b"d"])
        if is_gap_marker(t):
            if with_markers:
                out.update(range(max(first, t["gap_first"]), min(end, t["gap_last"] + 1)))
        elif first <= t["seq"] < end:
            out.add(t["seq"])
    return out


async def marker_ranges(r: aioredis.Redis, key: str, first: int, end: int) -> list[tuple[int, int]]:
    out = []
    for _, fields in await r.xrange(key):
        t: Any = decode_tick(fields[b"d"])
        if is_gap_marker(t) and t["gap_last"] >= first and t["gap_first"] < end:
            out.append((t["gap_first"], t["gap_last"]))
    return out
