"""The batch frame reader: the pure frame cutter, then a real connection through it.

Frames are built with the ``websockets`` library's own serializer, so what is cut here is what a
server sends; the live tests run a real ``websockets`` server and check that the library still does
everything else (pings both ways, the close handshake, errors) once our reader has taken over.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import CloseCode, Frame, Opcode

from ingestor.wsframes import Chunk, FeedConnection, FrameError, read_frames

UNIT = 5.0


def wire(*frames: Frame) -> bytes:
    return b"".join(f.serialize(mask=False, extensions=[]) for f in frames)


def text(payload: bytes, fin: bool = True) -> Frame:
    return Frame(Opcode.TEXT, payload, fin=fin)


def cut(buf: bytes, max_size: int = 1 << 20) -> tuple[list[bytes], list[tuple[int, bytes]], int, bool]:
    data: list[bytes] = []
    control: list[tuple[int, bytes]] = []
    pos, partial, closed = read_frames(buf, 0, max_size, data, control, None)
    assert partial is None
    return data, control, pos, closed


# -- the pure cutter ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
def test_every_length_encoding(size: int) -> None:
    payload = bytes(random.Random(size).getrandbits(8) for _ in range(min(size, 300))) * (size // 300 + 1)
    payload = payload[:size]
    data, control, pos, closed = cut(wire(text(payload), Frame(Opcode.BINARY, b"x")))
    assert data == [payload, b"x"] and control == [] and not closed
    assert pos == len(wire(text(payload), Frame(Opcode.BINARY, b"x")))


def test_any_split_point_gives_the_same_frames() -> None:
    """Bytes arrive in arbitrary pieces: carrying the incomplete tail over gives every frame once."""
    frames = [text(b'{"e":"trade","t":%d}' % i) for i in range(50)] + [text(b"y" * 300), text(b"z" * 70_000)]
    stream = wire(*frames)
    rng = random.Random(7)
    for _ in range(200):
        got: list[bytes] = []
        buf = bytearray()
        at = 0
        while at < len(stream):
            step = rng.randint(1, 900)
            buf += stream[at : at + step]
            at += step
            control: list[tuple[int, bytes]] = []
            pos, partial, closed = read_frames(buf, 0, 1 << 20, got, control, None)
            assert partial is None and not closed and not control
            del buf[:pos]
        assert got == [f.data for f in frames] and not buf


def test_fragments_are_joined_and_control_frames_may_come_between() -> None:
    stream = wire(text(b"ab", fin=False), Frame(Opcode.PING, b"p"), Frame(Opcode.CONT, b"cd", fin=False),
                  Frame(Opcode.CONT, b"ef"), text(b"next"))
    data, control, pos, _ = cut(stream)
    assert data == [b"abcdef", b"next"] and control == [(Opcode.PING, b"p")] and pos == len(stream)
    # The first fragment alone: kept as partial, nothing delivered.
    first = wire(text(b"ab", fin=False))
    out: list[bytes] = []
    pos, partial, _ = read_frames(first, 0, 100, out, [], None)
    assert out == [] and partial == [b"ab"] and pos == len(first)


def test_stops_after_a_close_frame() -> None:
    stream = wire(text(b"a"), Frame(Opcode.CLOSE, b"\x03\xe8bye"), text(b"after"))
    data, control, pos, closed = cut(stream)
    assert data == [b"a"] and control == [(Opcode.CLOSE, b"\x03\xe8bye")] and closed
    assert pos == len(wire(text(b"a"), Frame(Opcode.CLOSE, b"\x03\xe8bye")))


@pytest.mark.parametrize(("raw", "code", "reason"), [
    (Frame(Opcode.TEXT, b"x").serialize(mask=True, extensions=[]), CloseCode.PROTOCOL_ERROR, "masking"),
    (bytes([0x81 | 0x40, 1]) + b"x", CloseCode.PROTOCOL_ERROR, "reserved bits"),
    (bytes([0x83, 1]) + b"x", CloseCode.PROTOCOL_ERROR, "invalid opcode"),
    (bytes([0x09, 1]) + b"x", CloseCode.PROTOCOL_ERROR, "fragmented control"),
    (bytes([0x89, 126, 0, 126]) + b"x" * 126, CloseCode.PROTOCOL_ERROR, "control frame too long"),
    (wire(Frame(Opcode.CONT, b"x")), CloseCode.PROTOCOL_ERROR, "unexpected continuation"),
    (wire(text(b"a", fin=False), text(b"b")), CloseCode.PROTOCOL_ERROR, "expected a continuation"),
    (wire(text(b"x" * 101)), CloseCode.MESSAGE_TOO_BIG, "exceeds limit"),
    (wire(text(b"x" * 60, fin=False), Frame(Opcode.CONT, b"y" * 60)), CloseCode.MESSAGE_TOO_BIG, "exceeds limit"),
])
def test_forbidden_frames(raw: bytes, code: int, reason: str) -> None:
    with pytest.raises(FrameError, match=reason) as info:
        read_frames(raw, 0, 100, [], [], None)
    assert info.value.code == code


# -- a real connection --------------------------------------------------------------------------------------------
async def drain(chunks: AsyncIterator[list[Chunk]], want: int) -> list[bytes]:
    got: list[bytes] = []
    async with asyncio.timeout(UNIT):
        async for batch in chunks:
            for _, frames in batch:
                got += frames
            if len(got) >= want:
                return got
    return got


async def open_feed(port: int, **kwargs: Any) -> FeedConnection:
    ws = await connect(f"ws://127.0.0.1:{port}", create_connection=FeedConnection, compression=None, **kwargs)
    assert isinstance(ws, FeedConnection)
    return ws


async def test_live_frames_pings_and_a_clean_close() -> None:
    async def handler(conn: ServerConnection) -> None:
        for i in range(5000):
            await conn.send(b'{"i":%d}' % i if i % 2 else f'{{"i":{i}}}')
        await conn.ping(b"from-server")  # the library answers it through our reader
        await conn.send("last")
        await conn.close(1000, "done")

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await open_feed(port, ping_interval=None)
        assert ws.fast
        chunks = ws.chunks()
        got = await drain(chunks, 5001)
        assert got == [b'{"i":%d}' % i for i in range(5000)] + [b"last"]
        with pytest.raises(ConnectionClosedOK):
            await drain(chunks, 1)
        assert ws.close_code == 1000 and ws.close_reason == "done"


async def test_our_pings_are_acknowledged_through_the_fast_reader() -> None:
    """websockets' keepalive: a ping every 50 ms; the venue sends ten frames, waits until our reader has read a
    pong and matched it to our ping, then sends ten more: data, pong, data, on one live connection."""
    client: list[FeedConnection] = []

    async def handler(conn: ServerConnection) -> None:
        for i in range(10):
            await conn.send(f"m{i}")
        async with asyncio.timeout(UNIT):
            while not (client and client[0].latency > 0):
                await asyncio.sleep(0.01)  # poll
        for i in range(10, 20):
            await conn.send(f"m{i}")
        await conn.close()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await open_feed(port, ping_interval=0.05, ping_timeout=UNIT)
        client.append(ws)
        assert ws.fast
        chunks = ws.chunks()
        got = await drain(chunks, 20)
        assert got == [f"m{i}".encode() for i in range(20)]
        assert ws.latency > 0  # a pong came back and was matched to our ping
        with pytest.raises(ConnectionClosedOK):
            await drain(chunks, 1)


async def test_a_server_that_stops_answering_pings_is_dropped() -> None:
    """The venue's side goes silent (its pongs never come): websockets' keepalive closes the link (1011)."""
    finished = asyncio.Event()

    async def handler(conn: ServerConnection) -> None:
        conn.transport.pause_reading()  # reads nothing more: our pings stay unanswered
        await finished.wait()
        conn.transport.abort()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await open_feed(port, ping_interval=0.1, ping_timeout=0.2, close_timeout=0.5)
        with pytest.raises(ConnectionClosedError):
            await drain(ws.chunks(), 1)
        finished.set()


async def test_a_forbidden_frame_fails_the_connection_with_its_code() -> None:
    finished = asyncio.Event()

    async def handler(conn: ServerConnection) -> None:
        await conn.send("ok")
        conn.transport.write(bytes([0x83, 1]) + b"x")  # opcode 3 does not exist
        await finished.wait()
        conn.transport.abort()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await open_feed(port, ping_interval=None, close_timeout=0.5)
        chunks = ws.chunks()
        assert await drain(chunks, 1) == [b"ok"]
        with pytest.raises(ConnectionClosed):
            await drain(chunks, 1)
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == CloseCode.PROTOCOL_ERROR
        finished.set()


async def test_a_slow_reader_pauses_the_socket_and_loses_nothing() -> None:
    total = 3 * FeedConnection.max_pending
    pad = b"." * 90

    def payload(i: int) -> bytes:
        return b"x%06d" % i + pad

    async def each(conn: ServerConnection) -> None:
        for i in range(total):
            await conn.send(payload(i))
        await conn.close()

    async with serve(each, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await open_feed(port, ping_interval=None)
        largest = 0
        got: list[bytes] = []
        async with asyncio.timeout(4 * UNIT):
            with pytest.raises(ConnectionClosedOK):
                async for batch in ws.chunks():
                    taken = sum(len(frames) for _, frames in batch)
                    largest = max(largest, taken)
                    got += [f for _, frames in batch for f in frames]
                    if len(got) == taken:  # the first batch: a reader that stops until the socket is paused
                        while not ws._paused_reading:
                            await asyncio.sleep(0.001)  # poll
        assert got == [payload(i) for i in range(total)]
        # The reader fell behind by the limit and the socket was paused there: what waited stayed bounded by
        # the limit plus what one socket read can hold (asyncio reads at most 256 KiB at a time).
        one_read = 256 * 1024 // len(wire(text(payload(0))))
        assert FeedConnection.max_pending <= largest < FeedConnection.max_pending + one_read


# -- a hand-written server: exact control over what arrives in which socket read -------------------------------
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    """``(unacknowledged sent bytes, received bytes not yet read)`` of the IPv4 socket from ``local_port`` to
    ``remote_port``, as the kernel counts them (Linux ``/proc/net/tcp``); None when there is no such socket."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            ports = int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)
            if ports == (local_port, remote_port):
                tx, rx = fields[4].split(":")
                return int(tx, 16), int(rx, 16)
    return None


async def read_by_peer(writer: asyncio.StreamWriter) -> None:
    """Wait until everything written so far has reached the peer's socket and the peer has read it all."""
    mine = writer.get_extra_info("sockname")[1]
    peer = writer.get_extra_info("peername")[1]
    async with asyncio.timeout(UNIT):
        while _tcp_queues(mine, peer) != (0, 0) or _tcp_queues(peer, mine) != (0, 0):
            await asyncio.sleep(0.001)  # poll


async def raw_server(talk: Any) -> tuple[asyncio.Server, int]:
    """A WebSocket server that answers the handshake, then hands its raw stream to ``talk(reader, writer, head)``
    with the 101 response not yet written (``head``): it decides what travels with it."""

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        try:
            await talk(reader, writer, head)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_frames_in_the_same_read_as_the_handshake_response_are_read_by_us() -> None:
    frames = [text(b"first"), text(b"second"), text(b"x" * 70_000)]

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        writer.write(head + wire(*frames))  # one write: the response and the frames in one segment
        await reader.read()  # until the client closes

    server, port = await raw_server(talk)
    async with server:
        ws = await open_feed(port, ping_interval=None, close_timeout=0.5)
        assert ws.fast
        assert await drain(ws.chunks(), 3) == [f.data for f in frames]
        await ws.close()


async def test_closing_with_half_a_frame_buffered_completes_the_close_handshake() -> None:
    """We close while half of a data frame is in our buffer; the venue sends the other half, then its close
    frame: the library must read them from the right byte, and the close ends cleanly (1000)."""
    frame = wire(text(b"y" * 1000))
    half = len(frame) // 2
    got_close = asyncio.Event()

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        writer.write(head)
        await writer.drain()
        writer.write(frame[:half])
        await writer.drain()
        await reader.readexactly(2 + 4 + 2)  # the client's close frame: header, mask, code 1000
        got_close.set()
        writer.write(frame[half:] + wire(Frame(Opcode.CLOSE, b"\x03\xe8")))
        await writer.drain()  # and the server closes the TCP connection (raw_server's finally)

    server, port = await raw_server(talk)
    async with server:
        ws = await open_feed(port, ping_interval=None, close_timeout=3)
        async with asyncio.timeout(UNIT):
            while not ws._buf:  # the first half has arrived and waits in our buffer
                await asyncio.sleep(0.001)  # poll
        await ws.close()
        assert got_close.is_set()
        # the venue's close frame was read (a close ended by the close timeout has none, and code 1006)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
        assert ws.close_code == 1000, (ws.close_code, ws.close_reason)


async def test_a_refusal_whose_body_comes_later_is_reported_with_its_status() -> None:
    """HTTP 429 with Retry-After, the body in a second segment: the library sees it all and says 429."""
    from websockets.exceptions import InvalidStatus

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nContent-Length: 5\r\n\r\n")
        await writer.drain()
        await read_by_peer(writer)  # the body is not in the read that carried the head
        writer.write(b"hello")
        await writer.drain()

    server, port = await raw_server(talk)
    async with server:
        with pytest.raises(InvalidStatus) as info:
            await open_feed(port, ping_interval=None, open_timeout=UNIT)
    assert info.value.response.status_code == 429
    assert info.value.response.headers["Retry-After"] == "7"


async def test_a_close_reason_that_is_not_utf8_fails_the_connection_with_1007() -> None:
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        writer.write(head + wire(text(b"ok")) + bytes([0x88, 4, 0x03, 0xE8, 0xFF, 0xFE]))
        await reader.read()

    server, port = await raw_server(talk)
    async with server:
        ws = await open_feed(port, ping_interval=None, close_timeout=0.5)
        chunks = ws.chunks()
        assert await drain(chunks, 1) == [b"ok"]
        with pytest.raises(ConnectionClosedError):
            await drain(chunks, 1)
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == CloseCode.INVALID_DATA


async def test_our_close_while_the_venue_streams_ends_cleanly_and_fast() -> None:
    """We close while data keeps coming: what arrives after our close is dropped, the venue's close frame is
    read, and the close handshake ends well within the close timeout (nothing left paused)."""
    stop = asyncio.Event()
    sent_after_close = [0]

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        writer.write(head)

        sent = 0
        enough = asyncio.Event()

        async def stream() -> None:
            nonlocal sent
            while not stop.is_set():
                writer.write(wire(*(text(b"tick %d" % (sent + k)) for k in range(200))))
                sent += 200
                if closed_at is not None and sent - closed_at >= 1000:
                    enough.set()
                await writer.drain()
                await asyncio.sleep(0)

        closed_at: int | None = None
        task = asyncio.create_task(stream())
        await reader.readexactly(2 + 4 + 2)  # our close frame
        closed_at = sent
        async with asyncio.timeout(UNIT):
            await enough.wait()  # a thousand more frames flow after it
        sent_after_close[0] = sent - closed_at
        stop.set()
        await task
        writer.write(wire(Frame(Opcode.CLOSE, b"\x03\xe8")))
        await writer.drain()  # and the server closes the TCP connection (raw_server's finally)

    server, port = await raw_server(talk)
    async with server:
        ws = await open_feed(port, ping_interval=None, close_timeout=3)
        got = await drain(ws.chunks(), 5000)
        assert len(got) >= 5000
        await ws.close()
        # the venue's close frame was read after everything it sent first (a close ended by the close timeout
        # has none, and code 1006)
        assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000
        assert ws.close_code == 1000
        assert sent_after_close[0] >= 1000  # data did keep coming after our close
