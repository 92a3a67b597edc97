"""What the hot path reports: one subscriber's counters, the hot path's totals, who is slowest, and the lookup
table its delivery loops use to count a latency.  Records and pure functions; the hot path fills them
(:meth:`~distributor.hotpath.HotPath.stats`, :meth:`~distributor.hotpath.HotPath.slowest`).

Exact accounting, for every subscriber at every moment (how the ring keeps it: :mod:`distributor.hotpath.ring`)::

    matched = delivered + dropped + pending

Latency: ``HotPath.latency`` (a :class:`~consumer_sdk.core.latency.LatencyHistogram`, µs) counts, for
every delivery to every subscriber, the time from the publish stamp of the tick's batch (one
``perf_counter_ns`` read per batch, kept in the stamps list) to the moment its handler call has
returned.  A synchronous subscriber's delivery loop walks its chunk one publish batch at a time (the
ring slots of a batch share a stamp; ``bisect`` finds where the batch ends) and reads the clock once
per batch, after the handler has taken every tick of it: each tick is counted with the latency of
the last one of its batch, an upper bound, and the bookkeeping costs one clock read per batch and
subscriber instead of one per delivery.  ``sample_every=N`` times one chunk in N of each subscriber
(chosen by position, every tick of a timed chunk counted; the ingestor uses 4), ``0`` none.  Held-back
chunks and asynchronous subscribers are timed per delivery whenever ``sample_every`` is not 0.

A handler that hangs (see :mod:`distributor.hotpath.serving`): :class:`SubscriptionStats` counts the ticks a
lagging ``drop_oldest`` subscriber can no longer get as dropped at once (it is told, ``on_drop``,
when it next reads), and its ``handler_us`` grows with the call in progress, so it is named by
:attr:`HotPathStats.slowest` while it hangs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from consumer_sdk.core.latency import LatencyHistogram, bucket_of
from distributor.hotpath.policy import DEFAULT_HANDLER_BUDGET_US, Execution, SubscriberPolicy

__all__ = [
    "HOT_SAMPLE_EVERY", "LUT", "LUT_SIZE", "HotPathSnapshot", "HotPathStats", "SubscriptionStats", "slowness",
]

#: the ingestor times one chunk in this many of each subscriber (a chunk is timed as a whole, so it needs
#: fewer samples than the per-tick stages; see the module doc)
HOT_SAMPLE_EVERY: Final = 4
LUT_SIZE: Final = 1 << 14  # µs: below 16 ms a delivery's latency bucket is a list lookup
#: latency bucket by whole µs below LUT_SIZE (the delivery loops' inline LatencyHistogram.observe)
LUT: Final = [bucket_of(us) for us in range(LUT_SIZE)]


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """One subscriber's counters.  ``matched == delivered + dropped + pending`` always holds."""

    name: str
    policy: SubscriberPolicy
    patterns: tuple[str, ...]
    matched: int  # published ticks matching its patterns since it subscribed (until it was removed)
    delivered: int  # handler calls, including those that raised
    dropped: int  # matching ticks it will never get (skipped or past its window, lost while over its limit,
    #              pending at removal)
    pending: int  # matching ticks published and neither delivered nor (yet) counted as dropped
    errors: int  # handler calls that raised
    drop_events: int  # times it was told of a drop (on_drop calls)
    lag: int  # published ticks, of every stream, between the head and its cursor
    removed: str | None  # why it was removed, None while subscribed
    execution: Execution = Execution.INLINE  # where its handler runs now
    offloaded: bool = False  # moved off the loop for overrunning its budget
    handler_us: float = 0.0  # its own time per tick, recent: mean over about 8 chunks, or the chunk in progress
    #                         (when that is longer: a handler that hangs); wall time, awaits included for async
    handler_max_us: float = 0.0  # the largest mean time per tick of one chunk
    handler_total_us: int = 0  # time in its handler since it subscribed
    busy_us: int = 0  # how long the chunk in progress has been running (0: none)
    overruns: int = 0  # chunks over its budget (sync handlers; see distributor.hotpath.policy)
    budget_us: float = DEFAULT_HANDLER_BUDGET_US


@dataclass(frozen=True, slots=True)
class HotPathStats:
    published: int
    capacity: int
    streams: int
    subscribers: int
    delivered: int  # over every subscriber, removed ones included
    dropped: int
    errors: int
    dropped_by_policy: dict[str, int]
    disconnected: int  # subscribers removed by the disconnect policy
    removed: int  # subscribers removed for any reason
    blocked: int  # publish() calls that returned False
    waiting_room: bool  # a publish is waiting for a block subscriber now
    max_lag: int  # the largest lag of a current subscriber
    slowest: str | None = None  # the current subscriber with the most handler time per tick, then lag
    offloaded: int = 0  # subscribers moved to a thread for overrunning their budget, since start
    threads: int = 0  # current subscribers whose handler runs on a thread of its own
    overruns: int = 0  # chunks over budget, every subscriber, removed ones included


@dataclass(frozen=True, slots=True)
class HotPathSnapshot:
    """What observers (heartbeat, metrics) read of the hot path at one instant: :meth:`HotPath.snapshot`."""

    stats: HotPathStats
    #: every current subscriber, slowest first (as :meth:`HotPath.slowest` ranks them)
    ranked: tuple[SubscriptionStats, ...]
    #: publish stamp to handler call (µs), every subscriber, a copy
    latency: LatencyHistogram


def slowness(st: SubscriptionStats) -> tuple[float, int, str]:
    """Sort key, slowest first: the most handler time per tick, then the largest lag, then the name."""
    return (-st.handler_us, -st.lag, st.name)
