"""The limits of this machine and this Redis, measured in the same run as the sweep, and the time above them.

:func:`measure_limits` times, on idle connections of their own, what no path through Redis can beat:

- ``ping``: a bare ``PING`` round trip;
- ``xadd``: one ``XADD`` of one tick-sized entry, round trip;
- ``xreadgroup``: one ``XREADGROUP ... COUNT 1`` that finds one entry, round trip;
- ``wake``: an entry appended by one connection until a second connection's blocked ``XREADGROUP`` has it
  (the floor of Redis acknowledged -> consumer: one append, one wake, one reply);
- ``consumer``: the same through the SDK's :class:`~consumer_sdk.consumer.Consumer` (XADD sent -> handler
  called), so the consumer's own read and ack cycle is its distance from ``wake``.

:func:`ops.bench.budget.stage_budget` (pure) sets a step's stages against them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from consumer_sdk.consumer import Consumer
from consumer_sdk.core.tick import Tick

__all__ = ["measure_limits", "percentiles"]

TICK: dict[str, Any] = {
    "v": 1, "venue": "binance", "symbol": "BTCUSDT", "channel": "trade", "seq": 0, "ts_event": 0, "ts_recv": 0,
    "trade_id": 0, "price": "27000.01000000", "qty": "0.01230000", "side": "buy",
}


def percentiles(samples_us: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 of ``samples_us`` (nearest rank), rounded to 0.1 µs; an empty list gives zeros."""
    s = sorted(samples_us)
    if not s:
        return {"p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0}

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))], 1)

    return {"p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99)}


def _entry(seq: int) -> dict[Any, Any]:
    now_us = time.time_ns() // 1000
    return {"d": orjson.dumps(TICK | {"seq": seq, "ts_event": now_us, "ts_recv": now_us, "trade_id": seq})}


async def _round_trips(client: aioredis.Redis, key: str, repeats: int) -> dict[str, dict[str, float]]:
    ping, xadd, xread = [], [], []
    await client.xgroup_create(key, "limits", id="$", mkstream=True)
    for seq in range(1, repeats + 1):
        t0 = time.perf_counter()
        await client.ping()
        t1 = time.perf_counter()
        await client.xadd(key, _entry(seq))
        t2 = time.perf_counter()
        await client.xreadgroup("limits", "r", {key: ">"}, count=1)
        t3 = time.perf_counter()
        ping.append((t1 - t0) * 1e6)
        xadd.append((t2 - t1) * 1e6)
        xread.append((t3 - t2) * 1e6)
    return {"ping": percentiles(ping), "xadd": percentiles(xadd), "xreadgroup": percentiles(xread)}


async def _wake(writer: aioredis.Redis, reader: aioredis.Redis, key: str, repeats: int) -> dict[str, float]:
    await writer.xgroup_create(key, "wake", id="$", mkstream=True)
    times: list[float] = []
    for seq in range(1, repeats + 1):
        async def blocked_read() -> Any:
            return await reader.xreadgroup("wake", "w", {key: ">"}, count=1, block=5000)

        read = asyncio.create_task(blocked_read())
        # the read must be waiting in Redis before the append: poll the group's consumer list for it
        for _ in range(1000):
            clients = await writer.client_list(_type="normal")
            if any("xreadgroup" in (c.get("cmd") or "") and "b" in (c.get("flags") or "") for c in clients):
                break
            await asyncio.sleep(0.0005)
        t0 = time.perf_counter()
        await writer.xadd(key, _entry(seq))
        await read
        times.append((time.perf_counter() - t0) * 1e6)
    return percentiles(times)


async def _through_consumer(redis_url: str, writer: aioredis.Redis, key: str, prefix: str,
                            repeats: int) -> dict[str, float]:
    times: list[float] = []
    got = asyncio.Event()
    sent = [0.0]

    def handler(_tick: Tick) -> None:
        times.append((time.perf_counter() - sent[0]) * 1e6)
        got.set()

    await writer.xgroup_create(key, "consumer", id="$", mkstream=True)
    consumer = Consumer(redis_url=redis_url, patterns=[key], prefix=prefix, group="consumer", consumer="c",
                        start_id="$", claim_idle_ms=None)
    task = asyncio.create_task(consumer.run(handler))
    try:
        for seq in range(1, repeats + 1):
            await asyncio.sleep(0.002)  # time for the consumer to ack and block again: as between venue bursts
            got.clear()
            sent[0] = time.perf_counter()
            await writer.xadd(key, _entry(seq))
            async with asyncio.timeout(10):
                await got.wait()
    finally:
        consumer.stop()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 10)
    return percentiles(times[1:] or times)


async def measure_limits(redis_url: str, *, repeats: int = 200) -> dict[str, Any]:
    """The limits described in the module doc, p50/p90/p99 in µs each, with the loop they ran on."""
    from consumer_sdk.core.loop import loop_name

    prefix = f"bench-l{uuid.uuid4().hex[:10]}"
    writer = aioredis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    reader = aioredis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    out: dict[str, Any] = {"repeats": repeats, "loop": loop_name()}
    try:
        out |= await _round_trips(writer, f"{prefix}:binance:BTCUSDT:trade", repeats)
        out["wake"] = await _wake(writer, reader, f"{prefix}:binance:ETHUSDT:trade", max(20, repeats // 4))
        out["consumer"] = await _through_consumer(redis_url, writer, f"{prefix}:binance:BNBUSDT:trade", prefix,
                                                  max(20, repeats // 2))
    finally:
        with contextlib.suppress(OSError, aioredis.RedisError):
            keys = [k async for k in writer.scan_iter(f"{prefix}:*", count=1000)]
            if keys:
                await writer.delete(*keys)
        await writer.aclose()
        await reader.aclose()
    return out
