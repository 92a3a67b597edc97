"""Recorded REST depth snapshots for replay: loading, checking and choosing one; pure apart from reading the file.

A recording has one JSON object per line, ``{"recv_ts": <float seconds>, "url": "<the request>", "body":
"<the raw JSON reply>"}``, the reply being Binance's ``{"lastUpdateId", "bids", "asks"}`` (futures add ``E``,
``T``, ``symbol``, ``pair``).  The symbol is the request's ``symbol`` parameter.  :func:`load_depth_capture`
refuses a malformed line with a :class:`~ops.simulator.errors.CaptureError` naming the file and line.

In replay, a depth request at capture time ``t`` (seconds, the recording's clock: ``capture_start`` of the
frames file plus the seconds played times the speed) gets :meth:`DepthReplay.pick`: the symbol's last
snapshot recorded at or before ``t``, else its first.  It is served as recorded, byte for byte, unless the
request asks for fewer levels than it holds (then the lists are cut, every string kept as it was).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from .book import SPOT_DEPTH_LIMITS, DepthLimits, parse_depth_query
from .errors import CaptureError
from .rest import RestResponse

__all__ = ["DepthReplay", "RecordedDepth", "capture_start", "load_depth_capture"]


@dataclass(frozen=True, slots=True)
class RecordedDepth:
    """One recorded snapshot: when it was received (capture clock, seconds), for which symbol, the request,
    the raw reply, its ``lastUpdateId`` and its levels a side."""

    recv_ts: float
    symbol: str
    url: str
    body: bytes
    last_update_id: int
    bid_levels: int
    ask_levels: int

    def answer(self, limit: int | None = None) -> bytes:
        """The reply for ``limit`` levels a side: the recorded bytes when it holds no more than that."""
        if limit is None or limit >= max(self.bid_levels, self.ask_levels):
            return self.body
        reply = orjson.loads(self.body)
        reply["bids"] = reply["bids"][:limit]
        reply["asks"] = reply["asks"][:limit]
        return orjson.dumps(reply)


def _levels_problem(levels: Any, name: str) -> str | None:
    if not isinstance(levels, list):
        return f"{name} must be a list"
    for i, level in enumerate(levels):
        if not (isinstance(level, list) and len(level) == 2 and all(isinstance(x, str) for x in level)):
            return f"{name}[{i}] must be a [price, quantity] pair of strings"
    return None


def _record(line: bytes, where: str) -> RecordedDepth:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise CaptureError(f"{where}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise CaptureError(f"{where}: expected a JSON object with recv_ts, url and body")
    missing = [k for k in ("recv_ts", "url", "body") if k not in record]
    if missing:
        raise CaptureError(f"{where}: missing {', '.join(missing)}")
    recv_ts, url, text = record["recv_ts"], record["url"], record["body"]
    if isinstance(recv_ts, bool) or not isinstance(recv_ts, int | float):
        raise CaptureError(f"{where}: recv_ts must be a number of seconds, got {recv_ts!r}")
    if not isinstance(url, str) or not isinstance(text, str):
        raise CaptureError(f"{where}: url and body must be strings")
    symbols = parse_qs(urlsplit(url).query).get("symbol", [])
    if len(symbols) != 1 or not symbols[0]:
        raise CaptureError(f"{where}: the url names no symbol: {url!r}")
    symbol = symbols[0].upper()
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CaptureError(f"{where}: body is not JSON ({exc})") from None
    if not isinstance(body, dict):
        raise CaptureError(f"{where}: body must be a JSON object with lastUpdateId, bids and asks")
    last = body.get("lastUpdateId")
    if isinstance(last, bool) or not isinstance(last, int) or last < 0:
        raise CaptureError(f"{where}: body lastUpdateId must be a non-negative integer, got {last!r}")
    for name in ("bids", "asks"):
        problem = _levels_problem(body.get(name), name)
        if problem is not None:
            raise CaptureError(f"{where}: body {problem}")
    named = body.get("symbol")
    if named is not None and named != symbol:
        raise CaptureError(f"{where}: body is for {named!r}, the url asks for {symbol!r}")
    return RecordedDepth(float(recv_ts), symbol, url, text.encode(), last, len(body["bids"]), len(body["asks"]))


def load_depth_capture(path: str | Path) -> DepthReplay:
    """Read a depth recording; :class:`CaptureError` naming the file and line on bad input, or when it holds
    no snapshot.  Blank lines are skipped."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise CaptureError(f"cannot read depth capture {str(path)!r}: {exc.strerror or exc}") from None
    records = [_record(line, f"{path}:{n}") for n, line in enumerate(lines, start=1) if line.strip()]
    if not records:
        raise CaptureError(f"depth capture {str(path)!r} holds no snapshots")
    return DepthReplay(records)


def capture_start(path: str | Path) -> float:
    """The ``recv_ts`` of a capture's first record (a frames capture, or a depth one): where replay time 0 is
    on the recording's clock.  :class:`CaptureError` when it has none."""
    try:
        with Path(path).open("rb") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    recv_ts = orjson.loads(line)["recv_ts"]
                except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CaptureError(f"{path}:{n}: not a capture record ({exc})") from None
                if isinstance(recv_ts, bool) or not isinstance(recv_ts, int | float):
                    raise CaptureError(f"{path}:{n}: recv_ts must be a number of seconds, got {recv_ts!r}")
                return float(recv_ts)
    except OSError as exc:
        raise CaptureError(f"cannot read capture {str(path)!r}: {exc.strerror or exc}") from None
    raise CaptureError(f"capture {str(path)!r} holds no records")


class DepthReplay:
    """The snapshots of a recording, by symbol in time order (a stable sort: equal times keep file order).
    Immutable once built; :meth:`pick` is a binary search."""

    def __init__(self, records: Sequence[RecordedDepth]) -> None:
        by_symbol: dict[str, list[RecordedDepth]] = {}
        for record in sorted(records, key=_recv_ts):
            by_symbol.setdefault(record.symbol, []).append(record)
        self._by_symbol = by_symbol
        self._times = {s: [r.recv_ts for r in rs] for s, rs in by_symbol.items()}
        self.symbols = tuple(by_symbol)

    def records(self, symbol: str) -> tuple[RecordedDepth, ...]:
        return tuple(self._by_symbol.get(symbol, ()))

    def pick(self, symbol: str, at: float) -> RecordedDepth | None:
        """``symbol``'s snapshot to serve at capture time ``at``: the last recorded at or before it, else the
        first; None for a symbol the recording does not hold."""
        records = self._by_symbol.get(symbol)
        if not records:
            return None
        index = bisect.bisect_right(self._times[symbol], at) - 1
        return records[max(0, index)]

    def answer(
        self, query: Mapping[str, Sequence[str]], at: float, limits: DepthLimits = SPOT_DEPTH_LIMITS
    ) -> RestResponse:
        """``GET <depth path>?query`` at capture time ``at``: the recorded snapshot, or Binance's error."""
        request = parse_depth_query(query, self._by_symbol, limits)
        if isinstance(request, RestResponse):
            return request
        record = self.pick(request.symbol, at)
        assert record is not None, "parse_depth_query accepts only the recording's symbols"
        return RestResponse(200, record.answer(request.limit))


def _recv_ts(record: RecordedDepth) -> float:
    return record.recv_ts
