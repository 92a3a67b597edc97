# size: one task's state machine (submit, batch, append script, settle an error, spill, drain); its parts share that
#   task's buffers and would only pass them around if split.
"""The Redis Streams writer: batched, idempotent, capped appends.

One task owns the writer.  Ticks are handed over with :meth:`StreamWriter.submit`
(synchronous, no await).  A flush groups what is buffered by stream (only the streams
that have ticks), one section per stream, and runs the server-side script (``append.lua``)
once for all of them on a standalone Redis, or once per hash slot on a Redis Cluster (no
call spans two slots), all pipelined in one round trip.

On a standalone Redis up to ``window`` flushes (4 by default) are in flight at once on the
writer's own connection: a flush is sent as soon as there are ticks and room in the window,
without waiting for the reply of the one before, and a second task reads the replies in order
(Redis runs a connection's commands in the order sent).  A tick so waits for its own round
trip, not for the one in progress too; under load the window fills and batches grow.  Each
stream's section names the seq of that stream's last tick in a flush still in flight, and the
script refuses the section whole (``ORDER``) unless the stream holds it: when a flush is
refused (``OOM``, ``NOSCRIPT``, ``READONLY`` ...) the flushes behind it store nothing of the
streams it held, so the duplicate rule can never skip its ticks for good.  After a refusal or a
lost connection nothing more is sent; every flush in flight is settled in order, what is left
goes back to the front of the buffer, in order, and is written one flush at a time (with
backoff) until one goes through.  On a Redis Cluster, or with ``window=1``, one flush is in
flight at a time, the next taking whatever was buffered meanwhile.

With ``replica_acks`` (0 by default: off), a ``WAIT replica_acks replica_wait_ms``
follows each node's calls in the same round trip (in the window: each flush's calls), and a
batch a node could not replicate in time is held and written again (what the master took
comes back as duplicates) until it has: what a failover can lose is then only what was never
acknowledged.

The script skips any tick whose ``seq`` the stream already holds, so a retried
batch, a replay or a second ingestor never stores a tick twice.  An error reply
stops a stream's part of the call at the failing tick and the script says how far
it got, so the writer drops exactly what is settled and keeps the rest, in order.
What it does next depends on the error's class (:func:`classify_error`): Redis
unreachable or refusing for now (``OOM``, ``READONLY``, ``LOADING``, ``BUSY`` ...):
the rest is retried with capped jittered backoff before anything newer is taken;
a tick Redis can never accept (``WRONGTYPE`` on the key, an ID it refuses) goes to
the dead-letter stream ``<prefix>:deadletter`` with its stream, seq and the error,
counted and logged, and the stream's later ticks go on.  ``NOSCRIPT`` reloads the
script.  The buffer is bounded: when it is full :meth:`submit` refuses and the
caller waits on :meth:`wait_room` (the ingress queue's policy then applies upstream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib.resources import files
from itertools import chain, islice
from typing import Any, Final

import orjson
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.backoff import Backoff
from consumer_sdk.core.keys import DEFAULT_PREFIX
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY, LatencyHistogram, check_sample_every
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.redis import classify_redis, hiredis_pack, is_cluster
from consumer_sdk.core.tick import Tick
from distributor.sink import StreamSink
from distributor.spill import RETRY_FULL_S, SpillFull, SpillLog

__all__ = [
    "APPEND_SCRIPT",
    "DEAD_LETTER_MAXLEN",
    "DEAD_LETTER_REASONS",
    "REASONS",
    "REJECTION_REASONS",
    "Action",
    "ErrorClass",
    "Retention",
    "Settlement",
    "Stop",
    "StreamWriter",
    "WriteRefused",
    "WriterSnapshot",
    "WriterStats",
    "classify_error",
    "dead_letter_key",
    "error_text",
    "settle",
]

APPEND_SCRIPT: Final = files("distributor").joinpath("append.lua").read_text()
#: streams per script call on a standalone Redis: bounds how long one call holds the server
MAX_KEYS_PER_CALL: Final = 256
#: flushes in flight at once on one connection, by default (see :class:`StreamWriter`)
DEFAULT_WINDOW: Final = 4
#: stream keys whose section header is cached (:meth:`StreamWriter._encode`); cleared whole when reached
MAX_CACHED_HEADS: Final = 65_536
#: the dead-letter stream keeps about this many entries (``MAXLEN ~``)
DEAD_LETTER_MAXLEN: Final = 100_000
log = get_logger("writer")


# -- what an error means for the ticks it stopped (pure) ------------------------------------------------------
class Action(StrEnum):
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class ErrorClass:
    """What the writer does about one error; ``reason`` is the ``reason`` label of the metrics."""

    reason: str
    action: Action = Action.RETRY
    #: dead-letter the rest of the stream's batch with the failing tick (the key refuses, not the tick)
    whole_stream: bool = False


_OTHER: Final = ErrorClass("other")
_UNREACHABLE: Final = ErrorClass("unreachable")
_WRONGTYPE: Final = ErrorClass("wrongtype", Action.DEAD_LETTER, whole_stream=True)
_BAD_ID: Final = ErrorClass("bad_id", Action.DEAD_LETTER)
_NOREPLICAS: Final = ErrorClass("noreplicas")
#: a stream's part of a call refused whole because an earlier call in flight did not store that stream's ticks
#: (``ORDER`` from append.lua): not a refusal of Redis, not counted; written again after them, at once
_HELD: Final = ErrorClass("held")
#: what the writer does for each reason of the one classifier (:func:`consumer_sdk.core.redis.classify_redis`);
#: a reason not here (``nogroup``, ``transient``: never met on a write) is ``other``
_BY_REASON: Final[Mapping[str, ErrorClass]] = {
    **{
        reason: ErrorClass(reason)
        for reason in (
            "oom", "readonly", "loading", "busy", "noscript", "masterdown", "clusterdown", "tryagain", "moved",
            "misconf", "noreplicas", "noperm", "auth",
        )
    },
    _UNREACHABLE.reason: _UNREACHABLE,
    _WRONGTYPE.reason: _WRONGTYPE,
    _BAD_ID.reason: _BAD_ID,
    _OTHER.reason: _OTHER,
}
#: every ``reason`` :func:`classify_error` can give (bounded: a metric label)
REASONS: Final = tuple(sorted(_BY_REASON))
#: the reasons Redis refuses a write for (all but ``unreachable``: no answer is no refusal)
REJECTION_REASONS: Final = tuple(r for r in REASONS if r != _UNREACHABLE.reason)
#: the reasons whose ticks go to the dead-letter stream
DEAD_LETTER_REASONS: Final = frozenset(c.reason for c in _BY_REASON.values() if c.action is Action.DEAD_LETTER)


def classify_error(error: BaseException | str) -> ErrorClass:
    """The class of an error the writer met: an exception, or the text of an error reply.

    Pure; the reason is the one classifier's (:func:`consumer_sdk.core.redis.classify_redis`), what the
    writer does about it is its own, whatever the classifier's kind:

    ============================================  =============  ================================
    error (exception class / reply prefix)        reason         what the writer does
    ============================================  =============  ================================
    ConnectionError, TimeoutError, OSError        unreachable    retry with backoff
    OutOfMemoryError / ``OOM``                    oom            retry with backoff
    ReadOnlyError / ``READONLY``                  readonly       retry with backoff
    BusyLoadingError / ``LOADING``                loading        retry with backoff
    ``BUSY`` (a script or function running)       busy           retry with backoff
    NoScriptError / ``NOSCRIPT``                  noscript       reload the script, retry
    MasterDownError / ``MASTERDOWN``              masterdown     retry with backoff
    ClusterDownError / ``CLUSTERDOWN``            clusterdown    retry with backoff
    TryAgainError / ``TRYAGAIN``                  tryagain       retry with backoff
    MovedError, AskError / ``MOVED``, ``ASK``     moved          retry with backoff
    ``MISCONF`` (snapshots failing)               misconf        retry with backoff
    ``NOREPLICAS`` (min-replicas-to-write)        noreplicas     retry with backoff
    NoPermissionError / ``NOPERM``                noperm         retry with backoff (ACL to fix)
    AuthenticationError / ``NOAUTH``, ...         auth           retry with backoff
    ``WRONGTYPE`` (the key is not a stream)       wrongtype      dead-letter the stream's batch
    ``ERR The ID specified in XADD ...``,         bad_id         dead-letter the tick, go on
    ``ERR Invalid stream ID ...``
    anything else                                 other          retry with backoff
    ============================================  =============  ================================

    Retrying is always safe, since the script skips what a stream already holds; only an error
    that names a key or a tick Redis can never accept diverts ticks from their stream.  So the
    classifier's FATAL errors (OOM, ACLs, ...) are held and retried too, not given up on: a reader
    loses nothing by stopping, the writer would lose ticks.  An error this table does not know is
    retried (and logged, counted and alerted on as ``other``): a defect that cannot heal then holds
    the writer back, visibly, rather than losing ticks.
    """
    return _BY_REASON.get(classify_redis(error).reason, _OTHER)


def error_text(exc: BaseException) -> str:
    """An exception as Redis said it (redis-py strips the reply's prefix from known classes)."""
    text = str(exc)
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code and not text.startswith(code):
        return f"{code} {text}"
    return text or type(exc).__name__


def dead_letter_key(prefix: str) -> str:
    """``<prefix>:deadletter``: ticks Redis can never store in their stream, with why."""
    return f"{prefix}:deadletter"


@dataclass(frozen=True, slots=True)
class Stop:
    """Where Redis stopped one stream's part of a call: its first ``at`` ticks were settled (stored,
    or skipped as already stored), the next one failed with ``text``, of class ``error``."""

    at: int
    error: ErrorClass
    text: str


@dataclass(frozen=True, slots=True)
class Settlement:
    """What becomes of a batch's ticks after the streams in ``stops`` stopped (positions in the batch)."""

    #: ticks to write again, in batch order (so each stream keeps its order)
    retry: list[int]
    #: ticks for the dead-letter stream: (position, stream, why)
    dead: list[tuple[int, str, Stop]]
    #: ticks Redis refused in this attempt, by reason (the failing tick and, but after a tick-only
    #: dead-letter, what the stream had after it); a Redis that did not answer refused nothing
    refused: dict[str, int]


def settle(keys: Sequence[str], stops: Mapping[str, Stop]) -> Settlement:
    """Sort a batch whose i-th tick belongs to stream ``keys[i]``, given where streams stopped.

    Pure; O(len(keys)), run only after an error.  A stream not in ``stops`` was settled whole.  In
    a stopped stream, the ticks before ``at`` are settled and dropped; the failing one and those
    after it are kept for a retry, except for a dead-letter class: its failing tick (and, for a key
    that refuses every tick, the rest of the stream) goes to the dead-letter stream, and the ticks
    after a lone dead-lettered tick are kept, not counted as refused.
    """
    retry: list[int] = []
    dead: list[tuple[int, str, Stop]] = []
    refused: dict[str, int] = {}
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        stop = stops.get(key)
        if stop is None:
            continue
        j = seen.get(key, 0)
        seen[key] = j + 1
        if j < stop.at:
            continue
        err = stop.error
        if err.action is Action.RETRY:
            retry.append(i)
        elif j == stop.at or err.whole_stream:
            dead.append((i, key, stop))
        else:
            retry.append(i)
            continue
        if err.reason != _UNREACHABLE.reason and err is not _HELD:
            refused[err.reason] = refused.get(err.reason, 0) + 1
    return Settlement(retry, dead, refused)


class WriteRefused(ResponseError):
    """Redis refused part of a batch for now: what it took is settled, ``remaining`` (in order) is not.

    ``error`` is the class of the refusal that stopped it; ``added`` and ``duplicates`` count what
    this call settled before it stopped.
    """

    def __init__(self, error: ErrorClass, text: str, remaining: list[Tick], added: int, duplicates: int) -> None:
        super().__init__(text)
        self.error = error
        self.remaining = remaining
        self.added = added
        self.duplicates = duplicates


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
    #: Redis answered the last write attempt (a refusal such as OOM is an answer: see ``failing``)
    connected: bool
    #: the class (:func:`classify_error` reason) of the error that holds a batch back now; "" when none
    failing: str
    #: seconds since the first failed attempt of the current episode, while ``failing``; else 0
    failing_for_s: float
    #: tick writes Redis refused, by reason (``rejected`` is their sum): each refused attempt counts
    #: the ticks it could not store, so a tick retried three times counts three times
    rejected_by_reason: dict[str, int]
    #: ticks Redis can never store in their stream, written to the dead-letter stream instead
    dead_lettered: int
    spilled: int
    spill_bytes: int
    spill_drained: int
    #: the spill log refuses appends for lack of room (its cap reached, or the disk said ENOSPC) and
    #: nothing has freed room since: new ticks wait in the ingress, whose policy decides
    spill_full: bool = False
    #: why it is full ("" when it is not)
    spill_full_reason: str = ""
    #: times the spill log turned full
    spill_full_events: int = 0
    #: submits the spill log refused (full, or the disk failed); each took nothing
    spill_refused: int = 0
    #: writes and syncs the spill disk refused (ENOSPC, EIO, ...); each left the log as it was
    spill_write_failures: int = 0
    #: records dropped while draining because they were not whole (corruption after the log was opened)
    spill_corrupt: int = 0
    #: segments cut at open after their last whole record (a crash or a failed write mid-record)
    spill_torn: int = 0


@dataclass(frozen=True, slots=True)
class WriterSnapshot:
    """What observers (heartbeat, metrics) read of a writer at one instant: :meth:`StreamWriter.snapshot`."""

    stats: WriterStats
    #: ticks stored per channel since start
    appended_by_channel: Mapping[str, int]
    #: where ticks Redis can never store go
    dead_letter_key: str
    #: frame received to Redis acknowledgement (µs), a copy
    ack_latency: LatencyHistogram
    #: frame received to the writer sending the tick's flush to Redis (µs), a copy: what of ``ack_latency``
    #: is spent in this process before Redis is asked
    sent_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(slots=True, eq=False)
class _Flush:
    """One flush of the window: its ticks, their sections by stream, the streams of each script call, the
    streams each ``WAIT`` answers for, the packed commands and how many replies they get."""

    ticks: list[Tick]
    groups: dict[str, list[bytes]]
    calls: list[list[str]]
    waits: list[list[str]]
    packed: Any
    expect: int
    sent: float = 0.0
    answered: float = 0.0
    #: the replies, in order (an error reply as its exception), or the exception that left none; None: not yet
    replies: list[Any] | BaseException | None = None


def _observe_sampled(hist: LatencyHistogram, ticks: list[Tick], at: int, every: int) -> int:
    """Observe, in ``hist``, the time since each of ``ticks[at::every]`` was received (µs); returns the index,
    in the next batch, of the next tick to observe (one tick in ``every`` by position, across batches)."""
    if at < len(ticks):
        now_us = time.time_ns() // 1000
        observe = hist.observe
        for t in islice(ticks, at, None, every):
            observe(now_us - t["ts_recv"])
    return (at - len(ticks)) % every


class StreamWriter(StreamSink):
    """Owns a bounded buffer of ticks and the task that appends them to Redis (a :class:`StreamSink`).

    ``window``: flushes in flight at once on the writer's own connection to a standalone Redis (1: one at a
    time, as on a Redis Cluster).  :meth:`append` is one flush, awaited; :meth:`run` is the task."""

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
        replica_acks: int = 0,
        replica_wait_ms: int = 1000,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if replica_acks < 0 or replica_wait_ms < 1:
            raise ValueError(f"replica_acks must be >= 0 and replica_wait_ms >= 1: {replica_acks}, {replica_wait_ms}")
        if window < 1:
            raise ValueError(f"window must be >= 1: {window}")
        self._redis = redis
        #: flushes in flight at once on the writer's own connection (standalone Redis; 1 on a cluster)
        self.window = window
        self._conn: Any = None  # that connection, made on first use
        self._window: deque[_Flush] = deque()  # the flushes in flight, oldest first
        self._held: list[Tick] = []  # after a failure in the window: what the flushes settled so far left
        self._lost = False  # the window's connection failed: nothing more is sent on it until it is made again
        self._sent = asyncio.Event()
        self._one_at_a_time = False  # after a failure in the window, until a flush goes through
        #: ``WAIT replica_acks replica_wait_ms`` after each node's script calls, in the same round trip (0: none)
        self.replica_acks = replica_acks
        self.replica_wait_ms = replica_wait_ms
        #: batches (per node) whose ``WAIT`` came back with fewer replicas than asked: held and written again
        self.replica_shortfalls = 0
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
        self._heads: dict[str, bytes] = {}  # stream key -> its sections' "<maxlen> <minage> " (see _encode)
        #: stream key -> its newest ID as this writer's last settled call of it left it (append.lua's <top>):
        #: the script then need not read it; forgotten on any error or unknown outcome of that stream
        self._tops: dict[str, bytes] = {}
        self._throttle = Throttle(log)
        self.ack_latency = ack_latency or LatencyHistogram()
        #: acknowledgement latency is observed on one tick in this many, by position (0: not measured)
        self.sample_every = check_sample_every(sample_every)
        self._sample_at = 0  # index, in the next batch, of the next tick to observe
        #: frame received to its flush sent to Redis (µs), one tick in ``sample_every`` by position, as
        #: ``ack_latency``: the difference of the two is the Redis round trip and the settling of the reply.
        #: Every send is timed, a flush sent again after an error too, while ``ack_latency`` times a tick once,
        #: when it is stored: after errors the two sample different ticks
        self.sent_latency = LatencyHistogram()
        self._sent_sample_at = 0  # as ``_sample_at``, for ``sent_latency``
        self.appended_by_channel: dict[str, int] = {}
        self.appended = 0
        self.duplicates = 0
        #: tick writes Redis refused (all reasons); by reason in ``rejected_by_reason``
        self.rejected = 0
        self.rejected_by_reason: dict[str, int] = {}
        self.dead_lettered = 0
        self.dead_letter_key = dead_letter_key(prefix)
        self._dead_logged: set[str] = set()  # streams whose first dead-lettered ticks were logged
        self.batches = 0
        self.errors = 0
        self.retries = 0
        self.last_flush_us = 0
        self.connected = True
        self.failing = ""  # the class of the error holding a batch back ("" when writes go through)
        self._failing_since = 0.0  # time.monotonic() of the first failed attempt of the current episode
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
        try:
            await self._run()
        finally:
            conn, self._conn = self._conn, None
            if conn is not None:
                await self._redis.connection_pool.release(conn)

    async def _run(self) -> None:
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
            if self._buf and not self._one_at_a_time and await self._windowed():
                rest, refusal = await self._pump()
                self._held = []  # now in ``rest``
                if rest or refusal is not None:
                    # A flush was refused or the connection lost: what is not settled goes back to the
                    # front of the buffer (it is older than all there) and is written again one flush at a
                    # time, with backoff, until one goes through.
                    self._buf.extendleft(reversed(rest))
                    self._one_at_a_time = True
                    if refusal is not None and refusal[0].reason != "noscript":
                        self._fail(refusal[0], refusal[1], 0)
                if len(self._buf) < self.capacity:
                    self._room.set()
                continue
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
                except WriteRefused as exc:
                    # Redis took part of it (or none): the rest waits, in order, and nothing newer
                    # of these streams goes before it.
                    reraise_if_cancelling()
                    batch = self._inflight = exc.remaining
                    self._fail(exc.error, str(exc), attempt)
                except (RedisError, OSError) as exc:
                    # Unreachable, or anything unexpected: the whole batch is kept and retried, never fatal.
                    reraise_if_cancelling()
                    self._tops.clear()  # the call may or may not have run
                    self._fail(classify_error(exc), error_text(exc), attempt)
                else:
                    if from_spill and spill is not None:
                        spill.consume(from_spill)
                    self._inflight = []
                    self._one_at_a_time = False
                    if self.failing:
                        self._recovered(attempt)
                    break
                attempt += 1
                self.retries += 1
                await asyncio.sleep(backoff.next_delay())
            if len(self._buf) < self.capacity:
                self._room.set()

    def _fail(self, error: ErrorClass, text: str, attempt: int) -> None:
        """One failed attempt: counted; logged when an episode starts or changes class, then throttled."""
        self.errors += 1
        unreachable = error.reason == _UNREACHABLE.reason
        self.connected = not unreachable
        event = "redis_unreachable" if unreachable else "redis_write_refused"
        fields: dict[str, Any] = {
            "reason": error.reason, "error": text[:300], "attempt": attempt, "held": len(self._inflight),
            "buffered": len(self._buf), "spilled": len(self.spill) if self.spill is not None else 0,
        }
        if error.reason == "oom":
            fields["action"] = "raise maxmemory or lower retention"
        if self.failing != error.reason:
            if not self.failing:
                self._failing_since = time.monotonic()
            self.failing = error.reason
            log_event(log, logging.ERROR, event, **fields)
        else:
            self._throttle.log(logging.WARNING, event, **fields)

    def _recovered(self, attempt: int) -> None:
        log_event(
            log, logging.INFO, "redis_write_recovered", reason=self.failing, retries=attempt,
            failed_for_s=round(time.monotonic() - self._failing_since, 3),
        )
        self.failing = ""
        self.connected = True

    def take_all(self) -> list[Tick]:
        """Everything held in memory and not yet stored, oldest first (for a final flush at shutdown).

        While the spill log holds records these ticks are all older than them (the log takes every
        tick once it started). A batch in flight that came from the log is left out: it is still there.
        """
        batch = self._held + [t for f in self._window for t in f.ticks]
        batch += ([] if self._inflight_from_spill else self._inflight) + list(self._buf)
        self._window.clear()
        self._held = []
        self._inflight = []
        self._inflight_from_spill = False
        self._buf.clear()
        return batch

    async def _windowed(self) -> bool:
        """Whether flushes go through the window: more than one allowed, on a standalone Redis."""
        if self.window < 2:
            return False
        if self._cluster is None:
            try:
                await self._calls([])
            except (RedisError, OSError):
                return False  # the one-flush path meets the error and retries
        return not self._cluster

    async def _pump(self) -> tuple[list[Tick], tuple[ErrorClass, str] | None]:
        """Write what memory holds with up to ``window`` flushes in flight on the writer's own connection.

        Each flush is sent as soon as there are ticks and room in the window, its replies read in order by
        a second task (Redis answers a connection's commands in the order sent).  A stream's section names
        the seq of its last tick in a flush still in flight, and append.lua refuses it (``ORDER``) unless the
        stream holds that seq: a later flush never stores a stream's ticks past earlier ones that were refused.
        Returns ``([], None)`` once memory is empty and every flush acknowledged.  After a refusal or a lost
        connection it sends nothing more, settles every flush in flight (in order), and returns what is left
        of them, in order, with the first refusal (None when only dead-lettered ticks stopped a stream)."""
        try:
            if self._sha is None:
                self._sha = str(await self._redis.script_load(APPEND_SCRIPT))
            conn = self._conn
            if conn is None:
                # the pool's (closing the client closes it); held by this writer until its task stops
                conn = self._conn = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
            if not conn.is_connected:
                await conn.connect()
        except (RedisError, OSError) as exc:
            reraise_if_cancelling()
            return [], (classify_error(exc), error_text(exc))
        window = self._window
        to_read: deque[_Flush] = deque()
        after: dict[str, int] = {}
        owner: dict[str, _Flush] = {}
        rest = self._held = []  # what settled flushes left, in order (take_all sees it if the task stops)
        refusal: tuple[ErrorClass, str] | None = None
        failed = False
        self._lost = False
        loop = asyncio.get_running_loop()
        reader = asyncio.create_task(self._receive(conn, to_read))
        try:
            while True:
                self._ready.clear()
                progressed = False
                while window and window[0].replies is not None:
                    f = window[0]
                    progressed = True
                    for key in f.groups:
                        if owner.get(key) is f:
                            del owner[key], after[key]
                    replies = f.replies
                    if isinstance(replies, BaseException):  # no answer: the outcome is unknown, all of it again
                        for key in f.groups:
                            self._tops.pop(key, None)
                        window.popleft()
                        rest += f.ticks
                        failed = True
                        if refusal is None:
                            refusal = (classify_error(replies), error_text(replies))
                        continue
                    assert replies is not None
                    self.last_flush_us = int((f.answered - f.sent) * 1e6)
                    results: list[Any] = []
                    for keys, r in zip(f.calls, replies, strict=False):
                        if isinstance(r, BaseException):
                            results += [r] * len(keys)
                        else:
                            results += [r[4 * i : 4 * i + 4] for i in range(len(keys))]
                    short = self._shortfalls(f.waits, replies[len(f.calls) :])
                    _, _, left, why = await self._account(f.ticks, f.groups, results, short)
                    window.popleft()
                    if left:
                        rest += left
                        failed = True
                        refusal = refusal or why
                if failed:
                    if not window:
                        return rest, refusal
                elif self._buf and len(window) < self.window:
                    f = self._encode_flush(self._take(), after)
                    if len(self._buf) < self.capacity:
                        self._room.set()
                    if self.spill is not None:
                        self.spill.maybe_sync()
                    for key in f.groups:
                        owner[key] = f
                    window.append(f)
                    f.sent = loop.time()
                    try:
                        if self._lost or not conn.is_connected:
                            # never on a new connection: the replies of the flushes before would be read there
                            raise ConnectionError("the writer's connection was lost")
                        await conn.send_packed_command(f.packed, check_health=False)
                    except (RedisError, OSError) as exc:
                        reraise_if_cancelling()
                        f.packed = b""
                        f.replies = exc  # perhaps partly sent: its outcome is unknown too
                        failed = True
                        continue
                    f.packed = b""
                    self._observe_sent(f.ticks)
                    to_read.append(f)
                    self._sent.set()
                    continue
                elif not window:
                    return [], None
                if not progressed:
                    await self._ready.wait()
        except (RedisError, OSError) as exc:
            # Settling a refusal met an error of its own (writing the dead-letter stream): the flush being
            # settled and all after it are written again (what Redis took of them is skipped then).
            reraise_if_cancelling()
            rest += [t for f in window for t in f.ticks]
            window.clear()
            return rest, (classify_error(exc), error_text(exc))
        finally:
            reader.cancel()
            if to_read or self._lost:  # replies unread, or perhaps on their way: out of step, drop it
                await conn.disconnect(nowait=True)

    def _encode_flush(self, ticks: list[Tick], after: dict[str, int]) -> _Flush:
        """One flush of the window: the script calls (one per ``MAX_KEYS_PER_CALL`` streams) and, with
        ``replica_acks``, a ``WAIT``, packed as one write."""
        groups = self._encode(ticks, after)
        keys = list(groups)
        calls = [keys[i : i + MAX_KEYS_PER_CALL] for i in range(0, len(keys), MAX_KEYS_PER_CALL)]
        commands: list[tuple[Any, ...]] = [
            ("EVALSHA", self._sha, len(c), *c, b"".join(chain.from_iterable(groups[k] for k in c))) for c in calls
        ]
        waits: list[list[str]] = []
        if self.replica_acks:
            commands.append(("WAIT", self.replica_acks, self.replica_wait_ms))
            waits.append(keys)
        # hiredis packs in C: a tenth of the time redis-py's own packing takes for a call of 40 streams
        packed = [hiredis_pack(c) for c in commands] if hiredis_pack is not None else self._conn.pack_commands(commands)
        return _Flush(ticks, groups, calls, waits, packed, len(commands))

    async def _receive(self, conn: Any, to_read: deque[_Flush]) -> None:
        """Read the replies of the flushes in ``to_read``, in order, onto each; a lost connection (or a
        read timeout) answers every flush in flight with its exception."""
        loop = asyncio.get_running_loop()
        while True:
            if not to_read:
                self._sent.clear()
                await self._sent.wait()
                continue
            f = to_read[0]
            replies: list[Any] = []
            try:
                for _ in range(f.expect):
                    try:
                        r = await conn.read_response()
                    except ResponseError as exc:
                        r = exc
                    replies.append(r)
            except Exception as exc:  # lost, timed out, or a reply it cannot parse: all in flight are unanswered
                reraise_if_cancelling()
                self._lost = True
                await conn.disconnect(nowait=True)
                for g in to_read:
                    g.replies = exc
                to_read.clear()
            else:
                to_read.popleft()
                f.answered = loop.time()
                f.replies = replies
            self._ready.set()

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
        """Store ticks now; return ``(added, duplicates)`` (one pipelined round trip, and one more per
        tick Redis can never accept that stopped its stream with ticks after it).

        Safe to call again with the same ticks: what is stored already is skipped.  A tick Redis can
        never accept goes to the dead-letter stream and is not retried.  When Redis refuses for now
        (unreachable: the client's exception; OOM, READONLY ...: :class:`WriteRefused`), what it took
        stays taken and the exception carries the rest, in order, for the caller to retry.
        """
        added = dups = 0
        while ticks:
            n, d, rest, refusal = await self._append_once(ticks)
            added += n
            dups += d
            if refusal is not None:
                raise WriteRefused(refusal[0], refusal[1], rest, added, dups)
            ticks = rest  # only ticks after a dead-lettered one: at once, each round settles one more
        return added, dups

    async def _append_once(
        self, ticks: list[Tick]
    ) -> tuple[int, int, list[Tick], tuple[ErrorClass, str] | None]:
        """One round trip: ``(added, duplicates, what is left, the refusal that left it or None)``."""
        groups = self._encode(ticks, None)
        if not groups:
            return 0, 0, [], None
        if self._sha is None:
            self._sha = str(await self._redis.script_load(APPEND_SCRIPT))
        loop = asyncio.get_running_loop()
        started = loop.time()
        results, short = await self._run_scripts(groups, ticks)
        self.last_flush_us = int((loop.time() - started) * 1e6)
        return await self._account(ticks, groups, results, short)

    def _encode(self, ticks: list[Tick], after: dict[str, int] | None) -> dict[str, list[bytes]]:
        """The ticks as script sections, by stream in order of first appearance: a header
        ``"<maxlen> <minage> <after> <top> <size>\\n"`` then the records ``"<ms>-<seq> <payload>\\n"`` (see append.lua).
        ``after`` maps a stream to the seq of its last tick sent in a call that may not have run yet (the
        windowed writer); it is updated to this batch's last seq of each stream.

        This runs on the event loop between a burst's arrival and its write, so the per-stream part is
        kept to a few operations: the header's retention part is cached per stream key, and the last seq
        is taken from the tick, not parsed back from its record."""
        groups: dict[str, list[bytes]] = {}
        last: dict[str, int] = {}
        prefix = self._prefix
        dumps = orjson.dumps
        for t in ticks:
            key = f"{prefix}:{t['venue']}:{t['symbol']}:{t['channel']}"
            seq = t["seq"]
            record = b"%d-%d %b\n" % (t["ts_event"] // 1000, seq, dumps(t))
            parts = groups.get(key)
            if parts is None:
                groups[key] = [b"", record]  # [0]: the header, once the section's size is known
            else:
                parts.append(record)
            last[key] = seq
        heads, tops = self._heads, self._tops
        for key, parts in groups.items():
            head = heads.get(key)
            if head is None:
                if len(heads) >= MAX_CACHED_HEADS:
                    heads.clear()  # streams come and go (shards moving): the cache stays bounded
                head = heads[key] = b"%d %d " % self._caps_for(key.rpartition(":")[2])
            size = sum(map(len, parts))
            prev = None
            if after is not None:
                prev = after.get(key)
                after[key] = last[key]
            if prev is None:
                # nothing of this stream in flight: its newest ID is what its last settled call left
                parts[0] = head + b"- %b %d\n" % (tops.get(key, b"-"), size)
            else:
                parts[0] = head + b"%d - %d\n" % (prev, size)
        return groups

    def _observe_sent(self, ticks: list[Tick]) -> None:
        """Observe, in ``sent_latency``, the sampled ticks of a flush being sent now (see ``ack_latency``)."""
        every = self.sample_every
        if every:
            self._sent_sample_at = _observe_sampled(self.sent_latency, ticks, self._sent_sample_at, every)

    async def _account(
        self, ticks: list[Tick], groups: dict[str, list[bytes]], results: list[Any], short: Mapping[str, str]
    ) -> tuple[int, int, list[Tick], tuple[ErrorClass, str] | None]:
        """Count one call's replies (per stream ``[added, duplicates, error or None]``, or the exception that
        refused its whole call); after an error, settle it (:meth:`_settle`).  Returns ``(added, duplicates,
        what is left, the refusal that left it or None)``."""
        added = dups = 0
        stops: dict[str, Stop] | None = None
        by_channel = self.appended_by_channel
        tops = self._tops
        if len(tops) >= MAX_CACHED_HEADS:
            tops.clear()  # bounded as the header cache is
        for key, res in zip(groups, results, strict=True):
            if isinstance(res, BaseException) or res[3] is None:
                tops.pop(key, None)
            else:
                top = res[3]
                tops[key] = top if isinstance(top, bytes) else str(top).encode()
            if isinstance(res, BaseException):
                # The whole call was refused before it ran (OOM, BUSY, ...): nothing of it was tried,
                # and a call names no one tick, so it is retried whatever the class.
                error = classify_error(res)
                if error.action is not Action.RETRY:
                    error = ErrorClass(error.reason)
                stop = Stop(0, error, error_text(res))
            else:
                n = int(res[0])
                d = int(res[1])
                if n:
                    added += n
                    channel = key.rpartition(":")[2]
                    by_channel[channel] = by_channel.get(channel, 0) + n
                dups += d
                if res[2] is None:
                    if key not in short:
                        continue
                    # stored on the master, not yet on enough replicas: held, and written again (as duplicates)
                    stop = Stop(0, _NOREPLICAS, short[key])
                else:
                    text = res[2].decode(errors="replace") if isinstance(res[2], bytes) else str(res[2])
                    # ORDER: an earlier call of the stream did not store its ticks; none of these was tried
                    held = text.startswith("ORDER ")
                    stop = Stop(0, _HELD, text) if held else Stop(n + d, classify_error(text), text)
            if stops is None:
                stops = {}
            stops[key] = stop
        self.appended += added
        self.duplicates += dups
        if added or dups or stops is None:
            self.batches += 1
        if stops is not None:
            rest, refusal = await self._settle(ticks, stops)
            return added, dups, rest, refusal
        every = self.sample_every
        if every:
            self._sample_at = _observe_sampled(self.ack_latency, ticks, self._sample_at, every)
        return added, dups, [], None

    async def _settle(
        self, ticks: list[Tick], stops: dict[str, Stop]
    ) -> tuple[list[Tick], tuple[ErrorClass, str] | None]:
        """After an error: count the refusals, dead-letter what Redis can never accept, and return what
        is left to write (in order) with the refusal that holds it back (None: retry at once)."""
        prefix = self._prefix
        keys = [f"{prefix}:{t['venue']}:{t['symbol']}:{t['channel']}" for t in ticks]
        plan = settle(keys, stops)
        by_reason = self.rejected_by_reason
        for reason, n in plan.refused.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
            self.rejected += n
        refusal = next(
            ((s.error, s.text) for s in stops.values() if s.error.action is Action.RETRY and s.error is not _HELD), None
        )
        retry = plan.retry
        if plan.dead:
            failed, failure = await self._dead_letter(ticks, plan.dead)
            if failed:
                # Not dead-lettered: kept, in order, for the next attempt (nothing is dropped unwritten).
                retry = sorted(retry + failed)
                refusal = refusal or failure
        return [ticks[i] for i in retry], refusal

    async def _dead_letter(
        self, ticks: list[Tick], dead: list[tuple[int, str, Stop]]
    ) -> tuple[list[int], tuple[ErrorClass, str] | None]:
        """Write ticks Redis can never store to ``<prefix>:deadletter`` (one pipelined round trip), each
        with its stream, seq, the error's class and text; logged.  Returns the positions it could not
        write, with the error that refused them: they are retried from their stream (a connection lost
        after Redis wrote an entry can so repeat it in the dead-letter stream, never in a tick stream)."""
        pipe = self._redis.pipeline(transaction=False)
        for i, key, stop in dead:
            t = ticks[i]
            pipe.xadd(
                self.dead_letter_key,
                {"stream": key, "seq": t["seq"], "reason": stop.error.reason, "error": stop.text, "d": orjson.dumps(t)},
                maxlen=DEAD_LETTER_MAXLEN, approximate=True,
            )
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        failed: list[int] = []
        failure: tuple[ErrorClass, str] | None = None
        written: dict[str, tuple[Stop, list[int]]] = {}
        for (i, key, stop), reply in zip(dead, replies, strict=True):
            if isinstance(reply, Exception):
                failed.append(i)
                if failure is None:
                    error = classify_error(reply)
                    failure = (ErrorClass(error.reason), f"dead-letter stream {self.dead_letter_key}: "
                                                         f"{error_text(reply)}")
                continue
            written.setdefault(key, (stop, []))[1].append(ticks[i]["seq"])
        for key, (stop, seqs) in written.items():
            self.dead_lettered += len(seqs)
            fields: dict[str, Any] = {
                "stream": key, "reason": stop.error.reason, "error": stop.text[:300], "count": len(seqs),
                "first_seq": seqs[0], "last_seq": seqs[-1], "seqs": seqs[:20], "to": self.dead_letter_key,
            }
            if key in self._dead_logged:
                self._throttle.log(logging.ERROR, "ticks_dead_lettered", **fields)
            else:  # the first time for a stream, whatever else was logged this second
                self._dead_logged.add(key)
                log_event(log, logging.ERROR, "ticks_dead_lettered", **fields)
        return failed, failure

    async def _calls(self, keys: list[str]) -> list[list[str]]:
        """Which streams share a script call: all of them on a standalone Redis (up to
        ``MAX_KEYS_PER_CALL``), only those of one hash slot on a Redis Cluster."""
        if self._cluster is None:
            if is_cluster(self._redis):
                self._cluster = True  # a cluster client (redis+cluster://): nothing to ask
            else:
                info = await self._redis.info("cluster")
                self._cluster = bool(info.get("cluster_enabled"))
        if not self._cluster:
            return [keys[i : i + MAX_KEYS_PER_CALL] for i in range(0, len(keys), MAX_KEYS_PER_CALL)]
        by_slot: dict[int, list[str]] = {}
        for key in keys:
            by_slot.setdefault(key_slot(key.encode()), []).append(key)
        return list(by_slot.values())

    async def _run_scripts(
        self, groups: dict[str, list[bytes]], ticks: list[Tick] | None = None
    ) -> tuple[list[Any], dict[str, str]]:
        """One pipelined round trip; returns per stream ``[added, duplicates, error or None]``, or the
        exception that refused its whole call, and the streams whose ``WAIT`` (with ``replica_acks``) came
        back short, with why.  Calls refused with ``NOSCRIPT`` are sent once more after loading the script
        (the others are not repeated).  ``ticks`` (those of ``groups``) are timed in ``sent_latency`` as the
        first pipeline goes out."""
        plan = await self._calls(list(groups))
        replies: list[Any] = [None] * len(plan)
        todo = list(range(len(plan)))
        short: dict[str, str] = {}
        for reload in (True, False):
            pipe = self._redis.pipeline(transaction=False)
            for c in todo:
                keys = plan[c]
                blob = b"".join(chain.from_iterable(groups[k] for k in keys))
                pipe.execute_command("EVALSHA", self._sha, len(keys), *keys, blob)
            waits = self._queue_waits(pipe, [plan[c] for c in todo])
            if ticks is not None:
                self._observe_sent(ticks)
                ticks = None
            got: list[Any] = await pipe.execute(raise_on_error=False)
            short.update(self._shortfalls(waits, got[len(todo) :]))
            again = []
            for c, r in zip(todo, got, strict=False):
                if reload and isinstance(r, NoScriptError):
                    again.append(c)
                else:
                    replies[c] = r
            if not again:
                break
            log_event(log, logging.INFO, "script_reloaded")
            self._sha = str(await self._redis.script_load(APPEND_SCRIPT))
            todo = again
        results: list[Any] = []
        for keys, r in zip(plan, replies, strict=True):
            if isinstance(r, Exception):
                results += [r] * len(keys)
            else:
                results += [r[4 * i : 4 * i + 4] for i in range(len(keys))]
        return [results[i] for i in self._order(plan, groups)], short

    def _queue_waits(self, pipe: Any, calls: list[list[str]]) -> list[list[str]]:
        """With ``replica_acks``: queue one ``WAIT`` after the script calls, per node on a Redis Cluster (each
        node's commands run in order on one connection, so its ``WAIT`` covers its calls); the streams each
        ``WAIT`` answers for.  Nothing without ``replica_acks`` (the default): no command, no cost."""
        if not self.replica_acks or not calls:
            return []
        wait = ("WAIT", self.replica_acks, self.replica_wait_ms)
        if not self._cluster:
            pipe.execute_command(*wait)
            return [[k for keys in calls for k in keys]]
        by_node: dict[str, tuple[Any, list[str]]] = {}
        cluster: Any = self._redis
        for keys in calls:
            node = cluster.get_node_from_key(keys[0])
            by_node.setdefault(node.name, (node, []))[1].extend(keys)
        for node, _ in by_node.values():
            pipe.execute_command(*wait, target_nodes=node)
        return [keys for _, keys in by_node.values()]

    def _shortfalls(self, waits: list[list[str]], replies: list[Any]) -> dict[str, str]:
        """The streams whose ``WAIT`` counted fewer replicas than ``replica_acks`` (or failed), with why."""
        out: dict[str, str] = {}
        for keys, reply in zip(waits, replies, strict=True):
            if isinstance(reply, Exception) or int(reply) < self.replica_acks:
                got = error_text(reply) if isinstance(reply, Exception) else f"{int(reply)} replica(s)"
                self.replica_shortfalls += 1
                why = f"NOREPLICAS WAIT {self.replica_acks} {self.replica_wait_ms}: {got}"
                out.update(dict.fromkeys(keys, why))
        return out

    @staticmethod
    def _order(plan: list[list[str]], groups: dict[str, list[bytes]]) -> list[int]:
        """Positions, in the plan's flattened order, of the streams in ``groups`` order."""
        position = {key: i for i, key in enumerate(k for keys in plan for k in keys)}
        return [position[key] for key in groups]

    def stats(self) -> WriterStats:
        """A snapshot of the counters (no I/O; copies the bounded per-reason counts)."""
        spill = self.spill
        full_reason = ""
        if spill is not None and (spill.full_reason or spill.full):
            full_reason = spill.full_reason or f"spill log at its cap of {spill.max_bytes} bytes"
        return WriterStats(
            buffered=len(self._buf), capacity=self.capacity, appended=self.appended,
            duplicates=self.duplicates, rejected=self.rejected, batches=self.batches, errors=self.errors,
            retries=self.retries, last_flush_us=self.last_flush_us, connected=self.connected,
            failing=self.failing,
            failing_for_s=round(time.monotonic() - self._failing_since, 3) if self.failing else 0.0,
            rejected_by_reason=dict(self.rejected_by_reason), dead_lettered=self.dead_lettered,
            spilled=len(spill) if spill is not None else 0, spill_bytes=spill.bytes if spill is not None else 0,
            spill_drained=spill.drained if spill is not None else 0,
            spill_full=bool(full_reason), spill_full_reason=full_reason,
            spill_full_events=spill.full_events if spill is not None else 0, spill_refused=self.spill_errors,
            spill_write_failures=spill.write_failures if spill is not None else 0,
            spill_corrupt=spill.corrupt if spill is not None else 0, spill_torn=spill.torn if spill is not None else 0,
        )

    def snapshot(self) -> WriterSnapshot:
        """:meth:`stats`, the per-channel counts and copies of the acknowledgement and send latencies (no I/O;
        copies a few small dicts and two histograms)."""
        return WriterSnapshot(
            stats=self.stats(), appended_by_channel=dict(self.appended_by_channel),
            dead_letter_key=self.dead_letter_key, ack_latency=self.ack_latency.copy(),
            sent_latency=self.sent_latency.copy(),
        )
