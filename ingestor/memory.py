"""An in-memory venue connection: the fake :class:`~ingestor.venue.Connector` for unit tests.

:class:`MemoryConnector` hands out :class:`MemoryLink` s instead of sockets.  The test plays the venue:
it feeds frames (:meth:`MemoryLink.feed`, one call per socket read), reads what the session sent
(:attr:`MemoryLink.sent`), closes a connection from the venue's side or makes the next connects fail
(:meth:`MemoryConnector.fail_next`).  An ``answer`` function, given each message sent, returns the
frames the venue answers with (a subscribe confirmation, say), fed at once.  No network, no clock:
a session on it runs its real connect, subscribe, read, rotate and back-off code.

Integration tests keep real sockets (:mod:`ops.simulator`, :mod:`ops.faultproxy`); this is for the
session's own logic, fast and exact.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence

from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, CloseCode

from ingestor.venue import Chunk, Connector, FeedLink

__all__ = ["Answer", "MemoryConnector", "MemoryLink"]

#: the venue's answer to one message the session sent: frames to feed back (none: no answer)
Answer = Callable[[str], Sequence[bytes]]


class MemoryLink(FeedLink):
    """One fake connection.  ``closed`` says who ended it: ``"venue"``, ``"us"`` (a clean close) or
    ``"aborted"``; None while open."""

    def __init__(self, url: str, answer: Answer | None = None) -> None:
        self.url = url
        #: every message the session sent, in order
        self.sent: list[str] = []
        self.closed: str | None = None
        self._answer = answer
        self._chunks: list[Chunk] = []
        self._wake = asyncio.Event()
        self._end: ConnectionClosed | None = None

    # -- the venue's side (the test) ----------------------------------------------------------
    def feed(self, frames: Sequence[bytes], ts: int | None = None) -> None:
        """Deliver ``frames`` as one socket read received at ``ts`` (µs; now when None).  Ignored once
        the connection is closed, as frames arriving after a close are."""
        if self._end is not None:
            return
        self._chunks.append((time.time_ns() // 1000 if ts is None else ts, list(frames)))
        self._wake.set()

    def close_from_venue(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """The venue closes the connection: the reader gets what was fed before, then the close."""
        self._close("venue", ConnectionClosed(Close(code, reason), None))

    # -- the session's side (FeedLink) ----------------------------------------------------------
    async def chunks(self) -> AsyncIterator[list[Chunk]]:
        while True:
            if self._chunks:
                out, self._chunks = self._chunks, []
                yield out
                continue
            if self._end is not None:
                raise self._end
            self._wake.clear()
            await self._wake.wait()

    async def send(self, message: str) -> None:
        if self._end is not None:
            raise self._end
        self.sent.append(message)
        if self._answer is not None:
            frames = self._answer(message)
            if frames:
                self.feed(frames)

    async def close(self) -> None:
        self._close("us", ConnectionClosed(None, Close(CloseCode.NORMAL_CLOSURE, "")))

    def abort(self) -> None:
        self._close("aborted", ConnectionClosed(None, None))

    def _close(self, by: str, end: ConnectionClosed) -> None:
        if self._end is None:
            self._end = end
            self.closed = by
            self._wake.set()


class MemoryConnector(Connector):
    """Opens :class:`MemoryLink` s (all kept in :attr:`links`, in order); ``answer`` is given to each."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer
        self.links: list[MemoryLink] = []
        #: connects asked for (failed ones included), and the keyword arguments of the last one
        self.attempts = 0
        self.options: dict[str, float | None] = {}
        self._failures: deque[BaseException] = deque()
        self._opened = asyncio.Event()

    def fail_next(self, *errors: BaseException) -> None:
        """The next connects raise these, one each, in order (then connects succeed again)."""
        self._failures.extend(errors)

    async def connect(
        self, url: str, *, open_timeout: float, ping_interval: float | None, ping_timeout: float | None
    ) -> MemoryLink:
        self.attempts += 1
        self.options = {"open_timeout": open_timeout, "ping_interval": ping_interval, "ping_timeout": ping_timeout}
        if self._failures:
            raise self._failures.popleft()
        link = MemoryLink(url, self.answer)
        self.links.append(link)
        self._opened.set()
        return link

    async def link(self, n: int) -> MemoryLink:
        """The ``n``-th connection opened (from 0), once it is."""
        while len(self.links) <= n:
            self._opened.clear()
            await self._opened.wait()
        return self.links[n]
