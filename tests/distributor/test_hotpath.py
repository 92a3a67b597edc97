"""distributor.hotpath: ring fan-out to co-located subscribers, policies and exact accounting."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import random
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import Pattern
from consumer_sdk.core.tick import Tick
from distributor import hotpath as hotpath_module
from distributor.hotpath import HotPath, HotPathStats, SubscriberPolicy, Subscription, SubscriptionStats
from ops.bench.hotpath import main as bench_main
from ops.bench.hotpath import run_hotpath_bench

UNIT = 2.0  # seconds: the bound on every wait below; nothing here should come near it
CHANNELS = ("trade", "agg_trade", "book_ticker")


def tick(symbol: str, channel: str = "trade", seq: int = 0, venue: str = "sim") -> Tick:
    return {"v": 1, "venue": venue, "symbol": symbol, "channel": channel, "seq": seq, "ts_event": 0, "ts_recv": 0}


def key(t: Tick) -> str:
    return f"{t['venue']}:{t['symbol']}:{t['channel']}"


class Flood:
    """Ticks over a set of streams, seq contiguous per stream, stream order random (seeded)."""

    def __init__(self, streams: Sequence[tuple[str, str]], seed: int = 0, venue: str = "sim") -> None:
        self.streams = list(streams)
        self.venue = venue
        self.rng = random.Random(seed)
        self.seq: dict[tuple[str, str], int] = {}
        self.sent: list[Tick] = []

    def batch(self, n: int) -> list[Tick]:
        out = []
        for _ in range(n):
            s = self.rng.choice(self.streams)
            self.seq[s] = self.seq.get(s, 0) + 1
            out.append(tick(s[0], s[1], self.seq[s], self.venue))
        self.sent += out
        return out

    def matching(self, patterns: Iterable[str], since: int = 0) -> list[Tick]:
        """What a subscriber on ``patterns`` should see of everything sent from index ``since`` (fnmatch)."""
        pats = [Pattern(p).text for p in patterns]
        return [t for t in self.sent[since:] if any(fnmatch.fnmatchcase(key(t), p) for p in pats)]


def grid(symbols: int = 50) -> list[tuple[str, str]]:
    return [(f"S{i:03d}", ch) for i in range(symbols) for ch in CHANNELS]


class Recorder:
    """A handler that records what it gets (sync, or async with ``awaits`` yields per tick)."""

    def __init__(self) -> None:
        self.got: list[Tick] = []

    def __call__(self, t: Tick) -> None:
        self.got.append(t)

    def assert_ordered(self) -> None:
        last: dict[str, int] = {}
        for t in self.got:
            k = key(t)
            assert t["seq"] > last.get(k, 0), f"{k}: seq {t['seq']} after {last.get(k)}"
            last[k] = t["seq"]


class AsyncRecorder(Recorder):
    def __init__(self, awaits: int = 0, gate: asyncio.Event | None = None) -> None:
        super().__init__()
        self.awaits = awaits
        self.gate = gate

    async def __call__(self, t: Tick) -> None:  # type: ignore[override]
        if self.gate is not None:
            await self.gate.wait()
        for _ in range(self.awaits):
            await asyncio.sleep(0)
        self.got.append(t)


class Drops:
    def __init__(self) -> None:
        self.counts: list[int] = []

    def __call__(self, n: int) -> None:
        self.counts.append(n)


async def until(condition: Callable[[], bool], timeout: float = UNIT) -> None:
    """Let other tasks run until ``condition()`` holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


async def settle(rounds: int = 50) -> None:
    """Give every ready task a number of turns (used only to show that nothing more happens)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def settled(*subs: Subscription) -> Callable[[], bool]:
    """Everything published was handed to these subscribers (or dropped), and every call has returned."""

    def check() -> bool:
        for s in subs:
            st = s.stats()
            if st.pending or st.lag:
                return False
            if isinstance(s.handler, Recorder) and len(s.handler.got) != st.delivered:
                return False  # an async call still in progress
        return True

    return check


@asynccontextmanager
async def running(hot: HotPath) -> AsyncIterator[asyncio.TaskGroup]:
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        try:
            yield tg
        finally:
            hot.close()


def assert_accounted(st: SubscriptionStats, expected_matched: int | None = None) -> None:
    assert st.matched == st.delivered + st.dropped + st.pending
    if expected_matched is not None:
        assert st.matched == expected_matched


# -- configuration ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, 1, 3, 100, -8])
def test_capacity_must_be_a_power_of_two(capacity: int) -> None:
    with pytest.raises(ConfigError, match="power of two"):
        HotPath(capacity=capacity)


def test_policy_names() -> None:
    assert [p.value for p in SubscriberPolicy] == ["drop_oldest", "drop_newest", "block", "disconnect"]
    for p in SubscriberPolicy:
        assert SubscriberPolicy.parse(p.value) is p
        assert SubscriberPolicy.parse(p) is p


@pytest.mark.parametrize("policy", ["drop_random", "", "DROP_OLDEST", "blocking"])
def test_unknown_policy_at_registration(policy: str) -> None:
    hot = HotPath()
    with pytest.raises(ConfigError, match="drop_oldest, drop_newest, block, disconnect"):
        hot.subscribe(Recorder(), "sim:*:trade", policy=policy)
    assert hot.subscriber_count == 0


@pytest.mark.parametrize(
    "patterns", ["sim:BTCUSDT", "a:b:c:d", "", "sim::trade", "sim:BTC USDT:trade", [], ["sim:*:*", "bad"]]
)
def test_invalid_patterns_at_registration(patterns: Any) -> None:
    hot = HotPath()
    with pytest.raises(ConfigError):
        hot.subscribe(Recorder(), patterns)
    assert hot.subscriber_count == 0


def test_other_bad_arguments() -> None:
    hot = HotPath(capacity=64)
    with pytest.raises(ConfigError, match="max_lag"):
        hot.subscribe(Recorder(), "sim:*:*", max_lag=0)
    with pytest.raises(ConfigError, match="max_lag"):
        hot.subscribe(Recorder(), "sim:*:*", max_lag=33)
    with pytest.raises(ConfigError, match="max_consecutive_failures"):
        hot.subscribe(Recorder(), "sim:*:*", max_consecutive_failures=0)
    with pytest.raises(ConfigError, match="callable"):
        hot.subscribe("not a function", "sim:*:*")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pattern"):
        hot.subscribe(Recorder(), [42])  # type: ignore[list-item]
    assert hot.subscriber_count == 0
    sub = hot.subscribe(Recorder(), "sim:*:*", max_lag=32)
    assert sub.max_lag == 32 and sub.policy is SubscriberPolicy.DROP_OLDEST
    assert HotPath(capacity=64).subscribe(Recorder(), "sim:*:*").max_lag == 16  # capacity / 4
    small = HotPath(capacity=64, max_subscribers=2)
    small.subscribe(Recorder(), "sim:*:*")
    small.subscribe(Recorder(), "sim:*:*")
    with pytest.raises(ConfigError, match="maximum of 2 subscribers"):
        small.subscribe(Recorder(), "sim:*:*")


async def test_declared_streams_are_routed_before_their_first_tick() -> None:
    hot = HotPath(capacity=64)
    rec = Recorder()
    sub = hot.subscribe(rec, "sim:*:trade")
    hot.declare(["sim:a:trade", "sim:B:book_ticker"])
    assert hot.stats().streams == 2 and sub._match == [1, 0]
    async with running(hot):
        await settle()
        assert hot.publish([tick("A", seq=1), tick("B", "book_ticker", seq=1)])
        await until(settled(sub))
        assert [key(t) for t in rec.got] == ["sim:A:trade"]
        assert hot.stats().streams == 2
    with pytest.raises(ConfigError):
        hot.declare(["sim:*:trade"])


def test_stream_table_is_bounded() -> None:
    hot = HotPath(capacity=64, max_streams=2)
    assert hot.publish([tick("A"), tick("B")])
    with pytest.raises(ConfigError, match="more than 2 distinct streams"):
        hot.publish([tick("A", seq=2), tick("C")])
    assert hot.published == 2  # the batch was refused whole


def test_public_names() -> None:
    assert set(hotpath_module.__all__) == {
        "DEFAULT_CAPACITY", "DEFAULT_HANDLER_BUDGET_US", "DEFAULT_MAX_CHUNK", "DEFAULT_MAX_STREAMS",
        "DEFAULT_MAX_SUBSCRIBERS", "HANDOFF_CHUNKS", "HOT_SAMPLE_EVERY", "MIN_OVERRUN_US", "OFFLOAD_AFTER",
        "OFFLOAD_WINDOW", "PROBATION_CHUNK", "Execution", "Handler", "offload_due", "overran",
        "probation_chunk", "HotPath", "HotPathSnapshot", "HotPathStats", "SubscriberPolicy", "Subscription",
        "SubscriptionStats",
    }


# -- delivery and routing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_delivers_in_order_sync_and_async(kind: str) -> None:
    hot = HotPath(capacity=1024)
    rec = Recorder() if kind == "sync" else AsyncRecorder(awaits=1)
    flood = Flood(grid(3))
    async with running(hot):
        sub = hot.subscribe(rec, "sim:*:*", max_lag=512)
        for _ in range(20):
            assert hot.publish(flood.batch(17))
            await asyncio.sleep(0)
        await until(settled(sub))
        assert rec.got == flood.sent
        st = sub.stats()
        assert (st.matched, st.delivered, st.dropped, st.pending, st.errors) == (340, 340, 0, 0, 0)
    assert hot.latency.count == 340


async def test_crosstalk_each_gets_exactly_its_own() -> None:
    """50 symbols x 3 channels, subscribers on literal and glob patterns, sync and async."""
    hot = HotPath()
    flood = Flood(grid(50), seed=7)
    spec: list[list[str]] = [
        ["sim:S007:trade"],
        ["sim:s007:trade"],  # symbols are upper-cased: same stream as above
        ["sim:*:trade"],
        ["sim:S00*:*"],
        ["sim:*:book_ticker", "sim:S049:agg_trade"],
        ["sim:S01?:agg_*"],
        ["sim:S0[12]3:*"],
        ["*:*:*"],
        ["sim:*:kline_*"],  # nothing published matches
        ["other:*:*"],  # another venue
    ]
    recs: list[Recorder] = []
    subs: list[Subscription] = []
    async with running(hot):
        for i, pats in enumerate(spec):
            rec = Recorder() if i % 2 else AsyncRecorder(awaits=i % 3)
            recs.append(rec)
            subs.append(hot.subscribe(rec, pats))
        for _ in range(30):
            assert hot.publish(flood.batch(200))
            await asyncio.sleep(0)
        # a late subscriber gets only what is published after it subscribed
        late = Recorder()
        late_sub = hot.subscribe(late, "sim:*:trade")
        mark = len(flood.sent)
        for _ in range(5):
            assert hot.publish(flood.batch(200))
        await until(settled(*subs, late_sub))
        for rec, sub, pats in zip(recs, subs, spec, strict=True):
            expected = flood.matching(pats)
            assert rec.got == expected, pats
            rec.assert_ordered()
            assert_accounted(sub.stats(), len(expected))
            assert sub.stats().dropped == 0
        assert late.got == flood.matching(["sim:*:trade"], since=mark)
        assert recs[0].got and recs[0].got == recs[1].got
        assert recs[8].got == [] and recs[9].got == []
        assert hot.stats().streams == 150


async def test_sleeping_subscriber_is_not_woken_for_other_streams() -> None:
    hot = HotPath(capacity=64)
    rec = Recorder()
    async with running(hot):
        sub = hot.subscribe(rec, "sim:A:trade", max_lag=8, policy="disconnect")
        await settle()
        for i in range(100):  # far more than capacity and max_lag, none of it for the subscriber
            assert hot.publish([tick("B", seq=i)])
        assert sub.stats().lag == 0 and sub.removed is None
        assert hot.publish([tick("A", seq=1)])
        await until(lambda: len(rec.got) == 1)
        assert_accounted(sub.stats(), 1)


# -- drop_oldest -----------------------------------------------------------------------------------------------


async def test_drop_oldest_keeps_the_newest_and_counts_exactly() -> None:
    hot = HotPath(capacity=256)
    flood = Flood([("A", "trade"), ("B", "trade"), ("C", "trade"), ("A", "book_ticker"), ("D", "trade")], seed=3)
    rec, drops = Recorder(), Drops()
    pats = ["sim:A:*", "sim:B:trade", "sim:C:trade"]
    sub = hot.subscribe(rec, pats, max_lag=32, on_drop=drops)
    for _ in range(100):  # 1000 ticks while the subscriber's task is not running yet
        assert hot.publish(flood.batch(10))
    async with running(hot):
        await until(settled(sub))
        newest = flood.sent[-32:]
        expected = [t for t in newest if any(fnmatch.fnmatchcase(key(t), p) for p in pats)]
        assert rec.got == expected
        st = sub.stats()
        matched = len(flood.matching(pats))
        assert_accounted(st, matched)
        assert st.dropped == matched - len(expected) > 0
        assert drops.counts == [st.dropped] and st.drop_events == 1
        # it carries on normally afterwards
        assert hot.publish(flood.batch(10))
        await until(settled(sub))
        assert rec.got == expected + flood.matching(pats, since=1000)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_drop_oldest_under_a_flood_accounts_for_every_tick(kind: str) -> None:
    hot = HotPath(capacity=128)
    flood = Flood(grid(4), seed=11)
    slow_drops = Drops()
    slow = AsyncRecorder(awaits=6)
    fast = Recorder() if kind == "sync" else AsyncRecorder()
    async with running(hot):
        s_slow = hot.subscribe(slow, "*:*:*", max_lag=24, on_drop=slow_drops)
        s_fast = hot.subscribe(fast, "*:*:*", max_lag=64)
        s_some = hot.subscribe(Recorder(), "sim:S001:*", max_lag=24)
        for i in range(300):
            assert hot.publish(flood.batch(1 + i % 7))  # the publisher never waits for anyone
            await asyncio.sleep(0)
        published = len(flood.sent)
        await until(settled(s_slow, s_fast, s_some))
        assert fast.got == flood.sent  # the fast one is not held back by the slow one
        st = s_slow.stats()
        assert_accounted(st, published)
        assert st.pending == 0 and st.dropped > 0 and st.delivered > 0
        assert sum(slow_drops.counts) == st.dropped and len(slow_drops.counts) == st.drop_events
        slow.assert_ordered()
        assert set(map(id, slow.got)) <= set(map(id, flood.sent))
        total = sum(s.stats().delivered + s.stats().dropped for s in (s_slow, s_fast))
        assert total == published * 2
        assert_accounted(s_some.stats(), len(flood.matching(["sim:S001:*"])))


# -- drop_newest -----------------------------------------------------------------------------------------------


async def test_drop_newest_keeps_what_it_had_and_counts_what_it_lost() -> None:
    hot = HotPath(capacity=256)
    flood = Flood([("A", "trade"), ("B", "trade"), ("C", "trade")], seed=5)
    rec, drops = Recorder(), Drops()
    pats = ["sim:A:trade", "sim:B:trade"]
    sub = hot.subscribe(rec, pats, policy="drop_newest", max_lag=32, on_drop=drops)
    for _ in range(100):  # 1000 ticks; the subscriber's task is not running yet
        assert hot.publish(flood.batch(10))
    oldest = flood.sent[:32]
    kept = [t for t in oldest if any(fnmatch.fnmatchcase(key(t), p) for p in pats)]
    async with running(hot):
        await until(settled(sub))
        assert rec.got == kept
        st = sub.stats()
        matched = len(flood.matching(pats))
        assert_accounted(st, matched)
        assert st.dropped == matched - len(kept) > 0
        assert drops.counts == [st.dropped]
        assert hot.publish(flood.batch(10))
        await until(settled(sub))
        assert rec.got == kept + flood.matching(pats, since=1000)
        rec.assert_ordered()


async def test_drop_newest_under_a_flood_accounts_for_every_tick() -> None:
    hot = HotPath(capacity=128)
    flood = Flood(grid(3), seed=13)
    slow, drops = AsyncRecorder(awaits=5), Drops()
    async with running(hot):
        sub = hot.subscribe(slow, "*:*:*", policy="drop_newest", max_lag=20, on_drop=drops)
        for i in range(300):
            assert hot.publish(flood.batch(1 + i % 5))
            await asyncio.sleep(0)
        await until(settled(sub))
        st = sub.stats()
        assert_accounted(st, len(flood.sent))
        assert st.pending == 0 and st.dropped > 0 and sum(drops.counts) == st.dropped
        slow.assert_ordered()


# -- block -----------------------------------------------------------------------------------------------------


async def test_block_makes_the_publisher_wait_and_drops_nothing() -> None:
    hot = HotPath(capacity=64)
    gate = asyncio.Event()
    blocked = AsyncRecorder(gate=gate)
    fast = Recorder()
    flood = Flood(grid(2), seed=17)
    batches = [flood.batch(8) for _ in range(25)]
    published_batches = 0
    waits = 0

    async def producer() -> None:
        nonlocal published_batches, waits
        for b in batches:
            if not hot.publish(b):
                waits += 1
                await hot.wait_room()
            published_batches += 1

    async with running(hot) as tg:
        s_block = hot.subscribe(blocked, "*:*:*", policy="block", max_lag=16)
        s_fast = hot.subscribe(fast, "*:*:*")
        await settle()
        task = tg.create_task(producer())
        await until(lambda: hot.stats().waiting_room)
        await settle()
        assert not task.done() and hot.stats().waiting_room and waits >= 1
        # the publisher is held at max_lag past what the blocked subscriber has taken
        assert hot.published <= s_block.cursor + 16 and s_block.stats().lag <= 16
        with pytest.raises(RuntimeError, match="wait_room"):
            hot.publish([tick("X")])
        assert blocked.got == []
        gate.set()
        await until(task.done)
        await until(settled(s_block, s_fast))
        assert blocked.got == flood.sent == fast.got
        st = s_block.stats()
        assert (st.delivered, st.dropped, st.pending) == (200, 0, 0)
        assert hot.stats().blocked == waits >= 1
        assert hot.stats().dropped == 0


async def test_removing_the_blocking_subscriber_releases_the_publisher() -> None:
    hot = HotPath(capacity=64)
    gate = asyncio.Event()
    flood = Flood(grid(1))
    async with running(hot):
        sub = hot.subscribe(AsyncRecorder(gate=gate), "*:*:*", policy="block", max_lag=16)
        await settle()
        assert not hot.publish(flood.batch(40))
        waiter = asyncio.ensure_future(hot.wait_room())
        await settle()
        assert not waiter.done()
        sub.close()
        await asyncio.wait_for(waiter, UNIT)
        assert hot.published == 40
        st = sub.stats()
        assert st.removed == "unsubscribed" and st.matched == st.delivered + st.dropped
        gate.set()


# -- disconnect ------------------------------------------------------------------------------------------------


async def test_disconnect_removes_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    hot = HotPath(capacity=64)
    gate = asyncio.Event()
    lagging = AsyncRecorder(gate=gate)
    fast = Recorder()
    flood = Flood(grid(2), seed=19)
    with caplog.at_level(logging.WARNING, logger="market.hotpath"):
        async with running(hot):
            sub = hot.subscribe(lagging, "*:*:*", policy="disconnect", max_lag=16)
            other = hot.subscribe(fast, "*:*:*")
            await settle()
            for _ in range(10):
                assert hot.publish(flood.batch(4))
                await asyncio.sleep(0)
            assert sub.removed is not None and "max_lag of 16" in sub.removed and "disconnect" in sub.removed
            assert hot.subscriber_count == 1
            gate.set()  # its handler finishes the tick it was on; nothing more is delivered
            await until(settled(other))
            await settle()
            st = sub.stats()
            assert st.removed == sub.removed and st.pending == 0 and st.lag == 0
            assert st.matched == st.delivered + st.dropped and st.delivered <= 1
            assert fast.got == flood.sent
            hs = hot.stats()
            assert hs.disconnected == 1 and hs.removed == 1
            assert hs.dropped_by_policy["disconnect"] == st.dropped
    assert any(r.getMessage() == "subscriber_removed" for r in caplog.records)


# -- failing handlers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_raising_handler_is_counted_logged_and_goes_on(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    hot = HotPath(capacity=256)
    got: list[int] = []

    def work(t: Tick) -> None:
        got.append(t["seq"])
        if t["seq"] % 2:
            raise ValueError(f"bad {t['seq']}")

    async def awork(t: Tick) -> None:
        work(t)

    with caplog.at_level(logging.ERROR, logger="market.hotpath"):
        async with running(hot):
            sub = hot.subscribe(work if kind == "sync" else awork, "sim:*:*", max_consecutive_failures=2, max_lag=128)
            assert hot.publish([tick("A", seq=i) for i in range(1, 101)])
            await until(settled(sub))
            st = sub.stats()
            assert got == list(range(1, 101))
            assert (st.delivered, st.errors, st.removed) == (100, 50, None)  # never two in a row
    failures = [r for r in caplog.records if r.getMessage() == "subscriber_handler_failed"]
    assert 1 <= len(failures) <= 2  # rate-limited: one line a second
    fields = failures[0].fields  # type: ignore[attr-defined]
    assert fields["key"] == "sim:A:trade" and fields["seq"] == 1 and "bad 1" in fields["error"]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_removed_after_n_consecutive_failures_others_unaffected(kind: str) -> None:
    hot = HotPath(capacity=256)
    calls: list[int] = []

    def broken(t: Tick) -> None:
        calls.append(t["seq"])
        raise RuntimeError("always")

    async def abroken(t: Tick) -> None:
        broken(t)

    healthy = Recorder()
    async with running(hot):
        bad = hot.subscribe(broken if kind == "sync" else abroken, "sim:*:*", max_consecutive_failures=3)
        good = hot.subscribe(healthy, "sim:*:*")
        assert hot.publish([tick("A", seq=i) for i in range(1, 51)])
        await until(settled(good))
        await until(lambda: bad.removed is not None)
        assert calls == [1, 2, 3]
        assert bad.removed is not None and "3 consecutive handler failures" in bad.removed
        st = bad.stats()
        assert (st.delivered, st.errors, st.dropped, st.matched) == (3, 3, 47, 50)
        assert [t["seq"] for t in healthy.got] == list(range(1, 51))
        assert hot.subscriber_count == 1


# -- unsubscribe, task ownership, lifecycle --------------------------------------------------------------------


async def test_unsubscribe_from_inside_its_own_handler_stops_at_once() -> None:
    hot = HotPath(capacity=256)
    got: list[Tick] = []
    sub: Subscription | None = None

    def handler(t: Tick) -> None:
        got.append(t)
        if len(got) == 10:
            assert sub is not None
            sub.close()

    async with running(hot):
        sub = hot.subscribe(handler, "sim:*:*")
        assert hot.publish([tick("A", seq=i) for i in range(1, 101)])  # one chunk
        await until(lambda: sub is not None and sub.removed is not None)
        await settle()
        assert len(got) == 10
        st = sub.stats()
        assert (st.delivered, st.dropped, st.matched, st.removed) == (10, 90, 100, "unsubscribed")
        assert hot.subscriber_count == 0


async def test_unsubscribe_from_outside_while_its_handler_awaits() -> None:
    hot = HotPath(capacity=256)
    gate = asyncio.Event()
    rec = AsyncRecorder(gate=gate)
    async with running(hot):
        sub = hot.subscribe(rec, "sim:*:*")
        assert hot.publish([tick("A", seq=i) for i in range(1, 21)])
        await settle()
        hot.unsubscribe(sub)
        hot.unsubscribe(sub)  # idempotent
        gate.set()
        await settle()
        assert len(rec.got) == 1  # the call in progress completes; no more
        st = sub.stats()
        assert st.delivered == 1 and st.dropped == 19
    hs = hot.stats()
    assert hs.delivered == 1 and hs.dropped == 19 and hs.removed == 1


async def test_cancelled_task_group_removes_its_subscribers() -> None:
    hot = HotPath(capacity=64)
    sub = hot.subscribe(Recorder(), "sim:*:*")

    class Stop(Exception):
        pass

    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            hot.start(tg)
            await settle()
            raise Stop
    assert sub.removed == "subscriber task ended"
    assert hot.subscriber_count == 0


async def test_run_subscriber_directly_and_misuse() -> None:
    hot, other = HotPath(capacity=64), HotPath(capacity=64)
    rec = Recorder()
    sub = hot.subscribe(rec, "sim:*:*")
    with pytest.raises(ConfigError, match="another hot path"):
        await other.run_subscriber(sub)
    with pytest.raises(ConfigError, match="another hot path"):
        other.unsubscribe(sub)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(hot.run_subscriber(sub))
        await settle()
        with pytest.raises(RuntimeError, match="already has a task"):
            await hot.run_subscriber(sub)
        assert hot.publish([tick("A", seq=1)])
        await until(lambda: len(rec.got) == 1)
        sub.close()
    assert sub.removed == "unsubscribed"
    hot.close()
    with pytest.raises(RuntimeError, match="closed"):
        hot.publish([tick("A")])
    with pytest.raises(RuntimeError, match="closed"):
        hot.subscribe(Recorder(), "sim:*:*")


async def test_publish_accepts_deques_and_big_batches() -> None:
    from collections import deque

    hot = HotPath(capacity=64)
    rec = Recorder()
    flood = Flood(grid(2))
    async with running(hot):
        sub = hot.subscribe(rec, "*:*:*", max_lag=32)
        await settle()
        assert hot.publish(deque(flood.batch(20)))
        await until(settled(sub))
        assert hot.publish(deque(flood.batch(150)))  # more than the ring: written in segments
        await until(settled(sub))
        st = sub.stats()
        assert_accounted(st, 170)
        assert rec.got == flood.sent[:20] + flood.sent[-32:]
        assert hot.publish([]) and hot.published == 170


class Watched(dict[str, Any]):
    """A tick whose release can be observed (a plain dict takes no weak reference)."""

    __slots__ = ("__weakref__",)


class Count:
    """A handler that counts and keeps no reference to what it gets."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, t: Tick) -> None:
        self.n += 1


def watched(ticks: list[Tick]) -> tuple[list[Tick], list[weakref.ref[Watched]]]:
    held = [Watched(t) for t in ticks]
    return cast(list[Tick], held), [weakref.ref(t) for t in held]


@pytest.mark.parametrize("execution", ["inline", "thread", "async"])
async def test_the_ring_keeps_no_tick_every_subscriber_has_read(execution: str) -> None:
    """Retention follows the slowest cursor, not the capacity: what all have read is freed at the next publish."""
    hot = HotPath(capacity=1024)
    flood = Flood(grid(2))
    count = Count()

    async def acount(t: Tick) -> None:
        count(t)

    async with running(hot):
        if execution == "async":
            sub = hot.subscribe(acount, "*:*:*")
        else:
            sub = hot.subscribe(count, "*:*:*", execution=execution)
        first, refs = watched(flood.batch(200))
        assert hot.publish(first)
        del first
        await until(settled(sub))
        for n in (10, 1):  # a thread's last chunk is released when it takes the next one
            assert hot.publish(flood.batch(n))
            await until(settled(sub))
        await until(lambda: count.n == 211)
        assert [r for r in refs if r() is not None] == []


async def test_the_ring_keeps_what_a_slow_subscriber_has_not_read() -> None:
    hot = HotPath(capacity=1024)
    flood = Flood(grid(2))
    gate = asyncio.Event()
    slow, fast = AsyncRecorder(gate=gate), Count()
    async with running(hot):
        hot.subscribe(fast, "*:*:*")
        sub = hot.subscribe(slow, "*:*:*", max_lag=512)
        assert hot.publish(flood.batch(1))
        await until(lambda: sub.stats().pending == 0)  # the slow one holds its first chunk, awaiting the gate
        unread, refs = watched(flood.batch(200))
        assert hot.publish(unread)
        del unread
        for _ in range(3):
            assert hot.publish(flood.batch(1))
            await until(lambda: fast.n == len(flood.sent))
        assert all(r() is not None for r in refs)  # read by the fast one, not yet by the slow one
        gate.set()
        await until(settled(sub))
        assert [t["seq"] for t in slow.got] == [t["seq"] for t in flood.sent]
        slow.got.clear()
        assert hot.publish(flood.batch(1))
        await until(lambda: all(r() is None for r in refs))


async def test_the_last_unsubscribe_frees_the_ring() -> None:
    """The distributor publishes nothing while no one subscribes, so the ring is emptied when the last one goes."""
    hot = HotPath(capacity=1024)
    flood = Flood(grid(2))
    gate = asyncio.Event()

    async def gated(t: Tick) -> None:
        await gate.wait()

    async with running(hot):
        sub = hot.subscribe(gated, "*:*:*")
        ticks, refs = watched(flood.batch(50))
        assert hot.publish(ticks)
        assert hot.publish(flood.batch(5))
        del ticks
        await settle()
        sub.close()
        gate.set()
        await until(lambda: all(r() is None for r in refs))


def test_stats_shapes() -> None:
    hot = HotPath(capacity=64)
    sub = hot.subscribe(Recorder(), ["sim:*:trade", "sim:*:trade"], name="s1", policy="drop_newest")
    assert sub.patterns == (Pattern("sim:*:trade"),)  # duplicates folded
    assert hot.publish([tick("A", seq=1), tick("A", "book_ticker", seq=1)])
    st = sub.stats()
    assert isinstance(st, SubscriptionStats)
    assert (st.name, st.policy, st.patterns, st.matched, st.pending, st.lag) == (
        "s1", SubscriberPolicy.DROP_NEWEST, ("sim:*:trade",), 1, 1, 2,
    )
    with pytest.raises(AttributeError):
        st.delivered = 5  # type: ignore[misc]
    hs = hot.stats()
    assert isinstance(hs, HotPathStats)
    assert (hs.published, hs.subscribers, hs.streams, hs.max_lag, hs.waiting_room) == (2, 1, 2, 2, False)
    assert set(hs.dropped_by_policy) == {p.value for p in SubscriberPolicy}
    assert {str(k): v for k, v in hot.published_by_stream().items()} == {"sim:A:trade": 1, "sim:A:book_ticker": 1}


# -- randomized accounting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
async def test_random_interleavings_account_for_every_tick(seed: int) -> None:
    rng = random.Random(seed)
    hot = HotPath(capacity=64)
    flood = Flood(grid(4), seed=seed)
    choices = ["*:*:*", "sim:S00[01]:*", "sim:*:trade", "sim:S003:book_ticker", "sim:S002:*"]
    subs: list[tuple[Subscription, Recorder, Drops, int, list[str]]] = []
    async with running(hot):
        for i in range(6):
            pats = rng.sample(choices, rng.randint(1, 2))
            policy = rng.choice(["drop_oldest", "drop_newest", "disconnect", "drop_oldest"])
            rec = AsyncRecorder(awaits=rng.randint(0, 4)) if i % 2 else Recorder()
            drops = Drops()
            sub = hot.subscribe(rec, pats, policy=policy, max_lag=rng.randint(4, 32), on_drop=drops)
            subs.append((sub, rec, drops, len(flood.sent), pats))
            for _ in range(rng.randint(5, 40)):
                assert hot.publish(flood.batch(rng.randint(1, 12)))
                for _ in range(rng.randint(0, 3)):
                    await asyncio.sleep(0)
        await until(settled(*(s for s, *_ in subs)))
        for sub, rec, drops, since, pats in subs:
            st = sub.stats()
            assert st.matched == st.delivered + st.dropped
            rec.assert_ordered()
            assert len(rec.got) == st.delivered
            if st.removed is None:
                assert st.matched == len(flood.matching(pats, since))
                assert sum(drops.counts) == st.dropped
            else:
                assert sub.policy is SubscriberPolicy.DISCONNECT


# -- the bench harness -----------------------------------------------------------------------------------------


async def test_bench_quick_run_adds_up() -> None:
    r = await run_hotpath_bench(rate=4000, subscribers=4, slow_subscribers=1, duration=0.4, symbols=5,
                                baseline_duration=0.2)
    for name in ("rate", "subscribers", "published", "delivered", "dropped", "p50_us", "p99_us", "p999_us",
                 "max_us", "fast_delivered", "slow_delivered", "slow_dropped", "cpu_s", "accounted",
                 "baseline_p99_us"):
        assert name in r, name
    assert r["accounted"] is True and r["drained"] is True
    assert r["published"] > 0 and r["fast_delivered"] > 0
    assert r["delivered"] + r["dropped"] == r["fast_delivered"] + r["fast_dropped"] + r["slow_delivered"] + r[
        "slow_dropped"]
    assert r["slow_delivered"] + r["slow_dropped"] == r["published"]  # the slow one takes everything
    assert r["latency_samples"] == r["fast_delivered"]
    assert r["p50_us"] <= r["p99_us"] <= r["p999_us"] <= r["max_us"]
    assert r["loop"] == "asyncio"  # the loop the test runs on, named in the result


async def test_bench_slow_handler_drill_adds_up(redis_url: str) -> None:
    r = await run_hotpath_bench(rate=2000, subscribers=2, slow_subscribers=0, duration=1.2, symbols=5, rounds=2,
                                slow_handler_ms=1.0, redis_url=redis_url)
    for name in ("p50_us", "p99_us", "without_p50_us", "without_p99_us", "p99_ratio", "redis_p99_us",
                 "without_redis_p99_us", "redis_p99_ratio", "slow_sync", "slowest", "without_slowest"):
        assert name in r, name
    assert r["accounted"] is True and r["without_accounted"] is True and r["drained"] is True
    assert r["redis_appended"] == r["published"] and r["without_redis_appended"] == r["without_published"]
    assert r["latency_samples"] == r["fast_delivered"] > 0 and r["without_latency_samples"] > 0
    assert r["slowest"] == "slow-sync" and r["without_slowest"] != "slow-sync"
    slow = r["slow_sync"]
    assert slow["execution"] == ["thread"] and slow["offloaded_rounds"] == 2
    assert slow["delivered"] + slow["dropped"] == r["published"]
    assert r["p50_us"] <= r["p99_us"] and r["redis_p50_us"] <= r["redis_p99_us"]


async def test_bench_rejects_bad_parameters() -> None:
    with pytest.raises(ConfigError):
        await run_hotpath_bench(rate=0, subscribers=1, slow_subscribers=0, duration=1)
    with pytest.raises(ConfigError):
        await run_hotpath_bench(rate=10, subscribers=1, slow_subscribers=2, duration=1)
    with pytest.raises(ConfigError, match="limit"):
        await run_hotpath_bench(rate=1e9, subscribers=1, slow_subscribers=0, duration=100)
    with pytest.raises(ConfigError, match="slow handler"):
        await run_hotpath_bench(rate=10, subscribers=1, slow_subscribers=0, duration=1, slow_handler_ms=-1)
    with pytest.raises(ConfigError, match="rounds"):
        await run_hotpath_bench(rate=10, subscribers=1, slow_subscribers=0, duration=1, slow_handler_ms=1, rounds=0)
    with pytest.raises(ConfigError, match="fast execution"):
        await run_hotpath_bench(rate=10, subscribers=1, slow_subscribers=0, duration=1, fast_execution="async")


def test_bench_command_line_refuses_bad_input_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--rate", "0"], ["--slow-handler-ms", "5000"], ["--fast-execution", "process"]):
        assert bench_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("bench hotpath: ") and err.count("\n") == 1, err
