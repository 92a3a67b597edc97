# size: one venue's whole public feed (frames, subscribe messages, REST rows, the book checksum, the text
#   heartbeat) shares one set of value checks; each part is a few plain functions.
"""OKX v5 public market data (``wss://ws.okx.com:8443/ws/v5/public``): frames to ticks, pure, no I/O.

:func:`parse_frame` takes one text frame and the receive time (µs) and returns what it is, as
:mod:`ingestor.binance` does for Binance:

- a tick for a push (``{"arg": {"channel", "instId"}, "data": [...]}``) of a channel carried::

      OKX channel                our channel     seq
      trades (or trades-all)     trade           int(tradeId)
      bbo-tbt, tickers           book_ticker     seqId; without one (tickers, captures before late 2022) ts in ms
      books                      depth           seqId; without one (captures before late 2022) ts in ms

  ``trade`` and ``book_ticker`` ticks have exactly the fields Binance's have (:mod:`consumer_sdk.core.tick`);
  ``depth`` is new (:class:`DepthTick`): ``update_id`` (= ``seq``), ``prev_update_id`` (OKX's ``prevSeqId``, ``-1``
  on a snapshot; None when the venue sent none), ``snapshot``, ``bids`` and ``asks`` as ``[price, size]`` pairs of
  the venue's strings (size ``"0"`` deletes the level; OKX's deprecated third field and order count are dropped) and
  ``checksum`` (0 when none was sent).  The symbol is OKX's own ``instId`` (``BTC-USDT``, ``BTC-USDT-SWAP``,
  ``BTC-USD-220527``); the venue is ``okx``; times become µs.  After a sequence reset (OKX's maintenance:
  ``seqId`` below ``prevSeqId``) ``seq`` goes back, and the sequencer refuses the stream's ticks as late until it
  passes the last one stored;
- a :class:`~ingestor.venue.Reply` for ``{"event": "subscribe" | "unsubscribe", "arg": ...}`` (``result``:
  ``{"event", "stream"}``, the stream acknowledged) and ``{"event": "error", "code", "msg"}`` (``error``:
  ``{"code", "msg"}``); ``id`` is the request's id when the answer carries it (OKX's v5 documentation has it echo
  the optional ``id`` of a request, and every request made here carries one; the capture's acks, to requests
  without one, carry none), else None.  OKX acknowledges each stream of a request separately, and an error names
  no stream;
- a :class:`~ingestor.venue.ServerShutdown` for the notice ``64008`` (the connection closes soon for an upgrade);
- ``None`` for the text ``pong`` (the answer to our text ``ping``, :class:`TextKeepalive`), a ``books`` update that
  changes nothing (``seqId == prevSeqId``, no level: OKX's keep-alive for a quiet book) and other events.

Refused with :class:`~ingestor.venue.MalformedFrame`, by ``kind`` (:data:`PARSE_REFUSALS`): Binance's kinds with the
same meaning (``malformed``, ``invalid_utf8``, ``too_deep``, ``bad_number``, ``bad_value``; prices and sizes are
plain decimals of at most 20 integer and 18 fraction digits, ids and times decimal strings within int64), and:
``unknown_channel`` (a push of a channel not carried), ``batched`` (:func:`parse_frame` only, a push of several
entries; :func:`parse_message`, the venue's parser on the ingest path, takes them all) and
``aggregated`` (a ``trades`` push with ``count`` above 1: since 2023 OKX aggregates the fills of one taker order at
one price into one push whose ``tradeId`` is the last of them; it is not a trade, and storing it as one would count
its size twice once the hole before its id is repaired.  The ids it covers are then a hole the sequencer reports
and REST repair fills one trade per id, or marks.  ``trades-all``, on ``/ws/v5/business``, sends every trade).

Checksums: :func:`okx_checksum` is OKX's signed crc32 of the top 25 levels.  OKX stopped sending it in June 2026
(``checksum: 0`` since); a capture from before carries it on every ``books`` message.  Checking it takes the book,
which the parser does not keep: :class:`~ingestor.depth_books.DepthBooks` does (rule
:data:`~ingestor.depth.DepthRule.OKX`, :mod:`ingestor.depth_ws`), whenever it is not 0.  :func:`parse_frame_depth`
gives a ``books`` message as the :class:`~ingestor.depth.DepthDiff` it keeps books from (:func:`depth_diff`);
:func:`continues` is the ``prevSeqId`` rule on a tick.

:class:`OkxV5` is the venue as an :class:`~ingestor.venue.Venue` for the session and the pipeline: its frames are
:func:`parse_message`'s (a push of several entries is several ticks, which the pipeline takes in order), with the
channel ``depth`` :func:`parse_message_depth`'s (the same, a ``books`` message as a
:class:`~ingestor.depth.DepthDiff` for the pipeline's books), its heartbeat the text ``ping``
(:attr:`~ingestor.venue.Heartbeat.TEXT_PING`, decided by :class:`TextKeepalive`), its limits
:data:`MAX_CONNECTS_PER_S` and :data:`MAX_OPS_PER_HOUR` (which the session keeps), its error answers judged by
:func:`classify_error` and its REST repair answers read by :func:`history_trades_to_ticks`.

Stateless and shared (:data:`OKX_V5`; the only state it touches is :mod:`ingestor.fields`' set of prices already
passed); cost per frame: one orjson parse, one regex per value (a price seen before: one set lookup), one dict per
tick (``depth``: one two-item list per level).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal

import orjson

from consumer_sdk.core.tick import SCHEMA_VERSION, Tick
from ingestor.depth import DepthDiff
from ingestor.depth_ws import CHECKSUM_DEPTH, okx_checksum
from ingestor.fields import INT64_MAX as _INT64_MAX
from ingestor.fields import MS_MAX as _MS_MAX
from ingestor.fields import SYMBOL as _SYMBOL
from ingestor.fields import decode as _decode
from ingestor.fields import nonneg as _nonneg
from ingestor.fields import pos as _pos
from ingestor.fields import price as _price
from ingestor.lifecycle import Failure
from ingestor.rest import RestRefused, RestRetryable
from ingestor.venue import Heartbeat, MalformedFrame, Reply, RestCall, ServerShutdown, VenueRequest

__all__ = [
    "BOOK_SNAPSHOT_MAX",
    "CHECKSUM_DEPTH",
    "HISTORY_PAGE",
    "MAX_CONNECTS_PER_S",
    "MAX_OPS_PER_HOUR",
    "MAX_REQUEST_BYTES",
    "OKX_CHANNELS",
    "OKX_V5",
    "PARSE_REFUSALS",
    "PING",
    "PONG",
    "REST_BASE",
    "WS_BASE",
    "DepthTick",
    "OkxV5",
    "TextKeepalive",
    "classify_error",
    "continues",
    "depth_diff",
    "history_trades_to_ticks",
    "okx_checksum",
    "parse_frame",
    "parse_frame_depth",
    "parse_message",
    "parse_message_depth",
]

VENUE: Final = "okx"
_V: Final = SCHEMA_VERSION
WS_BASE: Final = "wss://ws.okx.com:8443"
REST_BASE: Final = "https://www.okx.com"

#: new connections a second per IP, and subscribe/unsubscribe/login operations an hour per connection
MAX_CONNECTS_PER_S: Final = 3
MAX_OPS_PER_HOUR: Final = 480
#: the most one subscribe message may be: OKX documented 4096 bytes for a request's channels before raising it to
#: 64 KB; 4096 holds under both (about 80 streams of ``BTC-USDT-SWAP``'s length)
MAX_REQUEST_BYTES: Final = 4096
#: rows of one ``history-trades`` answer, levels of one REST ``books`` snapshot (the levels a side the checksum
#: covers, :data:`CHECKSUM_DEPTH`, and :func:`okx_checksum` are :mod:`ingestor.depth_ws`'s)
HISTORY_PAGE: Final = 100
BOOK_SNAPSHOT_MAX: Final = 400

#: our channel -> the OKX channel carrying it (``book_ticker``: ``bbo-tbt`` unless :class:`OkxV5` is told ``tickers``)
OKX_CHANNELS: Final = {"trade": "trades", "book_ticker": "bbo-tbt", "depth": "books"}
_CHANNEL_OF: Final = {
    "trades": "trade", "trades-all": "trade", "bbo-tbt": "book_ticker", "tickers": "book_ticker", "books": "depth",
}

#: the kinds of :class:`MalformedFrame` :func:`parse_frame` raises (see the module doc)
PARSE_REFUSALS: Final = (
    "malformed", "invalid_utf8", "too_deep", "bad_number", "bad_value", "unknown_channel", "batched", "aggregated",
)

PING: Final = "ping"
PONG: Final = "pong"
_PONG_BYTES: Final = b"pong"


class DepthTick(Tick):
    """A ``depth`` tick: one ``books`` message (see the module doc)."""

    update_id: int
    prev_update_id: int | None
    snapshot: bool
    bids: list[list[str]]
    asks: list[list[str]]
    checksum: int


# ------------------------------------------------------------------------------------------------ values

_INT32: Final = 1 << 31
# Decimals, symbols and unreadable frames are checked as Binance's are (ingestor.fields, imported above); ids and
# times come as decimal strings here, read by _int_str.
_DIGITS: Final = re.compile(r"[0-9]{1,19}").fullmatch
_NEGATIVE: Final = re.compile(r"-[0-9]{1,19}").fullmatch
#: anything a number could be written as, once it was refused as a plain non-negative integer
_NUMBERISH: Final = re.compile(
    r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?(?:NaN|Infinity|inf)"
).fullmatch


def _int_str(value: Any, limit: int = _INT64_MAX) -> int:
    """An id, a count or a time sent as a decimal string (OKX's way): within ``0..limit``."""
    if type(value) is str and _DIGITS(value) is not None:
        n = int(value)
        if n <= limit:
            return n
    raise _refused_int_str(value, limit)


def _refused_int_str(value: Any, limit: int) -> MalformedFrame:
    if type(value) is not str:
        return MalformedFrame(f"expected an integer string, got {value!r}")
    if _NEGATIVE(value) is not None:
        return MalformedFrame(f"expected a non-negative integer, got {value!r}", "bad_value")
    if _NUMBERISH(value) is not None:
        return MalformedFrame(f"expected an integer string within {limit}, got {value[:40]!r}", "bad_number")
    return MalformedFrame(f"expected an integer string, got {value[:40]!r}")


def _int(value: Any, low: int = 0) -> int:
    """An integer sent as a JSON number (``seqId``, ``prevSeqId``), from ``low`` to int64."""
    if type(value) is int and low <= value <= _INT64_MAX:
        return value
    if type(value) is int:
        kind = "bad_number" if value > _INT64_MAX else "bad_value"
        raise MalformedFrame(f"integer out of range, got {value!r}", kind)
    kind = "bad_number" if type(value) is float else "malformed"
    raise MalformedFrame(f"expected an integer, got {value!r}", kind)


def _checksum_field(value: Any) -> int:
    if type(value) is int and -_INT32 <= value < _INT32:
        return value
    raise MalformedFrame(f"expected a signed 32-bit checksum, got {value!r}", "bad_number" if type(value) is int
                         else "malformed")


def _symbol(value: Any) -> str:
    """An ``instId``: :data:`~ingestor.fields.SYMBOL`'s check, its refusal naming an instrument id."""
    if type(value) is not str or not _SYMBOL(value):
        raise MalformedFrame(f"expected an instrument id, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------ frames

_Entry = Callable[[dict[str, Any], str, int, dict[str, Any]], Tick | None]


def parse_frame(raw: str | bytes, ts_recv: int) -> Tick | Reply | ServerShutdown | None:
    """One frame -> a tick, a reply, a shutdown notice or None (see the module doc); a push of several entries
    is refused (``batched``).  Called once per frame on the hot path."""
    if raw == (PONG if type(raw) is str else _PONG_BYTES):
        return None
    obj = _decode(raw)
    data = obj.get("data")
    if data is None:
        return _event(obj, ts_recv)
    entry, symbol = _push(obj)
    if type(data) is not list or not data:
        raise MalformedFrame("expected data to be a list of entries")
    if len(data) != 1:
        raise MalformedFrame(f"{len(data)} entries in one push; one tick per frame is carried", "batched")
    return _entry(entry, data[0], symbol, ts_recv, obj)


def parse_message(raw: str | bytes, ts_recv: int) -> list[Tick] | Reply | ServerShutdown | None:
    """As :func:`parse_frame`, with every entry of a push as a tick, in the venue's order (none for an entry that
    carries nothing); one refused entry refuses the whole frame."""
    if raw == (PONG if type(raw) is str else _PONG_BYTES):
        return None
    obj = _decode(raw)
    data = obj.get("data")
    if data is None:
        return _event(obj, ts_recv)
    entry, symbol = _push(obj)
    if type(data) is not list or not data:
        raise MalformedFrame("expected data to be a list of entries")
    out = [_entry(entry, d, symbol, ts_recv, obj) for d in data]
    return [t for t in out if t is not None]


def _push(obj: dict[str, Any]) -> tuple[_Entry, str]:
    arg = obj.get("arg")
    if type(arg) is not dict or type(arg.get("channel")) is not str:
        raise MalformedFrame(f"expected arg with a channel, got {str(arg)[:80]}")
    entry = _ENTRIES.get(arg["channel"])
    if entry is None:
        raise MalformedFrame(f"channel {arg['channel'][:40]!r} is not carried", "unknown_channel")
    return entry, _symbol(arg.get("instId"))


def _entry(entry: _Entry, d: Any, symbol: str, ts_recv: int, obj: dict[str, Any]) -> Tick | None:
    if type(d) is not dict:
        raise MalformedFrame(f"expected an entry object, got {str(d)[:40]}")
    inst = d.get("instId")
    if inst is not None and inst != symbol:
        raise MalformedFrame(f"entry of {str(inst)[:40]!r} in a push of {symbol!r}")
    try:
        return entry(d, symbol, ts_recv, obj)
    except (KeyError, TypeError) as exc:
        raise MalformedFrame(f"missing or bad field {exc}") from None


def _trade(d: dict[str, Any], symbol: str, ts_recv: int, obj: dict[str, Any]) -> Tick:
    count = d.get("count")
    if count is not None and count != "1":
        n = _int_str(count)
        if n < 1:
            raise MalformedFrame(f"expected a trade count of at least 1, got {count!r}", "bad_value")
        raise MalformedFrame(
            f"{n} trades aggregated up to id {str(d.get('tradeId'))[:40]}: not a trade", "aggregated"
        )
    tid = _int_str(d["tradeId"])
    side = d["side"]
    if side != "buy" and side != "sell":
        raise MalformedFrame(f"expected side buy or sell, got {str(side)[:40]!r}")
    trade: dict[str, Any] = {
        "v": _V, "venue": VENUE, "symbol": symbol, "channel": "trade", "seq": tid,
        "ts_event": _int_str(d["ts"], _MS_MAX) * 1000, "ts_recv": ts_recv,
        "trade_id": tid, "price": _price(d["px"]), "qty": _pos(d["sz"]), "side": side,
    }
    return trade  # type: ignore[return-value]


def _top(levels: Any, side: str) -> tuple[str, str]:
    if type(levels) is not list or not levels:
        raise MalformedFrame(f"expected at least one {side} level", "bad_value" if levels == [] else "malformed")
    level = levels[0]
    if type(level) is not list or not 2 <= len(level) <= 4:
        raise MalformedFrame(f"expected a level [price, size, ...], got {str(level)[:60]}")
    return _price(level[0]), _pos(level[1])


def _bbo(d: dict[str, Any], symbol: str, ts_recv: int, obj: dict[str, Any]) -> Tick:
    ms = _int_str(d["ts"], _MS_MAX)
    seq = _int(d["seqId"]) if "seqId" in d else ms
    bid_px, bid_qty = _top(d["bids"], "bid")
    ask_px, ask_qty = _top(d["asks"], "ask")
    book: dict[str, Any] = {
        "v": _V, "venue": VENUE, "symbol": symbol, "channel": "book_ticker", "seq": seq,
        "ts_event": ms * 1000, "ts_recv": ts_recv,
        "bid_px": bid_px, "bid_qty": bid_qty, "ask_px": ask_px, "ask_qty": ask_qty, "update_id": seq,
    }
    return book  # type: ignore[return-value]


def _ticker(d: dict[str, Any], symbol: str, ts_recv: int, obj: dict[str, Any]) -> Tick:
    ms = _int_str(d["ts"], _MS_MAX)
    book: dict[str, Any] = {
        "v": _V, "venue": VENUE, "symbol": symbol, "channel": "book_ticker", "seq": ms,
        "ts_event": ms * 1000, "ts_recv": ts_recv,
        "bid_px": _price(d["bidPx"]), "bid_qty": _pos(d["bidSz"]), "ask_px": _price(d["askPx"]),
        "ask_qty": _pos(d["askSz"]), "update_id": ms,
    }
    return book  # type: ignore[return-value]


def _levels(levels: Any) -> list[list[str]]:
    """``[[price, size, "0", orders], ...]`` -> ``[[price, size], ...]``, each a decimal pair (size 0 deletes)."""
    if type(levels) is not list:
        raise MalformedFrame(f"expected a list of levels, got {str(levels)[:40]}")
    out = []
    for level in levels:
        if type(level) is not list or not 2 <= len(level) <= 4:
            raise MalformedFrame(f"expected a level [price, size, ...], got {str(level)[:60]}")
        out.append([_pos(level[0]), _nonneg(level[1])])
    return out


def _depth(d: dict[str, Any], symbol: str, ts_recv: int, obj: dict[str, Any]) -> Tick | None:
    action = obj.get("action")
    if action != "snapshot" and action != "update":
        raise MalformedFrame(f"expected action snapshot or update, got {str(action)[:40]!r}")
    ms = _int_str(d["ts"], _MS_MAX)
    bids, asks = _levels(d["bids"]), _levels(d["asks"])
    prev: int | None = None
    if "seqId" in d:
        seq = _int(d["seqId"])
        prev = _int(d["prevSeqId"], -1)
        if seq == prev and action == "update" and not bids and not asks:
            return None  # the venue's keep-alive for a quiet book: nothing changed
    else:
        seq = ms
    depth: dict[str, Any] = {
        "v": _V, "venue": VENUE, "symbol": symbol, "channel": "depth", "seq": seq,
        "ts_event": ms * 1000, "ts_recv": ts_recv,
        "update_id": seq, "prev_update_id": prev, "snapshot": action == "snapshot",
        "bids": bids, "asks": asks, "checksum": _checksum_field(d.get("checksum", 0)),
    }
    return depth  # type: ignore[return-value]


_ENTRIES: Final[dict[str, _Entry]] = {
    "trades": _trade, "trades-all": _trade, "bbo-tbt": _bbo, "tickers": _ticker, "books": _depth,
}


def _reply_id(value: Any) -> Any:
    """The request id an answer echoes: ours are decimal strings; anything else is passed on as it came."""
    if type(value) is str and _DIGITS(value) is not None:
        return int(value)
    return value


def _event(obj: dict[str, Any], ts_recv: int) -> Reply | ServerShutdown | None:
    ev = obj.get("event")
    if ev == "subscribe" or ev == "unsubscribe":
        arg = obj.get("arg")
        if type(arg) is not dict or type(arg.get("channel")) is not str:
            raise MalformedFrame(f"expected arg with a channel in a {ev} answer")
        stream = f"{arg['channel']}:{_symbol(arg.get('instId'))}"
        return Reply(_reply_id(obj.get("id")), result={"event": ev, "stream": stream})
    if ev == "error":
        code, msg = obj.get("code"), obj.get("msg", "")
        if type(code) is not str or type(msg) is not str:
            raise MalformedFrame("expected an error with a code and a message")
        return Reply(_reply_id(obj.get("id")), error={"code": code, "msg": msg})
    if ev == "notice":
        return ServerShutdown(ts_recv) if obj.get("code") == "64008" else None
    if type(ev) is not str:
        raise MalformedFrame("neither a push (arg, data) nor an event")
    return None  # login, channel-conn-count ...: not carried


# ------------------------------------------------------------------------------------------------ books


def continues(last_update_id: int | None, tick: DepthTick) -> bool | None:
    """Whether ``tick`` follows a book whose last update was ``last_update_id`` (None: no book yet): a snapshot
    always starts one; an update must name it as its ``prevSeqId``.  None when the tick cannot tell (the venue sent
    no sequence ids: the checksum is then the only proof)."""
    if tick["snapshot"]:
        return True
    prev = tick["prev_update_id"]
    if prev is None:
        return None
    return last_update_id is not None and prev == last_update_id


def depth_diff(tick: DepthTick) -> DepthDiff:
    """A ``depth`` tick as the message :class:`~ingestor.depth_books.DepthBooks` keeps books from (its rule
    :data:`~ingestor.depth.DepthRule.OKX`): ``last_id`` and ``first_id`` the ``seqId`` (or the time, for a capture
    without ids), ``prev_id`` the ``prevSeqId`` (None on a snapshot, or when none was sent), the levels as the
    venue's string pairs, ``snapshot`` and ``checksum`` as sent.  Cost: one tuple per level."""
    seq = tick["update_id"]
    snapshot = tick["snapshot"]
    return DepthDiff(
        symbol=tick["symbol"], first_id=seq, last_id=seq, prev_id=None if snapshot else tick["prev_update_id"],
        event_ms=tick["ts_event"] // 1000, bids=tuple([(p, q) for p, q in tick["bids"]]),
        asks=tuple([(p, q) for p, q in tick["asks"]]), snapshot=snapshot, checksum=tick["checksum"],
    )


def parse_frame_depth(raw: str | bytes, ts_recv: int) -> Tick | Reply | ServerShutdown | DepthDiff | None:
    """As :func:`parse_frame`, and a ``books`` message -> a :class:`~ingestor.depth.DepthDiff` (:func:`depth_diff`)
    for the pipeline's order books."""
    out = parse_frame(raw, ts_recv)
    if type(out) is dict and out["channel"] == "depth":
        return depth_diff(out)  # type: ignore[arg-type]
    return out


def parse_message_depth(raw: str | bytes, ts_recv: int) -> list[Tick] | Reply | ServerShutdown | DepthDiff | None:
    """As :func:`parse_message` (a push of several entries: several ticks), and a ``books`` message -> a
    :class:`~ingestor.depth.DepthDiff` (:func:`depth_diff`) for the pipeline's order books: what
    :attr:`OkxV5.parse_frame_depth` is.  OKX sends one book message a push; a ``books`` push of several entries
    is refused (``batched``): each is a state of the book whose checksum holds after it alone, and the pipeline
    hands the books one message a frame.  A keep-alive is no tick (an empty list)."""
    out = parse_message(raw, ts_recv)
    if type(out) is list and out and out[0]["channel"] == "depth":
        if len(out) != 1:
            raise MalformedFrame(f"{len(out)} books entries in one push; one a frame is carried", "batched")
        return depth_diff(out[0])  # type: ignore[arg-type]
    return out


# ------------------------------------------------------------------------------------------------ the venue


class TextKeepalive:
    """OKX's text heartbeat on one connection, as decisions (pure; the clock is passed in; one owner: the
    connection's keepalive task).

    OKX closes a connection that sent nothing for 30 s; the client keeps it with the text ``ping`` once no message
    arrived for ``interval`` (< 30 s) and gives the connection up when nothing, ``pong`` included, arrived within
    ``timeout`` after.  Tell it every message (:meth:`received`) and every ping sent (:meth:`sent`); ask
    :meth:`due` what to do now and :meth:`wait` how long nothing will be due.
    """

    __slots__ = ("_last", "_pinged", "interval", "timeout")

    def __init__(self, now: float, *, interval: float = 20.0, timeout: float = 10.0) -> None:
        if not 0 < interval < 30 or not timeout > 0:
            raise ValueError("interval must be within 0..30 s (OKX closes a connection silent for 30 s), timeout > 0")
        self.interval = interval
        self.timeout = timeout
        self._last = now
        self._pinged: float | None = None

    def received(self, now: float) -> None:
        self._last = now
        self._pinged = None

    def sent(self, now: float) -> None:
        self._pinged = now

    def due(self, now: float) -> Literal["ping", "drop"] | None:
        """``ping``: send :data:`PING` now; ``drop``: no answer in time, give the connection up; None: nothing."""
        if self._pinged is not None:
            return "drop" if now - self._pinged >= self.timeout else None
        return "ping" if now - self._last >= self.interval else None

    def wait(self, now: float) -> float:
        """Seconds until :meth:`due` can say anything but None (0 when it does now)."""
        until = self._pinged + self.timeout if self._pinged is not None else self._last + self.interval
        return max(0.0, until - now)


#: OKX error codes for which asking the same again cannot succeed: a bad request or argument, a channel or
#: instrument that does not exist (here), a channel of another endpoint or beyond the account's tier
_FATAL_CODES: Final = frozenset({
    "60008", "60012", "60013", "60018", "60019", "60027", "60028", "60029", "64000", "64001", "64002", "64003",
})


def classify_error(reply: Reply) -> Failure | None:
    """What an OKX error answer means for the request it answers: None for a success; ``fatal`` when asking again
    cannot help (:data:`_FATAL_CODES`: retrying those only spends the 480 operations an hour a connection has);
    otherwise retry (``60014``, too many requests, and ``63999``, the venue's internal error, as any code not
    known here, which ``alarm`` asks to be looked at)."""
    error = reply.error
    if error is None:
        return None
    code = str(error.get("code")) if isinstance(error, dict) else str(error)
    msg = str(error.get("msg", ""))[:200] if isinstance(error, dict) else ""
    text = f"okx error {code}: {msg}"
    if code in _FATAL_CODES:
        return Failure(text, fatal=True)
    return Failure(text, alarm=code not in ("60014", "63999"))


def history_trades_to_ticks(body: Any, symbol: str, ts_recv: int, from_id: int) -> list[Tick]:
    """An ``/api/v5/market/history-trades`` answer (``{"code": "0", "data": [rows, newest first]}``) -> trade ticks
    of ids from ``from_id`` on, oldest first, as the live ones are.  The venue pages backwards (rows older than
    ``after``), so an answer may reach below ``from_id``: those rows are dropped.  Refused whole, as
    :mod:`ingestor.rest` refuses: a non-zero ``code`` (:class:`~ingestor.rest.RestRetryable` for OKX's busy and
    rate-limit codes 50001, 50004, 50011, 50013, 50026; :class:`~ingestor.rest.RestRefused` otherwise), a row of
    another instrument (``wrong_symbol``), a row that is not a trade or ids not strictly decreasing (``bad_row``).  A
row counting several trades (``count`` above 1) is left out: the ids it stands for stay a hole, which the repair
marks."""
    if type(body) is not dict or type(body.get("data")) is not list:
        raise RestRefused("expected {code, data: [...]}", kind="bad_json")
    code = body.get("code")
    if code != "0":
        message = f"okx REST code {str(code)[:20]}: {str(body.get('msg'))[:200]}"
        if code in ("50001", "50004", "50011", "50013", "50026"):
            raise RestRetryable(message, kind="http_status")
        raise RestRefused(message, kind="http_status")
    out: list[Any] = []
    last: int | None = None
    for row in body["data"]:
        if type(row) is not dict:
            raise RestRefused(f"expected a row object, got {str(row)[:40]}", kind="bad_json")
        if row.get("instId") != symbol:
            raise RestRefused(f"row of {str(row.get('instId'))[:40]!r} for {symbol!r}", kind="wrong_symbol")
        try:
            tick = _trade(row, symbol, ts_recv, body)
        except MalformedFrame as exc:
            if exc.kind != "aggregated":
                raise RestRefused(f"row {str(row.get('tradeId'))[:40]}: {exc}", kind="bad_row") from None
            continue  # not one trade: the ids it covers stay a hole, marked where the repair puts them
        except (KeyError, TypeError) as exc:
            raise RestRefused(f"row {str(row.get('tradeId'))[:40]}: {exc}", kind="bad_row") from None
        if last is not None and tick["seq"] >= last:
            raise RestRefused(f"id {tick['seq']} not below the row before it ({last})", kind="bad_row")
        last = tick["seq"]
        if last >= from_id:
            out.append(tick)
    out.reverse()
    return out


def _arg(stream: str) -> dict[str, str]:
    channel, _, inst = stream.partition(":")
    if channel not in _CHANNEL_OF or not _SYMBOL(inst):
        raise ValueError(f"not a stream this project carries: {stream!r}")
    return {"channel": channel, "instId": inst}


def _requests(op: str, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
    """``{"id": "<n>", "op": op, "args": [...]}`` messages: at most ``per_request`` streams and
    :data:`MAX_REQUEST_BYTES` each, streams in order."""
    if per_request < 1:
        raise ValueError("per_request must be at least 1")
    out: list[VenueRequest] = []
    names: list[str] = []
    args: list[bytes] = []
    size = 0

    def flush() -> None:
        rid = first_id + len(out)
        message = b'{"id":"%d","op":"%s","args":[%s]}' % (rid, op.encode(), b",".join(args))
        out.append(VenueRequest(rid, list(names), message.decode()))
        names.clear()
        args.clear()

    for stream in streams:
        arg = orjson.dumps(_arg(stream))
        envelope = len(b'{"id":"","op":"","args":[]}') + len(str(first_id + len(out))) + len(op)
        if args and (len(args) >= per_request or envelope + size + len(args) + len(arg) > MAX_REQUEST_BYTES):
            flush()
            size = 0
        names.append(stream)
        args.append(arg)
        size += len(arg)
    if args:
        flush()
    return out


class OkxV5:
    """OKX v5 public market data as a :class:`~ingestor.venue.Venue` (see the module doc).

    Stream names are ``<OKX channel>:<instId>`` (``trades:BTC-USDT``, ``books:BTC-USD-220527``).  ``book_ticker``
    is carried by ``bbo-tbt`` (every change of the best levels, with the book's ``seqId``) or, told so,
    ``tickers`` (at most every 100 ms, no id: ``seq`` is its time).  Stateless once built.
    """

    __slots__ = ("_channels",)

    name: Final = VENUE
    ws_path: Final = "/ws/v5/public"
    heartbeat: Final = Heartbeat.TEXT_PING
    #: what the session keeps to: new connections a second (per IP), subscribe operations an hour per connection
    max_connects_per_s: Final = MAX_CONNECTS_PER_S
    max_ops_per_hour: Final = MAX_OPS_PER_HOUR

    #: the module's function itself: it runs once per frame (a push of several entries: several ticks)
    parse_frame = staticmethod(parse_message)
    #: with the channel ``depth``: as :attr:`parse_frame`, a ``books`` message a :class:`~ingestor.depth.DepthDiff`
    #: (:func:`parse_message_depth`)
    parse_frame_depth = staticmethod(parse_message_depth)
    #: an error answer -> retry or not (:func:`classify_error`)
    classify_error = staticmethod(classify_error)

    def __init__(self, *, book_ticker: Literal["bbo-tbt", "tickers"] = "bbo-tbt") -> None:
        if book_ticker not in ("bbo-tbt", "tickers"):
            raise ValueError(f"book_ticker must be bbo-tbt or tickers, got {book_ticker!r}")
        self._channels = {**OKX_CHANNELS, "book_ticker": book_ticker}

    def stream_name(self, symbol: str, channel: str) -> str:
        okx = self._channels.get(channel)
        if okx is None:
            raise ValueError(f"okx carries {', '.join(self._channels)}, not {channel!r}")
        return f"{okx}:{symbol}"

    def split_stream(self, stream: str) -> tuple[str, str]:
        arg = _arg(stream)
        return arg["instId"], _CHANNEL_OF[arg["channel"]]

    def subscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        return _requests("subscribe", streams, first_id, per_request)

    def unsubscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        return _requests("unsubscribe", streams, first_id, per_request)

    def backfill_call(self, channel: str, symbol: str, from_id: int, limit: int) -> RestCall | None:
        """``history-trades`` paged by trade id (``type=1``) for ``trade``; None for the other channels.

        OKX pages backwards: ``after=X`` answers the (at most 100) trades with ids below X, newest first.  Asking
        ``after = from_id + n`` with ``limit = n`` (n = min(limit, 100)) answers ids ``from_id .. from_id + n - 1``
        (:func:`history_trades_to_ticks` turns them oldest first and drops any below ``from_id``).

        It can repair: any hole in one instrument's trade ids that OKX still serves (its last three months of
        trades), 100 ids a request, within the endpoint's rate limit (per IP).  It cannot repair: trades
        older than that (marked); ``book_ticker`` and ``depth``, which have no history (a broken book is rebuilt
        from a new snapshot: the ``books`` channel's own, sent again on resubscribe, or :meth:`snapshot_call`);
        the constituent trades of an ``aggregated`` push if the venue's rows aggregate them too (a row counting
        more than one trade is refused, and the hole is marked).
        """
        if channel != "trade":
            return None
        n = max(1, min(limit, HISTORY_PAGE))
        return RestCall(
            "/api/v5/market/history-trades", {"instId": symbol, "type": "1", "after": from_id + n, "limit": n}
        )

    def backfill_ticks(self, channel: str, body: Any, symbol: str, ts_recv: int, from_id: int) -> list[Tick]:
        """The answer to :meth:`backfill_call` -> ticks of ids from ``from_id`` on, oldest first
        (:func:`history_trades_to_ticks`); :class:`~ingestor.rest.RestRefused` for another channel."""
        if channel != "trade":
            raise RestRefused(f"okx has no REST history for {channel}", kind="http_status")
        return history_trades_to_ticks(body, symbol, ts_recv, from_id)

    def snapshot_call(self, symbol: str, limit: int) -> RestCall:
        """``/api/v5/market/books``, at most 400 levels a side."""
        return RestCall("/api/v5/market/books", {"instId": symbol, "sz": max(1, min(limit, BOOK_SNAPSHOT_MAX))})


#: OKX v5 public market data, ``book_ticker`` from ``bbo-tbt`` (stateless, shared)
OKX_V5: Final = OkxV5()
