"""ops.faultproxy: real TCP between a client, the proxy and a small echo server on loopback.

An absence ("nothing arrives") is asserted by a bounded wait that must time out; a presence by a
bounded wait that must not.  Every timeout is a multiple of ``UNIT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from ops.faultproxy import FaultProxy

UNIT = 0.05
#: how long "nothing arrives" is watched for
QUIET = 3 * UNIT
#: upper bound for something that must happen
SOON = 20 * UNIT

Event = bytes | BaseException


class Conn:
    """The echo server's side of one connection: what it received, and its writer."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        #: data chunks as read; ``b""`` for EOF; the exception when the read failed (reset)
        self.events: asyncio.Queue[Event] = asyncio.Queue()

    async def receive(self, n: int) -> bytes:
        """Exactly ``n`` bytes, within ``SOON``."""
        data = b""
        async with asyncio.timeout(SOON):
            while len(data) < n:
                event = await self.events.get()
                assert isinstance(event, bytes) and event, f"expected data, got {event!r}"
                data += event
        return data

    async def assert_quiet(self) -> None:
        """Nothing at all (no data, no EOF, no reset) for ``QUIET``."""
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(QUIET):
                event = await self.events.get()
                pytest.fail(f"the server saw {event!r} during the black-hole")

    async def end(self) -> Event:
        """The next event, expected to be EOF or a reset, within ``SOON``."""
        async with asyncio.timeout(SOON):
            while True:
                event = await self.events.get()
                if not (isinstance(event, bytes) and event):
                    return event


class EchoServer:
    def __init__(self) -> None:
        self.conns: asyncio.Queue[Conn] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn = Conn(writer)
        self.conns.put_nowait(conn)
        try:
            while True:
                data = await reader.read(65536)
                conn.events.put_nowait(data)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except OSError as exc:
            conn.events.put_nowait(exc)
        finally:
            writer.transport.abort()

    async def next_conn(self) -> Conn:
        async with asyncio.timeout(SOON):
            return await self.conns.get()

    async def assert_no_conn(self) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(QUIET):
                await self.conns.get()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = srv.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        srv.close()
        for t in list(server.tasks):
            t.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        await srv.wait_closed()


@asynccontextmanager
async def client(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(SOON):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    async with asyncio.timeout(SOON):
        return await reader.readexactly(n)


async def assert_client_quiet(reader: asyncio.StreamReader) -> None:
    """No data, no EOF, no reset for ``QUIET``."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(QUIET):
            got = await reader.read(65536)
            pytest.fail(f"the client saw {got!r} during the black-hole")
    assert not reader.at_eof()


async def client_sees_end(reader: asyncio.StreamReader) -> None:
    """EOF or a connection reset, within ``SOON``; any data before it is ignored."""
    async with asyncio.timeout(SOON):
        try:
            while await reader.read(65536):
                pass
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------


async def test_bytes_flow_both_ways(echo: EchoServer) -> None:
    async with FaultProxy(echo.port) as proxy, client(proxy.port) as (reader, writer):
        assert proxy.port != 0
        assert proxy.url == f"ws://127.0.0.1:{proxy.port}"
        writer.write(b"hello")
        assert await read_exactly(reader, 5) == b"hello"
        conn = await echo.next_conn()
        assert await conn.receive(5) == b"hello"
        conn.writer.write(b"from the server")
        assert await read_exactly(reader, 15) == b"from the server"
        assert proxy.connections == 1


async def test_large_payload_arrives_intact(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, more than one read and one socket buffer
    async with FaultProxy(echo.port) as proxy, client(proxy.port) as (reader, writer):
        writer.write(payload)
        assert await read_exactly(reader, len(payload)) == payload


async def test_several_connections_are_independent(echo: EchoServer) -> None:
    async with FaultProxy(echo.port) as proxy, client(proxy.port) as (r1, w1), client(proxy.port) as (r2, w2):
        w1.write(b"one")
        w2.write(b"two")
        assert await read_exactly(r2, 3) == b"two"
        assert await read_exactly(r1, 3) == b"one"
        assert proxy.connections == 2


async def test_blackhole_holds_bytes_both_ways_then_restore_delivers_them(echo: EchoServer) -> None:
    async with FaultProxy(echo.port) as proxy, client(proxy.port) as (reader, writer):
        writer.write(b"ping")
        assert await read_exactly(reader, 4) == b"ping"
        conn = await echo.next_conn()
        assert await conn.receive(4) == b"ping"

        proxy.blackhole()
        writer.write(b"c2s")
        conn.writer.write(b"s2c")
        await conn.assert_quiet()  # client -> server: nothing, and no EOF or reset
        await assert_client_quiet(reader)  # server -> client: nothing, and no EOF or reset
        assert not writer.is_closing()
        assert not conn.writer.is_closing()

        proxy.restore()
        assert await conn.receive(3) == b"c2s"
        assert await read_exactly(reader, 6) == b"s2cc2s"  # the held bytes, then the echo of c2s

        writer.write(b"after")
        assert await read_exactly(reader, 5) == b"after"


async def test_blackhole_holds_a_half_close_too(echo: EchoServer) -> None:
    async with FaultProxy(echo.port) as proxy, client(proxy.port) as (reader, writer):
        writer.write(b"x")
        assert await read_exactly(reader, 1) == b"x"
        conn = await echo.next_conn()
        assert await conn.receive(1) == b"x"

        proxy.blackhole()
        writer.write(b"last")
        writer.write_eof()
        await conn.assert_quiet()

        proxy.restore()
        assert await conn.receive(4) == b"last"
        assert await conn.end() == b""  # the EOF is delivered after the data
        assert await read_exactly(reader, 4) == b"last"
        await client_sees_end(reader)


async def test_blackhole_holds_an_eof_alone(echo: EchoServer) -> None:
    async with FaultProxy(echo.port) as proxy, client(proxy.port) as (reader, writer):
        writer.write(b"x")
        assert await read_exactly(reader, 1) == b"x"
        conn = await echo.next_conn()
        assert await conn.receive(1) == b"x"

        proxy.blackhole()
        writer.write_eof()
        await conn.assert_quiet()  # the server sees no EOF while the link is black-holed

        proxy.restore()
        assert await conn.end() == b""
        await client_sees_end(reader)  # the echo server closes in turn


async def test_connection_made_during_blackhole_hangs_until_restore(echo: EchoServer) -> None:
    async with FaultProxy(echo.port) as proxy:
        proxy.blackhole()
        async with client(proxy.port) as (reader, writer):
            writer.write(b"early")
            await echo.assert_no_conn()  # the proxy has not connected upstream
            await assert_client_quiet(reader)
            assert proxy.connections == 0

            proxy.restore()
            conn = await echo.next_conn()
            assert await conn.receive(5) == b"early"
            assert await read_exactly(reader, 5) == b"early"
            assert proxy.connections == 1


async def test_reset_all_resets_the_client_and_the_server_side(echo: EchoServer) -> None:
    async with FaultProxy(echo.port) as proxy:
        async with client(proxy.port) as (reader, writer):
            writer.write(b"ping")
            assert await read_exactly(reader, 4) == b"ping"
            conn = await echo.next_conn()
            assert await conn.receive(4) == b"ping"

            proxy.reset_all()
            await client_sees_end(reader)
            end = await conn.end()
            assert end == b"" or isinstance(end, ConnectionError)

        # the proxy still accepts and forwards new connections
        async with client(proxy.port) as (reader, writer):
            writer.write(b"again")
            assert await read_exactly(reader, 5) == b"again"
            assert proxy.connections == 2


async def test_reset_all_during_blackhole_is_not_held(echo: EchoServer) -> None:
    async with FaultProxy(echo.port) as proxy, client(proxy.port) as (reader, writer):
        writer.write(b"ping")
        assert await read_exactly(reader, 4) == b"ping"
        proxy.blackhole()
        writer.write(b"held")
        proxy.reset_all()
        await client_sees_end(reader)


async def test_leaving_the_proxy_closes_its_connections(echo: EchoServer) -> None:
    async with client_behind_closed_proxy(echo) as reader:
        await client_sees_end(reader)


@asynccontextmanager
async def client_behind_closed_proxy(echo: EchoServer) -> AsyncIterator[asyncio.StreamReader]:
    async with contextlib.AsyncExitStack() as stack:
        async with FaultProxy(echo.port) as proxy:
            reader, writer = await stack.enter_async_context(client(proxy.port))
            writer.write(b"ping")
            assert await read_exactly(reader, 4) == b"ping"
            proxy.blackhole()  # leaving must not hang on a black-holed link either
        yield reader


async def test_leaving_with_open_connections_logs_no_error(echo: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """A clean exit is not an error: the event loop must not report a failed connection handler."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with contextlib.AsyncExitStack() as stack:
        async with FaultProxy(echo.port) as proxy:
            reader, writer = await stack.enter_async_context(client(proxy.port))
            writer.write(b"ping")
            assert await read_exactly(reader, 4) == b"ping"
        await client_sees_end(reader)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


class TrackingProxy(FaultProxy):
    """Records the proxy's side of every accepted connection, so a test can close what the proxy leaks."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.accepted: list[asyncio.StreamWriter] = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(writer)
        await super()._accept(reader, writer)


async def test_leaving_with_a_connection_still_hanging_closes_it(echo: EchoServer) -> None:
    """A connection accepted during a black-hole and never restored must be closed on exit too."""
    proxy = TrackingProxy(echo.port)
    try:
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(SOON):
                async with proxy:
                    proxy.blackhole()
                    reader, _ = await stack.enter_async_context(client(proxy.port))
                    await assert_client_quiet(reader)
            await client_sees_end(reader)
    finally:
        for w in proxy.accepted:  # what the proxy left open, so it cannot leak into later tests
            w.transport.abort()


async def test_upstream_refusing_closes_the_client() -> None:
    async with FaultProxy(free_port()) as proxy, client(proxy.port) as (reader, writer):
        writer.write(b"anyone?")
        await client_sees_end(reader)
        assert proxy.connections == 0
