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

What is the same for every venue (running once on one port, addresses, statistics, the common faults and the
control endpoint, the pacing of the sources, writing a connection's output) is :class:`~.wire.SimulatorBase`'s,
which :class:`Simulator` extends with the Binance family's protocol, routes, REST and pushes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict
from operator import itemgetter
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from consumer_sdk.core.heap import settle_heap

from .book import FUTURES_DEPTH_LIMITS, SPOT_DEPTH_LIMITS, DepthBooks, parse_units
from .book_replay import DepthReplay, capture_start, load_depth_capture
from .config import SimulatorConfig
from .control import CONTROL_PREFIX, ControlCommand
from .depth_faults import DepthFault, apply_depth_faults, parse_depth_faults
from .errors import SimulatorConfigError
from .hostile import HOSTILE_KINDS, HostileRequest, hostile_frames, ping_flood
from .market import MarketEvent, SyntheticMarket, format_decimal
from .okx import OkxSimulator
from .profiles import BinanceProfile, Route, binance_profile
from .protocol import (
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
from .replay import ReplayFrame, capture_symbols, load_capture
from .rest import (
    ALL_PATHS,
    RestApi,
    RestFault,
    RestResponse,
    StreamedAnswer,
    parse_rest_faults,
    write_streamed,
)
from .weights import DEPTH_PATH, USED_WEIGHT_HEADER, WeightBudget, request_weight
from .wire import CLOSE_POLICY, SimulatorBase, SimulatorStats, WireConnection, client_address, json_response

__all__ = ["Simulator", "SimulatorStats", "run_simulator"]

log = logging.getLogger("market.simulator")

# (stream, raw payload, combined payload or None to build from the raw one)
_Item = tuple[str, bytes, bytes | None]

CLOSE_INTERNAL: Final = 1011
_stream_of: Final = itemgetter(0)


def _corrupt(item: _Item) -> _Item:
    stream, raw, combined = item
    return stream, raw[:-1], None if combined is None else combined[:-1]


class _Connection(WireConnection):
    """One WebSocket connection: its subscriptions and incoming rate limit (and :class:`~.wire.WireConnection`'s)."""

    __slots__ = ("limiter", "route", "subs")

    def __init__(
        self, ws: ServerConnection, subs: StreamSubscriptions, limiter: IncomingRateLimiter, route: Route = "all"
    ) -> None:
        super().__init__(ws)
        self.route: Route = route
        self.subs = subs
        self.limiter = limiter


class Simulator(SimulatorBase[_Connection, _Item]):
    """A Binance-compatible venue on one port; use as ``async with Simulator(config) as sim:``.

    ``clock_ms`` gives event and server times in epoch milliseconds (default: the wall clock);
    pacing always uses the event loop's monotonic clock.
    """

    _log = log
    _runs_once = "a Simulator runs once"
    _logs_rates = True

    def __init__(self, config: SimulatorConfig | None = None, *, clock_ms: Callable[[], int] | None = None):
        cfg = config if config is not None else SimulatorConfig()
        if cfg.venue == "okx":
            raise SimulatorConfigError("the okx venue runs on ops.simulator.okx.OkxSimulator (see run_simulator)")
        super().__init__(cfg, clock_ms, stream_of=_stream_of, corrupt=_corrupt)
        #: the venue of the Binance family stood in for (:mod:`.profiles`)
        self.profile: BinanceProfile = binance_profile(cfg.venue)
        depth_limits = FUTURES_DEPTH_LIMITS if self.profile.futures else SPOT_DEPTH_LIMITS
        self._depth_limits = depth_limits
        self._marks: dict[str, tuple[str, str]] = {}  # futures: symbol -> last bid and ask, for the mark price
        self._market_ms = 0
        self._next_mark_s = 0
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
        self._depth_replay: DepthReplay | None = None
        self._capture_t0 = 0.0  # capture time (s) where replay starts
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
        for path, faults in parse_rest_faults(cfg.rest_faults).items():
            self.set_rest_faults(path, faults)
        self._prefixes: dict[str, bytes] = {}
        self._hostile_sent = dict.fromkeys(HOSTILE_KINDS, 0)
        self._no_pong_until = 0.0
        self._pongs_withheld = 0

    # -- lifecycle, addresses, statistics and faults (the rest in SimulatorBase) --

    def _notice(self, conn: _Connection, now_ms: int) -> bytes:
        return server_shutdown_event(now_ms)

    @property
    def fault_rates(self) -> FaultRates:
        return self._faults.rates

    def fault_state(self) -> dict[str, Any]:
        """What the control endpoint reports: faults in force and statistics."""
        now = self._now()
        stats = asdict(self.stats())
        return {
            **self._faults_in_force(now),
            "hostile_sent": dict(self._hostile_sent),
            "withholding_pongs": now < self._no_pong_until,
            "pongs_withheld": self._pongs_withheld,
            "depth": None if self.depth is None else self.depth.state(),
            "rest_weight": self._weights.state(self._clock_ms()),
            "stats": stats,
        }

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
        super().clear_faults()
        self._no_pong_until = 0.0
        self._weights.clear()

    def set_depth_faults(self, faults: Iterable[DepthFault]) -> None:
        """Arm depth faults on the synthetic market's books (see :mod:`.depth_faults`)."""
        if self.depth is None:
            raise SimulatorConfigError("no depth books to fault: the simulator replays a capture or has depth off")
        faults = tuple(faults)
        apply_depth_faults(self.depth, faults)
        log.info("fault depth", extra={"fields": {"faults": ",".join(map(str, faults))}})

    def _hostile(self, command: ControlCommand) -> None:
        assert command.hostile is not None, "parse_control gives every hostile command its request"
        self.hostile(command.hostile)

    # -- HTTP: REST, control, handshake checks --

    async def _stream_rest(self, connection: ServerConnection, answer: StreamedAnswer) -> Response:
        """Write a streamed REST answer on the raw connection and close it; the response returned is never
        sent (the connection is closed by then).  websockets' ``open_timeout`` bounds how long this lasts."""
        await write_streamed(answer, connection.transport, connection.drain, connection.connection_lost_waiter)
        return json_response(503, b"")

    def _answer_rest(self, connection: ServerConnection, path: str, query: dict[str, list[str]]) -> Response:
        """The answer, or 429/418 when the client's request weight is spent; served answers say the weight used."""
        client = client_address(connection)
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
            return self._answer_control(parts)
        _, target = self._ws_target(request.path)
        if target is None:
            path = self.profile.rest_path(parts.path)
            if path is None:
                return json_response(404, orjson.dumps({"code": -1, "msg": f"Not found: {parts.path}"}))
            if self._rest.handles(path):
                fault = self._rest_faults.take(path)
                if fault is not None:
                    log.info("fault rest answer", extra={"fields": {"path": parts.path, "fault": str(fault)}})
                    if fault.hostile is not None:
                        hostile = self._rest.hostile(fault.hostile, request.path, request.headers.get("Host", ""))
                        if isinstance(hostile, StreamedAnswer):
                            return self._stream_rest(connection, hostile)
                        return json_response(hostile.status, hostile.body, hostile.headers)
                    return self._fault_answer(connection, fault)
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
            await self._own(conn, self._read(conn), self._keepalive(conn), self._age_limit(conn))
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

    # -- output --

    def _streams(self, conn: _Connection) -> tuple[str, ...]:
        return tuple(conn.subs.streams)

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

    def _batch(self, events: list[MarketEvent] | None, now_ms: int) -> None:
        books = self.depth
        if events is not None:
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

    def _played(self, frame: ReplayFrame) -> _Item:
        return frame.stream, frame.raw, frame.combined

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
