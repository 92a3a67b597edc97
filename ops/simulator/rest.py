# size: one pure function per REST endpoint the venue serves, each with the limits and errors Binance documents for
#   it.
"""Binance spot REST market-data endpoints over the simulator's bounded history: pure code.

Endpoints (GET, query string parameters as Binance names them):

- ``/api/v3/ping`` (also ``/ping``) -> ``{}``; ``/api/v3/time`` -> ``{"serverTime": ms}``
- ``/api/v3/exchangeInfo[?symbol=S | ?symbols=["A","B"]]`` -> symbols with status ``TRADING``
- ``/api/v3/trades?symbol=S[&limit=N]`` -> the latest trades (default 500, at most 1000)
- ``/api/v3/historicalTrades?symbol=S[&fromId=ID][&limit=N]``
- ``/api/v3/aggTrades?symbol=S[&fromId=ID | &startTime=MS][&endTime=MS][&limit=N]``
- ``/api/v3/klines?symbol=S&interval=I[&startTime=MS][&endTime=MS][&limit=N]``
- ``/api/v3/depth?symbol=S[&limit=N]`` when the simulator gives :class:`RestApi` an answer for it (its
  :class:`~ops.simulator.book.DepthBooks`, or a recording in replay)

Answers use Binance's JSON shapes; errors are HTTP 400 with ``{"code": -11xx, "msg": ...}`` as
Binance words them, and unknown paths are 404. Only what the history still holds is returned:
older ids are gone, as on the venue. A limit above 1000 is served as 1000.

Faults (:class:`RestFaults`): a schedule per path of what the next requests get instead of their
answer, one fault per request, in order; then the path answers normally again.  A fault is an HTTP
error status (400, 418, 429, 5xx, ...) with Binance's error body, and with ``Retry-After`` when the
fault names one (``429:30``), or ``close``: the connection is dropped with no answer at all, or one of
the hostile answers (:class:`Hostile`) a REST client must survive:

- ``huge``: 200 and a JSON body of 1 GiB (chunked, no length announced), made as it is sent from one
  reused 64 KiB block, so it is never held in memory;
- ``trickle``: 200 and the true answer, one byte every 0.5 s;
- ``redirect``: 302 to the same request on another host name (``localhost`` for ``127.0.0.1`` and the
  other way round), which reaches this same simulator if followed;
- ``bad_json``: 200 and the true answer cut in half;
- ``other_symbol``: 200 and another symbol's trades (or aggregate trades) under the ids asked, as a
  proxy or cache that mixed symbols up would answer (``historicalTrades`` and ``aggTrades``; with one
  symbol, its own older trades; other paths answer truly).

``ITEM*N`` repeats an item N times; ``ITEM*`` gives it to every request until the schedule is
replaced or cleared.  The schedule's text form, ``PATH=ITEM,ITEM;PATH=...`` (:func:`parse_rest_faults`),
is what the simulator's settings, ``market simulate --rest-faults`` and the control endpoint take.

All of this is pure code except :func:`write_streamed`, which writes a streamed answer (``huge``,
``trickle``) on the server's raw connection.
"""

from __future__ import annotations

import asyncio
import http
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import orjson

from .errors import SimulatorConfigError
from .market import KLINE_INTERVAL_MS, SCALE, SyntheticMarket, format_decimal

__all__ = [
    "ALL_PATHS",
    "HUGE_BYTES",
    "TRICKLE_EVERY_S",
    "Hostile",
    "RestApi",
    "RestFault",
    "RestFaults",
    "RestResponse",
    "StreamedAnswer",
    "fault_response",
    "huge_body",
    "parse_rest_faults",
    "parse_rest_path",
    "parse_rest_schedule",
    "write_streamed",
]

_MAX_LIMIT: Final = 1000
_DEFAULT_LIMIT: Final = 500
_HOUR_MS: Final = 3_600_000


@dataclass(frozen=True, slots=True)
class RestResponse:
    """An HTTP status, a JSON body and any headers beyond the usual ones."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class StreamedAnswer:
    """An answer written on the raw connection as it goes: ``head`` (status line and headers), then
    ``parts`` one after another, ``pause_s`` apart; the parts are made as they are sent."""

    head: bytes
    parts: Iterator[bytes]
    pause_s: float = 0.0


# ---------------------------------------------------------------------------------------------- faults

#: the schedule of this path applies to every REST path (after a path's own schedule)
ALL_PATHS: Final = "*"
_API_PREFIX: Final = "/api/v3/"
#: the body ``huge`` sends, and how often ``trickle`` sends a byte
HUGE_BYTES: Final = 1 << 30
TRICKLE_EVERY_S: Final = 0.5
_MAX_REPEAT: Final = 100_000


class Hostile(StrEnum):
    """Answers a REST client must survive (see the module's docstring)."""

    HUGE = "huge"
    TRICKLE = "trickle"
    REDIRECT = "redirect"
    BAD_JSON = "bad_json"
    OTHER_SYMBOL = "other_symbol"


_ITEM: Final = re.compile(
    r"^(?:(?P<status>[0-9]{3})(?::(?P<retry_after>[0-9]{1,9}))?|(?P<close>close)|(?P<hostile>"
    + "|".join(h.value for h in Hostile)
    + r"))(?P<repeat>\*(?P<times>[0-9]{1,6})?)?$"
)


@dataclass(frozen=True, slots=True)
class RestFault:
    """What one request gets instead of its answer: HTTP ``status`` (4xx/5xx) with Binance's error body and,
    when ``retry_after`` is set, ``Retry-After: <seconds>``; or a ``hostile`` answer; or, with neither, a
    connection closed with no answer.  A fault ``forever`` is given to every request until the schedule
    changes."""

    status: int | None
    retry_after: int | None = None
    hostile: Hostile | None = None
    forever: bool = False

    def __post_init__(self) -> None:
        if self.hostile is not None and (self.status is not None or self.retry_after is not None):
            raise SimulatorConfigError(f"a {self.hostile} answer carries no HTTP error status or Retry-After")
        if self.status is None:
            if self.retry_after is not None:
                raise SimulatorConfigError("a closed connection carries no Retry-After")
            return
        try:
            known = 400 <= http.HTTPStatus(self.status) <= 599
        except ValueError:
            known = False
        if not known:
            raise SimulatorConfigError(f"a REST fault must be an HTTP error status (400-599), got {self.status}")
        if self.retry_after is not None and self.retry_after < 0:
            raise SimulatorConfigError(f"Retry-After must be a number of seconds >= 0, got {self.retry_after}")

    @property
    def closes(self) -> bool:
        return self.status is None and self.hostile is None

    def __str__(self) -> str:
        if self.hostile is not None:
            text = self.hostile.value
        elif self.status is None:
            text = "close"
        else:
            text = f"{self.status}" if self.retry_after is None else f"{self.status}:{self.retry_after}"
        return f"{text}*" if self.forever else text


def parse_rest_path(text: str) -> str:
    """A REST path as faults name it: ``/api/v3/aggTrades``, ``aggTrades`` for short, or ``*``."""
    path = text.strip()
    if path == ALL_PATHS:
        return path
    if not path:
        raise SimulatorConfigError("a REST fault schedule names no path: expected e.g. aggTrades=503, or *=503")
    if not path.startswith("/"):
        path = _API_PREFIX + path
    if not re.fullmatch(r"/[A-Za-z0-9/_.\-]{1,100}", path):
        raise SimulatorConfigError(f"not a REST path: {text!r}")
    return path


def parse_rest_schedule(text: str) -> tuple[RestFault, ...]:
    """``429:2,503,close,trickle*3,huge*`` -> the faults, in order; an empty text is no fault.  ``ITEM*N``
    is N of the item; ``ITEM*`` is the item for every request from then on (the schedule's last)."""
    faults: list[RestFault] = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        m = _ITEM.match(item)
        if m is None:
            raise SimulatorConfigError(
                f"bad REST fault {raw.strip()!r}: expected an HTTP status (e.g. 503), a status with Retry-After "
                "seconds (e.g. 429:2), close, or one of " + ", ".join(h.value for h in Hostile)
                + "; ITEM*N repeats it N times, ITEM* for every request"
            )
        if faults and faults[-1].forever:
            raise SimulatorConfigError(f"nothing can follow {faults[-1]} in a REST fault schedule")
        forever = m.group("repeat") is not None and m.group("times") is None
        times = int(m.group("times") or 1)
        if not 1 <= times <= _MAX_REPEAT:
            raise SimulatorConfigError(f"bad REST fault {raw.strip()!r}: repeat 1 to {_MAX_REPEAT} times")
        if m.group("close"):
            fault = RestFault(None, forever=forever)
        elif m.group("hostile"):
            fault = RestFault(None, hostile=Hostile(m.group("hostile")), forever=forever)
        else:
            retry_after = m.group("retry_after")
            fault = RestFault(
                int(m.group("status")), None if retry_after is None else int(retry_after), forever=forever
            )
        faults.extend([fault] * times)
    return tuple(faults)


def parse_rest_faults(spec: str) -> dict[str, tuple[RestFault, ...]]:
    """``PATH=ITEMS;PATH=ITEMS`` -> a schedule per path.  ``PATH`` is a REST path (``/api/v3/aggTrades``, or
    ``aggTrades`` for short) or ``*`` for every REST path; ``ITEMS`` as :func:`parse_rest_schedule` reads them."""
    out: dict[str, tuple[RestFault, ...]] = {}
    for part in spec.split(";"):
        if not part.strip():
            continue
        path, sep, items = part.partition("=")
        if not sep:
            raise SimulatorConfigError(f"bad REST fault schedule {part.strip()!r}: expected PATH=ITEMS")
        key = parse_rest_path(path)
        out[key] = out.get(key, ()) + parse_rest_schedule(items)
    return out


class RestFaults:
    """The REST fault schedules and what they did: pure, owned by the simulator's event loop.

    :meth:`take` is asked once per REST request: it counts the request and hands out the next fault
    scheduled for its path (then for :data:`ALL_PATHS`), or None when the path answers normally.
    """

    __slots__ = ("_queues", "injected", "requests")

    def __init__(self, schedules: Mapping[str, Iterable[RestFault]] | None = None) -> None:
        self._queues: dict[str, deque[RestFault]] = {}
        #: REST requests seen per path, and how many of them got a fault
        self.requests: dict[str, int] = {}
        self.injected: dict[str, int] = {}
        for path, faults in (schedules or {}).items():
            self.schedule(path, faults)

    def schedule(self, path: str, faults: Iterable[RestFault]) -> None:
        """Replace ``path``'s schedule (no faults: clear it)."""
        queue = deque(faults)
        if queue:
            self._queues[path] = queue
        else:
            self._queues.pop(path, None)

    def take(self, path: str) -> RestFault | None:
        self.requests[path] = self.requests.get(path, 0) + 1
        for key in (path, ALL_PATHS):
            queue = self._queues.get(key)
            if queue:
                fault = queue[0] if queue[0].forever else queue.popleft()
                if not queue:
                    del self._queues[key]
                self.injected[path] = self.injected.get(path, 0) + 1
                return fault
        return None

    def clear(self) -> None:
        """Drop every schedule (the counts stay)."""
        self._queues.clear()

    def pending(self) -> dict[str, str]:
        """What is still scheduled, per path, in the text form :func:`parse_rest_schedule` reads."""
        out: dict[str, str] = {}
        for path, queue in self._queues.items():
            items: list[str] = []
            count = 0
            for i, fault in enumerate(queue):  # runs of one item as ITEM*N
                count += 1
                if i + 1 < len(queue) and queue[i + 1] == fault:
                    continue
                items.append(f"{fault}*{count}" if count > 1 else str(fault))
                count = 0
            out[path] = ",".join(items)
        return out

    def state(self) -> dict[str, Any]:
        return {"pending": self.pending(), "requests": dict(self.requests), "injected": dict(self.injected)}


def fault_response(fault: RestFault, now_ms: int) -> RestResponse:
    """The answer a fault gives (not for ``close``, which gives none): Binance's error codes and words."""
    status = fault.status
    if status is None:
        raise ValueError("a closed connection has no response")
    if status == 418:
        code, msg = -1003, (f"Way too much request weight used; IP banned until {now_ms + 120_000}. "
                            "Please use WebSocket Streams for live updates to avoid bans.")
    elif status == 429:
        code, msg = -1003, ("Too many requests; current limit of IP(127.0.0.1) request weight per 1 MINUTE is 6000. "
                            "Please use WebSocket Streams for live updates to avoid polling the API.")
    elif status >= 500:
        code, msg = -1001, "Internal error; unable to process your request. Please try again."
    elif status == 400:
        code, msg = -1100, "Illegal characters found in a parameter."
    else:
        code, msg = -1000, "An unknown error occurred while processing the request."
    headers = () if fault.retry_after is None else (("Retry-After", str(fault.retry_after)),)
    return RestResponse(status, orjson.dumps({"code": code, "msg": msg}), headers)


def _chunk(data: bytes) -> bytes:
    """``data`` as one chunk of HTTP's chunked transfer coding."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def huge_body(total: int = HUGE_BYTES) -> Iterator[bytes]:
    """A JSON list of trade rows of about ``total`` bytes in chunked transfer coding, made as it is
    consumed: one 64 KiB block of rows, framed once, is handed out again and again."""
    row = (b'{"id":1,"price":"1.00000000","qty":"1.00000000","quoteQty":"1.00000000","time":1,'
           b'"isBuyerMaker":true,"isBestMatch":true},')
    block = _chunk(row * (65_536 // len(row)))
    body = len(row) * (65_536 // len(row))
    yield _chunk(b"[")
    sent = 1
    while sent + body + len(row) < total:
        yield block
        sent += body
    yield _chunk(row[:-1] + b"]")
    yield b"0\r\n\r\n"


def _head(status: int, headers: Sequence[tuple[str, str]]) -> bytes:
    st = http.HTTPStatus(status)
    lines = [f"HTTP/1.1 {st.value} {st.phrase}", "Content-Type: application/json;charset=UTF-8", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _other_host(host: str) -> str:
    """``host[:port]`` with the host name swapped: ``localhost`` and ``127.0.0.1`` reach the same machine."""
    try:
        parts = urlsplit(f"//{host}")
        name, port = parts.hostname, parts.port
    except ValueError:
        name, port = None, None
    other = "127.0.0.1" if name == "localhost" else "localhost"
    return f"{other}:{port}" if port else other


async def write_streamed(
    answer: StreamedAnswer,
    transport: asyncio.WriteTransport,
    drain: Callable[[], Awaitable[None]],
    closed: asyncio.Future[None],
) -> int:
    """Write ``answer`` on ``transport``, waiting on ``drain`` when its buffer is full and ``pause_s``
    between parts; stop as soon as the peer has gone (``closed`` done).  Then close the transport and
    wait until it is (``closed`` is never cancelled here).  Returns the body bytes written."""
    written = 0
    transport.write(answer.head)
    try:
        for part in answer.parts:
            if closed.done() or transport.is_closing():
                break
            transport.write(part)
            written += len(part)
            await drain()
            if answer.pause_s > 0:
                await asyncio.wait([closed], timeout=answer.pause_s)
    except ConnectionError:
        pass
    transport.close()
    await asyncio.wait([closed])
    return written


class _BadRequest(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def _one(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    if not values or values[-1] == "":
        return None
    return values[-1]


def _int_param(query: Mapping[str, Sequence[str]], name: str) -> int | None:
    value = _one(query, name)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 20:
        raise _BadRequest(-1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]{{1,20}}$'.")
    return int(value)


def _limit(query: Mapping[str, Sequence[str]]) -> int:
    limit = _int_param(query, "limit")
    if limit is None:
        return _DEFAULT_LIMIT
    return max(1, min(_MAX_LIMIT, limit))


class RestApi:
    """Answers REST requests from a :class:`SyntheticMarket`'s history; ``clock_ms`` gives server time."""

    def __init__(
        self,
        market: SyntheticMarket,
        clock_ms: Callable[[], int],
        answers: Mapping[str, Callable[[Mapping[str, Sequence[str]]], RestResponse]] | None = None,
        *,
        futures: bool = False,
    ) -> None:
        self._market = market
        #: Binance futures' rows: aggregate trades without spot's ``M``
        self._futures = futures
        self._clock_ms = clock_ms
        #: paths answered by another part of the simulator (``/api/v3/depth``: its books or a recording)
        self._answers = dict(answers or {})
        self._routes: dict[str, Callable[[Mapping[str, Sequence[str]]], Any]] = {
            "/api/v3/ping": lambda q: {},
            "/ping": lambda q: {},
            "/api/v3/time": lambda q: {"serverTime": self._clock_ms()},
            "/api/v3/exchangeInfo": self._exchange_info,
            "/api/v3/trades": self._trades,
            "/api/v3/historicalTrades": self._historical_trades,
            "/api/v3/aggTrades": self._agg_trades,
            "/api/v3/klines": self._klines,
        }

    def handles(self, path: str) -> bool:
        return path in self._routes or path in self._answers

    def handle(self, path: str, query: Mapping[str, Sequence[str]]) -> RestResponse:
        """Answer ``GET path?query``; ``query`` as :func:`urllib.parse.parse_qs` returns it."""
        answer = self._answers.get(path)
        if answer is not None:
            return answer(query)
        route = self._routes.get(path)
        if route is None:
            return RestResponse(404, orjson.dumps({"code": -1, "msg": f"Not found: {path}"}))
        try:
            return RestResponse(200, orjson.dumps(route(query)))
        except _BadRequest as exc:
            return RestResponse(400, orjson.dumps({"code": exc.code, "msg": exc.msg}))

    def hostile(self, kind: Hostile, target: str, host: str) -> RestResponse | StreamedAnswer:
        """The ``kind`` of hostile answer to ``GET target`` (path and query) sent to ``host``."""
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True)
        if kind is Hostile.HUGE:
            return StreamedAnswer(_head(200, [("Transfer-Encoding", "chunked")]), huge_body())
        if kind is Hostile.REDIRECT:
            return RestResponse(302, b"", (("Location", f"http://{_other_host(host)}{target}"),))
        if kind is Hostile.OTHER_SYMBOL:
            return self._other_symbol(parts.path, query)
        answer = self.handle(parts.path, query)
        if kind is Hostile.BAD_JSON:
            return RestResponse(200, answer.body[: max(1, len(answer.body) // 2)], answer.headers)
        body = answer.body
        head = _head(answer.status, [*answer.headers, ("Content-Length", str(len(body)))])
        return StreamedAnswer(head, (body[i : i + 1] for i in range(len(body))), TRICKLE_EVERY_S)

    def _other_symbol(self, path: str, query: Mapping[str, Sequence[str]]) -> RestResponse:
        """Another symbol's rows under the ids asked: as far back from that symbol's newest id as the ids
        asked are from the asked symbol's newest, so their times are alike and their prices are not."""
        if path not in ("/api/v3/historicalTrades", "/api/v3/aggTrades"):
            return self.handle(path, query)
        try:
            symbol = self._symbol(query)
            limit = _limit(query)
            from_id = _int_param(query, "fromId")
        except _BadRequest:
            return self.handle(path, query)
        symbols = self._market.symbols
        other = symbols[(symbols.index(symbol) + 1) % len(symbols)]
        mine, theirs = self._market.history(symbol), self._market.history(other)
        trades = path == "/api/v3/historicalTrades"
        newest = (mine.trade_id_range if trades else mine.agg_id_range)[1]
        their_newest = (theirs.trade_id_range if trades else theirs.agg_id_range)[1]
        start = newest - limit if from_id is None else from_id
        source = their_newest - (newest - start) - (limit if other == symbol else 0)
        if trades:
            found = theirs.trades(from_id=source, limit=limit)
            rows: list[dict[str, Any]] = [{**self._trade_json(r), "id": start + i} for i, r in enumerate(found)]
        else:
            rows = [
                {"a": start + i, "p": format_decimal(p), "q": format_decimal(q), "f": f, "l": last, "T": t, "m": m,
                 "M": True}
                for i, (_, p, q, f, last, t, m) in enumerate(theirs.agg_trades(from_id=source, limit=limit))
            ]
        return RestResponse(200, orjson.dumps(rows))

    def _symbol(self, query: Mapping[str, Sequence[str]]) -> str:
        symbol = _one(query, "symbol")
        if symbol is None:
            raise _BadRequest(-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        if symbol not in self._market.symbols:
            raise _BadRequest(-1121, "Invalid symbol.")
        return symbol

    def _symbol_info(self, symbol: str) -> dict[str, Any]:
        spec = self._market.spec(symbol)
        return {
            "symbol": symbol,
            "status": "TRADING",
            "baseAsset": spec.base_asset,
            "baseAssetPrecision": 8,
            "quoteAsset": spec.quote_asset,
            "quotePrecision": 8,
            "quoteAssetPrecision": 8,
            "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
            "icebergAllowed": True,
            "ocoAllowed": True,
            "isSpotTradingAllowed": True,
            "isMarginTradingAllowed": False,
            "filters": [
                {
                    "filterType": "PRICE_FILTER",
                    "minPrice": format_decimal(spec.tick_size),
                    "maxPrice": "1000000.00000000",
                    "tickSize": format_decimal(spec.tick_size),
                },
                {
                    "filterType": "LOT_SIZE",
                    "minQty": format_decimal(spec.step_size),
                    "maxQty": "9000000.00000000",
                    "stepSize": format_decimal(spec.step_size),
                },
            ],
            "permissions": [],
            "permissionSets": [["SPOT"]],
        }

    def _exchange_info(self, query: Mapping[str, Sequence[str]]) -> Any:
        symbols: Sequence[str] = self._market.symbols
        one = _one(query, "symbol")
        many = _one(query, "symbols")
        if one is not None and many is not None:
            raise _BadRequest(-1128, "Combination of optional parameters invalid.")
        if one is not None:
            symbols = [self._symbol(query)]
        elif many is not None:
            try:
                wanted = orjson.loads(many)
            except orjson.JSONDecodeError:
                wanted = None
            if not isinstance(wanted, list) or not all(isinstance(s, str) for s in wanted):
                raise _BadRequest(-1100, "Illegal characters found in parameter 'symbols'.")
            for s in wanted:
                if s not in self._market.symbols:
                    raise _BadRequest(-1121, "Invalid symbol.")
            symbols = wanted
        return {
            "timezone": "UTC",
            "serverTime": self._clock_ms(),
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
                {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000},
            ],
            "exchangeFilters": [],
            "symbols": [self._symbol_info(s) for s in symbols],
        }

    @staticmethod
    def _trade_json(row: tuple[int, int, int, int, bool]) -> dict[str, Any]:
        trade_id, price, qty, time_ms, maker = row
        return {
            "id": trade_id,
            "price": format_decimal(price),
            "qty": format_decimal(qty),
            "quoteQty": format_decimal(price * qty // SCALE),
            "time": time_ms,
            "isBuyerMaker": maker,
            "isBestMatch": True,
        }

    def _trades(self, query: Mapping[str, Sequence[str]]) -> Any:
        history = self._market.history(self._symbol(query))
        return [self._trade_json(r) for r in history.trades(from_id=None, limit=_limit(query))]

    def _historical_trades(self, query: Mapping[str, Sequence[str]]) -> Any:
        history = self._market.history(self._symbol(query))
        limit = _limit(query)
        rows = history.trades(from_id=_int_param(query, "fromId"), limit=limit)
        return [self._trade_json(r) for r in rows]

    def _agg_trades(self, query: Mapping[str, Sequence[str]]) -> Any:
        history = self._market.history(self._symbol(query))
        limit = _limit(query)
        from_id = _int_param(query, "fromId")
        start = _int_param(query, "startTime")
        end = _int_param(query, "endTime")
        if from_id is not None and (start is not None or end is not None):
            raise _BadRequest(-1128, "Combination of optional parameters invalid.")
        if start is not None and end is not None:
            if end < start:
                raise _BadRequest(-1128, "Combination of optional parameters invalid.")
            if end - start > _HOUR_MS:
                raise _BadRequest(-1127, "More than 1 hours between startTime and endTime.")
        rows = history.agg_trades(from_id=from_id, start_ms=start, end_ms=end, limit=limit)
        if self._futures:
            return [
                {"a": agg_id, "p": format_decimal(price), "q": format_decimal(qty), "f": first, "l": last,
                 "T": time_ms, "m": maker}
                for agg_id, price, qty, first, last, time_ms, maker in rows
            ]  # fmt: skip
        return [
            {
                "a": agg_id,
                "p": format_decimal(price),
                "q": format_decimal(qty),
                "f": first,
                "l": last,
                "T": time_ms,
                "m": maker,
                "M": True,
            }
            for agg_id, price, qty, first, last, time_ms, maker in rows
        ]

    def _klines(self, query: Mapping[str, Sequence[str]]) -> Any:
        symbol = self._symbol(query)
        interval = _one(query, "interval")
        if interval is None:
            raise _BadRequest(-1102, "Mandatory parameter 'interval' was not sent, was empty/null, or malformed.")
        if interval not in KLINE_INTERVAL_MS:
            raise _BadRequest(-1120, "Invalid interval.")
        limit = _limit(query)
        start = _int_param(query, "startTime")
        end = _int_param(query, "endTime")
        if interval not in self._market.kline_intervals:
            return []  # a valid interval this simulator does not keep: no klines
        ms = KLINE_INTERVAL_MS[interval]
        fmt = format_decimal
        rows = self._market.history(symbol).klines(interval, start_ms=start, end_ms=end, limit=limit)
        return [
            [t, fmt(o), fmt(h), fmt(lo), fmt(c), fmt(v), t + ms - 1, fmt(q // SCALE), n, fmt(vb), fmt(qb // SCALE), "0"]
            for t, o, h, lo, c, v, q, n, vb, qb in rows
        ]
