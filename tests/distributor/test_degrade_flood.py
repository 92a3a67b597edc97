"""Under a flood that fills the ingress, `market ctl degrade conflate` drains it with no trade lost;
`market ctl degrade normal` restores the full flow.  Simulator, ingestor and Redis are real; the
switch is thrown with the `market ctl` command, as an operator would.

The flow is measured per trade, not per second: trades are never conflated, so the book tickers that
reach the strategy per trade delivered show what a level lets through, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from typing import Any

import orjson
import redis.asyncio as aioredis

from consumer_sdk.core.tick import Tick, is_gap_marker
from distributor.ingress import Policy
from ingestor.config import IngestSettings
from ingestor.service import Ingestor
from ops.simulator import Simulator, SimulatorConfig


async def ctl(redis_url: str, prefix: str, *args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "ctl", *args,
        env={**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def wait_for(predicate: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)  # poll


async def book_tickers_per_trade(seen: dict[str, int], trades: int) -> float:
    """Book tickers the strategy got per trade, over the next ``trades`` trades it gets."""
    book, trade = seen["book_ticker"], seen["trade"]
    await wait_for(lambda: seen["trade"] >= trade + trades, 30)
    return (seen["book_ticker"] - book) / (seen["trade"] - trade)


async def test_degrade_conflate_drains_a_flooded_ingress_without_losing_trades(
    redis_url: str, aredis: aioredis.Redis, prefix: str
) -> None:
    symbols = ("BTCUSDT", "ETHUSDT")
    async with Simulator(SimulatorConfig(symbols=symbols, rate=5000.0)) as sim:
        settings = IngestSettings(
            url=sim.ws_url, rest_url=sim.rest_url, symbols=symbols, channels=("trade", "book_ticker"),
            prefix=prefix, queue_policy=Policy.BLOCK, queue_capacity=3000,
        )
        ing = Ingestor(settings, redis=aredis)
        seen = {"book_ticker": 0, "trade": 0}

        async def strategy(tick: Tick) -> None:
            # A co-located strategy slower than the feed, allowed to hold the publisher back (block):
            # it takes about 1 ms per three ticks, so the ingress fills.
            seen[tick["channel"]] += 1
            if seen[tick["channel"]] % 3 == 0:
                await asyncio.sleep(0.001)  # slow handler

        ing.subscribe(strategy, ["binance:*:*"], policy="block", name="slow-strategy", max_lag=512)
        task = asyncio.create_task(ing.run())
        try:
            await wait_for(lambda: ing.ingress.stats().fill_ratio > 0.9, 30)  # flooded
            await ctl(redis_url, prefix, "degrade", "conflate", "--who", "test")
            await wait_for(lambda: ing.control.level.value == "conflate", 5)
            await wait_for(lambda: ing.ingress.stats().fill_ratio < 0.1, 20)  # drained
            conflated_ratio = await book_tickers_per_trade(seen, trades=500)
            assert ing.control.stats().conflated > 0
            await ctl(redis_url, prefix, "degrade", "normal", "--who", "test")
            await wait_for(lambda: ing.control.level.value == "normal", 5)
            await book_tickers_per_trade(seen, trades=200)  # what was taken in before the switch goes through
            full_ratio = await book_tickers_per_trade(seen, trades=500)
            assert full_ratio > 3 * conflated_ratio, (full_ratio, conflated_ratio)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for symbol in symbols:  # every trade of the run is stored, once, in order: none was conflated
            entries = await aredis.xrange(f"{prefix}:binance:{symbol}:trade")
            ids = [orjson.loads(f[b"d"])["seq"] for _, f in entries]
            assert not any(is_gap_marker(orjson.loads(f[b"d"])) for _, f in entries)
            assert ids == list(range(ids[0], ids[0] + len(ids)))
