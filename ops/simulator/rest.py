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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .market import KLINE_INTERVAL_MS, SCALE, SyntheticMarket, format_decimal

__all__ = ["RestApi", "RestResponse"]

_MAX_LIMIT: Final = 1000
_DEFAULT_LIMIT: Final = 500
_HOUR_MS: Final = 3_600_000


@dataclass(frozen=True, slots=True)
class RestResponse:
    """An HTTP status and a JSON body."""

    status: int
    body: bytes


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
