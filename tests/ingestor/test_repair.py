"""ingestor.repair and ingestor.rest: gap repair over REST.

``merge_repair`` is pure and checked by hand and by property.  The REST converters are checked
against ``ingestor.binance.parse_frame`` fed the WebSocket frames built from the same values.
``GapRepairer`` runs for real, with a real ``IngressQueue`` and ``Sequencer``, driven the way the
venue session drives it: accept, hold while a repair runs, start a repair on a gap.  Its REST side is
an in-memory venue where a test must hold a fetch or shape the rows; HTTP errors are real: the
simulator's REST answers them (400, 418, 429 with Retry-After, 5xx, a dropped connection) to the real
client, ``ingestor.rest.VenueRest``.  The last test restarts an ingestor and checks that what it missed
is backfilled over REST.  Waits are on conditions, each bounded.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.sequencing import Verdict
from consumer_sdk.core.tick import Tick, decode_tick, is_gap_marker, make_gap_marker
from distributor.ingress import IngressQueue, Policy
from ingestor.binance import parse_frame
from ingestor.config import load_settings
from ingestor.repair import GapRepairer, RepairSettings, merge_repair
from ingestor.rest import VenueRest, agg_trades_to_ticks, classify_status, trades_to_ticks
from ingestor.sequencer import GapReport, Sequencer
from ingestor.service import Ingestor
from ops.simulator import Simulator, SimulatorConfig
from ops.simulator.rest import parse_rest_schedule

VENUE = "binance"
SYMBOL = "BTCUSDT"
T0_MS = 1_700_000_000_000
#: bound for every wait on a condition; generous so a slow machine does not flake
WAIT = 2.0


# ------------------------------------------------------------------------------------------------
# Values, REST rows and WebSocket frames built from the same values


def trade_values(tid: int) -> dict[str, Any]:
    return {
        "id": tid, "price": f"{60000 + tid % 97}.{tid % 100:02d}000000", "qty": f"0.{tid % 1000:03d}00001",
        "time": T0_MS + tid * 3, "buyer_maker": tid % 3 == 0,
    }


def trade_row(v: dict[str, Any]) -> dict[str, Any]:
    """A ``/api/v3/historicalTrades`` row."""
    return {
        "id": v["id"], "price": v["price"], "qty": v["qty"], "quoteQty": "123.45000000", "time": v["time"],
        "isBuyerMaker": v["buyer_maker"], "isBestMatch": True,
    }


def trade_frame(v: dict[str, Any], symbol: str = SYMBOL) -> bytes:
    """The combined-stream ``<symbol>@trade`` frame for the same trade."""
    return orjson.dumps({
        "stream": f"{symbol.lower()}@trade",
        "data": {
            "e": "trade", "E": v["time"] + 1, "s": symbol, "t": v["id"], "p": v["price"], "q": v["qty"],
            "T": v["time"], "m": v["buyer_maker"], "M": True,
        },
    })


def agg_values(aid: int) -> dict[str, Any]:
    first = aid * 4
    return {
        "a": aid, "p": f"{3000 + aid % 13}.{aid % 100:02d}", "q": f"{aid % 7}.500", "f": first, "l": first + aid % 4,
        "T": T0_MS + aid * 5, "m": aid % 2 == 1,
    }


def agg_row(v: dict[str, Any]) -> dict[str, Any]:
    """An ``/api/v3/aggTrades`` row."""
    return {"a": v["a"], "p": v["p"], "q": v["q"], "f": v["f"], "l": v["l"], "T": v["T"], "m": v["m"], "M": True}


def agg_frame(v: dict[str, Any], symbol: str = SYMBOL) -> bytes:
    return orjson.dumps({
        "stream": f"{symbol.lower()}@aggTrade",
        "data": {
            "e": "aggTrade", "E": v["T"] + 2, "s": symbol, "a": v["a"], "p": v["p"], "q": v["q"], "f": v["f"],
            "l": v["l"], "T": v["T"], "m": v["m"], "M": True,
        },
    })


def live_tick(channel: str, ident: int, ts_recv: int = 1) -> Tick:
    """What the session gets from the venue's WebSocket for id ``ident``."""
    raw = trade_frame(trade_values(ident)) if channel == "trade" else agg_frame(agg_values(ident))
    tick = parse_frame(raw, ts_recv)
    assert isinstance(tick, dict)
    return tick


def rest_rows(channel: str, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    if channel == "trade":
        return {i: trade_row(trade_values(i)) for i in ids}
    return {i: agg_row(agg_values(i)) for i in ids}


# ------------------------------------------------------------------------------------------------
# rest: converters and status classification


def test_trades_to_ticks_matches_parse_frame() -> None:
    ids = [5, 6, 7, 1000, 2**40]
    rows = [trade_row(trade_values(i)) for i in ids]
    got = trades_to_ticks(rows, VENUE, SYMBOL, 42)
    assert got == [parse_frame(trade_frame(trade_values(i)), 42) for i in ids]
    assert [t["side"] for t in got] == ["buy", "sell", "buy", "buy", "buy"]  # 6 % 3 == 0: buyer maker, taker sold


def test_agg_trades_to_ticks_matches_parse_frame() -> None:
    ids = [1, 2, 3, 77, 2**33]
    rows = [agg_row(agg_values(i)) for i in ids]
    got = agg_trades_to_ticks(rows, VENUE, SYMBOL, 42)
    assert got == [parse_frame(agg_frame(agg_values(i)), 42) for i in ids]


def test_converters_keep_decimal_strings_exactly() -> None:
    row = trade_row({"id": 9, "price": "0.00000100", "qty": "1000.00000000", "time": T0_MS, "buyer_maker": False})
    (tick,) = trades_to_ticks([row], VENUE, "SHIBUSDT", 7)
    assert tick["price"] == "0.00000100"  # type: ignore[typeddict-item]
    assert tick["qty"] == "1000.00000000"  # type: ignore[typeddict-item]
    assert tick["ts_event"] == T0_MS * 1000
    assert (tick["ts_recv"], tick["seq"], tick["symbol"], tick["venue"]) == (7, 9, "SHIBUSDT", VENUE)
    assert trades_to_ticks([], VENUE, SYMBOL, 7) == []
    assert agg_trades_to_ticks([], VENUE, SYMBOL, 7) == []


def without_recv(t: Any) -> dict[str, Any]:
    return {k: x for k, x in t.items() if k != "ts_recv"}


#: a price or quantity: above zero (zero is refused by both paths alike)
decimal_text = st.from_regex(r"\A(0|[1-9][0-9]{0,7})\.[0-9]{1,8}\Z").filter(lambda text: text.strip("0.") != "")
epoch_ms = st.integers(min_value=1_500_000_000_000, max_value=4_000_000_000_000)


@settings(max_examples=100, deadline=None)
@given(
    tid=st.integers(min_value=0, max_value=2**53), price=decimal_text, qty=decimal_text, time=epoch_ms,
    maker=st.booleans(), ts_recv=st.integers(min_value=0, max_value=2**62),
)
def test_trade_row_and_frame_agree(tid: int, price: str, qty: str, time: int, maker: bool, ts_recv: int) -> None:
    v = {"id": tid, "price": price, "qty": qty, "time": time, "buyer_maker": maker}
    (from_rest,) = trades_to_ticks([trade_row(v)], VENUE, SYMBOL, ts_recv)
    from_ws = parse_frame(trade_frame(v), ts_recv + 12345)
    assert isinstance(from_ws, dict)
    assert from_rest["ts_recv"] == ts_recv
    assert without_recv(from_rest) == without_recv(from_ws)


@settings(max_examples=100, deadline=None)
@given(
    aid=st.integers(min_value=0, max_value=2**53), price=decimal_text, qty=decimal_text,
    first=st.integers(min_value=0, max_value=2**53), count=st.integers(min_value=0, max_value=50), time=epoch_ms,
    maker=st.booleans(), ts_recv=st.integers(min_value=0, max_value=2**62),
)
def test_agg_row_and_frame_agree(
    aid: int, price: str, qty: str, first: int, count: int, time: int, maker: bool, ts_recv: int
) -> None:
    v = {"a": aid, "p": price, "q": qty, "f": first, "l": first + count, "T": time, "m": maker}
    (from_rest,) = agg_trades_to_ticks([agg_row(v)], VENUE, SYMBOL, ts_recv)
    from_ws = parse_frame(agg_frame(v), ts_recv + 1)
    assert isinstance(from_ws, dict)
    assert without_recv(from_rest) == without_recv(from_ws)


@pytest.mark.parametrize("status", [418, 429, 500, 502, 503, 504])
def test_rest_status_retryable(status: int) -> None:
    assert classify_status(status, None) == (True, None)
    assert classify_status(status, "30") == (True, 30.0)
    assert classify_status(status, "0.5") == (True, 0.5)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_rest_status_not_retryable(status: int) -> None:
    assert classify_status(status, None) == (False, None)
    assert classify_status(status, "30") == (False, None)


@pytest.mark.parametrize("header", ["", "later", "Wed, 21 Oct 2015 07:28:00 GMT", "10s"])
def test_rest_garbage_retry_after_ignored(header: str) -> None:
    assert classify_status(429, header) == (True, None)


@pytest.mark.parametrize("header", ["inf", "1e999", "nan"])
def test_rest_non_finite_retry_after_ignored(header: str) -> None:
    """``inf`` would make the repair sleep past its deadline; ``nan`` is no number of seconds."""
    assert classify_status(429, header) == (True, None)


# ------------------------------------------------------------------------------------------------
# merge_repair: by hand


def tick(seq: int, tag: str = "", channel: str = "trade") -> Tick:
    t: Any = {
        "v": 1, "venue": VENUE, "symbol": SYMBOL, "channel": channel, "seq": seq,
        "ts_event": (T0_MS + seq) * 1000, "ts_recv": (T0_MS + seq) * 1000 + 500,
        "trade_id": seq, "price": tag or f"{seq}.0", "qty": "1", "side": "buy",
    }
    return t  # type: ignore[no-any-return]


def seqs(out: Iterable[Tick]) -> list[int]:
    return [t["seq"] for t in out]


def test_merge_fetched_then_held_in_order() -> None:
    fetched = [tick(s) for s in (5, 6, 7, 8, 9)]
    held = [tick(s) for s in (10, 11, 12)]
    out = merge_repair(5, fetched, held, "why")
    assert seqs(out) == list(range(5, 13))
    assert not any(is_gap_marker(t) for t in out)
    assert out[:5] == fetched
    assert all(a is b for a, b in zip(out[5:], held, strict=True))


def test_merge_accepts_unsorted_fetched() -> None:
    fetched = [tick(s) for s in (8, 5, 9, 7, 6)]
    out = merge_repair(5, fetched, [tick(10)], "why")
    assert seqs(out) == list(range(5, 11))


def test_merge_held_wins_on_overlap() -> None:
    fetched = [tick(s, "fetched") for s in range(5, 13)]
    held = [tick(s, "held") for s in (10, 11, 12)]
    out = merge_repair(5, fetched, held, "why")
    assert seqs(out) == list(range(5, 13))
    assert [t["price"] for t in out] == ["fetched"] * 5 + ["held"] * 3  # type: ignore[typeddict-item]
    assert all(a is b for a, b in zip(out[5:], held, strict=True))


def test_merge_ignores_fetched_outside_the_range() -> None:
    fetched = [tick(s) for s in (2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 100)]
    held = [tick(s) for s in (10, 11, 12)]
    assert seqs(merge_repair(5, fetched, held, "why")) == list(range(5, 13))


def test_merge_one_marker_per_missing_run() -> None:
    fetched = [tick(5), tick(6), tick(9)]
    held = [tick(10), tick(11)]
    out = merge_repair(5, fetched, held, "venue lost them")
    assert seqs(out) == [5, 6, 8, 9, 10, 11]
    marker = out[2]
    assert is_gap_marker(marker)
    assert marker == make_gap_marker(
        VENUE, SYMBOL, "trade", 7, 8, out[3]["ts_event"], out[3]["ts_recv"], "venue lost them"
    )
    assert marker["gap_first"] == 7  # type: ignore[typeddict-item]
    assert marker["gap_last"] == 8  # type: ignore[typeddict-item]
    assert marker["seq"] == 8
    assert marker["ts_event"] == out[3]["ts_event"]  # the next real tick's, so the entry IDs stay in order
    assert marker["reason"] == "venue lost them"  # type: ignore[typeddict-item]
    assert marker["v"] == 1


def test_merge_nothing_fetched_is_one_marker_then_held() -> None:
    held = [tick(10), tick(11)]
    out = merge_repair(5, [], held, "REST refused")
    assert len(out) == 3
    assert is_gap_marker(out[0])
    assert (out[0]["gap_first"], out[0]["gap_last"], out[0]["seq"]) == (5, 9, 9)  # type: ignore[typeddict-item]
    assert out[0]["ts_event"] == held[0]["ts_event"]
    assert out[1:] == held


def test_merge_marks_a_hole_among_the_held_ticks() -> None:
    fetched = [tick(s) for s in range(5, 10)]
    held = [tick(10), tick(12), tick(15)]
    out = merge_repair(5, fetched, held, "why")
    assert seqs(out) == [5, 6, 7, 8, 9, 10, 11, 12, 14, 15]
    assert [(t["gap_first"], t["gap_last"]) for t in out if is_gap_marker(t)] == [(11, 11), (13, 14)]  # type: ignore[typeddict-item]


def test_merge_fetched_fills_a_hole_among_the_held_ticks() -> None:
    fetched = [tick(s) for s in range(5, 16)]
    held = [tick(10), tick(12), tick(15)]
    out = merge_repair(5, fetched, held, "why")
    assert seqs(out) == list(range(5, 16))
    assert not any(is_gap_marker(t) for t in out)


def test_merge_empty_held_is_empty() -> None:
    assert merge_repair(5, [tick(5), tick(6)], [], "why") == []
    assert merge_repair(5, [], [], "why") == []


def test_merge_does_not_touch_its_inputs() -> None:
    fetched = [tick(5), tick(7)]
    held = [tick(10), tick(11)]
    before = copy.deepcopy((fetched, held))
    merge_repair(5, fetched, held, "why")
    assert (fetched, held) == before


# ------------------------------------------------------------------------------------------------
# merge_repair: properties


@st.composite
def repair_inputs(draw: st.DrawFn) -> tuple[int, list[Tick], list[Tick]]:
    first = draw(st.integers(min_value=0, max_value=1000))
    span = draw(st.integers(min_value=1, max_value=80))
    last = first + span
    # the held ticks are accepted live ticks: strictly increasing, from after the gap, ending at ``last``
    inner = st.sets(st.integers(min_value=first + 1, max_value=last - 1), max_size=span) if span > 1 else st.just(set())
    held_ids = sorted(draw(inner) | {last})
    fetched_ids = draw(st.lists(st.integers(min_value=max(0, first - 10), max_value=last + 10), max_size=120))
    fetched = [tick(s, "fetched") for s in fetched_ids]
    held = [tick(s, "held") for s in held_ids]
    return first, fetched, held


@settings(max_examples=300, deadline=None)
@given(repair_inputs())
def test_merge_covers_every_id_exactly_once(inputs: tuple[int, list[Tick], list[Tick]]) -> None:
    first, fetched, held = inputs
    out = merge_repair(first, fetched, held, "r")
    got = seqs(out)
    assert got == sorted(set(got))  # strictly increasing
    covered: list[int] = []
    for t in out:
        if is_gap_marker(t):
            lo, hi = t["gap_first"], t["gap_last"]  # type: ignore[typeddict-item]
            assert lo <= hi == t["seq"]
            covered.extend(range(lo, hi + 1))
        else:
            covered.append(t["seq"])
    assert covered == list(range(first, held[-1]["seq"] + 1))
    # one marker per missing run: never two markers in a row, never one at the end
    assert not any(is_gap_marker(a) and is_gap_marker(b) for a, b in itertools.pairwise(out))
    assert not is_gap_marker(out[-1])
    # every held tick is there, as itself; fetched ticks only where nothing was held
    held_seqs = {t["seq"] for t in held}
    real = {t["seq"]: t for t in out if not is_gap_marker(t)}
    assert all(real[t["seq"]] is t for t in held)
    in_range = {t["seq"] for t in fetched if first <= t["seq"] <= held[-1]["seq"]}
    assert set(real) == in_range | held_seqs
    # entry IDs (ms of ts_event) never go back
    ms = [t["ts_event"] // 1000 for t in out]
    assert ms == sorted(ms)


# ------------------------------------------------------------------------------------------------
# GapRepairer with a fake REST


class FakeRest:
    """Serves rows by id like ``historicalTrades``/``aggTrades`` with ``fromId`` and ``limit``, from memory, where a
    test must hold a fetch (``gate``) or shape the rows (``override``); HTTP errors come from the simulator."""

    def __init__(self, rows: dict[int, dict[str, Any]] | None = None) -> None:
        self.rows = rows or {}
        self.calls: list[tuple[str, str, int, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.override: Callable[[int], list[dict[str, Any]]] | None = None
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True

    async def fetch(self, channel: str, symbol: str, from_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        self.calls.append((channel, symbol, from_id, limit))
        await self.gate.wait()
        if self.override is not None:
            return self.override(from_id)
        return [row for i, row in sorted(self.rows.items()) if i >= from_id][:limit]


class Harness:
    """The repairer wired as the venue session wires it."""

    def __init__(
        self, rest: FakeRest | None, settings: RepairSettings | None = None, capacity: int = 10_000,
        policy: Policy = Policy.BLOCK,
    ) -> None:
        self.rest = rest
        self.ingress: IngressQueue[Tick] = IngressQueue(capacity, policy)
        self.sequencer = Sequencer()
        self.repairer = GapRepairer(rest, self.ingress, self.sequencer, settings)  # type: ignore[arg-type]
        self.verdicts: list[Verdict] = []

    def feed(self, t: Tick) -> None:
        """Same steps as the session's read loop, for one parsed tick."""
        verdict = self.sequencer.accept(t)
        self.verdicts.append(verdict)
        if not verdict.accepted:
            return
        ident = (t["venue"], t["symbol"], t["channel"])
        if self.repairer.holds and self.repairer.hold(ident, t):
            return
        if verdict is Verdict.GAP and self.sequencer.last_gap is not None:
            marker = self.repairer.start(t, self.sequencer.last_gap)
            if marker is None:
                return
            assert self.ingress.offer(marker)
        assert self.ingress.offer(t)

    def drain(self) -> list[Tick]:
        return list(self.ingress.take(10**9))

    async def __aenter__(self) -> Harness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the REST client, as the ingestor does when it stops."""
        await self.repairer.aclose()


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.001)  # poll
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for: {what}") from None


@asynccontextmanager
async def running(repairer: GapRepairer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(repairer.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def ident(channel: str = "trade") -> tuple[str, str, str]:
    return (VENUE, SYMBOL, channel)


def describe(out: Iterable[Tick]) -> list[int | tuple[int, int]]:
    """Seqs, with markers as ``(gap_first, gap_last)``."""
    return [(t["gap_first"], t["gap_last"]) if is_gap_marker(t) else t["seq"] for t in out]  # type: ignore[typeddict-item]


@pytest.mark.parametrize("channel", ["trade", "agg_trade"])
async def test_gap_is_held_fetched_and_released_in_order(channel: str) -> None:
    rest = FakeRest(rest_rows(channel, range(1, 30)))
    rest.gate.clear()  # hold the fetch until the test says so
    h = Harness(rest)
    for i in range(1, 5):
        h.feed(live_tick(channel, i))
    h.feed(live_tick(channel, 8))  # 5..7 missing
    assert h.verdicts[-1] is Verdict.GAP
    assert ident(channel) in h.repairer.holds
    assert seqs(h.drain()) == [1, 2, 3, 4]  # 8 is held, not published ahead of 5..7

    async with running(h.repairer) as task:
        await until(lambda: len(rest.calls) == 1, "the first REST fetch")
        assert rest.calls[0] == (channel, SYMBOL, 5, RepairSettings().page)
        h.feed(live_tick(channel, 9))  # arrive during the repair: held behind it
        h.feed(live_tick(channel, 10))
        assert len(h.ingress) == 0
        rest.gate.set()
        await until(lambda: ident(channel) not in h.repairer.holds, "the hold to be released")
        out = h.drain()
        assert describe(out) == [5, 6, 7, 8, 9, 10]
        expected_fetched = [live_tick(channel, i) for i in (5, 6, 7)]
        assert [without_recv(t) for t in out[:3]] == [without_recv(t) for t in expected_fetched]
        assert h.repairer.gaps_repaired == 1
        assert h.repairer.gaps_unrepaired == 0
        assert h.repairer.ticks_repaired == {channel: 3}
        # after the repair: live ticks go straight through, and a late copy of a repaired id is a duplicate
        h.feed(live_tick(channel, 11))
        assert seqs(h.drain()) == [11]
        h.feed(live_tick(channel, 6))
        assert h.verdicts[-1] is Verdict.DUPLICATE
        assert len(h.ingress) == 0
        assert not task.done()


async def test_short_fetch_ends_with_a_marker() -> None:
    rest = FakeRest(rest_rows("trade", [5, 6]))  # the venue returns 5, 6, then nothing
    h = Harness(rest)
    for i in range(1, 5):
        h.feed(live_tick("trade", i))
    h.feed(live_tick("trade", 10))  # 5..9 missing
    h.drain()
    async with running(h.repairer):
        await until(lambda: ident() not in h.repairer.holds, "the hold to be released")
    out = h.drain()
    assert describe(out) == [5, 6, (7, 9), 10]
    marker = out[2]
    assert marker["seq"] == 9
    assert marker["ts_event"] == out[3]["ts_event"]
    assert marker["reason"]  # type: ignore[typeddict-item]
    assert [c[2] for c in rest.calls] == [5, 7]
    assert h.repairer.gaps_repaired == 0
    assert h.repairer.gaps_unrepaired == 1
    assert h.repairer.ticks_repaired == {"trade": 2}
    assert h.repairer.ticks_unrepaired == {"trade": 3}


async def test_venue_that_no_longer_has_the_oldest_ids_gives_a_leading_marker() -> None:
    rest = FakeRest(rest_rows("trade", range(8, 40)))  # 5..7 are older than the venue keeps
    h = Harness(rest)
    h.feed(live_tick("trade", 4))
    h.feed(live_tick("trade", 10))
    h.drain()
    async with running(h.repairer):
        await until(lambda: ident() not in h.repairer.holds, "the hold to be released")
    assert describe(h.drain()) == [(5, 7), 8, 9, 10]
    assert h.repairer.ticks_unrepaired == {"trade": 3}


# -- real HTTP errors from the simulator's REST, met by the real client ------------------------------------------
REST_PATH = {"trade": "/api/v3/historicalTrades", "agg_trade": "/api/v3/aggTrades"}


@asynccontextmanager
async def venue_with_history(channel: str, n: int = 12) -> AsyncIterator[tuple[Simulator, list[Tick]]]:
    """A simulator whose REST history holds at least ``n`` ids of ``channel``, and its first ``n`` as ticks."""
    async with Simulator(SimulatorConfig(symbols=(SYMBOL,), rate=2000.0, seed=11)) as sim:
        kind = "trade" if channel == "trade" else "aggTrade"
        await until(lambda: sim.stats().ticks_generated[kind] >= n, f"{n} ids of {channel} at the venue")
        rest = VenueRest(sim.rest_url)
        try:
            rows = await rest.fetch(channel, SYMBOL, 0, n)
        finally:
            await rest.aclose()
        convert = trades_to_ticks if channel == "trade" else agg_trades_to_ticks
        ticks = convert(rows, VENUE, SYMBOL, 1)
        assert len(ticks) == n and seqs(ticks) == list(range(ticks[0]["seq"], ticks[0]["seq"] + n))
        yield sim, ticks


def requests_to(sim: Simulator, path: str) -> int:
    """REST requests the simulator has answered (or refused) on ``path`` so far."""
    return sim.rest_faults.requests.get(path, 0)


def gap_between(h: Harness, ticks: list[Tick], before: int, after: int) -> None:
    """Feed ``ticks[before]`` then ``ticks[after]``: the ids between them are a gap whose repair starts."""
    h.feed(ticks[before])
    h.feed(ticks[after])
    assert h.verdicts[-1] is Verdict.GAP
    h.drain()


async def test_non_retryable_rest_error_ends_with_a_marker() -> None:
    async with venue_with_history("trade") as (sim, ticks):
        sim.set_rest_faults(REST_PATH["trade"], parse_rest_schedule("400"))
        asked = requests_to(sim, REST_PATH["trade"])
        h = Harness(VenueRest(sim.rest_url))  # type: ignore[arg-type]
        gap_between(h, ticks, 3, 9)
        async with running(h.repairer) as task, h:
            await until(lambda: ident() not in h.repairer.holds, "the hold to be released")
            assert not task.done()
        out = h.drain()
        assert describe(out) == [(ticks[4]["seq"], ticks[8]["seq"]), ticks[9]["seq"]]
        assert "HTTP 400" in out[0]["reason"]  # type: ignore[typeddict-item]
        assert requests_to(sim, REST_PATH["trade"]) == asked + 1  # not retried
    assert h.repairer.gaps_unrepaired == 1
    assert h.repairer.gaps_repaired == 0
    assert h.repairer.ticks_unrepaired == {"trade": 5}
    # the hole was reported: a late copy is a duplicate now
    h.feed(ticks[6])
    assert h.verdicts[-1] is Verdict.DUPLICATE


@pytest.mark.parametrize("channel", ["trade", "agg_trade"])
async def test_retryable_rest_errors_are_retried_until_the_venue_answers(channel: str) -> None:
    """418, 429, 5xx and a dropped connection, each retried; then the venue's own rows fill the gap."""
    async with venue_with_history(channel) as (sim, ticks):
        path = REST_PATH[channel]
        sim.set_rest_faults(path, parse_rest_schedule("418,429:0,500,503:0,close"))
        asked = requests_to(sim, path)
        h = Harness(VenueRest(sim.rest_url))  # type: ignore[arg-type]
        gap_between(h, ticks, 3, 9)
        async with running(h.repairer), h:
            await until(lambda: ident(channel) not in h.repairer.holds, "the hold to be released", timeout=30)
        assert (requests_to(sim, path) - asked, sim.rest_faults.injected[path]) == (6, 5)
    out = h.drain()
    assert describe(out) == seqs(ticks[4:10])
    assert [without_recv(t) for t in out[:5]] == [without_recv(t) for t in ticks[4:9]]
    assert h.repairer.gaps_repaired == 1 and h.repairer.ticks_repaired == {channel: 5}


async def test_retry_after_is_honoured() -> None:
    """The venue says: come back in an hour, past the end of the repair.  The repairer does not ask again:
    it ends the repair with a marker at once rather than holding the stream for nothing; without
    Retry-After the same 429 is retried."""
    async with venue_with_history("agg_trade") as (sim, ticks):
        path = REST_PATH["agg_trade"]
        sim.set_rest_faults(path, parse_rest_schedule("429:3600"))
        asked = requests_to(sim, path)
        h = Harness(VenueRest(sim.rest_url), RepairSettings(deadline_s=2.0))  # type: ignore[arg-type]
        gap_between(h, ticks, 0, 4)
        async with running(h.repairer), h:
            await until(lambda: ident("agg_trade") not in h.repairer.holds, "the marker", timeout=30)
        assert requests_to(sim, path) == asked + 1
        out = h.drain()
        assert describe(out) == [(ticks[1]["seq"], ticks[3]["seq"]), ticks[4]["seq"]]
        assert "asks to wait 3600 s" in out[0]["reason"]  # type: ignore[typeddict-item]
        assert h.repairer.stats().refused == {"http_status": 1}
        assert h.repairer.stats().hold_expired == 0

        sim.set_rest_faults(path, parse_rest_schedule("429"))
        asked = requests_to(sim, path)
        h = Harness(VenueRest(sim.rest_url), RepairSettings(deadline_s=30.0))  # type: ignore[arg-type]
        gap_between(h, ticks, 5, 9)
        async with running(h.repairer), h:
            await until(lambda: ident("agg_trade") not in h.repairer.holds, "the hold to be released", timeout=30)
        assert requests_to(sim, path) == asked + 2
        assert describe(h.drain()) == seqs(ticks[6:10])


async def test_paged_fetch() -> None:
    rest = FakeRest(rest_rows("trade", range(1, 100)))
    h = Harness(rest, RepairSettings(page=3))
    h.feed(live_tick("trade", 1))
    h.feed(live_tick("trade", 12))  # 2..11 missing: four pages of three
    h.drain()
    async with running(h.repairer):
        await until(lambda: ident() not in h.repairer.holds, "the hold to be released")
    assert describe(h.drain()) == list(range(2, 13))
    assert [(c[2], c[3]) for c in rest.calls] == [(2, 3), (5, 3), (8, 3), (11, 3)]


async def test_repair_past_its_deadline_ends_with_a_marker() -> None:
    rest = FakeRest(rest_rows("trade", range(1, 30)))
    rest.gate.clear()  # the venue never answers
    h = Harness(rest, RepairSettings(deadline_s=0.05))
    h.feed(live_tick("trade", 4))
    h.feed(live_tick("trade", 10))
    h.drain()
    async with running(h.repairer):
        await until(lambda: ident() not in h.repairer.holds, "the hold to be released")
    assert describe(h.drain()) == [(5, 9), 10]
    assert h.repairer.gaps_unrepaired == 1


async def test_consecutive_gaps_on_two_streams_are_repaired_one_after_the_other() -> None:
    rest = FakeRest()
    trade_rows = rest_rows("trade", range(1, 30))
    agg_rows = rest_rows("agg_trade", range(1, 30))

    async def fetch(channel: str, symbol: str, from_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        rest.calls.append((channel, symbol, from_id, limit))
        rows = trade_rows if channel == "trade" else agg_rows
        return [r for i, r in sorted(rows.items()) if i >= from_id][:limit]

    rest.fetch = fetch  # type: ignore[method-assign]
    h = Harness(rest)
    for channel in ("trade", "agg_trade"):
        h.feed(live_tick(channel, 1))
        h.feed(live_tick(channel, 4))
    h.drain()
    async with running(h.repairer):
        await until(lambda: not h.repairer.holds, "both holds to be released")
    out = h.drain()
    assert [(t["channel"], t["seq"]) for t in out] == [
        ("trade", 2), ("trade", 3), ("trade", 4), ("agg_trade", 2), ("agg_trade", 3), ("agg_trade", 4),
    ]
    assert h.repairer.gaps_repaired == 2


def test_gap_larger_than_max_gap_is_marked_at_once() -> None:
    rest = FakeRest(rest_rows("trade", range(1, 30)))
    h = Harness(rest, RepairSettings(max_gap=3))
    h.feed(live_tick("trade", 4))
    h.feed(live_tick("trade", 10))  # 5 ids missing > 3
    assert h.repairer.holds == {}
    out = h.drain()
    assert describe(out) == [4, (5, 9), 10]
    marker = out[1]
    assert marker["seq"] == 9
    assert marker["ts_event"] == out[2]["ts_event"]
    assert "max_gap" in marker["reason"]  # type: ignore[typeddict-item]
    assert h.repairer.gaps_unrepaired == 1
    assert h.repairer.ticks_unrepaired == {"trade": 5}
    assert rest.calls == []


def test_start_returns_marker_for_too_large_gap() -> None:
    h = Harness(FakeRest(), RepairSettings(max_gap=3))
    t = live_tick("trade", 10)
    marker = h.repairer.start(t, GapReport(VENUE, SYMBOL, "trade", 5, 9))
    assert marker is not None
    assert is_gap_marker(marker)
    assert (marker["gap_first"], marker["gap_last"], marker["seq"]) == (5, 9, 9)  # type: ignore[typeddict-item]
    assert (marker["ts_event"], marker["ts_recv"]) == (t["ts_event"], t["ts_recv"])
    # exactly max_gap ids is still repaired
    assert h.repairer.start(t, GapReport(VENUE, SYMBOL, "trade", 7, 9)) is None
    assert h.repairer.holds == {ident(): [t]}


@pytest.mark.parametrize("channel", ["book_ticker", "kline_1m", "kline_1h"])
def test_book_ticker_and_kline_gaps_are_not_repairable(channel: str) -> None:
    rest = FakeRest()
    h = Harness(rest)
    t: Any = {**tick(100, channel=channel)}
    marker = h.repairer.start(t, GapReport(VENUE, SYMBOL, channel, 90, 99))
    assert marker is not None
    assert is_gap_marker(marker)
    assert marker["channel"] == channel
    assert (marker["gap_first"], marker["gap_last"]) == (90, 99)  # type: ignore[typeddict-item]
    assert "not repairable" in marker["reason"]  # type: ignore[typeddict-item]
    assert h.repairer.holds == {}
    assert h.repairer.ticks_unrepaired == {channel: 10}
    assert rest.calls == []


def test_book_ticker_jumps_never_start_a_repair() -> None:
    h = Harness(FakeRest())
    for u in (100, 105, 300):
        book: Any = {
            "v": 1, "venue": VENUE, "symbol": SYMBOL, "channel": "book_ticker", "seq": u, "ts_event": u,
            "ts_recv": u, "bid_px": "1", "bid_qty": "1", "ask_px": "2", "ask_qty": "1", "update_id": u,
        }
        h.feed(book)
    assert h.verdicts == [Verdict.OK] * 3
    assert seqs(h.drain()) == [100, 105, 300]
    assert h.repairer.holds == {}


@pytest.mark.parametrize("settings_", [RepairSettings(enabled=False), None], ids=["disabled", "no-rest"])
def test_repair_disabled_or_without_rest_marks_at_once(settings_: RepairSettings | None) -> None:
    h = Harness(FakeRest() if settings_ is not None else None, settings_)
    h.feed(live_tick("trade", 4))
    h.feed(live_tick("trade", 10))
    out = h.drain()
    assert describe(out) == [4, (5, 9), 10]
    assert "disabled" in out[1]["reason"]  # type: ignore[typeddict-item]
    assert h.repairer.holds == {}


async def test_malformed_rest_rows_end_with_a_marker_and_the_repairer_survives() -> None:
    """A venue answering rows without the documented fields must not kill the repair task,
    which would leave the stream held (silent) forever."""
    rest = FakeRest()
    rest.override = lambda from_id: [{"id": from_id}]  # no price, qty, time
    h = Harness(rest)
    h.feed(live_tick("trade", 4))
    h.feed(live_tick("trade", 10))
    h.drain()
    async with running(h.repairer) as task:
        await until(lambda: ident() not in h.repairer.holds or task.done(), "the hold to be released")
        assert not task.done(), f"the repair task ended: {task.exception()!r}"
        assert ident() not in h.repairer.holds
    assert describe(h.drain()) == [(5, 9), 10]


async def test_ticks_held_while_releasing_follow_in_order() -> None:
    """Under ``block`` a full ingress makes the release wait; ticks that arrive meanwhile are held
    and published after it, in order, and nothing overtakes."""
    rest = FakeRest(rest_rows("trade", range(1, 5)))
    h = Harness(rest, capacity=1, policy=Policy.BLOCK)
    h.feed(live_tick("trade", 1))  # the ingress is now full
    h.feed(live_tick("trade", 5))  # 2..4 missing: held
    async with running(h.repairer):
        await until(lambda: h.ingress.backpressure_events == 1, "the release to wait for room")
        h.feed(live_tick("trade", 6))
        h.feed(live_tick("trade", 7))
        assert h.verdicts[-2:] == [Verdict.OK, Verdict.OK]
        out: list[Tick] = []
        async with asyncio.timeout(WAIT):
            while ident() in h.repairer.holds or len(h.ingress):
                out.extend(await h.ingress.get_batch(100))
        h.feed(live_tick("trade", 8))
        out.extend(h.drain())
    assert describe(out) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert h.repairer.gaps_repaired == 1


async def test_hole_among_ticks_held_while_releasing_is_marked() -> None:
    """Under ``block`` a full ingress makes the release wait; ticks held meanwhile, with a hole in
    them, must still get a marker for the hole (never silence)."""
    rest = FakeRest(rest_rows("trade", range(1, 5)))
    h = Harness(rest, capacity=1, policy=Policy.BLOCK)
    h.feed(live_tick("trade", 1))  # the ingress is now full
    h.feed(live_tick("trade", 5))  # 2..4 missing: held
    async with running(h.repairer):
        await until(lambda: h.ingress.backpressure_events == 1, "the release to wait for room")
        h.feed(live_tick("trade", 6))
        h.feed(live_tick("trade", 8))  # 7 missing
        assert h.verdicts[-1] is Verdict.GAP
        out: list[Tick] = []
        async with asyncio.timeout(WAIT):
            while ident() in h.repairer.holds or len(h.ingress):
                out.extend(await h.ingress.get_batch(100))
    assert describe(out) == [1, 2, 3, 4, 5, 6, (7, 7), 8]


async def test_full_hold_ends_the_repair_without_waiting_for_the_fetch() -> None:
    """Past ``max_hold`` held ticks the repair stops and marks what is left, so memory stays
    bounded even while a REST request hangs."""
    rest = FakeRest(rest_rows("trade", range(1, 30)))
    rest.gate.clear()  # the request hangs, and no clock would end it within the test
    h = Harness(rest, RepairSettings(max_hold=3, hold_s=600.0, deadline_s=600.0))
    h.feed(live_tick("trade", 4))
    h.feed(live_tick("trade", 10))
    h.drain()
    async with running(h.repairer):
        await until(lambda: len(rest.calls) == 1, "the first REST fetch")
        for i in range(11, 16):
            h.feed(live_tick("trade", i))
        await until(lambda: ident() not in h.repairer.holds, "the full hold to be released")
    out = h.drain()
    assert describe(out) == [(5, 9), *range(10, 16)]
    assert "too many ticks held" in out[0]["reason"]  # type: ignore[typeddict-item]
    assert h.repairer.stats().held_overflow >= 1 and h.repairer.stats().hold_expired == 0


async def test_the_hold_is_timed_from_when_the_gap_was_seen() -> None:
    """A repair queued behind others gets what is left of its own hold, not a fresh one: a hold that began
    ``hold_s`` ago is released at once, though the request would hang for ever and the deadline is far."""
    rest = FakeRest(rest_rows("trade", range(1, 30)))
    rest.gate.clear()
    h = Harness(rest, RepairSettings(hold_s=600.0, deadline_s=600.0))
    h.feed(live_tick("trade", 4))
    h.feed(live_tick("trade", 10))
    h.drain()
    h.repairer._held_since[ident()] -= 600.0  # as if the gap had been seen ten minutes ago
    async with running(h.repairer):
        await until(lambda: ident() not in h.repairer.holds, "the hold to be released")
    out = h.drain()
    assert describe(out) == [(5, 9), 10]
    assert "held the stream for its 600 s" in out[0]["reason"]  # type: ignore[typeddict-item]
    assert h.repairer.stats().hold_expired == 1


@pytest.mark.parametrize(
    ("rows", "kind"),
    [
        (lambda from_id: [trade_row(trade_values(from_id - 1))], "bad_row"),  # an id before the one asked
        (lambda from_id: [{**trade_row(trade_values(from_id)), "price": 60000.5}], "bad_row"),  # not a decimal
        (lambda from_id: [{"id": from_id}], "bad_row"),  # fields missing
        (lambda from_id: [trade_row(trade_values(i)) | {"price": "1.00"} for i in range(from_id, 11)], "wrong_symbol"),
        (lambda from_id: {"code": -1121, "msg": "Invalid symbol."}, "bad_json"),
    ],
    ids=["id-out-of-range", "float-price", "missing-fields", "other-symbol", "not-a-list"],
)
async def test_invalid_rows_are_refused_counted_and_nothing_of_them_stored(
    rows: Callable[[int], Any], kind: str
) -> None:
    rest = FakeRest()
    rest.override = rows
    h = Harness(rest)
    h.feed(live_tick("trade", 4))
    h.feed(live_tick("trade", 10))
    async with running(h.repairer):
        await until(lambda: ident() not in h.repairer.holds, "the hold to be released")
    assert describe(h.drain()) == [4, (5, 9), 10]
    stats = h.repairer.stats()
    assert stats.refused == {kind: 1}
    assert stats.ticks_repaired.get("trade", 0) == 0 and stats.ticks_unrepaired == {"trade": 5}


def test_repair_settings_are_read_from_the_config_file(tmp_path: Any) -> None:
    path = tmp_path / "market.toml"
    path.write_text(
        "[repair]\nhold_s = 2.5\nrest_timeout_s = 0.75\nmax_body_mb = 0.5\nbreaker_failures = 5\n"
        "breaker_cooldown_s = 12\n"
    )
    s = load_settings({}, {}, str(path)).repair
    assert (s.hold_s, s.rest_timeout_s, s.max_body_mb, s.breaker_failures, s.breaker_cooldown_s) == (
        2.5, 0.75, 0.5, 5, 12.0
    )
    rest = s.client("http://127.0.0.1:1/")
    assert (rest.base_url, rest.timeout, rest.connect_timeout, rest.max_body) == (
        "http://127.0.0.1:1", 0.75, 0.75, 2**19
    )
    defaults = load_settings({}, {}).repair
    assert (defaults.hold_s, defaults.rest_timeout_s, defaults.max_body_mb) == (5.0, 2.0, 4.0)
    path.write_text("[repair]\nhold_s = 0\n")
    with pytest.raises(ConfigError, match=r"^repair.hold_s: 0.0 is out of range"):
        load_settings({}, {}, str(path))


# -- an ingestor restarted: what it missed comes over REST ------------------------------------------------------
async def test_aggregate_trades_missed_while_the_ingestor_was_down_are_backfilled(
    aredis: Any, prefix: str, tmp_path: Any
) -> None:
    """The ingestor stops; the venue goes on; a new ingestor on the same prefix continues after the newest
    aggregate trade Redis holds and fetches the ones it missed from the venue's REST API, so the stream
    holds every id once, in order, with no gap marker."""
    key = f"{prefix}:binance:{SYMBOL}:agg_trade"
    path = REST_PATH["agg_trade"]
    async with Simulator(SimulatorConfig(symbols=(SYMBOL,), rate=1000.0, seed=5)) as sim:
        settings = load_settings({"url": sim.ws_url, "symbols": SYMBOL, "channels": "agg_trade", "prefix": prefix,
                                  "spill_dir": str(tmp_path / "spill")}, {})

        async def stored() -> int:
            return int(await aredis.xlen(key))

        async def run_until(ingestor: Ingestor, n: int) -> None:
            task = asyncio.create_task(ingestor.run())
            try:
                async with asyncio.timeout(30):
                    while await stored() < n and not task.done():
                        await asyncio.sleep(0.02)  # poll
                assert not task.done(), task
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        await run_until(Ingestor(settings, redis=aredis), 50)
        held = await stored()
        generated = sim.stats().ticks_generated["aggTrade"]
        await until(lambda: sim.stats().ticks_generated["aggTrade"] >= generated + 200,
                    "200 aggregate trades made while no ingestor runs", timeout=30)
        asked = requests_to(sim, path)
        second = Ingestor(settings, redis=aredis)
        await run_until(second, held + 400)
        assert requests_to(sim, path) > asked
        assert second.repairer is not None and second.repairer.ticks_repaired.get("agg_trade", 0) >= 200
    ticks = [decode_tick(fields[b"d"]) for _, fields in await aredis.xrange(key)]
    assert not [t for t in ticks if is_gap_marker(t)]
    ids = seqs(ticks)
    assert ids == list(range(ids[0], ids[0] + len(ids)))
