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

:class:`OkxSimulator` extends :class:`~.wire.SimulatorBase` (as :class:`~.server.Simulator` does), which runs it
on its port and holds the faults and pacing every venue shares; this module is OKX's protocol, routes and pushes.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ingestor.okx import okx_checksum

from .book import DepthBooks, SymbolBook, parse_units
from .config import SimulatorConfig
from .control import CONTROL_PREFIX
from .depth_faults import DepthFault, apply_depth_faults, parse_depth_faults
from .errors import CaptureError, SimulatorConfigError
from .market import MarketEvent, SyntheticMarket
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
from .protocol import text_frame
from .replay import ReplayFrame
from .rest import RestFault, parse_rest_faults
from .wire import SimulatorBase, WireConnection, client_address, json_response

__all__ = ["OkxSimulator", "load_okx_capture"]

log = logging.getLogger("market.simulator.okx")

CLOSE_IDLE: Final = 4004
_HISTORY_PATH: Final = "/api/v5/market/history-trades"
_BOOKS_PATH: Final = "/api/v5/market/books"
_TIME_PATH: Final = "/api/v5/public/time"
_INSTRUMENTS_PATH: Final = "/api/v5/public/instruments"
_REST_PATHS: Final = (_HISTORY_PATH, _BOOKS_PATH, _TIME_PATH, _INSTRUMENTS_PATH)
_TICKER_EVERY_MS: Final = 100
_SNAPSHOT_LEVELS: Final = 400

# (stream "channel:instId", payload)
_Item = tuple[str, bytes]


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


class _Conn(WireConnection):
    """One WebSocket connection: its streams, operations and last push (and :class:`~.wire.WireConnection`'s)."""

    __slots__ = ("conn_id", "last_pushed", "ops", "subs")

    def __init__(self, ws: ServerConnection, conn_id: str, ops: OpsLimiter, now: float) -> None:
        super().__init__(ws)
        self.conn_id = conn_id
        self.ops = ops
        self.subs: set[str] = set()
        self.last_pushed = now


class OkxSimulator(SimulatorBase[_Conn, _Item]):
    """An OKX v5 public venue on one port; use as ``async with OkxSimulator(config) as sim:`` (module doc)."""

    _log = log

    def __init__(self, config: SimulatorConfig, *, clock_ms: Callable[[], int] | None = None) -> None:
        if config.venue != "okx":
            raise SimulatorConfigError(f"OkxSimulator serves the okx venue, not {config.venue!r}")
        super().__init__(
            config, clock_ms, stream_of=lambda item: item[0], corrupt=lambda item: (item[0], item[1][:-1])
        )
        cfg = config
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
        if cfg.replay is None and cfg.depth:
            book_config = replace(cfg.book_config(), slow_interval_ms=0)
            self.depth = DepthBooks.for_market(self.market, seed=cfg.seed, config=book_config, id_base=id_base)
            self.set_depth_faults(parse_depth_faults(cfg.depth_faults))
        for path, faults in parse_rest_faults(cfg.rest_faults).items():
            self.set_rest_faults(path, faults)
        self._connects = ConnectLimiter(cfg.max_connects_per_s)
        self._conn_ids = itertools.count(1)
        self._pings = self._idle_closes = self._connects_refused = self._ops_refused = 0
        self._book_ms: int | None = None  # the last 100 ms boundary the books were flushed at
        # tickers: per instrument its fields, whether it changed since its last push, and when that was
        self._tickers: dict[str, dict[str, str]] = {}
        self._ticker_dirty: set[str] = set()
        self._ticker_sent_ms: dict[str, int] = {}

    # -- lifecycle, addresses, statistics and faults (the rest in SimulatorBase) --

    def _listening_fields(self) -> dict[str, Any]:
        return {**super()._listening_fields(), "venue": "okx"}

    def _notice(self, conn: _Conn, now_ms: int) -> bytes:
        return notice_event(conn.conn_id)

    def fault_state(self) -> dict[str, Any]:
        now = self._now()
        return {
            "venue": "okx",
            **self._faults_in_force(now),
            "depth": None if self.depth is None else self.depth.state(),
            "pings_answered": self._pings,
            "idle_closes": self._idle_closes,
            "connects_refused": self._connects_refused,
            "ops_refused": self._ops_refused,
            "stats": asdict(self.stats()),
        }

    def _end_stall(self) -> None:
        if self.stalled:
            now = self._now() if self._state in ("open", "closing") else 0.0
            for conn in self._conns:
                conn.last_pushed = max(conn.last_pushed, now)  # the stall, not the venue's rule, kept it quiet
        super()._end_stall()

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

    # -- HTTP --

    def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | Coroutine[Any, Any, Response] | None:
        parts = urlsplit(request.path)
        path = parts.path
        if path.startswith(CONTROL_PREFIX):
            return self._answer_control(parts)
        if path in _REST_PATHS:
            return self._answer_rest(connection, path, parse_qs(parts.query, keep_blank_values=True))
        if path != PATH:
            return json_response(404, orjson.dumps({"code": "404", "msg": "Not Found"}))
        now = self._now()
        if now < self._refuse_until:
            return json_response(503, orjson.dumps({"code": "50001", "msg": "Service temporarily unavailable"}))
        if not self._connects.allow(client_address(connection), now):
            self._connects_refused += 1
            return json_response(429, orjson.dumps({"code": "50011", "msg": "Too Many Requests"}))
        return None

    def _answer_rest(self, connection: ServerConnection, path: str, query: dict[str, list[str]]) -> Response:
        fault: RestFault | None = self._rest_faults.take(path)
        if fault is not None:
            return self._fault_answer(connection, fault)
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
            await self._own(conn, self._read(conn), self._idle_watch(conn), self._age_limit(conn))
        finally:
            self._conns.discard(conn)
            self._unsubscribe(conn, tuple(conn.subs))
            conn.out.clear()

    def _unsubscribe(self, conn: _Conn, streams: tuple[str, ...]) -> None:
        conn.subs.difference_update(streams)
        super()._unsubscribe(conn, streams)

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

    # -- output --

    def _flush(self, conn: _Conn) -> bool:
        wrote = super()._flush(conn)
        if wrote:
            conn.last_pushed = self._now()
        return wrote

    def _streams(self, conn: _Conn) -> tuple[str, ...]:
        return tuple(conn.subs)

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

    def _batch(self, events: list[MarketEvent] | None, now_ms: int) -> None:
        books = self.depth
        items: list[_Item] = []
        if events is not None:
            if books is not None:
                books.observe(events)
            items = self._market_items(events, now_ms)
        if books is not None:
            items += self._book_items(books, now_ms)
        if self._ticker_dirty:
            items += self._ticker_items(now_ms)
        if items and not self.stalled:
            self._deliver(items)

    def _played(self, frame: ReplayFrame) -> _Item:
        return frame.stream, frame.raw

def _levels(book: SymbolBook, n: int) -> tuple[list[list[str]], list[list[str]], int]:
    """The best ``n`` levels a side of the book as last flushed, in OKX's form, and its ``seqId``."""
    tick = book.tick_size
    bids, asks = book.bids, book.asks

    def side(prices: list[int], sizes: dict[int, int]) -> list[list[str]]:
        return [[okx_decimal(p * tick), okx_decimal(sizes[p]), "0", "1"] for p in prices]

    return side(heapq.nlargest(n, bids), bids), side(heapq.nsmallest(n, asks), asks), book.prev_u
