"""A TCP proxy that injects real network faults between a client and a server.

- ``blackhole()``: from now on nothing moves in either direction and nothing is closed: no FIN,
  no RST, as when a link silently goes away.  New connections are accepted and then hang.
- ``restore()``: bytes flow again (held bytes are delivered, as TCP would retransmit them).
- ``reset_all()``: every proxied connection is aborted (RST).
- ``http_error(status)``: as a proxy or load balancer does while the path behind it is broken:
  every proxied connection is aborted and each new one is answered with an HTTP error page
  (``404``, ``403``, ``502`` ...) and closed, until ``restore()``.

Used by the fault tests and the soak harness: ``async with FaultProxy(upstream_port) as proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from types import TracebackType

__all__ = ["FaultProxy"]


class FaultProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", host: str = "127.0.0.1") -> None:
        self._up = (upstream_host, upstream_port)
        self._host = host
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted: set[asyncio.StreamWriter] = set()
        self._closing = False
        self._error_status = 0
        self.port = 0
        self.connections = 0
        #: connections answered with an error page
        self.refused = 0

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        self.reset_all()
        for w in list(self._accepted):
            w.transport.abort()
        self._flowing.set()  # connections held by a black-hole wake up, see _closing and end
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=5)
            for t in pending:
                t.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://{self._host}:{self.port}"

    def blackhole(self) -> None:
        self._flowing.clear()

    def restore(self) -> None:
        self._error_status = 0
        self._flowing.set()

    def http_error(self, status: int) -> None:
        self._error_status = status
        self._flowing.set()
        self.reset_all()

    def reset_all(self) -> None:
        for a, b in list(self._pairs):
            for w in (a, b):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                w.transport.abort()
        self._pairs.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._accepted.add(writer)
        try:
            await self._flowing.wait()  # a connection made during a black-hole hangs
            if self._closing:
                writer.transport.abort()
                return
            if self._error_status:
                await self._answer_error(reader, writer, self._error_status)
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._up)
            except OSError:
                writer.transport.abort()
                return
            self.connections += 1
            pair = (writer, up_writer)
            self._pairs.add(pair)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._pump(reader, up_writer))
                    tg.create_task(self._pump(up_reader, writer))
            except* (OSError, ConnectionError):
                pass
            finally:
                self._pairs.discard(pair)
                for w in pair:
                    w.transport.abort()
        finally:
            self._accepted.discard(writer)
            self._tasks.discard(task)

    async def _answer_error(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int) -> None:
        """Read the request head (bounded), answer ``status`` with a small HTML page, close."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            async with asyncio.timeout(5):
                await reader.readuntil(b"\r\n\r\n")
            body = b"<html><body><h1>%d</h1>upstream unavailable</body></html>" % status
            writer.write(
                b"HTTP/1.1 %d Error\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b"
                % (status, len(body), body)
            )
            await writer.drain()
        self.refused += 1
        writer.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            data = await src.read(65536)
            if not data:
                await self._flowing.wait()
                with contextlib.suppress(OSError):
                    dst.write_eof()
                return
            await self._flowing.wait()  # black-holed: hold the bytes, send nothing, close nothing
            dst.write(data)
            await dst.drain()
