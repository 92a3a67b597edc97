"""The in-process hot path: lock-free fan-out of ticks to co-located subscribers.

The model is the LMAX Disruptor's, on one event loop thread: one preallocated ring that one writer (the
distributor task) publishes batches into, and one read cursor and one task per subscriber; no locks, every
piece of state with one owner, and exact accounting (``matched = delivered + dropped + pending``) for every
subscriber at every moment.  A subscriber's handler runs on the loop (``async``, or ``inline`` while it keeps
within its budget) or on a thread of its own (``thread``, chosen or earned by overrunning).

The package, each module importing only those listed before it:

- :mod:`~distributor.hotpath.policy`: limits, :class:`Execution` and :class:`SubscriberPolicy`, and the
  budget decisions (:func:`overran`, :func:`probation_chunk`, :func:`offload_due`): where handlers run and
  how a slow inline handler is found and moved;
- :mod:`~distributor.hotpath.stats`: :class:`SubscriptionStats`, :class:`HotPathStats`, who is slowest, the
  latency lookup table; how latency is sampled;
- :mod:`~distributor.hotpath.subscription`: :class:`Subscription` (one subscriber's routing, cursor,
  counters and handler times) and the thread of a thread subscriber with its hand-off;
- :mod:`~distributor.hotpath.ring`: the ring and the publisher (``publish``/``wait_room`` and the ``block``
  protocol), routing, cursors, vacating, waking, holds and removal;
- :mod:`~distributor.hotpath.serving`: the subscribers' tasks (inline, async, thread delivery);
- :mod:`~distributor.hotpath.fanout`: :class:`HotPath` itself (on :class:`~distributor.hotpath.ring.Ring`
  and :class:`~distributor.hotpath.serving.Serving`): subscribe, start, close, stats.
"""

from consumer_sdk.core.handler import Handler
from distributor.hotpath.fanout import HotPath
from distributor.hotpath.policy import (
    DEFAULT_CAPACITY,
    DEFAULT_HANDLER_BUDGET_US,
    DEFAULT_MAX_CHUNK,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_SUBSCRIBERS,
    HANDOFF_CHUNKS,
    MIN_OVERRUN_US,
    OFFLOAD_AFTER,
    OFFLOAD_WINDOW,
    PROBATION_CHUNK,
    Execution,
    SubscriberPolicy,
    offload_due,
    overran,
    probation_chunk,
)
from distributor.hotpath.stats import HOT_SAMPLE_EVERY, HotPathSnapshot, HotPathStats, SubscriptionStats
from distributor.hotpath.subscription import Subscription

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_HANDLER_BUDGET_US",
    "DEFAULT_MAX_CHUNK",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_MAX_SUBSCRIBERS",
    "HANDOFF_CHUNKS",
    "HOT_SAMPLE_EVERY",
    "MIN_OVERRUN_US",
    "OFFLOAD_AFTER",
    "OFFLOAD_WINDOW",
    "PROBATION_CHUNK",
    "Execution",
    "Handler",
    "HotPath",
    "HotPathSnapshot",
    "HotPathStats",
    "SubscriberPolicy",
    "Subscription",
    "SubscriptionStats",
    "offload_due",
    "overran",
    "probation_chunk",
]
