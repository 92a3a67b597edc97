"""An async consumer-group reader: at-least-once delivery, dedupe by seq, gap and trim reports.

::

    consumer = Consumer(redis_url="redis://127.0.0.1:6379/0", patterns=["binance:*:trade"], group="strat")
    await consumer.run(handler)          # until consumer.stop(), cancellation, or the handler raises

How a read goes: one ``XREADGROUP`` over every matched stream, with ``BLOCK`` unless a backlog is likely
(at the start, after a large read: then without, and with ``BLOCK`` only when that finds nothing).  A
blocking read is followed, in the same write, by the same read without ``BLOCK``: Redis before 7.2 answers a
read blocked on many streams with the one stream that woke it, and the follow-up brings what the writer
stored in the others in the same round trip.  The reply is taken as the
server sent it (no dict per entry) and reduced to entry IDs and tick fields; per stream, the
entries are decoded and classified by a :class:`~consumer_sdk.core.sequencing.SeqTracker` (no I/O, no
await); new ticks go to the handler in order; then one ``XACK`` per stream, all written at once,
for everything the handler returned from, plus duplicates and invalid entries.  Nothing is
acknowledged before the handler returned for it: at-least-once.

Garbage collection: a reply holds two lists per entry, and collections that start while a large
one is being built walk it again and again (on a backlog of 500 000 entries, longer than the read
itself takes).  So Python's cyclic garbage collector is paused, if it was on, while a read without
``BLOCK`` is under way and until its reply is reduced to flat lists; other tasks that run in the
meantime run with it paused too.  A blocking read does not pause it (its follow-up does), and handlers run with the
collector as the application left it.

Delivery rules:

- Start: the consumer first re-reads its own pending entries (``XREADGROUP ... 0``), so a
  restarted consumer with the same name finishes what it had been given.
- Dedupe: a seq at or below the last one this ``Consumer`` handed over for a stream (and not in a
  hole it is still waiting for) is a duplicate: acked, not handed again.  This covers redelivery
  after a failed ``XACK`` or a restarted ``run()``, and a writer re-publishing what it already
  stored.  A new ``Consumer`` object starts with no memory: what its previous incarnation handled
  but never acked is handed again (at-least-once).
- Claims: entries pending longer than ``claim_idle_ms`` on other (dead) consumers of the group are
  taken over with ``XAUTOCLAIM`` and handed over even when their seq is below the last seen: they
  were delivered to someone else, never to this consumer.
- Gaps: a jump in seq is checked against the stream (one ``XRANGE ... COUNT 1`` per hole).  If the
  stream holds entries in the hole, they went to another consumer of the group and nothing is
  reported; otherwise ``on_gap(key, first_missing, last_missing)`` is called just before the tick
  after the hole is handed over.  With several consumers in a group, a hole partly held by another
  consumer and partly missing is not reported (the ingestor counts venue gaps itself).
- Entries that are not ticks (no field ``d``, ``d`` not JSON, JSON but not a tick, ``d`` longer than
  ``max_entry_bytes``, which is never parsed; :mod:`consumer_sdk.poison`): acked, never handed over,
  counted by kind in ``ConsumerStats.poisoned`` (and in ``invalid``), passed to
  ``on_invalid(key, entry_id, error)`` (``error.kind`` names the kind) or, without it, logged at most
  once a second per kind naming the stream and the entry ID.  They never reach the dedupe or gap state,
  and a hole in seq that holds only such entries is a gap.  A tick whose entry ID lies more than a day
  ahead of this clock is handed over and counted and logged as ``future_id``.
- Handler errors: the entry that raised and the rest of its batch are not acked; the error
  propagates out of :meth:`Consumer.run`.  Call ``run()`` again to retry them (this consumer's
  memory makes sure what was handled before is not handed again).
- Trimmed history: when the group's position is older than what the stream still holds and
  entries after it were removed (Redis >= 7: the group's ``lag`` counts more unread entries than
  the stream holds, or ``max-deleted-entry-id`` is after ``last-delivered-id``), checked for every
  stream when it is first read; or a seq hole holds no entries and trimming has passed the entry
  before it (the oldest entry held is newer); or a pending entry was deleted before it was
  processed; or ``start_id`` is a time or seq older than what the stream holds:
  ``on_trimmed(key, first_missing_id, first_available_id)`` is called before anything after the
  loss is handed over (``first_available_id`` is ``None`` when unknown).  Without ``on_trimmed``,
  :meth:`Consumer.run` raises :class:`~consumer_sdk.core.errors.TrimmedError` instead, once per loss per
  ``Consumer``; calling ``run()`` again continues past it.  (Redis moves ``max-deleted-entry-id``
  only on ``XDEL``, not when trimming, hence the ``lag`` count.)  Where Redis cannot give a ``lag``
  (nil after some deletions) the start check falls back on a jump in seq between the group's position
  and the oldest entry held.  A venue gap that trimming overtook is reported as trimmed.
- The server must be Redis 7.0+ or Valkey 7.2+ (:mod:`consumer_sdk.core.server`): the first set-up
  checks it and :meth:`Consumer.run` raises :class:`~consumer_sdk.core.errors.ConfigError` on an older one.
- ``NOGROUP`` (Redis restarted without persistence, stream or group deleted): the group is created
  again at ``0`` (everything in a re-created stream is new to the group), logged and counted.  A
  stream named literally is re-created empty (``MKSTREAM``) so the group can wait on it; a stream
  found by a glob that no longer exists is dropped until a rescan finds it again.
- Connection errors: retried forever with capped, jittered backoff (50 ms growing to 2 s), counted
  in ``reconnects``; afterwards the consumer re-reads its own pending entries.  Errors that retrying
  cannot fix (a key that is not a stream, authentication) raise :mod:`consumer_sdk.core.errors`.
- Blocking reads: a client made from a URL gets a socket timeout of ``block_ms`` + 10 s; a given
  client whose socket timeout is shorter than the block is used through a dedicated pool with the
  same settings and a longer timeout.

Streams found by a glob after the start are read from their beginning (``0``): everything in a
stream that appeared after the consumer started is new.  ``start_id`` applies to groups created
at the start.  Handlers are plain functions or coroutine functions, told apart once per ``run()``
(a plain function returning an awaitable has it awaited).  Logs go through ``market.consumer``
with events ``redis_retry``, ``group_recreated``, ``stream_gone``, ``streams_found``, ``trimmed``,
``invalid_tick`` and ``future_id`` (the noisy ones throttled).

Redis Cluster (``redis_url="redis+cluster://host:port,..."`` or a cluster client): groups are created per
stream as on a standalone server; one ``XREADGROUP`` cannot span hash slots, so each read is one
``XREADGROUP`` per stream, pipelined (a round trip per node, the nodes at once), never blocking: a read
that finds nothing waits :data:`~consumer_sdk.core.redis.CLUSTER_IDLE_S` (10 ms) before the next, so an idle
consumer of S streams sends about 100 x S commands a second.

Layout, imports going one way (down this list): :mod:`~consumer_sdk.consumer.batch` (per-entry
classification: dedupe by seq, gaps, disorder, what to ack; pure) and :mod:`~consumer_sdk.consumer.trim`
(holes, trimmed history, lag; pure); :mod:`~consumer_sdk.consumer.fetch` (one ``XREADGROUP``, the
collector pause), :mod:`~consumer_sdk.consumer.groups` (streams and groups, ``NOGROUP``) and
:mod:`~consumer_sdk.consumer.claims` (``XAUTOCLAIM``, deleted pending entries);
:mod:`~consumer_sdk.consumer.delivery` (holes checked, handler and hooks called in order, acks,
counters); :mod:`~consumer_sdk.consumer.reader` (the :class:`Consumer` that ties them).  This package re-exports
the public names.
"""

from __future__ import annotations

from consumer_sdk.consumer.reader import Consumer, ConsumerStats, GapHook, InvalidHook, TrimmedHook
from consumer_sdk.consumer.trim import group_behind_trim, hole_verdict, lag_estimate

__all__ = [
    "Consumer",
    "ConsumerStats",
    "GapHook",
    "InvalidHook",
    "TrimmedHook",
    "group_behind_trim",
    "hole_verdict",
    "lag_estimate",
]
