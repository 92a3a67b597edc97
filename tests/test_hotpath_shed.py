"""The `shed` degrade level: a slow `block` subscriber stops holding the publisher back and is lapped like
`drop_oldest`, told exactly what it missed; when shedding ends it holds the publisher back again."""

from __future__ import annotations

import asyncio
from typing import Any

from consumer_sdk.tick import Tick
from distributor.hotpath import HotPath


def ticks(n: int, start: int = 1) -> list[Any]:
    return [
        {"v": 1, "venue": "binance", "symbol": "BTCUSDT", "channel": "trade", "seq": s, "ts_event": 1, "ts_recv": 1}
        for s in range(start, start + n)
    ]


async def test_shed_releases_the_publisher_and_counts_what_the_blocker_missed() -> None:
    hot = HotPath(capacity=1024)
    gate = asyncio.Event()
    got: list[int] = []

    async def slow(tick: Tick) -> None:
        await gate.wait()
        got.append(tick["seq"])

    sub = hot.subscribe(slow, ["binance:*:*"], policy="block", max_lag=64)
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        assert hot.publish(ticks(64))
        assert not hot.publish(ticks(100, start=65))  # the blocker is full: the publisher must wait
        waiting = asyncio.create_task(hot.wait_room())
        await asyncio.sleep(0)
        assert not waiting.done()
        hot.set_shed(True)
        async with asyncio.timeout(1):
            await waiting  # released at once
        assert hot.publish(ticks(300, start=165))  # and no longer held back
        gate.set()

        async def caught_up() -> bool:
            st = sub.stats()
            return st.delivered + st.dropped == 464

        async with asyncio.timeout(5):
            while not await caught_up():
                await asyncio.sleep(0.01)
        st = sub.stats()
        assert st.matched == 464 and st.dropped > 0 and st.delivered == len(got)
        assert got == sorted(got)  # order kept
        hot.set_shed(False)
        assert not hot.shed
        hot.close()
