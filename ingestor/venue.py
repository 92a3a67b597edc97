"""What a venue is to the ingestor: two small seams, both protocols, no I/O here.

:class:`Venue` is everything venue-specific the session and the pipeline need, as pure calls: the
URL path of its WebSocket endpoint, its stream names, the messages that subscribe and unsubscribe
them, how its connections are kept alive, how one frame becomes a tick, and the REST calls that
backfill a gap or fetch a snapshot.  Implemented: :class:`ingestor.binance.BinanceSpot`, :class:`ingestor.okx.OkxV5`,
:class:`ingestor.binance_usdm.BinanceUsdm` (one per routed path, ``/public`` and ``/market``) and
:class:`ingestor.binance_coinm.BinanceCoinm`; :mod:`ingestor.venues` names them (``binance``, ``binance_usdm``,
``binance_coinm``) with what the ingestor needs of a venue as a whole (hosts, channels, which connection carries
which channel, the rule its order books follow).  Another venue is one more class with these members and one
more profile there; the session, the pipeline, the sequencer, the repair and the writer stay as they are.

Optional members, read with ``getattr`` (a venue without them has none of these needs): ``classify_error``
(a :class:`Reply` carrying an error -> an :class:`ingestor.lifecycle.Failure`, ``fatal`` when asking again cannot
help: the session then does not), ``max_connects_per_s`` (new connections a second across the process),
``max_ops_per_hour`` (subscribe requests an hour per connection) and ``backfill_ticks(channel, body, symbol,
ts_recv, from_id)`` (the answer to :meth:`Venue.backfill_call` -> ticks, oldest first, for a venue whose answer is
not Binance's list of rows).  :class:`ingestor.okx.OkxV5` has them all.

A venue that keeps order books (channel ``depth``) has one more member, ``parse_frame_depth``: as
``parse_frame``, and a ``depthUpdate`` -> an :class:`ingestor.depth.DepthDiff` (the pipeline asks for it only
when books are kept).

:class:`Connector` and :class:`FeedLink` are the transport: open a connection, read what it received
in chunks, send a text message, close or drop it.  :class:`ingestor.wsframes.WebSocketConnector` is the
real one (the ``websockets`` library); :class:`ingestor.memory.MemoryConnector` an in-memory fake for
unit tests.  A link signals its end the way ``websockets`` does, by raising
:class:`websockets.exceptions.ConnectionClosed`.

What a frame can be (:meth:`Venue.parse_frame`): a tick (``dict``, :mod:`consumer_sdk.core.tick`), a list of
ticks (a venue whose pushes carry several entries, OKX: in the venue's order, possibly empty), a
:class:`Reply` to one of our requests, a :class:`ServerShutdown` notice, or ``None`` for an event the
project does not carry; a frame it cannot read raises :class:`MalformedFrame`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from consumer_sdk.core.tick import Tick

__all__ = [
    "Chunk",
    "Connector",
    "FeedLink",
    "Heartbeat",
    "MalformedFrame",
    "Reply",
    "RestCall",
    "ServerShutdown",
    "Venue",
    "VenueRequest",
]

#: frames received in one socket read and the time they arrived (µs since the epoch)
Chunk = tuple[int, list[bytes]]


class MalformedFrame(ValueError):
    """A frame that is not JSON, lacks a field its event type requires, or carries a value no tick may hold.

    ``kind`` names what was wrong, one of a small fixed set the venue's parser documents (``malformed`` when
    nothing more precise applies): the ``reason`` label the frame is counted under.
    """

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Reply:
    """The venue's answer to a request we sent: ``result`` on success, ``error`` otherwise."""

    id: Any
    result: Any = None
    error: Any = None


@dataclass(frozen=True, slots=True)
class ServerShutdown:
    """The venue will close this connection soon (planned maintenance or rotation)."""

    event_time_us: int


@dataclass(frozen=True, slots=True)
class VenueRequest:
    """One message to send: its ``id`` (the :class:`Reply` to it carries the same), the streams it asks
    for or gives up, and its text as sent."""

    id: int
    streams: list[str]
    message: str


@dataclass(frozen=True, slots=True)
class RestCall:
    """One REST request, described: ``GET path?params`` against the venue's REST base URL."""

    path: str
    params: Mapping[str, str | int] = field(default_factory=dict)


class Heartbeat(StrEnum):
    """How a venue's connections are kept alive (the styles the session carries out).

    ``ws_ping``: WebSocket ping frames.  The library answers the venue's pings at once with the same
    payload and sends ours every ``ping_interval``; no pong within ``ping_timeout`` drops the
    connection.

    ``text_ping``: the application's own text ``ping`` (OKX), answered with the text ``pong``.  The
    session sends it once nothing arrived for the venue's ``keepalive_interval`` seconds (below the
    venue's own silence limit: OKX closes a connection quiet for 30 s) and drops the connection when
    nothing, ``pong`` included, arrived within its ``keepalive_timeout`` after (``no_pong``); the
    decisions are :class:`ingestor.okx.TextKeepalive`'s.  WebSocket pings are not sent on such a
    connection (the venue's own are still answered).
    """

    WS_PING = "ws_ping"
    TEXT_PING = "text_ping"


class Venue(Protocol):
    """One venue's names, messages and frames, as pure calls (no I/O, no state that changes)."""

    @property
    def name(self) -> str:
        """The venue's name in ticks and keys (``"binance"``); every tick :meth:`parse_frame` returns
        carries it."""

    @property
    def ws_path(self) -> str:
        """Appended to the configured WebSocket base URL (Binance's combined streams: ``/stream``)."""

    @property
    def heartbeat(self) -> Heartbeat:
        """How its connections are kept alive."""

    def stream_name(self, symbol: str, channel: str) -> str:
        """``("BTCUSDT", "agg_trade")`` -> the venue's stream name (``"btcusdt@aggTrade"``)."""

    def split_stream(self, stream: str) -> tuple[str, str]:
        """The venue's stream name -> ``(symbol, channel)``; ``ValueError`` for a stream not carried."""

    def subscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        """Messages asking for ``streams``, at most ``per_request`` each, ids from ``first_id`` on."""

    def unsubscribe_requests(self, streams: Sequence[str], first_id: int, per_request: int) -> list[VenueRequest]:
        """Messages giving ``streams`` up, as :meth:`subscribe_requests`."""

    def parse_frame(self, raw: str | bytes, ts_recv: int) -> Tick | list[Tick] | Reply | ServerShutdown | None:
        """One frame received at ``ts_recv`` (µs) -> what it is (see the module doc); raises
        :class:`MalformedFrame`.  Called once per frame on the hot path: keep it a plain function."""

    def backfill_call(self, channel: str, symbol: str, from_id: int, limit: int) -> RestCall | None:
        """The REST request for up to ``limit`` of a stream's ids from ``from_id`` on, oldest first;
        None when the channel cannot be backfilled (its ids are not contiguous)."""

    def snapshot_call(self, symbol: str, limit: int) -> RestCall:
        """The REST request for an order book snapshot of ``symbol``, ``limit`` levels a side."""


class FeedLink(Protocol):
    """One open connection to a venue, as the session uses it (one reader, any number of senders)."""

    def chunks(self) -> AsyncIterator[list[Chunk]]:
        """Everything received since the last step, as chunks (each one socket read, stamped when its
        bytes arrived); waits when there is nothing.  Ends by raising
        :class:`websockets.exceptions.ConnectionClosed` once the connection is closed and every frame
        received before was handed over."""

    async def send(self, message: str) -> None:
        """Send one text message; :class:`~websockets.exceptions.ConnectionClosed` once closed."""

    async def close(self) -> None:
        """Close cleanly (the closing handshake, bounded by the connection's own timeout)."""

    def abort(self) -> None:
        """Drop the connection now, without a handshake: its reader sees it closed."""


class Connector(Protocol):
    """Opens connections to a venue."""

    async def connect(
        self, url: str, *, open_timeout: float, ping_interval: float | None, ping_timeout: float | None
    ) -> FeedLink:
        """An open connection to ``url`` within ``open_timeout`` seconds, kept alive with WebSocket pings
        every ``ping_interval`` (None: none sent).  A refused handshake raises an exception with
        ``status`` (the HTTP status) and ``retry_after`` (the header, or None), which
        :func:`ingestor.lifecycle.classify_failure` reads; any other failure raises as it is."""
