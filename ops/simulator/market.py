# size: one seeded generator per Binance stream kind, pure; they share one clock and one order of random draws (same
#   seed, same output), which a split would make easy to break.
"""A seeded synthetic Binance spot market: pure code, no I/O, the same output for the same seed.

:class:`SyntheticMarket` turns "the next n events at time t" into Binance spot stream payloads:

- ``trade`` events with contiguous trade ids per symbol;
- ``aggTrade`` events with contiguous aggregate ids, each covering 1..8 trades (``f``/``l``) at one
  price and one taker side;
- ``bookTicker`` updates with increasing update ids ``u``;
- ``kline`` updates per configured interval: open time aligned to the interval, pushed at most every
  ``kline_update_ms`` while open and once more with ``x: true`` when the interval has passed.

Prices and quantities are integers in units of 1e-8 (a random walk in whole price ticks) and become
decimal strings with 8 decimals by integer arithmetic only (:func:`format_decimal`); no float
touches them. Event times come from the caller (``step(n, now_ms)``) and never go backwards.

Each symbol has its own random generator seeded from ``(seed, symbol)``, so a symbol's sequence of
trades and book updates depends only on the seed and on how many of its events were taken; klines
are derived from the trades and consume no randomness. The total is split over the symbols by
weight with integer arithmetic, so the long-run shares are exact.

Every trade and aggregate trade is also kept in a bounded per-symbol :class:`SymbolHistory`, which
the REST endpoints read: ids older than ``history`` are gone, as on a venue.
"""

from __future__ import annotations

import random
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "EVENT_KINDS",
    "KLINE_INTERVAL_MS",
    "SCALE",
    "KlineRecord",
    "MarketEvent",
    "SymbolHistory",
    "SymbolSpec",
    "SyntheticMarket",
    "format_decimal",
    "kline_open_time",
    "scheduled_ticks",
    "split_symbol",
    "stream_names",
]

#: amounts are integers in units of 1e-8, Binance's 8 decimals
SCALE: Final = 10**8

#: Binance kline intervals with a fixed length (``1M``, calendar months, is not simulated)
KLINE_INTERVAL_MS: Final[dict[str, int]] = {
    "1s": 1_000,
    "1m": 60_000,
    "3m": 180_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "2h": 7_200_000,
    "4h": 14_400_000,
    "6h": 21_600_000,
    "8h": 28_800_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
    "3d": 259_200_000,
    "1w": 604_800_000,
}
# Binance weeks open on Monday 00:00 UTC; the Unix epoch was a Thursday.
_WEEK_OFFSET_MS: Final = 4 * 86_400_000

#: the event kinds, as counted in statistics
EVENT_KINDS: Final = ("trade", "aggTrade", "bookTicker", "kline")

#: (kind, stream name, Binance payload)
MarketEvent = tuple[str, str, dict[str, Any]]

#: a closed or open kline: (open_time, open, high, low, close, volume, quote_volume, trades,
#: taker_buy_volume, taker_buy_quote_volume); quote volumes are in units of 1e-16
KlineRecord = tuple[int, int, int, int, int, int, int, int, int, int]

_QUOTES: Final = (
    "FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY", "BRL", "GBP", "JPY",
    "DAI", "AUD",
)  # fmt: skip

# symbol -> (start price, price tick, quantity step), all in units of 1e-8
_PRESETS: Final[dict[str, tuple[int, int, int]]] = {
    "BTCUSDT": (27_000 * SCALE, 1_000_000, 1_000),
    "ETHUSDT": (1_800 * SCALE, 1_000_000, 10_000),
    "BNBUSDT": (240 * SCALE, 1_000_000, 100_000),
    "SOLUSDT": (20 * SCALE, 1_000_000, 100_000),
    "XRPUSDT": (SCALE // 2, 10_000, SCALE),
    "BNBBTC": (810_000, 100, 100_000),
    "ETHBTC": (6_500_000, 100, 10_000),
}

_TRADE_SHARE: Final = 0.45  # share of market actions that are trades (the rest move the book)
_MAX_AGG: Final = 8  # trades per aggregate trade, at most


def format_decimal(units: int) -> str:
    """``2712345000000`` -> ``"27123.45000000"``: a non-negative amount in 1e-8 units, 8 decimals.

    By slicing the integer's digits (it runs about three times per generated event); ValueError for an amount
    below zero."""
    if units < 0:
        raise ValueError(f"a negative amount: {units}")
    digits = str(units)
    if len(digits) > 8:
        return digits[:-8] + "." + digits[-8:]
    return "0." + digits.rjust(8, "0")


def kline_open_time(ts_ms: int, interval: str) -> int:
    """Open time of the ``interval`` kline containing ``ts_ms`` (weeks open on Monday, UTC)."""
    ms = KLINE_INTERVAL_MS[interval]
    offset = _WEEK_OFFSET_MS if interval == "1w" else 0
    return ts_ms - (ts_ms - offset) % ms


def split_symbol(symbol: str) -> tuple[str, str]:
    """``"BTCUSDT"`` -> ``("BTC", "USDT")``, by the longest known quote asset (else the last 4 letters)."""
    for quote in _QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return symbol[: -len(quote)], quote
    cut = max(1, len(symbol) - 4)
    return symbol[:cut], symbol[cut:]


def stream_names(symbol: str, kline_intervals: Sequence[str]) -> tuple[str, ...]:
    """The streams the synthetic market produces for ``symbol``, Binance's names (lower case symbol)."""
    s = symbol.lower()
    return (f"{s}@trade", f"{s}@aggTrade", f"{s}@bookTicker", *(f"{s}@kline_{i}" for i in kline_intervals))


def scheduled_ticks(
    elapsed: float,
    rate: float,
    *,
    burst_every: float = 0.0,
    burst_duration: float = 0.0,
    burst_multiplier: float = 1.0,
) -> int:
    """How many ticks are due ``elapsed`` seconds after start: the integral of the rate, floored.

    With bursts, the last ``burst_duration`` seconds of every ``burst_every`` period run at
    ``rate * burst_multiplier``. The result never decreases as ``elapsed`` grows.
    """
    if elapsed <= 0.0 or rate <= 0.0:
        return 0
    effective = elapsed
    if burst_every > 0.0 and burst_duration > 0.0 and burst_multiplier != 1.0:
        periods, into = divmod(elapsed, burst_every)
        in_burst = periods * burst_duration + max(0.0, into - (burst_every - burst_duration))
        effective += (burst_multiplier - 1.0) * in_burst
    return int(rate * effective)


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """What the venue says about a symbol; amounts in units of 1e-8."""

    symbol: str
    base_asset: str
    quote_asset: str
    tick_size: int
    step_size: int
    start_price: int

    @classmethod
    def for_symbol(cls, symbol: str) -> SymbolSpec:
        """A fixed spec for well-known symbols (an OKX ``instId`` such as ``BTC-USDT-SWAP`` or a futures symbol
        such as ``BTCUSD_PERP`` takes its spot pair's); for others, one derived from the name alone."""
        base, quote = split_symbol(symbol)
        preset = _PRESETS.get(symbol)
        if preset is None and ("-" in symbol or "_" in symbol):
            pair = "".join(symbol.split("_")[0].split("-")[:2])  # BTC-USDT-SWAP -> BTCUSDT, BTCUSD_PERP -> BTCUSD
            preset = _PRESETS.get(pair) or (_PRESETS.get(pair + "T") if pair.endswith("USD") else None)
        if preset is None:
            rng = random.Random(f"spec:{symbol}")
            tick = 10_000  # 0.0001
            preset = (rng.randrange(1_000, 1_000_000) * tick, tick, 1_000_000)
        price, tick, step = preset
        return cls(symbol, base, quote, tick, step, price)


class _Ring:
    """Fixed-capacity ring of integer rows, addressed by absolute index (0 = first row ever pushed)."""

    __slots__ = ("_cap", "_cols", "_grow", "total")

    def __init__(self, ncols: int, capacity: int, *, preallocate: bool = False) -> None:
        self._cap = capacity
        #: grown row by row up to the capacity, or allocated in full now (memory flat from the start)
        self._grow = not preallocate
        zeros = bytes(8 * capacity) if preallocate else b""
        self._cols = tuple(array("q", zeros) for _ in range(ncols))
        self.total = 0

    @property
    def oldest(self) -> int:
        """Absolute index of the oldest row still held."""
        return max(0, self.total - self._cap)

    def push(self, row: tuple[int, ...]) -> None:
        total = self.total
        if self._grow and total < self._cap:
            for col, value in zip(self._cols, row, strict=True):
                col.append(value)
        else:
            pos = total % self._cap
            for col, value in zip(self._cols, row, strict=True):
                col[pos] = value
        self.total = total + 1

    def row(self, index: int) -> tuple[int, ...]:
        pos = index % self._cap
        return tuple(col[pos] for col in self._cols)

    def value(self, column: int, index: int) -> int:
        return self._cols[column][index % self._cap]

    def first_at_or_after(self, column: int, value: int) -> int:
        """First held index whose ``column`` (non-decreasing) is >= ``value``; ``total`` if none."""
        lo, hi = self.oldest, self.total
        col, cap = self._cols[column], self._cap
        while lo < hi:
            mid = (lo + hi) // 2
            if col[mid % cap] < value:
                lo = mid + 1
            else:
                hi = mid
        return lo


class SymbolHistory:
    """Bounded history of one symbol's trades, aggregate trades and klines (read by REST).

    Trades are ``(id, price, qty, time_ms, buyer_is_maker)``; aggregate trades are
    ``(id, price, qty, first_id, last_id, time_ms, buyer_is_maker)``; amounts in 1e-8 units.
    """

    def __init__(
        self, *, first_trade_id: int, first_agg_id: int, capacity: int, kline_intervals: Sequence[str],
        preallocate: bool = False,
    ) -> None:
        self.first_trade_id = first_trade_id
        self.first_agg_id = first_agg_id
        self._trades = _Ring(4, capacity, preallocate=preallocate)  # price, qty, time, maker
        self._aggs = _Ring(6, capacity, preallocate=preallocate)  # price, qty, first, last, time, maker
        self._closed: dict[str, deque[KlineRecord]] = {i: deque(maxlen=capacity) for i in kline_intervals}
        self._open: dict[str, Callable[[], KlineRecord]] = {}

    # -- writes (by the market) --

    def add_trade(self, price: int, qty: int, time_ms: int, maker: bool) -> None:
        self._trades.push((price, qty, time_ms, maker))

    def add_agg(self, price: int, qty: int, first: int, last: int, time_ms: int, maker: bool) -> None:
        self._aggs.push((price, qty, first, last, time_ms, maker))

    def close_kline(self, interval: str, record: KlineRecord) -> None:
        self._closed[interval].append(record)

    def set_open_kline(self, interval: str, current: Callable[[], KlineRecord]) -> None:
        """Where to read the open kline of ``interval`` from (it changes with every trade)."""
        self._open[interval] = current

    # -- reads --

    @property
    def trade_id_range(self) -> tuple[int, int]:
        """(oldest held trade id, next trade id); empty when equal."""
        return self.first_trade_id + self._trades.oldest, self.first_trade_id + self._trades.total

    @property
    def agg_id_range(self) -> tuple[int, int]:
        """(oldest held aggregate id, next aggregate id); empty when equal."""
        return self.first_agg_id + self._aggs.oldest, self.first_agg_id + self._aggs.total

    def _trade(self, index: int) -> tuple[int, int, int, int, bool]:
        price, qty, time_ms, maker = self._trades.row(index)
        return self.first_trade_id + index, price, qty, time_ms, bool(maker)

    def _agg(self, index: int) -> tuple[int, int, int, int, int, int, bool]:
        price, qty, first, last, time_ms, maker = self._aggs.row(index)
        return self.first_agg_id + index, price, qty, first, last, time_ms, bool(maker)

    def trades(self, *, from_id: int | None, limit: int) -> list[tuple[int, int, int, int, bool]]:
        """``limit`` trades from ``from_id`` on (the latest ``limit`` when ``from_id`` is None)."""
        ring = self._trades
        if from_id is None:
            start = max(ring.oldest, ring.total - limit)
        else:
            start = max(ring.oldest, from_id - self.first_trade_id)
        stop = min(ring.total, start + limit)
        return [self._trade(i) for i in range(start, stop)]

    def agg_trades(
        self,
        *,
        from_id: int | None = None,
        start_ms: int | None = None,
        end_ms: int | None = None,
        limit: int,
    ) -> list[tuple[int, int, int, int, int, int, bool]]:
        """Aggregate trades from ``from_id``, or within ``[start_ms, end_ms]``, or the latest ``limit``."""
        ring = self._aggs
        if from_id is not None:
            start = max(ring.oldest, from_id - self.first_agg_id)
        elif start_ms is not None:
            start = ring.first_at_or_after(4, start_ms)
        elif end_ms is not None:
            start = max(ring.oldest, ring.first_at_or_after(4, end_ms + 1) - limit)
        else:
            start = max(ring.oldest, ring.total - limit)
        out = []
        for i in range(start, min(ring.total, start + limit)):
            if end_ms is not None and ring.value(4, i) > end_ms:
                break
            out.append(self._agg(i))
        return out

    def klines(
        self, interval: str, *, start_ms: int | None = None, end_ms: int | None = None, limit: int
    ) -> list[KlineRecord]:
        """Klines (closed, then the open one) whose open time is within ``[start_ms, end_ms]``."""
        rows = list(self._closed[interval])
        current = self._open.get(interval)
        if current is not None:
            rows.append(current())
        if start_ms is not None:
            rows = [r for r in rows if r[0] >= start_ms]
        if end_ms is not None:
            rows = [r for r in rows if r[0] <= end_ms]
        return rows[:limit] if start_ms is not None else rows[-limit:]


class _Kline:
    """The open kline of one symbol and interval, with integer amounts."""

    __slots__ = ("L", "Q", "V", "c", "f", "h", "interval", "l", "ms", "n", "next_update", "o", "q", "t", "v")

    def __init__(self, interval: str, open_time: int, price: int, next_update: int) -> None:
        self.interval = interval
        self.ms = KLINE_INTERVAL_MS[interval]
        self.next_update = next_update
        self.open(open_time, price)

    def open(self, open_time: int, price: int) -> None:
        self.t = open_time
        self.o = self.h = self.l = self.c = price
        self.v = self.q = self.n = self.V = self.Q = 0
        self.f = self.L = -1  # no trade yet

    def add(self, price: int, qty: int, trade_id: int, taker_buy: bool) -> None:
        if self.n == 0:
            self.o = self.h = self.l = price
            self.f = trade_id
        elif price > self.h:
            self.h = price
        elif price < self.l:
            self.l = price
        self.c = price
        self.L = trade_id
        self.n += 1
        self.v += qty
        self.q += price * qty
        if taker_buy:
            self.V += qty
            self.Q += price * qty

    def record(self) -> KlineRecord:
        return (self.t, self.o, self.h, self.l, self.c, self.v, self.q, self.n, self.V, self.Q)

    def event(self, symbol: str, now_ms: int, closed: bool) -> dict[str, Any]:
        fmt = format_decimal
        return {
            "e": "kline",
            "E": now_ms,
            "s": symbol,
            "k": {
                "t": self.t,
                "T": self.t + self.ms - 1,
                "s": symbol,
                "i": self.interval,
                "f": self.f,
                "L": self.L,
                "o": fmt(self.o),
                "c": fmt(self.c),
                "h": fmt(self.h),
                "l": fmt(self.l),
                "v": fmt(self.v),
                "n": self.n,
                "x": closed,
                "q": fmt(self.q // SCALE),
                "V": fmt(self.V),
                "Q": fmt(self.Q // SCALE),
                "B": "0",
            },
        }


class _SymbolState:
    """One symbol's book, id counters, open klines and events not yet handed out."""

    def __init__(
        self,
        symbol: str,
        seed: int,
        kline_intervals: Sequence[str],
        history: int,
        kline_update_ms: int,
        id_base: int = 0,
        preallocate: bool = False,
    ) -> None:
        self.spec = spec = SymbolSpec.for_symbol(symbol)
        self.symbol = symbol
        self.rng = rng = random.Random(f"{seed}:{symbol}")
        self.next_trade = id_base + 1_000_000 + rng.randrange(9_000_000)
        self.next_agg = id_base + 500_000 + rng.randrange(4_500_000)
        self.next_update = id_base + 400_000_000 + rng.randrange(100_000_000)
        self.bid = max(1, spec.start_price // spec.tick_size)
        self.min_bid = max(1, self.bid // 100)
        self.spread = 1
        self.bid_qty = spec.step_size * (1 + rng.getrandbits(14))
        self.ask_qty = spec.step_size * (1 + rng.getrandbits(14))
        self.pending: deque[MarketEvent] = deque()
        self.kline_update_ms = kline_update_ms
        self.kline_intervals = tuple(kline_intervals)
        self.klines: list[_Kline] = []
        self.kline_due = -1  # klines are opened at the first action
        lower = symbol.lower()
        self.s_trade = f"{lower}@trade"
        self.s_agg = f"{lower}@aggTrade"
        self.s_book = f"{lower}@bookTicker"
        self.s_kline = {i: f"{lower}@kline_{i}" for i in kline_intervals}
        self.history = SymbolHistory(
            first_trade_id=self.next_trade,
            first_agg_id=self.next_agg,
            capacity=history,
            kline_intervals=kline_intervals,
            preallocate=preallocate,
        )

    def take(self, n: int, now_ms: int, out: list[MarketEvent]) -> None:
        pending = self.pending
        while n > 0:
            if not pending:
                self._act(now_ms)
            take = min(n, len(pending))
            out.extend(pending.popleft() for _ in range(take))
            n -= take

    def _act(self, now: int) -> None:
        if now >= self.kline_due:
            self._klines(now)
        if self.rng.random() < _TRADE_SHARE:
            self._trades(now)
        else:
            self._book(now)

    def _klines(self, now: int) -> None:
        price = self.bid * self.spec.tick_size
        if not self.klines:
            self.klines = [
                _Kline(i, kline_open_time(now, i), price, now + self.kline_update_ms) for i in self.kline_intervals
            ]
            for kl in self.klines:
                self.history.set_open_kline(kl.interval, kl.record)
        due = now + 86_400_000
        hist = self.history
        for kl in self.klines:
            if now >= kl.t + kl.ms:
                self.pending.append(("kline", self.s_kline[kl.interval], kl.event(self.symbol, now, True)))
                hist.close_kline(kl.interval, kl.record())
                kl.open(kline_open_time(now, kl.interval), kl.c)
                kl.next_update = now + self.kline_update_ms
            elif now >= kl.next_update:
                self.pending.append(("kline", self.s_kline[kl.interval], kl.event(self.symbol, now, False)))
                kl.next_update = now + self.kline_update_ms
            due = min(due, kl.t + kl.ms, kl.next_update)
        self.kline_due = due

    def _trades(self, now: int) -> None:
        rng = self.rng
        spec = self.spec
        buy = rng.random() < 0.5
        price = (self.bid + self.spread if buy else self.bid) * spec.tick_size
        price_str = format_decimal(price)
        maker = not buy  # Binance's "m": the buyer is the maker, so the taker sold
        count = 1
        while count < _MAX_AGG and rng.random() < 0.35:
            count += 1
        symbol, stream, step = self.symbol, self.s_trade, spec.step_size
        append = self.pending.append
        add_trade = self.history.add_trade
        klines = self.klines
        first = trade_id = self.next_trade
        total = 0
        for _ in range(count):
            qty = step * (1 + rng.getrandbits(10))
            total += qty
            append(("trade", stream, {
                "e": "trade", "E": now, "s": symbol, "t": trade_id, "p": price_str,
                "q": format_decimal(qty), "T": now, "m": maker, "M": True,
            }))  # fmt: skip
            add_trade(price, qty, now, maker)
            for kl in klines:
                kl.add(price, qty, trade_id, buy)
            trade_id += 1
        last = trade_id - 1
        self.next_trade = trade_id
        agg = self.next_agg
        self.next_agg = agg + 1
        append(("aggTrade", self.s_agg, {
            "e": "aggTrade", "E": now, "s": symbol, "a": agg, "p": price_str, "q": format_decimal(total),
            "f": first, "l": last, "T": now, "m": maker, "M": True,
        }))  # fmt: skip
        self.history.add_agg(price, total, first, last, now, maker)
        # The trades took liquidity at the touch; a side taken out moves the book one tick.
        if buy:
            self.ask_qty -= total
            if self.ask_qty <= 0:
                self.bid += 1
                self.ask_qty = step * (1 + rng.getrandbits(14))
        else:
            self.bid_qty -= total
            if self.bid_qty <= 0:
                if self.bid > self.min_bid:
                    self.bid -= 1
                self.bid_qty = step * (1 + rng.getrandbits(14))
        self._push_book()

    def _book(self, now: int) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.25:
            self.bid += 1
        elif r < 0.5 and self.bid > self.min_bid:
            self.bid -= 1
        if rng.random() < 0.2:
            self.spread = 1 + rng.getrandbits(2) % 3
        step = self.spec.step_size
        self.bid_qty = step * (1 + rng.getrandbits(14))
        self.ask_qty = step * (1 + rng.getrandbits(14))
        self._push_book()

    def _push_book(self) -> None:
        tick = self.spec.tick_size
        update_id = self.next_update
        self.next_update = update_id + 1
        self.pending.append(("bookTicker", self.s_book, {
            "u": update_id, "s": self.symbol,
            "b": format_decimal(self.bid * tick), "B": format_decimal(self.bid_qty),
            "a": format_decimal((self.bid + self.spread) * tick), "A": format_decimal(self.ask_qty),
        }))  # fmt: skip


class SyntheticMarket:
    """Seeded Binance spot market data for a set of symbols; see the module docstring.

    ``step(n, now_ms)`` returns exactly ``n`` events, spread over the symbols by weight.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        seed: int = 1,
        kline_intervals: Sequence[str] = ("1m",),
        history: int = 200_000,
        weights: Sequence[float] | None = None,
        kline_update_ms: int = 1000,
        id_base: int = 0,
        preallocate: bool = False,
    ) -> None:
        if not symbols:
            raise ValueError("a market needs at least one symbol")
        for interval in kline_intervals:
            if interval not in KLINE_INTERVAL_MS:
                raise ValueError(f"unsupported kline interval {interval!r}")
        if weights is None:
            weights = [1.0] * len(symbols)
        if len(weights) != len(symbols) or any(w <= 0 for w in weights):
            raise ValueError("weights must be positive, one per symbol")
        self.symbols = tuple(symbols)
        self.kline_intervals = tuple(kline_intervals)
        self._states = [
            _SymbolState(s, seed, kline_intervals, history, kline_update_ms, id_base, preallocate) for s in symbols
        ]
        self._by_symbol = {st.symbol: st for st in self._states}
        self._weights = [max(1, round(w * 1_000_000)) for w in weights]
        self._weight_total = sum(self._weights)
        self._credit = [0] * len(symbols)
        self._last_ms = 0
        self._counts = dict.fromkeys(EVENT_KINDS, 0)
        self.generated = 0

    def spec(self, symbol: str) -> SymbolSpec:
        return self._by_symbol[symbol].spec

    def history(self, symbol: str) -> SymbolHistory:
        return self._by_symbol[symbol].history

    def last_trade_id(self, symbol: str) -> int:
        """The id of ``symbol``'s last trade handed out by :meth:`step` (one below its first before any)."""
        state = self._by_symbol[symbol]
        waiting = sum(1 for kind, _, _ in state.pending if kind == "trade")
        return state.next_trade - 1 - waiting

    def streams(self) -> tuple[str, ...]:
        """Every stream this market produces."""
        return tuple(name for s in self.symbols for name in stream_names(s, self.kline_intervals))

    def counts(self) -> dict[str, int]:
        """Events handed out so far, per kind (``trade``, ``aggTrade``, ``bookTicker``, ``kline``)."""
        return dict(self._counts)

    def split(self, n: int) -> list[int]:
        """Share ``n`` events out over the symbols by weight; the shares add up to ``n`` exactly.

        A credit per symbol carries the remainders over, so over many calls each symbol gets its
        weight's share of the total to within one event.
        """
        credit, weights, total = self._credit, self._weights, self._weight_total
        shares = []
        for i, w in enumerate(weights):
            credit[i] += n * w
            share = max(0, credit[i] // total)
            credit[i] -= share * total
            shares.append(share)
        missing = n - sum(shares)
        while missing > 0:
            i = max(range(len(credit)), key=credit.__getitem__)
            shares[i] += 1
            credit[i] -= total
            missing -= 1
        while missing < 0:
            i = min((j for j in range(len(credit)) if shares[j] > 0), key=credit.__getitem__)
            shares[i] -= 1
            credit[i] += total
            missing += 1
        return shares

    def step(self, n: int, now_ms: int) -> list[MarketEvent]:
        """The next ``n`` events at ``now_ms`` (held non-decreasing), grouped by symbol."""
        if n <= 0:
            return []
        now_ms = max(now_ms, self._last_ms)
        self._last_ms = now_ms
        out: list[MarketEvent] = []
        for state, share in zip(self._states, self.split(n), strict=True):
            if share:
                state.take(share, now_ms, out)
        counts = self._counts
        for kind, _, _ in out:
            counts[kind] += 1
        self.generated += n
        return out
