"""Binance's REST request weight: what each request costs and the per-minute budget of each client address.

Pure code: the caller gives the time (epoch ms) and the client's address.

- :func:`request_weight`: Binance spot's weight of one ``GET``: ``/api/v3/depth`` by its ``limit`` (5, 25, 50,
  250: :data:`~ops.simulator.book.SPOT_DEPTH_LIMITS`), ``exchangeInfo`` 20, ``trades`` and
  ``historicalTrades`` 25, ``aggTrades`` 4, ``klines`` 2, ``ping`` and ``time`` 1.
- :class:`WeightBudget`: ``limit`` weight per clock minute and address, as Binance counts it
  (``exchangeInfo``'s ``REQUEST_WEIGHT`` 6000 per ``MINUTE``).  A request that would pass the limit is not
  served: HTTP 429 with ``Retry-After`` (seconds to the next minute), and so is every request of that client
  until the minute is over.  A client that does not back off, sending ``ban_after`` (2) requests after its
  429 and before its ``Retry-After``, is banned: HTTP 418 with ``Retry-After`` until the ban ends, to every
  request until then (Binance's bans start at 2 minutes).  A refused request costs no weight.  Every served
  request's answer carries ``X-MBX-USED-WEIGHT-1M``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import orjson

from .book import SPOT_DEPTH_LIMITS, DepthLimits
from .rest import RestResponse

__all__ = ["DEPTH_PATH", "FUTURES_REST_WEIGHTS", "REST_WEIGHTS", "USED_WEIGHT_HEADER", "WeightBudget", "request_weight"]

DEPTH_PATH: Final = "/api/v3/depth"
#: Binance spot's weight of each market-data endpoint but depth (whose weight depends on its limit)
REST_WEIGHTS: Final[Mapping[str, int]] = {
    "/api/v3/ping": 1,
    "/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 20,
    "/api/v3/trades": 25,
    "/api/v3/historicalTrades": 25,
    "/api/v3/aggTrades": 4,
    "/api/v3/klines": 2,
}
#: Binance futures' (``/fapi/v1``, ``/dapi/v1``) weights of the same endpoints, under the spot names the simulator
#: serves them by (klines: the weight of up to 500 rows)
FUTURES_REST_WEIGHTS: Final[Mapping[str, int]] = {
    "/api/v3/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 1,
    "/api/v3/aggTrades": 20,
    "/api/v3/klines": 2,
}
USED_WEIGHT_HEADER: Final = "X-MBX-USED-WEIGHT-1M"
_MINUTE_MS: Final = 60_000


def request_weight(
    path: str, query: Mapping[str, Sequence[str]], depth_limits: DepthLimits = SPOT_DEPTH_LIMITS,
    futures: bool = False,
) -> int:
    """The weight of ``GET path?query`` (1 for a path not listed), by spot's weights or with ``futures`` by
    Binance futures'; a depth ``limit`` that is not a number weighs as the default one."""
    if path == DEPTH_PATH:
        values = query.get("limit")
        text = values[-1] if values else ""
        limit = int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else depth_limits.default
        return depth_limits.weight(max(1, min(depth_limits.maximum, limit)))
    return (FUTURES_REST_WEIGHTS if futures else REST_WEIGHTS).get(path, 1)


@dataclass(slots=True)
class _Client:
    minute: int
    used: int = 0
    #: requests refused with 429 in this minute
    limited: int = 0
    banned_until_ms: int = 0


class WeightBudget:
    """``limit`` request weight per clock minute and client address (0: no limit, weight is still counted);
    owned by the server's event loop.  Memory: one small record per address seen in the current minute
    (or banned)."""

    __slots__ = ("_clients", "ban_after", "ban_ms", "limit", "refused")

    def __init__(self, limit: int = 6000, *, ban_after: int = 2, ban_ms: int = 120_000) -> None:
        if limit < 0 or ban_after < 1 or ban_ms < 1:
            raise ValueError(f"a weight budget needs limit >= 0, ban_after >= 1 and ban_ms >= 1, got {limit}, "
                             f"{ban_after} and {ban_ms}")
        self.limit = limit
        self.ban_after = ban_after
        self.ban_ms = ban_ms
        self._clients: dict[str, _Client] = {}
        #: requests refused: 429s and 418s
        self.refused = {429: 0, 418: 0}

    def used(self, client: str, now_ms: int) -> int:
        """The weight ``client`` has used in the current minute."""
        record = self._clients.get(client)
        return record.used if record is not None and record.minute == now_ms // _MINUTE_MS else 0

    def charge(self, client: str, weight: int, now_ms: int) -> RestResponse | None:
        """Count one request of ``weight`` by ``client`` at ``now_ms``: None when it may be served, else the
        429 or 418 answer to give instead."""
        minute = now_ms // _MINUTE_MS
        record = self._clients.get(client)
        if record is None or (record.minute != minute and record.banned_until_ms <= now_ms):
            if len(self._clients) > 1000:
                self._prune(now_ms)
            record = self._clients[client] = _Client(minute)
        if record.banned_until_ms > now_ms:
            return self._refuse(418, record.banned_until_ms - now_ms, now_ms)
        if record.minute != minute:
            record.minute, record.used, record.limited = minute, 0, 0
        if not record.limited and (not self.limit or record.used + weight <= self.limit):
            record.used += weight
            return None
        if record.limited >= self.ban_after:  # asked again and again before the Retry-After of its 429
            record.banned_until_ms = now_ms + self.ban_ms
            return self._refuse(418, self.ban_ms, now_ms)
        record.limited += 1
        return self._refuse(429, (minute + 1) * _MINUTE_MS - now_ms, now_ms)

    def _refuse(self, status: int, wait_ms: int, now_ms: int) -> RestResponse:
        """Binance's words: code -1003, and the ban's end in epoch ms for a 418."""
        self.refused[status] += 1
        if status == 418:
            msg = (f"Way too much request weight used; IP banned until {now_ms + wait_ms}. "
                   "Please use WebSocket Streams for live updates to avoid bans.")
        else:
            msg = (f"Too much request weight used; current limit is {self.limit} request weight per 1 MINUTE. "
                   "Please use WebSocket Streams for live updates to avoid polling the API.")
        retry_after = str(max(1, math.ceil(wait_ms / 1000)))
        return RestResponse(status, orjson.dumps({"code": -1003, "msg": msg}), (("Retry-After", retry_after),))

    def _prune(self, now_ms: int) -> None:
        minute = now_ms // _MINUTE_MS
        self._clients = {
            k: r for k, r in self._clients.items() if r.minute == minute or r.banned_until_ms > now_ms
        }

    def clear(self) -> None:
        """Forget every client's weight and ban (the refusal counts stay)."""
        self._clients.clear()

    def state(self, now_ms: int) -> dict[str, object]:
        return {
            "limit": self.limit,
            "used": {k: r.used for k, r in self._clients.items() if r.minute == now_ms // _MINUTE_MS},
            "banned": sorted(k for k, r in self._clients.items() if r.banned_until_ms > now_ms),
            "refused": {str(k): v for k, v in self.refused.items()},
        }
