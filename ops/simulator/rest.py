"""Binance spot REST market-data endpoints over the simulator's bounded history: pure code.

Endpoints (GET, query string parameters as Binance names them):

- ``/api/v3/ping`` (also ``/ping``) -> ``{}``; ``/api/v3/time`` -> ``{"serverTime": ms}``
- ``/api/v3/exchangeInfo[?symbol=S | ?symbols=["A","B"]]`` -> symbols with status ``TRADING``
- ``/api/v3/trades?symbol=S[&limit=N]`` -> the latest trades (default 500, at most 1000)
- ``/api/v3/historicalTrades?symbol=S[&fromId=ID][&limit=N]``
- ``/api/v3/aggTrades?symbol=S[&fromId=ID | &startTime=MS][&endTime=MS][&limit=N]``
- ``/api/v3/klines?symbol=S&interval=I[&startTime=MS][&endTime=MS][&limit=N]``

Answers use Binance's JSON shapes; errors are HTTP 400 with ``{"code": -11xx, "msg": ...}`` as
Binance words them, and unknown paths are 404. Only what the history still holds is returned:
older ids are gone, as on the venue. A limit above 1000 is served as 1000.

Faults (:class:`RestFaults`): a schedule per path of what the next requests get instead of their
answer, one fault per request, in order; then the path answers normally again.  A fault is an HTTP
error status (400, 418, 429, 5xx, ...) with Binance's error body, and with ``Retry-After`` when the
fault names one (``429:30``), or ``close``: the connection is dropped with no answer at all.  The
schedule's text form, ``PATH=ITEM,ITEM;PATH=...`` (:func:`parse_rest_faults`), is what the
simulator's settings, ``market simulate --rest-faults`` and the control endpoint take.
"""

from __future__ import annotations

import http
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .errors import SimulatorConfigError
from .market import KLINE_INTERVAL_MS, SCALE, SyntheticMarket, format_decimal

__all__ = [
    "ALL_PATHS",
    "RestApi",
    "RestFault",
    "RestFaults",
    "RestResponse",
    "fault_response",
    "parse_rest_faults",
    "parse_rest_path",
    "parse_rest_schedule",
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


# ---------------------------------------------------------------------------------------------- faults

#: the schedule of this path applies to every REST path (after a path's own schedule)
ALL_PATHS: Final = "*"
_API_PREFIX: Final = "/api/v3/"
_ITEM: Final = re.compile(r"^(?:(?P<status>[0-9]{3})(?::(?P<retry_after>[0-9]{1,9}))?|(?P<close>close))$")


@dataclass(frozen=True, slots=True)
class RestFault:
    """What one request gets instead of its answer: HTTP ``status`` (4xx/5xx) with Binance's error body and,
    when ``retry_after`` is set, ``Retry-After: <seconds>``; or, with ``status`` None, a connection closed
    with no answer."""

    status: int | None
    retry_after: int | None = None

    def __post_init__(self) -> None:
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
        return self.status is None

    def __str__(self) -> str:
        if self.status is None:
            return "close"
        return f"{self.status}" if self.retry_after is None else f"{self.status}:{self.retry_after}"


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
    """``429:2,503,close`` -> the faults, in order; an empty text is no fault."""
    faults: list[RestFault] = []
    for raw in text.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        m = _ITEM.match(item)
        if m is None:
            raise SimulatorConfigError(
                f"bad REST fault {raw.strip()!r}: expected an HTTP status (e.g. 503), a status with Retry-After "
                "seconds (e.g. 429:2), or close"
            )
        if m.group("close"):
            faults.append(RestFault(None))
        else:
            retry_after = m.group("retry_after")
            faults.append(RestFault(int(m.group("status")), None if retry_after is None else int(retry_after)))
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
                fault = queue.popleft()
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
        return {path: ",".join(map(str, queue)) for path, queue in self._queues.items()}

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

    def __init__(self, market: SyntheticMarket, clock_ms: Callable[[], int]) -> None:
        self._market = market
        self._clock_ms = clock_ms
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
        return path in self._routes

    def handle(self, path: str, query: Mapping[str, Sequence[str]]) -> RestResponse:
        """Answer ``GET path?query``; ``query`` as :func:`urllib.parse.parse_qs` returns it."""
        route = self._routes.get(path)
        if route is None:
            return RestResponse(404, orjson.dumps({"code": -1, "msg": f"Not found: {path}"}))
        try:
            return RestResponse(200, orjson.dumps(route(query)))
        except _BadRequest as exc:
            return RestResponse(400, orjson.dumps({"code": exc.code, "msg": exc.msg}))

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
