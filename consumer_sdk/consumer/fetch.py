"""One ``XREADGROUP``, flattened, with Python's cyclic garbage collector paused while a large reply is built.

A reply holds two lists per entry, and collections that start while a large one is being built walk it
again and again (on a backlog of 500 000 entries, longer than the read itself takes).  So the collector
is paused, if it was on, while a read without ``BLOCK`` is under way and until its reply is reduced to
flat lists (:func:`~consumer_sdk.consumer.batch.flatten_reply`); other tasks that run in the meantime
run with it paused too.  A blocking read does not pause it; the read that follows it, which does not block, does.

On a Redis Cluster one ``XREADGROUP`` cannot name streams of two hash slots, and stream keys carry no hash
tag: :func:`read_each` reads every stream with a command of its own, all pipelined (one round trip per
node, the nodes at once).  A blocking read on many slots has no one command to wait in, so on a cluster a
read that finds nothing waits :data:`CLUSTER_IDLE_S` (or until stopped) and the consumer reads again.

:func:`ack_and_read` writes the acknowledgements of the batch just handled and the next ``XREADGROUP``
in one write on one connection: Redis runs a connection's commands in order, so the acks are applied
before the read, and the next read does not wait for a round trip of acks first (one round trip a cycle,
not two or three).

A blocking read is followed, in the same write, by the same read without ``BLOCK`` (the follow-up).  Redis
before 7.2 answers an ``XREADGROUP`` blocked on many streams with the one stream whose append woke it,
although the writer's script stored a whole flush over many streams at once: the rest waited for the next
read, one more round trip (at 10k ticks/s over 60 streams, every other read came back with one stream).
The follow-up sits behind the blocked read in the connection's input and runs as soon as that read is
answered, so the rest comes back in the same round trip.  Redis 7.2 and later, and Valkey, answer the blocked
read with every stream that has entries; the follow-up then finds what arrived in between, usually nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import redis.exceptions as rexc
from redis.asyncio import Redis

from consumer_sdk.consumer.batch import Flat, flatten_reply
from consumer_sdk.core.redis import CLUSTER_IDLE_S, hiredis_pack, pack_xack, pool_connection

__all__ = [
    "CLUSTER_IDLE_S",
    "RECANCEL_S",
    "CollectorPause",
    "ack_and_read",
    "cancel_until_done",
    "collector_paused",
    "merge_reads",
    "read_each",
    "read_group",
]


class CollectorPause:
    """Keeps Python's cyclic garbage collector off while large replies are read and flattened.

    A reply holds two lists per entry and no reference cycles; collections that start while it is
    being built walk it again and again as it grows, which costs more than reading it.  Shared by
    every consumer of the process: the collector is switched off by the first reader in, and back on
    by the last one out, only if it was on to begin with.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._resume = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._resume:
                    self._resume = False
                    gc.enable()


collector_paused: Final = CollectorPause()

#: How long a cancelled read may run on before it is cancelled again.
RECANCEL_S: Final = 0.02


def cancel_until_done(task: asyncio.Task[Any]) -> None:
    """Cancel ``task``, and again every :data:`RECANCEL_S` while it runs on.

    On Python 3.11, ``asyncio.wait_for`` (which redis-py sends every command through) drops a
    cancellation that arrives just as the command was written; the read would then block for its
    whole ``BLOCK``.
    """
    if task.done():
        return
    task.cancel()
    task.get_loop().call_later(RECANCEL_S, cancel_until_done, task)


async def read_group(
    client: Redis, group: str, consumer: str, streams: dict[Any, Any], *, count: int, dfield: Any,
    block: int | None = None,
) -> list[Flat]:
    """One ``XREADGROUP`` of ``streams`` (key -> cursor) by ``client``, a
    :func:`~consumer_sdk.core.redis.raw_stream_client`; the reply is flattened and dropped before the
    garbage collector may run again.  A read that does not block comes back at once, however large: the
    collector is paused for it.
    """
    if block is not None:
        reply = await client.xreadgroup(group, consumer, streams, count=count, block=block)
        return flatten_reply(reply, dfield)
    with collector_paused():
        reply = await client.xreadgroup(group, consumer, streams, count=count)
        found = flatten_reply(reply, dfield)
        del reply
    return found


async def read_each(
    client: Redis, group: str, consumer: str, streams: dict[Any, Any], *, count: int, dfield: Any
) -> list[Flat]:
    """One ``XREADGROUP ... COUNT count STREAMS key cursor`` per stream of ``streams``, pipelined, never
    blocking (for a Redis Cluster, where one command cannot span slots); ``client`` is a
    :func:`~consumer_sdk.core.redis.cluster_raw_client`.  An error reply is raised after every reply was
    read.  The collector is paused as :func:`read_group` pauses it."""
    with collector_paused():
        pipe = client.pipeline(transaction=False)
        for key, cursor in streams.items():
            pipe.xreadgroup(group, consumer, {key: cursor}, count=count)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        found: list[Flat] = []
        error: BaseException | None = None
        for reply in replies:
            if isinstance(reply, BaseException):
                error = error or reply
            elif reply:
                found += flatten_reply(reply, dfield)
        del replies
    if error is not None:
        raise error
    return found


def merge_reads(first: list[Flat], then: list[Flat]) -> list[Flat]:
    """Two reads of one consumer, one after the other, as one: a stream in both has ``first``'s entries and then
    ``then``'s (IDs increase from one read to the next); streams in order of first appearance (pure)."""
    if not first:
        return then
    at = {key: i for i, (key, _ids, _values) in enumerate(first)}
    out = list(first)
    for key, ids, values in then:
        i = at.get(key)
        if i is None:
            out.append((key, ids, values))
        else:
            _key, ids0, values0 = out[i]
            out[i] = (key, ids0 + ids, values0 + values)
    return out


async def ack_and_read(
    client: Redis, group: str, consumer: str, acks: Sequence[tuple[str, Sequence[bytes | str]]],
    streams: dict[Any, Any], *, count: int, dfield: Any, block: int | None = None,
    on_acked: Callable[[int], None] | None = None,
) -> tuple[int, list[Flat]]:
    """``XACK`` each ``(key, ids)`` of ``acks``, then one ``XREADGROUP`` of ``streams`` (key -> cursor), all in
    one write on one connection of ``client``'s pool (a standalone client, not a cluster); returns how many
    entries were acknowledged and the read, flattened.  ``on_acked(n)`` is called with that count as soon as
    the acks' replies are in, before the read's (which may block).

    Redis runs the commands in the order written: every ack is applied before the read, as if they were
    sent first and waited for, one round trip earlier.  A read with ``block`` is followed by the same read
    without it (see the module doc), whose entries are merged in (:func:`merge_reads`).  An error reply is
    raised once every reply was read (the connection stays in step), the read's own first; the follow-up's
    is not (the entries the blocked read gave are this consumer's now and are handed over; the next read
    meets the error again if it lasts).  A connection error or a cancellation closes the connection (it
    reconnects when next used), and the acks may or may not have been applied: entries left pending are read
    again after the reconnect and skipped as duplicates.  A read without ``block`` pauses the collector as
    :func:`read_group` does.
    """
    pool: Any = client.connection_pool
    encode: Callable[[Any], bytes] = pool.get_encoder().encode
    name = encode(group)
    payload = [pack_xack(encode(key), name, ids) for key, ids in acks if ids]
    replies = len(payload)
    conn = await pool_connection(pool)
    head = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count)
    tail = ("STREAMS", *streams.keys(), *streams.values())
    # the read, and after a blocking one the follow-up (see the module doc): the same read, not blocking
    reads = [(*head, "BLOCK", block, *tail), (*head, *tail)] if block is not None else [(*head, *tail)]
    payload += [hiredis_pack(r) if hiredis_pack is not None else b"".join(conn.pack_command(*r)) for r in reads]
    acked = 0
    error: rexc.ResponseError | None = None
    # One deadline for the whole exchange (the connection's socket timeout, which a blocking client sets
    # above BLOCK), not one per reply: each of redis-py's per-reply timeouts costs a timer of the loop.
    limit = conn.socket_timeout
    try:
        async with asyncio.timeout(limit):
            await conn.send_packed_command(payload)
            for _ in range(replies):
                try:
                    acked += int(await conn.read_response(timeout=math.inf))
                except rexc.ResponseError as exc:  # the reply was read: the connection is still in step
                    error = error or exc
            if on_acked is not None:
                on_acked(acked)
            if block is not None:
                # both replies off the connection before either is looked at: it stays in step whatever follows
                first: Any = None
                try:
                    first = await conn.read_response(timeout=math.inf)
                except rexc.ResponseError as exc:
                    error = exc  # the read's own error first
                with collector_paused():  # the follow-up: what the blocked read's answer left out
                    try:
                        then: Any = await conn.read_response(timeout=math.inf)
                    except rexc.ResponseError:
                        then = None  # not raised: what the blocked read gave is handed over (see above)
                    found = flatten_reply(first, dfield) if first else []
                    if then:
                        found = merge_reads(found, flatten_reply(then, dfield))
                    del first, then
            else:
                with collector_paused():
                    reply = await conn.read_response(timeout=math.inf)
                    found = flatten_reply(reply, dfield)
                    del reply
    except TimeoutError as exc:  # the deadline: redis-py has closed the connection it cancelled
        await conn.disconnect(nowait=True)
        raise rexc.TimeoutError(f"Timeout reading from Redis after {limit} s") from exc
    finally:
        await pool.release(conn)
    if error is not None:
        raise error
    return acked, found
