"""The venues' REST API, for backfilling gaps: pure row checks and converters, and one bounded client.

Rows of ``historicalTrades`` and ``aggTrades`` become ticks exactly as the WebSocket frames do (same
fields, same decimal strings), after strict checks: every documented field present with its type,
prices and quantities plain decimal strings, ids at or after the one asked, strictly increasing, no
more rows than asked (:func:`trades_to_ticks`, :func:`agg_trades_to_ticks`, :func:`check_page`).
Rows carry no symbol, so :func:`check_against` compares them with ticks the venue sent live for the
same ids: a disagreement means the answer is another symbol's.

:class:`VenueRest` is one venue's client: one pooled ``httpx.AsyncClient`` (HTTP/1.1 keep-alive) on
the event loop, no thread.  Every request is bounded three ways: a connect timeout, a deadline over the
whole request including its body, and a cap on the body (read as it arrives, given up past the cap).
Redirects are refused, never followed.  A response body is asked for and read unencoded, so the cap
bounds memory exactly (a compressed body could expand a thousandfold inside one read).

Every failure is one of these, raised at the boundary (httpx's own errors never escape)::

    RestError (MarketError)    kind, status, retry_after, elapsed_s
    ├── RestRetryable          (also a Retryable) asking again may succeed: deadline, transport (connection refused,
    │                          reset or closed), http_status 408/418/429/5xx (with Retry-After)
    └── RestRefused            (also a Fatal) this answer will not change soon: http_status (other 4xx),
                               redirect, too_large, encoding, bad_json, bad_row, wrong_symbol

:data:`REFUSAL_KINDS` names the kinds; the client counts each (:class:`RestStats`).
"""

from __future__ import annotations

import asyncio
import re
import time
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx
import orjson

from consumer_sdk.core.errors import Fatal, MarketError, Retryable
from consumer_sdk.core.tick import SCHEMA_VERSION, Tick
from ingestor.binance import BINANCE_SPOT
from ingestor.lifecycle import parse_retry_after
from ingestor.venue import Venue

__all__ = [
    "MAX_BODY",
    "READ_CHUNK",
    "REFUSAL_KINDS",
    "RestError",
    "RestRefused",
    "RestRetryable",
    "RestStats",
    "VenueRest",
    "agg_trades_to_ticks",
    "check_against",
    "check_page",
    "classify_status",
    "rows_to_ticks",
    "trades_to_ticks",
]

RefusalKind = Literal[
    "deadline", "transport", "http_status", "redirect", "too_large", "encoding", "bad_json", "bad_row",
    "wrong_symbol",
]
#: every kind of failure a REST request or its rows can end in, as counted
REFUSAL_KINDS: Final[tuple[RefusalKind, ...]] = (
    "deadline", "transport", "http_status", "redirect", "too_large", "encoding", "bad_json", "bad_row",
    "wrong_symbol",
)
#: the most one read of the socket hands over (httpcore reads 64 KiB at a time): a body is given up
#: past the cap after at most this many bytes more
READ_CHUNK: Final = 65_536
#: default body cap: a 1000-row page of ``historicalTrades`` is about 140 KB, of ``aggTrades`` about 110 KB
MAX_BODY: Final = 4 << 20
_SNIPPET: Final = 200
#: a price or quantity: a plain decimal above zero within the live parser's bounds (:mod:`ingestor.binance`)
_DECIMAL: Final = re.compile(r"(?=[0-9.]*[1-9])[0-9]{1,20}(?:\.[0-9]{0,18})?")
_INT64_MAX: Final = (1 << 63) - 1


class RestError(MarketError):
    """A REST request that gave no usable answer; ``kind`` is one of :data:`REFUSAL_KINDS`.  Always one of
    the two below: ``retryable`` tells which (the project's one split, :mod:`consumer_sdk.core.errors`)."""

    def __init__(
        self, message: str, *, kind: RefusalKind, status: int | None = None, retry_after: float | None = None,
        elapsed_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: RefusalKind = kind
        self.status = status
        #: seconds the venue asked us to wait before asking again (``Retry-After``), if it said
        self.retry_after = retry_after
        #: how long the request took by the client's clock, when it was sent
        self.elapsed_s = elapsed_s


class RestRetryable(RestError, Retryable):
    """Asking again may succeed: after ``retry_after`` seconds when the venue named them."""


class RestRefused(RestError, Fatal):
    """Asking again soon would get the same answer: the caller gives up on this request."""


def classify_status(status: int, retry_after: str | None) -> tuple[bool, float | None]:
    """``(retryable, seconds to wait)`` for an HTTP error status."""
    if status in (408, 418, 429) or status >= 500:
        return True, parse_retry_after(retry_after)
    return False, None


# ------------------------------------------------------------------------------------------------ rows (pure)


def _bad(message: str) -> RestRefused:
    return RestRefused(message, kind="bad_row")


def _id(row: Mapping[str, Any], name: str) -> int:
    value = row.get(name)
    if type(value) is not int or not 0 <= value <= _INT64_MAX:
        raise _bad(f"row field {name!r}: expected a non-negative integer within int64, got {str(value)[:40]}")
    return value


def _decimal(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if type(value) is not str or not _DECIMAL.fullmatch(value):
        raise _bad(f"row field {name!r}: expected a positive decimal string, got {str(value)[:40]!r}")
    return value


def _flag(row: Mapping[str, Any], name: str) -> bool:
    value = row.get(name)
    if type(value) is not bool:
        raise _bad(f"row field {name!r}: expected true or false, got {value!r}")
    return value


def _rows(rows: Any) -> list[dict[str, Any]]:
    if not isinstance(rows, list):
        raise RestRefused(f"expected a JSON list of rows, got {type(rows).__name__}", kind="bad_json")
    odd = next((r for r in rows if type(r) is not dict), None)
    if odd is not None:
        raise RestRefused(f"expected a JSON list of rows, got a {type(odd).__name__} in it", kind="bad_json")
    out: list[dict[str, Any]] = rows
    return out


def trades_to_ticks(rows: Any, venue: str, symbol: str, ts_recv: int) -> list[Tick]:
    """``/api/v3/historicalTrades`` rows -> trade ticks; :class:`RestRefused` (``bad_row``) names the first
    row that lacks a field or has one of the wrong type (nothing of the page is returned then)."""
    out: list[Any] = []
    for r in _rows(rows):
        tid = _id(r, "id")
        out.append({
            "v": SCHEMA_VERSION, "venue": venue, "symbol": symbol, "channel": "trade", "seq": tid,
            "ts_event": _id(r, "time") * 1000, "ts_recv": ts_recv,
            "trade_id": tid, "price": _decimal(r, "price"), "qty": _decimal(r, "qty"),
            "side": "sell" if _flag(r, "isBuyerMaker") else "buy",
        })
    return out


def agg_trades_to_ticks(rows: Any, venue: str, symbol: str, ts_recv: int) -> list[Tick]:
    """``/api/v3/aggTrades`` rows (and futures' ``/fapi/v1/aggTrades``, ``/dapi/v1/aggTrades``: the same row) ->
    agg_trade ticks, checked like :func:`trades_to_ticks`."""
    out: list[Any] = []
    for r in _rows(rows):
        aid = _id(r, "a")
        first, last = _id(r, "f"), _id(r, "l")
        if last < first:
            raise _bad(f"row {aid}: last trade id {last} before first {first}")
        out.append({
            "v": SCHEMA_VERSION, "venue": venue, "symbol": symbol, "channel": "agg_trade", "seq": aid,
            "ts_event": _id(r, "T") * 1000, "ts_recv": ts_recv,
            "trade_id": aid, "price": _decimal(r, "p"), "qty": _decimal(r, "q"),
            "side": "sell" if _flag(r, "m") else "buy",
            "first_trade_id": first, "last_trade_id": last,
        })
    return out


def rows_to_ticks(channel: str, rows: Any, venue: str, symbol: str, ts_recv: int) -> list[Tick]:
    """The converter of ``channel`` (``trade`` or ``agg_trade``)."""
    convert = trades_to_ticks if channel == "trade" else agg_trades_to_ticks
    return convert(rows, venue, symbol, ts_recv)


def check_page(ticks: Sequence[Tick], from_id: int, limit: int) -> None:
    """The page answers ``fromId=from_id&limit=limit``: at most ``limit`` rows, ids from ``from_id`` on,
    strictly increasing (a venue that no longer keeps ``from_id`` starts later).  :class:`RestRefused`
    (``bad_row``) otherwise."""
    if len(ticks) > limit:
        raise _bad(f"{len(ticks)} rows for a limit of {limit}")
    last = from_id - 1
    for t in ticks:
        seq = t["seq"]
        if seq <= last:
            where = "before the id asked" if seq < from_id else "not after the row before it"
            raise _bad(f"id {seq} outside the asked range (from {from_id}): {where}")
        last = seq


_SAME: Final = ("price", "qty", "side", "ts_event", "first_trade_id", "last_trade_id")


def check_against(ticks: Sequence[Tick], known: Sequence[Tick]) -> None:
    """Fetched ``ticks`` agree with ``known`` ones (the venue's live ticks of the same stream, increasing
    ``seq``): where an id is in both, the two are the same trade, and nothing fetched with an id before
    the first known tick happened after it.  REST rows carry no symbol, so this is how an answer for
    another symbol (a proxy or cache that mixed them up) is told: :class:`RestRefused` (``wrong_symbol``).
    Cost: a binary search in ``known`` per fetched tick in its range."""
    first: Any = next((k for k in known if k.get("trade_id") == k["seq"]), None)  # markers say nothing
    if not ticks or first is None:
        return
    lo, hi = first["seq"], known[-1]["seq"]
    for t in ticks:
        seq = t["seq"]
        if seq < lo:
            if t["ts_event"] > first["ts_event"]:
                raise RestRefused(
                    f"row {seq} traded at {t['ts_event'] // 1000} ms, after the live tick {lo} at "
                    f"{first['ts_event'] // 1000} ms: rows of another symbol", kind="wrong_symbol",
                )
            continue
        if seq > hi:
            break
        i = bisect_left(known, seq, key=_seq)
        if i == len(known) or known[i]["seq"] != seq:
            continue
        live: Any = known[i]
        if live.get("trade_id") != seq:
            continue  # a marker or a stand-in: nothing to compare
        row: Any = t
        for name in _SAME:
            if name in live and live[name] != row.get(name):
                raise RestRefused(
                    f"row {seq} has {name} {row.get(name)!r} where the live tick has {live[name]!r}: "
                    "rows of another symbol", kind="wrong_symbol",
                )


def _seq(t: Tick) -> int:
    return t["seq"]


# ------------------------------------------------------------------------------------------------ the client


@dataclass(slots=True)
class RestStats:
    """What one client did, counted by itself (owned by the event loop; read, never written, by others)."""

    requests: int = 0
    #: requests answered with a body that parsed as JSON
    answered: int = 0
    #: failures by kind (:data:`REFUSAL_KINDS`)
    refused: dict[str, int] = field(default_factory=dict)
    #: body bytes read, over all requests, and the most read for any one request
    body_bytes: int = 0
    body_bytes_max: int = 0
    #: the longest any request took, seconds, by the client's clock
    slowest_s: float = 0.0


_HEADERS: Final = {"Accept": "application/json", "Accept-Encoding": "identity", "User-Agent": "market/0.1"}


class VenueRest:
    """One venue's REST API over one pooled client.  ``timeout`` is the deadline of a whole request
    (connect, send, headers and body), ``connect_timeout`` of its connect alone, ``max_body`` the
    bytes a body may have.  Use on one event loop; :meth:`aclose` when done (then it refuses use).

    ``venue`` says which requests :meth:`fetch` sends (its :meth:`~ingestor.venue.Venue.backfill_call`: Binance
    spot's ``/api/v3/...`` by default, USD-M's ``/fapi/v1/aggTrades``, COIN-M's ``/dapi/v1/aggTrades``).

    Cost: a request holds at most ``max_body`` + :data:`READ_CHUNK` bytes and one pooled connection
    (at most ``max_connections``), and returns or fails within ``timeout`` seconds.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 2.0,
        connect_timeout: float = 1.0,
        max_body: int = MAX_BODY,
        max_connections: int = 4,
        transport: httpx.AsyncBaseTransport | None = None,
        venue: Venue = BINANCE_SPOT,
    ) -> None:
        if not timeout > 0 or not connect_timeout > 0 or max_body < 1:
            raise ValueError("timeout, connect_timeout and max_body must be positive")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.max_body = max_body
        self._max_connections = max_connections
        #: what carries the requests (None: httpx's own, over the network; a test gives an ``httpx.MockTransport``)
        self._transport = transport
        #: whose backfill requests :meth:`fetch` sends
        self.venue = venue
        self._client: httpx.AsyncClient | None = None
        self._state: Literal["unopened", "open", "closed"] = "unopened"
        self.stats = RestStats()

    @property
    def state(self) -> str:
        """``unopened`` (no connection yet), ``open`` or ``closed``."""
        return self._state

    def _open(self) -> httpx.AsyncClient:
        if self._client is not None:
            return self._client
        if self._state == "closed":
            raise RuntimeError(f"the REST client for {self.base_url} is closed")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=_HEADERS,
            timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
            limits=httpx.Limits(
                max_connections=self._max_connections, max_keepalive_connections=self._max_connections,
                keepalive_expiry=30.0,
            ),
            follow_redirects=False,
            transport=self._transport,
        )
        self._state = "open"
        return self._client

    async def aclose(self) -> None:
        """Close the pooled connections; later requests raise ``RuntimeError``.  Idempotent."""
        client, self._client = self._client, None
        self._state = "closed"
        if client is not None:
            await client.aclose()

    def backfills(self, channel: str) -> bool:
        """Whether the venue has a REST request for ``channel``'s ids (:meth:`fetch` can repair its gaps)."""
        return self.venue.backfill_call(channel, "X", 0, 1) is not None

    async def fetch(self, channel: str, symbol: str, from_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to ``limit`` trade (or aggregate trade) rows with ids from ``from_id``, oldest first, as the
        venue sent them (check them with :func:`rows_to_ticks` and :func:`check_page`); the request is the
        venue's :meth:`~ingestor.venue.Venue.backfill_call` (:class:`RestRefused` ``http_status`` without asking
        for a channel it has none for)."""
        call = self.venue.backfill_call(channel, symbol, from_id, limit)
        if call is None:
            self._count("http_status")
            raise RestRefused(f"{self.venue.name} has no REST request for the ids of {channel}", kind="http_status")
        path = call.path
        rows = await self.get_json(path, call.params)
        try:
            return _rows(rows)
        except RestRefused as exc:
            self._count(exc.kind)
            raise RestRefused(f"GET {path}: {exc}", kind=exc.kind) from None

    async def fetch_ticks(self, channel: str, symbol: str, from_id: int, limit: int = 1000) -> list[Tick]:
        """As :meth:`fetch`, made ticks: by the venue's own ``backfill_ticks`` when it has one (OKX: an answer in
        an envelope, newest first), else :func:`rows_to_ticks`.  Stamped received when the answer is read; check
        them with :func:`check_page`."""
        convert = getattr(self.venue, "backfill_ticks", None)
        if convert is None:
            rows = await self.fetch(channel, symbol, from_id, limit)
            return rows_to_ticks(channel, rows, self.venue.name, symbol, time.time_ns() // 1000)
        call = self.venue.backfill_call(channel, symbol, from_id, limit)
        if call is None:
            self._count("http_status")
            raise RestRefused(f"{self.venue.name} has no REST request for the ids of {channel}", kind="http_status")
        body = await self.get_json(call.path, call.params)
        try:
            ticks: list[Tick] = convert(channel, body, symbol, time.time_ns() // 1000, from_id)
        except RestError as exc:
            self._count(exc.kind)
            raise
        return ticks

    async def get_json(self, path: str, params: Mapping[str, str | int]) -> Any:
        """``GET path?params`` -> the JSON it answers; a :class:`RestError` otherwise."""
        client = self._open()
        self.stats.requests += 1
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                async with client.stream("GET", path, params=dict(params)) as resp:
                    body = await self._body(resp, path)
            value = orjson.loads(body)
        except RestError as exc:
            exc.elapsed_s = self._took(started)
            self._count(exc.kind)
            raise
        except orjson.JSONDecodeError as exc:
            raise self._fail(RestRefused, f"GET {path}: not JSON: {exc}", "bad_json", started) from exc
        except TimeoutError:
            raise self._fail(
                RestRetryable, f"GET {path}: no whole answer within {self.timeout:g} s", "deadline", started
            ) from None
        except httpx.TimeoutException as exc:
            raise self._fail(RestRetryable, f"GET {path}: {_describe(exc)}", "deadline", started) from exc
        except httpx.UnsupportedProtocol as exc:
            raise self._fail(RestRefused, f"GET {path}: {_describe(exc)}", "transport", started) from exc
        except httpx.HTTPError as exc:
            raise self._fail(RestRetryable, f"GET {path}: {_describe(exc)}", "transport", started) from exc
        self.stats.answered += 1
        self._took(started)
        return value

    async def _body(self, resp: httpx.Response, path: str) -> bytearray:
        status = resp.status_code
        if resp.is_redirect or 300 <= status < 400:
            target = urlsplit(resp.headers.get("Location", ""))
            where = f"{target.scheme}://{target.netloc}" if target.netloc else "elsewhere"
            raise RestRefused(f"GET {path} -> HTTP {status}: redirected to {where}, not followed",
                              kind="redirect", status=status)
        if not 200 <= status < 300:
            snippet = (await self._read(resp, path, _SNIPPET, cut=True))[:_SNIPPET].decode(errors="replace")
            retryable, wait = classify_status(status, resp.headers.get("Retry-After"))
            cls = RestRetryable if retryable else RestRefused
            raise cls(f"GET {path} -> HTTP {status}: {snippet}", kind="http_status", status=status, retry_after=wait)
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RestRefused(f"GET {path}: body encoded as {encoding!r} though none was asked", kind="encoding",
                              status=status)
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise RestRefused(f"GET {path}: body of {int(length)} bytes announced, over the cap of {self.max_body}",
                              kind="too_large", status=status)
        return await self._read(resp, path, self.max_body, cut=False)

    async def _read(self, resp: httpx.Response, path: str, cap: int, *, cut: bool) -> bytearray:
        """The body as it arrives, at most ``cap`` bytes: past it, the rest is left unread and the body is
        cut there (``cut``) or refused as too large."""
        body = bytearray()
        stats = self.stats
        try:
            async for chunk in resp.aiter_raw():
                body += chunk
                stats.body_bytes += len(chunk)
                if len(body) > stats.body_bytes_max:
                    stats.body_bytes_max = len(body)
                if len(body) > cap:
                    if cut:
                        break
                    raise RestRefused(f"GET {path}: body over the cap of {cap} bytes; read {len(body)}, the rest "
                                      "left unread", kind="too_large", status=resp.status_code)
        except httpx.HTTPError:
            if not cut:
                raise
        return body

    def _count(self, kind: str) -> None:
        refused = self.stats.refused
        refused[kind] = refused.get(kind, 0) + 1

    def _took(self, started: float) -> float:
        took = time.monotonic() - started
        if took > self.stats.slowest_s:
            self.stats.slowest_s = took
        return took

    def _fail(self, cls: type[RestError], message: str, kind: RefusalKind, started: float) -> RestError:
        self._count(kind)
        return cls(message, kind=kind, elapsed_s=self._took(started))


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
