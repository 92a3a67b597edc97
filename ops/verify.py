"""``market verify``: hold stored streams to the soak's invariant, after the fact, against any venue.

A trade or aggregate-trade stream's ``seq`` is the venue's own id, and the venue numbers them one by one
per symbol (Binance and the simulator alike).  So what is stored can be checked without the venue's
record: walked in entry order, every id must follow the one before it, or a gap marker must cover the ids
in between (:class:`ops.soak_plan.StreamCheck`).  A duplicate, a step back, or a hole that no marker
covers is a *break*, reported with its stream and entry ID.  This is the check for a long run against
the real venue (docs/soak.md), where the soak's own checker, which needs the simulator, cannot run.

Cost: one ``XRANGE ... COUNT 5000`` per 5,000 entries, decoded one at a time (memory bounded by the
batch, plus one merged run per hole kept per stream).  Only ``trade`` and ``agg_trade`` streams are
checked: the other channels' ``seq`` is not a count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ops.soak_plan import StreamCheck

__all__ = ["CHECKED_CHANNELS", "StreamVerdict", "verify_streams"]

CHECKED_CHANNELS: Final = ("trade", "agg_trade")
PAGE: Final = 5000


@dataclass(frozen=True, slots=True)
class StreamVerdict:
    key: str
    entries: int
    stored: int  # ticks, each a venue id
    marked: int  # venue ids inside gap markers
    markers: int
    breaks: int
    first_break: str
    first_id: int | None  # the first venue id seen (tick or marker)
    last_id: int | None  # the last venue id covered
    invalid: int  # entries with no decodable tick: counted as breaks too

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


async def _walk(redis: Any, key: str) -> StreamVerdict:
    check = StreamCheck(key)
    entries = invalid = 0
    first_id: int | None = None
    start = "-"
    while True:
        page = await redis.xrange(key, min=start, count=PAGE)
        for raw_id, fields in page:
            eid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            entries += 1
            try:
                tick = orjson.loads(fields[b"d"])
                seq = int(tick["seq"])
                gap = (int(tick["gap_first"]), int(tick["gap_last"])) if "gap_first" in tick else None
            except (KeyError, TypeError, ValueError, orjson.JSONDecodeError):
                invalid += 1
                check.break_at(eid, "entry holds no valid tick")
                continue
            if first_id is None:
                first_id = gap[0] if gap is not None else seq
            check.feed(eid, seq, gap)
        if len(page) < PAGE:
            break
        last = page[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    return StreamVerdict(
        key=key, entries=entries, stored=check.stored, marked=check.marked, markers=check.markers,
        breaks=check.breaks, first_break=check.first_break, first_id=first_id,
        last_id=None if check.next is None else check.next - 1, invalid=invalid,
    )


async def find_keys(redis: Any, prefix: str) -> list[str]:
    """Every ``<prefix>:<venue>:<SYMBOL>:<trade|agg_trade>`` stream, sorted."""
    found: set[str] = set()
    for channel in CHECKED_CHANNELS:
        async for raw in redis.scan_iter(match=f"{prefix}:*:*:{channel}", count=1000, _type="stream"):
            key = raw.decode() if isinstance(raw, bytes) else str(raw)
            if key.count(":") == 3 and not key.split(":")[1].startswith("_"):
                found.add(key)
    return sorted(found)


async def verify_streams(redis: Any, prefix: str, keys: Sequence[str] = ()) -> list[StreamVerdict]:
    """Check ``keys`` (default: every trade and aggregate-trade stream under ``prefix``)."""
    chosen = list(keys) or await find_keys(redis, prefix)
    return [await _walk(redis, key) for key in chosen]
