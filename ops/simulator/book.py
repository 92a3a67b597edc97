# size: one symbol's book, its faults and the per-market cadence share the update-id bookkeeping that keeps
#   every diff stream and snapshot consistent; split, the ids would be kept in two places.
"""A synthetic L2 order book per symbol, served as Binance depth streams and REST snapshots: pure code.

:class:`SymbolBook` is one symbol's book in exact integers: prices in whole ticks of the symbol's
``tick_size``, quantities in 1e-8 units (multiples of ``step_size``), both turned into Binance's
decimal strings by :func:`~ops.simulator.market.format_decimal` only when sent.  It is driven by two
calls:

- :meth:`SymbolBook.set_touch` ``(bid, ask[, bid_qty, ask_qty])``: the best bid and ask in ticks, as the
  market's ``bookTicker`` says them (:meth:`SymbolBook.set_ticker` takes the payload itself and reads it
  at the next batch end or snapshot).  Bids above the new bid and asks below the new ask vanish, the
  touch levels are set, and levels that fall out of the book's window are removed;
- :meth:`SymbolBook.flush` ``(time_ms)``: the end of one batch.  A seeded number of random changes
  (levels appear, change size, vanish; more often near the touch) is applied, and every level changed
  since the last batch goes out as one ``depthUpdate`` with its final size (``"0.00000000"``: deleted).

Every single level change takes the next update id, so a batch covers ids ``U`` to ``u`` and the next
batch starts at ``u + 1``; a window with no change sends nothing (as Binance).  With ``futures`` the
batch also carries ``T`` and ``pu`` (the previous batch's ``u``).  Bids always lie within
``[bid - depth + 1, bid]`` and asks within ``[ask, ask + depth - 1]``, so a side never holds more than
``depth`` levels, the book is never crossed (every bid <= bid < ask <= every ask), and no level has size 0.

:meth:`SymbolBook.snapshot` is the REST answer at any moment, ``lastUpdateId`` being the id of the last
change applied (even within a batch): a client that applies to it every diff with ``u > lastUpdateId``
holds this book exactly (diffs carry absolute sizes, so re-applying the part of a batch a snapshot
already holds changes nothing).  With ``limit >= depth`` it is the whole book.

Memory is bounded: ``depth`` levels a side, and a ring of the last ``history`` batches (their payloads
and, per changed level, its size before the batch), from which :meth:`SymbolBook.recent` serves diffs
and an older state can be rebuilt.

Faults, as switches that act once: :meth:`SymbolBook.drop_next_diff` (the next batch changes the book and
takes its ids but is not sent, so the one after it starts past ``previous u + 1``);
:meth:`SymbolBook.stale_next_snapshot` (the next snapshot is the book as it was ``batches_back`` batches
ago, with that older ``lastUpdateId``).

:class:`DepthBooks` holds one book per symbol of a market and the shared cadence: :meth:`DepthBooks.observe`
takes the events of ``SyntheticMarket.step`` (the last ``bookTicker`` of each symbol sets its touch),
:meth:`DepthBooks.advance` ``(now_ms)`` flushes every batch boundary passed, returning
``("depthUpdate", "<symbol>@depth@100ms", payload)`` events in the market's event shape, and
:meth:`DepthBooks.answer` answers ``GET /api/v3/depth`` with Binance's limits, weights and errors.

With ``slow_interval_ms`` (Binance's ``<symbol>@depth``, 1000 ms beside ``@depth@100ms``) the same book also
goes out as one diff per slow interval: every level changed by the batches of that interval, each with its
final size, ids ``U`` (the interval's first change) to ``u`` (its last), so a client of either stream holds the
same book as one of the other at the same ``u``.  A slow diff whose interval holds a dropped batch is dropped
too, so the drop fault shows as a ``U != previous u + 1`` jump on both streams.

Ownership: a book is owned by the one caller that drives it (the simulator's event loop); nothing here
locks or does I/O.  :func:`ops.simulator.book_bench.bench_books` measures the cost against the market's own step.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .errors import SimulatorConfigError
from .market import SCALE, MarketEvent, SymbolSpec, SyntheticMarket, format_decimal
from .rest import RestResponse

__all__ = [
    "DEPTH_EVENT",
    "FUTURES_DEPTH_LIMITS",
    "MAX_DEPTH",
    "SPOT_DEPTH_LIMITS",
    "BookConfig",
    "DepthBooks",
    "DepthLimits",
    "DepthQuery",
    "SymbolBook",
    "depth_stream",
    "parse_depth_query",
    "parse_units",
]

#: the kind of the events :meth:`DepthBooks.advance` returns (``e`` of the payload)
DEPTH_EVENT: Final = "depthUpdate"
#: the deepest book kept: Binance's largest REST snapshot, so ``limit=5000`` always returns a whole book
MAX_DEPTH: Final = 5000
_ZERO: Final = format_decimal(0)
_SIZE_BITS: Final = 12  # random level sizes: 1 .. 4096 steps


@dataclass(frozen=True, slots=True)
class BookConfig:
    """How the books move.

    ``interval_ms``: batch cadence (Binance: 100 or 1000); ``depth``: levels a side at most, and the
    window of prices (in ticks from the touch) a level may sit at; ``fill``: the share of that window
    holding a level, at start and on average; ``changes_per_batch``: mean random changes a batch (0 to
    twice that, uniformly); ``history``: batches the ring keeps; ``futures``: diffs carry ``T`` and ``pu``
    and snapshots ``E`` and ``T``; ``max_catch_up``: batches one :meth:`DepthBooks.advance` flushes at
    most (a clock jump skips the older boundaries, as the generator skips a backlog); ``slow_interval_ms``:
    0, or the cadence (a multiple of ``interval_ms`` above it) of a second, aggregated diff stream.
    """

    interval_ms: int = 100
    depth: int = 1000
    fill: float = 0.5
    changes_per_batch: int = 12
    history: int = 100
    futures: bool = False
    max_catch_up: int = 50
    slow_interval_ms: int = 0

    def __post_init__(self) -> None:
        for name, low, high in (
            ("interval_ms", 1, 3_600_000),
            ("depth", 1, MAX_DEPTH),
            ("changes_per_batch", 0, 100_000),
            ("history", 1, 1_000_000),
            ("max_catch_up", 1, 1_000_000),
            ("slow_interval_ms", 0, 3_600_000),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise SimulatorConfigError(f"book {name} must be an integer from {low} to {high}, got {value!r}")
        if not isinstance(self.fill, int | float) or not 0.0 < self.fill <= 1.0:
            raise SimulatorConfigError(f"book fill must be a fraction above 0 and at most 1, got {self.fill!r}")
        if not isinstance(self.futures, bool):
            raise SimulatorConfigError(f"book futures must be true or false, got {self.futures!r}")
        slow = self.slow_interval_ms
        if slow and (slow <= self.interval_ms or slow % self.interval_ms):
            raise SimulatorConfigError(
                f"book slow_interval_ms must be 0 or a multiple of interval_ms ({self.interval_ms}) above it, "
                f"got {slow}"
            )


def depth_stream(symbol: str, interval_ms: int) -> str:
    """Binance's diff stream name: ``btcusdt@depth`` (1000 ms), ``btcusdt@depth@100ms`` (any other cadence)."""
    lower = symbol.lower()
    return f"{lower}@depth" if interval_ms == 1000 else f"{lower}@depth@{interval_ms}ms"


def parse_units(text: str) -> int:
    """``"27123.45000000"`` -> ``2712345000000``: a non-negative decimal with at most 8 decimals, in 1e-8
    units, by integer arithmetic (the inverse of :func:`format_decimal`); ValueError for anything else."""
    whole, dot, frac = text.partition(".")
    if (
        not whole.isascii() or not whole.isdigit() or len(frac) > 8
        or (dot and not (frac.isascii() and frac.isdigit()))
    ):
        raise ValueError(f"not a decimal amount with at most 8 decimals: {text!r}")
    return int(whole) * SCALE + (int(frac.ljust(8, "0")) if frac else 0)


class _Batch:
    """One flushed batch in the ring: its ids and time, each changed level's size before it, and what was sent
    (None when the batch was dropped)."""

    __slots__ = ("asks_before", "bids_before", "first", "last", "payload", "time_ms")

    def __init__(
        self, first: int, last: int, time_ms: int, bids_before: dict[int, int], asks_before: dict[int, int],
        payload: dict[str, Any] | None,
    ) -> None:
        self.first = first
        self.last = last
        self.time_ms = time_ms
        self.bids_before = bids_before
        self.asks_before = asks_before
        self.payload = payload


def _undo(side: dict[int, int], before: Mapping[int, int]) -> None:
    for price, qty in before.items():
        if qty:
            side[price] = qty
        else:
            side.pop(price, None)


class SymbolBook:
    """One symbol's synthetic L2 book; see the module docstring.  Owned by the caller that drives it.

    ``bids`` and ``asks`` (price in ticks -> size in 1e-8 units) are the book itself: read them, never
    write them.  Costs: :meth:`set_touch` O(levels it removes + the distance moved, capped by the side's
    size); :meth:`flush` O(changes, sorted); :meth:`snapshot` O(depth log depth).
    """

    __slots__ = (
        "_ask_before", "_bid_before", "_drop_next", "_p_delete", "_ring", "_slow_asks", "_slow_bids",
        "_slow_dropped", "_slow_first", "_stale_back", "_ticker", "asks", "best_ask", "best_bid", "bids", "config",
        "dropped", "last_id", "prev_u", "rng", "sent", "slow_stream", "stale_served", "step_size", "stream",
        "symbol", "tick_size",
    )  # fmt: skip

    def __init__(self, spec: SymbolSpec, *, seed: int = 1, config: BookConfig | None = None, id_base: int = 0):
        self.config = cfg = config if config is not None else BookConfig()
        self.symbol = spec.symbol
        self.tick_size = spec.tick_size
        self.step_size = spec.step_size
        self.stream = depth_stream(spec.symbol, cfg.interval_ms)
        #: the aggregated stream (None without ``slow_interval_ms``)
        self.slow_stream = depth_stream(spec.symbol, cfg.slow_interval_ms) if cfg.slow_interval_ms else None
        self.rng = rng = random.Random(f"depth:{seed}:{spec.symbol}")
        #: the id of the last change applied (a snapshot's ``lastUpdateId``), and the ``u`` of the last batch
        self.last_id = self.prev_u = id_base + 400_000_000 + rng.randrange(100_000_000)
        # the market's own opening touch (``_SymbolState``): one tick wide at the start price
        self.best_bid = bid = max(1, spec.start_price // spec.tick_size)
        self.best_ask = ask = bid + 1
        self.bids: dict[int, int] = {bid: self._size()}
        self.asks: dict[int, int] = {ask: self._size()}
        for d in range(1, cfg.depth):
            if bid - d >= 1 and rng.random() < cfg.fill:
                self.bids[bid - d] = self._size()
            if rng.random() < cfg.fill:
                self.asks[ask + d] = self._size()
        self._p_delete = 1.0 - cfg.fill  # with adds at ``fill``, a level's presence averages ``fill``
        self._bid_before: dict[int, int] = {}
        self._ask_before: dict[int, int] = {}
        self._ring: deque[_Batch] = deque(maxlen=cfg.history)
        self._drop_next = False
        self._stale_back = 0
        self._ticker: Mapping[str, Any] | None = None
        # the slow interval so far: levels changed, its first update id (None: no change yet), a batch dropped
        self._slow_bids: set[int] = set()
        self._slow_asks: set[int] = set()
        self._slow_first: int | None = None
        self._slow_dropped = False
        #: batches sent, batches dropped by the fault, stale snapshots served
        self.sent = self.dropped = self.stale_served = 0

    def _size(self) -> int:
        return self.step_size * (1 + self.rng.getrandbits(_SIZE_BITS))

    def _set(self, side: dict[int, int], before: dict[int, int], price: int, qty: int) -> None:
        """Set one level (``qty`` 0 deletes it), remembering its size before the batch; one update id."""
        old = side.get(price, 0)
        if old == qty:
            return
        if price not in before:
            before[price] = old
        if qty:
            side[price] = qty
        else:
            del side[price]
        self.last_id += 1

    def _clear(self, side: dict[int, int], before: dict[int, int], lo: int, hi: int) -> None:
        """Delete every level priced in ``[lo, hi)``."""
        if hi - lo <= len(side):
            prices: Iterable[int] = [p for p in range(lo, hi) if p in side]
        else:
            prices = sorted(p for p in side if lo <= p < hi)
        for p in prices:
            self._set(side, before, p, 0)

    def set_touch(self, bid: int, ask: int, bid_qty: int | None = None, ask_qty: int | None = None) -> None:
        """Move the touch to ``bid`` < ``ask`` (ticks) now; the touch sizes (1e-8 units) are kept, or random when
        a touch level is new, unless given (a size of 0 or less counts as not given)."""
        if not 1 <= bid < ask:
            raise ValueError(f"{self.symbol}: a touch needs 1 <= bid < ask, got bid {bid} ask {ask}")
        self._ticker = None  # this touch is newer than any ticker still waiting
        depth = self.config.depth
        bids, asks, b0, a0 = self.bids, self.asks, self.best_bid, self.best_ask
        if bid < b0:
            self._clear(bids, self._bid_before, bid + 1, b0 + 1)
        elif bid > b0:
            self._clear(bids, self._bid_before, b0 - depth + 1, bid - depth + 1)
        if ask > a0:
            self._clear(asks, self._ask_before, a0, ask)
        elif ask < a0:
            self._clear(asks, self._ask_before, ask + depth, a0 + depth)
        self.best_bid, self.best_ask = bid, ask
        if bid_qty is None or bid_qty <= 0:
            bid_qty = bids.get(bid) or self._size()
        if ask_qty is None or ask_qty <= 0:
            ask_qty = asks.get(ask) or self._size()
        self._set(bids, self._bid_before, bid, bid_qty)
        self._set(asks, self._ask_before, ask, ask_qty)

    def set_ticker(self, payload: Mapping[str, Any]) -> None:
        """The touch of a Binance ``bookTicker`` payload (``b``, ``B``, ``a``, ``A``), applied at the next
        :meth:`flush` or :meth:`snapshot`, before which only the last one given counts (so a busy symbol's
        tickers cost one dict store each; the decimals are read once a batch)."""
        self._ticker = payload

    def _apply_ticker(self, payload: Mapping[str, Any]) -> None:
        self._ticker = None
        tick = self.tick_size
        bid, bid_rest = divmod(parse_units(payload["b"]), tick)
        ask, ask_rest = divmod(parse_units(payload["a"]), tick)
        if bid_rest or ask_rest:
            raise ValueError(f"{self.symbol}: a touch off the tick size: bid {payload['b']} ask {payload['a']}")
        self.set_touch(bid, ask, parse_units(payload["B"]), parse_units(payload["A"]))

    def _churn(self) -> None:
        """The batch's random changes: a level a few ticks behind the touch, more often near it, appears
        (at ``fill``), or changes size or vanishes (at ``1 - fill``).  The touch itself is left to the caller."""
        rng = self.rng
        cfg = self.config
        span = cfg.depth - 1
        if span < 1:
            return
        fill, p_delete, bits, step = cfg.fill, self._p_delete, _SIZE_BITS, self.step_size
        bids, asks = self.bids, self.asks
        for _ in range(rng.randrange(2 * cfg.changes_per_batch + 1)):
            r = rng.random()
            d = 1 + int(span * r * r)
            if rng.getrandbits(1):
                price = self.best_bid - d
                if price < 1:
                    continue
                side, before = bids, self._bid_before
            else:
                price = self.best_ask + d
                side, before = asks, self._ask_before
            x = rng.random()
            if price in side:
                qty = 0 if x < p_delete else step * (1 + rng.getrandbits(bits))
                self._set(side, before, price, qty)
            elif x < fill:
                self._set(side, before, price, step * (1 + rng.getrandbits(bits)))

    def flush(self, time_ms: int) -> dict[str, Any] | None:
        """Close the batch at ``time_ms`` (its ``E``): apply its random changes and return its ``depthUpdate``
        payload; None when nothing changed or when the batch is dropped by the fault."""
        if self._ticker is not None:
            self._apply_ticker(self._ticker)
        self._churn()
        if self.last_id == self.prev_u:
            return None
        first, last, prev = self.prev_u + 1, self.last_id, self.prev_u
        bids_before, asks_before = self._bid_before, self._ask_before
        self._bid_before, self._ask_before = {}, {}
        self.prev_u = last
        if self.slow_stream is not None:
            self._slow_bids.update(bids_before)
            self._slow_asks.update(asks_before)
            if self._slow_first is None:
                self._slow_first = first
        if self._drop_next:
            self._drop_next = False
            self.dropped += 1
            self._slow_dropped = True
            self._ring.append(_Batch(first, last, time_ms, bids_before, asks_before, None))
            return None
        payload = self._payload(time_ms, first, last, prev, bids_before, asks_before)
        self._ring.append(_Batch(first, last, time_ms, bids_before, asks_before, payload))
        self.sent += 1
        return payload

    def _payload(
        self, time_ms: int, first: int, last: int, prev: int, bid_prices: Iterable[int], ask_prices: Iterable[int]
    ) -> dict[str, Any]:
        """The ``depthUpdate`` of ids ``first`` to ``last`` changing these levels, at their sizes now."""
        fmt, tick, bids, asks = format_decimal, self.tick_size, self.bids, self.asks
        b = [[fmt(p * tick), fmt(bids[p]) if p in bids else _ZERO] for p in sorted(bid_prices, reverse=True)]
        a = [[fmt(p * tick), fmt(asks[p]) if p in asks else _ZERO] for p in sorted(ask_prices)]
        if self.config.futures:
            return {"e": DEPTH_EVENT, "E": time_ms, "T": time_ms, "s": self.symbol, "U": first, "u": last,
                    "pu": prev, "b": b, "a": a}  # fmt: skip
        return {"e": DEPTH_EVENT, "E": time_ms, "s": self.symbol, "U": first, "u": last, "b": b, "a": a}

    def flush_slow(self, time_ms: int) -> dict[str, Any] | None:
        """Close the slow interval at ``time_ms``, right after :meth:`flush` at the same boundary: the diff of
        every batch since the last slow boundary, or None when nothing changed or one of them was dropped."""
        first, dropped = self._slow_first, self._slow_dropped
        bids, asks = self._slow_bids, self._slow_asks
        self._slow_bids, self._slow_asks, self._slow_first, self._slow_dropped = set(), set(), None, False
        if first is None or dropped:
            return None
        return self._payload(time_ms, first, self.prev_u, first - 1, bids, asks)

    def recent(self, after: int = 0) -> list[dict[str, Any]]:
        """The sent diffs the ring still holds whose ``u`` is above ``after``, oldest first."""
        return [b.payload for b in self._ring if b.payload is not None and b.last > after]

    # -- faults --

    def drop_next_diff(self) -> None:
        """The next batch with a change is applied and takes its ids but is not sent."""
        self._drop_next = True

    def clear_faults(self) -> None:
        """Disarm the drop and stale faults if they have not acted yet."""
        self._drop_next = False
        self._stale_back = 0

    def stale_next_snapshot(self, batches_back: int = 1) -> None:
        """The next snapshot is the book as it was ``batches_back`` (>= 1) batches ago, or as far back as the
        ring reaches; changes since the last batch are left out too."""
        if batches_back < 1:
            raise ValueError(f"batches_back must be at least 1, got {batches_back}")
        self._stale_back = batches_back

    def _state_back(self, batches: int) -> tuple[dict[int, int], dict[int, int], int]:
        """The book (copies) and its last update id at the end of the batch ``batches`` before the last one."""
        bids, asks = dict(self.bids), dict(self.asks)
        _undo(bids, self._bid_before)
        _undo(asks, self._ask_before)
        last = self.prev_u
        ring = self._ring
        for i in range(1, min(batches, len(ring)) + 1):
            batch = ring[-i]
            _undo(bids, batch.bids_before)
            _undo(asks, batch.asks_before)
            last = batch.first - 1
        return bids, asks, last

    # -- reads --

    def snapshot(self, limit: int, now_ms: int = 0) -> dict[str, Any]:
        """The REST depth answer: ``{"lastUpdateId", "bids", "asks"}`` (futures: with ``E`` and ``T``, both
        ``now_ms``), the best ``limit`` levels a side; stale when the fault is armed (then disarmed)."""
        if self._ticker is not None:
            self._apply_ticker(self._ticker)
        if self._stale_back:
            bids, asks, last = self._state_back(self._stale_back)
            self._stale_back = 0
            self.stale_served += 1
        else:
            bids, asks, last = self.bids, self.asks, self.last_id
        fmt, tick = format_decimal, self.tick_size
        out: dict[str, Any] = {"lastUpdateId": last}
        if self.config.futures:
            out["E"] = out["T"] = now_ms
        out["bids"] = [[fmt(p * tick), fmt(bids[p])] for p in sorted(bids, reverse=True)[:limit]]
        out["asks"] = [[fmt(p * tick), fmt(asks[p])] for p in sorted(asks)[:limit]]
        return out


@dataclass(frozen=True, slots=True)
class DepthLimits:
    """A depth endpoint's ``limit``: its default, its largest value, the only values accepted (None: any from
    1 to ``maximum``, larger ones served as ``maximum``), and the request weight by ``(up to limit, weight)``."""

    default: int
    maximum: int
    valid: tuple[int, ...] | None
    weights: tuple[tuple[int, int], ...]

    def weight(self, limit: int) -> int:
        for upto, weight in self.weights:
            if limit <= upto:
                return weight
        return self.weights[-1][1]


#: ``/api/v3/depth``: default 100, at most 5000 (more is served as 5000); weight 5, 25, 50, 250
SPOT_DEPTH_LIMITS: Final = DepthLimits(100, 5000, None, ((100, 5), (500, 25), (1000, 50), (5000, 250)))
#: ``/fapi/v1/depth`` and ``/dapi/v1/depth``: default 500, only 5, 10, 20, 50, 100, 500, 1000; weight 2, 5, 10, 20
FUTURES_DEPTH_LIMITS: Final = DepthLimits(
    500, 1000, (5, 10, 20, 50, 100, 500, 1000), ((50, 2), (100, 5), (500, 10), (1000, 20))
)


@dataclass(frozen=True, slots=True)
class DepthQuery:
    """A valid depth request: its symbol, the levels a side to serve, and its request weight."""

    symbol: str
    limit: int
    weight: int


def _error(code: int, msg: str) -> RestResponse:
    return RestResponse(400, orjson.dumps({"code": code, "msg": msg}))


def parse_depth_query(
    query: Mapping[str, Sequence[str]], symbols: Iterable[str], limits: DepthLimits = SPOT_DEPTH_LIMITS
) -> DepthQuery | RestResponse:
    """``symbol=S[&limit=N]`` (as :func:`urllib.parse.parse_qs` returns it) -> the request, or the HTTP 400
    answer Binance gives: -1102 no symbol, -1121 unknown symbol, -1100 a limit that is not a number,
    -1130 a futures limit not among the valid ones.  A spot limit of 0 is served as 1, as the other endpoints do."""
    values = query.get("symbol")
    symbol = values[-1] if values else ""
    if not symbol:
        return _error(-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
    if symbol not in symbols:
        return _error(-1121, "Invalid symbol.")
    values = query.get("limit")
    text = values[-1] if values else ""
    if not text:
        limit = limits.default
    elif not (text.isascii() and text.isdigit()) or len(text) > 20:
        return _error(-1100, "Illegal characters found in parameter 'limit'; legal range is '^[0-9]{1,20}$'.")
    elif limits.valid is None:
        limit = max(1, min(limits.maximum, int(text)))
    elif int(text) in limits.valid:
        limit = int(text)
    else:
        return _error(-1130, "Data sent for parameter 'limit' is not valid.")
    return DepthQuery(symbol, limit, limits.weight(limit))


class DepthBooks:
    """One :class:`SymbolBook` per symbol and their shared batch cadence; owned by the simulator's event loop.

    Per market step: ``books.observe(events)`` then ``books.advance(now_ms)``.  Cost: :meth:`observe` scans the
    step's events once from the end; :meth:`advance` flushes every book at each boundary passed.
    """

    def __init__(
        self,
        specs: Sequence[SymbolSpec],
        *,
        seed: int = 1,
        config: BookConfig | None = None,
        id_base: int = 0,
        limits: DepthLimits = SPOT_DEPTH_LIMITS,
    ) -> None:
        if not specs:
            raise SimulatorConfigError("depth books need at least one symbol")
        self.config = cfg = config if config is not None else BookConfig()
        self.limits = limits
        self._books = {s.symbol: SymbolBook(s, seed=seed, config=cfg, id_base=id_base) for s in specs}
        self.symbols = tuple(self._books)
        self._next_ms: int | None = None
        self._now_ms = 0

    @classmethod
    def for_market(
        cls,
        market: SyntheticMarket,
        *,
        seed: int = 1,
        config: BookConfig | None = None,
        id_base: int = 0,
        limits: DepthLimits = SPOT_DEPTH_LIMITS,
    ) -> DepthBooks:
        """Books for every symbol of ``market``, with its specs (tick and step sizes, start prices)."""
        specs = [market.spec(s) for s in market.symbols]
        return cls(specs, seed=seed, config=config, id_base=id_base, limits=limits)

    def book(self, symbol: str) -> SymbolBook:
        return self._books[symbol]

    def streams(self) -> tuple[str, ...]:
        """The diff streams of every symbol (with ``slow_interval_ms``, each symbol's two)."""
        out = [b.stream for b in self._books.values()]
        out += [b.slow_stream for b in self._books.values() if b.slow_stream is not None]
        return tuple(out)

    def observe(self, events: Iterable[MarketEvent]) -> None:
        """Hand each symbol's ``bookTicker`` payloads among ``events`` to its book (:meth:`SymbolBook.set_ticker`:
        the last one before a batch end or a snapshot sets the touch).  Other events and symbols are passed over."""
        books = self._books
        for kind, _, payload in events:
            if kind == "bookTicker":
                book = books.get(payload["s"])
                if book is not None:
                    book.set_ticker(payload)

    def advance(self, now_ms: int) -> list[MarketEvent]:
        """The diffs of every batch boundary up to ``now_ms`` (each with ``E`` at its boundary), in time order
        and by symbol within a time.  The first call only sets the clock."""
        self._now_ms = max(self._now_ms, now_ms)
        interval = self.config.interval_ms
        due_ms = self._next_ms
        if due_ms is None:
            self._next_ms = (now_ms // interval + 1) * interval
            return []
        if now_ms < due_ms:
            return []
        count = (now_ms - due_ms) // interval + 1
        if count > self.config.max_catch_up:
            due_ms += (count - self.config.max_catch_up) * interval
            count = self.config.max_catch_up
        out: list[MarketEvent] = []
        books = tuple(self._books.values())
        slow_ms = self.config.slow_interval_ms
        for _ in range(count):
            slow = slow_ms and due_ms % slow_ms == 0
            for book in books:
                payload = book.flush(due_ms)
                if payload is not None:
                    out.append((DEPTH_EVENT, book.stream, payload))
                if slow:
                    payload = book.flush_slow(due_ms)
                    if payload is not None:
                        out.append((DEPTH_EVENT, book.slow_stream or book.stream, payload))
            due_ms += interval
        self._next_ms = due_ms
        return out

    def answer(self, query: Mapping[str, Sequence[str]]) -> RestResponse:
        """``GET /api/v3/depth?query``: the snapshot of the symbol asked, or Binance's error."""
        request = parse_depth_query(query, self._books, self.limits)
        if isinstance(request, RestResponse):
            return request
        return RestResponse(200, orjson.dumps(self._books[request.symbol].snapshot(request.limit, self._now_ms)))

    def drop_next_diff(self, symbol: str | None = None) -> None:
        """The drop fault on ``symbol``'s book (None: on every book)."""
        for book in self._targets(symbol):
            book.drop_next_diff()

    def clear_faults(self) -> None:
        """Disarm every book's drop and stale faults not yet used."""
        for book in self._books.values():
            book.clear_faults()

    def stale_next_snapshot(self, symbol: str | None = None, batches_back: int = 1) -> None:
        """The stale-snapshot fault on ``symbol``'s book (None: on every book)."""
        for book in self._targets(symbol):
            book.stale_next_snapshot(batches_back)

    def _targets(self, symbol: str | None) -> Iterable[SymbolBook]:
        return self._books.values() if symbol is None else (self._books[symbol],)

    def state(self) -> dict[str, Any]:
        """Per symbol: batches sent and dropped, stale snapshots served, the last update id and levels a side."""
        return {
            s: {"sent": b.sent, "dropped": b.dropped, "stale_served": b.stale_served, "last_update_id": b.last_id,
                "bids": len(b.bids), "asks": len(b.asks)}
            for s, b in self._books.items()
        }  # fmt: skip
