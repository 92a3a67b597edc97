"""Co-located subscribers do not depend on Redis: while the ingestor's Redis is stopped, the hot path keeps
delivering every tick, in order, and what Redis could not take waits (memory, then the spill log) until it
is back.

A real simulator, a real ingestor, and a private redis-server that is stopped and started again.  Every wait
is on a condition (ticks delivered, ticks stored, the writer failing), bounded only to stop a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumer_sdk.core.tick import Tick, decode_tick
from ingestor.config import IngestSettings
from ingestor.service import Ingestor
from ops.redis_server import RedisServer, restart, start_redis
from ops.simulator import Simulator, SimulatorConfig

HANG = 60.0  # seconds: only a hang takes this long


async def until(condition: Callable[[], Any], what: str, timeout: float = HANG) -> None:
    """Poll ``condition`` (sync or async) until it holds; fail naming ``what`` after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = condition()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.01)  # poll
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with start_redis() as s:
        yield s


@contextlib.asynccontextmanager
async def running(ingestor: Ingestor) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(ingestor.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_hot_path_keeps_delivering_while_redis_is_down(server: RedisServer, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    key = f"{prefix}:binance:BTCUSDT:trade"
    client = aioredis.Redis.from_url(server.url, socket_timeout=1.0, socket_connect_timeout=0.5)
    seen: list[int] = []

    def strategy(tick: Tick) -> None:
        seen.append(tick["seq"])

    async def stored() -> list[int]:
        return [decode_tick(fields[b"d"])["seq"] for _, fields in await client.xrange(key)]

    try:
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=2000.0, seed=9)) as sim:
            settings = IngestSettings(
                url=sim.ws_url, rest_url=sim.rest_url, symbols=("BTCUSDT",), channels=("trade",), prefix=prefix,
                writer_capacity=200, spill_dir=str(tmp_path / "spill"),
            )
            ingestor = Ingestor(settings, redis=client)
            ingestor.subscribe(strategy, ["binance:BTCUSDT:trade"], name="strategy")
            async with running(ingestor) as task:
                await until(lambda: client.xlen(key), "the first trades stored")
                writer = ingestor.writer
                assert writer is not None

                await asyncio.to_thread(server.stop)
                await until(lambda: writer.stats().failing != "", "the writer meeting the stopped Redis")
                down_from = len(seen)
                # Ten times the writer's memory: what Redis cannot take goes to the spill log meanwhile.
                await until(lambda: len(seen) >= down_from + 2000, "2000 trades delivered while Redis is down")
                assert not task.done()
                stats = writer.stats()
                assert stats.failing != "" and not stats.connected, "Redis was down all along"
                assert stats.spilled > 0, "what memory could not hold went to the spill log"
                during = seen[down_from:]
                assert during == list(range(during[0], during[0] + len(during))), "every trade, once, in order"

                await asyncio.to_thread(restart, server)  # empty: no persistence
                last = seen[-1]
                await until(lambda: writer.stats().failing == "", "the writer storing again")
                await until(lambda: writer.stats().spilled == 0, "the spill log drained")

                async def holds_last() -> bool:
                    ids = await stored()
                    return bool(ids) and ids[-1] >= last

                await until(holds_last, "the trades delivered during the outage stored")
            ids = await stored()
            assert set(during) <= set(ids), "nothing the subscriber saw during the outage was lost to Redis"
            assert ids == list(range(ids[0], ids[0] + len(ids))), "stored once each, in order, with no hole"
    finally:
        await client.aclose()
