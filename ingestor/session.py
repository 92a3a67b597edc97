"""One venue session: a WebSocket kept alive for as long as the ingestor runs.

The adapter is thin: frames go through :func:`ingestor.binance.parse_frame` and the
:class:`~ingestor.sequencer.Sequencer` (pure), then into the ingress queue.  Decisions live
in pure modules: :mod:`ingestor.lifecycle` (states, error policy), :mod:`consumer_sdk.core.backoff`
(delays), :mod:`ingestor.subscriptions` (requests).

- **Reconnect**: every failure leads to a capped, fully jittered delay that resets only after
  a connection stayed live for ``healthy_after`` seconds; the venue's ``Retry-After`` wins; a
  refusal that retrying cannot fix (HTTP 400/401/403/404) stops with a clear message.
- **Heartbeats**: websockets answers the venue's pings at once with the same payload and sends
  our own every ``ping_interval``; no pong within ``ping_timeout`` drops the connection.  A
  watchdog on the monotonic clock drops a connection that delivered nothing for ``stall_timeout``
  and reports each stream whose seq has not moved for its channel's ``stale_after`` threshold.
- **Subscribe**: requests paced under the venue's 5 messages a second; replies are checked,
  and what failed is retried.
- **Rotation** (make-before-break): before ``max_age`` or on a ``serverShutdown`` event a new
  connection is opened and subscribed while the old one still delivers; the old one is closed
  only once the new one is live.  The overlap is deduplicated by the sequencer.

Nothing the venue sends can raise out of the read loop: malformed frames, unknown events
and replies to requests we never sent are counted and logged at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import websockets
from websockets.asyncio.client import connect

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.backoff import Backoff
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY, LatencyHistogram, check_sample_every
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.sequencing import Verdict
from consumer_sdk.core.tick import Tick
from distributor.ingress import IngressQueue
from ingestor.binance import MalformedFrame, Reply, ServerShutdown, parse_frame, stream_to_channel
from ingestor.lifecycle import Failure, Lifecycle, SessionState, classify_failure
from ingestor.repair import GapRepairer
from ingestor.sequencer import Sequencer
from ingestor.snapshot import SessionSnapshot
from ingestor.subscriptions import subscribe_requests
from ingestor.wsframes import Chunk, FeedConnection

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
        "conn_id", "last_frame", "live", "next_send", "opened", "pending", "retries", "shutdown", "unsubscribing",
        "ws",
    )

    def __init__(self, ws: FeedConnection | None) -> None:
        self.conn_id = next(_ids)
        self.ws = ws
        self.opened = time.monotonic()
        self.last_frame = self.opened
        self.live = asyncio.Event()
        self.shutdown = asyncio.Event()
        self.pending: dict[int, list[str]] = {}
        self.unsubscribing: dict[int, list[str]] = {}
        self.next_send = 0.0
        #: subscribe retries in flight; cancelled when the link closes
        self.retries: set[asyncio.Task[None]] = set()


class _Fatal(Exception):
    pass


class VenueSession:
    """A connection carrying a fixed list of venue streams, kept alive for as long as it runs."""

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
        venue: str = "binance",
        sample_every: int = DEFAULT_SAMPLE_EVERY,
    ) -> None:
        self.session_id = next(_ids)
        self.url = ws_base.rstrip("/") + "/stream"
        self.streams = streams
        self.venue = venue
        self._ingress = ingress
        self._sequencer = sequencer
        self._latency = ingest_latency
        #: ingest latency is observed on one tick in this many (0: not measured)
        self.sample_every = check_sample_every(sample_every)
        self._repairer = repairer
        self.settings = s = settings or SessionSettings()
        self._backoff = backoff or Backoff(base=s.backoff_base, cap=s.backoff_cap)
        self._throttle = Throttle(log)
        self._next_request = 1
        self.lifecycle = Lifecycle()
        self.frames = 0
        self.ticks = 0
        self.malformed = 0
        self.unsupported = 0
        self.rejected = 0
        self.connects = 0
        self.reconnects = 0
        #: the session has been live with this URL: a handshake refusal is an outage from now on, not a wrong URL
        self.been_live = False
        self.rotations = 0
        self.subscribe_errors = 0
        self.unexpected_replies = 0
        self.stalls = 0
        self.reconnect_reasons: dict[str, int] = {}
        self.stale: set[str] = set()
        self.last_frame_us = 0
        self._progress: dict[tuple[str, str, str], tuple[int | None, float]] = {}
        self._link: _Link | None = None
        self._links: set[_Link] = set()

    @property
    def state(self) -> SessionState:
        return self.lifecycle.state

    def _to(self, state: SessionState, reason: str, **fields: Any) -> None:
        previous = self.lifecycle.to(state, reason)
        log_event(
            log, logging.INFO, "session_state", session=self.session_id, venue=self.venue, state=state.value,
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
            # Cancelled (the ingestor stops): drop every connection now, without waiting on the venue.
            for live in list(self._links):
                if live.ws is not None:
                    live.ws.transport.abort()

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
                    await self._back_off(classify_failure(_map_error(exc), been_live=self.been_live), None)
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
                    link.opened = time.monotonic() - self.settings.max_age + self.settings.rotation_timeout
                    continue
                await self._close(link, reader)
                self.rotations += 1
                link, reader = new_link, new_reader
                self._to(SessionState.LIVE, f"rotated ({reason})", conn_id=link.conn_id)
                continue
            await self._close(link, reader)
            healthy = time.monotonic() - link.opened >= self.settings.healthy_after and link.live.is_set()
            if healthy:
                self._backoff.reset()
            link = reader = None
            await self._back_off(Failure(reason), healthy)

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
        ws = cast(FeedConnection, await connect(
            self.url, open_timeout=s.open_timeout, ping_interval=s.ping_interval, ping_timeout=s.ping_timeout,
            close_timeout=2, max_size=2**20, max_queue=64, compression=None, create_connection=FeedConnection,
        ))
        link = _Link(ws)
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
        return "max_age", True

    async def _close(self, link: _Link, reader: asyncio.Task[str]) -> None:
        self._links.discard(link)
        if self._link is link:
            self._link = None
        for task in list(link.retries):
            task.cancel()
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

    async def _subscribe(self, link: _Link, streams: list[str], method: str = "SUBSCRIBE") -> None:
        s = self.settings
        requests = subscribe_requests(streams, self._next_request, per_request=s.params_per_request, method=method)
        self._next_request += len(requests)
        for req in requests:
            # Pacing under the venue's incoming message limit, shared by every request on this link.
            wait = link.next_send - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            link.next_send = time.monotonic() + 1.0 / s.requests_per_s
            if method == "SUBSCRIBE":
                link.pending[req["id"]] = req["params"]
            else:
                link.unsubscribing[req["id"]] = req["params"]
            assert link.ws is not None, "a link without a connection is never subscribed"
            await link.ws.send(orjson.dumps(req).decode())

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
        self._send_later(new, "SUBSCRIBE")

    def remove_streams(self, streams: list[str]) -> None:
        """Stop carrying these streams: unsubscribed now if connected, and not asked for again."""
        gone = [s for s in streams if s in self.streams]
        if not gone:
            return
        self.streams = [s for s in self.streams if s not in set(gone)]
        self._send_later(gone, "UNSUBSCRIBE")

    def _send_later(self, streams: list[str], method: str) -> None:
        link = self._link
        if link is None:
            return  # the next connection subscribes to self.streams
        # Owned by the link: _close cancels it with the connection.
        task = asyncio.get_running_loop().create_task(self._request(link, streams, method))
        link.retries.add(task)
        task.add_done_callback(link.retries.discard)

    async def _request(self, link: _Link, streams: list[str], method: str) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._subscribe(link, streams, method)

    def _on_reply(self, link: _Link, reply: Reply) -> None:
        if type(reply.id) is int and reply.id in link.unsubscribing:
            gone = link.unsubscribing.pop(reply.id)
            if reply.error is not None:
                log_event(log, logging.WARNING, "unsubscribe_failed", session=self.session_id,
                          error=str(reply.error)[:200], streams=len(gone))
                return
            # No frame of these streams follows the reply: free their state now (it may have been
            # re-created by frames that were in flight when we asked).
            for name in gone:
                if name not in self.streams:
                    symbol, channel = stream_to_channel(name)
                    self._sequencer.release(self.venue, symbol, channel)
            return
        streams = link.pending.pop(reply.id, None) if type(reply.id) is int else None
        if streams is None:
            self.unexpected_replies += 1
            self._throttle.log(logging.WARNING, "unexpected_reply", session=self.session_id, sample=str(reply)[:200])
            return
        if reply.error is not None:
            self.subscribe_errors += 1
            log_event(
                log, logging.ERROR, "subscribe_failed", session=self.session_id, conn_id=link.conn_id,
                error=str(reply.error)[:200], streams=len(streams),
            )
            # Owned by the link: _close cancels it with the connection.
            task = asyncio.get_running_loop().create_task(self._retry_subscribe(link, streams))
            link.retries.add(task)
            task.add_done_callback(link.retries.discard)
            return
        if not link.pending:
            link.live.set()

    # -- the read loop: the hot part ----------------------------------------------------------
    async def consume(self, batches: AsyncIterable[Sequence[bytes]]) -> str:
        """Run the read loop over ``batches`` of raw venue frames until they end; why it ended.

        What the live loop runs on each open connection, without the connection: for feeding
        recorded or generated frames through the real path (``market bench ingest``).  Each batch
        stands for one socket read: its frames are stamped received when the loop takes it.
        """

        async def chunks() -> AsyncIterator[list[Chunk]]:
            async for batch in batches:
                yield [(time.time_ns() // 1000, list(batch))]

        return await self._read(_Link(None), chunks())

    async def _read(self, link: _Link, source: AsyncIterator[list[Chunk]] | None = None) -> str:
        ingress = self._ingress
        sequencer = self._sequencer
        accept = sequencer.accept
        observe = self._latency.observe
        every = self.sample_every
        countdown = every
        now_us = time.time_ns
        monotonic = time.monotonic
        ok_max = Verdict.GAP
        gap = Verdict.GAP
        repairer = self._repairer
        holds = repairer.holds if repairer is not None else {}
        if source is None:
            assert link.ws is not None
            source = link.ws.chunks()
        try:
            async for chunks in source:
                link.last_frame = monotonic()
                for ts, frames in chunks:
                    self.frames += len(frames)
                    self.last_frame_us = ts
                    for raw in frames:
                        try:
                            r = parse_frame(raw, ts)
                        except MalformedFrame as exc:
                            self.malformed += 1
                            self._throttle.log(
                                logging.WARNING, "malformed_frame", session=self.session_id,
                                error=str(exc)[:200], sample=str(raw)[:200],
                            )
                            continue
                        if type(r) is dict:
                            verdict = accept(r)
                            if verdict > ok_max:
                                self.rejected += 1
                                continue
                            self.ticks += 1
                            if holds and repairer is not None and repairer.hold(
                                (r["venue"], r["symbol"], r["channel"]), r
                            ):
                                continue
                            if verdict is gap and repairer is not None and sequencer.last_gap is not None:
                                marker = repairer.start(r, sequencer.last_gap)
                                if marker is None:
                                    continue
                                if not ingress.offer(marker):
                                    await ingress.put(marker)
                            if not ingress.offer(r):
                                await ingress.put(r)
                            if every:
                                countdown -= 1
                                if not countdown:
                                    countdown = every
                                    observe(now_us() // 1000 - ts)
                        elif r is None:
                            self.unsupported += 1
                        elif isinstance(r, Reply):
                            self._on_reply(link, r)
                        elif isinstance(r, ServerShutdown):
                            log_event(log, logging.INFO, "server_shutdown_notice", session=self.session_id,
                                      conn_id=link.conn_id)
                            link.shutdown.set()
        except websockets.ConnectionClosed as exc:
            return f"connection closed: {exc}"
        except Exception as exc:  # nothing from the venue may kill the session
            log.exception("read_loop_error")
            return f"read loop error: {exc!r}"
        return "connection closed by venue"

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
                    symbol, channel = stream_to_channel(name)
                    idents.append((self.venue, symbol, channel))
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
                    link.ws.transport.abort()  # the reader sees the connection closed and the loop reconnects
            for ident in idents:
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
            unsupported=self.unsupported,
        )


def _map_error(exc: BaseException) -> BaseException:
    """Library errors -> something :func:`classify_failure` understands (status and Retry-After)."""
    if isinstance(exc, websockets.InvalidURI):
        return _StatusError(f"invalid venue URL: {exc}", 400, None)
    if isinstance(exc, websockets.InvalidStatus):
        response = exc.response
        return _StatusError(str(exc), response.status_code, response.headers.get("Retry-After"))
    return exc


class _StatusError(Exception):
    def __init__(self, message: str, status: int, retry_after: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
