"""The writer's window (several flushes in flight on one connection) against a real, private redis-server.

Faults are real: a flush refused by the server (``NOSCRIPT``, ``OOM``) while later ones are in flight, the
writer's connection killed (``CLIENT KILL``) with flushes queued on it, kills while ticks stream.  ``CLIENT
PAUSE WRITE`` holds the script calls the writer sent on the server, so that the window is full when the
fault lands.  Every test ends with each stream holding each tick once, in seq order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from consumer_sdk.core.tick import Tick
from distributor.writer import APPEND_SCRIPT, StreamWriter
from ops.redis_server import RedisServer, restart, start_redis
from tests.distributor.test_writer import T0_MS, UNIT, entries, key_of, make_tick, ms_of, stored_seqs

SYMBOLS = ("AAAUSDT", "BBBUSDT", "CCCUSDT")
PREFIX = "win"


def client_of(server: RedisServer, name: str) -> aioredis.Redis:
    # No client-side retry: the writer's own recovery is what is under test.
    return aioredis.Redis(host="127.0.0.1", port=server.port, client_name=name, retry=Retry(NoBackoff(), 0),
                          socket_timeout=5 * UNIT, socket_connect_timeout=UNIT)


def interleaved(first: int, last: int, symbols: tuple[str, ...] = SYMBOLS) -> list[Tick]:
    return [make_tick(s, T0_MS + s, sym) for s in range(first, last + 1) for sym in symbols]


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (state another task moves) until it holds; fail naming ``what`` after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(UNIT / 200)  # poll
    except TimeoutError:
        raise AssertionError(f"not reached in {timeout} s: {what}") from None


async def assert_each_once_in_order(client: aioredis.Redis, ticks: list[Tick]) -> None:
    for sym in {t["symbol"] for t in ticks}:
        mine = [t for t in ticks if t["symbol"] == sym]
        got = await entries(client, key_of(PREFIX, mine[0]))
        assert [t for _, t in got] == mine, sym
        assert [eid for eid, _ in got] == [f"{ms_of(t)}-{t['seq']}" for t in mine], sym


async def fill_window(writer: StreamWriter, batches: list[list[Tick]]) -> None:
    """Submit each batch once the one before is in flight: one flush each, all in the window together."""
    for batch in batches:
        n = len(writer._window) + 1
        assert writer.submit(batch)
        await wait_for(lambda n=n: len(writer._window) >= n, 5 * UNIT, f"{n} flushes in flight")  # type: ignore[misc]


def batches_of_ten(count: int) -> list[list[Tick]]:
    """``count`` batches of ten seqs each (1-10, 11-20, ...), every stream interleaved."""
    return [interleaved(i, i + 9) for i in range(1, 10 * count + 1, 10)]


@contextlib.asynccontextmanager
async def window_writer(server: RedisServer, **options: Any) -> AsyncIterator[tuple[StreamWriter, aioredis.Redis]]:
    """A writer with a window of four flushes on its own connection (more of its settings in ``options``) and an
    admin connection, both to ``server`` and both closed after."""
    client, admin = client_of(server, "writer"), client_of(server, "admin")
    try:
        yield StreamWriter(client, prefix=PREFIX, window=4, **options), admin
    finally:
        await client.aclose()
        await admin.aclose()


@contextlib.asynccontextmanager
async def running(writer: StreamWriter) -> AsyncIterator[None]:
    """The writer's task runs for the block, which must not end it; it is cancelled after."""
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(writer.run())
        yield
        assert not task.done()
        task.cancel()


async def prime_and_pause(writer: StreamWriter, admin: aioredis.Redis) -> None:
    """One tick of each stream stored (the writer knows the script and that the server is standalone), then the
    server holds the writer's script calls (``CLIENT PAUSE WRITE``) until ``UNPAUSE``."""
    assert writer.submit(interleaved(0, 0))
    async with asyncio.timeout(5 * UNIT):
        await writer.drain()
    await admin.execute_command("CLIENT", "PAUSE", int(5000 * UNIT), "WRITE")


async def hold_full_window(writer: StreamWriter, admin: aioredis.Redis, batches: list[list[Tick]]) -> None:
    """:func:`prime_and_pause`, then ``batches`` all in flight together, held on the server."""
    await prime_and_pause(writer, admin)
    await fill_window(writer, batches)


# -- append.lua's ORDER rule, call by call ------------------------------------------------------------------------


async def newest_id(client: aioredis.Redis, key: str) -> bytes:
    """The stream's newest entry ID, as append.lua reports it."""
    [(entry_id, _)] = await client.xrevrange(key, count=1)
    return bytes(entry_id)


async def test_a_section_whose_earlier_ticks_are_not_stored_is_refused_whole(private_redis: RedisServer) -> None:
    client = client_of(private_redis, "t")
    try:
        writer = StreamWriter(client, prefix=PREFIX)
        sha = await client.script_load(APPEND_SCRIPT)
        a1, a2 = interleaved(1, 3, SYMBOLS[:1]), interleaved(4, 6, SYMBOLS[:1])
        b = interleaved(1, 2, SYMBOLS[1:2])
        after: dict[str, int] = {}
        first = writer._encode(a1, after)  # sent, say, and lost
        second = writer._encode(a2 + b, after)
        assert after == {key_of(PREFIX, a1[0]): 6, key_of(PREFIX, b[0]): 2}
        keys = list(second)
        reply = await client.evalsha(sha, len(keys), *keys, b"".join(b"".join(p) for p in second.values()))
        # The first stream's section names seq 3, which the stream does not hold: nothing of it tried (and
        # no newest ID for the writer to trust next time).
        assert reply[:2] == [0, 0] and reply[2].startswith(b"ORDER ") and reply[3] is None
        assert reply[4:7] == [2, 0, None]  # a stream with nothing in flight before goes on
        assert reply[7] == await newest_id(client, keys[1])
        assert await client.exists(key_of(PREFIX, a1[0])) == 0
        keys = list(first)
        assert await client.evalsha(sha, len(keys), *keys, b"".join(first[keys[0]])) == [
            3, 0, None, await newest_id(client, keys[0])
        ]
        keys = list(second)
        reply = await client.evalsha(sha, len(keys), *keys, b"".join(b"".join(p) for p in second.values()))
        # once the earlier ticks are there, in order
        assert reply == [3, 0, None, await newest_id(client, keys[0]), 0, 2, None, await newest_id(client, keys[1])]
        await assert_each_once_in_order(client, a1 + a2 + b)
    finally:
        await client.aclose()


async def xrevrange_calls(admin: aioredis.Redis) -> int:
    """XREVRANGE calls the server has run (commands run by scripts are counted too)."""
    stats = await admin.info("commandstats")
    return int(stats.get("cmdstat_xrevrange", {}).get("calls", 0))


async def test_a_stream_the_writer_wrote_last_is_not_read_again(private_redis: RedisServer) -> None:
    """The script reads a stream's newest entry (XREVRANGE, its costliest call) only when the writer does not
    know it: the first call of each stream does, later ones take the ID the writer's last call reported."""
    client, admin = client_of(private_redis, "writer"), client_of(private_redis, "admin")
    try:
        writer = StreamWriter(client, prefix=PREFIX)
        ticks = interleaved(1, 30, SYMBOLS)
        before = await xrevrange_calls(admin)
        assert await writer.append(ticks[:30]) == (30, 0)
        assert await xrevrange_calls(admin) - before == len(SYMBOLS)  # one each: not known yet
        before = await xrevrange_calls(admin)
        for i in range(30, len(ticks), 15):
            assert await writer.append(ticks[i : i + 15]) == (15, 0)
        assert await writer.append(ticks[-3:]) == (0, 3)  # duplicates are found without reading too
        assert await xrevrange_calls(admin) - before == 0
        await assert_each_once_in_order(client, ticks)
    finally:
        await client.aclose()
        await admin.aclose()


async def test_a_newest_id_another_writer_moved_on_is_caught_by_redis_and_nothing_is_stored_twice(
    private_redis: RedisServer,
) -> None:
    """Writer A knows each stream's newest ID from its own last call; writer B (another ingestor) then stores
    more.  A's next call names IDs Redis refuses (at or below B's newest): the script reads the real newest
    entry and goes on from it, so B's ticks count as duplicates and A's later ones are stored once, in order,
    with nothing dead-lettered."""
    client_a, client_b = client_of(private_redis, "a"), client_of(private_redis, "b")
    try:
        a, b = StreamWriter(client_a, prefix=PREFIX), StreamWriter(client_b, prefix=PREFIX)
        ticks = interleaved(1, 40, SYMBOLS)
        n = len(SYMBOLS)
        assert await a.append(ticks[: 10 * n]) == (10 * n, 0)  # seq 1..10: A knows 10
        assert await b.append(ticks[: 25 * n]) == (15 * n, 10 * n)  # B stores 11..25
        assert await a.append(ticks[10 * n :]) == (15 * n, 15 * n)  # A: 11..25 duplicates, 26..40 stored
        await assert_each_once_in_order(client_a, ticks)
        stats = a.stats()
        assert (stats.dead_lettered, stats.rejected, stats.failing) == (0, 0, "")
    finally:
        await client_a.aclose()
        await client_b.aclose()


# -- the writer ----------------------------------------------------------------------------------------------------


async def test_a_flush_refused_while_the_next_runs_keeps_each_stream_in_order(private_redis: RedisServer) -> None:
    """Flush 1 is refused (NOSCRIPT: the server does not know the script it names), flush 2 runs right after it
    on the same connection: flush 2's sections of the streams flush 1 held are refused (ORDER), a stream only
    flush 2 has is stored, and the writer then writes flush 1's ticks and the held ones, in order."""
    first = interleaved(1, 10, SYMBOLS[:2])
    second = interleaved(11, 20, SYMBOLS)  # the third stream only here
    async with window_writer(private_redis) as (writer, admin):
        real_sha = await admin.script_load(APPEND_SCRIPT)  # the server's script cache: the writer's sha too
        async with running(writer):
            await prime_and_pause(writer, admin)
            writer._sha = "0" * 40  # a script the server does not hold: this flush is refused whole
            await fill_window(writer, [first])
            writer._sha = real_sha
            await fill_window(writer, [second])
            await admin.execute_command("CLIENT", "UNPAUSE")
            async with asyncio.timeout(5 * UNIT):
                await writer.drain()
        await assert_each_once_in_order(admin, interleaved(0, 0) + first + second)
        stats = writer.stats()
        assert stats.appended == len(interleaved(0, 0) + first + second) and stats.duplicates == 0
        assert stats.rejected_by_reason == {"noscript": len(first)}  # held ticks are not refusals


async def test_oom_with_the_window_full_then_each_tick_once_in_order(private_redis: RedisServer) -> None:
    batches = batches_of_ten(4)
    async with window_writer(private_redis) as (writer, admin):
        async with running(writer):
            await hold_full_window(writer, admin, batches)
            used = int((await admin.info("memory"))["used_memory"])
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", max(1, used // 2))
            await admin.execute_command("CLIENT", "UNPAUSE")
            await wait_for(lambda: writer.failing == "oom" and writer.errors >= 3, 10 * UNIT, "OOM retried")
            assert writer.appended == len(SYMBOLS)  # nothing of the window stored
            await admin.config_set("maxmemory", 0)
            async with asyncio.timeout(10 * UNIT):
                await writer.drain()
        await assert_each_once_in_order(admin, [t for b in [interleaved(0, 0), *batches] for t in b])
        assert writer.stats().failing == "" and writer.duplicates == 0


async def test_connection_killed_with_the_window_full(private_redis: RedisServer) -> None:
    batches = batches_of_ten(4)
    async with window_writer(private_redis) as (writer, admin):
        async with running(writer):
            await hold_full_window(writer, admin, batches)
            assert await admin.execute_command("CLIENT", "KILL", "SKIPME", "yes") >= 1
            await admin.execute_command("CLIENT", "UNPAUSE")
            async with asyncio.timeout(10 * UNIT):
                await writer.drain()
        await assert_each_once_in_order(admin, [t for b in [interleaved(0, 0), *batches] for t in b])
        assert writer.errors >= 1 and writer.stats().connected


async def test_connections_killed_while_ticks_stream(private_redis: RedisServer) -> None:
    """Kills land wherever they land (between flushes, mid-window, mid-reply); the outcome of a flush in
    flight is then unknown and it is written again: nothing lost, nothing twice, order kept."""
    ticks = interleaved(1, 600)
    async with window_writer(private_redis, max_batch=15) as (writer, admin):
        kills = 0
        async with running(writer):
            for i in range(0, len(ticks), 30):
                while not writer.submit(ticks[i : i + 30]):
                    await writer.wait_room()
                if i % 150 == 0:
                    kills += await admin.execute_command("CLIENT", "KILL", "SKIPME", "yes")
                await asyncio.sleep(0)  # let the writer send: the window fills as ticks come
            async with asyncio.timeout(20 * UNIT):
                await writer.drain()
        await assert_each_once_in_order(admin, ticks)
        assert kills >= 1 and writer.errors >= 1


async def test_restart_with_flushes_in_flight(private_redis: RedisServer) -> None:
    batches = batches_of_ten(4)
    async with window_writer(private_redis) as (writer, admin), running(writer):
        await hold_full_window(writer, admin, batches)
        await admin.aclose()
        await asyncio.to_thread(private_redis.stop)
        await asyncio.to_thread(restart, private_redis)  # empty: nothing of before kept
        async with asyncio.timeout(10 * UNIT):
            await writer.drain()
    # The restarted server kept nothing of before: the window's ticks are there, each once, in order.
    async with client_of(private_redis, "admin") as admin:
        await assert_each_once_in_order(admin, [t for b in batches for t in b])
        assert await stored_seqs(admin, key_of(PREFIX, batches[0][0])) == list(range(1, 41))


async def test_replica_acks_in_the_window_hold_a_flush_until_a_replica_has_it(private_redis: RedisServer) -> None:
    """``WAIT`` follows each flush of the window; a flush the replica did not get in time is held and written again
    (its ticks come back as duplicates) until it did: the replica then holds every tick once, in order."""
    with start_redis() as replica_server:
        client, admin = client_of(private_redis, "writer"), client_of(private_redis, "admin")
        replica = client_of(replica_server, "replica")
        writer = StreamWriter(client, prefix=PREFIX, window=4, replica_acks=1, replica_wait_ms=50)
        before, during = interleaved(1, 40), interleaved(41, 80)

        async def replicas() -> int:
            return int((await admin.info("replication"))["connected_slaves"])

        async def linked() -> bool:
            return (await replica.info("replication")).get("master_link_status") == "up"

        async def caught_up(n: int) -> bool:
            return all([await replica.xlen(key_of(PREFIX, t)) == n for t in before[: len(SYMBOLS)]])

        try:
            await admin.config_set("repl-diskless-sync-delay", 0)
            await replica.execute_command("REPLICAOF", "127.0.0.1", private_redis.port)
            async with asyncio.timeout(10 * UNIT):
                while not await linked():
                    await asyncio.sleep(UNIT / 50)  # poll the replica's link
            async with running(writer):
                for i in range(0, len(before), 30):
                    assert writer.submit(before[i : i + 30])
                    await asyncio.sleep(0)  # several flushes in the window
                async with asyncio.timeout(5 * UNIT):
                    await writer.drain()
                # drain() returns once every flush was acknowledged by the replica: a flush it got late (a loaded
                # machine can take longer than 50 ms) was written again, so it holds each tick by then.
                assert await caught_up(40)
                shortfalls, duplicates = writer.replica_shortfalls, writer.duplicates

                await replica.execute_command("REPLICAOF", "NO", "ONE")
                async with asyncio.timeout(10 * UNIT):
                    while await replicas() > 0:
                        await asyncio.sleep(UNIT / 50)  # poll
                for i in range(0, len(during), 30):
                    assert writer.submit(during[i : i + 30])
                    await asyncio.sleep(0)
                await wait_for(lambda: writer.failing == "noreplicas" and writer.errors >= 2, 10 * UNIT, "held")
                assert not writer._idle.is_set()  # not acknowledged: drain() waits
                await replica.execute_command("REPLICAOF", "127.0.0.1", private_redis.port)
                async with asyncio.timeout(20 * UNIT):
                    await writer.drain()
            await assert_each_once_in_order(admin, before + during)
            async with asyncio.timeout(10 * UNIT):
                while not await caught_up(80):
                    await asyncio.sleep(UNIT / 50)  # poll the replica
            got = await entries(replica, key_of(PREFIX, during[0]))
            assert [t for _, t in got] == [t for t in before + during if t["symbol"] == during[0]["symbol"]]
            assert writer.replica_shortfalls > shortfalls and writer.duplicates > duplicates
        finally:
            await client.aclose()
            await admin.aclose()
            await replica.aclose()


async def test_take_all_after_the_task_stops_mid_window_returns_every_unacknowledged_tick(
    private_redis: RedisServer,
) -> None:
    batches = batches_of_ten(5)
    async with window_writer(private_redis) as (writer, admin):
        task = asyncio.create_task(writer.run())
        await hold_full_window(writer, admin, batches[:4])
        assert writer.submit(batches[4])  # the window is full: this one waits in the buffer
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        held = writer.take_all()
        assert held == [t for b in batches for t in b]
        await admin.execute_command("CLIENT", "UNPAUSE")
        await writer.append(held)  # the final flush of a stopping ingestor
        await assert_each_once_in_order(admin, interleaved(0, 0) + held)
