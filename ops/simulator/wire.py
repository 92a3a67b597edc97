# size: the base class both simulator servers extend (life on one port, addresses, statistics, faults and control,
#   each connection's run, the pacing of the market and of a replay), one piece so each server keeps its venue only.
"""What both simulator servers (:mod:`.server`, :mod:`.okx`) share on the wire.

:class:`SimulatorBase` is the base class both extend: the life of a simulator as an async context manager on one
port (``unopened``, ``opening``, ``open``, ``closing``, ``closed``; run once), its addresses, its statistics, the
faults common to every venue (``close_all``, ``stall``, ``refuse``, wire fault rates, REST and depth fault
schedules, ``rate``, ``clear``) and the control endpoint that sets them, the running of each connection's tasks
and its age limit, and the pacing of the synthetic market and of a capture's replay.  A subclass keeps what its
venue does differently: its protocol, routes, connection tasks and pushes.  :class:`WireConnection` is the base of
their connections; :func:`json_response` the plain HTTP answer they give REST and control requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, Generic, Self, TypeVar
from urllib.parse import SplitResult, parse_qs

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

from .book import DepthBooks
from .config import SimulatorConfig
from .control import ControlCommand, parse_control
from .depth_faults import DepthFault
from .errors import SimulatorConfigError
from .market import MarketEvent, SyntheticMarket, scheduled_ticks
from .protocol import FaultInjector, FaultRates, text_frame
from .replay import ReplayFrame, frames_due
from .rest import RestFault, RestFaults, fault_response

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_POLICY",
    "SimulatorBase",
    "SimulatorStats",
    "WireConnection",
    "client_address",
    "json_response",
    "wall_ms",
]

CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
_MAX_CATCH_UP: Final = 0.25  # seconds of ticks one batch may carry after the loop fell behind


@dataclass(frozen=True, slots=True)
class SimulatorStats:
    """Counters since start."""

    #: open WebSocket connections
    connections: int
    #: text frames written over all connections (stream frames, replies, serverShutdown)
    frames_sent: int
    bytes_sent: int
    #: synthetic ticks generated per kind: trade, aggTrade, bookTicker, kline (sent or not)
    ticks_generated: Mapping[str, int]
    ticks_total: int
    #: capture frames played (sent to whoever subscribed to their stream)
    replayed_frames: int
    pongs_received: int
    slow_consumer_closes: int
    rate_limit_closes: int


def json_response(status: int, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    """A complete HTTP answer with a JSON body; the connection closes after it."""
    st = http.HTTPStatus(status)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/json;charset=UTF-8"),
            *extra,
        ]
    )
    return Response(st.value, st.phrase, headers, body)


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def client_address(connection: ServerConnection) -> str:
    """The client's IP address as the venue keys its limits by (``?`` when the socket does not say)."""
    address = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) and address else "?"


class WireConnection:
    """One WebSocket connection: its pending output, and who asked to close it (its handler task closes it)."""

    __slots__ = ("abort", "close_code", "close_reason", "closing", "out", "ws")

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
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


ConnT = TypeVar("ConnT", bound=WireConnection)
ItemT = TypeVar("ItemT")  # what one stream push is on its way to the wire (and through the fault injector)


class SimulatorBase(Generic[ConnT, ItemT]):
    """A venue on one port, run once as ``async with``; a subclass gives its protocol, routes and pushes.

    ``clock_ms`` gives event and server times in epoch milliseconds (default: the wall clock); pacing always uses
    the event loop's monotonic clock.
    """

    #: where the venue logs (its listening line and its faults)
    _log: ClassVar[logging.Logger]
    #: what opening it a second time says
    _runs_once: ClassVar[str] = "a simulator runs once"
    #: whether a change of the wire fault rates or of the tick rate is logged
    _logs_rates: ClassVar[bool] = False
    market: SyntheticMarket

    def __init__(
        self,
        config: SimulatorConfig,
        clock_ms: Callable[[], int] | None,
        *,
        stream_of: Callable[[ItemT], str],
        corrupt: Callable[[ItemT], ItemT],
    ) -> None:
        self.config = cfg = config
        self._clock_ms = clock_ms if clock_ms is not None else wall_ms
        self._frames: list[ReplayFrame] | None = None  # the capture replayed, if any
        #: the synthetic market's order books (None in replay, or with ``depth`` off); read, never drive them
        self.depth: DepthBooks | None = None
        self._rest_faults = RestFaults()
        self._faults = FaultInjector[ItemT](
            random.Random(f"faults:{cfg.seed}"),
            stream_of=stream_of,
            corrupt=corrupt,
            rates=FaultRates(cfg.fault_malformed, cfg.fault_duplicate, cfg.fault_out_of_order),
        )
        self._conns: set[ConnT] = set()
        self._subs: dict[str, set[ConnT]] = {}
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
        self._replay_started: float | None = None  # loop time the current replay pass started
        self._frames_sent = self._bytes_sent = self._replayed = 0
        self._pongs = self._slow_closes = self._rate_closes = 0
        self._rate = float(cfg.rate)
        self._rate_epoch = 0

    # -- what a venue gives --

    async def _handle(self, ws: ServerConnection) -> None:
        """Own one WebSocket connection until it closes."""
        raise NotImplementedError

    def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | Coroutine[Any, Any, Response] | None:
        """An HTTP answer (REST, control, a refused handshake), or None to upgrade to WebSocket."""
        raise NotImplementedError

    def _notice(self, conn: ConnT, now_ms: int) -> bytes:
        """The venue's notice of a planned close, sent before it."""
        raise NotImplementedError

    def _deliver(self, items: list[ItemT]) -> None:
        """Write a batch of stream pushes to their subscribers."""
        raise NotImplementedError

    def _played(self, frame: ReplayFrame) -> ItemT:
        """A capture frame as a stream push."""
        raise NotImplementedError

    def _batch(self, events: list[MarketEvent] | None, now_ms: int) -> None:
        """Publish a batch of the synthetic market (None: no tick was due) and what the books made of it."""
        raise NotImplementedError

    def _streams(self, conn: ConnT) -> tuple[str, ...]:
        """The streams the connection is subscribed to."""
        raise NotImplementedError

    def fault_state(self) -> dict[str, Any]:
        """What the control endpoint reports: faults in force and statistics."""
        raise NotImplementedError

    def set_rest_faults(self, path: str, faults: Iterable[RestFault]) -> None:
        """The next requests to REST ``path`` get ``faults`` instead of their answer, one each, in order."""
        raise NotImplementedError

    def set_depth_faults(self, faults: Iterable[DepthFault]) -> None:
        """Arm depth faults on the synthetic market's books (see :mod:`.depth_faults`)."""
        raise NotImplementedError

    def _hostile(self, command: ControlCommand) -> None:
        """The control endpoint's ``hostile`` command; a venue without hostile frames refuses it."""
        raise SimulatorConfigError("hostile frames are the Binance profiles' only")

    # -- lifecycle --

    async def __aenter__(self) -> Self:
        if self._state != "unopened":
            raise RuntimeError(f"{self._runs_once}; this one is {self._state}")
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
        self._log.info("simulator listening", extra={"fields": self._listening_fields()})
        return self

    def _listening_fields(self) -> dict[str, Any]:
        return {"ws_url": self.ws_url}

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
        """Planned close: every connection gets the venue's notice, then close 1001."""
        assert self._server is not None
        now_ms = self._clock_ms()
        for conn in list(self._conns):
            self._send_now(conn, self._notice(conn, now_ms))
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
        """The WebSocket base, as the venue documents it (``wss://stream.binance.com:9443``,
        ``wss://ws.okx.com:8443``); clients add the venue's path (``/ws/...``, ``/ws/v5/public``)."""
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
    def stalled(self) -> bool:
        return not self._unstalled.is_set()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _faults_in_force(self, now: float) -> dict[str, Any]:
        """The first part of what the control endpoint reports, every venue's: stall, refusal, fault rates, REST
        fault schedules."""
        return {
            "stalled": self.stalled,
            "stall_remaining": max(0.0, self._stall_until - now) if self.stalled else 0.0,
            "refusing": now < self._refuse_until,
            "refuse_remaining": max(0.0, self._refuse_until - now),
            "rates": asdict(self._faults.rates),
            "rest_faults": self._rest_faults.state(),
        }

    def close_all(self, *, abort: bool = False) -> int:
        """Close every connection (1001), or with ``abort`` drop them without a close frame.

        Returns how many connections were asked to close.
        """
        conns = list(self._conns)
        for conn in conns:
            conn.request_close(CLOSE_GOING_AWAY, "closed by fault injection", abort=abort)
        self._log.info("fault close_all", extra={"fields": {"connections": len(conns), "abort": abort}})
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
        self._log.info("fault stall", extra={"fields": {"seconds": seconds}})

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
        self._log.info("fault refuse", extra={"fields": {"seconds": seconds}})

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
        if self._logs_rates:
            self._log.info("fault rates", extra={"fields": asdict(self._faults.rates)})
        return self._faults.rates

    @property
    def rest_faults(self) -> RestFaults:
        """The REST fault schedules, and per path the requests seen and the faults given (read-only use)."""
        return self._rest_faults

    def _fault_answer(self, connection: ServerConnection, fault: RestFault) -> Response:
        """A REST request's scheduled fault (not a hostile one) given as its answer."""
        if fault.closes:
            # No answer: the connection is dropped now (the response websockets goes on to
            # write meets a closed transport and is discarded).
            connection.transport.abort()
            return json_response(503, b"")
        answer = fault_response(fault, self._clock_ms())
        return json_response(answer.status, answer.body, answer.headers)

    def clear_faults(self) -> None:
        """End a stall and a refusal, set every fault fraction to 0, drop every REST fault schedule and every
        depth fault not yet acted."""
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
        """Generate ``rate`` ticks a second in total from now on (the synthetic market only)."""
        if not (math.isfinite(rate) and rate >= 0):
            raise SimulatorConfigError(f"rate must be a number >= 0, got {rate!r}")
        self._rate = float(rate)
        self._rate_epoch += 1
        if self._logs_rates:
            self._log.info("rate", extra={"fields": {"rate": rate}})

    def _answer_control(self, parts: SplitResult) -> Response:
        """A ``/control/...`` request: the fault applied and what is in force now, or 400."""
        command = parse_control(parts.path, parse_qs(parts.query))
        if isinstance(command, str):
            return json_response(400, orjson.dumps({"error": command}))
        try:
            self._apply_control(command)
        except SimulatorConfigError as exc:
            return json_response(400, orjson.dumps({"error": str(exc)}))
        return json_response(200, orjson.dumps(self.fault_state()))

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
            self._hostile(command)

    # -- connections --

    async def _own(self, conn: ConnT, *jobs: Coroutine[Any, Any, None]) -> None:
        """Run a connection's ``jobs`` until someone asks it closed, then close it as asked."""
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(job) for job in jobs]
            await conn.closing.wait()
            for task in tasks:
                task.cancel()
        if conn.abort:
            conn.ws.transport.abort()
        else:
            await conn.ws.close(conn.close_code or 1000, conn.close_reason)

    async def _age_limit(self, conn: ConnT) -> None:
        cfg = self.config
        notice_at = max(0.0, cfg.max_connection_age - cfg.shutdown_notice)
        await asyncio.sleep(notice_at)
        await self._unstalled.wait()
        self._send_now(conn, self._notice(conn, self._clock_ms()))
        await asyncio.sleep(cfg.max_connection_age - notice_at)
        conn.request_close(1000, "connection age limit")

    async def _close_periodically(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.close_all()

    def _send_now(self, conn: ConnT, payload: bytes) -> None:
        """One text frame to one connection, now (replies and connection events)."""
        conn.out.append(text_frame(payload))
        self._flush(conn)

    def _flush(self, conn: ConnT) -> bool:
        """Write the connection's pending output straight to its transport; whether anything was written.  A
        connection whose unsent bytes then exceed ``max_send_buffer`` is closed (1008, slow consumer)."""
        out = conn.out
        ws = conn.ws
        if ws.state is not State.OPEN or conn.close_code is not None or not out:
            out.clear()
            return False
        data = out[0] if len(out) == 1 else b"".join(out)
        self._frames_sent += len(out)
        self._bytes_sent += len(data)
        out.clear()
        transport = ws.transport
        transport.write(data)
        if transport.get_write_buffer_size() > self.config.max_send_buffer:
            self._slow_closes += 1
            self._unsubscribe(conn, self._streams(conn))
            conn.request_close(CLOSE_POLICY, "slow consumer")
        return True

    def _unsubscribe(self, conn: ConnT, streams: tuple[str, ...]) -> None:
        for stream in streams:
            subscribers = self._subs.get(stream)
            if subscribers is not None:
                subscribers.discard(conn)
                if not subscribers:
                    del self._subs[stream]

    # -- sources --

    async def _generate(self) -> None:
        """Step the synthetic market every ``batch_interval`` by the ticks its rate implies since start."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        bursts = {
            "burst_every": cfg.burst_every,
            "burst_duration": cfg.burst_duration,
            "burst_multiplier": cfg.burst_multiplier,
        }
        multiplier = max(1.0, cfg.burst_multiplier if cfg.burst_every > 0 else 1.0)
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
            events: list[MarketEvent] | None = None
            if n > 0:
                if n > max_batch:
                    # Overloaded: skip the backlog rather than bursting far above the rate.
                    emitted = due - max_batch
                    n = max_batch
                events = self.market.step(n, now_ms)
                emitted += n
            self._batch(events, now_ms)

    async def _replay(self, frames: list[ReplayFrame]) -> None:
        """Play a capture at its pace (``replay_speed``), from when the first connection subscribes."""
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
                    played = self._played
                    self._deliver([played(f) for f in frames[index:due] if f.stream in subs])
                self._replayed += due - index
                index = due
            if not cfg.replay_loop:
                return
            await asyncio.sleep(cfg.batch_interval)
