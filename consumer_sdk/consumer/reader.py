"""The :class:`Consumer`: the read loop that ties groups, claims and batches together and hands ticks over.

What it does itself: the loop (set-up, recovery after ``NOGROUP``, retries with backoff, stop), when
to read, rescan and claim, and the public face (:meth:`Consumer.run`, :meth:`Consumer.batches`,
:meth:`Consumer.stats`, :meth:`Consumer.lag`).  The rest is elsewhere: :mod:`~consumer_sdk.consumer.batch`
(per entry, pure), :mod:`~consumer_sdk.consumer.trim` (holes and trimmed history, pure),
:mod:`~consumer_sdk.consumer.groups` (streams and groups), :mod:`~consumer_sdk.consumer.claims`
(``XAUTOCLAIM``), :mod:`~consumer_sdk.consumer.fetch` (one ``XREADGROUP``),
:mod:`~consumer_sdk.consumer.delivery` (handler, hooks, acks, counters).  The delivery rules are in
:mod:`consumer_sdk.consumer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rexc
from redis.asyncio import Redis

from consumer_sdk.consumer.batch import Flat, KeyState
from consumer_sdk.consumer.claims import claim_idle
from consumer_sdk.consumer.delivery import Acks, Delivery, GapHook, InvalidHook, TrimmedHook
from consumer_sdk.consumer.fetch import CLUSTER_IDLE_S, ack_and_read, cancel_until_done, read_each
from consumer_sdk.consumer.groups import Groups
from consumer_sdk.consumer.trim import lag_estimate
from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.backoff import backoff_delays
from consumer_sdk.core.errors import ConfigError, TransientError
from consumer_sdk.core.handler import Handler
from consumer_sdk.core.keys import DEFAULT_PREFIX
from consumer_sdk.core.log import Throttle, get_logger
from consumer_sdk.core.redis import (
    ErrorKind,
    blocking_client,
    classify,
    cluster_raw_client,
    field_name,
    is_cluster,
    raw_stream_client,
    translate,
)
from consumer_sdk.core.server import require_supported
from consumer_sdk.core.tick import Tick
from consumer_sdk.poison import MAX_ENTRY_BYTES

__all__ = ["Consumer", "ConsumerStats", "GapHook", "InvalidHook", "TrimmedHook"]

log = get_logger("consumer")

#: entries in one read (all streams) from which the next read is taken not to block (see ``Consumer._read``):
#: the time spent handling them may have let a backlog pile up, whose reply is best built with the collector
#: paused, which only a read that does not block does
BACKLOG_ENTRIES = 2000


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    """Counters since the consumer was built (a snapshot; read it as often as you like)."""

    delivered: int  # ticks handed to the handler
    acked: int  # entries acknowledged (handled, duplicates, invalid)
    duplicates: int  # redelivered seqs not handed again
    gaps: int  # holes in seq reported
    gap_ticks: int  # seqs missing in those holes
    late: int  # ticks that filled a hole after a later one was handed over
    invalid: int  # entries that are not ticks (acked, passed to on_invalid or logged)
    nogroup_recoveries: int  # groups created again after NOGROUP
    reconnects: int  # connection errors retried
    claimed: int  # entries taken over from idle consumers with XAUTOCLAIM
    trimmed: int  # losses to trimming reported (on_trimmed or TrimmedError)
    keys: int  # streams being read now
    #: entries by kind (:data:`consumer_sdk.poison.POISON_KINDS`, every kind present): ``no_field``,
    #: ``too_large``, ``not_json``, ``not_a_tick`` (together ``invalid``), and ``future_id``: ticks handed
    #: over whose entry ID lies more than a day ahead of this clock
    poisoned: dict[str, int]


def _is_async(handler: Handler) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    # An object whose __call__ is a coroutine function.
    return inspect.iscoroutinefunction(type(handler).__call__)


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Consumer:
    """Reads ticks from the streams matching ``patterns`` as member ``consumer`` of ``group``.

    ``redis_url`` is a URL or an existing ``redis.asyncio.Redis`` (``redis=`` is accepted as an
    alias for a client).  ``patterns`` are ``venue:SYMBOL:channel`` patterns with globs or full keys
    ``md:venue:SYMBOL:channel``.  ``count`` entries per stream per read; ``block_ms`` the longest a
    read waits; ``start_id`` where groups created at the start begin (``"$"``: new ticks only,
    ``"0"``: all history held, or any :func:`~consumer_sdk.replay.parse_bound` start: an entry ID,
    epoch ms, an ISO-8601 time, ``seq:N``); ``rescan_s`` how often globs are expanded again; ``claim_idle_ms``
    how long an entry may sit with another consumer before it is claimed (``None``: never);
    ``max_entry_bytes`` the longest field ``d`` read as a tick (longer ones are acked unread as
    ``too_large``, see :mod:`consumer_sdk.poison`).  Hooks: ``on_invalid(key, entry_id, error)``,
    ``on_gap(key, first_missing, last_missing)``,
    ``on_trimmed(key, first_missing_id, first_available_id)`` (see :mod:`consumer_sdk.consumer`).
    """

    def __init__(
        self,
        *,
        redis_url: str | Redis | None = None,
        redis: Redis | None = None,
        patterns: Sequence[str],
        group: str,
        consumer: str | None = None,
        prefix: str = DEFAULT_PREFIX,
        count: int = 1000,
        block_ms: int = 1000,
        start_id: str = "$",
        rescan_s: float = 5.0,
        claim_idle_ms: int | None = 30000,
        on_invalid: InvalidHook | None = None,
        on_gap: GapHook | None = None,
        on_trimmed: TrimmedHook | None = None,
        max_entry_bytes: int = MAX_ENTRY_BYTES,
    ) -> None:
        if (redis_url is None) == (redis is None):
            raise ConfigError("give exactly one of redis_url (a URL or a client) and redis (a client)")
        source = redis_url if redis_url is not None else redis
        assert source is not None
        if isinstance(patterns, str) or not patterns:
            raise ConfigError("patterns must be a non-empty sequence of patterns or stream keys")
        if not group or not isinstance(group, str):
            raise ConfigError("group must be a non-empty string")
        if count < 1:
            raise ConfigError(f"count must be >= 1, not {count}")
        if block_ms < 1:
            raise ConfigError(f"block_ms must be >= 1, not {block_ms}")
        if rescan_s <= 0:
            raise ConfigError(f"rescan_s must be > 0, not {rescan_s}")
        if claim_idle_ms is not None and claim_idle_ms < 1:
            raise ConfigError(f"claim_idle_ms must be >= 1 or None, not {claim_idle_ms}")
        if max_entry_bytes < 1:
            raise ConfigError(f"max_entry_bytes must be >= 1, not {max_entry_bytes}")
        self._delivery = Delivery(
            group=group, on_invalid=on_invalid, on_gap=on_gap, on_trimmed=on_trimmed, max_bytes=max_entry_bytes
        )
        self._groups = Groups(
            patterns=patterns, prefix=prefix, group=group, start_id=start_id, report=self._delivery.report_trimmed
        )
        self._source: str | Redis = source
        self.group = group
        self.consumer = consumer or _default_consumer_name()
        self._count = count
        self._block_ms = block_ms
        self._rescan_s = rescan_s
        self._claim_idle_ms = claim_idle_ms

        self._client: Redis | None = None
        self._owned = False
        self._cluster = False
        self._dfield: Any = b"d"
        self._running = False
        self._server_checked = False
        self._stop = asyncio.Event()
        self._read_task: asyncio.Task[Any] | None = None
        self._next_rescan = 0.0
        self._next_claim = 0.0
        self._throttle = Throttle(log, interval=5.0)
        self._reconnects = 0
        self._claimed = 0
        self._backlog = True  # whether a backlog is likely (see _read): the next read does not block

    # ------------------------------------------------------------ public

    @property
    def keys(self) -> list[str]:
        """The stream keys being read now."""
        return [s.key for s in self._groups.active()]

    def stats(self) -> ConsumerStats:
        d = self._delivery
        return ConsumerStats(
            delivered=d.delivered,
            acked=d.acked,
            duplicates=d.duplicates,
            gaps=d.gaps,
            gap_ticks=d.gap_ticks,
            late=d.late,
            invalid=d.invalid,
            nogroup_recoveries=self._groups.recreated,
            reconnects=self._reconnects,
            claimed=self._claimed,
            trimmed=d.trimmed,
            keys=len(self._groups.active()),
            poisoned=dict(d.poison.counts),
        )

    def stop(self) -> None:
        """Ask :meth:`run` to return: at once when it is waiting, else after the batch in hand is acked.

        Called before ``run()`` starts, it makes that ``run()`` return at once.
        """
        self._stop.set()
        task = self._read_task
        if task is not None and not task.done():
            cancel_until_done(task)

    async def run(self, handler: Handler) -> None:
        """Hand every new tick to ``handler`` until :meth:`stop` or cancellation.

        Raises whatever ``handler`` (or a hook) raises, after acking what was handled before it;
        :class:`~consumer_sdk.core.errors.TrimmedError` when history was trimmed and no ``on_trimmed``
        was given; :class:`~consumer_sdk.core.errors.ConfigError` or
        :class:`~consumer_sdk.core.errors.MarketError` for Redis errors that retrying cannot fix.
        Connection errors never end it.
        """
        async for _ in self._loop(handler, _is_async(handler), None):
            pass  # pragma: no cover - the loop yields only when collecting batches

    async def batches(self) -> AsyncIterator[list[tuple[str, str, Tick]]]:
        """``async for batch in consumer.batches()``: lists of ``(key, entry_id, tick)``.

        A batch is acked when the next one is requested; the last one is left pending when the
        iteration ends (it is handed again by the next ``run()``/``batches()`` of a new consumer,
        or skipped as a duplicate by this one).  Ends on :meth:`stop`.
        """
        collected: list[tuple[str, str, Tick]] = []

        def ignore(_tick: Tick) -> None:
            return None

        async for _ in self._loop(ignore, False, collected):
            batch = collected[:]
            collected.clear()
            yield batch

    async def lag(self) -> dict[str, int]:
        """Entries not yet delivered to the group, per stream key (Redis 7 ``lag``; see :func:`lag_estimate`)."""
        client, owned = (self._client, False) if self._client is not None else self._make_client()
        try:
            keys = self.keys or self._groups.literal_keys()
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.xinfo_groups(key)
                    pipe.xinfo_stream(key)
                results = await pipe.execute(raise_on_error=False)
        except rexc.RedisError as exc:
            raise translate(exc, "lag") from exc
        finally:
            if owned:
                await client.aclose()
        out: dict[str, int] = {}
        for i, key in enumerate(keys):
            groups, stream = results[2 * i], results[2 * i + 1]
            if isinstance(groups, Exception):
                continue
            mine = self._groups.find(groups)
            if mine is not None:
                out[key] = lag_estimate(mine, None if isinstance(stream, Exception) else stream)
        return out

    async def aclose(self) -> None:
        """Close the client this consumer made for itself (a given client is left open)."""
        client, self._client = self._client, None
        if client is not None and self._owned:
            await client.aclose()

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        await self.aclose()

    # ------------------------------------------------------------ loop

    def _make_client(self) -> tuple[Redis, bool]:
        return blocking_client(self._source, self._block_ms)

    async def _loop(
        self, handler: Handler, is_async: bool, collect: list[tuple[str, str, Tick]] | None
    ) -> AsyncIterator[None]:
        if self._running:
            raise RuntimeError("this Consumer is already running; one run() or batches() at a time")
        self._running = True
        if self._client is None:
            self._client, self._owned = self._make_client()
        client = self._client
        self._cluster = is_cluster(client)
        # reads entries without a dict per entry (on a cluster, a client of its own: closed below)
        reader = cluster_raw_client(client) if self._cluster else raw_stream_client(client)
        self._dfield = self._delivery.dfield = field_name(client)
        delays = backoff_delays()
        need_setup, need_recover, failures = True, False, 0
        # what was handled and not yet acked: sent in the same write as the next read (or on its own when no
        # read follows); when collecting, what the caller was handed, acked once it asks for the next batch
        acks: Acks = []
        try:
            while not self._stop.is_set():
                try:
                    if need_setup:
                        await self._setup(client)
                        need_setup = False
                    if need_recover:
                        await self._groups.recover(client)
                        need_recover = False
                    claimed = await self._maintain(client, reader, handler, is_async, collect)
                    if collect and claimed:  # hand over what was claimed first; ack the batch before it
                        await self._delivery.ack(client, acks)
                        acks = claimed
                    else:
                        acks += claimed
                        sent, acks = acks, []
                        found = await self._read(client, reader, sent)
                        if found:
                            acks = await self._dispatch(client, found, handler, is_async, collect)
                except (rexc.RedisError, OSError, TransientError) as exc:
                    reraise_if_cancelling()
                    kind = classify(exc)
                    if kind is ErrorKind.FATAL:
                        raise translate(exc, f"consumer {self.group}/{self.consumer}") from exc
                    failures += 1
                    if kind is ErrorKind.NOGROUP:
                        need_recover = True
                        if failures == 1:
                            continue
                    else:
                        self._reconnects += 1
                        for state in self._groups.states.values():
                            state.cursor = "0"  # re-read our pending entries: some acks may be lost
                    delay = next(delays)
                    self._throttle.log(
                        logging.WARNING, "redis_retry", group=self.group, consumer=self.consumer,
                        kind=kind.value, error=f"{type(exc).__name__}: {exc}", delay_s=round(delay, 3),
                    )
                    await self._sleep(delay)
                    continue
                if collect:
                    yield None
            if collect is None and acks:
                with contextlib.suppress(rexc.RedisError, OSError):
                    await self._delivery.ack(client, acks)  # stopped: ack what was handled (else it is redelivered)
        finally:
            self._running = False
            self._stop.clear()
            if reader is not client and is_cluster(reader):
                await reader.aclose()
            if self._owned:
                await self.aclose()

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()

    async def _setup(self, client: Redis) -> None:
        """Find the streams, make sure the group exists on each, check for trimmed history.

        The first set-up also checks the server is one this SDK supports (:mod:`consumer_sdk.core.server`):
        :class:`ConfigError` otherwise, which ends :meth:`run`.
        """
        if not self._server_checked:
            await require_supported(client)
            self._server_checked = True
        await self._groups.setup(client)
        self._next_rescan = self._next_claim = asyncio.get_running_loop().time()

    async def _maintain(
        self,
        client: Redis,
        reader: Redis,
        handler: Handler,
        is_async: bool,
        collect: list[tuple[str, str, Tick]] | None,
    ) -> Acks:
        """Rescan globs and claim idle entries when they are due; returns the claimed entries' acks.

        ``reader`` is ``client`` as made by :func:`~consumer_sdk.core.redis.raw_stream_client`.
        """
        now = asyncio.get_running_loop().time()
        if now >= self._next_rescan:
            self._next_rescan = now + self._rescan_s
            if self._groups.has_globs:
                await self._groups.rescan(client)
        if self._claim_idle_ms is None or now < self._next_claim:
            return []
        self._next_claim = now + self._claim_idle_ms / 2000.0
        claimed = await claim_idle(
            reader, self._groups.active(), group=self.group, consumer=self.consumer, idle_ms=self._claim_idle_ms,
            count=self._count, dfield=self._dfield, report=self._delivery.report_trimmed,
        )
        self._claimed += claimed.count
        if claimed.more:
            self._next_claim = now  # more to claim: go on next time round
        if not claimed.streams:
            return []
        return await self._dispatch(client, claimed.streams, handler, is_async, collect, claimed=True)

    # ------------------------------------------------------------ reading

    def _block(self) -> int:
        now = asyncio.get_running_loop().time()
        due = self._next_claim if self._claim_idle_ms is not None else float("inf")
        if self._groups.has_globs:
            due = min(due, self._next_rescan)
        if due == float("inf"):
            return self._block_ms
        return max(1, min(self._block_ms, int((due - now) * 1000)))

    async def _read(self, client: Redis, reader: Redis, acks: Acks) -> list[Flat]:
        """Ack ``acks``, then one read over every active stream; ``reader`` is ``client`` as made by
        :func:`~consumer_sdk.core.redis.raw_stream_client`.

        The acks go in the same write as the read (:func:`~consumer_sdk.consumer.fetch.ack_and_read`), so
        the read does not wait for them.  The read blocks at once (one round trip a cycle) unless a backlog
        is likely: at the start, after pending entries were read again, or when the read before was large
        (:meth:`_large`); then it does not block, so a large reply is built with the collector paused, and
        only a read that finds nothing is followed by one that blocks.
        """
        streams: dict[Any, Any] = {}
        draining: set[KeyState] = set()
        for state in self._groups.active():
            streams[state.key] = state.cursor
            if state.cursor != ">":
                draining.add(state)
        if not streams or self._cluster:
            await self._delivery.ack(client, acks)
            acks = []
        if not streams:
            await self._sleep(self._block() / 1000.0)
            return []
        if draining:
            found = await self._fetch(reader, streams, acks)
            for state in draining:
                state.cursor = ">"
            for rkey, ids, _values in found:
                state = self._groups.by_name[rkey]
                if len(ids) >= self._count and state in draining:
                    state.cursor = ids[-1]  # a full page: there may be more pending
            self._backlog = True  # what came in since (or all a group starting at "0" holds): not blocking
            return found
        if self._backlog or self._cluster:  # (on a cluster no read blocks: a read first, then a wait)
            found = await self._fetch(reader, streams, acks)
            self._backlog = self._large(found)
            if found or self._stop.is_set():
                return found
            acks = []
        if self._stop.is_set():
            await self._delivery.ack(client, acks)
            return []
        read = self._fetch(reader, streams, acks, block=self._block())
        task: asyncio.Task[list[Flat]] = asyncio.create_task(read)
        self._read_task = task
        try:
            found = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._stop.is_set() and current is not None and not current.cancelling():
                if acks:  # stopped before or after they were written: again (an XACK counts only what it acks)
                    with contextlib.suppress(rexc.RedisError, OSError):
                        await self._delivery.ack(client, acks)
                return []
            raise
        finally:
            self._read_task = None
        self._backlog = self._large(found)
        return found

    def _large(self, found: list[Flat]) -> bool:
        """Whether a read found enough that more may have piled up meanwhile: a full page (``count``) of a
        stream, or :data:`BACKLOG_ENTRIES` in all."""
        total = 0
        for _rkey, ids, _values in found:
            n = len(ids)
            if n >= self._count:
                return True
            total += n
        return total >= BACKLOG_ENTRIES

    async def _fetch(
        self, client: Redis, streams: dict[Any, Any], acks: Acks, block: int | None = None
    ) -> list[Flat]:
        """One read; ``acks`` are sent with it (on a cluster, the caller has sent them already)."""
        if self._cluster:
            if block is not None:
                # the read just before found nothing, and no one command can wait on streams of several slots:
                # wait a little (or until stopped), and the loop reads again
                await self._sleep(min(block / 1000.0, CLUSTER_IDLE_S))
                return []
            return await read_each(client, self.group, self.consumer, streams, count=self._count, dfield=self._dfield)
        _acked, found = await ack_and_read(
            client, self.group, self.consumer, acks, streams, count=self._count, dfield=self._dfield, block=block,
            on_acked=self._count_acked,
        )
        return found

    def _count_acked(self, n: int) -> None:
        self._delivery.acked += n

    async def _dispatch(
        self,
        client: Redis,
        streams: Sequence[Flat],
        handler: Handler,
        is_async: bool,
        collect: list[tuple[str, str, Tick]] | None,
        *,
        claimed: bool = False,
    ) -> Acks:
        return await self._delivery.dispatch(
            client, streams, self._groups.by_name, handler, is_async, collect, claimed=claimed
        )
