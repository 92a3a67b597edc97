"""The order books' REST snapshots: asked for when a book wants one, paced, answered into the books.

The I/O around :class:`~ingestor.depth_books.DepthBooks` (which decides) and
:class:`~ingestor.depth_pacer.SnapshotPacer` (which paces): :class:`DepthFetcher` runs one task that waits
until a symbol wants a snapshot, asks for it (``/api/v3/depth?symbol=S&limit=N`` through the bounded
:class:`~ingestor.rest.VenueRest`) as soon as the pacer's weight budget, a ``Retry-After`` after a 429 or 418,
and the symbol's own backoff allow, and hands the reply to the books; the entries they return are stored
through ``store``.  Requests of different symbols run at once (each in a task the fetcher owns); one symbol has
at most one outstanding.

A reply that is no usable book (an HTTP error, a body that is not JSON or is cut short, a book whose fields
are wrong) is counted by kind in :attr:`DepthFetcher.failures` and logged (``book_snapshot_failed``) at most
once a second per kind; the symbol asks again after its backoff.  Other symbols are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.log import Throttle, get_logger
from consumer_sdk.core.tick import Tick
from ingestor.depth import DepthRule, parse_depth_snapshot
from ingestor.depth_books import DepthBooks
from ingestor.depth_pacer import SnapshotPacer, depth_weight
from ingestor.rest import RestError, VenueRest
from ingestor.venue import MalformedFrame, Venue

__all__ = ["DepthFetcher", "Store"]

log = get_logger("depth")

#: stores a symbol's ``depth`` entries, in order
Store = Callable[[str, list[Tick]], Awaitable[None]]


class DepthFetcher:
    """Snapshot requests for ``books`` (see the module doc).  Owns ``rest`` (closed by :meth:`aclose`)."""

    def __init__(
        self, books: DepthBooks, rest: VenueRest, venue: Venue, store: Store, *, limit: int = 1000,
        pacer: SnapshotPacer | None = None, rule: DepthRule | str = DepthRule.SPOT,
    ) -> None:
        self.books = books
        self.rest = rest
        self.venue = venue
        self.store = store
        self.limit = limit
        self.weight = depth_weight(limit, rule)
        self.pacer = pacer or SnapshotPacer()
        #: set when a symbol may want a snapshot (the books call it), or a request ended
        self.wake = asyncio.Event()
        books.on_want = self.wake.set
        self.requests = 0
        self.answered = 0
        #: requests that gave no usable book, by kind (:data:`ingestor.rest.REFUSAL_KINDS`, ``bad_snapshot``: a reply
    #: that is no book; ``error``: an exception no reply should cause)
        self.failures: dict[str, int] = {}
        self._throttles: dict[str, Throttle] = {}
        self._outstanding: set[str] = set()

    async def run(self) -> None:
        """Until cancelled: ask for every snapshot wanted, as the pacer allows."""
        async with asyncio.TaskGroup() as tg:
            self.wake.set()
            while True:
                await self.wake.wait()
                self.wake.clear()
                wait = self._send_due(tg)
                if wait is not None:
                    # Nothing more may go before then: wait for it, or for a symbol that newly wants one.
                    try:
                        async with asyncio.timeout(wait):
                            await self.wake.wait()
                    except TimeoutError:
                        pass
                    self.wake.set()

    def _send_due(self, tg: asyncio.TaskGroup) -> float | None:
        """Start a request for each symbol that wants one and may ask now; seconds until the next may go (None:
        none is waiting)."""
        now = time.monotonic()
        earliest = math.inf
        for symbol in self.books.wanted:
            if symbol in self._outstanding:
                continue
            at = self.pacer.next_allowed(now, self.weight, symbol)
            if at <= now and self.pacer.acquire(now, self.weight, symbol):
                request = self.books.request(symbol)
                self._outstanding.add(symbol)
                tg.create_task(self._fetch(symbol, request), name=f"depth-snapshot-{symbol}")
            else:
                earliest = min(earliest, at)
        return None if earliest == math.inf else max(0.001, earliest - now)

    async def _fetch(self, symbol: str, request: int) -> None:
        call = self.venue.snapshot_call(symbol, self.limit)
        self.requests += 1
        try:
            try:
                body: Any = await self.rest.get_json(call.path, call.params)
                if not isinstance(body, dict):
                    raise MalformedFrame(f"expected a JSON object, got {type(body).__name__}")
                snapshot = parse_depth_snapshot(body, symbol)
            except RestError as exc:
                self.pacer.on_failure(symbol, time.monotonic(), status=exc.status, retry_after=exc.retry_after)
                self._failed(symbol, request, exc.kind, str(exc))
                return
            except MalformedFrame as exc:
                self.pacer.on_failure(symbol, time.monotonic())
                self._failed(symbol, request, "bad_snapshot", str(exc))
                return
            except Exception as exc:  # nothing a reply holds may end the ingestor: counted, asked again
                reraise_if_cancelling()
                log.exception("book_snapshot_error")
                self.pacer.on_failure(symbol, time.monotonic())
                self._failed(symbol, request, "error", repr(exc))
                return
            self.answered += 1
            self.pacer.on_success(symbol)
            ticks = self.books.on_snapshot(symbol, request, snapshot, time.time_ns() // 1000)
            if ticks:
                await self.store(symbol, ticks)
        finally:
            self._outstanding.discard(symbol)
            self.wake.set()

    def _failed(self, symbol: str, request: int, kind: str, error: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        throttle = self._throttles.get(kind)
        if throttle is None:
            throttle = self._throttles[kind] = Throttle(log)
        throttle.log(logging.WARNING, "book_snapshot_failed", symbol=symbol, kind=kind, error=error[:200])
        self.books.on_snapshot_failed(symbol, request, f"{kind}: {error[:200]}")

    async def aclose(self) -> None:
        await self.rest.aclose()
