"""The simulator's synthetic L2 book (ops.simulator.book) and the replay of recorded depth snapshots
(ops.simulator.book_replay).

The book is checked the way a client uses it: an independent reference book (plain dicts, decimals read
with :class:`decimal.Decimal`) is loaded from a REST snapshot taken at a random moment, fed the diffs with
``u > lastUpdateId``, and compared with the simulator's own book after every batch.
"""

from __future__ import annotations

import functools
import itertools
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ops.simulator.book import (
    FUTURES_DEPTH_LIMITS,
    MAX_DEPTH,
    SPOT_DEPTH_LIMITS,
    BookConfig,
    DepthBooks,
    DepthQuery,
    SymbolBook,
    depth_stream,
    parse_depth_query,
    parse_units,
)
from ops.simulator.book_bench import bench_books
from ops.simulator.book_replay import DepthReplay, RecordedDepth, capture_start, load_depth_capture
from ops.simulator.errors import CaptureError, SimulatorConfigError
from ops.simulator.market import SymbolSpec, SyntheticMarket, format_decimal
from ops.simulator.protocol import StreamCatalog
from ops.simulator.rest import RestResponse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SPOT_DEPTH = FIXTURES / "binance-spot-2021-10-12.depth.jsonl"
COINM_DEPTH = FIXTURES / "binance-coinm-2021-07-22.depth.jsonl"
SPOT_FRAMES = FIXTURES / "binance-spot-2021-10-12.jsonl"
COINM_FRAMES = FIXTURES / "binance-coinm-2021-07-22.jsonl"

SYMBOLS = ("BTCUSDT", "XRPUSDT", "ETHBTC", "DOGEUSDT")
T0 = 1_700_000_000_000
ZERO = Decimal(0)


def units(text: str) -> int:
    """A decimal string in 1e-8 units, read independently of the code under test."""
    value = Decimal(text) * 100_000_000
    assert value == value.to_integral_value(), text
    return int(value)


class Reference:
    """A client's book: loaded from a snapshot, then fed diffs by Binance's rules (drop ``u <= lastUpdateId``;
    the first applied diff spans ``lastUpdateId + 1``; then each starts at the previous ``u + 1``, or for
    futures carries ``pu`` = the previous ``u``).  Keys are ticks, values 1e-8 units."""

    def __init__(self, snapshot: dict[str, Any], tick: int, *, futures: bool = False) -> None:
        self.tick = tick
        self.futures = futures
        self.last = snapshot["lastUpdateId"]
        self.prev_u: int | None = None
        self.bids = self._side(snapshot["bids"])
        self.asks = self._side(snapshot["asks"])

    def _side(self, levels: list[list[str]]) -> dict[int, int]:
        out: dict[int, int] = {}
        for price, qty in levels:
            key, rest = divmod(units(price), self.tick)
            assert rest == 0 and units(qty) > 0
            out[key] = units(qty)
        return out

    def apply(self, diff: dict[str, Any]) -> None:
        if diff["u"] <= self.last:
            return
        if self.prev_u is None:
            assert diff["U"] <= self.last + 1 <= diff["u"]
        elif self.futures:
            assert diff["pu"] == self.prev_u
        else:
            assert diff["U"] == self.prev_u + 1
        for side, levels in ((self.bids, diff["b"]), (self.asks, diff["a"])):
            for price, qty in levels:
                key, rest = divmod(units(price), self.tick)
                assert rest == 0
                if Decimal(qty) == ZERO:
                    side.pop(key, None)
                else:
                    side[key] = units(qty)
        self.prev_u = diff["u"]


def check_book(book: SymbolBook) -> None:
    """Never crossed, no empty level, the touch where it was set, and no more than ``depth`` levels a side
    within ``depth`` ticks of the touch."""
    depth = book.config.depth
    bids, asks = book.bids, book.asks
    assert max(bids) == book.best_bid < book.best_ask == min(asks)
    assert all(q > 0 for q in bids.values()) and all(q > 0 for q in asks.values())
    assert len(bids) <= depth and len(asks) <= depth
    assert min(bids) >= max(1, book.best_bid - depth + 1)
    assert max(asks) <= book.best_ask + depth - 1


def snapshot(books: DepthBooks, symbol: str, limit: int = MAX_DEPTH) -> dict[str, Any]:
    answer = books.answer({"symbol": [symbol], "limit": [str(limit)]})
    assert answer.status == 200
    result: dict[str, Any] = orjson.loads(answer.body)
    return result


# ---------------------------------------------------------------------------------------------- the long run


@pytest.mark.parametrize("futures", [False, True], ids=["spot", "futures"])
def test_reference_books_fed_snapshots_and_diffs_equal_the_simulators_after_every_batch(futures: bool) -> None:
    market = SyntheticMarket(SYMBOLS, seed=7, history=1000)
    books = DepthBooks.for_market(market, seed=7, config=BookConfig(depth=300, futures=futures))
    rng = random.Random(11)
    ticks = {s: market.spec(s).tick_size for s in SYMBOLS}
    clients: dict[str, Reference | None] = dict.fromkeys(SYMBOLS)
    last_u = dict.fromkeys(SYMBOLS, 0)
    ticker: dict[str, dict[str, Any]] = {}
    boundaries = diffs = snapshots = compared = 0
    now = T0
    books.advance(now)
    while boundaries < 3000:
        now += 25
        events = market.step(rng.randrange(12), now)
        for kind, _, payload in events:
            if kind == "bookTicker":
                ticker[payload["s"]] = payload
        books.observe(events)
        if rng.random() < 0.03:  # a client (re)loads at a random moment, often within a batch
            symbol = rng.choice(SYMBOLS)
            loaded = snapshot(books, symbol)
            assert loaded["lastUpdateId"] == books.book(symbol).last_id  # the last change applied, even mid-batch
            clients[symbol] = Reference(loaded, ticks[symbol], futures=futures)
            snapshots += 1
        out = books.advance(now)
        for kind, stream, diff in out:
            symbol = diff["s"]
            assert (kind, stream, diff["e"]) == ("depthUpdate", depth_stream(symbol, 100), "depthUpdate")
            assert diff["E"] <= now and diff["U"] <= diff["u"]
            if last_u[symbol]:
                assert diff["U"] == last_u[symbol] + 1
                assert ("pu" in diff) == futures and diff.get("pu", last_u[symbol]) == last_u[symbol]
            last_u[symbol] = diff["u"]
            client = clients[symbol]
            if client is not None:
                client.apply(diff)
            diffs += 1
        if now % 100 == 0:
            boundaries += 1
            for symbol in SYMBOLS:
                book = books.book(symbol)
                check_book(book)
                tick = ticks[symbol]
                if symbol in ticker:  # the book's touch is the market's last bookTicker
                    t = ticker[symbol]
                    assert format_decimal(book.best_bid * tick) == t["b"]
                    assert format_decimal(book.best_ask * tick) == t["a"]
                    assert (format_decimal(book.bids[book.best_bid]), format_decimal(book.asks[book.best_ask])) == (
                        t["B"], t["A"])
                client = clients[symbol]
                if client is not None:
                    assert client.bids == book.bids
                    assert client.asks == book.asks
                    compared += 1
    assert diffs > 10_000
    assert snapshots > 200
    assert compared > 10_000
    assert all(b["dropped"] == 0 and b["sent"] > 2500 for b in books.state().values())


ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("touch"), st.integers(-40, 40), st.integers(1, 4), st.booleans()),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(False)),
        st.tuples(st.just("snapshot"), st.just(0), st.just(0), st.just(False)),
        st.tuples(st.just("stale"), st.integers(1, 8), st.just(0), st.just(False)),
    ),
    max_size=60,
)


@given(
    ops=ops_strategy,
    depth=st.integers(1, 25),
    history=st.integers(1, 5),
    start=st.integers(1, 60),
    seed=st.integers(0, 10**6),
    futures=st.booleans(),
)
def test_any_sequence_of_touches_keeps_the_book_sound_and_its_diffs_and_stale_snapshots_exact(
    ops: list[tuple[str, int, int, bool]], depth: int, history: int, start: int, seed: int, futures: bool
) -> None:
    """Touch jumps of any size (past the whole side, down to the first tick), several touches within a batch,
    windows as narrow as one level; a stale snapshot is exactly the book at the end of an earlier batch."""
    spec = SymbolSpec("TESTUSDT", "TEST", "USDT", tick_size=10_000, step_size=1_000_000, start_price=start * 10_000)
    config = BookConfig(depth=depth, changes_per_batch=6, history=history, futures=futures)
    book = SymbolBook(spec, seed=seed, config=config)
    check_book(book)
    first = book.snapshot(MAX_DEPTH)
    client = Reference(first, 10_000, futures=futures)
    states = {first["lastUpdateId"]: first}  # the book at the end of each batch, by its last update id
    batches: list[int] = []  # the first update id of each batch that changed something
    time_ms = 0
    for op, arg, spread, sized in ops:
        if op == "touch":
            bid = max(1, book.best_bid + arg)
            qty = (7_000_000, 3_000_000) if sized else (None, None)
            book.set_touch(bid, bid + spread, *qty)
            if sized:
                assert (book.bids[bid], book.asks[bid + spread]) == qty
        elif op == "flush":
            time_ms += 100
            before = book.last_id
            diff = book.flush(time_ms)
            if diff is not None:
                client.apply(diff)
                batches.append(diff["U"])
            else:
                assert book.last_id == before
            assert client.bids == book.bids and client.asks == book.asks
            state = book.snapshot(MAX_DEPTH)
            states[state["lastUpdateId"]] = state
        elif op == "snapshot":
            client = Reference(book.snapshot(MAX_DEPTH), 10_000, futures=futures)
        else:
            book.stale_next_snapshot(arg)
            stale = book.snapshot(MAX_DEPTH)
            back = min(arg, history, len(batches))
            expected = batches[-back] - 1 if back else first["lastUpdateId"]
            assert stale["lastUpdateId"] == expected
            assert stale == states[expected]
        check_book(book)


def test_a_crossed_or_non_positive_touch_is_refused() -> None:
    book = SymbolBook(SymbolSpec.for_symbol("BTCUSDT"))
    for bid, ask in ((10, 10), (11, 10), (0, 5)):
        with pytest.raises(ValueError, match="bid < ask"):
            book.set_touch(bid, ask)


# ---------------------------------------------------------------------------------------------- determinism


def _run(seed: int, boundaries: int = 200) -> list[Any]:
    market = SyntheticMarket(SYMBOLS, seed=seed, history=1000)
    books = DepthBooks.for_market(market, seed=seed)
    out: list[Any] = [snapshot(books, s, 20) for s in SYMBOLS]
    books.advance(T0)
    for i in range(1, boundaries * 4 + 1):
        now = T0 + i * 25
        events = market.step(30, now)
        books.observe(events)
        out.extend(books.advance(now))
    out.extend(snapshot(books, s) for s in SYMBOLS)
    return out


def test_the_same_seed_gives_the_same_diffs_and_snapshots_and_another_does_not() -> None:
    first = _run(3)
    assert len(first) > 700
    assert _run(3) == first
    assert _run(4) != first


# ---------------------------------------------------------------------------------------------- faults


def _stream(books: DepthBooks, market: SyntheticMarket, start: int, count: int) -> list[dict[str, Any]]:
    """The diffs of ``count`` batches from boundary ``start`` on (one market step a batch)."""
    out = []
    for i in range(start, start + count):
        now = T0 + i * 100
        books.observe(market.step(20, now))
        out.extend(d for _, _, d in books.advance(now))
    return out


@pytest.mark.parametrize("futures", [False, True], ids=["spot", "futures"])
def test_dropping_one_diff_breaks_the_sequence_exactly_once(futures: bool) -> None:
    market = SyntheticMarket(("BTCUSDT", "ETHUSDT"), seed=5, history=1000)
    books = DepthBooks.for_market(market, seed=5, config=BookConfig(futures=futures))
    books.advance(T0)
    before = _stream(books, market, 1, 50)
    client = Reference(snapshot(books, "BTCUSDT"), market.spec("BTCUSDT").tick_size, futures=futures)
    books.drop_next_diff("BTCUSDT")
    after = _stream(books, market, 51, 50)
    for symbol, breaks_expected in (("BTCUSDT", 1), ("ETHUSDT", 0)):
        diffs = [d for d in before + after if d["s"] == symbol]
        breaks = [(a, b) for a, b in itertools.pairwise(diffs) if b["U"] != a["u"] + 1]
        assert len(breaks) == breaks_expected
        if futures:
            assert sum(b["pu"] != a["u"] for a, b in itertools.pairwise(diffs)) == breaks_expected
        if breaks:
            (a, b), = breaks
            assert b["U"] > a["u"] + 1  # the dropped batch's ids are skipped, not reused
            if futures:
                assert b["pu"] == b["U"] - 1
        assert books.book(symbol).dropped == breaks_expected
    with pytest.raises(AssertionError):  # a client in sync sees the gap
        for diff in (d for d in after if d["s"] == "BTCUSDT"):
            client.apply(diff)
    # a fresh snapshot brings a client back in line with the book
    resynced = Reference(snapshot(books, "BTCUSDT"), market.spec("BTCUSDT").tick_size, futures=futures)
    for diff in (d for d in _stream(books, market, 101, 20) if d["s"] == "BTCUSDT"):
        resynced.apply(diff)
    assert resynced.bids == books.book("BTCUSDT").bids and resynced.asks == books.book("BTCUSDT").asks


def test_a_stale_snapshot_is_an_earlier_state_with_an_older_last_update_id() -> None:
    market = SyntheticMarket(("BTCUSDT",), seed=9, history=1000)
    books = DepthBooks.for_market(market, seed=9, config=BookConfig(history=10))
    books.advance(T0)
    _stream(books, market, 1, 30)
    book = books.book("BTCUSDT")
    tick = book.tick_size
    books.observe(market.step(20, T0 + 3050))  # a touch change within the batch
    fresh = snapshot(books, "BTCUSDT")
    books.stale_next_snapshot("BTCUSDT", batches_back=3)
    stale = snapshot(books, "BTCUSDT")
    recent = book.recent()
    assert stale["lastUpdateId"] == recent[-3]["U"] - 1 < fresh["lastUpdateId"]
    assert book.stale_served == 1
    assert snapshot(books, "BTCUSDT") == fresh  # the fault acts once
    # it is a real earlier state: it plus the diffs after it is the book
    client = Reference(stale, tick)
    for diff in book.recent(stale["lastUpdateId"]):
        client.apply(diff)
    live = _stream(books, market, 31, 1)
    for diff in live:
        client.apply(diff)
    assert client.bids == book.bids and client.asks == book.asks
    # a client that subscribed now and fetched the stale snapshot finds it older than its stream
    books.stale_next_snapshot("BTCUSDT", batches_back=2)
    older = snapshot(books, "BTCUSDT")
    assert _stream(books, market, 32, 1)[0]["U"] > older["lastUpdateId"] + 1
    # as far back as the ring reaches, and no further
    books.stale_next_snapshot("BTCUSDT", batches_back=1000)
    oldest = snapshot(books, "BTCUSDT")
    assert len(book.recent()) == 10
    assert oldest["lastUpdateId"] == book.recent()[0]["U"] - 1
    with pytest.raises(ValueError, match="at least 1"):
        book.stale_next_snapshot(0)


def test_recent_diffs_are_bounded_and_leave_dropped_ones_out() -> None:
    market = SyntheticMarket(("ETHBTC",), seed=2, history=1000)
    books = DepthBooks.for_market(market, seed=2, config=BookConfig(history=8))
    books.advance(T0)
    sent = _stream(books, market, 1, 5)
    books.drop_next_diff()
    sent += _stream(books, market, 6, 6)
    book = books.book("ETHBTC")
    assert book.dropped == 1 and book.sent == len(sent) == 10
    assert book.recent() == sent[-7:]  # 8 batches held, one of them dropped
    assert book.recent(sent[-2]["u"]) == sent[-1:]


# ---------------------------------------------------------------------------------------------- cadence, names, REST


def test_batches_follow_the_cadence_and_a_clock_jump_flushes_at_most_max_catch_up() -> None:
    market = SyntheticMarket(("BTCUSDT",), seed=1, history=1000)
    books = DepthBooks.for_market(market, config=BookConfig(interval_ms=250, changes_per_batch=5, max_catch_up=4))
    assert books.advance(T0 + 10) == []  # the first call sets the clock
    assert books.advance(T0 + 249) == []
    assert [d["E"] for _, _, d in books.advance(T0 + 520)] == [T0 + 250, T0 + 500]
    times = [d["E"] for _, _, d in books.advance(T0 + 60_000)]
    assert times == [T0 + 59_250, T0 + 59_500, T0 + 59_750, T0 + 60_000]
    assert books.streams() == ("btcusdt@depth@250ms",)


def test_stream_names_are_binances_and_the_venue_accepts_them() -> None:
    assert depth_stream("BTCUSDT", 100) == "btcusdt@depth@100ms"
    assert depth_stream("BTCUSDT", 1000) == "btcusdt@depth"
    catalog = StreamCatalog(["BTCUSDT"])
    assert catalog.problem(depth_stream("BTCUSDT", 100)) is None
    assert catalog.problem(depth_stream("BTCUSDT", 1000)) is None


@pytest.mark.parametrize(
    ("query", "limits", "expected"),
    [
        ({"symbol": ["BTCUSDT"]}, SPOT_DEPTH_LIMITS, DepthQuery("BTCUSDT", 100, 5)),
        ({"symbol": ["BTCUSDT"], "limit": ["5"]}, SPOT_DEPTH_LIMITS, DepthQuery("BTCUSDT", 5, 5)),
        ({"symbol": ["BTCUSDT"], "limit": ["101"]}, SPOT_DEPTH_LIMITS, DepthQuery("BTCUSDT", 101, 25)),
        ({"symbol": ["BTCUSDT"], "limit": ["1000"]}, SPOT_DEPTH_LIMITS, DepthQuery("BTCUSDT", 1000, 50)),
        ({"symbol": ["BTCUSDT"], "limit": ["1001"]}, SPOT_DEPTH_LIMITS, DepthQuery("BTCUSDT", 1001, 250)),
        ({"symbol": ["BTCUSDT"], "limit": ["9000"]}, SPOT_DEPTH_LIMITS, DepthQuery("BTCUSDT", 5000, 250)),
        ({"symbol": ["BTCUSDT"], "limit": ["0"]}, SPOT_DEPTH_LIMITS, DepthQuery("BTCUSDT", 1, 5)),
        ({"symbol": ["BTCUSDT"]}, FUTURES_DEPTH_LIMITS, DepthQuery("BTCUSDT", 500, 10)),
        ({"symbol": ["BTCUSDT"], "limit": ["50"]}, FUTURES_DEPTH_LIMITS, DepthQuery("BTCUSDT", 50, 2)),
        ({"symbol": ["BTCUSDT"], "limit": ["1000"]}, FUTURES_DEPTH_LIMITS, DepthQuery("BTCUSDT", 1000, 20)),
        ({}, SPOT_DEPTH_LIMITS, -1102),
        ({"symbol": [""]}, SPOT_DEPTH_LIMITS, -1102),
        ({"symbol": ["NOPEUSDT"]}, SPOT_DEPTH_LIMITS, -1121),
        ({"symbol": ["BTCUSDT"], "limit": ["-5"]}, SPOT_DEPTH_LIMITS, -1100),
        ({"symbol": ["BTCUSDT"], "limit": ["1e3"]}, SPOT_DEPTH_LIMITS, -1100),
        ({"symbol": ["BTCUSDT"], "limit": ["7"]}, FUTURES_DEPTH_LIMITS, -1130),
        ({"symbol": ["BTCUSDT"], "limit": ["5000"]}, FUTURES_DEPTH_LIMITS, -1130),
    ],
)
def test_depth_requests_get_binances_limits_weights_and_errors(
    query: dict[str, list[str]], limits: Any, expected: DepthQuery | int
) -> None:
    result = parse_depth_query(query, ["BTCUSDT"], limits)
    if isinstance(expected, DepthQuery):
        assert result == expected
    else:
        assert isinstance(result, RestResponse) and result.status == 400
        assert orjson.loads(result.body)["code"] == expected


@functools.cache
def _deep_books() -> DepthBooks:
    """Books deep enough that some limits cut them and some do not (read only by the tests using it)."""
    return DepthBooks.for_market(SyntheticMarket(("XRPUSDT",), history=1000), config=BookConfig(depth=2000, fill=0.9))


@given(limit=st.integers(1, 7000))
def test_a_snapshot_holds_the_best_limit_levels_of_the_book(limit: int) -> None:
    books = _deep_books()
    book = books.book("XRPUSDT")
    assert len(book.bids) > 1000
    answer = snapshot(books, "XRPUSDT", limit)
    served = min(limit, 5000)
    tick = book.tick_size
    bids = sorted(book.bids.items(), reverse=True)[:served]
    asks = sorted(book.asks.items())[:served]
    assert answer["bids"] == [[format_decimal(p * tick), format_decimal(q)] for p, q in bids]
    assert answer["asks"] == [[format_decimal(p * tick), format_decimal(q)] for p, q in asks]
    assert answer["lastUpdateId"] == book.last_id
    assert "E" not in answer


def test_futures_snapshots_carry_their_times_and_unknown_symbols_get_binances_error() -> None:
    market = SyntheticMarket(("BTCUSDT",), seed=1, history=1000)
    books = DepthBooks.for_market(market, config=BookConfig(futures=True), limits=FUTURES_DEPTH_LIMITS)
    books.advance(T0 + 123)
    answer = snapshot(books, "BTCUSDT", 5)
    assert list(answer) == ["lastUpdateId", "E", "T", "bids", "asks"]
    assert answer["E"] == answer["T"] == T0 + 123 and len(answer["bids"]) == 5
    refused = books.answer({"symbol": ["ETHUSDT"]})
    assert refused.status == 400 and orjson.loads(refused.body) == {"code": -1121, "msg": "Invalid symbol."}


@given(value=st.integers(0, 10**20))
def test_parse_units_reads_back_what_format_decimal_writes(value: int) -> None:
    assert parse_units(format_decimal(value)) == value


@given(value=st.integers(0, 10**20))
@example(value=0)
@example(value=99_999_999)
@example(value=100_000_000)
def test_format_decimal_writes_the_whole_part_then_exactly_eight_decimals(value: int) -> None:
    assert format_decimal(value) == f"{value // 100_000_000}.{value % 100_000_000:08d}"


@pytest.mark.parametrize(
    ("units", "text"),
    [(0, "0.00000000"), (1, "0.00000001"), (12_345_678, "0.12345678"), (99_999_999, "0.99999999"),
     (100_000_000, "1.00000000"), (2_712_345_000_000, "27123.45000000")],
)
def test_format_decimal_at_the_edges_of_the_whole_part(units: int, text: str) -> None:
    assert format_decimal(units) == text


@pytest.mark.parametrize("units", [-1, -99_999_999, -100_000_000])
def test_format_decimal_refuses_a_negative_amount(units: int) -> None:
    with pytest.raises(ValueError, match="negative"):
        format_decimal(units)


@pytest.mark.parametrize("text", ["", ".", "1.", ".5", "-1", "+1", "1e5", "1_0", " 1", "1.123456789", "١", "1.2.3"])
def test_parse_units_refuses_what_is_not_a_plain_decimal(text: str) -> None:
    with pytest.raises(ValueError, match="not a decimal"):
        parse_units(text)


def test_parse_units_reads_short_decimals() -> None:
    assert parse_units("427.9") == 42_790_000_000
    assert parse_units("12") == 1_200_000_000


def test_a_bookticker_off_the_tick_size_is_refused() -> None:
    market = SyntheticMarket(("BTCUSDT",), seed=1, history=1000)
    books = DepthBooks.for_market(market)
    books.observe([("bookTicker", "btcusdt@bookTicker", {"s": "BTCUSDT", "b": "27000.00500000", "B": "1.00000000",
                                                          "a": "27000.01000000", "A": "1.00000000"})])
    with pytest.raises(ValueError, match="off the tick size"):
        books.advance(T0)
        books.advance(T0 + 100)


@pytest.mark.parametrize(
    "settings",
    [{"interval_ms": 0}, {"depth": 0}, {"depth": MAX_DEPTH + 1}, {"fill": 0.0}, {"fill": 1.5}, {"history": 0},
     {"changes_per_batch": -1}, {"max_catch_up": 0}, {"futures": 1}, {"depth": True}],
)
def test_a_book_setting_that_cannot_work_is_refused(settings: dict[str, Any]) -> None:
    with pytest.raises(SimulatorConfigError, match="book"):
        BookConfig(**settings)


# ---------------------------------------------------------------------------------------------- recorded snapshots


def _frames_depth(path: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_bytes().splitlines():
        data = orjson.loads(orjson.loads(line)["frame"])["data"]
        if data.get("e") == "depthUpdate":
            out.setdefault(data["s"], []).append(data)
    return out


def test_recorded_spot_snapshots_load_and_bridge_the_recorded_spot_diffs() -> None:
    replay = load_depth_capture(SPOT_DEPTH)
    assert replay.symbols == ("NKNUSDT", "BLZETH", "LRCBTC", "RUNEEUR")
    diffs = _frames_depth(SPOT_FRAMES)
    end = max(r.recv_ts for s in replay.symbols for r in replay.records(s)) + 60
    for symbol in replay.symbols:
        record = replay.pick(symbol, end)
        assert record is not None
        body = orjson.loads(record.body)
        assert body["lastUpdateId"] == record.last_update_id
        assert (len(body["bids"]), len(body["asks"])) == (record.bid_levels, record.ask_levels)
        later = [d for d in diffs[symbol] if d["u"] > record.last_update_id]
        assert later[0]["U"] <= record.last_update_id + 1 <= later[0]["u"]
        assert all(b["U"] == a["u"] + 1 for a, b in itertools.pairwise(later))


def test_recorded_futures_snapshots_load_and_bridge_the_recorded_futures_diffs() -> None:
    replay = load_depth_capture(COINM_DEPTH)
    assert len(replay.symbols) == 10 and "BTCUSD_211231" in replay.symbols
    diffs = _frames_depth(COINM_FRAMES)
    for symbol in replay.symbols:
        record = replay.pick(symbol, capture_start(COINM_FRAMES))  # before it was recorded: the first
        assert record is not None and record is replay.records(symbol)[0]
        later = [d for d in diffs[symbol] if d["u"] >= record.last_update_id]
        assert later[0]["U"] <= record.last_update_id <= later[0]["u"]
        assert all(b["pu"] == a["u"] for a, b in itertools.pairwise(later))


def test_a_recorded_snapshot_is_served_as_recorded_or_cut_to_the_limit() -> None:
    replay = load_depth_capture(COINM_DEPTH)
    raw = COINM_DEPTH.read_bytes().splitlines()[6]  # BTCUSD_211231, 1000 levels a side
    recorded = orjson.loads(orjson.loads(raw)["body"])
    at = orjson.loads(raw)["recv_ts"]
    full = replay.answer({"symbol": ["BTCUSD_211231"], "limit": ["1000"]}, at, FUTURES_DEPTH_LIMITS)
    assert full.status == 200 and full.body == orjson.loads(raw)["body"].encode()
    cut = replay.answer({"symbol": ["BTCUSD_211231"], "limit": ["5"]}, at, FUTURES_DEPTH_LIMITS)
    assert orjson.loads(cut.body) == {**recorded, "bids": recorded["bids"][:5], "asks": recorded["asks"][:5]}
    assert replay.answer({"symbol": ["BTCUSD_211231"], "limit": ["7"]}, at, FUTURES_DEPTH_LIMITS).status == 400
    assert replay.answer({"symbol": ["BTCUSDT"]}, at).status == 400
    assert replay.pick("BTCUSDT", at) is None
    assert capture_start(COINM_DEPTH) == 1626916404.543838


def _recorded(symbol: str, recv_ts: float, last: int) -> RecordedDepth:
    return RecordedDepth(recv_ts, symbol, f"https://x/api/v3/depth?symbol={symbol}", b"{}", last, 0, 0)


@given(times=st.lists(st.integers(0, 1000), min_size=1, max_size=20), at=st.integers(-10, 1010))
def test_pick_serves_the_last_recorded_at_or_before_the_time_else_the_first(times: list[int], at: int) -> None:
    records = [_recorded("AB", float(t), i) for i, t in enumerate(times)]
    picked = DepthReplay(records).pick("AB", float(at))
    assert picked is not None
    earlier = [r for r in records if r.recv_ts <= at]
    if earlier:
        latest = max(r.recv_ts for r in earlier)
        assert picked == [r for r in earlier if r.recv_ts == latest][-1]  # equal times: the later line
    else:
        assert picked.recv_ts == min(times) and picked == next(r for r in records if r.recv_ts == min(times))


GOOD = '{"recv_ts": 1.5, "url": "https://a/api/v3/depth?symbol=ABC&limit=5", "body": "{\\"lastUpdateId\\":7,\\"bids\\":[[\\"1.0\\",\\"2\\"]],\\"asks\\":[]}"}'  # noqa: E501


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"recv_ts": 1, "url": "https://a/?symbol=A"}', "missing body"),
        (GOOD.replace('"recv_ts": 1.5', '"recv_ts": "1.5"'), "recv_ts must be a number"),
        (GOOD.replace('"recv_ts": 1.5', '"recv_ts": true'), "recv_ts must be a number"),
        (GOOD.replace("symbol=ABC&", ""), "names no symbol"),
        (GOOD.replace('"body": "{', '"body": "{{'), "body is not JSON"),
        (GOOD.replace('"body": "{', '"body": 5, "x": "{'), "url and body must be strings"),
        (GOOD.replace('\\"lastUpdateId\\":7', '\\"lastUpdateId\\":\\"7\\"'), "lastUpdateId must be"),
        (GOOD.replace('\\"lastUpdateId\\":7,', ""), "lastUpdateId must be"),
        (GOOD.replace('\\"asks\\":[]', '\\"asks\\":{}'), "asks must be a list"),
        (GOOD.replace('[[\\"1.0\\",\\"2\\"]]', '[[\\"1.0\\",2]]'), "bids[0] must be a [price, quantity]"),
        (GOOD.replace('\\"asks\\":[]', '\\"asks\\":[],\\"symbol\\":\\"XYZ\\"'), "body is for 'XYZ'"),
    ],
)
def test_a_malformed_recording_is_refused_naming_its_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "bad.depth.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(CaptureError) as caught:
        load_depth_capture(path)
    assert f"{path}:3: " in str(caught.value)
    assert problem in str(caught.value)


def test_an_empty_or_missing_recording_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CaptureError, match="holds no snapshots"):
        load_depth_capture(tmp_path / "empty.jsonl")
    with pytest.raises(CaptureError, match="cannot read"):
        load_depth_capture(tmp_path / "missing.jsonl")
    with pytest.raises(CaptureError, match="holds no records"):
        capture_start(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('\n{"recv_ts": null}\n')
    with pytest.raises(CaptureError, match=r"bad.jsonl:2: recv_ts must be"):
        capture_start(tmp_path / "bad.jsonl")
    good = tmp_path / "good.jsonl"
    good.write_text(f"{GOOD}\n")
    assert load_depth_capture(good).pick("ABC", 0.0) is not None


# ---------------------------------------------------------------------------------------------- benchmark


def test_the_benchmark_runs_and_counts_what_it_made() -> None:
    result = bench_books(symbols=5, seconds=2.0, rate=2000)
    assert result["symbols"] == 5 and result["simulated_s"] == 2.0
    assert result["market_events"] == 2 * 2000
    assert 0 < result["diffs"] <= 5 * 20  # 10 batches a simulated second, at most one diff each per symbol
    assert result["levels"] >= result["diffs"]
    assert result["baseline_step_s"] > 0 and result["book_s"] > 0 and result["diffs_per_s"] > 0
