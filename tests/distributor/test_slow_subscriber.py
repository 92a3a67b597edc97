"""A slow co-located subscriber is isolated by design: it cannot hold up the loop, the writer or the others.

The faults are real: a synchronous handler that blocks its thread 1 ms per tick (``time.sleep``), a handler
that hangs on an event nobody sets (until the test releases it), a handler that raises.  Nothing here
bounds wall time from above: the loop being free is shown by counting what else ran between two calls of
the slow handler (a task ticking on the loop, the other subscriber's deliveries), and speed is left to
``market bench hotpath --slow-handler-ms`` (the figures are in the README).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.tick import Tick
from distributor.hotpath import (
    MIN_OVERRUN_US,
    OFFLOAD_AFTER,
    OFFLOAD_WINDOW,
    PROBATION_CHUNK,
    Execution,
    HotPath,
    Subscription,
    offload_due,
    overran,
    probation_chunk,
)
from distributor.ingress import IngressQueue, Policy
from distributor.service import Distributor
from distributor.writer import StreamWriter
from ingestor.config import load_settings
from ingestor.service import Ingestor

UNIT = 2.0  # seconds: the bound on every wait below; nothing here should come near it
HANG = 10 * UNIT  # a hanging handler is released by the test long before this


def tick(seq: int, symbol: str = "BTCUSDT", channel: str = "trade") -> Tick:
    return {"v": 1, "venue": "sim", "symbol": symbol, "channel": channel, "seq": seq,  # type: ignore[typeddict-item]
            "ts_event": 1_700_000_000_000_000 + seq * 1000, "ts_recv": time.time_ns() // 1000,
            "trade_id": seq, "price": "1.00", "qty": "1", "side": "buy"}


async def until(condition: Callable[[], bool], timeout: float = UNIT) -> None:
    """Let other tasks run until ``condition()`` holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)  # poll


class Ticker:
    """A task on the loop that counts its turns: it advances only while the loop is free."""

    def __init__(self) -> None:
        self.n = 0

    async def run(self) -> None:
        while True:
            self.n += 1
            await asyncio.sleep(0)


class Fast:
    def __init__(self) -> None:
        self.seqs: list[int] = []

    def __call__(self, t: Tick) -> None:
        self.seqs.append(t["seq"])


class SlowSync:
    """Blocks its thread 1 ms per tick; notes, at each call, what else had run by then."""

    def __init__(self, ticker: Ticker, fast: Fast) -> None:
        self.ticker = ticker
        self.fast = fast
        #: per call: seq, the ticker's turns, the fast subscriber's deliveries, whether it ran on the loop's thread
        self.calls: list[tuple[int, int, int, bool]] = []

    def __call__(self, t: Tick) -> None:
        on_loop = threading.current_thread() is threading.main_thread()
        self.calls.append((t["seq"], self.ticker.n, len(self.fast.seqs), on_loop))
        time.sleep(0.001)  # slow handler


def thread_ended(sub: Subscription) -> Callable[[], bool]:
    return lambda: sub.thread is not None and not sub.thread.is_alive()


# -- the drill ---------------------------------------------------------------------------------------------------


class Venue:
    """A venue connection: a thread writes seq numbers into a socket at ``rate`` ticks/s, whatever the loop
    does; while the loop is held they wait in the kernel, as a real feed's frames do, and come in one read."""

    def __init__(self, sock: socket.socket, total: int, rate: float) -> None:
        self.sock, self.total, self.rate = sock, total, rate
        self.sent = 0  # written by the thread only
        self.thread = threading.Thread(target=self._run, name="venue", daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        with self.sock:
            while self.sent < self.total:
                due = min(self.total, int((time.monotonic() - t0) * self.rate) + 1)
                if due > self.sent:
                    self.sock.sendall(b"".join(b"%d\n" % s for s in range(self.sent + 1, due + 1)))
                    self.sent = due
                time.sleep(0.0005)  # pace: the feed's, not a wait for anything


async def read_feed(sock: socket.socket, ingress: IngressQueue[Tick], total: int) -> None:
    """The socket reader on the loop: every read's ticks into the ingress at once."""
    reader, writer = await asyncio.open_connection(sock=sock)
    buf = b""
    seen = 0
    while seen < total:
        data = await reader.read(65536)
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            ingress.offer(tick(int(line)))
        seen += len(lines)
    writer.close()


@pytest.mark.slow
async def test_a_slow_sync_subscriber_is_moved_off_the_loop(aredis: aioredis.Redis, prefix: str) -> None:
    """2k ticks/s from a socket through the real distributor (hot path, then the Redis writer); one
    subscriber's handler blocks 1 ms per tick on drop_oldest.  The other gets every tick in order and stays
    near the venue (median under 50 ticks, p99 under 400: 200 ms of this feed; with the slow one left on the
    loop they are about 560 and 1400, alone on the machine 0 and under 10), the writer stores every tick, the
    slow one's drops are counted exactly, the loop keeps turning while it works, and the stats name it."""
    hot = HotPath()
    ingress: IngressQueue[Tick] = IngressQueue(100_000, Policy.BLOCK)
    writer = StreamWriter(aredis, prefix=prefix)
    distributor = Distributor(ingress, writer, hotpath=hot)
    total = 3000
    ours, theirs = socket.socketpair()
    venue = Venue(theirs, total, rate=2000.0)
    ticker, fast = Ticker(), Fast()
    behind: list[int] = []  # per delivery to the fast subscriber: ticks the venue had sent after it

    def on_fast(t: Tick) -> None:
        behind.append(venue.sent - t["seq"])
        fast(t)

    slow = SlowSync(ticker, fast)
    told: list[int] = []
    fast_sub = hot.subscribe(on_fast, "sim:*:*", name="fast")
    slow_sub = hot.subscribe(slow, "sim:*:*", name="slow", policy="drop_oldest", max_lag=256, on_drop=told.append)
    assert slow_sub.execution is Execution.INLINE  # a synchronous handler starts on the loop
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        tasks = [tg.create_task(t) for t in (writer.run(), distributor.run(), ticker.run())]
        venue.thread.start()
        await read_feed(ours, ingress, total)
        await until(lambda: len(fast.seqs) == total and writer.appended == total
                    and slow_sub.stats().pending == 0, 10 * UNIT)
        stats, slowest = hot.stats(), hot.slowest(2)
        st, fst = slow_sub.stats(), fast_sub.stats()
        hot.close()
        for task in tasks:
            task.cancel()
    venue.thread.join(UNIT)

    # The other subscriber and the writer: every tick, in order; the other never far behind the venue.
    assert fast.seqs == list(range(1, total + 1))
    assert (fst.delivered, fst.dropped, fst.execution) == (total, 0, Execution.INLINE)
    ranked = sorted(behind)
    p50, p99 = ranked[len(ranked) // 2], ranked[99 * len(ranked) // 100]
    assert p50 < 50 and p99 < 400, f"the fast subscriber was {p50} (p50) and {p99} (p99) ticks behind the venue"
    stored = await aredis.xrange(f"{prefix}:sim:BTCUSDT:trade")
    assert [int(entry_id.split(b"-")[1]) for entry_id, _ in stored] == list(range(1, total + 1))

    # The slow one: its drops counted exactly by its policy, the newest kept, order kept.
    got = [c[0] for c in slow.calls]
    assert st.matched == total == st.delivered + st.dropped == len(got) + st.dropped
    assert st.dropped > 0 and sum(told) == st.dropped and st.drop_events == len(told)
    assert got == sorted(set(got)) and got[-1] == total

    # Moved to a thread of its own after a few overrunning chunks on the loop, for good.
    assert st.execution is Execution.THREAD and st.offloaded and stats.offloaded == 1 and stats.threads == 1
    assert st.overruns >= OFFLOAD_AFTER
    on_loop = [c[3] for c in slow.calls]
    moved_at = on_loop.index(False)
    assert all(on_loop[:moved_at]) and not any(on_loop[moved_at:])
    assert moved_at <= hot.max_chunk + (OFFLOAD_AFTER - 1) * PROBATION_CHUNK

    # The loop is not held while it works: between two of its calls on the thread, the ticker ran, and while
    # the feed was on, the fast subscriber was served.  Inline, no call of a chunk but its first sees either
    # move (chunks of up to 256 calls here: nearly every pair); on a thread only the moments when the machine
    # does not run the loop's thread at all do (a few percent on a quiet machine, under half on a crowded one).
    pairs = list(zip(slow.calls[moved_at:], slow.calls[moved_at + 1:], strict=False))
    assert len(pairs) > 100
    held = sum(1 for a, b in pairs if b[1] == a[1])
    assert held < 3 * len(pairs) // 4, f"{held} of {len(pairs)} calls saw the loop held"
    feeding = [(a, b) for a, b in pairs if b[2] < total]
    served = sum(1 for a, b in feeding if b[2] > a[2])
    assert served > len(feeding) // 4, f"the fast subscriber was served during {served} of {len(feeding)} calls"

    # The stats name it by its own handler time, not by who waited.
    assert stats.slowest == "slow" and [s.name for s in slowest] == ["slow", "fast"]
    assert st.handler_max_us >= 1000 and st.handler_total_us >= 1000 * st.delivered  # each call sleeps >= 1 ms
    assert fst.handler_us < st.handler_us and not fst.offloaded
    await until(thread_ended(slow_sub))  # halted when the hot path closed


# -- the decisions ------------------------------------------------------------------------------------------------


def test_overrun_needs_the_per_tick_budget_and_the_floor() -> None:
    budget_ns = 50_000
    floor_ns = MIN_OVERRUN_US * 1000
    assert not overran(floor_ns, 1, budget_ns)  # one call of 500 µs: at the floor, not over it
    assert overran(floor_ns + 1, 1, budget_ns)
    assert not overran(100 * 49_000, 100, budget_ns)  # 4.9 ms for 100 calls: 49 µs each, within budget
    assert overran(100 * 51_000, 100, budget_ns)
    assert not overran(400_000, 2, budget_ns)  # 200 µs a call, but the chunk held the loop for 0.4 ms only


def test_offload_after_repeated_overruns_within_the_window() -> None:
    assert OFFLOAD_AFTER == 4 and OFFLOAD_WINDOW == 8
    assert not offload_due([5], 5) and not offload_due([5, 6, 7], 7)
    assert offload_due([5, 6, 7, 8], 8)
    assert offload_due([1, 3, 5, 8], 8)  # every other chunk: chunks 1..8, within 8
    assert not offload_due([1, 3, 5, 9], 9)  # 9 chunks: overruns too rare
    assert not offload_due([1, 9, 10, 11], 11) and offload_due([1, 9, 10, 11, 12], 12)  # the last four count


def test_probation_chunks_hold_the_loop_about_the_floor() -> None:
    floor_ns = MIN_OVERRUN_US * 1000
    assert probation_chunk(1_000_000, PROBATION_CHUNK) == 1  # a 1 ms handler: one call at a time
    assert probation_chunk(floor_ns, PROBATION_CHUNK) == 2  # two calls pass the floor once more
    assert probation_chunk(100_000, PROBATION_CHUNK) == 6  # 600 µs: over the floor, so it can overrun again
    assert probation_chunk(60_000, PROBATION_CHUNK) == 9
    assert probation_chunk(1_000, PROBATION_CHUNK) == PROBATION_CHUNK  # fast calls: the cap
    assert probation_chunk(0, 5) == 5 and probation_chunk(-3, 5) == 5  # no measure: the cap
    for per in (1, 999, 10_000, 60_000, 250_001, 10**9):
        n = probation_chunk(per, PROBATION_CHUNK)
        assert 1 <= n <= PROBATION_CHUNK
        assert n == PROBATION_CHUNK or n * per > floor_ns  # enough calls to overrun again at that speed


async def test_a_slow_inline_handler_holds_the_loop_one_call_at_a_time() -> None:
    """Slow start: 500 ticks wait when it starts, yet its first chunk is one call; on probation a 1 ms
    handler gets one-call chunks, so the loop runs between every two of its calls until it is moved."""
    hot = HotPath(capacity=1024)
    ticker = Ticker()
    fast = Fast()
    slow = SlowSync(ticker, fast)
    sub = hot.subscribe(slow, "sim:*:*", max_lag=512)
    assert hot.publish([tick(i) for i in range(1, 501)])
    async with asyncio.TaskGroup() as tg:
        runner = tg.create_task(ticker.run())
        hot.start(tg)
        await until(lambda: sub.execution is Execution.THREAD and len(slow.calls) > OFFLOAD_AFTER + 1, HANG)
        hot.close()
        runner.cancel()
    on_loop = [c for c in slow.calls if c[3]]
    assert len(on_loop) == OFFLOAD_AFTER  # moved at its OFFLOAD_AFTER-th one-call overrun
    turns = [c[1] for c in on_loop]
    assert all(b > a for a, b in itertools.pairwise(turns)), f"the loop was held across calls: {turns}"
    assert [c[0] for c in slow.calls[:OFFLOAD_AFTER]] == list(range(1, OFFLOAD_AFTER + 1))


def test_execution_is_checked_at_subscribe() -> None:
    hot = HotPath(capacity=64)

    async def coro(t: Tick) -> None:
        return None

    def plain(t: Tick) -> None:
        return None

    assert hot.subscribe(coro, "sim:*:*").execution is Execution.ASYNC
    assert hot.subscribe(plain, "sim:*:*").execution is Execution.INLINE
    assert hot.subscribe(plain, "sim:*:*", execution="thread").execution is Execution.THREAD
    with pytest.raises(ConfigError, match="coroutine function"):
        hot.subscribe(coro, "sim:*:*", execution="thread")
    with pytest.raises(ConfigError, match="async def"):
        hot.subscribe(plain, "sim:*:*", execution="async")
    with pytest.raises(ConfigError, match="inline, thread, async"):
        hot.subscribe(plain, "sim:*:*", execution="process")
    for bad in (0, -1, float("nan"), True, "50"):
        with pytest.raises(ConfigError, match="handler_budget_us"):
            hot.subscribe(plain, "sim:*:*", handler_budget_us=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="handler_budget_us"):
        HotPath(handler_budget_us=0)
    assert hot.subscribe(plain, "sim:*:*", handler_budget_us=200).budget_us == 200.0
    assert hot.subscriber_count == 4
    assert HotPath(handler_budget_us=10).subscribe(plain, "sim:*:*").stats().budget_us == 10.0


def test_the_ingestor_passes_execution_and_budget_on() -> None:
    ing = Ingestor(load_settings({"symbols": "BTCUSDT", "channels": "trade"}, {}))

    def plain(t: Tick) -> None:
        return None

    sub = ing.subscribe(plain, ["binance:*:*"], execution="thread", handler_budget_us=20)
    assert (sub.execution, sub.budget_us) == (Execution.THREAD, 20.0)


# -- the fast path stays inline -----------------------------------------------------------------------------------


async def test_a_trivial_handler_stays_on_the_loop() -> None:
    hot = HotPath(capacity=4096)
    threads: set[int] = set()
    count = [0]

    def trivial(t: Tick) -> None:
        count[0] += 1
        if count[0] % 97 == 0:
            threads.add(threading.get_ident())

    sub = hot.subscribe(trivial, "sim:*:*", max_lag=2048)
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        for i in range(200):
            assert hot.publish([tick(100 * i + k) for k in range(100)])
            await until(lambda i=i: count[0] == 100 * (i + 1))
        hot.close()
    st = sub.stats()
    assert (st.delivered, st.dropped, st.execution, st.offloaded, sub.thread) == (20_000, 0, Execution.INLINE,
                                                                                  False, None)
    assert threads == {threading.get_ident()}
    assert st.handler_total_us > 0 and 0 < st.handler_us <= st.handler_max_us


# -- thread subscribers -------------------------------------------------------------------------------------------


async def test_a_thread_subscriber_gets_everything_in_order_off_the_loop() -> None:
    hot = HotPath(capacity=1024, sample_every=1)
    seen: list[int] = []
    where: set[int] = set()

    def handler(t: Tick) -> None:
        where.add(threading.get_ident())
        seen.append(t["seq"])

    sub = hot.subscribe(handler, ["sim:BTCUSDT:*"], execution="thread", policy="block", max_lag=64)
    assert sub.thread is None  # started with its task
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        n = 0
        for _ in range(100):  # faster than its thread: the publisher is held back (block), nothing is lost
            batch = [tick(n + k + 1, symbol="BTCUSDT" if k % 3 else "ETHUSDT") for k in range(30)]
            n += 30
            if not hot.publish(batch):
                await asyncio.wait_for(hot.wait_room(), UNIT)
        want = [s for s in range(1, n + 1) if (s - 1) % 30 % 3]
        await until(lambda: len(seen) == len(want))
        st = sub.stats()
        assert seen == want and (st.matched, st.delivered, st.dropped, st.pending) == (len(want), len(want), 0, 0)
        assert st.execution is Execution.THREAD and not st.offloaded and hot.stats().threads == 1
        assert threading.get_ident() not in where and len(where) == 1
        await until(lambda: hot.latency.count == len(want))  # its deliveries are timed, folded in on the loop
        thread = sub.thread
        assert thread is not None and thread.is_alive() and thread.daemon
        sub.close()
        await until(thread_ended(sub))
        hot.close()
    assert hot.stats().threads == 0


async def test_thread_handler_errors_are_counted_and_remove_it_after_a_streak() -> None:
    hot = HotPath(capacity=256)
    calls: list[int] = []

    def flaky(t: Tick) -> None:
        calls.append(t["seq"])
        if t["seq"] > 10:
            raise ValueError("bad tick")

    sub = hot.subscribe(flaky, "sim:*:*", execution="thread", max_consecutive_failures=5, name="flaky")
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        assert hot.publish([tick(s) for s in range(1, 11)])
        await until(lambda: sub.stats().delivered == 10)
        assert hot.publish([tick(s) for s in range(11, 101)])
        await until(lambda: sub.removed is not None)
        await until(thread_ended(sub))
        hot.close()
    st = sub.stats()
    assert st.removed is not None and "5 consecutive handler failures" in st.removed and "bad tick" in st.removed
    assert st.errors >= 5 and st.matched == 100 == st.delivered + st.dropped
    assert calls[:10] == list(range(1, 11))


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest", "block", "disconnect"])
async def test_a_hanging_thread_handler_is_bounded_by_its_policy(policy: str) -> None:
    """The handler blocks its thread on an event until the test sets it; meanwhile ticks keep coming."""
    hot = HotPath(capacity=256)
    gate = threading.Event()
    seen: list[int] = []
    told: list[int] = []
    where: set[int] = set()  # the threads its handler and its on_drop ran on
    other = Fast()

    def hangs(t: Tick) -> None:
        where.add(threading.get_ident())
        gate.wait(HANG)
        seen.append(t["seq"])

    def on_drop(n: int) -> None:
        where.add(threading.get_ident())
        told.append(n)

    sub = hot.subscribe(hangs, "sim:*:*", execution="thread", policy=policy, max_lag=32, on_drop=on_drop,
                        name="hangs")
    hot.subscribe(other, "sim:*:*", max_lag=128)
    published = 10
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        try:
            assert hot.publish([tick(k + 1) for k in range(10)])
            await until(lambda: sub.stats().delivered == 1)  # its first call has begun: it hangs there
            while published < 1000:
                if not hot.publish([tick(published + k + 1) for k in range(10)]):
                    break  # block: held back, as it should be
                published += 10
                await asyncio.sleep(0)
                await until(lambda n=published: len(other.seqs) == n)  # the others are served meanwhile
            st = sub.stats()
            if policy == "block":
                assert hot.stats().waiting_room and published < 100  # held within its window and hand-off
                waiting = asyncio.ensure_future(hot.wait_room())
                await asyncio.sleep(0)
                assert not waiting.done()
                gate.set()
                await asyncio.wait_for(waiting, UNIT)
                published += 10
            else:
                assert published == 1000  # the publisher was never held
                if policy == "disconnect":
                    assert st.removed is not None and "disconnect policy" in st.removed
                else:
                    await until(lambda: sub.stats().busy_us >= 1000)  # its call in progress, growing
                    assert hot.stats().slowest == "hangs"
                if policy == "drop_oldest":  # what fell out of its window is counted at once, while it hangs
                    assert st.pending <= 32 + 2 * 10 and st.dropped == 1000 - st.delivered - st.pending
                gate.set()
            await until(lambda: sub.stats().pending == 0 and (sub.removed is not None
                                                              or len(seen) == sub.stats().delivered))
        finally:
            gate.set()
            hot.close()
    await until(thread_ended(sub))
    st = sub.stats()
    assert st.matched == st.delivered + st.dropped
    assert seen == sorted(set(seen))
    if policy == "disconnect":
        assert seen == [1] and 32 < st.matched < published  # its call in progress completed; nothing more
    else:
        assert st.matched == published
    assert len(where) == 1 and threading.get_ident() not in where  # one thread: never the loop's
    if policy == "block":
        assert st.dropped == 0 and seen == list(range(1, published + 1))
    elif policy == "drop_oldest":
        assert sum(told) == st.dropped > 0 and seen[-1] == published
    elif policy == "drop_newest":
        assert sum(told) == st.dropped > 0 and seen[:1] == [1]


# -- async handlers that never return -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["drop_oldest", "disconnect"])
async def test_an_async_handler_that_never_returns_is_bounded_by_its_policy(policy: str) -> None:
    hot = HotPath(capacity=256)
    gate = asyncio.Event()
    seen: list[int] = []
    told: list[int] = []
    other = Fast()

    async def hangs(t: Tick) -> None:
        await gate.wait()
        seen.append(t["seq"])

    sub = hot.subscribe(hangs, "sim:*:*", policy=policy, max_lag=32, on_drop=told.append, name="hangs")
    hot.subscribe(other, "sim:*:*", max_lag=128)
    async with asyncio.TaskGroup() as tg:
        hot.start(tg)
        assert hot.publish([tick(k + 1) for k in range(10)])
        await until(lambda: sub.stats().delivered == 1)  # its first call has begun: it hangs there
        for i in range(1, 100):  # 1000 ticks, four times the ring
            assert hot.publish([tick(10 * i + k + 1) for k in range(10)])  # never held
            await until(lambda i=i: len(other.seqs) == 10 * (i + 1))
        st = sub.stats()
        if policy == "drop_oldest":
            assert st.removed is None and st.lag > 32
            # its chunk in progress (10 ticks) and its window (32) are pending; the rest is lost, counted now
            assert st.pending <= 32 + 10 and st.dropped == 1000 - st.delivered - st.pending
            await until(lambda: sub.stats().busy_us >= 1000)  # the call in progress, growing
            assert hot.stats().slowest == "hangs"
        else:
            assert st.removed is not None and "disconnect policy" in st.removed
        gate.set()
        await until(lambda: sub.stats().pending == 0 and len(seen) == sub.stats().delivered)
        hot.close()
    st = sub.stats()
    assert st.matched == st.delivered + st.dropped
    assert seen == sorted(set(seen)) and other.seqs == list(range(1, 1001))
    if policy == "drop_oldest":
        assert st.matched == 1000 and sum(told) == st.dropped and seen[-1] == 1000
    else:
        assert seen == [1] and 32 < st.matched < 1000  # removed when it fell behind; its call in progress completed


# -- naming the slowest -------------------------------------------------------------------------------------------


async def test_the_slowest_is_named_by_its_own_time_not_by_its_lag() -> None:
    """One subscriber far behind (its task not started: it waited, it did not work), one that works slowly."""
    hot = HotPath(capacity=1024)
    waiting = hot.subscribe(Fast(), "sim:*:*", name="waited", max_lag=512)

    def slow(t: Tick) -> None:
        time.sleep(0.002)  # slow handler

    worker = hot.subscribe(slow, "sim:*:*", name="worked", execution="thread", max_lag=512)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(hot.run_subscriber(worker))
        assert hot.publish([tick(s) for s in range(1, 21)])
        await until(lambda: worker.stats().delivered == 20 and worker.stats().busy_us == 0)
        stats = hot.stats()
        ranked = hot.slowest()
        hot.close()
        await task
    assert stats.slowest == "worked" and [s.name for s in ranked] == ["worked", "waited"]
    assert ranked[1].lag == 20 > 0 == ranked[0].lag and waiting.removed is not None
    assert stats.max_lag == 20 and ranked[0].handler_us >= 2000


def test_stats_shapes_carry_the_handler_figures() -> None:
    hot = HotPath(capacity=64)
    sub = hot.subscribe(Fast(), "sim:*:*", name="s")
    st = sub.stats()
    fields: dict[str, Any] = {
        "execution": Execution.INLINE, "offloaded": False, "handler_us": 0.0, "handler_max_us": 0.0,
        "handler_total_us": 0, "busy_us": 0, "overruns": 0, "budget_us": 50.0,
    }
    assert {k: getattr(st, k) for k in fields} == fields
    hs = hot.stats()
    assert (hs.slowest, hs.offloaded, hs.threads, hs.overruns) == (None, 0, 0, 0)
