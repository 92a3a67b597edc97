"""One WebSocket session to the venue: connect, subscribe, read, reconnect forever.

The adapter is thin: frames go through :func:`ingestor.binance.parse_frame` and the
:class:`~ingestor.sequencer.Sequencer` (pure), then into the ingress queue.  It owns
no task of its own: :meth:`VenueSession.run` is awaited inside the ingestor's task group.

Lifecycle: ``connecting -> subscribing -> live -> backing_off -> connecting ...``; every
transition is logged with its reason.  Reconnects wait a capped, fully jittered delay
(:class:`~ingestor.backoff.Backoff`) that resets only after a connection stayed live for
``healthy_after`` seconds.  websockets answers the venue's pings at once with the same
payload and sends its own pings; a peer that stops answering is dropped after
``ping_timeout``.  Nothing the venue sends can raise out of the read loop: malformed
frames and unknown events are counted and logged at most once a second with a sample.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from enum import StrEnum
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect

from consumer_sdk._log import Throttle, get_logger, log_event
from consumer_sdk.errors import ConfigError
from consumer_sdk.latency import LatencyHistogram
from consumer_sdk.sequencing import Verdict
from consumer_sdk.tick import Tick
from distributor.ingress import IngressQueue
from ingestor.backoff import Backoff
from ingestor.binance import MalformedFrame, Reply, ServerShutdown, parse_frame
from ingestor.sequencer import Sequencer
from ingestor.subscriptions import subscribe_requests

__all__ = ["SessionState", "VenueSession"]

log = get_logger("session")
_ids = itertools.count(1)


class SessionState(StrEnum):
    CONNECTING = "connecting"
    SUBSCRIBING = "subscribing"
    LIVE = "live"
    BACKING_OFF = "backing_off"
    CLOSED = "closed"


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
        backoff: Backoff | None = None,
        healthy_after: float = 10.0,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        open_timeout: float = 10.0,
        requests_per_s: float = 4.0,
    ) -> None:
        self.conn_id = next(_ids)
        self.url = ws_base.rstrip("/") + "/stream"
        self.streams = streams
        self._ingress = ingress
        self._sequencer = sequencer
        self._latency = ingest_latency
        self._backoff = backoff or Backoff()
        self._healthy_after = healthy_after
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._open_timeout = open_timeout
        self._request_gap = 1.0 / requests_per_s
        self._pending: dict[int, list[str]] = {}
        self._next_request = 1
        self._throttle = Throttle(log)
        self.state = SessionState.CONNECTING
        self.frames = 0
        self.ticks = 0
        self.malformed = 0
        self.unsupported = 0
        self.rejected = 0
        self.connects = 0
        self.reconnects = 0
        self.subscribe_errors = 0
        self.last_frame_us = 0

    def _transition(self, state: SessionState, reason: str, **fields: Any) -> None:
        self.state = state
        log_event(
            log, logging.INFO, "session_state", conn_id=self.conn_id, state=state.value, reason=reason, **fields
        )

    async def run(self) -> None:
        """Connect and read until cancelled; every failure leads to a backed-off reconnect."""
        try:
            while True:
                self._transition(SessionState.CONNECTING, "start" if not self.connects else "reconnect")
                live_since: float | None = None
                reason = "closed"
                try:
                    async with connect(
                        self.url,
                        open_timeout=self._open_timeout,
                        ping_interval=self._ping_interval,
                        ping_timeout=self._ping_timeout,
                        close_timeout=2,
                        max_size=2**20,
                        max_queue=64,
                        compression=None,
                    ) as ws:
                        self.connects += 1
                        self._transition(SessionState.SUBSCRIBING, "connected", streams=len(self.streams))
                        live_since = time.monotonic()
                        reason = await self._serve(ws)
                except websockets.InvalidURI as exc:
                    raise ConfigError(f"invalid venue URL {self.url!r}: {exc}") from None
                except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if live_since is not None and time.monotonic() - live_since >= self._healthy_after:
                    self._backoff.reset()
                delay = 0.0 if reason == "server_shutdown" else self._backoff.next_delay()
                self.reconnects += 1
                self._transition(SessionState.BACKING_OFF, reason, delay_s=round(delay, 3))
                await asyncio.sleep(delay)
        finally:
            self.state = SessionState.CLOSED

    async def _serve(self, ws: ClientConnection) -> str:
        subscriber = asyncio.create_task(self._subscribe(ws), name=f"subscribe-{self.conn_id}")
        try:
            return await self._read(ws)
        finally:
            subscriber.cancel()
            # The subscribe task only sends requests; it holds no state to clean up.
            await asyncio.gather(subscriber, return_exceptions=True)

    async def _subscribe(self, ws: ClientConnection) -> None:
        requests = subscribe_requests(self.streams, self._next_request)
        self._next_request += len(requests)
        for i, req in enumerate(requests):
            if i:
                await asyncio.sleep(self._request_gap)  # pacing under the venue's message rate limit
            self._pending[req["id"]] = req["params"]
            await ws.send(orjson.dumps(req).decode())

    def _on_reply(self, reply: Reply) -> None:
        streams = self._pending.pop(reply.id, None) if isinstance(reply.id, int) else None
        if streams is None:
            self._throttle.log(logging.WARNING, "unexpected_reply", conn_id=self.conn_id, sample=str(reply)[:200])
            return
        if reply.error is not None:
            self.subscribe_errors += 1
            log_event(
                log, logging.ERROR, "subscribe_failed", conn_id=self.conn_id, error=str(reply.error)[:200],
                streams=len(streams),
            )
            return
        if not self._pending and self.state is SessionState.SUBSCRIBING:
            self._transition(SessionState.LIVE, "subscribed", streams=len(self.streams))

    async def _read(self, ws: ClientConnection) -> str:
        ingress = self._ingress
        accept = self._sequencer.accept
        observe = self._latency.observe
        now_us = time.time_ns
        ok_max = Verdict.GAP
        try:
            async for raw in ws:
                ts = now_us() // 1000
                self.frames += 1
                self.last_frame_us = ts
                try:
                    r = parse_frame(raw, ts)
                except MalformedFrame as exc:
                    self.malformed += 1
                    self._throttle.log(
                        logging.WARNING, "malformed_frame", conn_id=self.conn_id, error=str(exc)[:200],
                        sample=str(raw)[:200],
                    )
                    continue
                if type(r) is dict:
                    if accept(r) <= ok_max:
                        self.ticks += 1
                        if not ingress.offer(r):
                            await ingress.put(r)
                        observe(now_us() // 1000 - ts)
                    else:
                        self.rejected += 1
                elif r is None:
                    self.unsupported += 1
                elif isinstance(r, Reply):
                    self._on_reply(r)
                elif isinstance(r, ServerShutdown):
                    return "server_shutdown"
        except websockets.ConnectionClosed as exc:
            return f"connection closed: {exc}"
        return "connection closed by venue"
