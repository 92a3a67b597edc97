"""distributor.ingress: the bounded queue and its full-queue policies."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from consumer_sdk.core.errors import ConfigError
from distributor.ingress import IngressQueue, IngressStats, Policy

UNIT = 1.0  # seconds: the bound on every wait below; nothing here should come near it


async def until(condition: Callable[[], bool], timeout: float = UNIT) -> None:
    """Let other tasks run until ``condition()`` holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


async def settle(rounds: int = 20) -> None:
    """Give every ready task a number of turns (used only to show that nothing more happens)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ConfigError):
        IngressQueue(capacity)


@pytest.mark.parametrize("policy", ["drop_random", "", "DROP_OLDEST", "blocking"])
def test_unknown_policy(policy: str) -> None:
    with pytest.raises(ConfigError, match="drop_newest"):
        IngressQueue(4, policy)


@pytest.mark.parametrize("text", ["drop_newest", "drop_oldest", "block"])
def test_policy_by_name(text: str) -> None:
    q: IngressQueue[int] = IngressQueue(4, text)
    assert q.policy is Policy(text)
    assert Policy.parse(text) is Policy(text)


def test_default_policy_is_drop_oldest() -> None:
    assert IngressQueue[int](4).policy is Policy.DROP_OLDEST


# -- drop policies under a flood ---------------------------------------------------------------------------------

CAPACITY = 10
FLOOD = 1000


def test_drop_newest_keeps_the_first() -> None:
    q: IngressQueue[int] = IngressQueue(CAPACITY, Policy.DROP_NEWEST)
    assert all(q.offer(i) for i in range(FLOOD))
    assert len(q) == CAPACITY
    assert (q.offered, q.dropped) == (FLOOD, FLOOD - CAPACITY)
    assert list(q.take(FLOOD)) == list(range(CAPACITY))
    assert len(q) == 0


def test_drop_oldest_keeps_the_newest_in_order() -> None:
    q: IngressQueue[int] = IngressQueue(CAPACITY, Policy.DROP_OLDEST)
    assert all(q.offer(i) for i in range(FLOOD))
    assert len(q) == CAPACITY
    assert (q.offered, q.dropped) == (FLOOD, FLOOD - CAPACITY)
    assert list(q.take(FLOOD)) == list(range(FLOOD - CAPACITY, FLOOD))


@pytest.mark.parametrize("policy", [Policy.DROP_NEWEST, Policy.DROP_OLDEST])
async def test_drop_policies_put_never_waits(policy: Policy) -> None:
    q: IngressQueue[int] = IngressQueue(CAPACITY, policy)
    async with asyncio.timeout(UNIT):
        for i in range(FLOOD):
            await q.put(i)
    assert (len(q), q.offered, q.dropped) == (CAPACITY, FLOOD, FLOOD - CAPACITY)


def test_block_offer_refuses_when_full_and_keeps_nothing() -> None:
    q: IngressQueue[int] = IngressQueue(CAPACITY, Policy.BLOCK)
    results = [q.offer(i) for i in range(FLOOD)]
    assert results == [True] * CAPACITY + [False] * (FLOOD - CAPACITY)
    assert (len(q), q.offered, q.dropped) == (CAPACITY, CAPACITY, 0)
    assert list(q.take(FLOOD)) == list(range(CAPACITY))


def test_take_in_arrival_order_bounded_by_max_items() -> None:
    q: IngressQueue[int] = IngressQueue(CAPACITY, Policy.DROP_NEWEST)
    for i in range(7):
        q.offer(i)
    assert list(q.take(3)) == [0, 1, 2]
    assert list(q.take(3)) == [3, 4, 5]
    assert list(q.take(3)) == [6]
    assert list(q.take(3)) == []
    q.offer(7)
    assert list(q.take(3)) == [7]  # the queue works after it was swapped out whole


# -- block ---------------------------------------------------------------------------------------------------------


async def test_block_producer_progresses_exactly_when_the_consumer_takes() -> None:
    capacity, total = 3, 12
    q: IngressQueue[int] = IngressQueue(capacity, Policy.BLOCK)
    attempted = -1  # the item the producer is putting
    done = 0  # how many puts returned

    async def produce() -> None:
        nonlocal attempted, done
        for i in range(total):
            attempted = i
            await q.put(i)
            done += 1

    def done_reaches(n: int) -> Callable[[], bool]:
        return lambda: done == n

    received: list[int] = []
    async with asyncio.TaskGroup() as tg:
        producer = tg.create_task(produce())
        # The producer fills the queue, then waits inside put() on the next item.
        await until(lambda: attempted == capacity)
        await settle()
        assert (done, len(q), q.offered, q.dropped) == (capacity, capacity, capacity, 0)
        assert not producer.done()
        for step in range(1, total - capacity + 1):
            received.extend(q.take(1))
            # One slot freed: exactly one more put completes, then the producer waits again.
            await until(done_reaches(capacity + step))
            await settle()
            assert done == capacity + step
            assert len(q) == capacity
            assert q.dropped == 0
        await until(producer.done)
        received.extend(q.take(total))
    assert received == list(range(total))
    assert (q.offered, q.dropped) == (total, 0)


async def test_block_several_producers_lose_nothing() -> None:
    q: IngressQueue[tuple[int, int]] = IngressQueue(2, Policy.BLOCK)
    producers, each = 4, 25

    async def produce(p: int) -> None:
        for i in range(each):
            await q.put((p, i))

    received: list[tuple[int, int]] = []
    async with asyncio.timeout(UNIT), asyncio.TaskGroup() as tg:
        for p in range(producers):
            tg.create_task(produce(p))
        while len(received) < producers * each:
            received.extend(await q.get_batch(3))
    assert len(received) == producers * each
    for p in range(producers):
        assert [i for who, i in received if who == p] == list(range(each))  # each producer's order kept
    assert (q.offered, q.dropped, len(q)) == (producers * each, 0, 0)


# -- get_batch -------------------------------------------------------------------------------------------------------


async def test_get_batch_wakes_on_first_put() -> None:
    q: IngressQueue[str] = IngressQueue(CAPACITY, Policy.DROP_OLDEST)
    async with asyncio.TaskGroup() as tg:
        getter = tg.create_task(q.get_batch(100))
        await settle()
        assert not getter.done()  # nothing queued: it waits
        q.offer("first")
        async with asyncio.timeout(UNIT):
            batch = await getter
    assert list(batch) == ["first"]
    assert len(q) == 0


async def test_get_batch_wakes_on_awaited_put() -> None:
    q: IngressQueue[str] = IngressQueue(CAPACITY, Policy.BLOCK)
    async with asyncio.TaskGroup() as tg:
        getter = tg.create_task(q.get_batch(100))
        await settle()
        assert not getter.done()
        await q.put("x")
        async with asyncio.timeout(UNIT):
            assert list(await getter) == ["x"]


async def test_get_batch_returns_at_once_when_items_wait() -> None:
    q: IngressQueue[int] = IngressQueue(CAPACITY, Policy.DROP_OLDEST)
    for i in range(5):
        q.offer(i)
    async with asyncio.timeout(UNIT):
        assert list(await q.get_batch(2)) == [0, 1]
        assert list(await q.get_batch(10)) == [2, 3, 4]
    async with asyncio.TaskGroup() as tg:
        getter = tg.create_task(q.get_batch(10))
        await settle()
        assert not getter.done()  # drained: the next call waits again
        q.offer(5)
    assert list(getter.result()) == [5]


# -- backpressure events and stats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [Policy.DROP_NEWEST, Policy.DROP_OLDEST, Policy.BLOCK])
def test_backpressure_events_count_turns_to_full(policy: Policy) -> None:
    q: IngressQueue[int] = IngressQueue(3, policy)
    for i in range(10):  # full once, however many offers meet it full
        q.offer(i)
    assert q.backpressure_events == 1
    q.take(1)  # room again
    for i in range(10):
        q.offer(i)
    assert q.backpressure_events == 2
    q.take(100)
    for i in range(10):
        q.offer(i)
    assert q.backpressure_events == 3


async def test_backpressure_event_for_a_blocked_put() -> None:
    q: IngressQueue[int] = IngressQueue(1, Policy.BLOCK)
    await q.put(0)
    assert q.backpressure_events == 0
    async with asyncio.TaskGroup() as tg:
        putter = tg.create_task(q.put(1))
        await settle()
        assert not putter.done()
        assert q.backpressure_events == 1
        q.take(1)
    assert list(q.take(1)) == [1]
    assert q.backpressure_events == 1


def test_stats_snapshot() -> None:
    q: IngressQueue[int] = IngressQueue(4, Policy.DROP_NEWEST)
    for i in range(6):
        q.offer(i)
    stats = q.stats()
    assert stats == IngressStats(length=4, capacity=4, policy=Policy.DROP_NEWEST, offered=6, dropped=2,
                                 backpressure_events=1)
    assert stats.fill_ratio == 1.0
    q.take(1)
    assert q.stats().fill_ratio == 0.75
    assert stats.length == 4  # a snapshot, not a view
