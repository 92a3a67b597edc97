"""The hot path's limits and decisions: where a handler runs, what a lagging subscriber's policy does, and when
an inline handler has overrun its budget or is to be moved to a thread.  Plain values and pure functions; no I/O.

Where handlers run (isolation by design)::

    async handler             on the loop, in its task; it awaits, so it never holds the others up
    sync handler, "inline"    on the loop, in its task, while it keeps within its budget (the default)
    sync handler, "thread"    on a thread of its own (chosen at subscribe, or moved there for overrunning)

Every chunk a subscriber handles is timed (two clock reads and a few counter updates per chunk, whatever
its size: about 1 µs per chunk and subscriber on the 2-core development machine): the sum, the largest
per-tick mean of a chunk and a recent per-tick mean (EWMA over about 8 chunks) are kept per subscriber.
An inline handler's chunk *overruns* when it held the loop longer than both ``handler_budget_us`` per
tick and :data:`MIN_OVERRUN_US` (wall time: a handler that blocks on a sleep or on I/O overruns as
surely as one that computes).  A new inline subscriber's first chunk is *one call*: within budget, its
chunks are ``max_chunk`` from then on; over it, :func:`probation_chunk` calls (enough to overrun), so a
handler slow from its first call holds the loop for one call, not for a full chunk.  After an overrun its
chunks are cut to :func:`probation_chunk` calls (enough to overrun once more if it is still that slow, at most
:data:`PROBATION_CHUNK`: one call for a 1 ms handler); at its :data:`OFFLOAD_AFTER`-th overrun within
:data:`OFFLOAD_WINDOW` of its chunks it is moved, for good, to a thread of its own (logged
``subscriber_offloaded``).  So a slow handler holds the publisher, the writer, the socket reader and the
other subscribers once, for at most ``max_chunk + (OFFLOAD_AFTER - 1) * PROBATION_CHUNK`` of its calls (a
1 ms handler is moved after its first :data:`OFFLOAD_AFTER` calls, each holding the loop once for 1 ms),
and never again; a trivial inline handler pays no thread hop.  Wall time also
counts what was not the handler's doing (the machine preempting the loop's thread, another thread
holding the GIL): that is why one overrun, or a few spread out, move nothing.  A handler that blocks
only now and then (one chunk in five) stays inline, its overruns counted and logged
(``subscriber_overran``); declare it ``execution="thread"``.  A synchronous handler may run on another
thread: code that must run on the loop (asyncio objects, ``call_soon``) belongs in an async handler.

How each is served is in :mod:`distributor.hotpath.serving`; the thread's side of a thread subscriber is
:mod:`distributor.hotpath.subscription`.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Final

from consumer_sdk.core.errors import ConfigError

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_HANDLER_BUDGET_US",
    "DEFAULT_MAX_CHUNK",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_MAX_SUBSCRIBERS",
    "HANDOFF_CHUNKS",
    "MIN_OVERRUN_NS",
    "MIN_OVERRUN_US",
    "OFFLOAD_AFTER",
    "OFFLOAD_WINDOW",
    "PROBATION_CHUNK",
    "SKIPPING",
    "Execution",
    "SubscriberPolicy",
    "check_budget",
    "offload_due",
    "overran",
    "probation_chunk",
]

DEFAULT_CAPACITY: Final = 65536
DEFAULT_MAX_CHUNK: Final = 256
DEFAULT_MAX_STREAMS: Final = 65536
DEFAULT_MAX_SUBSCRIBERS: Final = 1024
#: an inline handler's budget: its mean time per tick over a chunk (µs); see the module doc
DEFAULT_HANDLER_BUDGET_US: Final = 50.0
#: a chunk that held the loop for less than this (µs) is never an overrun, whatever its per-tick mean:
#: a one-tick chunk hit by a collection or a preemption is not a slow handler
MIN_OVERRUN_US: Final = 500
#: an inline handler is moved to its own thread at this many overruns ...
OFFLOAD_AFTER: Final = 4
#: ... within this many of its chunks
OFFLOAD_WINDOW: Final = 8
#: after an overrun, an inline handler's chunks hold at most this many calls until it is moved, or has
#: gone OFFLOAD_WINDOW chunks without overrunning (fewer when its calls are slow: see :func:`probation_chunk`)
PROBATION_CHUNK: Final = 16
#: chunks handed to a thread subscriber and not yet handled: one in its handler, one waiting
HANDOFF_CHUNKS: Final = 2

MIN_OVERRUN_NS: Final = MIN_OVERRUN_US * 1000


class Execution(StrEnum):
    """Where a subscriber's handler runs (see the module doc)."""

    INLINE = "inline"  # sync, on the loop, moved to THREAD when it overruns its budget repeatedly
    THREAD = "thread"  # sync, on a thread of its own
    ASYNC = "async"  # a coroutine function, awaited on the loop

    @classmethod
    def parse(cls, text: str | Execution | None, is_async: bool) -> Execution:
        """The execution for a handler: None picks ``async`` or ``inline`` by its kind."""
        if text is None:
            return cls.ASYNC if is_async else cls.INLINE
        try:
            value = cls(text)
        except ValueError:
            raise ConfigError(
                f"unknown subscriber execution {text!r}: expected one of {', '.join(e.value for e in cls)}"
            ) from None
        if is_async and value is not cls.ASYNC:
            raise ConfigError(f"execution {value.value!r} is for synchronous handlers; this handler is a coroutine "
                              "function, which runs on the loop (execution 'async')")
        if not is_async and value is cls.ASYNC:
            raise ConfigError("execution 'async' needs a coroutine function (async def); "
                              "a synchronous handler runs 'inline' or on a 'thread'")
        return value


class SubscriberPolicy(StrEnum):
    """What happens to a subscriber that falls more than ``max_lag`` published ticks behind."""

    DROP_OLDEST = "drop_oldest"  # it skips to the newest max_lag ticks; on_drop(count) says how many it missed
    DROP_NEWEST = "drop_newest"  # it keeps the max_lag ticks it had and loses what comes until it has read them
    BLOCK = "block"  # the publisher waits for it (publish() returns False, wait_room())
    DISCONNECT = "disconnect"  # it is removed, with a reason

    @classmethod
    def parse(cls, text: str | SubscriberPolicy) -> SubscriberPolicy:
        if isinstance(text, SubscriberPolicy):
            return text
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(
                f"unknown subscriber policy {text!r}: expected one of {', '.join(p.value for p in cls)}"
            ) from None


#: the policies whose subscribers are lapped by their own reads (block only while shedding)
SKIPPING: Final = frozenset({SubscriberPolicy.DROP_OLDEST, SubscriberPolicy.BLOCK})  # lapped by Ring.take


def overran(ns: int, calls: int, budget_ns: int) -> bool:
    """Whether a chunk of ``calls`` handler calls that took ``ns`` overran a budget of ``budget_ns`` per call:
    longer than the budget times the calls, and than :data:`MIN_OVERRUN_US` (so a one-call chunk hit by a
    collection or a preemption is not taken for a slow handler)."""
    return ns > budget_ns * calls and ns > MIN_OVERRUN_NS


def probation_chunk(per_call_ns: int, cap: int) -> int:
    """How many calls an inline handler's chunks hold after an overrun, given its latest per-call mean: enough
    to pass :data:`MIN_OVERRUN_US` once more if it is still that slow (so the next chunk can overrun again and
    a handler just over its budget is still caught), no more than ``cap``, at least 1.  A 1 ms handler gets
    1-call chunks: it holds the loop 1 ms at a time until it is moved, not ``cap`` ms."""
    if per_call_ns <= 0:
        return cap
    return max(1, min(cap, MIN_OVERRUN_NS // per_call_ns + 1))


def offload_due(overruns: Sequence[int], chunk: int) -> bool:
    """Whether an inline subscriber is to be moved to a thread, given the chunk numbers of its latest
    overruns (oldest first) and the number of the current chunk: :data:`OFFLOAD_AFTER` of them within
    :data:`OFFLOAD_WINDOW` chunks."""
    return len(overruns) >= OFFLOAD_AFTER and chunk - overruns[-OFFLOAD_AFTER] < OFFLOAD_WINDOW



def check_budget(us: float) -> float:
    if isinstance(us, bool) or not isinstance(us, int | float) or not 0 < us <= 1e9:
        raise ConfigError(f"handler_budget_us must be a positive number of microseconds, got {us!r}")
    return float(us)
