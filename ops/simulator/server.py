# size: the simulator's one I/O adapter: WebSocket, REST and the control endpoint on one port, each a thin layer over
#   the pure modules.
"""The simulator's server: WebSocket streams, REST and the control endpoint on one port.

A thin adapter around the pure parts (:mod:`.market`, :mod:`.book`, :mod:`.protocol`, :mod:`.rest`,
:mod:`.weights`, :mod:`.control`, :mod:`.replay`, :mod:`.book_replay`). One websockets server
answers plain HTTP GETs (REST and control) from its ``process_request`` hook and upgrades ``/ws...``
and ``/stream...`` to WebSocket.

Data path: a generator task wakes every ``batch_interval`` on the loop's monotonic clock, asks the
market for the number of ticks the rate implies since start (so the long-run rate is exact and never
exceeded), hands the market's events to the order books (:class:`~.book.DepthBooks`: diffs batched
per 100 ms boundary and aggregated per second), serializes each event once with orjson (only if
someone subscribes to its stream), and writes one buffer per connection per batch straight to the
transport as ready-made WebSocket text frames: no ``await`` per frame. Compression is off, so a
frame is a 2-10 byte header and the payload. A connection whose unsent bytes exceed
``max_send_buffer`` is closed (1008, slow consumer).

Each connection is owned by its handler task, which runs a reader (requests, incoming rate limit),
a keepalive (ping every ``ping_interval``, close 1011 without a pong within ``pong_timeout``) and an
age limit (``serverShutdown`` event ``shutdown_notice`` seconds before closing at
``max_connection_age``); whoever wants the connection closed asks its handler to do it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict
from operator import itemgetter
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from consumer_sdk.core.heap import settle_heap

from .book import FUTURES_DEPTH_LIMITS, SPOT_DEPTH_LIMITS, DepthBooks, parse_units
from .book_replay import DepthReplay, capture_start, load_depth_capture
from .config import SimulatorConfig
from .control import CONTROL_PREFIX, ControlCommand, parse_control
from .depth_faults import DepthFault, apply_depth_faults, parse_depth_faults
from .errors import SimulatorConfigError
from .hostile import HOSTILE_KINDS, HostileRequest, hostile_frames, ping_flood
from .market import MarketEvent, SyntheticMarket, format_decimal, scheduled_ticks
from .okx import OkxSimulator
from .profiles import BinanceProfile, Route, binance_profile
from .protocol import (
    FaultInjector,
    FaultRates,
    IncomingRateLimiter,
    RequestOutcome,
    StreamCatalog,
    StreamSubscriptions,
    WsTarget,
    combined_prefix,
    parse_ws_path,
    server_shutdown_event,
    text_frame,
)
from .replay import ReplayFrame, capture_symbols, frames_due, load_capture
from .rest import (
    ALL_PATHS,
    RestApi,
    RestFault,
    RestFaults,
    RestResponse,
    StreamedAnswer,
    fault_response,
    parse_rest_faults,
    write_streamed,
)
from .weights import DEPTH_PATH, USED_WEIGHT_HEADER, WeightBudget, request_weight
from .wire import SimulatorStats, json_response

__all__ = ["Simulator", "SimulatorStats", "run_simulator"]

log = logging.getLogger("market.simulator")

# (stream, raw payload, combined payload or None to build from the raw one)
_Item = tuple[str, bytes, bytes | None]

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CLOSE_INTERNAL: Final = 1011
_MAX_CATCH_UP: Final = 0.25  # seconds of ticks one batch may carry after the loop fell behind
_stream_of: Final = itemgetter(0)


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _corrupt(item: _Item) -> _Item:
    stream, raw, combined = item
    return stream, raw[:-1], None if combined is None else combined[:-1]


class _Connection:
    """One WebSocket connection: its subscriptions, pending output, and who asked to close it."""

    __slots__ = ("abort", "close_code", "close_reason", "closing", "limiter", "out", "route", "subs", "ws")

    def __init__(
        self, ws: ServerConnection, subs: StreamSubscriptions, limiter: IncomingRateLimiter, route: Route = "all"
    ) -> None:
        self.ws = ws
        self.route: Route = route
        self.subs = subs
        self.limiter = limiter
        self.out: list[bytes] = []
        self.closing = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.abort = False

    def request_close(self, code: int, reason: str, *, abort: bool = False) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.abort = self.abort or abort
        self.closing.set()


class Simulator:
    """A Binance-compatible venue on one port; use as ``async with Simulator(config) as sim:``.

    ``clock_ms`` gives event and server times in epoch milliseconds (default: the wall clock);
    pacing always uses the event loop's monotonic clock.
    """

    def __init__(self, config: SimulatorConfig | None = None, *, clock_ms: Callable[[], int] | None = None):
        self.config = cfg = config if config is not None else SimulatorConfig()
        if cfg.venue == "okx":
            raise SimulatorConfigError("the okx venue runs on ops.simulator.okx.OkxSimulator (see run_simulator)")
        #: the venue of the Binance family stood in for (:mod:`.profiles`)
        self.profile: BinanceProfile = binance_profile(cfg.venue)
        depth_limits = FUTURES_DEPTH_LIMITS if self.profile.futures else SPOT_DEPTH_LIMITS
        self._depth_limits = depth_limits
        self._clock_ms = clock_ms if clock_ms is not None else _wall_ms
        self._marks: dict[str, tuple[str, str]] = {}  # futures: symbol -> last bid and ask, for the mark price
        self._market_ms = 0
        self._next_mark_s = 0
        self._frames: list[ReplayFrame] | None = None
        symbols = cfg.symbols
        if cfg.replay is not None:
            self._frames = load_capture(cfg.replay)
            symbols = capture_symbols(self._frames)
        id_base = cfg.id_base if cfg.id_base is not None else self._clock_ms() * 1000
        self.market = SyntheticMarket(
            symbols,
            seed=cfg.seed,
            kline_intervals=cfg.kline_intervals,
            history=cfg.history,
            preallocate=cfg.preallocate_history,
            weights=cfg.weights if cfg.replay is None else None,
            kline_update_ms=cfg.kline_update_ms,
            id_base=id_base,
        )
        self._catalog = StreamCatalog(symbols, self.profile.stream_pattern)
        #: the synthetic market's order books (None in replay, or with ``depth`` off); read, never drive them
        self.depth: DepthBooks | None = None
        self._depth_replay: DepthReplay | None = None
        self._capture_t0 = 0.0  # capture time (s) where replay starts
        self._replay_started: float | None = None  # loop time the current replay pass started
        answers: dict[str, Callable[[Mapping[str, Sequence[str]]], RestResponse]] = {}
        if cfg.replay is None and cfg.depth:
            self.depth = DepthBooks.for_market(
                self.market, seed=cfg.seed, config=cfg.book_config(), id_base=id_base, limits=depth_limits
            )
            apply_depth_faults(self.depth, parse_depth_faults(cfg.depth_faults))
            answers[DEPTH_PATH] = self.depth.answer
        elif cfg.replay is not None and cfg.replay_rest is not None:
            self._depth_replay = load_depth_capture(cfg.replay_rest)
            self._capture_t0 = capture_start(cfg.replay)
            answers[DEPTH_PATH] = self._replayed_depth
        self._rest = RestApi(self.market, self._clock_ms, answers, futures=self.profile.futures)
        self._weights = WeightBudget(cfg.rest_weight_limit)
        self._rest_faults = RestFaults()
        for path, faults in parse_rest_faults(cfg.rest_faults).items():
            self.set_rest_faults(path, faults)
        self._faults = FaultInjector[_Item](
            random.Random(f"faults:{cfg.seed}"),
            stream_of=_stream_of,
            corrupt=_corrupt,
            rates=FaultRates(cfg.fault_malformed, cfg.fault_duplicate, cfg.fault_out_of_order),
        )
        self._conns: set[_Connection] = set()
        self._subs: dict[str, set[_Connection]] = {}
        self._prefixes: dict[str, bytes] = {}
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
        self._frames_sent = 0
        self._bytes_sent = 0
        self._replayed = 0
        self._pongs = 0
        self._slow_closes = 0
        self._rate_closes = 0
        self._rate = float(cfg.rate)
        self._rate_epoch = 0
        self._hostile_sent = dict.fromkeys(HOSTILE_KINDS, 0)
        self._no_pong_until = 0.0
        self._pongs_withheld = 0

    # -- lifecycle --

    async def __aenter__(self) -> Self:
        if self._state != "unopened":
            raise RuntimeError(f"a Simulator runs once; this one is {self._state}")
        self._state = "opening"
        cfg = self.config
        await self._stack.__aenter__()
        try:
            self._server = await serve(
                self._handle,
                cfg.host,
                cfg.port,
                process_request=self._process_request,
                compression=None,  # frames are written ready-made, uncompressed
                ping_interval=None,  # keepalive is ours: it must pause during a stall
                ping_timeout=None,
                close_timeout=cfg.close_timeout,
                write_limit=2 * cfg.max_send_buffer,  # never make ping() wait before the slow-consumer close
                logger=logging.getLogger("market.simulator.ws"),
            )
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
        log.info("simulator listening", extra={"fields": {"ws_url": self.ws_url}})
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self._state = "closing"
        for task in self._tasks:
            task.cancel()
        if self._stall_handle is not None:
            self._stall_handle.cancel()
        self._end_stall()  # a stalled connection could not complete its closing handshake
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._state = "closed"

    async def _stop_server(self) -> None:
        """Planned close: every connection gets ``serverShutdown``, then close 1001."""
        assert self._server is not None
        event = server_shutdown_event(self._clock_ms())
        for conn in list(self._conns):
            self._send_now(conn, event)
            conn.request_close(CLOSE_GOING_AWAY, "server shutdown")
        self._server.close()
        await self._server.wait_closed()

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        if self._state != "open":
            raise RuntimeError(f"the simulator is {self._state}; use it as an async context manager")
        await asyncio.Event().wait()

    @property
    def state(self) -> str:
        """``unopened``, ``opening``, ``open``, ``closing`` or ``closed``."""
        return self._state

    # -- addresses --

    @property
    def port(self) -> int:
        return self._port

    @property
    def _host(self) -> str:
        host = self.config.host
        return f"[{host}]" if ":" in host else host

    @property
    def ws_url(self) -> str:
        """The WebSocket base as Binance documents it; clients add ``/ws/...`` or ``/stream?...``."""
        return f"ws://{self._host}:{self._port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    # -- statistics and faults --

    def stats(self) -> SimulatorStats:
        return SimulatorStats(
            connections=len(self._conns),
            frames_sent=self._frames_sent,
            bytes_sent=self._bytes_sent,
            ticks_generated=self.market.counts(),
            ticks_total=self.market.generated,
            replayed_frames=self._replayed,
            pongs_received=self._pongs,
            slow_consumer_closes=self._slow_closes,
            rate_limit_closes=self._rate_closes,
        )

    @property
    def fault_rates(self) -> FaultRates:
        return self._faults.rates

    @property
    def stalled(self) -> bool:
        return not self._unstalled.is_set()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def fault_state(self) -> dict[str, Any]:
        """What the control endpoint reports: faults in force and statistics."""
        now = self._now()
        stats = asdict(self.stats())
        return {
            "stalled": self.stalled,
            "stall_remaining": max(0.0, self._stall_until - now) if self.stalled else 0.0,
            "refusing": now < self._refuse_until,
            "refuse_remaining": max(0.0, self._refuse_until - now),
            "rates": asdict(self._faults.rates),
            "rest_faults": self._rest_faults.state(),
            "hostile_sent": dict(self._hostile_sent),
            "withholding_pongs": now < self._no_pong_until,
            "pongs_withheld": self._pongs_withheld,
            "depth": None if self.depth is None else self.depth.state(),
            "rest_weight": self._weights.state(self._clock_ms()),
            "stats": stats,
        }

    def close_all(self, *, abort: bool = False) -> int:
        """Close every connection (1001), or with ``abort`` drop them without a close frame.

        Returns how many connections were asked to close.
        """
        conns = list(self._conns)
        for conn in conns:
            conn.request_close(CLOSE_GOING_AWAY, "closed by fault injection", abort=abort)
        log.info("fault close_all", extra={"fields": {"connections": len(conns), "abort": abort}})
        return len(conns)

    def stall(self, seconds: float) -> None:
        """For ``seconds``: send nothing on any connection and read nothing (so answer no ping).

        Sockets stay open; connections made meanwhile are stalled too. Ticks are still generated
        (and kept for REST) but not sent. A longer stall extends a current one.
        """
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
            for conn in self._conns:
                if conn.ws.state is State.OPEN:
                    conn.ws.transport.resume_reading()

    def refuse(self, seconds: float) -> None:
        """Answer new WebSocket handshakes with HTTP 503 for ``seconds`` (REST stays up)."""
        self._refuse_until = max(self._refuse_until, self._now() + max(0.0, seconds))
        log.info("fault refuse", extra={"fields": {"seconds": seconds}})

    def set_fault_rates(
        self,
        *,
        malformed: float | None = None,
        duplicate: float | None = None,
        out_of_order: float | None = None,
    ) -> FaultRates:
        """Set the fractions of stream frames made malformed, duplicated or swapped with the next
        frame of their stream; None keeps a fraction as it is. Returns the rates now in force."""
        current = self._faults.rates
        try:
            self._faults.rates = FaultRates(
                current.malformed if malformed is None else malformed,
                current.duplicate if duplicate is None else duplicate,
                current.out_of_order if out_of_order is None else out_of_order,
            )
        except ValueError as exc:
            raise SimulatorConfigError(str(exc)) from None
        log.info("fault rates", extra={"fields": asdict(self._faults.rates)})
        return self._faults.rates

    @property
    def rest_faults(self) -> RestFaults:
        """The REST fault schedules, and per path the requests seen and the faults given (read-only use)."""
        return self._rest_faults

    def set_rest_faults(self, path: str, faults: Iterable[RestFault]) -> None:
        """The next requests to REST ``path`` (:data:`~.rest.ALL_PATHS`: to any) get ``faults`` instead of
        their answer, one each, in order; no faults clears the path's schedule."""
        if self.profile.futures and path.startswith(self.profile.api + "/"):
            path = self.profile.rest_path(path) or path  # /fapi/v1/aggTrades is scheduled as aggTrades
        if path != ALL_PATHS and not self._rest.handles(path):
            raise SimulatorConfigError(f"no REST endpoint {path!r} to schedule faults on")
        faults = tuple(faults)
        self._rest_faults.schedule(path, faults)
        log.info("fault rest", extra={"fields": {"path": path, "schedule": ",".join(map(str, faults))}})

    def hostile(self, request: HostileRequest) -> int:
        """Put ``request.count`` hostile frames of ``request.kind`` into the live stream of every connection now,
        after what it was sent so far (``no_pong``: withhold pongs for ``request.seconds``); see :mod:`.hostile`.
        Returns how many connections got them."""
        kind = request.kind
        log.info("fault hostile", extra={"fields": {"kind": kind, "count": request.count}})
        if kind == "no_pong":
            self._no_pong_until = max(self._no_pong_until, self._now() + request.seconds)
            self._hostile_sent[kind] += 1
            return len(self._conns)
        hit = 0
        now_ms = self._clock_ms()
        for conn in list(self._conns):
            if conn.ws.state is not State.OPEN or conn.close_code is not None:
                continue
            if kind == "ping_flood":
                data = ping_flood(request.count)
            else:
                symbol = self._symbol_of(conn)
                if symbol is None:
                    continue
                one = hostile_frames(
                    kind, symbol=symbol, subscribed=conn.subs.streams, combined=conn.subs.combined,
                    last_trade_id=self.market.last_trade_id(symbol), now_ms=now_ms, jump=request.jump,
                )
                data = b"".join(one * request.count)
            if conn.out:
                self._flush(conn)
            # Straight to the socket: a 50 MB frame must reach the client, not trip the slow-consumer close.
            conn.ws.transport.write(data)
            self._frames_sent += request.count
            self._bytes_sent += len(data)
            self._hostile_sent[kind] += request.count
            hit += 1
        return hit

    def _symbol_of(self, conn: _Connection) -> str | None:
        symbols = self.market.symbols
        for name in conn.subs.streams:
            symbol = name.partition("@")[0].upper()
            if symbol in symbols:
                return symbol
        return None

    def _withhold_pongs(self, conn: _Connection) -> None:
        """From now on the connection's pongs are not sent while a ``no_pong`` fault is in force."""
        protocol = conn.ws.protocol
        send_frame = protocol.send_frame

        def send(frame: Frame) -> None:
            if frame.opcode is Opcode.PONG and self._now() < self._no_pong_until:
                self._pongs_withheld += 1
                return
            send_frame(frame)

        protocol.send_frame = send  # type: ignore[method-assign]

    def clear_faults(self) -> None:
        """End a stall, a refusal and withheld pongs, set every fault fraction to 0, drop every REST fault
        schedule and every depth fault not yet acted, and forget every REST client's weight and ban."""
        if self._stall_handle is not None:
            self._stall_handle.cancel()
        self._end_stall()
        self._refuse_until = 0.0
        self._no_pong_until = 0.0
        self._faults.rates = FaultRates()
        self._rest_faults.clear()
        self._weights.clear()
        if self.depth is not None:
            self.depth.clear_faults()

    def set_depth_faults(self, faults: Iterable[DepthFault]) -> None:
        """Arm depth faults on the synthetic market's books (see :mod:`.depth_faults`)."""
        if self.depth is None:
            raise SimulatorConfigError("no depth books to fault: the simulator replays a capture or has depth off")
        faults = tuple(faults)
        apply_depth_faults(self.depth, faults)
        log.info("fault depth", extra={"fields": {"faults": ",".join(map(str, faults))}})

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Generate ``rate`` ticks a second in total from now on (the synthetic market only)."""
        if not (math.isfinite(rate) and rate >= 0):
            raise SimulatorConfigError(f"rate must be a number >= 0, got {rate!r}")
        self._rate = float(rate)
        self._rate_epoch += 1
        log.info("rate", extra={"fields": {"rate": rate}})

    def _apply_control(self, command: ControlCommand) -> None:
        if command.action == "close_all":
            self.close_all(abort=command.abort)
        elif command.action == "stall":
            self.stall(command.seconds)
        elif command.action == "refuse":
            self.refuse(command.seconds)
        elif command.action == "faults":
            self.set_fault_rates(**command.rates)
        elif command.action == "clear":
            self.clear_faults()
        elif command.action == "rate":
            self.set_rate(command.seconds)
        elif command.action == "rest_faults":
            self.set_rest_faults(command.path, command.rest_faults)
        elif command.action == "hostile":
            assert command.hostile is not None, "parse_control gives every hostile command its request"
            self.hostile(command.hostile)
        elif command.action == "depth_faults":
            self.set_depth_faults(command.depth_faults)

    # -- HTTP: REST, control, handshake checks --

    async def _stream_rest(self, connection: ServerConnection, answer: StreamedAnswer) -> Response:
        """Write a streamed REST answer on the raw connection and close it; the response returned is never
        sent (the connection is closed by then).  websockets' ``open_timeout`` bounds how long this lasts."""
        await write_streamed(answer, connection.transport, connection.drain, connection.connection_lost_waiter)
        return json_response(503, b"")

    def _answer_rest(self, connection: ServerConnection, path: str, query: dict[str, list[str]]) -> Response:
        """The answer, or 429/418 when the client's request weight is spent; served answers say the weight used."""
        address = connection.remote_address
        client = str(address[0]) if isinstance(address, tuple) and address else "?"
        now_ms = self._clock_ms()
        refusal = self._weights.charge(client, request_weight(path, query, self._depth_limits, self.profile.futures),
                                       now_ms)
        if refusal is not None:
            log.info("rest weight refused", extra={"fields": {"path": path, "client": client,
                                                              "status": refusal.status}})
            return json_response(refusal.status, refusal.body, refusal.headers)
        answer = self._rest.handle(path, query)
        used = (USED_WEIGHT_HEADER, str(self._weights.used(client, now_ms)))
        return json_response(answer.status, answer.body, (*answer.headers, used))

    def _replayed_depth(self, query: Mapping[str, Sequence[str]]) -> RestResponse:
        """``/api/v3/depth`` in replay: the recorded snapshot for the capture time being played."""
        assert self._depth_replay is not None, "only routed when a recording is loaded"
        at = self._capture_t0
        if self._replay_started is not None:
            at += (self._now() - self._replay_started) * self.config.replay_speed
        return self._depth_replay.answer(query, at, self._depth_limits)

    def _ws_target(self, path: str) -> tuple[Route, WsTarget | str | None]:
        """A request path -> its route (futures: ``/public``, ``/market``, or ``all`` unrouted) and its target."""
        route, rest = self.profile.split_route(path)
        return route, parse_ws_path(rest, self._catalog, max_streams=self.config.max_streams_per_connection)

    def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | Coroutine[Any, Any, Response] | None:
        parts = urlsplit(request.path)
        if parts.path.startswith(CONTROL_PREFIX):
            command = parse_control(parts.path, parse_qs(parts.query))
            if isinstance(command, str):
                return json_response(400, orjson.dumps({"error": command}))
            try:
                self._apply_control(command)
            except SimulatorConfigError as exc:
                return json_response(400, orjson.dumps({"error": str(exc)}))
            return json_response(200, orjson.dumps(self.fault_state()))
        _, target = self._ws_target(request.path)
        if target is None:
            path = self.profile.rest_path(parts.path)
            if path is None:
                return json_response(404, orjson.dumps({"code": -1, "msg": f"Not found: {parts.path}"}))
            if self._rest.handles(path):
                fault = self._rest_faults.take(path)
                if fault is not None:
                    log.info("fault rest answer", extra={"fields": {"path": parts.path, "fault": str(fault)}})
                    if fault.closes:
                        # No answer: the connection is dropped now (the response websockets goes on to
                        # write meets a closed transport and is discarded).
                        connection.transport.abort()
                        return json_response(503, b"")
                    if fault.hostile is not None:
                        hostile = self._rest.hostile(fault.hostile, request.path, request.headers.get("Host", ""))
                        if isinstance(hostile, StreamedAnswer):
                            return self._stream_rest(connection, hostile)
                        return json_response(hostile.status, hostile.body, hostile.headers)
                    answer = fault_response(fault, self._clock_ms())
                    return json_response(answer.status, answer.body, answer.headers)
            return self._answer_rest(connection, path, parse_qs(parts.query, keep_blank_values=True))
        if isinstance(target, str):
            return json_response(400, orjson.dumps({"code": 2, "msg": f"Invalid request: {target}"}))
        if self._now() < self._refuse_until:
            return json_response(503, orjson.dumps({"code": -1003, "msg": "Service unavailable."}))
        return None

    # -- connections --

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        route, target = self._ws_target(ws.request.path)
        assert isinstance(target, WsTarget)  # checked in _process_request
        subscriptions = StreamSubscriptions(self._catalog, target, max_streams=self.config.max_streams_per_connection)
        conn = _Connection(ws, subscriptions, IncomingRateLimiter(self.config.max_incoming_per_s), route)
        self._register(conn)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._read(conn)),
                    group.create_task(self._keepalive(conn)),
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
            self._unregister(conn)

    def _register(self, conn: _Connection) -> None:
        self._conns.add(conn)
        self._withhold_pongs(conn)
        self._subscribe(conn, tuple(conn.subs.streams))
        if self.stalled:
            conn.ws.transport.pause_reading()

    def _unregister(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self._unsubscribe(conn, tuple(conn.subs.streams))
        conn.out.clear()

    def _subscribe(self, conn: _Connection, streams: tuple[str, ...]) -> None:
        if conn.route != "all":  # a stream of another route is acknowledged and never delivered
            streams = tuple(s for s in streams if self.profile.delivers(conn.route, s))
        for stream in streams:
            self._subs.setdefault(stream, set()).add(conn)
        if streams:
            self._subscribed.set()

    def _unsubscribe(self, conn: _Connection, streams: tuple[str, ...]) -> None:
        for stream in streams:
            subscribers = self._subs.get(stream)
            if subscribers is not None:
                subscribers.discard(conn)
                if not subscribers:
                    del self._subs[stream]

    async def _read(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for message in conn.ws:
                await self._unstalled.wait()
                if not conn.limiter.allow(loop.time()):
                    self._rate_closes += 1
                    conn.request_close(CLOSE_POLICY, "Too many messages")
                    return
                outcome: RequestOutcome = conn.subs.handle(message)
                self._subscribe(conn, outcome.added)
                self._unsubscribe(conn, outcome.removed)
                self._send_now(conn, outcome.reply)
        except ConnectionClosed:
            pass
        conn.request_close(1000, "")

    async def _keepalive(self, conn: _Connection) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.ping_interval)
            await self._unstalled.wait()
            epoch = self._stall_epoch
            try:
                async with asyncio.timeout(cfg.pong_timeout):
                    pong = await conn.ws.ping()
                    await pong
            except TimeoutError:
                if self.stalled or epoch != self._stall_epoch:
                    continue  # the stall held the pong back
                conn.request_close(CLOSE_INTERNAL, "pong timeout")
                return
            except ConnectionClosed:
                return
            self._pongs += 1

    async def _age_limit(self, conn: _Connection) -> None:
        cfg = self.config
        notice_at = max(0.0, cfg.max_connection_age - cfg.shutdown_notice)
        await asyncio.sleep(notice_at)
        await self._unstalled.wait()
        self._send_now(conn, server_shutdown_event(self._clock_ms()))
        await asyncio.sleep(cfg.max_connection_age - notice_at)
        conn.request_close(1000, "connection age limit")

    async def _close_periodically(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.close_all()

    # -- output --

    def _send_now(self, conn: _Connection, payload: bytes) -> None:
        """One text frame to one connection, now (replies and connection events)."""
        conn.out.append(text_frame(payload))
        self._flush(conn)

    def _flush(self, conn: _Connection) -> None:
        out = conn.out
        ws = conn.ws
        if ws.state is not State.OPEN or conn.close_code is not None:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        self._frames_sent += len(out)
        self._bytes_sent += len(data)
        out.clear()
        transport = ws.transport
        transport.write(data)
        if transport.get_write_buffer_size() > self.config.max_send_buffer:
            self._slow_closes += 1
            self._unsubscribe(conn, tuple(conn.subs.streams))
            conn.request_close(CLOSE_POLICY, "slow consumer")

    def _deliver(self, items: list[_Item]) -> None:
        """Write a batch of stream payloads to their subscribers, one buffer per connection."""
        if self._faults.active:
            items = self._faults.apply(items, self._now())
        subs = self._subs
        prefixes = self._prefixes
        touched: list[_Connection] = []
        for stream, raw, combined in items:
            conns = subs.get(stream)
            if not conns:
                continue
            raw_frame = combined_frame = None
            for conn in conns:
                out = conn.out
                if not out:
                    touched.append(conn)
                if conn.subs.combined:
                    if combined_frame is None:
                        if combined is None:
                            prefix = prefixes.get(stream)
                            if prefix is None:
                                prefix = prefixes[stream] = combined_prefix(stream)
                            combined = prefix + raw + b"}"
                        combined_frame = text_frame(combined)
                    out.append(combined_frame)
                else:
                    if raw_frame is None:
                        raw_frame = text_frame(raw)
                    out.append(raw_frame)
        for conn in touched:
            self._flush(conn)

    def _publish(self, events: list[MarketEvent]) -> None:
        subs = self._subs
        if self.profile.futures:
            self._futures_fields(events)
        if not subs or self.stalled:
            return
        dumps = orjson.dumps
        self._deliver([(stream, dumps(payload), None) for _, stream, payload in events if stream in subs])

    def _futures_fields(self, events: list[MarketEvent]) -> None:
        """Binance futures' shapes: ``bookTicker`` with ``e``, ``E`` and ``T``; ``aggTrade`` without ``M``."""
        marks = self._marks
        for kind, _, payload in events:
            if kind == "bookTicker":
                payload["e"] = "bookTicker"
                payload["E"] = payload["T"] = self.market_ms
                marks[payload["s"]] = (payload["b"], payload["a"])
            elif kind == "aggTrade":
                payload.pop("M", None)

    @property
    def market_ms(self) -> int:
        """The time (ms) of the market step being published."""
        return self._market_ms

    def _mark_prices(self, now_ms: int) -> list[MarketEvent]:
        """Futures: one ``markPriceUpdate`` a symbol on ``@markPrice@1s`` each second (and ``@markPrice`` every 3 s):
        the mark is the middle of the last book ticker, the index a tick below it, funding every 8 h."""
        second = now_ms // 1000
        if second < self._next_mark_s:
            return []
        self._next_mark_s = second + 1
        out: list[MarketEvent] = []
        funding_ms = (now_ms // 28_800_000 + 1) * 28_800_000
        for symbol in self.market.symbols:
            touch = self._marks.get(symbol)
            if touch is None:
                continue
            bid, ask = parse_units(touch[0]), parse_units(touch[1])
            mark = (bid + ask) // 2
            index = max(1, mark - self.market.spec(symbol).tick_size)
            payload = {
                "e": "markPriceUpdate", "E": now_ms, "s": symbol, "p": format_decimal(mark),
                "i": format_decimal(index), "P": format_decimal(mark), "r": "0.00010000", "T": funding_ms,
            }
            lower = symbol.lower()
            out.append(("markPrice", f"{lower}@markPrice@1s", payload))
            if second % 3 == 0:
                out.append(("markPrice", f"{lower}@markPrice", payload))
        return out

    # -- sources --

    async def _generate(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        bursts = {
            "burst_every": cfg.burst_every,
            "burst_duration": cfg.burst_duration,
            "burst_multiplier": cfg.burst_multiplier,
        }
        multiplier = max(1.0, cfg.burst_multiplier if cfg.burst_every > 0 else 1.0)
        books = self.depth
        epoch = -1
        start = next_wake = loop.time()
        emitted = max_batch = 0
        while True:
            if epoch != self._rate_epoch:  # a new rate: count from now
                epoch = self._rate_epoch
                start = loop.time()
                emitted = 0
                max_batch = max(1, int(self._rate * multiplier * _MAX_CATCH_UP))
            next_wake += cfg.batch_interval
            delay = next_wake - loop.time()
            if delay < -4 * cfg.batch_interval:
                next_wake = loop.time()  # fell behind: wake on the next period instead of spinning
            await asyncio.sleep(max(0.0, delay))
            due = scheduled_ticks(loop.time() - start, self._rate, **bursts)
            n = due - emitted
            now_ms = self._clock_ms()
            if n > 0:
                if n > max_batch:
                    # Overloaded: skip the backlog rather than bursting far above the rate.
                    emitted = due - max_batch
                    n = max_batch
                events = self.market.step(n, now_ms)
                emitted += n
                self._market_ms = now_ms
                self._publish(events)
                if books is not None:
                    books.observe(events)
            if books is not None:
                diffs = books.advance(now_ms)  # empty but at a batch boundary (every 100 ms)
                if diffs:
                    self._publish(diffs)
            if self.profile.futures:
                marks = self._mark_prices(now_ms)
                if marks:
                    self._publish(marks)

    async def _replay(self, frames: list[ReplayFrame]) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        await self._subscribed.wait()
        while True:
            start = self._replay_started = loop.time()
            index = 0
            while index < len(frames):
                due = frames_due(frames, index, loop.time() - start, cfg.replay_speed)
                if due == index:
                    wait = start + frames[index].offset / cfg.replay_speed - loop.time()
                    await asyncio.sleep(max(0.0, wait) + 0.0001)
                    continue
                if self._subs and not self.stalled:
                    subs = self._subs
                    self._deliver([(f.stream, f.raw, f.combined) for f in frames[index:due] if f.stream in subs])
                self._replayed += due - index
                index = due
            if not cfg.replay_loop:
                return
            await asyncio.sleep(cfg.batch_interval)


async def run_simulator(
    config: SimulatorConfig | None = None,
    *,
    ready: Callable[[Any], None] | None = None,
    clock_ms: Callable[[], int] | None = None,
) -> None:
    """Run a simulator of the config's venue until cancelled (:class:`Simulator` for the Binance family,
    :class:`~ops.simulator.okx.OkxSimulator` for ``okx``); ``ready`` is called once it listens."""
    cfg = config if config is not None else SimulatorConfig()
    if cfg.venue == "okx":
        async with OkxSimulator(cfg, clock_ms=clock_ms) as okx:
            settle_heap()  # listening: what exists now is never garbage (consumer_sdk.core.heap)
            if ready is not None:
                ready(okx)
            await okx.serve_forever()
        return
    async with Simulator(cfg, clock_ms=clock_ms) as sim:
        settle_heap()
        if ready is not None:
            ready(sim)
        await sim.serve_forever()
