# size: one connection's whole life (connect, subscribe, read, rotate make-before-break, the watchdog, the repair
#   hand-off) shares the session's state; the decisions it takes are pure functions in pipeline.py and lifecycle.py.
"""One venue session: a WebSocket kept alive for as long as the ingestor runs.

The adapter is thin: each socket read's frames go through the pure
:class:`~ingestor.pipeline.IngestPipeline` (the venue's parser, the sequencer), then into the ingress
queue.  Decisions live in pure modules: :mod:`ingestor.pipeline`, :mod:`ingestor.lifecycle` (states,
error policy), :mod:`consumer_sdk.core.backoff` (delays).  What is venue-specific (URL path, stream names,
subscribe messages, parser) comes from a :class:`~ingestor.venue.Venue` (Binance spot by default),
connections from a :class:`~ingestor.venue.Connector` (``websockets``; an in-memory fake in tests).
The session keeps the I/O: connect, subscribe, rotate, the watchdog, the repair hand-off, and the
ingress ``offer``/``put`` (backpressure) with the ingest latency samples.

- **Reconnect**: every failure leads to a capped, fully jittered delay that resets only after
  a connection stayed live for ``healthy_after`` seconds; the venue's ``Retry-After`` wins; a
  refusal that retrying cannot fix (HTTP 400/401/403/404) stops with a clear message.
- **Heartbeats**, by the venue's :class:`~ingestor.venue.Heartbeat` style: ``ws_ping``, websockets answers the
  venue's pings at once with the same payload and sends our own every ``ping_interval``; no pong within
  ``ping_timeout`` drops the connection.  ``text_ping`` (OKX), no WebSocket pings are sent: a keepalive task per
  connection sends the text ``ping`` once nothing arrived for ``ping_interval`` (below 30 s: OKX closes a
  connection silent that long) and drops the connection when nothing, ``pong`` included, arrived within
  ``ping_timeout`` after (counted ``no_pong``, as a WebSocket ping left unanswered; reconnect, resubscribe).  A
  watchdog on the monotonic clock drops a connection that delivered nothing for ``stall_timeout``
  and reports each stream whose seq has not moved for its channel's ``stale_after`` threshold.
- **Subscribe**: requests paced under ``requests_per_s`` (Binance allows 5 messages a second) and, for a venue
  that limits them, under its ``max_ops_per_hour`` a connection (OKX: 480); new connections of a venue with a
  ``max_connects_per_s`` (OKX: 3) are spaced under it across every session of the process.  Replies are
  checked (a venue that acknowledges each stream of a request apart, OKX, is live once every stream is);
  an error answer is counted (``subscribe_errors``) and logged with the request, and the streams it refused
  are asked again unless the venue's ``classify_error`` says asking again cannot help.
- **Order books**: with ``depth`` (:class:`~ingestor.depth_books.DepthBooks`) the pipeline hands every
  ``depthUpdate`` to the books; when a connection is lost (not rotated) every book it carried starts over
  (``resync:reconnect``), since the diffs sent meanwhile are gone.  :meth:`VenueSession.store_depth` puts the
  entries a snapshot reply produced into the ingress behind what the read loop is storing.  A book whose snapshot
  comes only with a subscription (OKX ``books``) is rebuilt by :meth:`VenueSession.resubscribe`: its stream
  unsubscribed and subscribed again on the live connection, both requests paced like every other (under the
  venue's operations an hour a connection), what arrives in between dropped by the book as before its snapshot.
- **Rotation** (make-before-break): before ``max_age`` or on a ``serverShutdown`` event a new
  connection is opened and subscribed while the old one still delivers; the old one is closed
  only once the new one is live.  The overlap is deduplicated by the sequencer.

Nothing the venue sends can raise out of the read loop: malformed frames, unknown events
and replies to requests we never sent are counted and logged at most once a second.  Every frame
refused (by the venue's parser, the pipeline, or the connection: see :data:`ingestor.pipeline.SKIP_REASONS`)
is counted by kind in the pipeline's ``refused`` and logged (``frame_refused``) at most once a second per
kind; frames read off a connection must be of a stream this session subscribed.  Which refusals end the
connection and which keep it: docs/hostile-input.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.backoff import Backoff
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY, LatencyHistogram, check_sample_every
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.tick import Tick
from distributor.ingress import IngressQueue
from ingestor.binance import BINANCE_SPOT
from ingestor.depth_books import DepthBooks
from ingestor.lifecycle import Failure, Lifecycle, RateWindow, SessionState, classify_failure
from ingestor.okx import PING, TextKeepalive
from ingestor.pipeline import BadFrame, GapFound, IngestPipeline, LoopError
from ingestor.repair import GapRepairer
from ingestor.sequencer import Sequencer
from ingestor.snapshot import SessionSnapshot
from ingestor.venue import Connector, FeedLink, Heartbeat, Reply, ServerShutdown, Venue
from ingestor.wsframes import WebSocketConnector

__all__ = ["SessionSettings", "SessionState", "VenueSession"]

log = get_logger("session")
_ids = itertools.count(1)

DEFAULT_STALE_AFTER: Mapping[str, float] = {"trade": 60.0, "agg_trade": 60.0, "book_ticker": 60.0, "kline": 10.0}


@dataclass(frozen=True, kw_only=True, slots=True)
class SessionSettings:
    healthy_after: float = 10.0
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    open_timeout: float = 10.0
    #: a connection that delivered no frame at all for this long is dropped
    stall_timeout: float = 30.0
    #: per channel ("kline" for every interval): a stream whose seq did not move for this long is stale
    stale_after: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_STALE_AFTER))
    #: open a replacement connection this long after connecting (Binance closes at 24 h)
    max_age: float = 23.5 * 3600
    #: how long a replacement may take to become live before the rotation is retried
    rotation_timeout: float = 15.0
    requests_per_s: float = 4.0
    params_per_request: int = 200
    backoff_base: float = 0.1
    backoff_cap: float = 30.0


class _Link:
    """One WebSocket connection and what belongs to it."""

    __slots__ = (
        "busy", "closing", "conn_id", "countdown", "dropped", "keepalive", "last_frame", "live", "next_send", "opened",
        "ops", "pending", "requests", "retries", "rotation_due", "shutdown", "unsubscribing", "ws",
    )

    def __init__(self, ws: FeedLink | None, sample_every: int) -> None:
        self.conn_id = next(_ids)
        self.ws = ws
        #: ticks stored on this link until the next ingest latency sample
        self.countdown = sample_every
        #: the reader is taking what it read (not waiting for the socket); it is to end once done
        self.busy = False
        self.closing = False
        self.opened = time.monotonic()
        self.last_frame = self.opened
        self.live = asyncio.Event()
        self.shutdown = asyncio.Event()
        #: a rotation that failed and is to be tried again at ``opened + max_age``, for this reason
        self.rotation_due: str | None = None
        self.pending: dict[int, list[str]] = {}
        self.unsubscribing: dict[int, list[str]] = {}
        self.next_send = 0.0
        #: subscribe retries in flight; cancelled when the link closes
        self.retries: set[asyncio.Task[None]] = set()
        #: the text sent for each request id in flight (logged with the venue's error answer)
        self.requests: dict[int, str] = {}
        #: the venue's subscribe operations on this connection (None: no limit)
        self.ops: RateWindow | None = None
        #: the text keepalive task (``text_ping`` venues), cancelled when the link closes
        self.keepalive: asyncio.Task[None] | None = None
        #: why the session dropped this connection itself (the reader returns it)
        self.dropped: str | None = None


class _Fatal(Exception):
    pass


#: one window a venue name, shared by every session of the process: its new connections a second
_CONNECTS: dict[str, RateWindow] = {}


class VenueSession:
    """A connection carrying a list of ``venue`` streams (its stream names), kept alive for as long as
    it runs; ``connector`` opens its connections.  Its frame and tick counters are its :attr:`pipeline`'s."""

    def __init__(
        self,
        *,
        ws_base: str,
        streams: list[str],
        ingress: IngressQueue[Tick],
        sequencer: Sequencer,
        ingest_latency: LatencyHistogram,
        repairer: GapRepairer | None = None,
        settings: SessionSettings | None = None,
        backoff: Backoff | None = None,
        venue: Venue = BINANCE_SPOT,
        connector: Connector | None = None,
        sample_every: int = DEFAULT_SAMPLE_EVERY,
        depth: DepthBooks | None = None,
    ) -> None:
        self.settings = s = settings or SessionSettings()
        if venue.heartbeat is Heartbeat.TEXT_PING:
            try:
                TextKeepalive(0.0, interval=s.ping_interval, timeout=s.ping_timeout)
            except ValueError as exc:
                raise ConfigError(f"venue {venue.name}: session.ping_interval {s.ping_interval:g}: {exc}") from None
        elif venue.heartbeat is not Heartbeat.WS_PING:
            raise ConfigError(f"venue {venue.name}: heartbeat style {venue.heartbeat} is not supported")
        self.session_id = next(_ids)
        self.url = ws_base.rstrip("/") + venue.ws_path
        self.streams = streams
        self.venue = venue
        self._connector: Connector = connector if connector is not None else WebSocketConnector()
        self._ingress = ingress
        self._sequencer = sequencer
        self._latency = ingest_latency
        #: ingest latency is observed on one tick in this many (0: not measured)
        self.sample_every = check_sample_every(sample_every)
        self._repairer = repairer
        #: the order books the pipeline feeds (None: ``depthUpdate`` events are not carried)
        self.depth = depth
        self.pipeline = IngestPipeline(
            venue, sequencer, repairer.holds if repairer is not None else None, depth=depth
        )
        self._backoff = backoff or Backoff(base=s.backoff_base, cap=s.backoff_cap)
        self._throttle = Throttle(log)
        #: one throttle per kind of refusal: a flood of one kind never hides another
        self._refusal_logs: dict[str, Throttle] = {}
        #: the channels subscribed (or being subscribed), by symbol: a tick read of any other stream is refused
        self._carried: dict[str, set[str]] = {}
        self._carry(streams)
        self._next_request = 1
        self.lifecycle = Lifecycle()
        self.connects = 0
        self.reconnects = 0
        #: the session has been live with this URL: a handshake refusal is an outage from now on, not a wrong URL
        self.been_live = False
        self.rotations = 0
        self.subscribe_errors = 0
        #: text pings sent (``text_ping`` venues)
        self.pings_sent = 0
        #: the venue's error answers by code (``{"event": "error"}``: OKX); in ``subscribe_errors`` too but for
        #: an unsubscribe's
        self.venue_errors: dict[str, int] = {}
        self._classify_error = getattr(venue, "classify_error", None)
        self._max_ops = getattr(venue, "max_ops_per_hour", None)
        connects = getattr(venue, "max_connects_per_s", None)
        self._connects = _CONNECTS.setdefault(venue.name, RateWindow(connects, 1.0)) if connects else None
        #: streams subscribed again on a live connection (:meth:`resubscribe`), and those being so now
        self.resubscribes = 0
        self._resubscribing: set[str] = set()
        self.unexpected_replies = 0
        self.stalls = 0
        self.reconnect_reasons: dict[str, int] = {}
        self.stale: set[str] = set()
        self._progress: dict[tuple[str, str, str], tuple[int | None, float]] = {}
        self._link: _Link | None = None
        self._links: set[_Link] = set()
        #: the link of frames fed through :meth:`ingest` (no connection)
        self._detached: _Link | None = None
        #: held by the link putting ticks into the ingress (see :meth:`_store`)
        self._storing = asyncio.Lock()

    @property
    def state(self) -> SessionState:
        return self.lifecycle.state

    # -- the pipeline's counters, read as the session's ---------------------------------------
    @property
    def frames(self) -> int:
        return self.pipeline.frames

    @property
    def ticks(self) -> int:
        return self.pipeline.ticks

    @property
    def malformed(self) -> int:
        return self.pipeline.malformed

    @property
    def unsupported(self) -> int:
        return self.pipeline.unsupported

    @property
    def rejected(self) -> int:
        return self.pipeline.rejected

    @property
    def last_frame_us(self) -> int:
        return self.pipeline.last_frame_us

    @property
    def refused(self) -> dict[str, int]:
        """Frames refused by kind, the connections' refusals included (the pipeline's counter, live)."""
        return self.pipeline.refused

    def _carry(self, streams: Sequence[str]) -> None:
        for name in streams:
            symbol, channel = self.venue.split_stream(name)
            self._carried.setdefault(symbol, set()).add(channel)

    def _on_refused(self, kind: str, detail: str, sample: bytes | str = b"") -> None:
        """A refusal the connection saw (the pipeline counts its own): counted with them, and logged."""
        refused = self.pipeline.refused
        refused[kind] = refused.get(kind, 0) + 1
        self._log_refusal(kind, detail, sample)

    def _log_refusal(self, kind: str, detail: str, sample: bytes | str) -> None:
        throttle = self._refusal_logs.get(kind)
        if throttle is None:
            throttle = self._refusal_logs[kind] = Throttle(log)
        throttle.log(logging.WARNING, "frame_refused", session=self.session_id, kind=kind, error=detail[:200],
                     sample=str(sample[:200]))

    def _to(self, state: SessionState, reason: str, **fields: Any) -> None:
        previous = self.lifecycle.to(state, reason)
        log_event(
            log, logging.INFO, "session_state", session=self.session_id, venue=self.venue.name, state=state.value,
            previous=previous.value, reason=reason, **fields,
        )

    # -- the session loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, read and rotate until cancelled; every failure leads to a backed-off reconnect."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watchdog(), name=f"watchdog-{self.session_id}")
                await self._loop(tg)
        except* _Fatal as group:
            raise ConfigError(str(group.exceptions[0])) from None
        finally:
            if self.lifecycle.state is not SessionState.CLOSED:
                self.lifecycle.to(SessionState.CLOSED, "stopped")

    async def _loop(self, tg: asyncio.TaskGroup) -> None:
        try:
            await self._run_links(tg)
        finally:
            # Cancelled (the ingestor stops): drop every connection now, without waiting on the venue, and the
            # requests still to send on them (a resubscription may be waiting for the hourly window).
            for live in list(self._links):
                for task in list(live.retries):
                    task.cancel()
                if live.ws is not None:
                    live.ws.abort()

    async def _run_links(self, tg: asyncio.TaskGroup) -> None:
        link: _Link | None = None
        reader: asyncio.Task[str] | None = None
        while True:
            if link is None or reader is None:
                try:
                    link, reader = await self._open(tg, rotating=False)
                except _Fatal:
                    raise
                except Exception as exc:  # any failure to connect is retried, after the backoff
                    reraise_if_cancelling()
                    await self._back_off(classify_failure(exc, been_live=self.been_live), None)
                    continue
            reason, rotate = await self._until_done_or_rotation(link, reader)
            if rotate:
                try:
                    new_link, new_reader = await self._open(tg, rotating=True)
                except _Fatal:
                    raise
                except Exception as exc:
                    # The old connection keeps delivering; try the rotation again after a delay.
                    reraise_if_cancelling()
                    log_event(log, logging.WARNING, "rotation_failed", session=self.session_id, error=str(exc)[:200])
                    self._to(SessionState.LIVE, "rotation failed, old connection kept")
                    # Tried again once rotation_timeout has passed, for the same reason: a shutdown notice,
                    # already taken, would otherwise ask for it again at once, as fast as connections fail.
                    link.opened = time.monotonic() - self.settings.max_age + self.settings.rotation_timeout
                    link.rotation_due = reason
                    link.shutdown.clear()
                    continue
                await self._close(link, reader)
                self.rotations += 1
                link, reader = new_link, new_reader
                self._to(SessionState.LIVE, f"rotated ({reason})", conn_id=link.conn_id)
                continue
            await self._close(link, reader)
            self._books_lost()
            healthy = time.monotonic() - link.opened >= self.settings.healthy_after and link.live.is_set()
            if healthy:
                self._backoff.reset()
            link = reader = None
            await self._back_off(Failure(reason), healthy)

    def depth_symbols(self) -> list[str]:
        """The symbols whose order book this session carries."""
        return [symbol for symbol, channels in self._carried.items() if "depth" in channels]

    def _books_lost(self) -> None:
        """The connection is gone: what it would have sent meanwhile cannot be joined, every book starts over."""
        if self.depth is not None:
            self.depth.on_reconnect(self.depth_symbols())

    async def store_depth(self, ticks: Sequence[Tick]) -> None:
        """Order book entries (a snapshot reply's) into the ingress, in order, after what a read is storing."""
        ingress = self._ingress
        async with self._storing:
            for t in ticks:
                if not ingress.offer(t):
                    await ingress.put(t)

    async def _back_off(self, failure: Failure, healthy: bool | None) -> None:
        if failure.fatal:
            log_event(log, logging.ERROR, "session_fatal", session=self.session_id, error=failure.message)
            raise _Fatal(f"{failure.message} ({self.url})")
        delay = failure.retry_after if failure.retry_after is not None else self._backoff.next_delay()
        if failure.alarm:
            self._throttle.log(
                logging.ERROR, "reconnect_refused", session=self.session_id, error=failure.message, url=self.url
            )
        self.reconnects += 1
        key = failure.message.split(":", 1)[0][:40]
        self.reconnect_reasons[key] = self.reconnect_reasons.get(key, 0) + 1
        self._to(SessionState.BACKING_OFF, failure.message[:300], delay_s=round(delay, 3))
        await asyncio.sleep(delay)
        self._to(SessionState.CONNECTING, "reconnect")

    async def _open(self, tg: asyncio.TaskGroup, *, rotating: bool) -> tuple[_Link, asyncio.Task[str]]:
        """Connect and subscribe; return once every subscription is confirmed (the link is live)."""
        s = self.settings
        if rotating:
            self._to(SessionState.ROTATING, "replacing the connection")
        if self._connects is not None:
            wait = self._connects.reserve(time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)  # the venue's limit on new connections a second
        text_ping = self.venue.heartbeat is Heartbeat.TEXT_PING
        ws = await self._connector.connect(
            self.url, open_timeout=s.open_timeout, ping_interval=None if text_ping else s.ping_interval,
            ping_timeout=None if text_ping else s.ping_timeout,
        )
        seen = getattr(ws, "refused", None)
        if isinstance(seen, dict):  # a connection that counts what it refuses: from now on with the session
            for kind, n in seen.items():
                self._on_refused(kind, f"{n} before the session took the connection")
            ws.on_refused = self._on_refused  # type: ignore[attr-defined]
        if not rotating:
            # A new connection subscribes exactly these (the old one is gone): streams given up meanwhile too.
            self._carried = {}
            self._carry(self.streams)
        link = _Link(ws, self.sample_every)
        if self._max_ops:
            link.ops = RateWindow(self._max_ops, 3600.0)
        if text_ping:
            link.keepalive = tg.create_task(self._keepalive(link), name=f"keepalive-{link.conn_id}")
        self._links.add(link)
        self.connects += 1
        if not rotating:
            self._to(SessionState.SUBSCRIBING, "connected", conn_id=link.conn_id, streams=len(self.streams))
        reader = tg.create_task(self._read(link), name=f"read-{link.conn_id}")
        live = asyncio.ensure_future(link.live.wait())
        if not self.streams:
            link.live.set()  # nothing to ask for yet: streams added later are subscribed on this link
        try:
            await self._subscribe(link, self.streams)
            async with asyncio.timeout(s.rotation_timeout if rotating else None):
                done, _ = await asyncio.wait([reader, live], return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                raise ConnectionError(f"connection lost while subscribing: {reader.result()}")
        except BaseException:
            await self._close(link, reader)
            raise
        finally:
            live.cancel()
        self._link = link
        if not rotating:
            self.been_live = True
            self._to(SessionState.LIVE, "subscribed", conn_id=link.conn_id, streams=len(self.streams))
        return link, reader

    async def _until_done_or_rotation(self, link: _Link, reader: asyncio.Task[str]) -> tuple[str, bool]:
        """Wait for the reader to end (a failure) or for a rotation to be due."""
        age_left = self.settings.max_age - (time.monotonic() - link.opened)
        shutdown = asyncio.ensure_future(link.shutdown.wait())
        try:
            done, _ = await asyncio.wait([reader, shutdown], timeout=max(0.0, age_left),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            shutdown.cancel()
        if reader in done:
            return reader.result(), False
        if shutdown in done:
            return "server_shutdown", True
        return link.rotation_due or "max_age", True

    async def _close(self, link: _Link, reader: asyncio.Task[str]) -> None:
        self._links.discard(link)
        if self._link is link:
            self._link = None
        for task in list(link.retries):
            task.cancel()
        if link.keepalive is not None:
            link.keepalive.cancel()
        link.closing = True
        me = asyncio.current_task()
        if link.busy and not (me is not None and me.cancelling()):
            # The reader is storing what it read (waiting for room in the ingress): the sequencer took
            # those ticks already, so let it finish (it then ends by itself), within a bound.
            await asyncio.wait([reader], timeout=self.settings.rotation_timeout)
        reader.cancel()
        # asyncio.wait, not `await reader`: a cancellation of *this* task must propagate, not be
        # mistaken for the reader's own.
        await asyncio.wait([reader])
        if not reader.cancelled():
            reader.exception()  # retrieved: the reader's end was already handled by its result
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                if link.ws is not None:
                    await link.ws.close()

    async def _subscribe(self, link: _Link, streams: list[str], subscribe: bool = True) -> None:
        s = self.settings
        make = self.venue.subscribe_requests if subscribe else self.venue.unsubscribe_requests
        requests = make(streams, self._next_request, s.params_per_request)
        self._next_request += len(requests)
        for req in requests:
            # Pacing under the venue's incoming message limit, shared by every request on this link.
            wait = link.next_send - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            link.next_send = time.monotonic() + 1.0 / s.requests_per_s
            if link.ops is not None:
                wait = link.ops.reserve(time.monotonic())
                if wait > 0:
                    log_event(log, logging.WARNING, "subscribe_ops_limit", session=self.session_id,
                              conn_id=link.conn_id, wait_s=round(wait, 1), limit_per_hour=link.ops.limit)
                    await asyncio.sleep(wait)
            if subscribe:
                link.pending[req.id] = list(req.streams)
            else:
                link.unsubscribing[req.id] = list(req.streams)
            link.requests[req.id] = req.message
            assert link.ws is not None, "a link without a connection is never subscribed"
            await link.ws.send(req.message)

    async def _retry_subscribe(self, link: _Link, streams: list[str]) -> None:
        await asyncio.sleep(1.0)  # the venue refused; ask again after a pause, within the rate limit
        still = [s for s in streams if s in self.streams]
        if still:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._subscribe(link, still)

    # -- streams added and removed while running --------------------------------------------------
    def add_streams(self, streams: list[str]) -> None:
        """Carry these streams too: subscribed now if connected, and on every reconnect."""
        new = [s for s in streams if s not in self.streams]
        if not new:
            return
        self.streams = [*self.streams, *new]
        self._carry(new)
        self._send_later(new, subscribe=True)

    def remove_streams(self, streams: list[str]) -> None:
        """Stop carrying these streams: unsubscribed now if connected, and not asked for again."""
        gone = [s for s in streams if s in self.streams]
        if not gone:
            return
        self.streams = [s for s in self.streams if s not in set(gone)]
        self._send_later(gone, subscribe=False)

    def resubscribe(self, streams: list[str]) -> None:
        """Unsubscribe these streams and subscribe them again on the live connection: a book whose snapshot comes
        only with a subscription (OKX ``books``) gets a fresh one.  The two requests are paced as every request of
        the connection (``requests_per_s``, and the venue's ``max_ops_per_hour``: a burst of resyncs waits for the
        window, logged ``subscribe_ops_limit``).  A stream not carried, or already being subscribed again:
        nothing; no connection live: nothing (the next one subscribes every stream, a snapshot each)."""
        link = self._link
        todo = [s for s in streams if s in self.streams and s not in self._resubscribing]
        if link is None or not todo:
            return
        self._resubscribing.update(todo)
        # Owned by the link: _close cancels it with the connection (whose successor subscribes anew).
        task = asyncio.get_running_loop().create_task(self._resubscribe(link, todo))
        link.retries.add(task)
        task.add_done_callback(link.retries.discard)

    async def _resubscribe(self, link: _Link, streams: list[str]) -> None:
        try:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._subscribe(link, streams, subscribe=False)
                still = [s for s in streams if s in self.streams]  # not given up meanwhile
                if still:
                    await self._subscribe(link, still)
                    self.resubscribes += len(still)
                    log_event(log, logging.INFO, "resubscribed", session=self.session_id, conn_id=link.conn_id,
                              streams=still[:10])
        finally:
            self._resubscribing.difference_update(streams)

    def _send_later(self, streams: list[str], *, subscribe: bool) -> None:
        link = self._link
        if link is None:
            return  # the next connection subscribes to self.streams
        # Owned by the link: _close cancels it with the connection.
        task = asyncio.get_running_loop().create_task(self._request(link, streams, subscribe))
        link.retries.add(task)
        task.add_done_callback(link.retries.discard)

    async def _request(self, link: _Link, streams: list[str], subscribe: bool) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._subscribe(link, streams, subscribe)

    def _on_reply(self, link: _Link, reply: Reply) -> None:
        rid = reply.id if type(reply.id) is int else None
        if reply.error is not None:
            self._on_error(link, rid, reply)
            return
        # A venue that acknowledges each stream of a request apart (OKX) names it in the result.
        result = reply.result
        acked = result.get("stream") if type(result) is dict else None
        if rid is not None and rid in link.unsubscribing:
            gone = self._answered(link.unsubscribing, link, rid, acked)
            # No frame of these streams follows the reply: free their state now (it may have been
            # re-created by frames that were in flight when we asked).
            for name in gone:
                if name not in self.streams:
                    symbol, channel = self.venue.split_stream(name)
                    self._sequencer.release(self.venue.name, symbol, channel)
                    channels = self._carried.get(symbol)
                    if channels is not None:
                        channels.discard(channel)
                        if not channels:
                            del self._carried[symbol]
            return
        if rid is None or rid not in link.pending:
            self.unexpected_replies += 1
            self._throttle.log(logging.WARNING, "unexpected_reply", session=self.session_id, sample=str(reply)[:200])
            return
        self._answered(link.pending, link, rid, acked)
        if not link.pending:
            link.live.set()

    @staticmethod
    def _answered(requests: dict[int, list[str]], link: _Link, rid: int, acked: Any) -> list[str]:
        """The streams request ``rid`` no longer waits for: the one ``acked`` names, or all of them."""
        streams = requests[rid]
        if type(acked) is str and acked in streams:
            streams.remove(acked)
            done = [acked]
            if streams:
                return done
        else:
            done = streams
        del requests[rid]
        link.requests.pop(rid, None)
        return done

    def _on_error(self, link: _Link, rid: int | None, reply: Reply) -> None:
        """The venue's error answer: counted and logged with the request it answers; the streams it refused asked
        again unless the venue says that cannot help."""
        error = reply.error
        code = str(error.get("code")) if isinstance(error, dict) else "error"
        self.venue_errors[code[:20]] = self.venue_errors.get(code[:20], 0) + 1
        failure = self._classify_error(reply) if self._classify_error is not None else None
        fatal = failure is not None and failure.fatal
        request = link.requests.pop(rid, None) if rid is not None else None
        subscribing = rid is not None and rid in link.pending
        if subscribing or rid is None or rid not in link.unsubscribing:
            self.subscribe_errors += 1  # an unsubscribe refused is only logged, as before
        streams = link.pending.pop(rid, []) if rid is not None and subscribing else []
        if rid is not None and not subscribing:
            streams = link.unsubscribing.pop(rid, [])
        log_event(
            log, logging.ERROR if subscribing or rid is None else logging.WARNING,
            "subscribe_failed" if subscribing else "unsubscribe_failed" if streams else "venue_error",
            session=self.session_id, conn_id=link.conn_id, error=str(error)[:200], request=(request or "")[:300],
            streams=len(streams), retry=subscribing and not fatal,
        )
        if not subscribing:
            return
        if fatal:
            # Asking again cannot help (an instrument the venue does not list): the others go on without these.
            if not link.pending:
                link.live.set()
            return
        # Owned by the link: _close cancels it with the connection.
        task = asyncio.get_running_loop().create_task(self._retry_subscribe(link, streams))
        link.retries.add(task)
        task.add_done_callback(link.retries.discard)

    # -- the text heartbeat ---------------------------------------------------------------------
    async def _keepalive(self, link: _Link) -> None:
        """A ``text_ping`` venue's connection: the text ``ping`` after ``ping_interval`` s without a frame; the
        connection dropped when nothing arrived within ``ping_timeout`` s after (decisions:
        :class:`~ingestor.okx.TextKeepalive`)."""
        s = self.settings
        monotonic = time.monotonic
        keep = TextKeepalive(link.last_frame, interval=s.ping_interval, timeout=s.ping_timeout)
        seen = link.last_frame
        ws = link.ws
        assert ws is not None
        while True:
            now = monotonic()
            if link.last_frame > seen:  # the reader stamps every read: something arrived since
                seen = link.last_frame
                keep.received(seen)
            action = keep.due(now)
            if action == "ping":
                try:
                    await ws.send(PING)
                except websockets.ConnectionClosed:
                    return  # the reader sees it too
                keep.sent(now)
                self.pings_sent += 1
            elif action == "drop":
                detail = f"no pong within ping_timeout ({s.ping_timeout:g} s)"
                self._on_refused("no_pong", detail)
                link.dropped = f"heartbeat: {detail}"
                ws.abort()  # the reader sees the connection closed and the loop reconnects
                return
            await asyncio.sleep(max(keep.wait(monotonic()), 0.01))

    # -- the read loop: the hot part ----------------------------------------------------------
    async def ingest(self, ts: int, frames: Sequence[bytes]) -> str | None:
        """One socket read's ``frames``, received at ``ts`` (µs), as the read loop takes them on a connection
        (pipeline, repair hand-off, ingress, latency samples); None, or why a connection would end.

        For feeding recorded or generated frames through the real path with no connection (``market bench
        ingest``): a reply among them is unexpected.  One task at a time.
        """
        link = self._detached
        if link is None:
            link = self._detached = _Link(None, self.sample_every)
        return await self._ingest(link, ts, frames)

    async def consume(self, batches: AsyncIterable[Sequence[bytes]]) -> str:
        """:meth:`ingest` each of ``batches`` (stamped received when taken) until they end; why it ended
        (``"connection closed by venue"`` when they all went through)."""
        async for batch in batches:
            ended = await self.ingest(time.time_ns() // 1000, batch)
            if ended is not None:
                return ended
        return "connection closed by venue"

    async def _read(self, link: _Link) -> str:
        assert link.ws is not None
        ingest = self._ingest
        monotonic = time.monotonic
        try:
            async for chunks in link.ws.chunks():
                link.last_frame = monotonic()
                link.busy = True
                for ts, frames in chunks:
                    ended = await ingest(link, ts, frames)
                    if ended is not None:
                        return ended
                link.busy = False
                if link.closing:
                    return "replaced"
        except websockets.ConnectionClosed as exc:
            if link.dropped is not None:
                return link.dropped
            sent = exc.sent
            if sent is not None and sent.code == 1011 and "keepalive" in sent.reason:
                self._on_refused("no_pong", f"no pong within ping_timeout ({self.settings.ping_timeout} s)")
            return f"connection closed: {exc}"
        except Exception as exc:  # nothing from the venue may kill the session
            log.exception("read_loop_error")
            return f"read loop error: {exc!r}"
        return "connection closed by venue"

    async def _ingest(self, link: _Link, ts: int, frames: Sequence[bytes]) -> str | None:
        """One read's frames: the pipeline's ticks into the ingress, its events acted on in the order they came;
        None, or why the connection must end."""
        process = self.pipeline.process
        # Frames read off a connection are of a stream subscribed; frames fed with no connection (a bench, a
        # test) are checked only against the streams the session was given, if any.
        carried = self._carried if link.ws is not None or self.streams else None
        start = 0
        while True:
            out = process(ts, frames, start, carried)
            if out.held:
                # To the repairer's hold: the pipeline saw these streams held, and nothing ran since.
                assert self._repairer is not None, "the pipeline holds ticks only for a repairer"
                hold = self._repairer.hold
                for t in out.held:
                    hold((t["venue"], t["symbol"], t["channel"]), t)
            if out.ticks:
                await self._store(link, ts, out.ticks)
            event = out.event
            if event is None:
                return None
            start = out.resume
            if type(event) is GapFound:
                # Everything before the tick is in: the repairer holds it (and repairs the hole), or a gap
                # marker goes in front of it; with no repairer it goes alone.
                repairer = self._repairer
                marker = None
                if repairer is not None:
                    marker = repairer.start(event.tick, event.gap)
                    if marker is None:
                        continue  # held: the repair releases it after what it fetched
                await self._store(link, ts, (event.tick,), marker)
            elif isinstance(event, Reply):
                self._on_reply(link, event)
            elif isinstance(event, ServerShutdown):
                log_event(log, logging.INFO, "server_shutdown_notice", session=self.session_id, conn_id=link.conn_id)
                link.shutdown.set()
            elif isinstance(event, BadFrame):
                self._log_refusal(event.kind, event.error, event.raw)
            elif isinstance(event, LoopError):
                log.error("read_loop_error", exc_info=event.error)
                return f"read loop error: {event.error!r}"

    async def _store(self, link: _Link, ts: int, ticks: Sequence[Tick], marker: Tick | None = None) -> None:
        """Into the ingress, ``marker`` first, in order (waiting for room under ``block``); one tick in
        ``sample_every`` (counted per link) has its ingest latency observed once it is in.  One call at a
        time per session, in the order the pipeline accepted the ticks: while one link waits for room,
        the other of a rotation cannot put newer ticks first.  Cost: one lock a call, one ``offer`` a tick.
        """
        ingress = self._ingress
        offer = ingress.offer
        every = self.sample_every
        async with self._storing:
            if marker is not None and not offer(marker):
                await ingress.put(marker)
            if not every:
                for t in ticks:
                    if not offer(t):
                        await ingress.put(t)
                return
            observe = self._latency.observe
            now_us = time.time_ns
            countdown = link.countdown
            for t in ticks:
                if not offer(t):
                    await ingress.put(t)
                countdown -= 1
                if not countdown:
                    countdown = every
                    observe(now_us() // 1000 - ts)
            link.countdown = countdown

    # -- watchdog -----------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        """Once a second: drop a connection that delivers nothing; report streams that went quiet."""
        s = self.settings
        names: list[str] = []
        idents: list[tuple[str, str, str]] = []
        while True:
            await asyncio.sleep(1.0)  # the watchdog's period
            now = time.monotonic()
            if names is not self.streams:  # streams were added or removed
                names = self.streams
                idents = []
                for name in names:
                    symbol, channel = self.venue.split_stream(name)
                    idents.append((self.venue.name, symbol, channel))
                for gone in set(self._progress) - set(idents):
                    del self._progress[gone]
                    self.stale.discard(self._stream_name(gone))
            link = self._link
            if link is not None and now - link.last_frame >= s.stall_timeout:
                self.stalls += 1
                log_event(
                    log, logging.WARNING, "connection_stalled", session=self.session_id, conn_id=link.conn_id,
                    quiet_s=round(now - link.last_frame, 1),
                )
                link.last_frame = now
                if link.ws is not None:
                    link.ws.abort()  # the reader sees the connection closed and the loop reconnects
            depth = self.depth
            for ident in idents:
                if ident[2] == "depth" and depth is not None:
                    seq = depth.last_update_id(ident[1])
                else:
                    seq = self._sequencer.last_seq(*ident)
                last, since = self._progress.get(ident, (None, now))
                if seq != last:
                    self._progress[ident] = (seq, now)
                    if self._stream_name(ident) in self.stale:
                        self.stale.discard(self._stream_name(ident))
                        log_event(log, logging.INFO, "stream_fresh", stream=self._stream_name(ident))
                    continue
                channel = ident[2]
                limit = s.stale_after.get("kline" if channel.startswith("kline_") else channel, 60.0)
                name = self._stream_name(ident)
                if now - since >= limit and name not in self.stale and self.state is SessionState.LIVE:
                    self.stale.add(name)
                    log_event(log, logging.WARNING, "stream_stale", stream=name, quiet_s=round(now - since, 1))

    @staticmethod
    def _stream_name(ident: tuple[str, str, str]) -> str:
        return f"{ident[0]}:{ident[1]}:{ident[2]}"

    def snapshot(self) -> SessionSnapshot:
        """The session's state and counters now (no I/O; copies its reconnect reasons and stale names)."""
        life = self.lifecycle
        return SessionSnapshot(
            session_id=self.session_id, state=life.state, reason=life.reason, transitions=life.transitions,
            streams=len(self.streams), last_frame_us=self.last_frame_us, reconnects=self.reconnects,
            reconnect_reasons=dict(self.reconnect_reasons), stalls=self.stalls, stale=tuple(sorted(self.stale)),
            subscribe_errors=self.subscribe_errors, frames=self.frames, ticks=self.ticks, malformed=self.malformed,
            unsupported=self.unsupported, refused=dict(self.pipeline.refused), pings_sent=self.pings_sent,
            venue_errors=dict(self.venue_errors), resubscribes=self.resubscribes,
        )
