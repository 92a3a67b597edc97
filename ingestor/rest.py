"""The venue's REST API, for backfilling gaps: pure converters and one thin fetch.

``historicalTrades`` and ``aggTrades`` rows become ticks exactly as the WebSocket
frames do (same fields, same decimal strings).  HTTP errors are classified:
network errors, 5xx, 429 and 418 are retryable (honouring ``Retry-After``); other
4xx mean a request we should not repeat.  The fetch runs ``urllib`` in a worker
thread: repairs are rare, and this keeps TLS, proxies and redirects standard.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson

from consumer_sdk.tick import SCHEMA_VERSION, Tick
from ingestor.lifecycle import parse_retry_after

__all__ = ["RestError", "VenueRest", "agg_trades_to_ticks", "classify_status", "trades_to_ticks"]


class RestError(Exception):
    def __init__(self, message: str, *, status: int | None, retryable: bool, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


def classify_status(status: int, retry_after: str | None) -> tuple[bool, float | None]:
    """``(retryable, seconds to wait)`` for an HTTP error status."""
    if status in (408, 418, 429) or status >= 500:
        return True, parse_retry_after(retry_after)
    return False, None


def trades_to_ticks(rows: list[dict[str, Any]], venue: str, symbol: str, ts_recv: int) -> list[Tick]:
    """``/api/v3/historicalTrades`` rows -> trade ticks."""
    out: list[Any] = []
    for r in rows:
        tid = int(r["id"])
        out.append({
            "v": SCHEMA_VERSION, "venue": venue, "symbol": symbol, "channel": "trade", "seq": tid,
            "ts_event": int(r["time"]) * 1000, "ts_recv": ts_recv,
            "trade_id": tid, "price": str(r["price"]), "qty": str(r["qty"]),
            "side": "sell" if r["isBuyerMaker"] else "buy",
        })
    return out


def agg_trades_to_ticks(rows: list[dict[str, Any]], venue: str, symbol: str, ts_recv: int) -> list[Tick]:
    """``/api/v3/aggTrades`` rows -> agg_trade ticks."""
    out: list[Any] = []
    for r in rows:
        aid = int(r["a"])
        out.append({
            "v": SCHEMA_VERSION, "venue": venue, "symbol": symbol, "channel": "agg_trade", "seq": aid,
            "ts_event": int(r["T"]) * 1000, "ts_recv": ts_recv,
            "trade_id": aid, "price": str(r["p"]), "qty": str(r["q"]),
            "side": "sell" if r["m"] else "buy",
            "first_trade_id": int(r["f"]), "last_trade_id": int(r["l"]),
        })
    return out


@dataclass(frozen=True, slots=True)
class VenueRest:
    base_url: str
    timeout: float = 10.0

    def _get(self, path: str, params: dict[str, Any]) -> Any:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "market/0.1"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            retryable, wait = classify_status(exc.code, exc.headers.get("Retry-After") if exc.headers else None)
            body = exc.read()[:200].decode(errors="replace")
            raise RestError(
                f"GET {path} -> HTTP {exc.code}: {body}", status=exc.code, retryable=retryable, retry_after=wait
            ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise RestError(f"GET {path}: {exc}", status=None, retryable=True, retry_after=None) from None
        except orjson.JSONDecodeError as exc:
            raise RestError(f"GET {path}: not JSON: {exc}", status=None, retryable=True, retry_after=None) from None

    async def fetch(self, channel: str, symbol: str, from_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` trade (or aggregate trade) rows with ids from ``from_id``, oldest first."""
        path = "/api/v3/historicalTrades" if channel == "trade" else "/api/v3/aggTrades"
        rows = await asyncio.to_thread(self._get, path, {"symbol": symbol, "fromId": from_id, "limit": limit})
        if not isinstance(rows, list):
            raise RestError(f"GET {path}: expected a list", status=None, retryable=True, retry_after=None)
        return rows
