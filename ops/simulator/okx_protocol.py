"""OKX v5 public WebSocket and REST market data as pure code: requests in, frames and answers out, no I/O.

- Requests: ``{"op": "subscribe" | "unsubscribe", "args": [{"channel", "instId"}, ...], "id": "..."}`` and the
  text ``ping``.  :func:`handle_request` answers one per-arg ``{"event": "subscribe", "arg": ..., "connId"}`` each
  (the request's ``id`` echoed when it had one) or one ``{"event": "error", "code", "msg", "connId"}`` for the
  whole request: ``60012`` a request that is not JSON or not an operation, ``60018`` a channel or ``instId`` the
  venue does not have (then nothing of the request is subscribed), ``60014`` beyond the operations allowed an hour.
- Pushes (:func:`trade_push`, :func:`bbo_push`, :func:`books_push`) with OKX's field names: decimal strings without
  trailing zeros, times in ms as strings; ``books`` levels ``[price, size, "0", orders]``.
- :class:`OpsLimiter` (subscribe operations an hour and connection) and :class:`ConnectLimiter` (new connections a
  second and address): OKX's 480 and 3.
- ``tickers`` (:func:`ticker_push`): at most every 100 ms an instrument changed, last trade and touch.
- REST: :func:`instruments_answer` lists the instruments of an ``instType``; :func:`history_trades` pages trades
  by ``tradeId`` as OKX does (``after``: older than, ``before``: newer than, newest first, at most 100);
  :func:`books_answer` the ``/api/v5/market/books`` snapshot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from .market import format_decimal

__all__ = [
    "CHANNELS",
    "ERR_INVALID",
    "ERR_NOT_FOUND",
    "ERR_TOO_FREQUENT",
    "HISTORY_PAGE",
    "NOTICE_CODE",
    "PATH",
    "ConnectLimiter",
    "OpsLimiter",
    "RequestAnswer",
    "bbo_push",
    "books_answer",
    "books_push",
    "error_event",
    "handle_request",
    "history_trades",
    "inst_type",
    "instruments_answer",
    "level",
    "notice_event",
    "okx_decimal",
    "ticker_push",
    "trade_push",
]

#: the one WebSocket path served
PATH: Final = "/ws/v5/public"
#: the channels the simulator knows (``tickers`` only in a replay that carries it)
CHANNELS: Final = ("trades", "bbo-tbt", "books", "tickers")
ERR_INVALID: Final = "60012"
ERR_TOO_FREQUENT: Final = "60014"
ERR_NOT_FOUND: Final = "60018"
#: the notice that the connection closes soon for a service upgrade
NOTICE_CODE: Final = "64008"
HISTORY_PAGE: Final = 100


def okx_decimal(units: int) -> str:
    """An amount in 1e-8 units as OKX writes it: ``27123.45``, ``0.001``, ``5`` (no trailing zeros)."""
    text = format_decimal(units).rstrip("0")
    return text[:-1] if text.endswith(".") else text


def _trim(text: str) -> str:
    if "." not in text:
        return text
    text = text.rstrip("0")
    return text[:-1] if text.endswith(".") else text


def level(price: str, size: str) -> list[str]:
    """A ``books`` level from decimal strings: ``[price, size, "0", orders]`` (no orders on a deleted level)."""
    sz = _trim(size)
    return [_trim(price), sz, "0", "0" if sz == "0" else "1"]


def _with_conn(event: dict[str, Any], conn_id: str, request_id: Any) -> bytes:
    if request_id is not None:
        event["id"] = request_id
    event["connId"] = conn_id
    return orjson.dumps(event)


def error_event(code: str, msg: str, conn_id: str, request_id: Any = None) -> bytes:
    return _with_conn({"event": "error", "code": code, "msg": msg}, conn_id, request_id)


def notice_event(conn_id: str) -> bytes:
    """OKX's notice before it closes a connection for a service upgrade (code 64008)."""
    return orjson.dumps({
        "event": "notice", "code": NOTICE_CODE,
        "msg": "The connection will soon be closed for a service upgrade. Please reconnect.", "connId": conn_id,
    })  # fmt: skip


@dataclass(slots=True)
class OpsLimiter:
    """At most ``limit`` subscribe/unsubscribe operations in any ``window`` seconds (OKX: 480 an hour)."""

    limit: int
    window: float = 3600.0
    _times: deque[float] = field(default_factory=deque)

    def allow(self, now: float) -> bool:
        times = self._times
        while times and times[0] <= now - self.window:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        return True


@dataclass(slots=True)
class ConnectLimiter:
    """At most ``limit`` new connections per client address in any one second (OKX: 3)."""

    limit: int
    _times: dict[str, deque[float]] = field(default_factory=dict)

    def allow(self, client: str, now: float) -> bool:
        times = self._times.setdefault(client, deque())
        while times and times[0] <= now - 1.0:
            times.popleft()
        if len(times) >= self.limit:
            return False
        times.append(now)
        if len(self._times) > 10_000:  # forget quiet addresses
            for key in [k for k, v in self._times.items() if not v or v[-1] <= now - 1.0]:
                del self._times[key]
        return True


@dataclass(frozen=True, slots=True)
class RequestAnswer:
    """What one request does: the frames answering it, streams (``channel:instId``) added and removed."""

    replies: tuple[bytes, ...]
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


def handle_request(
    text: str | bytes,
    *,
    instruments: Iterable[str],
    channels: Iterable[str],
    subscribed: set[str],
    conn_id: str,
    ops: OpsLimiter,
    now: float,
) -> RequestAnswer:
    """Answer one request (not the text ``ping``) of a connection holding ``subscribed``; the caller applies
    ``added`` and ``removed`` to it."""
    try:
        request = orjson.loads(text)
    except orjson.JSONDecodeError:
        shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
        return RequestAnswer((error_event(ERR_INVALID, f"Invalid request: {shown[:200]}", conn_id),))
    request_id = request.get("id") if isinstance(request, dict) else None
    if not isinstance(request_id, str) or not request_id.isalnum() or len(request_id) > 32:
        request_id = None
    op = request.get("op") if isinstance(request, dict) else None
    args = request.get("args") if isinstance(request, dict) else None
    if op not in ("subscribe", "unsubscribe") or not isinstance(args, list) or not args:
        shown = orjson.dumps(request).decode()[:200]
        return RequestAnswer((error_event(ERR_INVALID, f"Invalid request: {shown}", conn_id, request_id),))
    if not ops.allow(now):
        return RequestAnswer((error_event(ERR_TOO_FREQUENT, "Requests too frequent.", conn_id, request_id),))
    known_channels, known_inst = frozenset(channels), frozenset(instruments)
    streams: list[str] = []
    clean: list[dict[str, str]] = []
    for arg in args:
        channel = arg.get("channel") if isinstance(arg, dict) else None
        inst = arg.get("instId") if isinstance(arg, dict) else None
        if not isinstance(channel, str) or channel not in known_channels or inst not in known_inst:
            msg = (
                f"Wrong URL or channel:{channel},instId:{inst} doesn't exist. "
                "Please use the correct URL, channel and parameters referring to API document."
            )
            return RequestAnswer((error_event(ERR_NOT_FOUND, msg, conn_id, request_id),))
        assert isinstance(inst, str)
        streams.append(f"{channel}:{inst}")
        clean.append({"channel": channel, "instId": inst})
    replies = tuple(_with_conn({"event": op, "arg": arg}, conn_id, request_id) for arg in clean)
    unique = tuple(dict.fromkeys(streams))
    if op == "subscribe":
        return RequestAnswer(replies, added=tuple(s for s in unique if s not in subscribed))
    return RequestAnswer(replies, removed=tuple(s for s in unique if s in subscribed))


def _arg(channel: str, inst: str) -> bytes:
    return b'{"arg":{"channel":"%s","instId":"%s"}' % (channel.encode(), inst.encode())


def trade_push(inst: str, payload: Mapping[str, Any]) -> bytes:
    """A Binance-shaped ``trade`` payload of the synthetic market -> OKX's ``trades`` push (one trade,
    ``count`` 1; ``side`` the taker's)."""
    data = {
        "instId": inst, "tradeId": str(payload["t"]), "px": _trim(payload["p"]), "sz": _trim(payload["q"]),
        "side": "sell" if payload["m"] else "buy", "ts": str(payload["T"]), "count": "1",
    }
    return _arg("trades", inst) + b',"data":[' + orjson.dumps(data) + b"]}"


def bbo_push(inst: str, payload: Mapping[str, Any], ts_ms: int) -> bytes:
    """A ``bookTicker`` payload -> OKX's ``bbo-tbt`` push (``seqId``: the ticker's update id)."""
    data = {
        "asks": [level(payload["a"], payload["A"])], "bids": [level(payload["b"], payload["B"])],
        "ts": str(ts_ms), "seqId": payload["u"],
    }
    return _arg("bbo-tbt", inst) + b',"data":[' + orjson.dumps(data) + b"]}"


def books_push(
    inst: str,
    action: str,
    bids: Sequence[Sequence[str]],
    asks: Sequence[Sequence[str]],
    ts_ms: int,
    seq_id: int,
    prev_seq_id: int,
    checksum: int = 0,
) -> bytes:
    """A ``books`` message: ``snapshot`` (``prevSeqId`` -1) or ``update``; levels already in OKX's form."""
    data = {
        "asks": asks, "bids": bids, "ts": str(ts_ms), "checksum": checksum, "prevSeqId": prev_seq_id,
        "seqId": seq_id,
    }
    return _arg("books", inst) + b',"action":"' + action.encode() + b'","data":[' + orjson.dumps(data) + b"]}"


def _param(query: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _rest_error(status: int, code: str, msg: str) -> tuple[int, bytes]:
    return status, orjson.dumps({"code": code, "msg": msg, "data": []})


def _int_param(query: Mapping[str, Sequence[str]], name: str) -> int | str | None:
    text = _param(query, name)
    if text is None or text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return f"Parameter {name} error"
    return int(text)


def history_trades(
    query: Mapping[str, Sequence[str]], instruments: Iterable[str], rows: Any
) -> tuple[int, bytes]:
    """``GET /api/v5/market/history-trades``: (HTTP status, body).  ``rows(inst, lo, hi)`` gives the trades with
    ids in ``[lo, hi)`` the venue still holds as ``(id, price, qty, time_ms, buyer_is_maker)`` rows, oldest first,
    and ``rows(inst, None, None)`` the id range held as ``(oldest, next)``.  ``type=1`` pages by ``tradeId``
    (``type=2``, by time, is not served: 51000); ``after=X``: the newest ``limit`` trades below X; ``before=Y``:
    trades above Y (alone: the newest ``limit`` of them, as OKX answers); both: between them; neither: the newest.
    ``limit`` at most 100 (default 100).  Unknown ``instId``: 51001."""
    inst = _param(query, "instId")
    if not inst:
        return _rest_error(400, "50014", "Parameter instId can not be empty.")
    if inst not in frozenset(instruments):
        return _rest_error(400, "51001", "Instrument ID does not exist.")
    kind = _param(query, "type") or "1"
    if kind not in ("1", "2"):
        return _rest_error(400, "51000", "Parameter type error")
    if kind == "2":
        return _rest_error(400, "51000", "Parameter type error: paging by time is not served here")
    parsed = {name: _int_param(query, name) for name in ("after", "before", "limit")}
    for value in parsed.values():
        if isinstance(value, str):
            return _rest_error(400, "51000", value)
    after, before, limit = parsed["after"], parsed["before"], parsed["limit"]
    assert not isinstance(after, str) and not isinstance(before, str) and not isinstance(limit, str)
    limit = HISTORY_PAGE if limit is None or limit == 0 else min(limit, HISTORY_PAGE)
    oldest, nxt = rows(inst, None, None)
    hi = nxt if after is None else min(nxt, after)
    lo = oldest if before is None else max(oldest, before + 1)
    lo = max(lo, hi - limit)
    data = [
        {"instId": inst, "side": "sell" if maker else "buy", "sz": okx_decimal(qty), "px": okx_decimal(price),
         "tradeId": str(tid), "ts": str(time_ms)}
        for tid, price, qty, time_ms, maker in reversed(rows(inst, lo, hi) if lo < hi else [])
    ]  # fmt: skip
    return 200, orjson.dumps({"code": "0", "msg": "", "data": data})


def books_answer(
    query: Mapping[str, Sequence[str]],
    instruments: Iterable[str],
    book: Any,
    ts_ms: int,
) -> tuple[int, bytes]:
    """``GET /api/v5/market/books?instId=&sz=``: the best ``sz`` levels a side (default 1, at most 400);
    ``book(inst, n)`` gives ``(bids, asks, seq_id)`` in OKX's level form, or None when there are no books."""
    inst = _param(query, "instId")
    if not inst:
        return _rest_error(400, "50014", "Parameter instId can not be empty.")
    if inst not in frozenset(instruments):
        return _rest_error(400, "51001", "Instrument ID does not exist.")
    sz = _int_param(query, "sz")
    if isinstance(sz, str):
        return _rest_error(400, "51000", sz)
    n = 1 if sz is None or sz == 0 else min(sz, 400)
    got = book(inst, n)
    if got is None:
        return _rest_error(404, "51001", "No order book is kept for this instrument here.")
    bids, asks, _ = got
    return 200, orjson.dumps({"code": "0", "msg": "", "data": [{"asks": asks, "bids": bids, "ts": str(ts_ms)}]})


def inst_type(inst: str) -> str:
    """``SPOT`` (``BTC-USDT``), ``SWAP`` (``BTC-USDT-SWAP``) or ``FUTURES`` (``BTC-USD-220527``)."""
    parts = inst.split("-")
    if parts[-1] == "SWAP":
        return "SWAP"
    return "FUTURES" if len(parts) > 2 and parts[-1].isdigit() else "SPOT"


def ticker_push(inst: str, ticker: Mapping[str, str], ts_ms: int) -> bytes:
    """A ``tickers`` push: ``ticker`` holds ``last``, ``lastSz``, ``askPx``, ``askSz``, ``bidPx``, ``bidSz``,
    ``open24h``, ``high24h``, ``low24h``, ``vol24h`` (decimal strings)."""
    data = {"instType": inst_type(inst), "instId": inst, **ticker, "volCcy24h": ticker["vol24h"],
            "sodUtc0": ticker["open24h"], "sodUtc8": ticker["open24h"], "ts": str(ts_ms)}  # fmt: skip
    return _arg("tickers", inst) + b',"data":[' + orjson.dumps(data) + b"]}"


def instruments_answer(
    query: Mapping[str, Sequence[str]], specs: Mapping[str, tuple[int, int]]
) -> tuple[int, bytes]:
    """``GET /api/v5/public/instruments?instType=T[&instId=I]``: the instruments of that type (``specs``: instId ->
    (price tick, size step) in 1e-8 units), ``state`` ``live``; no ``instType``: 50014."""
    kind = _param(query, "instType")
    if not kind:
        return _rest_error(400, "50014", "Parameter instType can not be empty.")
    if kind not in ("SPOT", "SWAP", "FUTURES", "MARGIN", "OPTION"):
        return _rest_error(400, "51000", "Parameter instType error")
    only = _param(query, "instId")
    data = []
    for inst, (tick, step) in specs.items():
        if inst_type(inst) != kind or (only and inst != only):
            continue
        parts = inst.split("-")
        row: dict[str, Any] = {
            "instType": kind, "instId": inst, "tickSz": okx_decimal(tick), "lotSz": okx_decimal(step),
            "minSz": okx_decimal(step), "state": "live", "baseCcy": "", "quoteCcy": "", "settleCcy": "",
            "ctVal": "", "ctValCcy": "", "uly": "", "instFamily": "",
        }  # fmt: skip
        if kind == "SPOT":
            row["baseCcy"], row["quoteCcy"] = parts[0], parts[1]
        else:
            family = f"{parts[0]}-{parts[1]}"
            row.update(uly=family, instFamily=family, ctVal="1", ctValCcy=parts[0],
                       settleCcy=parts[0] if parts[1] == "USD" else parts[1])  # fmt: skip
        data.append(row)
    return 200, orjson.dumps({"code": "0", "msg": "", "data": data})
