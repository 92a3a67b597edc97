"""Taking over entries left pending on idle (dead) consumers of the group: ``XAUTOCLAIM``.

One pipelined ``XAUTOCLAIM ... 0-0 COUNT n`` per active stream.  Redis 7.0+ also answers with the IDs of
pending entries whose content was deleted (trimmed) before anyone processed them and drops them from the
pending list: the first of those is reported as trimmed history, once per ID.  Claimed entries are
flattened as a read's are (:func:`~consumer_sdk.consumer.batch.flatten`) and handed over even when their
seq is below the last one seen: they were delivered to another consumer, never to this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from consumer_sdk.consumer.batch import Flat, KeyState, flatten
from consumer_sdk.consumer.groups import ReportTrimmed
from consumer_sdk.core.redis import id_str

__all__ = ["Claimed", "claim_idle"]


@dataclass(slots=True)
class Claimed:
    """What one round of claims took: per stream, the entries (as a read's), their count, and whether more wait."""

    streams: list[Flat] = field(default_factory=list)
    count: int = 0
    more: bool = False


async def claim_idle(
    reader: Redis,
    states: Sequence[KeyState],
    *,
    group: str,
    consumer: str,
    idle_ms: int,
    count: int,
    dfield: Any,
    report: ReportTrimmed,
) -> Claimed:
    """Claim up to ``count`` entries per stream pending longer than ``idle_ms`` on other consumers.

    ``reader`` is a :func:`~consumer_sdk.core.redis.raw_stream_client`.  Entries deleted while pending
    go to ``report(state, first_deleted_id, None, marker)`` (which may raise); an error reply on any
    stream is raised after the round.  ``more`` tells a stream has further idle entries to claim.
    """
    out = Claimed()
    if not states:
        return out
    async with reader.pipeline(transaction=False) as pipe:
        for state in states:
            pipe.xautoclaim(state.key, group, consumer, idle_ms, "0-0", count=count)
        results = await pipe.execute(raise_on_error=False)
    for state, result in zip(states, results, strict=True):
        if isinstance(result, Exception):
            raise result
        if len(result) > 2 and result[2]:  # pending entries whose content was trimmed: dropped from the PEL
            first = id_str(result[2][0])
            report(state, first, None, ("claim", first))
        if result[1]:
            out.count += len(result[1])
            out.streams.append((state.key, *flatten(result[1], dfield)))
        if id_str(result[0]) != "0-0":
            out.more = True
    return out
