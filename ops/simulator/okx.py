# size: the OKX profile's one I/O adapter: WebSocket, REST and the control endpoint on one port, a thin layer
#   over the pure modules (okx_protocol, market, book), as server.py is for the Binance family.
"""An OKX v5 public market-data venue (``wss://ws.okx.com:8443/ws/v5/public``) on one port: the ``okx`` profile.

``market simulate --venue okx``; in code ``OkxSimulator(SimulatorConfig(venue="okx", symbols=("BTC-USDT",)))``
(``run_simulator`` picks it by the config's venue).  Instruments are OKX ``instId`` s (``BTC-USDT``,
``BTC-USDT-SWAP``, ``BTC-USD-220527``); the synthetic market and its books are the Binance profile's
(:class:`~.market.SyntheticMarket`, :class:`~.book.DepthBooks`), sent in OKX's shapes (:mod:`.okx_protocol`).

WebSocket ``/ws/v5/public`` (any other path: HTTP 404)
    ``{"op": "subscribe" | "unsubscribe", "args": [{"channel", "instId"}], "id"}`` answered per arg with
    ``{"event": "subscribe", "arg", "id", "connId"}``, or ``{"event": "error", "code", "msg"}`` (60012 invalid
    request, 60018 unknown channel or instId: nothing of that request is subscribed, 60014 past
    ``max_ops_per_hour`` operations in the last hour).  The text ``ping`` is answered ``pong``.  A connection
    nothing was pushed to for ``idle_timeout`` seconds (OKX: 30; a ``pong`` counts) is closed (4004).  More
    than ``max_connects_per_s`` new connections a second from one address: HTTP 429.  Channels:

    - ``trades``: one trade a push, ``tradeId`` contiguous per instrument, ``count`` ``"1"``;
    - ``bbo-tbt``: every change of the touch, ``seqId`` the ticker's update id;
    - ``tickers``: an instrument's last trade, touch and day figures, at most every 100 ms it changed;
    - ``books``: on subscribe a 400-level ``snapshot`` (``prevSeqId`` -1), then an ``update`` every 100 ms that
      changed something, ``seqId`` its last change and ``prevSeqId`` the ``seqId`` before it (a ``drop`` depth
      fault removes an update: the next one's ``prevSeqId`` is then not the last ``seqId`` received);
      ``checksum`` 0 as OKX sends since June 2026, or with ``book_checksum`` OKX's crc32 of the top 25 levels
      (:func:`ingestor.okx.okx_checksum`), as it sent before.  Needs ``depth`` (else the channel stays quiet).

REST (GET, same port)
    ``/api/v5/market/history-trades`` (``instId``, ``type=1``, ``after``/``before`` by ``tradeId``, ``limit``
    up to 100; :func:`~.okx_protocol.history_trades`) over the trades generated; ``/api/v5/market/books``
    (``instId``, ``sz`` up to 400); ``/api/v5/public/instruments`` (``instType``); ``/api/v5/public/time``.
    Each takes ``rest_faults`` like the Binance profile (by full path, e.g.
    ``/api/v5/market/history-trades=429,close``).

Faults (the control endpoint ``/control/...`` and :class:`~ops.simulator.SimulatorConfig`, as the Binance
profile): ``close_all`` (close 1001, or dropped), ``stall``, ``refuse`` (503), wire ``faults`` (malformed,
duplicate, out of order), ``depth_faults`` (``drop``), ``rate``, ``clear``; ``close_every``; the planned
close at ``max_connection_age`` and at shutdown is preceded by OKX's notice ``{"event": "notice", "code":
"64008"}``.  ``hostile`` is the Binance profile's only.

Replay: ``replay=FILE`` plays an OKX capture (``{"recv_ts", "frame"}`` lines, frames as OKX sent them, e.g.
``okx-2022-05-13.jsonl``) at its pace, unchanged, to the connections subscribed to each frame's
``channel:instId``, starting when the first connection subscribes; the capture's own ``event`` frames (its
subscribe acknowledgements) are not played.  Its instruments and channels are the ones the venue lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from ingestor.okx import okx_checksum

from .book import DepthBooks, SymbolBook, parse_units
from .config import SimulatorConfig
from .control import CONTROL_PREFIX, ControlCommand, parse_control
from .depth_faults import DepthFault, apply_depth_faults, parse_depth_faults
from .errors import CaptureError, SimulatorConfigError
from .market import MarketEvent, SyntheticMarket, scheduled_ticks
from .okx_protocol import (
    CHANNELS,
    PATH,
    ConnectLimiter,
    OpsLimiter,
    bbo_push,
    books_answer,
    books_push,
    handle_request,
    history_trades,
    instruments_answer,
    level,
    notice_event,
    okx_decimal,
    ticker_push,
    trade_push,
)
from .protocol import FaultInjector, FaultRates, text_frame
from .replay import ReplayFrame, frames_due
from .rest import RestFault, RestFaults, fault_response, parse_rest_faults
from .wire import SimulatorStats, json_response

__all__ = ["OkxSimulator", "load_okx_capture"]

log = logging.getLogger("market.simulator.okx")

CLOSE_GOING_AWAY: Final = 1001
CLOSE_IDLE: Final = 4004
_HISTORY_PATH: Final = "/api/v5/market/history-trades"
_BOOKS_PATH: Final = "/api/v5/market/books"
_TIME_PATH: Final = "/api/v5/public/time"
_INSTRUMENTS_PATH: Final = "/api/v5/public/instruments"
_REST_PATHS: Final = (_HISTORY_PATH, _BOOKS_PATH, _TIME_PATH, _INSTRUMENTS_PATH)
_TICKER_EVERY_MS: Final = 100
_SNAPSHOT_LEVELS: Final = 400
_MAX_CATCH_UP: Final = 0.25

# (stream "channel:instId", payload)
_Item = tuple[str, bytes]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def load_okx_capture(path: str | Path) -> list[ReplayFrame]:
    """An OKX capture's pushes (its ``event`` frames left out), each keyed ``channel:instId``; CaptureError on
    a line that is not a capture record of OKX frames."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise CaptureError(f"cannot read capture {str(path)!r}: {exc.strerror or exc}") from None
    frames: list[ReplayFrame] = []
    first: float | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            recv_ts, text = float(record["recv_ts"]), record["frame"]
            frame = orjson.loads(text)
            if "event" in frame:
                continue
            arg = frame["arg"]
            stream = f"{arg['channel']}:{arg['instId']}"
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CaptureError(f"{path}:{number}: not a capture record of OKX frames ({exc})") from None
        if first is None:
            first = recv_ts
        offset = max(0.0, recv_ts - first, frames[-1].offset if frames else 0.0)
        raw = text.encode()
        frames.append(ReplayFrame(offset, stream, raw, raw))
    if not frames:
        raise CaptureError(f"capture {str(path)!r} holds no OKX pushes")
    return frames


class _Conn:
    """One WebSocket connection: its streams, operations, pending output, and who asked to close it."""

    __slots__ = ("abort", "close_code", "close_reason", "closing", "conn_id", "last_pushed", "ops", "out", "subs",
                 "ws")

    def __init__(self, ws: ServerConnection, conn_id: str, ops: OpsLimiter, now: float) -> None:
        self.ws = ws
        self.conn_id = conn_id
        self.ops = ops
        self.subs: set[str] = set()
        self.out: list[bytes] = []
        self.closing = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.abort = False
        self.last_pushed = now

    def request_close(self, code: int, reason: str, *, abort: bool = False) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.abort = self.abort or abort
        self.closing.set()


class OkxSimulator:
    """An OKX v5 public venue on one port; use as ``async with OkxSimulator(config) as sim:`` (module doc)."""

    def __init__(self, config: SimulatorConfig, *, clock_ms: Callable[[], int] | None = None) -> None:
        if config.venue != "okx":
            raise SimulatorConfigError(f"OkxSimulator serves the okx venue, not {config.venue!r}")
        self.config = cfg = config
        self._clock_ms = clock_ms if clock_ms is not None else _wall_ms
        self._frames: list[ReplayFrame] | None = None
        instruments = cfg.symbols
        if cfg.replay is not None:
            self._frames = load_okx_capture(cfg.replay)
            instruments = tuple(dict.fromkeys(f.stream.partition(":")[2] for f in self._frames))
        self.instruments: tuple[str, ...] = instruments
        id_base = cfg.id_base if cfg.id_base is not None else self._clock_ms() * 1000
        self.market = SyntheticMarket(
            instruments, seed=cfg.seed, kline_intervals=(), history=cfg.history,
            preallocate=cfg.preallocate_history, weights=cfg.weights if cfg.replay is None else None,
            id_base=id_base,
        )  # fmt: skip
        #: the synthetic market's books (None in replay or with ``depth`` off); read, never drive them
        self.depth: DepthBooks | None = None
        if cfg.replay is None and cfg.depth:
            book_config = replace(cfg.book_config(), slow_interval_ms=0)
            self.depth = DepthBooks.for_market(self.market, seed=cfg.seed, config=book_config, id_base=id_base)
            self.set_depth_faults(parse_depth_faults(cfg.depth_faults))
        self._rest_faults = RestFaults()
        for path, faults in parse_rest_faults(cfg.rest_faults).items():
            self.set_rest_faults(path, faults)
        self._faults = FaultInjector[_Item](
            random.Random(f"faults:{cfg.seed}"),
            stream_of=lambda item: item[0],
            corrupt=lambda item: (item[0], item[1][:-1]),
            rates=FaultRates(cfg.fault_malformed, cfg.fault_duplicate, cfg.fault_out_of_order),
        )
        self._connects = ConnectLimiter(cfg.max_connects_per_s)
        self._conn_ids = itertools.count(1)
        self._conns: set[_Conn] = set()
        self._subs: dict[str, set[_Conn]] = {}
        self._subscribed = asyncio.Event()
        self._unstalled = asyncio.Event()
        self._unstalled.set()
        self._stall_until = 0.0
        self._stall_epoch = 0
        self._stall_handle: asyncio.TimerHandle | None = None
        self._refuse_until = 0.0
        self._server: Server | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._state = "unopened"
        self._port = 0
        self._frames_sent = self._bytes_sent = self._replayed = 0
        self._pings = self._idle_closes = self._connects_refused = self._ops_refused = self._slow_closes = 0
        self._rate = float(cfg.rate)
        self._rate_epoch = 0
        self._book_ms: int | None = None  # the last 100 ms boundary the books were flushed at
        # tickers: per instrument its fields, whether it changed since its last push, and when that was
        self._tickers: dict[str, dict[str, str]] = {}
        self._ticker_dirty: set[str] = set()
        self._ticker_sent_ms: dict[str, int] = {}

    # -- lifecycle --

    async def __aenter__(self) -> Self:
        if self._state != "unopened":
            raise RuntimeError(f"a simulator runs once; this one is {self._state}")
        self._state = "opening"
        cfg = self.config
        await self._stack.__aenter__()
        try:
            self._server = await serve(
                self._handle, cfg.host, cfg.port, process_request=self._process_request, compression=None,
                ping_interval=None, ping_timeout=None, close_timeout=cfg.close_timeout,
                write_limit=2 * cfg.max_send_buffer, logger=logging.getLogger("market.simulator.ws"),
            )  # fmt: skip
            self._stack.push_async_callback(self._stop_server)
            self._port = self._server.sockets[0].getsockname()[1]
            group = await self._stack.enter_async_context(asyncio.TaskGroup())
            if self._frames is not None:
                self._tasks.append(group.create_task(self._replay(self._frames)))
            else:
                self._tasks.append(group.create_task(self._generate()))
            if cfg.close_every is not None:
                self._tasks.append(group.create_task(self._close_periodically(cfg.close_every)))
            if cfg.refuse_for > 0:
                self.refuse(cfg.refuse_for)
            if cfg.stall_for > 0:
                self.stall(cfg.stall_for)
        except BaseException:
            await self._stack.aclose()
            self._state = "closed"
            raise
        self._state = "open"
        log.info("simulator listening", extra={"fields": {"ws_url": self.ws_url, "venue": "okx"}})
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._state = "closing"
        for task in self._tasks:
            task.cancel()
        if self._stall_handle is not None:
            self._stall_handle.cancel()
        self._end_stall()
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._state = "closed"

    async def _stop_server(self) -> None:
        """Planned close: every connection gets the 64008 notice, then close 1001."""
        assert self._server is not None
        for conn in list(self._conns):
            self._send_now(conn, notice_event(conn.conn_id))
            conn.request_close(CLOSE_GOING_AWAY, "server shutdown")
        self._server.close()
        await self._server.wait_closed()

    async def serve_forever(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"the simulator is {self._state}; use it as an async context manager")
        await asyncio.Event().wait()

    @property
    def state(self) -> str:
        return self._state

    @property
    def port(self) -> int:
        return self._port

    @property
    def _host(self) -> str:
        host = self.config.host
        return f"[{host}]" if ":" in host else host

    @property
    def ws_url(self) -> str:
        """The WebSocket base, like ``wss://ws.okx.com:8443``; clients add ``/ws/v5/public``."""
        return f"ws://{self._host}:{self._port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    # -- statistics and faults --

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    @property
    def stalled(self) -> bool:
        return not self._unstalled.is_set()

    @property
    def rest_faults(self) -> RestFaults:
        return self._rest_faults

    def stats(self) -> SimulatorStats:
        return SimulatorStats(
            connections=len(self._conns), frames_sent=self._frames_sent, bytes_sent=self._bytes_sent,
            ticks_generated=self.market.counts(), ticks_total=self.market.generated, replayed_frames=self._replayed,
            pongs_received=0, slow_consumer_closes=self._slow_closes, rate_limit_closes=0,
        )  # fmt: skip

    def fault_state(self) -> dict[str, Any]:
        now = self._now()
        return {
            "venue": "okx",
            "stalled": self.stalled,
            "stall_remaining": max(0.0, self._stall_until - now) if self.stalled else 0.0,
            "refusing": now < self._refuse_until,
            "refuse_remaining": max(0.0, self._refuse_until - now),
            "rates": asdict(self._faults.rates),
            "rest_faults": self._rest_faults.state(),
            "depth": None if self.depth is None else self.depth.state(),
            "pings_answered": self._pings,
            "idle_closes": self._idle_closes,
            "connects_refused": self._connects_refused,
            "ops_refused": self._ops_refused,
            "stats": asdict(self.stats()),
        }

    def close_all(self, *, abort: bool = False) -> int:
        conns = list(self._conns)
        for conn in conns:
            conn.request_close(CLOSE_GOING_AWAY, "closed by fault injection", abort=abort)
        log.info("fault close_all", extra={"fields": {"connections": len(conns), "abort": abort}})
        return len(conns)

    def stall(self, seconds: float) -> None:
        """For ``seconds`` send nothing and read nothing (so answer no ``ping``); sockets stay open."""
        if not seconds > 0:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if until <= self._stall_until and self.stalled:
            return
        self._stall_until = until
        if not self.stalled:
            self._stall_epoch += 1
            self._unstalled.clear()
            for conn in self._conns:
                conn.ws.transport.pause_reading()
        if self._stall_handle is not None:
            self._stall_handle.cancel()
        self._stall_handle = loop.call_at(until, self._end_stall)
        log.info("fault stall", extra={"fields": {"seconds": seconds}})

    def _end_stall(self) -> None:
        self._stall_handle = None
        self._stall_until = 0.0
        if self.stalled:
            self._unstalled.set()
            now = self._now() if self._state in ("open", "closing") else 0.0
            for conn in self._conns:
                conn.last_pushed = max(conn.last_pushed, now)  # the stall, not the venue's rule, kept it quiet
                if conn.ws.state is State.OPEN:
                    conn.ws.transport.resume_reading()

    def refuse(self, seconds: float) -> None:
        self._refuse_until = max(self._refuse_until, self._now() + max(0.0, seconds))
        log.info("fault refuse", extra={"fields": {"seconds": seconds}})

    def set_fault_rates(
        self, *, malformed: float | None = None, duplicate: float | None = None, out_of_order: float | None = None
    ) -> FaultRates:
        current = self._faults.rates
        try:
            self._faults.rates = FaultRates(
                current.malformed if malformed is None else malformed,
                current.duplicate if duplicate is None else duplicate,
                current.out_of_order if out_of_order is None else out_of_order,
            )
        except ValueError as exc:
            raise SimulatorConfigError(str(exc)) from None
        return self._faults.rates

    def set_rest_faults(self, path: str, faults: Any) -> None:
        faults = tuple(faults)
        if path != "*" and path not in _REST_PATHS:
            raise SimulatorConfigError(f"no REST endpoint {path!r} to schedule faults on")
        self._rest_faults.schedule(path, faults)

    def set_depth_faults(self, faults: Any) -> None:
        if self.depth is None:
            raise SimulatorConfigError("no depth books to fault: the simulator replays a capture or has depth off")
        faults = tuple(faults)
        if any(not isinstance(f, DepthFault) or f.kind != "drop" for f in faults):
            # a stale snapshot is a REST answer of Binance's procedure; OKX's book starts from the channel's own
            raise SimulatorConfigError("the okx profile's books take the drop fault only")
        if not faults:
            return
        apply_depth_faults(self.depth, faults)
        log.info("fault depth", extra={"fields": {"faults": ",".join(map(str, faults))}})

    def clear_faults(self) -> None:
        if self._stall_handle is not None:
            self._stall_handle.cancel()
        self._end_stall()
        self._refuse_until = 0.0
        self._faults.rates = FaultRates()
        self._rest_faults.clear()
        if self.depth is not None:
            self.depth.clear_faults()

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        if not (math.isfinite(rate) and rate >= 0):
            raise SimulatorConfigError(f"rate must be a number >= 0, got {rate!r}")
        self._rate = float(rate)
        self._rate_epoch += 1

    def _apply_control(self, command: ControlCommand) -> None:
        action = command.action
        if action == "close_all":
            self.close_all(abort=command.abort)
        elif action == "stall":
            self.stall(command.seconds)
        elif action == "refuse":
            self.refuse(command.seconds)
        elif action == "faults":
            self.set_fault_rates(**command.rates)
        elif action == "clear":
            self.clear_faults()
        elif action == "rate":
            self.set_rate(command.seconds)
        elif action == "rest_faults":
            self.set_rest_faults(command.path, command.rest_faults)
        elif action == "depth_faults":
            self.set_depth_faults(command.depth_faults)
        elif action == "hostile":
            raise SimulatorConfigError("hostile frames are the Binance profiles' only")

    # -- HTTP --

    def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | Coroutine[Any, Any, Response] | None:
        parts = urlsplit(request.path)
        path = parts.path
        if path.startswith(CONTROL_PREFIX):
            command = parse_control(path, parse_qs(parts.query))
            if isinstance(command, str):
                return json_response(400, orjson.dumps({"error": command}))
            try:
                self._apply_control(command)
            except SimulatorConfigError as exc:
                return json_response(400, orjson.dumps({"error": str(exc)}))
            return json_response(200, orjson.dumps(self.fault_state()))
        if path in _REST_PATHS:
            return self._answer_rest(connection, path, parse_qs(parts.query, keep_blank_values=True))
        if path != PATH:
            return json_response(404, orjson.dumps({"code": "404", "msg": "Not Found"}))
        now = self._now()
        if now < self._refuse_until:
            return json_response(503, orjson.dumps({"code": "50001", "msg": "Service temporarily unavailable"}))
        address = connection.remote_address
        client = str(address[0]) if isinstance(address, tuple) and address else "?"
        if not self._connects.allow(client, now):
            self._connects_refused += 1
            return json_response(429, orjson.dumps({"code": "50011", "msg": "Too Many Requests"}))
        return None

    def _answer_rest(self, connection: ServerConnection, path: str, query: dict[str, list[str]]) -> Response:
        fault: RestFault | None = self._rest_faults.take(path)
        if fault is not None:
            if fault.closes:
                connection.transport.abort()
                return json_response(503, b"")
            answer = fault_response(fault, self._clock_ms())
            return json_response(answer.status, answer.body, answer.headers)
        now_ms = self._clock_ms()
        if path == _TIME_PATH:
            body = orjson.dumps({"code": "0", "msg": "", "data": [{"ts": str(now_ms)}]})
            return json_response(200, body)
        if path == _INSTRUMENTS_PATH:
            specs = {i: (self.market.spec(i).tick_size, self.market.spec(i).step_size) for i in self.instruments}
            status, body = instruments_answer(query, specs)
        elif path == _HISTORY_PATH:
            status, body = history_trades(query, self.instruments, self._trade_rows)
        else:
            status, body = books_answer(query, self.instruments, self._book_levels, now_ms)
        return json_response(status, body)

    def _trade_rows(self, inst: str, lo: int | None, hi: int | None) -> Any:
        history = self.market.history(inst)
        if lo is None or hi is None:
            return history.trade_id_range
        return history.trades(from_id=lo, limit=hi - lo)

    def _book_levels(self, inst: str, n: int) -> tuple[list[list[str]], list[list[str]], int] | None:
        if self.depth is None or inst not in self.depth.symbols:
            return None
        return _levels(self.depth.book(inst), n)

    # -- connections --

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Conn(ws, f"{next(self._conn_ids):08x}", OpsLimiter(self.config.max_ops_per_hour), self._now())
        self._conns.add(conn)
        if self.stalled:
            ws.transport.pause_reading()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._read(conn)),
                    group.create_task(self._idle_watch(conn)),
                    group.create_task(self._age_limit(conn)),
                ]
                await conn.closing.wait()
                for task in tasks:
                    task.cancel()
            if conn.abort:
                ws.transport.abort()
            else:
                await ws.close(conn.close_code or 1000, conn.close_reason)
        finally:
            self._conns.discard(conn)
            self._unsubscribe(conn, tuple(conn.subs))
            conn.out.clear()

    def _unsubscribe(self, conn: _Conn, streams: tuple[str, ...]) -> None:
        for stream in streams:
            conn.subs.discard(stream)
            subscribers = self._subs.get(stream)
            if subscribers is not None:
                subscribers.discard(conn)
                if not subscribers:
                    del self._subs[stream]

    async def _read(self, conn: _Conn) -> None:
        try:
            async for message in conn.ws:
                await self._unstalled.wait()
                now = self._now()
                if message == "ping":
                    self._pings += 1
                    self._send_now(conn, b"pong")
                    continue
                answer = handle_request(
                    message, instruments=self.instruments, channels=CHANNELS, subscribed=conn.subs,
                    conn_id=conn.conn_id, ops=conn.ops, now=now,
                )  # fmt: skip
                if answer.replies and b'"60014"' in answer.replies[0]:
                    self._ops_refused += 1
                self._unsubscribe(conn, answer.removed)
                for reply in answer.replies:
                    conn.out.append(text_frame(reply))
                self._flush(conn)
                for stream in answer.added:
                    conn.subs.add(stream)
                    self._subs.setdefault(stream, set()).add(conn)
                    if stream.startswith("books:") and self._frames is None:
                        self._send_snapshot(conn, stream.partition(":")[2])
                if answer.added:
                    self._subscribed.set()
        except ConnectionClosed:
            pass
        conn.request_close(1000, "")

    async def _idle_watch(self, conn: _Conn) -> None:
        """Close a connection nothing was pushed to for ``idle_timeout`` seconds (not counting a stall): OKX breaks
        a connection "if the subscription is not established or data has not been pushed for more than 30
        seconds", so a client's text ``ping`` keeps a quiet connection open by the ``pong`` it is answered with."""
        timeout = self.config.idle_timeout
        while True:
            await asyncio.sleep(max(0.0, conn.last_pushed + timeout - self._now()))
            await self._unstalled.wait()
            if self._now() - conn.last_pushed >= timeout:
                self._idle_closes += 1
                conn.request_close(CLOSE_IDLE, f"No data received in {timeout:g}s.")
                return

    async def _age_limit(self, conn: _Conn) -> None:
        cfg = self.config
        notice_at = max(0.0, cfg.max_connection_age - cfg.shutdown_notice)
        await asyncio.sleep(notice_at)
        await self._unstalled.wait()
        self._send_now(conn, notice_event(conn.conn_id))
        await asyncio.sleep(cfg.max_connection_age - notice_at)
        conn.request_close(1000, "connection age limit")

    async def _close_periodically(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.close_all()

    # -- output --

    def _send_now(self, conn: _Conn, payload: bytes) -> None:
        conn.out.append(text_frame(payload))
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        out = conn.out
        ws = conn.ws
        if ws.state is not State.OPEN or conn.close_code is not None or not out:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        self._frames_sent += len(out)
        self._bytes_sent += len(data)
        out.clear()
        ws.transport.write(data)
        conn.last_pushed = self._now()
        if ws.transport.get_write_buffer_size() > self.config.max_send_buffer:
            self._slow_closes += 1
            self._unsubscribe(conn, tuple(conn.subs))
            conn.request_close(1008, "slow consumer")

    def _send_snapshot(self, conn: _Conn, inst: str) -> None:
        if self.depth is None or self.stalled:
            return
        bids, asks, seq = _levels(self.depth.book(inst), _SNAPSHOT_LEVELS)
        checksum = okx_checksum(bids, asks) if self.config.book_checksum else 0
        self._send_now(conn, books_push(inst, "snapshot", bids, asks, self._clock_ms(), seq, -1, checksum))

    def _deliver(self, items: list[_Item]) -> None:
        if self._faults.active:
            items = self._faults.apply(items, self._now())
        subs = self._subs
        touched: list[_Conn] = []
        for stream, payload in items:
            conns = subs.get(stream)
            if not conns:
                continue
            frame = text_frame(payload)
            for conn in conns:
                if not conn.out:
                    touched.append(conn)
                conn.out.append(frame)
        for conn in touched:
            self._flush(conn)

    def _market_items(self, events: list[MarketEvent], now_ms: int) -> list[_Item]:
        subs = self._subs
        items: list[_Item] = []
        for kind, _, payload in events:
            inst = payload["s"]
            if kind == "trade":
                stream = "trades:" + inst
                if stream in subs:
                    items.append((stream, trade_push(inst, payload)))
                self._ticker_trade(inst, payload)
            elif kind == "bookTicker":
                stream = "bbo-tbt:" + inst
                if stream in subs:
                    items.append((stream, bbo_push(inst, payload, now_ms)))
                self._ticker_touch(inst, payload)
        return items

    def _ticker_trade(self, inst: str, payload: dict[str, Any]) -> None:
        ticker = self._tickers.get(inst)
        if ticker is None:
            return  # no touch yet
        px, sz = okx_decimal(parse_units(payload["p"])), okx_decimal(parse_units(payload["q"]))
        price = parse_units(payload["p"])
        ticker["last"], ticker["lastSz"] = px, sz
        if price > parse_units(ticker["high24h"]):
            ticker["high24h"] = px
        if price < parse_units(ticker["low24h"]):
            ticker["low24h"] = px
        ticker["vol24h"] = okx_decimal(parse_units(ticker["vol24h"]) + parse_units(payload["q"]))
        self._ticker_dirty.add(inst)

    def _ticker_touch(self, inst: str, payload: dict[str, Any]) -> None:
        bid, bid_sz = okx_decimal(parse_units(payload["b"])), okx_decimal(parse_units(payload["B"]))
        ask, ask_sz = okx_decimal(parse_units(payload["a"])), okx_decimal(parse_units(payload["A"]))
        ticker = self._tickers.get(inst)
        if ticker is None:
            ticker = self._tickers[inst] = {
                "last": bid, "lastSz": "0", "open24h": bid, "high24h": bid, "low24h": bid, "vol24h": "0",
            }  # fmt: skip
        ticker.update(askPx=ask, askSz=ask_sz, bidPx=bid, bidSz=bid_sz)
        self._ticker_dirty.add(inst)

    def _ticker_items(self, now_ms: int) -> list[_Item]:
        """``tickers`` pushes: an instrument that changed, at most every 100 ms."""
        items: list[_Item] = []
        for inst in list(self._ticker_dirty):
            if now_ms - self._ticker_sent_ms.get(inst, 0) < _TICKER_EVERY_MS:
                continue
            self._ticker_dirty.discard(inst)
            stream = "tickers:" + inst
            if stream in self._subs:
                self._ticker_sent_ms[inst] = now_ms
                items.append((stream, ticker_push(inst, self._tickers[inst], now_ms)))
        return items

    def _book_items(self, books: DepthBooks, now_ms: int) -> list[_Item]:
        """Flush the books one 100 ms boundary at a time (so a checksum is of the book right after its update)."""
        interval = books.config.interval_ms
        if self._book_ms is None:
            books.advance(now_ms)  # sets the books' clock
            self._book_ms = now_ms - now_ms % interval
            return []
        boundaries = range(self._book_ms + interval, now_ms + 1, interval)
        if len(boundaries) > books.config.max_catch_up:
            boundaries = boundaries[-books.config.max_catch_up:]
        items: list[_Item] = []
        checksum_on = self.config.book_checksum
        for boundary in boundaries:
            for _, _, payload in books.advance(boundary):
                inst = payload["s"]
                stream = "books:" + inst
                if stream not in self._subs:
                    continue
                checksum = 0
                if checksum_on:
                    bids, asks, _ = _levels(books.book(inst), 25)
                    checksum = okx_checksum(bids, asks)
                bids_l = [level(p, q) for p, q in payload["b"]]
                asks_l = [level(p, q) for p, q in payload["a"]]
                items.append((stream, books_push(
                    inst, "update", bids_l, asks_l, payload["E"], payload["u"], payload["U"] - 1, checksum,
                )))  # fmt: skip
            self._book_ms = boundary
        return items

    # -- sources --

    async def _generate(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        bursts = {
            "burst_every": cfg.burst_every, "burst_duration": cfg.burst_duration,
            "burst_multiplier": cfg.burst_multiplier,
        }  # fmt: skip
        multiplier = max(1.0, cfg.burst_multiplier if cfg.burst_every > 0 else 1.0)
        books = self.depth
        epoch = -1
        start = next_wake = loop.time()
        emitted = max_batch = 0
        while True:
            if epoch != self._rate_epoch:
                epoch = self._rate_epoch
                start = loop.time()
                emitted = 0
                max_batch = max(1, int(self._rate * multiplier * _MAX_CATCH_UP))
            next_wake += cfg.batch_interval
            delay = next_wake - loop.time()
            if delay < -4 * cfg.batch_interval:
                next_wake = loop.time()
            await asyncio.sleep(max(0.0, delay))
            due = scheduled_ticks(loop.time() - start, self._rate, **bursts)
            n = due - emitted
            now_ms = self._clock_ms()
            items: list[_Item] = []
            if n > 0:
                if n > max_batch:
                    emitted = due - max_batch
                    n = max_batch
                events = self.market.step(n, now_ms)
                emitted += n
                if books is not None:
                    books.observe(events)
                items = self._market_items(events, now_ms)
            if books is not None:
                items += self._book_items(books, now_ms)
            if self._ticker_dirty:
                items += self._ticker_items(now_ms)
            if items and not self.stalled:
                self._deliver(items)

    async def _replay(self, frames: list[ReplayFrame]) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        await self._subscribed.wait()
        while True:
            start = loop.time()
            index = 0
            while index < len(frames):
                due = frames_due(frames, index, loop.time() - start, cfg.replay_speed)
                if due == index:
                    wait = start + frames[index].offset / cfg.replay_speed - loop.time()
                    await asyncio.sleep(max(0.0, wait) + 0.0001)
                    continue
                if self._subs and not self.stalled:
                    subs = self._subs
                    self._deliver([(f.stream, f.raw) for f in frames[index:due] if f.stream in subs])
                self._replayed += due - index
                index = due
            if not cfg.replay_loop:
                return
            await asyncio.sleep(cfg.batch_interval)


def _levels(book: SymbolBook, n: int) -> tuple[list[list[str]], list[list[str]], int]:
    """The best ``n`` levels a side of the book as last flushed, in OKX's form, and its ``seqId``."""
    tick = book.tick_size
    bids, asks = book.bids, book.asks

    def side(prices: list[int], sizes: dict[int, int]) -> list[list[str]]:
        return [[okx_decimal(p * tick), okx_decimal(sizes[p]), "0", "1"] for p in prices]

    return side(heapq.nlargest(n, bids), bids), side(heapq.nsmallest(n, asks), asks), book.prev_u
