"""What the drills against the simulated venue share: waiting on a condition, the venue's newest trade id as its
REST history says, and the check that a trade stream holds every id once, in order, up to it."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from consumer_sdk.core.tick import is_gap_marker
from ops.simulator import Simulator


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str = "the condition") -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds (a hang bound)."""
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(0.05)  # poll
    except TimeoutError:
        pytest.fail(f"{what}: not within {timeout} s")


async def venue_last_trade(sim: Simulator, symbol: str) -> int:
    """The newest trade id the venue has made for ``symbol`` (``/api/v3/trades``)."""

    def get() -> Any:
        with urllib.request.urlopen(f"{sim.rest_url}/api/v3/trades?symbol={symbol}&limit=1", timeout=5) as r:
            return json.loads(r.read())

    return int((await asyncio.to_thread(get))[-1]["id"])


async def stored_seqs(redis: Any, key: str) -> list[int]:
    """The ``seq`` of every tick in ``key``, in stream order; a gap marker fails the test."""
    ids = []
    for _, fields in await redis.xrange(key):
        tick = orjson.loads(fields[b"d"])
        assert not is_gap_marker(tick), f"gap marker in {key}: {tick}"
        ids.append(tick["seq"])
    return ids


async def complete(redis: Any, key: str, sim: Simulator, symbol: str, timeout: float = 30) -> list[int]:
    """Wait until ``key`` reaches the venue's newest trade (as its REST history says); return its ids, checked to
    be each id once, in order, with no hole and no gap marker."""
    target = await venue_last_trade(sim, symbol)

    async def caught_up() -> bool:
        try:
            top = await redis.xrevrange(key, count=1)
        except (RedisConnectionError, OSError):  # the first use of a pooled connection after a Redis restart
            return False
        return bool(top) and int(top[0][0].split(b"-")[1]) >= target

    await wait_for(caught_up, timeout, f"{key} reaches venue id {target}")
    ids = await stored_seqs(redis, key)
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"{key}: not every id exactly once in order"
    return ids
