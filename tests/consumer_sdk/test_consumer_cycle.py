"""The consumer's read and ack cycle (acks in the same write as the next read) and the event loop it runs on."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

from consumer_sdk import Consumer, Tick
from consumer_sdk.consumer.fetch import ack_and_read, merge_reads
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.loop import choose_loop, loop_factory, loop_name, run
from consumer_sdk.core.redis import raw_stream_client
from ops.faultproxy import FaultProxy
from tests.consumer_sdk.test_consumer_sdk import add

# ---------------------------------------------------------------- ack_and_read


async def _group(client: aioredis.Redis, key: str) -> None:
    await client.xgroup_create(key, "g", id="0", mkstream=True)


async def test_ack_and_read_reads_then_acks_with_the_next_read(aredis: aioredis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:trade"
    await _group(aredis, key)
    ids = await add(aredis, key, range(1, 6))
    raw = raw_stream_client(aredis)
    acked, found = await ack_and_read(raw, "g", "c", [], {key: ">"}, count=100, dfield=b"d")
    assert acked == 0
    assert [(k, [i.decode() for i in got]) for k, got, _ in found] == [(key.encode(), ids)]
    assert (await aredis.xpending(key, "g"))["pending"] == 5
    # the acks go first: applied whatever the read finds (here nothing, after a 1 ms block)
    acked, found = await ack_and_read(raw, "g", "c", [(key, ids[:3])], {key: ">"}, count=100, dfield=b"d", block=1)
    assert (acked, found) == (3, [])
    assert (await aredis.xpending(key, "g"))["pending"] == 2
    # the read sees what was added, the acks of the rest with it
    more = await add(aredis, key, range(6, 8))
    acked, found = await ack_and_read(raw, "g", "c", [(key, ids[3:])], {key: ">"}, count=100, dfield=b"d", block=50)
    assert acked == 2
    assert [[i.decode() for i in got] for _, got, _ in found] == [more]
    assert (await aredis.xpending(key, "g"))["pending"] == 2


async def _read_blocked_then_eval(
    aredis: aioredis.Redis, redis_url: str, keys: list[str], script: str, *args: str
) -> tuple[int, list[Any]]:
    """``ack_and_read`` blocked on ``keys`` by a connection of its own, and ``script`` run over ``keys`` once that
    read waits in Redis; what the read returns (or raises), once the connection proved still in step."""
    name = f"blocked-{keys[0]}"
    client = aioredis.Redis.from_url(redis_url, client_name=name, socket_timeout=10)
    try:
        raw = raw_stream_client(client)
        read = asyncio.create_task(
            ack_and_read(raw, "g", "c", [], dict.fromkeys(keys, ">"), count=100, dfield=b"d", block=5000))

        async def blocked() -> bool:
            clients = await aredis.client_list(_type="normal")
            return any(c.get("name") == name and "b" in (c.get("flags") or "") for c in clients)

        async with asyncio.timeout(5):
            while not await blocked():  # the read must be waiting in Redis before the write
                await asyncio.sleep(0.001)
        await aredis.eval(script, len(keys), *keys, *args)
        try:
            return await read
        finally:
            assert await raw.ping()  # every reply was read off the connection: the next command gets its own
    finally:
        await client.aclose()


async def test_a_blocked_read_gets_every_stream_one_script_wrote(
    aredis: aioredis.Redis, prefix: str, redis_url: str
) -> None:
    """The writer stores a flush over many streams in one script call.  Redis before 7.2 answers a read
    blocked on all of them with the one stream that woke it; the read that follows it in the same write
    brings the rest in the same round trip, so one call returns every stream (on any server)."""
    keys = [f"{prefix}:binance:S{i}:trade" for i in range(5)]
    for key in keys:
        await _group(aredis, key)
    script = "for i, k in ipairs(KEYS) do redis.call('XADD', k, '*', 'd', ARGV[i]) end"
    acked, found = await _read_blocked_then_eval(
        aredis, redis_url, keys, script, *(f'"tick {i}"' for i in range(len(keys))))
    assert acked == 0
    assert sorted((k.decode(), len(ids), values) for k, ids, values in found) == [
        (key, 1, [f'"tick {i}"'.encode()]) for i, key in enumerate(keys)]
    assert (await aredis.xpending(keys[0], "g"))["pending"] == 1  # delivered once, to this consumer


async def test_an_error_of_the_follow_up_does_not_take_back_what_the_blocked_read_gave(
    aredis: aioredis.Redis, prefix: str, redis_url: str
) -> None:
    """One script appends to the first stream and deletes the second (its group with it).  Redis before 7.2
    answers the blocked read with the first stream's entry, then the follow-up meets NOGROUP: the entry, now
    pending with this consumer, is returned, not dropped under the error.  A server that runs the blocked read
    again when it wakes (7.2 and later, Valkey) meets NOGROUP in the read itself: that error is raised and
    nothing was delivered."""
    keys = [f"{prefix}:binance:S{i}:trade" for i in range(2)]
    for key in keys:
        await _group(aredis, key)
    script = "redis.call('XADD', KEYS[1], '*', 'd', ARGV[1]); redis.call('DEL', KEYS[2])"
    info = await aredis.info("server")
    one_stream_wake = "valkey_version" not in info and tuple(
        int(x) for x in str(info["redis_version"]).split(".")[:2]) < (7, 2)
    if one_stream_wake:
        acked, found = await _read_blocked_then_eval(aredis, redis_url, keys, script, '"tick"')
        assert (acked, [(k.decode(), values) for k, _ids, values in found]) == (0, [(keys[0], [b'"tick"'])])
        assert (await aredis.xpending(keys[0], "g"))["pending"] == 1  # this consumer's now
    else:
        with pytest.raises(rexc.ResponseError, match="NOGROUP"):
            await _read_blocked_then_eval(aredis, redis_url, keys, script, '"tick"')
        assert (await aredis.xpending(keys[0], "g"))["pending"] == 0  # not delivered: the next read gets it
        assert await aredis.xlen(keys[0]) == 1


def test_two_reads_merge_stream_by_stream_in_order() -> None:
    first = [(b"a", [b"1-1"], [b"x1"]), (b"b", [b"1-1"], [b"y1"])]
    then = [(b"c", [b"2-1"], [b"z1"]), (b"a", [b"2-1", b"2-2"], [b"x2", b"x3"])]
    assert merge_reads(first, then) == [
        (b"a", [b"1-1", b"2-1", b"2-2"], [b"x1", b"x2", b"x3"]), (b"b", [b"1-1"], [b"y1"]), (b"c", [b"2-1"], [b"z1"])]
    assert first[0] == (b"a", [b"1-1"], [b"x1"])  # the first read's lists are not changed
    assert merge_reads([], then) == then and merge_reads(first, []) == first


async def test_an_ack_error_is_raised_after_the_read_and_the_connection_stays_usable(
    aredis: aioredis.Redis, prefix: str
) -> None:
    key = f"{prefix}:binance:BTCUSDT:trade"
    wrong = f"{prefix}:not-a-stream"
    await aredis.set(wrong, "x")
    await _group(aredis, key)
    ids = await add(aredis, key, range(1, 3))
    raw = raw_stream_client(aredis)
    with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):
        await ack_and_read(raw, "g", "c", [(wrong, ids)], {key: ">"}, count=100, dfield=b"d")
    # the read ran: its entries are pending with this consumer, and every reply was read off the connection
    assert (await aredis.xpending(key, "g"))["pending"] == 2
    assert await aredis.ping()
    acked, found = await ack_and_read(raw, "g", "c", [(key, ids)], {key: "0"}, count=100, dfield=b"d")
    assert acked == 2
    assert found == []  # acked in the same write, before the read of the pending entries


async def test_a_black_holed_read_fails_by_the_connections_timeout_and_the_client_reconnects(
    aredis: aioredis.Redis, prefix: str
) -> None:
    """One deadline for the acks and the read together: a link that goes silent after the write ends the
    exchange with redis-py's TimeoutError once the socket timeout has passed, not before and not never, and
    the client's next command goes out on a new connection."""
    key = f"{prefix}:binance:BTCUSDT:trade"
    await _group(aredis, key)
    ids = await add(aredis, key, range(1, 4))
    port = aredis.connection_pool.connection_kwargs.get("port", 6379)
    async with FaultProxy(int(port)) as proxy:
        client = aioredis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=0.4)
        try:
            raw = raw_stream_client(client)
            acked, found = await ack_and_read(raw, "g", "c", [], {key: ">"}, count=100, dfield=b"d")
            assert (acked, len(found[0][1])) == (0, 3)
            proxy.blackhole()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(rexc.TimeoutError):
                await ack_and_read(raw, "g", "c", [(key, ids)], {key: ">"}, count=100, dfield=b"d", block=100)
            assert loop.time() - started >= 0.4
            proxy.restore()
            assert await client.ping()  # the silent connection was dropped, not handed out again
        finally:
            await client.aclose()


async def test_a_missing_group_is_the_reads_error(aredis: aioredis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:trade"
    await aredis.xadd(key, {"d": "x"})
    raw = raw_stream_client(aredis)
    with pytest.raises(rexc.ResponseError, match="NOGROUP"):
        await ack_and_read(raw, "g", "c", [(key, [b"1-1"])], {key: ">"}, count=10, dfield=b"d", block=1)
    assert await aredis.ping()


# ---------------------------------------------------------------- the cycle, through Consumer


async def _consume(redis_url: str, prefix: str, total: int, **kwargs: Any) -> tuple[list[int], Consumer]:
    """Run a consumer on two streams until it handled ``total`` ticks and acked them; its seqs and itself."""
    client = aioredis.Redis.from_url(redis_url)
    keys = [f"{prefix}:binance:{s}:trade" for s in ("BTCUSDT", "ETHUSDT")]
    seqs: list[int] = []
    got = asyncio.Event()

    def handler(tick: Tick) -> None:
        seqs.append(tick["seq"])
        if len(seqs) >= total:
            got.set()

    consumer = Consumer(
        redis_url=redis_url, patterns=["binance:*:trade"], prefix=prefix, group="g", consumer="c",
        start_id="0", rescan_s=0.05, **kwargs,
    )
    try:
        await add(client, keys[0], range(1, 4))
        await add(client, keys[1], range(1, 4))
        task = asyncio.create_task(consumer.run(handler))
        # more while it blocks on the first ones' acks and the next read
        await add(client, keys[0], range(4, total // 2 + 1))
        await add(client, keys[1], range(4, total // 2 + 1))
        async with asyncio.timeout(30):
            await got.wait()
            while consumer.stats().acked < total:  # the consumer exposes counters, no event
                await asyncio.sleep(0.005)
        consumer.stop()
        await asyncio.wait_for(task, 10)
        pending = [int((await client.xpending(k, "g"))["pending"]) for k in keys]
        assert pending == [0, 0]
    finally:
        consumer.stop()
        await client.aclose()
    return seqs, consumer


async def test_every_tick_handled_once_and_acked_small_pages(redis_url: str, prefix: str) -> None:
    # count=2: every read fills a page, so the cycle goes on without blocking until the streams are drained
    seqs, consumer = await _consume(redis_url, prefix, 40, count=2)
    assert sorted(seqs) == sorted(list(range(1, 21)) * 2)
    assert consumer.stats().duplicates == 0
    assert consumer.stats().acked == 40


def test_the_consumer_runs_on_uvloop(redis_url: str, prefix: str) -> None:
    async def main() -> tuple[str, list[int]]:
        seqs, _consumer = await _consume(redis_url, prefix, 20, count=1000, block_ms=200)
        return loop_name(), seqs

    name, seqs = run(main(), setting="uvloop")
    assert name == "uvloop"
    assert sorted(seqs) == sorted(list(range(1, 11)) * 2)


async def test_stop_acks_what_was_handled(redis_url: str, prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    key = f"{prefix}:binance:BTCUSDT:trade"
    consumer = Consumer(redis_url=redis_url, patterns=[key], prefix=prefix, group="g", consumer="c", start_id="0")
    try:
        await add(client, key, range(1, 11))

        def handler(tick: Tick) -> None:
            if tick["seq"] == 10:
                consumer.stop()  # after the last: run() returns with this batch handled

        await asyncio.wait_for(consumer.run(handler), 30)
        assert (await client.xpending(key, "g"))["pending"] == 0
        assert consumer.stats().acked == 10
    finally:
        await client.aclose()


# ---------------------------------------------------------------- loop selection (pure)


def test_choose_loop() -> None:
    assert choose_loop("auto", available=True) == "uvloop"
    assert choose_loop("auto", available=False) == "asyncio"
    assert choose_loop("", available=True) == "uvloop"
    assert choose_loop("asyncio", available=True) == "asyncio"
    assert choose_loop(" UVLOOP ", available=True) == "uvloop"
    with pytest.raises(ConfigError, match="not installed"):
        choose_loop("uvloop", available=False)
    with pytest.raises(ConfigError, match="expected one of"):
        choose_loop("trio", available=True)


def test_choose_loop_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKET_LOOP", "asyncio")
    assert choose_loop(available=True) == "asyncio"
    monkeypatch.delenv("MARKET_LOOP")
    assert choose_loop(available=True) == "uvloop"


def test_run_on_either_loop() -> None:
    async def name() -> str:
        await asyncio.sleep(0)
        return loop_name()

    assert run(name(), setting="asyncio") == "asyncio"
    assert run(name(), setting="uvloop") == "uvloop"
    loop = loop_factory("asyncio")()
    try:
        assert loop_name(loop) == "asyncio"
    finally:
        loop.close()
