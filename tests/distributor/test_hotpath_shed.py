"""The `shed` degrade level: a slow `block` subscriber stops holding the publisher back and is lapped like
`drop_oldest`, told exactly what it missed; when shedding ends it holds the publisher back again."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from consumer_sdk.core.tick import Tick
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
                await asyncio.sleep(0.01)  # poll
        st = sub.stats()
        assert st.matched == 464 and st.dropped > 0 and st.delivered == len(got)
        assert got == sorted(got)  # order kept
        hot.set_shed(False)
        assert not hot.shed
        hot.close()


async def test_shed_releases_the_publisher_from_a_thread_blocker_that_hangs() -> None:
    """The same with a synchronous blocker on a thread of its own, stuck in its handler: shedding releases the
    publisher at once, and what the blocker can no longer get is counted as dropped while it is still stuck."""
    hot = HotPath(capacity=1024)
    gate = threading.Event()
    got: list[int] = []

    def stuck(tick: Tick) -> None:
        gate.wait(20)
        got.append(tick["seq"])

    sub = hot.subscribe(stuck, ["binance:*:*"], policy="block", max_lag=64, execution="thread")
    try:
        async with asyncio.TaskGroup() as tg:
            hot.start(tg)
            assert hot.publish(ticks(10))
            async with asyncio.timeout(5):
                while sub.stats().delivered == 0:  # its first call has begun: it hangs there
                    await asyncio.sleep(0.001)  # poll
            published = 10
            while hot.publish(ticks(10, start=published + 1)):
                published += 10
                await asyncio.sleep(0)
            assert published <= 64 + 2 * 10  # held back by the blocker: its window and its hand-off
            waiting = asyncio.create_task(hot.wait_room())
            await asyncio.sleep(0)
            assert not waiting.done()
            hot.set_shed(True)
            async with asyncio.timeout(1):
                await waiting
            published += 10
            assert hot.publish(ticks(500, start=published + 1))
            published += 500
            st = sub.stats()
            assert st.dropped > 0 and st.matched == st.delivered + st.dropped + st.pending == published
            gate.set()
            async with asyncio.timeout(5):
                while sub.stats().pending or len(got) != sub.stats().delivered:
                    await asyncio.sleep(0.001)  # poll
            st = sub.stats()
            assert st.matched == published == st.delivered + st.dropped and got == sorted(got)
            assert got[-1] == published  # lapped like drop_oldest: it ends with the newest
            hot.close()
    finally:
        gate.set()
