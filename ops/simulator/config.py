"""The simulator's settings: one frozen, keyword-only dataclass, validated on construction.

Every Binance rule the simulator enforces has a setting here (ping interval, pong timeout, connection
age, incoming message rate, streams per connection), and every fault can be switched on from the
start (``fault_*``, ``refuse_for``, ``stall_for``, ``close_every``); the same faults can be switched
at run time through :class:`ops.simulator.Simulator` or its HTTP control endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .book import MAX_DEPTH, BookConfig
from .depth_faults import parse_depth_faults
from .errors import SimulatorConfigError
from .market import KLINE_INTERVAL_MS
from .profiles import check_venue, symbol_pattern
from .rest import parse_rest_faults

__all__ = ["SimulatorConfig"]


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise SimulatorConfigError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise SimulatorConfigError(f"{name} must be a number >= 0, got {value!r}")


def _fraction(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise SimulatorConfigError(f"{name} must be a fraction between 0 and 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """Settings of one simulator instance; see the module docstring of :mod:`ops.simulator`."""

    #: the venue stood in for (:mod:`.profiles`): ``binance`` (spot), ``binance_usdm``, ``binance_coinm``, ``okx``
    venue: str = "binance"

    # Where to listen; port 0 picks a free port (read it back from ``Simulator.port``).
    host: str = "127.0.0.1"
    port: int = 0

    # Synthetic market.
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    #: ticks a second in total, over all symbols and all event kinds (0: generate nothing)
    rate: float = 1000.0
    seed: int = 1
    #: added to every id series; None takes the wall clock in ms x 1000, so a restarted simulator's ids
    #: keep growing past what an earlier run stored, as a real venue's do (same seed, same market otherwise)
    id_base: int | None = 0
    #: relative share of the rate per symbol, same length as ``symbols`` (None: equal shares)
    weights: tuple[float, ...] | None = None
    kline_intervals: tuple[str, ...] = ("1m",)
    #: an open kline is pushed at most this often (Binance: 2000 ms), and once more when it closes
    kline_update_ms: int = 1000
    #: trades and aggregate trades kept per symbol for REST (and closed klines per interval)
    history: int = 200_000
    #: allocate that history in full at start, so the simulator's memory is flat from its first second
    #: (for long runs that watch memory; off by default: 80 bytes a row and symbol)
    preallocate_history: bool = False
    #: bursts: every ``burst_every`` seconds the rate is multiplied for the last ``burst_duration``
    #: seconds of the period (``burst_every`` 0 or a multiplier of 1 switch bursts off)
    burst_every: float = 0.0
    burst_duration: float = 1.0
    burst_multiplier: float = 1.0
    #: how often the generator wakes to produce the ticks the rate implies since start
    batch_interval: float = 0.005

    # Order books of the synthetic market: ``<symbol>@depth@100ms`` and ``<symbol>@depth`` (1000 ms) diffs and
    # ``GET /api/v3/depth`` (see :mod:`.book`); the touch follows the market's bookTicker.  Off unless asked for
    # (``market simulate`` asks for it by default): a hundred books churned every 100 ms cost a test process CPU.
    depth: bool = False
    #: levels a side at most (and the price window, in ticks from the touch, levels sit in)
    depth_levels: int = 1000
    #: mean random level changes per 100 ms batch and symbol, beside the touch's own
    depth_changes: int = 12
    #: REST request weight per minute and client address (0: no limit); over it 429, then 418 (see :mod:`.weights`).
    #: ``market simulate`` sets Binance's 6000; in code it is off unless asked for, since a test that checks what
    #: was stored against the venue's REST history is a client of the same budget.
    rest_weight_limit: int = 0

    # Replay instead of the synthetic market.
    replay: str | Path | None = None
    #: recorded REST depth snapshots (``*.depth.jsonl``) that answer ``/api/v3/depth`` in replay: the one of the
    #: symbol recorded last at or before the capture time played (see :mod:`.book_replay`)
    replay_rest: str | Path | None = None
    #: 2.0 plays twice as fast as recorded
    replay_speed: float = 1.0
    #: start over at the end of the capture instead of going quiet
    replay_loop: bool = False

    # Binance's connection rules.
    ping_interval: float = 20.0
    pong_timeout: float = 60.0
    max_connection_age: float = 86400.0
    #: the ``serverShutdown`` event goes out this long before a planned close
    shutdown_notice: float = 5.0
    max_incoming_per_s: int = 5
    max_streams_per_connection: int = 1024
    #: a connection whose unsent bytes exceed this is closed (1008, slow consumer)
    max_send_buffer: int = 16 * 2**20
    #: how long a closing handshake may take before the socket is dropped
    close_timeout: float = 5.0

    # OKX's connection rules (venue ``okx``; see :mod:`.okx`).
    #: a connection nothing was pushed to (not even a ``pong``) for this long is closed (OKX: 30 s)
    idle_timeout: float = 30.0
    #: new WebSocket connections a second and client address (OKX: 3); beyond, HTTP 429
    max_connects_per_s: int = 3
    #: subscribe and unsubscribe operations an hour and connection (OKX: 480); beyond, an error event
    max_ops_per_hour: int = 480
    #: ``books`` messages carry OKX's crc32 ``checksum`` of the top 25 levels, as OKX did until June 2026,
    #: instead of today's ``checksum: 0``
    book_checksum: bool = False

    # Faults applied from the start.
    fault_malformed: float = 0.0
    fault_duplicate: float = 0.0
    fault_out_of_order: float = 0.0
    #: refuse new WebSocket connections (HTTP 503) for this many seconds after start
    refuse_for: float = 0.0
    #: stall every connection for this many seconds after start
    stall_for: float = 0.0
    #: close every connection every this many seconds (None: never)
    close_every: float | None = None
    #: REST faults scheduled from the start, ``PATH=ITEM,ITEM;PATH=...`` (see :mod:`.rest`), e.g.
    #: ``"aggTrades=429:1,503,close"``: the first three ``aggTrades`` requests get them, in order
    rest_faults: str = ""
    #: depth faults armed at start, e.g. ``"drop@BTCUSDT,stale:3"`` (see :mod:`.depth_faults`)
    depth_faults: str = ""

    def __post_init__(self) -> None:
        try:
            check_venue(self.venue)
        except ValueError as exc:
            raise SimulatorConfigError(str(exc)) from None
        symbol_re = symbol_pattern(self.venue)
        symbols = self.symbols
        if isinstance(symbols, str) or not isinstance(symbols, Sequence):
            raise SimulatorConfigError(f"symbols must be a sequence of symbols, got {symbols!r}")
        upper = tuple(str(s).strip().upper() for s in symbols)
        if not upper:
            raise SimulatorConfigError("symbols must name at least one symbol")
        for s in upper:
            if not symbol_re.match(s):
                raise SimulatorConfigError(f"invalid {self.venue} symbol {s!r}: expected {symbol_re.pattern}")
        if len(set(upper)) != len(upper):
            raise SimulatorConfigError(f"duplicate symbols in {upper!r}")
        object.__setattr__(self, "symbols", upper)
        object.__setattr__(self, "kline_intervals", tuple(self.kline_intervals))
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if len(weights) != len(upper):
                raise SimulatorConfigError(f"weights has {len(weights)} entries for {len(upper)} symbols")
            for w in weights:
                _positive("each weight", w)
            object.__setattr__(self, "weights", weights)

        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise SimulatorConfigError(f"port must be between 0 and 65535, got {self.port!r}")
        _non_negative("rate", self.rate)
        for interval in self.kline_intervals:
            if interval not in KLINE_INTERVAL_MS:
                raise SimulatorConfigError(
                    f"unsupported kline interval {interval!r}; expected one of " + ", ".join(KLINE_INTERVAL_MS)
                )
        if len(set(self.kline_intervals)) != len(self.kline_intervals):
            raise SimulatorConfigError(f"duplicate kline intervals in {self.kline_intervals!r}")
        if not isinstance(self.kline_update_ms, int) or self.kline_update_ms < 1:
            raise SimulatorConfigError(f"kline_update_ms must be an integer >= 1, got {self.kline_update_ms!r}")
        if not isinstance(self.history, int) or self.history < 1:
            raise SimulatorConfigError(f"history must be an integer >= 1, got {self.history!r}")
        if not isinstance(self.preallocate_history, bool):
            raise SimulatorConfigError(f"preallocate_history must be true or false, got {self.preallocate_history!r}")
        _non_negative("burst_every", self.burst_every)
        _positive("burst_duration", self.burst_duration)
        _positive("burst_multiplier", self.burst_multiplier)
        if self.burst_every and self.burst_duration > self.burst_every:
            raise SimulatorConfigError("burst_duration must not exceed burst_every")
        _positive("batch_interval", self.batch_interval)
        if self.batch_interval > 1.0:
            raise SimulatorConfigError(f"batch_interval must be at most 1 s, got {self.batch_interval!r}")

        _positive("replay_speed", self.replay_speed)
        _positive("ping_interval", self.ping_interval)
        _positive("pong_timeout", self.pong_timeout)
        _positive("max_connection_age", self.max_connection_age)
        _non_negative("shutdown_notice", self.shutdown_notice)
        _positive("close_timeout", self.close_timeout)
        _positive("idle_timeout", self.idle_timeout)
        if not isinstance(self.book_checksum, bool):
            raise SimulatorConfigError(f"book_checksum must be true or false, got {self.book_checksum!r}")
        for name, limit in (
            ("max_connects_per_s", self.max_connects_per_s),
            ("max_ops_per_hour", self.max_ops_per_hour),
            ("max_incoming_per_s", self.max_incoming_per_s),
            ("max_streams_per_connection", self.max_streams_per_connection),
            ("max_send_buffer", self.max_send_buffer),
        ):
            if not isinstance(limit, int) or limit < 1:
                raise SimulatorConfigError(f"{name} must be an integer >= 1, got {limit!r}")

        _fraction("fault_malformed", self.fault_malformed)
        _fraction("fault_duplicate", self.fault_duplicate)
        _fraction("fault_out_of_order", self.fault_out_of_order)
        _non_negative("refuse_for", self.refuse_for)
        _non_negative("stall_for", self.stall_for)
        if self.close_every is not None:
            _positive("close_every", self.close_every)
        if not isinstance(self.rest_faults, str):
            raise SimulatorConfigError(
                f"rest_faults must be a schedule like 'aggTrades=429:1,503', got {self.rest_faults!r}"
            )
        parse_rest_faults(self.rest_faults)
        if not isinstance(self.depth, bool):
            raise SimulatorConfigError(f"depth must be true or false, got {self.depth!r}")
        if not isinstance(self.depth_levels, int) or not 1 <= self.depth_levels <= MAX_DEPTH:
            raise SimulatorConfigError(
                f"depth_levels must be an integer from 1 to {MAX_DEPTH}, got {self.depth_levels!r}"
            )
        self.book_config()
        if not isinstance(self.rest_weight_limit, int) or self.rest_weight_limit < 0:
            raise SimulatorConfigError(f"rest_weight_limit must be an integer >= 0, got {self.rest_weight_limit!r}")
        if not isinstance(self.depth_faults, str):
            raise SimulatorConfigError(
                f"depth_faults must be a text like 'drop@BTCUSDT,stale:3', got {self.depth_faults!r}"
            )
        faults = parse_depth_faults(self.depth_faults)
        if faults and (not self.depth or self.replay is not None):
            raise SimulatorConfigError("depth_faults need the synthetic market's depth books (depth on, no replay)")
        for fault in faults:
            if fault.symbol is not None and fault.symbol not in upper:
                raise SimulatorConfigError(f"depth fault {fault}: {fault.symbol} is not one of the symbols")
        if self.replay_rest is not None and self.venue == "okx":
            raise SimulatorConfigError("replay_rest holds Binance depth snapshots: the okx venue takes none")
        if self.replay_rest is not None and self.replay is None:
            raise SimulatorConfigError("replay_rest answers depth requests in replay: it needs replay")

    def book_config(self) -> BookConfig:
        """The depth books' settings: 100 ms batches, aggregated every 1000 ms for ``@depth``."""
        return BookConfig(
            interval_ms=100, slow_interval_ms=1000, depth=self.depth_levels, changes_per_batch=self.depth_changes,
            futures=self.venue in ("binance_usdm", "binance_coinm"),
        )
