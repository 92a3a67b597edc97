"""What both simulator servers (:mod:`.server`, :mod:`.okx`) share on the wire: their statistics and the
plain HTTP answer they give REST and control requests."""

from __future__ import annotations

import email.utils
import http
from collections.abc import Mapping
from dataclasses import dataclass

from websockets.datastructures import Headers
from websockets.http11 import Response

__all__ = ["SimulatorStats", "json_response"]


@dataclass(frozen=True, slots=True)
class SimulatorStats:
    """Counters since start."""

    #: open WebSocket connections
    connections: int
    #: text frames written over all connections (stream frames, replies, serverShutdown)
    frames_sent: int
    bytes_sent: int
    #: synthetic ticks generated per kind: trade, aggTrade, bookTicker, kline (sent or not)
    ticks_generated: Mapping[str, int]
    ticks_total: int
    #: capture frames played (sent to whoever subscribed to their stream)
    replayed_frames: int
    pongs_received: int
    slow_consumer_closes: int
    rate_limit_closes: int


def json_response(status: int, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> Response:
    """A complete HTTP answer with a JSON body; the connection closes after it."""
    st = http.HTTPStatus(status)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/json;charset=UTF-8"),
            *extra,
        ]
    )
    return Response(st.value, st.phrase, headers, body)
