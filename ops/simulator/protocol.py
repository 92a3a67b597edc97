"""Binance's WebSocket market-stream protocol as pure code: no I/O, fed with text, returns bytes.

- Stream names (``btcusdt@trade``, ``btcusdt@kline_1m`` ...) and the URL paths that carry them:
  ``/ws``, ``/ws/<stream>[/<stream>...]`` (raw payloads) and ``/stream?streams=a/b/c`` (combined
  frames ``{"stream": ..., "data": ...}``).
- Live requests (``SUBSCRIBE``, ``UNSUBSCRIBE``, ``LIST_SUBSCRIPTIONS``, ``SET_PROPERTY`` and
  ``GET_PROPERTY`` of ``combined``) and Binance's replies: ``{"result": ..., "id": ...}`` or
  ``{"error": {"code": c, "msg": ...}, "id": ...}`` with code 0 unknown property, 1 invalid value
  type, 2 invalid request, 3 invalid JSON. :class:`StreamSubscriptions` holds one connection's streams.
- :class:`IncomingRateLimiter`: at most N incoming messages in any one second.
- Server-to-client text frames (:func:`text_frame`) and the wire faults (:class:`FaultInjector`).

A stream name is accepted when its symbol is one the venue lists and its suffix is a Binance
market stream (``trade``, ``aggTrade``, ``bookTicker``, ``kline_<interval>``, ``depth...``,
``miniTicker``, ``ticker``, ``avgPrice``); a valid stream that the simulator does not produce stays
quiet, as a quiet market would. An unknown symbol, or anything else, is an invalid request.
"""

from __future__ import annotations

import random
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

__all__ = [
    "ERR_INVALID_JSON",
    "ERR_INVALID_REQUEST",
    "ERR_INVALID_VALUE",
    "ERR_UNKNOWN_PROPERTY",
    "METHODS",
    "ClientRequest",
    "ErrorReply",
    "FaultInjector",
    "FaultRates",
    "IncomingRateLimiter",
    "RequestOutcome",
    "StreamCatalog",
    "StreamSubscriptions",
    "WsTarget",
    "combined_prefix",
    "parse_request",
    "parse_ws_path",
    "server_shutdown_event",
    "text_frame",
]

ERR_UNKNOWN_PROPERTY: Final = 0
ERR_INVALID_VALUE: Final = 1
ERR_INVALID_REQUEST: Final = 2
ERR_INVALID_JSON: Final = 3

METHODS: Final = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_MAX_ID: Final = 2**64 - 1

_STREAM = re.compile(
    r"^(?P<symbol>[a-z0-9]+)@(?P<kind>trade|aggTrade|bookTicker"
    r"|kline_(?:1s|1m|3m|5m|15m|30m|1h|2h|4h|6h|8h|12h|1d|3d|1w|1M)"
    r"|depth(?:5|10|20)?(?:@100ms|@1000ms)?|miniTicker|ticker|avgPrice|ticker_(?:1h|4h|1d))$"
)


class StreamCatalog:
    """The symbols a venue lists, and the check of a stream name against them."""

    def __init__(self, symbols: Iterable[str], pattern: re.Pattern[str] | None = None) -> None:
        self.symbols = frozenset(s.lower() for s in symbols)
        #: the stream names the venue has, with groups ``symbol`` and ``kind`` (None: Binance spot's)
        self.pattern = pattern if pattern is not None else _STREAM

    def problem(self, name: object) -> str | None:
        """Why ``name`` is not a stream of this venue, or None when it is."""
        if not isinstance(name, str):
            return "stream names must be strings"
        match = self.pattern.match(name)
        if match is None:
            return f"invalid stream name {name!r}"
        if match["symbol"] not in self.symbols:
            return f"unknown symbol in stream name {name!r}"
        return None


@dataclass(frozen=True, slots=True)
class WsTarget:
    """What a WebSocket URL asks for: initial streams, and raw or combined payloads."""

    streams: tuple[str, ...]
    combined: bool


def parse_ws_path(path: str, catalog: StreamCatalog, *, max_streams: int) -> WsTarget | str | None:
    """A request path -> its :class:`WsTarget`; an error message if the streams in it are invalid;
    None when the path is not a WebSocket endpoint (``/ws...`` or ``/stream...``)."""
    parts = urlsplit(path)
    route = parts.path
    if route == "/stream" or route == "/stream/":
        values = parse_qs(parts.query).get("streams", [])
        names = [n for v in values for n in v.split("/") if n]
        combined = True
    elif route == "/ws" or route.startswith("/ws/"):
        names = [unquote(n) for n in route[3:].split("/") if n]
        combined = False
    else:
        return None
    unique = tuple(dict.fromkeys(names))
    for name in unique:
        problem = catalog.problem(name)
        if problem is not None:
            return problem
    if len(unique) > max_streams:
        return f"too many streams: {len(unique)} (at most {max_streams} a connection)"
    return WsTarget(unique, combined)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """A well-formed live request: method, params, id (an unsigned integer, a string, or None)."""

    method: str
    params: tuple[Any, ...]
    id: int | str | None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Binance's error reply to a request."""

    code: int
    msg: str
    id: int | str | None = None

    def to_bytes(self) -> bytes:
        return orjson.dumps({"error": {"code": self.code, "msg": self.msg}, "id": self.id})


def _invalid(msg: str, request_id: int | str | None = None) -> ErrorReply:
    return ErrorReply(ERR_INVALID_REQUEST, f"Invalid request: {msg}", request_id)


def parse_request(text: str | bytes) -> ClientRequest | ErrorReply:
    """One incoming text message -> a :class:`ClientRequest`, or the :class:`ErrorReply` to send."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return ErrorReply(ERR_INVALID_JSON, f"Invalid JSON: {exc}")
    if not isinstance(obj, dict):
        return _invalid("expected a JSON object")
    raw_id = obj.get("id")
    valid_int = isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id <= _MAX_ID
    if not (raw_id is None or isinstance(raw_id, str) or valid_int):
        return _invalid("request ID must be an unsigned integer")
    request_id: int | str | None = raw_id
    for key in obj:
        if key not in ("method", "params", "id"):
            return _invalid(f"unknown field `{key}`, expected one of `method`, `params`, `id`", request_id)
    if "method" not in obj:
        return _invalid("missing field `method`", request_id)
    method = obj["method"]
    if not isinstance(method, str) or method not in METHODS:
        expected = ", ".join(f"`{m}`" for m in METHODS)
        return _invalid(f"unknown variant `{method}`, expected one of {expected}", request_id)
    params = obj.get("params", [])
    if not isinstance(params, list):
        return _invalid("params must be a list", request_id)
    return ClientRequest(method, tuple(params), request_id)


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """What handling one message did: the reply to send and the subscription changes."""

    reply: bytes
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


class StreamSubscriptions:
    """One connection's subscriptions (in subscription order) and payload form; pure state."""

    def __init__(self, catalog: StreamCatalog, target: WsTarget, *, max_streams: int) -> None:
        self._catalog = catalog
        self._max = max_streams
        self.streams: dict[str, None] = dict.fromkeys(target.streams)
        self.combined = target.combined

    def handle(self, text: str | bytes) -> RequestOutcome:
        """Apply one incoming message; a request with an invalid part changes nothing."""
        request = parse_request(text)
        if isinstance(request, ErrorReply):
            return RequestOutcome(request.to_bytes())
        rid = request.id
        method, params = request.method, request.params
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            for name in params:
                problem = self._catalog.problem(name)
                if problem is not None:
                    return RequestOutcome(_invalid(problem, rid).to_bytes())
            names: tuple[str, ...] = tuple(dict.fromkeys(params))
            if method == "SUBSCRIBE":
                added = tuple(n for n in names if n not in self.streams)
                if len(self.streams) + len(added) > self._max:
                    msg = f"too many streams: at most {self._max} a connection"
                    return RequestOutcome(_invalid(msg, rid).to_bytes())
                self.streams.update(dict.fromkeys(added))
                return RequestOutcome(_result(None, rid), added=added)
            removed = tuple(n for n in names if n in self.streams)
            for n in removed:
                del self.streams[n]
            return RequestOutcome(_result(None, rid), removed=removed)
        if method == "LIST_SUBSCRIPTIONS":
            if params:
                return RequestOutcome(_invalid("too many parameters", rid).to_bytes())
            return RequestOutcome(_result(list(self.streams), rid))
        # SET_PROPERTY / GET_PROPERTY: the one property is "combined".
        if not params or not isinstance(params[0], str):
            return RequestOutcome(_invalid("property name must be a string", rid).to_bytes())
        if params[0] != "combined":
            return RequestOutcome(ErrorReply(ERR_UNKNOWN_PROPERTY, "Unknown property", rid).to_bytes())
        if method == "GET_PROPERTY":
            if len(params) != 1:
                return RequestOutcome(_invalid("too many parameters", rid).to_bytes())
            return RequestOutcome(_result(self.combined, rid))
        if len(params) != 2:
            return RequestOutcome(_invalid("SET_PROPERTY takes a property name and a value", rid).to_bytes())
        if not isinstance(params[1], bool):
            msg = "Invalid value type: expected Boolean"
            return RequestOutcome(ErrorReply(ERR_INVALID_VALUE, msg, rid).to_bytes())
        self.combined = params[1]
        return RequestOutcome(_result(None, rid))


def _result(value: Any, request_id: int | str | None) -> bytes:
    return orjson.dumps({"result": value, "id": request_id})


class IncomingRateLimiter:
    """At most ``limit`` messages in any window of ``window`` seconds; times from the caller."""

    def __init__(self, limit: int, window: float = 1.0) -> None:
        self.limit = limit
        self.window = window
        self._times: deque[float] = deque()

    def allow(self, now: float) -> bool:
        """Count one message at ``now``; False when it is one too many (Binance then disconnects)."""
        times = self._times
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented WebSocket text frame (server to client, no extension)."""
    n = len(payload)
    if n < 126:
        return b"\x81" + bytes((n,)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def combined_prefix(stream: str) -> bytes:
    """``b'{"stream":"<stream>","data":'``: a combined frame is this, the raw payload, and ``}``."""
    return b'{"stream":' + orjson.dumps(stream) + b',"data":'


def server_shutdown_event(now_ms: int) -> bytes:
    """Binance's notice of a planned close: ``{"e":"serverShutdown","E":<ms>}``."""
    return orjson.dumps({"e": "serverShutdown", "E": now_ms})


@dataclass(frozen=True, slots=True)
class FaultRates:
    """Fractions of outgoing stream frames to corrupt, send twice, or swap with the next one."""

    malformed: float = 0.0
    duplicate: float = 0.0
    out_of_order: float = 0.0

    def __post_init__(self) -> None:
        for name in ("malformed", "duplicate", "out_of_order"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a fraction between 0 and 1, got {value!r}")

    @property
    def any(self) -> bool:
        return bool(self.malformed or self.duplicate or self.out_of_order)


T = TypeVar("T")


class FaultInjector(Generic[T]):
    """Wire faults over the outgoing stream items, batch after batch; pure apart from the rng.

    - out of order: an item is held back and goes out right after the next item of its stream,
      even when that one comes in a later batch; a held item waits at most ``max_hold`` seconds
      (then it goes out late but in order);
    - duplicate: an item is sent twice in a row;
    - malformed: an item is replaced by ``corrupt(item)`` (invalid JSON).
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        stream_of: Callable[[T], str],
        corrupt: Callable[[T], T],
        rates: FaultRates | None = None,
        max_hold: float = 0.5,
    ) -> None:
        self.rng = rng
        self.rates = rates if rates is not None else FaultRates()
        self._stream_of = stream_of
        self._corrupt = corrupt
        self._max_hold = max_hold
        self._held: dict[str, tuple[T, float]] = {}

    @property
    def active(self) -> bool:
        """Whether :meth:`apply` may change anything (faults on, or items held back)."""
        return self.rates.any or bool(self._held)

    def apply(self, items: Iterable[T], now: float) -> list[T]:
        """The items to send for this batch, with the faults applied; ``now`` in seconds."""
        rates, rng, held = self.rates, self.rng, self._held
        out: list[T] = []
        for item in items:
            stream = self._stream_of(item)
            before = held.pop(stream, None)
            if before is None and rates.out_of_order and rng.random() < rates.out_of_order:
                held[stream] = (item, now)
                continue
            self._emit(item, out)
            if before is not None:
                self._emit(before[0], out)
        for stream, (item, since) in list(held.items()):
            if now - since >= self._max_hold or not rates.out_of_order:
                del held[stream]
                self._emit(item, out)
        return out

    def _emit(self, item: T, out: list[T]) -> None:
        rates, rng = self.rates, self.rng
        if rates.malformed and rng.random() < rates.malformed:
            item = self._corrupt(item)
        out.append(item)
        if rates.duplicate and rng.random() < rates.duplicate:
            out.append(item)
