"""Venue data frames read in batches, straight off the socket.

The ``websockets`` library owns the connection: the opening handshake, TLS, our pings and their
timeouts, the venue's pings, the closing handshake and every error it reports.  What it does per
*data* frame (a generator-driven parser, an enum and a ``Frame`` object per frame, a message queue
and one ``await recv()`` per message) costs more than the rest of the ingest path put together at
high rates, so :class:`FeedConnection` takes over the reading of frames once the connection is open:

- :func:`read_frames`, a plain function, cuts whole frames out of the bytes received; data frames
  (text or binary, fragmented or not) go to the reader as one list per socket read, stamped with the
  time the bytes arrived; control frames (ping, pong, close) are handed to the library's protocol
  object exactly as its own parser would, so pongs are sent, our pings acknowledged and a close
  handshake carried out by the library;
- anything the venue should not send (a masked frame, reserved bits, an unknown opcode, a control frame
  over 125 bytes or fragmented, a message over ``max_size``) fails the connection through the library,
  with the close code its own parser would use; a message over ``max_size`` is refused from its header, so
  none of its payload is kept;
- a venue sends text: on a :class:`VenueConnection` (what :class:`WebSocketConnector` opens) a binary
  message is dropped (a fragmented one fails the connection, 1003); a plain :class:`FeedConnection` hands
  binary messages over as data.  Of the venue's pings at most :data:`MAX_PINGS_PER_S` a second are
  answered, the rest dropped (RFC 6455 lets an endpoint answer only the latest ping), so a ping flood
  costs no more than a few pongs;
- each of these is counted in :attr:`FeedConnection.refused` by kind (``too_large``, ``binary``,
  ``ping_flood``, ``protocol``) and reported to :attr:`FeedConnection.on_refused` when set;
- a reader that falls behind pauses the socket (at most ``max_pending`` frames wait; reading resumes
  when the reader takes them), so memory stays bounded.  A pause stops the venue's pongs too: a reader
  stuck for longer than the keepalive timeout ends the connection (1011), as with the library's own
  message queue, and the session reconnects and repairs the gap;
- once we close, data frames still arriving are dropped and only the venue's close frame goes to the
  library; after the venue's close frame or a failure nothing more is read (the library waits for EOF).

The switch happens at the frame boundary: the library is given the HTTP response head alone (bytes
after it, frames the server sent at once, go to our reader), so its frame parser never sees a byte.
If the handshake fails, everything goes to the library, which reports the failure as usual; a
connection that is not switched (:attr:`FeedConnection.fast` False) is read through ``recv()``.

:class:`WebSocketConnector` opens these connections: the real :class:`~ingestor.venue.Connector`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, cast

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ProtocolError
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import CLOSED, OPEN

from ingestor.venue import Chunk

__all__ = [
    "DEFAULT_MAX_PENDING",
    "MAX_PINGS_PER_S",
    "Chunk",
    "FeedConnection",
    "FrameError",
    "HandshakeRefused",
    "VenueConnection",
    "WebSocketConnector",
    "read_frames",
]

#: frames waiting for the reader before the socket is paused
DEFAULT_MAX_PENDING: Final = 16_384

#: the venue's pings answered in one second; the rest are dropped (counted ``ping_flood``)
MAX_PINGS_PER_S: Final = 10

_CONTROL: Final = (Opcode.CLOSE, Opcode.PING, Opcode.PONG)
#: the kind a frame error is counted under, by its close code
_ERROR_KINDS: Final[dict[int, str]] = {CloseCode.MESSAGE_TOO_BIG: "too_large", CloseCode.UNSUPPORTED_DATA: "binary"}
_MAX_HEAD: Final = 1 << 16  # an HTTP response head longer than this goes to the library as it is


class FrameError(Exception):
    """A frame the venue must not send; ``code`` is the WebSocket close code to fail the connection with,
    ``kind`` what it is counted as (``too_large``, ``binary`` or ``protocol``)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.kind = _ERROR_KINDS.get(code, "protocol")


def read_frames(
    buf: bytes | bytearray, pos: int, max_size: int, data: list[bytes], control: list[tuple[int, bytes]],
    partial: list[bytes] | None, binary: list[bytes] | None = None,
) -> tuple[int, list[bytes] | None, bool]:
    """Cut the whole frames of ``buf`` from ``pos`` (server frames: unmasked).

    Appends complete messages to ``data`` and control frames to ``control`` as ``(opcode, payload)``;
    ``partial`` holds the fragments of a message still being received.  Stops after a close frame.
    With ``binary``, binary messages go there instead of ``data``, and a fragmented one is refused (1003).
    Returns ``(where the first incomplete frame starts, partial, whether a close frame was read)``.
    Raises :class:`FrameError` on a frame the protocol forbids.
    """
    end = len(buf)
    while end - pos >= 2:
        b0 = buf[pos]
        n = buf[pos + 1]
        if n & 0x80:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "incorrect masking")
        if b0 & 0x70:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits must be 0")
        n &= 0x7F
        head = pos + 2
        if n == 126:
            if end - pos < 4:
                break
            n = (buf[head] << 8) | buf[head + 1]
            head += 2
        elif n == 127:
            if end - pos < 10:
                break
            n = int.from_bytes(buf[head : head + 8], "big")
            head += 8
        opcode = b0 & 0x0F
        if opcode >= 8 and n > 125:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "control frame too long")
        if n > max_size:
            raise FrameError(CloseCode.MESSAGE_TOO_BIG, f"frame of {n} bytes exceeds limit of {max_size} bytes")
        stop = head + n
        if stop > end:
            break
        payload = bytes(buf[head:stop])
        pos = stop
        if opcode == 1 or opcode == 2:
            if partial is not None:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "expected a continuation frame")
            if opcode == 2 and binary is not None:
                if not b0 & 0x80:
                    raise FrameError(CloseCode.UNSUPPORTED_DATA, "fragmented binary message")
                binary.append(payload)
            elif b0 & 0x80:
                data.append(payload)
            else:
                partial = [payload]
        elif opcode == 0:
            if partial is None:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "unexpected continuation frame")
            partial.append(payload)
            size = sum(map(len, partial))
            if size > max_size:
                raise FrameError(CloseCode.MESSAGE_TOO_BIG, f"message of {size} bytes exceeds limit of {max_size}")
            if b0 & 0x80:
                data.append(b"".join(partial))
                partial = None
        elif opcode in _CONTROL:
            if not b0 & 0x80:
                raise FrameError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            control.append((opcode, payload))
            if opcode == Opcode.CLOSE:
                return pos, partial, True
        else:
            raise FrameError(CloseCode.PROTOCOL_ERROR, f"invalid opcode: {opcode}")
    return pos, partial, False


class FeedConnection(ClientConnection):
    """A :class:`~websockets.asyncio.client.ClientConnection` whose data frames are read in batches
    (see the module doc); pass it to ``connect(create_connection=...)`` and read with :meth:`chunks`."""

    max_pending = DEFAULT_MAX_PENDING
    #: binary messages are handed over as data (True) or dropped and counted (False)
    binary_data = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: True once the connection is open and its frames are read here
        self.fast = False
        self._opening = bytearray()
        self._head_passed = False
        self._discarding = False
        self._buf = bytearray()
        self._partial: list[bytes] | None = None
        self._chunks: list[Chunk] = []
        self._pending = 0
        self._paused_reading = False
        self._waiter: asyncio.Future[None] | None = None
        limit = self.protocol.max_message_size
        self._limit = limit if limit is not None else 1 << 62
        #: what the venue sent that was refused, by kind (see the module doc)
        self.refused: dict[str, int] = {}
        #: called with the kind and a description of each refusal, once set (the session's counter and log)
        self.on_refused: Callable[[str, str], None] | None = None
        self._ping_second = 0.0
        self._pings = 0

    # -- the transport's callbacks ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self.fast:
            if self.response is None and not self._head_passed:  # the library parses the HTTP response head
                self._opening += data
                end = self._opening.find(b"\r\n\r\n")
                if end < 0 and len(self._opening) <= _MAX_HEAD:
                    return  # the rest of the response head is still to come
                cut = end + 4 if end >= 0 else len(self._opening)
                head, rest = bytes(self._opening[:cut]), bytes(self._opening[cut:])
                self._opening = bytearray()
                self._head_passed = True  # from here on the library gets everything (a refusal's body, say)
                super().data_received(head)
                if self.response is not None and self.protocol.state is OPEN:
                    # Switched at the frame boundary: the library's frame parser never saw a byte.
                    self.fast = True
                    if rest:
                        self.data_received(rest)
                elif rest:
                    super().data_received(rest)
                return
            super().data_received(data)
            return
        if self._discarding:
            return  # after the venue's close frame or a failure: nothing more is read (until EOF)
        open_ = self.protocol.state is OPEN
        buf = self._buf
        if buf:
            buf += data
            src: bytes | bytearray = buf
        else:
            src = data
        frames: list[bytes] = []
        control: list[tuple[int, bytes]] = []
        binary: list[bytes] | None = None if self.binary_data else []
        try:
            pos, self._partial, closed = read_frames(src, 0, self._limit, frames, control, self._partial, binary)
        except FrameError as exc:
            if frames and open_:  # the whole frames before the bad one are the venue's data: hand them over
                self._deliver(frames)
            self._refuse(exc.kind, str(exc))
            self._fail(exc.code, str(exc))
            return
        if binary:
            for payload in binary:
                self._refuse("binary", f"binary message of {len(payload)} bytes dropped")
        if src is buf:
            del buf[:pos]
        elif pos < len(data):
            buf += data[pos:]
        if frames and open_:  # once we are closing, the reader is gone: what still arrives is dropped
            self._deliver(frames)
        if control:
            for opcode, payload in control:
                if not open_ and opcode != Opcode.CLOSE:
                    continue  # closing: only the venue's close frame matters now
                if opcode == Opcode.PING and self._ping_flood():
                    continue
                try:
                    self.protocol.recv_frame(Frame(Opcode(opcode), payload))
                except ProtocolError as exc:
                    self._fail(CloseCode.PROTOCOL_ERROR, str(exc))
                    return
                except UnicodeDecodeError as exc:  # a close reason that is not UTF-8
                    self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                    return
            self._after_protocol()
        if closed:
            self._discarding = True
            buf.clear()
            self._close_soon()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._wake()

    # -- the reader's side ------------------------------------------------------------------------------------
    async def chunks(self) -> AsyncIterator[list[Chunk]]:
        """Everything received since the last call, as chunks; waits when there is nothing.

        Ends by raising :class:`~websockets.exceptions.ConnectionClosed` once the connection is closed
        and every frame received before was handed over.
        """
        while True:
            if self._chunks:
                out, self._chunks = self._chunks, []
                self._pending = 0
                if self._paused_reading:
                    self._paused_reading = False
                    self.transport.resume_reading()
                yield out
                continue
            if not self.fast:  # the library's reader, one message at a time
                raw = await self.recv(decode=False)
                yield [(time.time_ns() // 1000, [raw])]
                continue
            if self.protocol.state is not OPEN:  # closing or closed, and everything received handed over
                await asyncio.shield(self.connection_lost_waiter)
                raise self.protocol.close_exc
            waiter = self.loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None

    def abort(self) -> None:
        """Drop the connection now (no closing handshake): the reader sees it closed."""
        self.transport.abort()

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Close as the library does; first undo our own pause, or the venue's close frame could not be read."""
        if self._paused_reading:
            self._paused_reading = False
            self.transport.resume_reading()
        await super().close(code, reason)

    # -- private -------------------------------------------------------------------------------------------------
    def _refuse(self, kind: str, detail: str) -> None:
        self.refused[kind] = self.refused.get(kind, 0) + 1
        if self.on_refused is not None:
            self.on_refused(kind, detail)

    def _ping_flood(self) -> bool:
        """Whether this ping is one too many this second (then it is counted, and left unanswered)."""
        now = time.monotonic()
        if now - self._ping_second >= 1.0:
            self._ping_second = now
            self._pings = 0
        self._pings += 1
        if self._pings <= MAX_PINGS_PER_S:
            return False
        self._refuse("ping_flood", f"more than {MAX_PINGS_PER_S} pings in a second")
        return True

    def _deliver(self, frames: list[bytes]) -> None:
        self._chunks.append((time.time_ns() // 1000, frames))
        self._pending += len(frames)
        if self._pending >= self.max_pending and not self._paused_reading:
            self._paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, code: int, reason: str) -> None:
        self._buf.clear()
        self._partial = None
        self._discarding = True
        self.protocol.fail(code, reason)
        self._after_protocol()
        self._close_soon()
        self._wake()

    def _close_soon(self) -> None:
        """The venue has ``close_timeout`` to close the TCP connection after the close handshake or a failure;
        then it is aborted, so a reader never waits on a venue that keeps a dead connection open."""
        if self.close_timeout is not None:
            self.loop.call_later(self.close_timeout, self._abort_unless_closed)

    def _abort_unless_closed(self) -> None:
        if self.protocol.state is not CLOSED:
            self.transport.abort()

    def _after_protocol(self) -> None:
        """What the library does after its parser ran: send what the protocol queued, arm the close
        deadline, process the events (a pong acknowledges our ping)."""
        events = self.protocol.events_received()
        try:
            self.send_data()
        except Exception as exc:
            self.set_connection_exc(exc)
        if self.protocol.close_expected() and self.close_deadline is None and self.close_timeout is not None:
            self.close_deadline = self.loop.time() + self.close_timeout
        for event in events:
            self.process_event(event)


class VenueConnection(FeedConnection):
    """A venue's connection: it sends text, so a binary message is dropped and counted (see the module doc)."""

    binary_data = False


class HandshakeRefused(Exception):
    """The venue refused the WebSocket handshake (or the URL is not one): ``status`` is the HTTP status
    (400 for a URL that is not a WebSocket URL), ``retry_after`` its ``Retry-After`` header, if any."""

    def __init__(self, message: str, status: int, retry_after: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class WebSocketConnector:
    """Opens :class:`VenueConnection` s with the ``websockets`` library (the real
    :class:`~ingestor.venue.Connector`): no compression, messages up to 1 MiB, at most 64 queued by the
    library before the switch, 2 s for the closing handshake, binary messages dropped.  A refused handshake raises
    :class:`HandshakeRefused`; anything else (DNS, TCP, TLS, a timeout) raises as the library does.
    """

    __slots__ = ()

    async def connect(
        self, url: str, *, open_timeout: float, ping_interval: float | None, ping_timeout: float | None
    ) -> FeedConnection:
        try:
            ws = await connect(
                url, open_timeout=open_timeout, ping_interval=ping_interval, ping_timeout=ping_timeout,
                close_timeout=2, max_size=2**20, max_queue=64, compression=None, create_connection=VenueConnection,
            )
        except websockets.InvalidURI as exc:
            raise HandshakeRefused(f"invalid venue URL: {exc}", 400, None) from exc
        except websockets.InvalidStatus as exc:
            response = exc.response
            raise HandshakeRefused(str(exc), response.status_code, response.headers.get("Retry-After")) from exc
        return cast(FeedConnection, ws)
