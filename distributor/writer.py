"""The Redis Streams writer: batched, idempotent, capped appends.

One task owns the writer.  Ticks are handed over with :meth:`StreamWriter.submit`
(synchronous, no await); the task flushes whatever is buffered as soon as the
previous flush returned, so batches grow with load and a lone tick is not held
back.  A flush groups the batch by stream, one argument per stream, and runs the
server-side script (``append.lua``) once for all of them on a standalone Redis, or
once per hash slot on a Redis Cluster (no call spans two slots), all pipelined in
one round trip.

The script skips any tick whose ``seq`` the stream already holds, so a retried
batch, a replay or a second ingestor never stores a tick twice.  When Redis is
unreachable or refuses writes (``OOM``, ``READONLY``, ``LOADING``) the batch is kept
and retried with capped jittered backoff; ``NOSCRIPT`` reloads the script.  The
buffer is bounded: when it is full :meth:`submit` refuses and the caller waits on
:meth:`wait_room` (the ingress queue's policy then applies upstream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources import files
from itertools import chain, islice
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consumer_sdk._aio import reraise_if_cancelling
from consumer_sdk._log import Throttle, get_logger, log_event
from consumer_sdk.backoff import Backoff
from consumer_sdk.keys import DEFAULT_PREFIX
from consumer_sdk.latency import DEFAULT_SAMPLE_EVERY, LatencyHistogram, check_sample_every
from consumer_sdk.tick import Tick
from distributor.spill import RETRY_FULL_S, SpillFull, SpillLog

__all__ = ["APPEND_SCRIPT", "Retention", "StreamWriter", "WriterStats"]

APPEND_SCRIPT: Final = files("distributor").joinpath("append.lua").read_text()
#: streams per script call on a standalone Redis: bounds how long one call holds the server
MAX_KEYS_PER_CALL: Final = 256
_RETRYABLE_REPLIES: Final = ("OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")
log = get_logger("writer")


@dataclass(frozen=True, slots=True)
class Retention:
    """How much each stream keeps: ``MAXLEN ~`` entries and/or ``MINID`` age (0 disables either)."""

    maxlen: int = 100_000
    max_age_ms: int = 0
    per_channel: tuple[tuple[str, int, int], ...] = ()

    def for_channel(self, channel: str) -> tuple[int, int]:
        """An exact channel entry wins over a ``prefix*`` glob; the longest glob wins among globs."""
        best: tuple[int, int] | None = None
        best_len = -1
        for name, maxlen, age in self.per_channel:
            if name == channel:
                return maxlen, age
            if name.endswith("*") and channel.startswith(name[:-1]) and len(name) > best_len:
                best, best_len = (maxlen, age), len(name)
        return best if best is not None else (self.maxlen, self.max_age_ms)


@dataclass(frozen=True, slots=True)
class WriterStats:
    buffered: int
    capacity: int
    appended: int
    duplicates: int
    rejected: int
    batches: int
    errors: int
    retries: int
    last_flush_us: int
    connected: bool
    spilled: int
    spill_bytes: int
    spill_drained: int


class StreamWriter:
    """Owns a bounded buffer of ticks and the task that appends them to Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention: Retention | None = None,
        max_batch: int = 20000,
        capacity: int = 200_000,
        ack_latency: LatencyHistogram | None = None,
        spill: SpillLog | None = None,
        sample_every: int = DEFAULT_SAMPLE_EVERY,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._retention = retention or Retention()
        self._max_batch = max_batch
        self.capacity = capacity
        self._buf: deque[Tick] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sha: str | None = None
        self._cluster: bool | None = None
        self._inflight: list[Tick] = []
        self._caps: dict[str, tuple[int, int]] = {}
        self._throttle = Throttle(log)
        self.ack_latency = ack_latency or LatencyHistogram()
        #: acknowledgement latency is observed on one tick in this many, by position (0: not measured)
        self.sample_every = check_sample_every(sample_every)
        self._sample_at = 0  # index, in the next batch, of the next tick to observe
        self.appended_by_channel: dict[str, int] = {}
        self.appended = 0
        self.duplicates = 0
        self.rejected = 0
        self.batches = 0
        self.errors = 0
        self.retries = 0
        self.last_flush_us = 0
        self.connected = True
        self.spill = spill
        #: once a tick went to the spill log, every later one follows it there until the log is drained
        self._spilling = spill is not None and len(spill) > 0
        #: appends the spill log refused (full, or the disk failed); each took nothing
        self.spill_errors = 0
        #: the spill log refuses appends now (logged once as ``spill_full`` when it starts)
        self.spill_refusing = False
        self._retry_room: asyncio.TimerHandle | None = None
        #: the batch in flight came from the spill log (it is still there: a final flush leaves it)
        self._inflight_from_spill = False

    # -- producer side (the distributor task) ---------------------------------------------
    def submit(self, ticks: Iterable[Tick]) -> bool:
        """Take ticks for storing: into memory, or, once memory is full, into the spill log.

        False (nothing taken) when memory is full and there is no spill log, or the log is full
        or refuses writes: the caller then waits on :meth:`wait_room`.
        """
        if self._spilling or len(self._buf) >= self.capacity:
            spill = self.spill
            if spill is None:
                self._room.clear()
                return False
            try:
                if spill.full:
                    raise SpillFull(spill.full_reason or "spill log full")
                spill.append([orjson.dumps(t) for t in ticks])
            except OSError as exc:
                self._spill_refused(spill, exc)
                return False
            if self.spill_refusing:
                self.spill_refusing = False
                log_event(log, logging.INFO, "spill_accepting", records=len(spill), bytes=spill.bytes)
            if not self._spilling:
                self._spilling = True
                log_event(log, logging.WARNING, "spilling_to_disk", buffered=len(self._buf), directory=str(spill.dir))
        else:
            self._buf.extend(ticks)
        self._idle.clear()
        self._ready.set()
        return True

    def _spill_refused(self, spill: SpillLog, exc: OSError) -> None:
        """The spill log took nothing: count it, log the state once, and let the caller try again in a
        second (or as soon as the writer makes room) while the ingress policy decides upstream."""
        self.spill_errors += 1
        if isinstance(exc, SpillFull):
            if not self.spill_refusing:
                log_event(
                    log, logging.ERROR, "spill_full", reason=exc.reason, records=len(spill), bytes=spill.bytes,
                    directory=str(spill.dir),
                )
        else:
            self._throttle.log(logging.ERROR, "spill_write_failed", error=str(exc), directory=str(spill.dir))
        self.spill_refusing = True
        self._room.clear()
        loop = asyncio.get_running_loop()
        if self._retry_room is None or self._retry_room.when() <= loop.time():
            self._retry_room = loop.call_later(RETRY_FULL_S, self._room.set)

    async def wait_room(self) -> None:
        await self._room.wait()

    async def drain(self) -> None:
        """Wait until everything submitted so far is stored."""
        await self._idle.wait()

    # -- the writer task -----------------------------------------------------------------------
    async def run(self) -> None:
        """Flush forever, memory first, then the spill log, oldest first; never exits on a Redis error."""
        spill = self.spill
        while True:
            # Each round checks whether this task is being stopped: a cancellation that reached the
            # Redis client mid-reply can be absorbed there, and the loop must not outlive its owner.
            reraise_if_cancelling()
            if spill is not None:
                spill.maybe_sync()
            if not self._buf and not (spill is not None and len(spill)):
                if self._spilling:
                    self._spilling = False
                    self.spill_refusing = False  # the log is empty again: the next spill starts afresh
                    log_event(log, logging.INFO, "spill_drained", drained=spill.drained if spill is not None else 0)
                self._idle.set()
                self._ready.clear()
                self._room.set()
                await self._ready.wait()
            from_spill = 0
            if self._buf:
                batch = self._inflight = self._take()
                self._inflight_from_spill = False
            else:
                assert spill is not None
                payloads = spill.peek(self._max_batch)
                from_spill = len(payloads)
                batch = self._inflight = [orjson.loads(p) for p in payloads]
                self._inflight_from_spill = True
            attempt = 0
            backoff = Backoff(base=0.05, cap=2.0)
            while True:
                try:
                    await self.append(batch)
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    reraise_if_cancelling()
                    self._fail("redis_unreachable", exc, attempt)
                except RedisError as exc:
                    # OOM, READONLY, LOADING ... and anything unexpected: kept and retried, never fatal.
                    reraise_if_cancelling()
                    self._fail("redis_refused_write", exc, attempt)
                else:
                    if from_spill and spill is not None:
                        spill.consume(from_spill)
                    self._inflight = []
                    if not self.connected:
                        self.connected = True
                        log_event(log, logging.INFO, "redis_write_recovered", retries=attempt)
                    break
                attempt += 1
                self.retries += 1
                await asyncio.sleep(backoff.next_delay())
            if len(self._buf) < self.capacity:
                self._room.set()

    def _fail(self, event: str, exc: BaseException, attempt: int) -> None:
        self.errors += 1
        self.connected = False
        self._throttle.log(logging.WARNING, event, error=str(exc), attempt=attempt, buffered=len(self._buf))

    def take_all(self) -> list[Tick]:
        """Everything held in memory and not yet stored, oldest first (for a final flush at shutdown).

        While the spill log holds records these ticks are all older than them (the log takes every
        tick once it started). A batch in flight that came from the log is left out: it is still there.
        """
        batch = ([] if self._inflight_from_spill else self._inflight) + list(self._buf)
        self._inflight = []
        self._inflight_from_spill = False
        self._buf.clear()
        return batch

    def _take(self) -> list[Tick]:
        buf = self._buf
        n = min(len(buf), self._max_batch)
        pop = buf.popleft
        return [pop() for _ in range(n)]

    def _caps_for(self, channel: str) -> tuple[int, int]:
        caps = self._caps.get(channel)
        if caps is None:
            caps = self._caps[channel] = self._retention.for_channel(channel)
        return caps

    async def append(self, ticks: list[Tick]) -> tuple[int, int]:
        """Append ticks now (one pipelined round trip); return ``(added, duplicates)``.

        Safe to call again with the same ticks: what is stored already is skipped.
        """
        # Per stream, one section "<maxlen> <minage> <size>\n" + its records "<ms>-<seq> <payload>\n"; the
        # sections of one script call are joined into its one argument (see append.lua).
        groups: dict[str, list[bytes]] = {}
        counts: dict[str, int] = {}
        prefix = self._prefix
        dumps = orjson.dumps
        for t in ticks:
            key = f"{prefix}:{t['venue']}:{t['symbol']}:{t['channel']}"
            parts = groups.get(key)
            if parts is None:
                parts = groups[key] = []
            parts.append(b"%d-%d %b\n" % (t["ts_event"] // 1000, t["seq"], dumps(t)))
        if not groups:
            return 0, 0
        for key, parts in groups.items():
            counts[key] = len(parts)
            maxlen, age = self._caps_for(key.rpartition(":")[2])
            parts.insert(0, b"%d %d %d\n" % (maxlen, age, sum(map(len, parts))))
        if self._sha is None:
            self._sha = str(await self._redis.script_load(APPEND_SCRIPT))
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await self._run_scripts(groups)
        self.last_flush_us = int((loop.time() - started) * 1e6)
        self.batches += 1
        added = dups = 0
        by_channel = self.appended_by_channel
        for key, res in zip(groups, results, strict=True):
            if isinstance(res, Exception):
                # Not retryable for this key (e.g. WRONGTYPE): report loudly, keep the rest flowing.
                self.rejected += counts[key]
                self._throttle.log(logging.ERROR, "stream_write_rejected", stream=key, error=str(res))
                continue
            n = int(res[0])
            added += n
            channel = key.rpartition(":")[2]
            by_channel[channel] = by_channel.get(channel, 0) + n
            dups += int(res[1])
            self.rejected += int(res[2])
        self.appended += added
        self.duplicates += dups
        every = self.sample_every
        if every:
            at = self._sample_at
            if at < len(ticks):
                now_us = time.time_ns() // 1000
                observe = self.ack_latency.observe
                for t in islice(ticks, at, None, every):
                    observe(now_us - t["ts_recv"])
            self._sample_at = (at - len(ticks)) % every
        return added, dups

    async def _calls(self, keys: list[str]) -> list[list[str]]:
        """Which streams share a script call: all of them on a standalone Redis (up to
        ``MAX_KEYS_PER_CALL``), only those of one hash slot on a Redis Cluster."""
        if self._cluster is None:
            info = await self._redis.info("cluster")
            self._cluster = bool(info.get("cluster_enabled"))
        if not self._cluster:
            return [keys[i : i + MAX_KEYS_PER_CALL] for i in range(0, len(keys), MAX_KEYS_PER_CALL)]
        by_slot: dict[int, list[str]] = {}
        for key in keys:
            by_slot.setdefault(key_slot(key.encode()), []).append(key)
        return list(by_slot.values())

    async def _run_scripts(self, groups: dict[str, list[bytes]]) -> list[Any]:
        """One pipelined round trip; returns per stream ``[added, duplicates, errors]`` or the error."""
        plan = await self._calls(list(groups))
        for _ in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for keys in plan:
                blob = b"".join(chain.from_iterable(groups[k] for k in keys))
                pipe.execute_command("EVALSHA", self._sha, len(keys), *keys, blob)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, NoScriptError) for r in replies):
                results: list[Any] = []
                for keys, r in zip(plan, replies, strict=True):
                    if isinstance(r, ResponseError) and str(r).startswith(_RETRYABLE_REPLIES):
                        raise r
                    if isinstance(r, (RedisConnectionError, RedisTimeoutError)):
                        raise r
                    if isinstance(r, Exception):
                        results += [r] * len(keys)
                    else:
                        results += [r[3 * i : 3 * i + 3] for i in range(len(keys))]
                return [results[i] for i in self._order(plan, groups)]
            log_event(log, logging.INFO, "script_reloaded")
            self._sha = str(await self._redis.script_load(APPEND_SCRIPT))
        raise ResponseError("NOSCRIPT persisted after reloading the append script")

    @staticmethod
    def _order(plan: list[list[str]], groups: dict[str, list[bytes]]) -> list[int]:
        """Positions, in the plan's flattened order, of the streams in ``groups`` order."""
        position = {key: i for i, key in enumerate(k for keys in plan for k in keys)}
        return [position[key] for key in groups]

    def stats(self) -> WriterStats:
        spill = self.spill
        return WriterStats(
            buffered=len(self._buf), capacity=self.capacity, appended=self.appended,
            duplicates=self.duplicates, rejected=self.rejected, batches=self.batches, errors=self.errors,
            retries=self.retries, last_flush_us=self.last_flush_us, connected=self.connected,
            spilled=len(spill) if spill is not None else 0, spill_bytes=spill.bytes if spill is not None else 0,
            spill_drained=spill.drained if spill is not None else 0,
        )
