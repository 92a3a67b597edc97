"""distributor.writer and append.lua against a real Redis.

Each test writes under its own key prefix (the ``prefix`` fixture, whose keys are deleted
afterwards) on the shared server; the fault test stops and restarts a private redis-server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import distributor.writer as writer_module
from consumer_sdk.core.keys import parse_entry_id, stream_key
from consumer_sdk.core.tick import Tick, decode_tick
from distributor.writer import Retention, StreamWriter, dead_letter_key
from ops.redis_server import RedisServer, restart

UNIT = 1.0  # seconds; every wait below is a small multiple of it
T0_MS = 1_700_000_000_000


def make_tick(seq: int, ms: int, symbol: str = "BTCUSDT", channel: str = "trade") -> Tick:
    """A tick of the given channel; ``ms`` is the venue event time in milliseconds."""
    t: dict[str, Any] = {
        "v": 1, "venue": "binance", "symbol": symbol, "channel": channel, "seq": seq,
        "ts_event": ms * 1000 + 123, "ts_recv": ms * 1000 + 4567,  # sub-ms parts: the ID floors them
    }
    if channel in ("trade", "agg_trade"):
        t.update(trade_id=seq, price="43000.10", qty="0.00100000", side="buy" if seq % 2 else "sell")
        if channel == "agg_trade":
            t.update(first_trade_id=seq * 3, last_trade_id=seq * 3 + 2)
    elif channel == "book_ticker":
        t.update(bid_px="1.0", bid_qty="2", ask_px="1.1", ask_qty="3", update_id=seq)
    else:
        t.update(open_time=ms * 1000, close_time=ms * 1000 + 59_999_000, open="1", high="2", low="0.5",
                 close="1.5", volume="10", quote_volume="15", trades=7, closed=False)
    return t  # type: ignore[return-value]


def key_of(prefix: str, t: Tick) -> str:
    return stream_key(t["venue"], t["symbol"], t["channel"], prefix=prefix)


async def entries(client: aioredis.Redis, key: str) -> list[tuple[str, Tick]]:
    return [(eid.decode(), decode_tick(fields[b"d"])) for eid, fields in await client.xrange(key)]


async def stored_seqs(client: aioredis.Redis, key: str) -> list[int]:
    return [parse_entry_id(eid)[1] for eid, _ in await client.xrange(key)]


def ms_of(t: Tick) -> int:
    return t["ts_event"] // 1000


# -- append ---------------------------------------------------------------------------------------------------


async def test_ids_are_ms_dash_seq_and_d_decodes_to_the_tick(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix)
    ticks = [make_tick(100 + i, T0_MS + 7 * i) for i in range(5)]
    assert await writer.append(ticks) == (5, 0)
    got = await entries(aredis, key_of(prefix, ticks[0]))
    assert [eid for eid, _ in got] == [f"{ms_of(t)}-{t['seq']}" for t in ticks]
    assert [tick for _, tick in got] == ticks
    raw = await aredis.xrange(key_of(prefix, ticks[0]), count=1)
    assert list(raw[0][1]) == [b"d"]  # one field, named d


async def test_empty_append(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix)
    assert await writer.append([]) == (0, 0)
    assert [k async for k in aredis.scan_iter(match=f"{prefix}:*")] == []


async def test_same_batch_twice_stored_once(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix)
    ticks = [make_tick(s, T0_MS + s) for s in range(1, 41)]
    assert await writer.append(ticks) == (40, 0)
    assert await writer.append(ticks) == (0, 40)
    assert await stored_seqs(aredis, key_of(prefix, ticks[0])) == [t["seq"] for t in ticks]
    stats = writer.stats()
    assert (stats.appended, stats.duplicates, stats.rejected, stats.batches) == (40, 40, 0, 2)


async def test_second_writer_on_the_same_streams_adds_nothing(aredis: aioredis.Redis, prefix: str) -> None:
    ticks = [make_tick(s, T0_MS + s) for s in range(1, 21)]
    first, second = StreamWriter(aredis, prefix=prefix), StreamWriter(aredis, prefix=prefix)
    assert await first.append(ticks[:15]) == (15, 0)
    assert await second.append(ticks) == (5, 15)
    assert await stored_seqs(aredis, key_of(prefix, ticks[0])) == list(range(1, 21))


async def test_overlapping_batches(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix)
    ticks = {s: make_tick(s, T0_MS + 10 * s) for s in range(1, 21)}
    key = key_of(prefix, ticks[1])
    assert await writer.append([ticks[s] for s in range(1, 11)]) == (10, 0)
    assert await writer.append([ticks[s] for s in range(6, 16)]) == (5, 5)
    # Repeats inside one batch, and an older seq after a newer one, are skipped too.
    assert await writer.append([ticks[16], ticks[16], ticks[3], ticks[17], ticks[17]]) == (2, 3)
    got = await entries(aredis, key)
    assert [t["seq"] for _, t in got] == list(range(1, 18))
    assert [t for _, t in got] == [ticks[s] for s in range(1, 18)]


async def test_ms_held_non_decreasing_when_event_time_goes_back(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix)
    ms = [T0_MS + 2000, T0_MS + 1000, T0_MS + 1500, T0_MS + 3000, T0_MS + 3000]
    ticks = [make_tick(i + 1, m) for i, m in enumerate(ms)]
    assert await writer.append(ticks) == (5, 0)
    later = make_tick(6, T0_MS + 2500)  # behind the stream's newest ms, in a later call
    assert await writer.append([later]) == (1, 0)
    got = await entries(aredis, key_of(prefix, later))
    held = [T0_MS + 2000, T0_MS + 2000, T0_MS + 2000, T0_MS + 3000, T0_MS + 3000, T0_MS + 3000]
    assert [eid for eid, _ in got] == [f"{m}-{s}" for m, s in zip(held, range(1, 7), strict=True)]
    assert [t for _, t in got] == [*ticks, later]  # the payload keeps the venue's own time


@pytest.mark.parametrize(
    "first_seq",
    [2**40 + 987_654_321, 10**15 + 1, 2**53 + 1],
    ids=["2**40", "10**15", "2**53"],
)
async def test_large_seq_keeps_its_digits(aredis: aioredis.Redis, prefix: str, first_seq: int) -> None:
    writer = StreamWriter(aredis, prefix=prefix)
    ticks = [make_tick(first_seq + i, T0_MS + i) for i in range(10)]
    assert await writer.append(ticks) == (10, 0)
    got = await entries(aredis, key_of(prefix, ticks[0]))
    assert [eid for eid, _ in got] == [f"{ms_of(t)}-{t['seq']}" for t in ticks]
    assert [t for _, t in got] == ticks
    assert await writer.append(ticks) == (0, 10)


async def test_interleaved_streams_land_in_their_own_keys(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix)
    symbols = ["BTCUSDT", "ETHUSDT", "BNBBTC", "BTCUSD_PERP"]
    channels = ["trade", "agg_trade", "book_ticker", "kline_1m"]
    per_stream = 25
    batch = [
        make_tick(1000 * n + s, T0_MS + s, sym, ch)
        for s in range(per_stream)
        for n, (sym, ch) in enumerate((sym, ch) for sym in symbols for ch in channels)
    ]
    assert await writer.append(batch) == (len(batch), 0)
    keys = {k.decode() async for k in aredis.scan_iter(match=f"{prefix}:*")}
    assert keys == {stream_key("binance", sym, ch, prefix=prefix) for sym in symbols for ch in channels}
    for key in keys:
        want = [t for t in batch if key_of(prefix, t) == key]
        assert len(want) == per_stream
        assert [t for _, t in await entries(aredis, key)] == want


async def test_maxlen_honoured_approximately(aredis: aioredis.Redis, prefix: str) -> None:
    cap, total, batch = 150, 3000, 250
    writer = StreamWriter(aredis, prefix=prefix, retention=Retention(maxlen=cap))
    ticks = [make_tick(s, T0_MS + s) for s in range(1, total + 1)]
    for i in range(0, total, batch):
        await writer.append(ticks[i:i + batch])
    seqs = await stored_seqs(aredis, key_of(prefix, ticks[0]))
    assert cap <= len(seqs) <= cap + 200
    assert seqs == list(range(total - len(seqs) + 1, total + 1))  # the newest are kept, oldest trimmed


async def test_maxlen_holds_when_a_sections_last_tick_is_a_duplicate(aredis: aioredis.Redis, prefix: str) -> None:
    """The MAXLEN trim rides on the XADD of a section's last record; when that record is a duplicate (no
    XADD), the section is still trimmed."""
    cap, total, batch = 150, 3000, 250
    writer = StreamWriter(aredis, prefix=prefix, retention=Retention(maxlen=cap))
    ticks = [make_tick(s, T0_MS + s) for s in range(1, total + 1)]
    for i in range(0, total, batch):
        assert await writer.append([*ticks[i:i + batch], ticks[0]]) == (batch, 1)
    seqs = await stored_seqs(aredis, key_of(prefix, ticks[0]))
    assert cap <= len(seqs) <= cap + 200
    assert seqs == list(range(total - len(seqs) + 1, total + 1))


async def test_per_channel_retention(aredis: aioredis.Redis, prefix: str) -> None:
    cap, total = 100, 1200
    retention = Retention(maxlen=0, per_channel=(("kline_*", cap, 0),))
    writer = StreamWriter(aredis, prefix=prefix, retention=retention)
    trades = [make_tick(s, T0_MS + s) for s in range(1, total + 1)]
    klines = [make_tick(s, T0_MS + s, channel="kline_1m") for s in range(1, total + 1)]
    for i in range(0, total, 100):
        await writer.append(trades[i:i + 100] + klines[i:i + 100])
    assert await aredis.xlen(key_of(prefix, trades[0])) == total  # no cap for this channel
    assert cap <= await aredis.xlen(key_of(prefix, klines[0])) <= cap + 200


async def test_the_header_cache_stays_bounded_and_each_stream_keeps_its_own_retention(
    aredis: aioredis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Section headers are cached per stream key up to MAX_CACHED_HEADS, then the cache starts afresh:
    with room for 2 and 6 streams of two channels, every stream is still trimmed by its own channel's cap."""
    monkeypatch.setattr(writer_module, "MAX_CACHED_HEADS", 2)
    cap, total = 100, 1200
    writer = StreamWriter(aredis, prefix=prefix, retention=Retention(maxlen=0, per_channel=(("kline_*", cap, 0),)))
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    ticks = {
        (sym, ch): [make_tick(s, T0_MS + s, sym, ch) for s in range(1, total + 1)]
        for sym in symbols for ch in ("trade", "kline_1m")
    }
    for i in range(0, total, 100):
        await writer.append([t for stream in ticks.values() for t in stream[i:i + 100]])
        assert len(writer._heads) <= 2
    for (_sym, ch), stream in ticks.items():
        length = await aredis.xlen(key_of(prefix, stream[0]))
        assert length == total if ch == "trade" else cap <= length <= cap + 200


async def test_max_age_trims_by_event_time(aredis: aioredis.Redis, prefix: str) -> None:
    age_ms, step_ms, total = 1000, 10, 2000
    writer = StreamWriter(aredis, prefix=prefix, retention=Retention(maxlen=0, max_age_ms=age_ms))
    ticks = [make_tick(s, T0_MS + step_ms * s) for s in range(1, total + 1)]
    for i in range(0, total, 200):
        await writer.append(ticks[i:i + 200])
    got = [parse_entry_id(eid) for eid, _ in await aredis.xrange(key_of(prefix, ticks[0]))]
    newest_ms = T0_MS + step_ms * total
    young = [t["seq"] for t in ticks if ms_of(t) >= newest_ms - age_ms]
    assert [seq for _, seq in got][-len(young):] == young  # everything young enough is kept
    assert len(got) - len(young) <= 200  # and older ones only within a node's slack


# -- the writer task ----------------------------------------------------------------------------------------------


async def test_run_stores_everything_submitted(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix, max_batch=64)
    trades = [make_tick(s, T0_MS + s) for s in range(1, 301)]
    books = [make_tick(s, T0_MS + s, "ETHUSDT", "book_ticker") for s in range(500, 600)]
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(writer.run())
        for i in range(0, 300, 30):
            assert writer.submit(trades[i:i + 30])
            assert writer.submit(books[i // 3:i // 3 + 10])
        async with asyncio.timeout(5 * UNIT):
            await writer.drain()
        assert not task.done()
        task.cancel()
    assert [t for _, t in await entries(aredis, key_of(prefix, trades[0]))] == trades
    assert [t for _, t in await entries(aredis, key_of(prefix, books[0]))] == books
    stats = writer.stats()
    assert (stats.appended, stats.duplicates, stats.buffered, stats.errors) == (400, 0, 0, 0)
    assert stats.batches >= 400 // 64
    assert stats.connected


async def test_submit_refuses_when_full_until_the_task_makes_room(aredis: aioredis.Redis, prefix: str) -> None:
    writer = StreamWriter(aredis, prefix=prefix, capacity=10)
    ticks = [make_tick(s, T0_MS + s) for s in range(1, 21)]
    assert writer.submit(ticks[:10])
    assert not writer.submit(ticks[10:])  # full: nothing taken
    assert writer.stats().buffered == 10
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(writer.run())
        async with asyncio.timeout(5 * UNIT):
            await writer.wait_room()
        assert writer.submit(ticks[10:])
        async with asyncio.timeout(5 * UNIT):
            await writer.drain()
        task.cancel()
    assert await stored_seqs(aredis, key_of(prefix, ticks[0])) == list(range(1, 21))


# -- a Redis outage ------------------------------------------------------------------------------------------------


async def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    """Poll ``condition`` (a counter another task moves) until it holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(UNIT / 100)  # poll


@pytest.mark.slow
async def test_writer_survives_a_redis_restart(private_redis: RedisServer) -> None:
    # No client-side retry: the writer's own retry loop is what is under test.
    client = aioredis.Redis(host="127.0.0.1", port=private_redis.port, retry=Retry(NoBackoff(), 0),
                            socket_connect_timeout=UNIT, socket_timeout=UNIT)
    writer = StreamWriter(client, prefix="fault", max_batch=40)
    ticks = [make_tick(s, T0_MS + s) for s in range(1, 221)]
    key = key_of("fault", ticks[0])
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(writer.run())
            writer.submit(ticks[:50])
            async with asyncio.timeout(5 * UNIT):
                await writer.drain()
            assert await stored_seqs(client, key) == list(range(1, 51))

            await asyncio.to_thread(private_redis.stop)  # the writer task keeps running meanwhile
            for i in range(50, 150, 25):
                assert writer.submit(ticks[i:i + 25])
            await wait_for(lambda: writer.errors >= 2 and writer.retries >= 2, 5 * UNIT)
            assert not writer._idle.is_set()  # the outage's ticks are not stored: drain() has them to wait for
            drained = tg.create_task(writer.drain())
            assert not task.done()  # the outage did not kill the writer
            assert not writer.stats().connected

            await asyncio.to_thread(restart, private_redis)  # same port, empty: no persistence
            async with asyncio.timeout(10 * UNIT):
                await drained
            assert writer.submit(ticks[150:])
            async with asyncio.timeout(5 * UNIT):
                await writer.drain()
            assert not task.done()
            task.cancel()
        # The restarted server kept nothing from before: what was submitted during the outage
        # and after it is there, each tick once, in seq order.
        got = await entries(client, key)
        assert [t for _, t in got] == ticks[50:]
        assert [eid for eid, _ in got] == [f"{ms_of(t)}-{t['seq']}" for t in ticks[50:]]
        stats = writer.stats()
        assert stats.connected
        assert stats.errors >= 2 and stats.retries >= 2
        assert stats.buffered == 0
        assert stats.appended == len(ticks)
    finally:
        await client.aclose()


# -- error replies inside a batch -----------------------------------------------------------------------------------


async def dead_letters(client: aioredis.Redis, prefix: str) -> list[dict[str, Any]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in await client.xrange(dead_letter_key(prefix))
    ]


async def test_ids_redis_refuses_are_dead_lettered_and_the_rest_of_the_stream_flows(
    aredis: aioredis.Redis, prefix: str
) -> None:
    """A real ID error mid-batch: the stream's newest entries were deleted by hand (XDEL), so Redis
    refuses any ID at or below the one it last generated.  The batch's first two ticks are already
    stored (settled as duplicates), each refused tick goes to the dead-letter stream, the ticks after
    them and the other stream are stored, in order.  (The writer that stored 6..10 would count them as
    duplicates: it knows the stream's newest ID from its own call and does not read it again; this one, as
    after a restart, reads it.)"""
    trades = [make_tick(s, T0_MS + s) for s in range(1, 13)]
    key = key_of(prefix, trades[0])
    first = StreamWriter(aredis, prefix=prefix)
    assert await first.append(trades[:10]) == (10, 0)
    await aredis.xdel(key, *[f"{ms_of(t)}-{t['seq']}" for t in trades[5:10]])  # 6..10 removed by hand
    assert await first.append(trades[5:10]) == (0, 5)  # the writer that stored them: duplicates, none stored
    assert await stored_seqs(aredis, key) == [1, 2, 3, 4, 5]
    writer = StreamWriter(aredis, prefix=prefix)
    books = [make_tick(s, T0_MS + s, "ETHUSDT", "book_ticker") for s in range(4, 13)]
    batch = [t for pair in zip(trades[3:], books, strict=True) for t in pair]  # trades 4..12 with books
    assert await writer.append(batch) == (2 + 9, 2)
    assert await stored_seqs(aredis, key) == [1, 2, 3, 4, 5, 11, 12]
    assert [t for _, t in await entries(aredis, key_of(prefix, books[0]))] == books
    dead = await dead_letters(aredis, prefix)
    assert [(d["stream"], int(d["seq"]), d["reason"]) for d in dead] == [(key, s, "bad_id") for s in range(6, 11)]
    assert dead[0]["error"].startswith("ERR The ID specified in XADD is equal or smaller")
    assert [decode_tick(d["d"].encode()) for d in dead] == trades[5:10]
    stats = writer.stats()
    assert (stats.appended, stats.duplicates, stats.dead_lettered) == (11, 2, 5)  # this writer's own: 2 + 9 stored
    assert stats.rejected_by_reason == {"bad_id": 5} and stats.failing == ""


async def test_a_key_of_another_type_is_dead_lettered_and_the_others_flow(
    aredis: aioredis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A string where a stream should be (WRONGTYPE): its ticks go to the dead-letter stream with their
    stream and seq, counted and logged; the writer task goes on and every other stream is stored."""
    caplog.set_level(logging.INFO, logger="market.writer")
    wrong = make_tick(1, T0_MS, "ETHUSDT")
    await aredis.set(key_of(prefix, wrong), b"not a stream")
    writer = StreamWriter(aredis, prefix=prefix, max_batch=16)
    trades = [make_tick(s, T0_MS + s) for s in range(1, 41)]
    refused = [make_tick(s, T0_MS + s, "ETHUSDT") for s in range(1, 41)]
    books = [make_tick(s, T0_MS + s, "BNBUSDT", "book_ticker") for s in range(1, 41)]
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(writer.run())
        for i in range(0, 40, 8):
            assert writer.submit(trades[i:i + 8] + refused[i:i + 8] + books[i:i + 8])
        async with asyncio.timeout(5 * UNIT):
            await writer.drain()
        assert not task.done()
        task.cancel()
    assert [t for _, t in await entries(aredis, key_of(prefix, trades[0]))] == trades
    assert [t for _, t in await entries(aredis, key_of(prefix, books[0]))] == books
    assert await aredis.get(key_of(prefix, wrong)) == b"not a stream"
    dead = await dead_letters(aredis, prefix)
    assert [(d["stream"], int(d["seq"]), d["reason"]) for d in dead] == [
        (key_of(prefix, wrong), s, "wrongtype") for s in range(1, 41)
    ]
    assert [decode_tick(d["d"].encode()) for d in dead] == refused
    stats = writer.stats()
    assert stats.dead_lettered == 40 and stats.rejected_by_reason == {"wrongtype": 40}
    assert stats.appended == 80 and stats.failing == "" and stats.errors == 0
    logged = [r for r in caplog.records if r.getMessage() == "ticks_dead_lettered"]
    assert logged and logged[0].levelname == "ERROR"
    first = logged[0].fields  # type: ignore[attr-defined]
    assert (first["stream"], first["reason"], first["first_seq"]) == (key_of(prefix, wrong), "wrongtype", 1)


async def test_noscript_reloads_and_repeats_only_the_refused_calls(private_redis: RedisServer) -> None:
    client = aioredis.Redis(host="127.0.0.1", port=private_redis.port)
    writer = StreamWriter(client, prefix="ns")
    ticks = [make_tick(s, T0_MS + s) for s in range(1, 11)]
    try:
        assert await writer.append(ticks[:5]) == (5, 0)
        await client.script_flush()  # Redis forgets the script (as after a restart or a failover)
        assert await writer.append(ticks) == (5, 5)
        assert await stored_seqs(client, key_of("ns", ticks[0])) == list(range(1, 11))
        assert writer.errors == 0
    finally:
        await client.aclose()
