"""Channels held at the venue follow what co-located subscribers want: released when idle, restored on demand."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import redis.asyncio as aioredis

from consumer_sdk.core.tick import Tick
from distributor.ingress import Policy
from ingestor.config import IngestSettings
from ingestor.service import Ingestor
from ingestor.session import SessionSettings
from ops.simulator import Simulator, SimulatorConfig


async def wait_for(predicate: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)  # poll


async def test_idle_channel_is_released_after_grace_and_restored(aredis: aioredis.Redis, prefix: str) -> None:
    async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=600.0)) as sim:
        settings = IngestSettings(
            url=sim.ws_url, rest_url=sim.rest_url, symbols=("BTCUSDT",), channels=("trade", "book_ticker"),
            prefix=prefix, queue_policy=Policy.BLOCK, on_demand=("binance:*:book_ticker",), release_grace_s=1.0,
            session=dataclasses.replace(SessionSettings(), ping_interval=1.0),
        )
        ing = Ingestor(settings, redis=aredis)
        got: list[Tick] = []
        task = asyncio.create_task(ing.run())
        try:
            await asyncio.wait_for(ing.started.wait(), 10)
            held = lambda: {s for x in ing.sessions for s in x.streams}  # noqa: E731
            # Only the persisting stream is held; the on-demand one waits for a subscriber.
            assert held() == {"btcusdt@trade"}
            sub = ing.subscribe(got.append, ["binance:ETHUSDT:trade", "binance:BTCUSDT:book_ticker"])
            await wait_for(lambda: {"ethusdt@trade", "btcusdt@bookTicker"} <= held(), 5)
            await wait_for(lambda: {t["symbol"] for t in got} == {"ETHUSDT", "BTCUSDT"}, 10)
            assert {(t["symbol"], t["channel"]) for t in got} == {("ETHUSDT", "trade"), ("BTCUSDT", "book_ticker")}
            assert ing.sequencer.last_seq("binance", "ETHUSDT", "trade") is not None

            ing.unsubscribe(sub)
            await wait_for(lambda: held() == {"btcusdt@trade"}, 5)  # after the 1 s grace period
            # Its state is freed once the venue confirmed (frames in flight until then may still arrive).
            await wait_for(lambda: ing.sequencer.last_seq("binance", "ETHUSDT", "trade") is None, 5)
            n = len(got)

            again: list[Tick] = []
            ing.subscribe(again.append, ["binance:ETHUSDT:trade"])
            await wait_for(lambda: "ethusdt@trade" in held(), 5)
            await wait_for(lambda: len(again) >= 5, 10)
            assert len(got) == n  # the first subscriber is gone for good
            assert all(t["symbol"] == "ETHUSDT" for t in again)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
