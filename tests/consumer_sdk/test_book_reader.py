"""consumer_sdk.book_reader on the real Redis: the book at a position and the live reader, held to books built
independently from the real captures (tests/fixtures: a REST snapshot and the venue's diffs after it).

:func:`write_capture` plays the writer: a start snapshot, then every diff that follows by the venue's rules, with
some diffs replaced by periodic or resync snapshots or lost, as asked.  Beside every stored entry it keeps the book
built by applying the venue's diffs straight to a :class:`Book`, with no stream involved: what every read must give.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk.book import Book
from consumer_sdk.book_reader import (
    MAX_DEPTH_ENTRY_BYTES,
    BookUpdate,
    LiveBook,
    NoBook,
    book_at,
    check_depth_key,
    entry_of,
    follow_books,
)
from consumer_sdk.book_stream import BookBreak, HistoryTrimmed, InvalidBookEntry, encode_diff, encode_snapshot
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.tick import encode_tick
from consumer_sdk.poison import MAX_ENTRY_BYTES
from ops.redis_server import RedisServer, restart

#: how long a test waits for the reader's next update before it fails
WAIT_S = 15.0


@dataclass
class Written:
    """What :func:`write_capture` stored: per entry, its ID, seq, ms, kind and the independently built book."""

    ids: list[str] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    ms: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    books: list[Book] = field(default_factory=list)
    #: diff index (as in the actions) -> the index of the entry stored for it
    at: dict[int, int] = field(default_factory=dict)


def capture_entries(cap: Any, actions: Mapping[int, str] | None = None, symbol: str | None = None) -> Written:
    """The entries a writer stores for ``cap``; ``actions`` by diff index (after the ones folded into the start
    snapshot): ``lose`` (never stored), ``periodic`` or ``resync`` (a snapshot stored in its place)."""
    actions = actions or {}
    symbol = symbol or cap.symbol
    link = "prev" if cap.futures else "next"
    diffs = cap.continuous()
    book = Book()
    book.apply_snapshot(cap.last_update_id, cap.bids, cap.asks)
    folded = 0
    while folded < len(diffs) and diffs[folded]["u"] <= cap.last_update_id:  # futures: see test_book_stream
        book.apply_diff(diffs[folded]["b"], diffs[folded]["a"], diffs[folded]["u"])
        folded += 1
    out = Written()

    def store(tick: Any) -> None:
        ms = max(out.ms[-1] if out.ms else 0, tick["ts_event"] // 1000)
        out.ids.append(f"{ms}-{tick['seq']}")
        out.raw.append(encode_tick(tick))
        out.seqs.append(tick["seq"])
        out.ms.append(ms)
        out.kinds.append(tick["kind"])
        out.books.append(book.copy())

    ts = diffs[0]["E"] * 1000
    store(encode_snapshot(book, "start", venue="binance", symbol=symbol, link=link, ts_event=ts, ts_recv=ts))
    for i, d in enumerate(diffs[folded:]):
        book.apply_diff(d["b"], d["a"], d["u"])
        action = actions.get(i, "diff")
        ts_event, ts_recv = d["E"] * 1000, d["recv_us"]
        if action == "lose":
            continue
        out.at[i] = len(out.ids)
        if action in ("periodic", "resync"):
            reason = "periodic" if action == "periodic" else "resync:gap"
            store(encode_snapshot(book, reason, venue="binance", symbol=symbol, link=link, ts_event=ts_event,
                                  ts_recv=ts_recv))
        else:
            store(encode_diff("binance", symbol, seq=d["u"], first=d["U"], pu=d.get("pu"), ts_event=ts_event,
                              ts_recv=ts_recv, bids=d["b"], asks=d["a"]))
    return out


async def xadd(client: aioredis.Redis, key: str, w: Written, start: int = 0, stop: int | None = None) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for i in range(start, len(w.ids) if stop is None else stop):
            pipe.xadd(key, {"d": w.raw[i]}, id=w.ids[i])
        await pipe.execute()


def longest(captures: list[Any]) -> Any:
    return max(captures, key=lambda c: len(c.continuous()))


def same(a: Book | None, b: Book) -> bool:
    """The same levels, written the same, at the same update id."""
    return a is not None and a.update_id == b.update_id and a.levels() == b.levels()


async def next_update(updates: AsyncIterator[BookUpdate]) -> BookUpdate:
    async with asyncio.timeout(WAIT_S):
        return await anext(updates)


# -- the book at a position ---------------------------------------------------------------------------------------


async def test_book_at_every_kind_of_position_is_the_book_built_from_the_capture(
    depth_captures: list[Any], aredis: aioredis.Redis, prefix: str
) -> None:
    for cap in depth_captures:
        n = len(cap.continuous())
        w = capture_entries(cap, dict.fromkeys(range(7, n, 11), "periodic"))
        key = f"{prefix}:binance:{cap.symbol}:depth"
        await xadd(aredis, key, w)
        for i in sorted({*range(0, len(w.ids), 7), len(w.ids) - 1}):
            got = await book_at(aredis, key, f"seq:{w.seqs[i]}")
            assert same(got.book, w.books[i]), (cap.symbol, i)
            assert (got.entry_id, got.seq) == (w.ids[i], w.seqs[i])
            snapshot = max(j for j in range(i + 1) if w.kinds[j] == "snapshot")
            assert (got.snapshot_id, got.diffs) == (w.ids[snapshot], i - snapshot)
            by_id = await book_at(aredis, key, w.ids[i])
            assert same(by_id.book, w.books[i])
            # a time: the last entry of that millisecond
            last_of_ms = max(j for j in range(len(w.ids)) if w.ms[j] <= w.ms[i])
            by_time = await book_at(aredis, key, str(w.ms[i]))
            assert by_time.entry_id == w.ids[last_of_ms] and same(by_time.book, w.books[last_of_ms])
        if len(w.ids) > 1:
            # a seq between two entries' seqs is the book at the lower one
            between = await book_at(aredis, key, f"seq:{w.seqs[1] - 1}")
            assert between.entry_id == w.ids[0] and same(between.book, w.books[0])
        now = await book_at(aredis, key)
        assert same(now.book, w.books[-1]) and now.ts_event // 1000 <= w.ms[-1]


async def test_the_book_returned_is_the_callers_own(depth_captures: list[Any], aredis: aioredis.Redis,
                                                    prefix: str) -> None:
    cap = longest(depth_captures)
    w = capture_entries(cap)
    key = f"{prefix}:binance:{cap.symbol}:depth"
    await xadd(aredis, key, w)
    first = await book_at(aredis, key, f"seq:{w.seqs[3]}")
    second = await book_at(aredis, key, f"seq:{w.seqs[5]}")
    assert same(first.book, w.books[3]) and same(second.book, w.books[5])


async def test_trimmed_history_is_history_trimmed_and_what_is_held_still_rebuilds(
    depth_captures: list[Any], aredis: aioredis.Redis, prefix: str
) -> None:
    cap = longest(depth_captures)
    w = capture_entries(cap, {40: "periodic"})
    key = f"{prefix}:binance:{cap.symbol}:depth"
    await xadd(aredis, key, w)
    periodic = w.at[40]
    assert (await book_at(aredis, key, f"seq:{w.seqs[10]}")).book == w.books[10]
    await aredis.xtrim(key, minid=w.ids[5], approximate=False)  # the start snapshot and the first diffs go
    for i in (0, 5, 10, periodic - 1):
        with pytest.raises(HistoryTrimmed) as info:
            await book_at(aredis, key, f"seq:{w.seqs[i]}")
        assert key in str(info.value)
    with pytest.raises(HistoryTrimmed):
        await book_at(aredis, key, w.ids[7])
    for i in (periodic, periodic + 3, len(w.ids) - 1):
        assert same((await book_at(aredis, key, f"seq:{w.seqs[i]}")).book, w.books[i])
    await aredis.xtrim(key, maxlen=0, approximate=False)
    with pytest.raises(HistoryTrimmed):
        await book_at(aredis, key)


async def test_no_book_where_the_stream_never_held_one(depth_captures: list[Any], aredis: aioredis.Redis,
                                                       prefix: str) -> None:
    cap = depth_captures[0]
    key = f"{prefix}:binance:{cap.symbol}:depth"
    with pytest.raises(NoBook, match="no such stream"):
        await book_at(aredis, key)
    w = capture_entries(cap)
    await xadd(aredis, key, w)
    with pytest.raises(NoBook, match="no snapshot at or before it"):
        await book_at(aredis, key, f"seq:{w.seqs[0] - 1}")
    with pytest.raises(ConfigError, match="not an order-book stream"):
        await book_at(aredis, f"{prefix}:binance:{cap.symbol}:trade")
    await aredis.set(f"{prefix}:binance:X:depth", "a string")
    with pytest.raises(ConfigError, match="not a stream"):
        await book_at(aredis, f"{prefix}:binance:X:depth")


async def test_a_stored_break_before_the_position_is_a_book_break(depth_captures: list[Any],
                                                                  aredis: aioredis.Redis, prefix: str) -> None:
    cap = longest(depth_captures)
    w = capture_entries(cap, {12: "lose", 30: "periodic"})
    key = f"{prefix}:binance:{cap.symbol}:depth"
    await xadd(aredis, key, w)
    assert same((await book_at(aredis, key, f"seq:{w.seqs[12]}")).book, w.books[12])
    with pytest.raises(BookBreak) as info:
        await book_at(aredis, key, f"seq:{w.seqs[13]}")
    assert info.value.kind == "gap"
    after = w.at[30]
    assert same((await book_at(aredis, key, f"seq:{w.seqs[after + 1]}")).book, w.books[after + 1])


def deep_book(levels: int) -> Book:
    book = Book()
    book.apply_snapshot(
        1000,
        [[f"{50000 - i}.12345678", f"{i + 1}.00000001"] for i in range(levels)],
        [[f"{50001 + i}.12345678", f"{i + 1}.00000001"] for i in range(levels)],
    )
    return book


async def test_a_depth_snapshot_over_the_tick_limit_is_read(aredis: aioredis.Redis, prefix: str) -> None:
    book = deep_book(3000)
    tick: Any = encode_snapshot(book, "start", venue="binance", symbol="BTCUSDT", link="next",
                                ts_event=1_700_000_000_000_000, ts_recv=1_700_000_000_000_000)
    raw = encode_tick(tick)
    assert MAX_ENTRY_BYTES < len(raw) < MAX_DEPTH_ENTRY_BYTES
    key = f"{prefix}:binance:BTCUSDT:depth"
    await aredis.xadd(key, {"d": raw}, id="1700000000000-1000")
    assert (await book_at(aredis, key)).book == book
    updates = follow_books(aredis, [key], block_ms=100)
    try:
        start = await next_update(updates)
        assert start.event == "start" and start.book == book
    finally:
        await updates.aclose()
    with pytest.raises(NoBook):  # refused unparsed under a smaller limit, so no snapshot is held
        await book_at(aredis, key, max_entry_bytes=len(raw) - 1)


# -- the live reader ----------------------------------------------------------------------------------------------


async def test_the_live_reader_follows_diffs_a_resync_and_a_break_until_the_next_snapshot(
    depth_captures: list[Any], aredis: aioredis.Redis, prefix: str
) -> None:
    cap = longest(depth_captures)
    # diffs 20 and 21 lost, the writer notices and stores a resync snapshot at 22; diff 40 lost unnoticed, so 41 breaks
    # the book until the periodic snapshot at 50
    w = capture_entries(cap, {20: "lose", 21: "lose", 22: "resync", 40: "lose", 50: "periodic"})
    key = f"{prefix}:binance:{cap.symbol}:depth"
    head = 10
    await xadd(aredis, key, w, 0, head)
    updates = follow_books(aredis, [key], block_ms=100)
    try:
        start = await next_update(updates)
        assert start.event == "start" and start.entry_id == w.ids[head - 1]
        assert same(start.book, w.books[head - 1]) and start.seq == w.seqs[head - 1]
        await xadd(aredis, key, w, head)
        resync, broken, periodic = w.at[22], w.at[41], w.at[50]
        assert [w.kinds[i] for i in (resync, broken, periodic)] == ["snapshot", "diff", "snapshot"]
        events = []
        for i in range(head, len(w.ids)):
            update = await next_update(updates)
            assert update.entry_id == w.ids[i]
            events.append(update.event)
            if i < broken or i >= periodic:
                assert same(update.book, w.books[i]), (i, update)
                assert update.seq == w.seqs[i]
            else:
                assert update.book is None and update.seq is None
                assert "waiting for the next snapshot" in update.detail
            if i == resync:
                assert (update.event, update.detail) == ("snapshot", "resync:gap")
            elif i == broken:
                assert update.event == "break" and "does not follow" in update.detail
            elif i == periodic:
                assert (update.event, update.detail) == ("snapshot", "periodic")
        assert events.count("break") == 1 and events.count("waiting") == periodic - broken - 1
        assert events.count("diff") == len(events) - 3 - events.count("waiting")
    finally:
        await updates.aclose()


async def test_the_live_reader_starts_several_keys_and_waits_for_a_missing_one(
    depth_captures: list[Any], aredis: aioredis.Redis, prefix: str
) -> None:
    caps = depth_captures[:2]
    written = [capture_entries(cap) for cap in caps]
    keys = [f"{prefix}:binance:{cap.symbol}:depth" for cap in caps]
    await xadd(aredis, keys[0], written[0])
    updates = follow_books(aredis, keys, block_ms=100)
    try:
        first, second = await next_update(updates), await next_update(updates)
        assert first.key == keys[0] and same(first.book, written[0].books[-1])
        assert second.key == keys[1] and second.book is None and "no such stream" in second.detail
        await xadd(aredis, keys[1], written[1], 0, 1)
        snapshot = await next_update(updates)
        assert (snapshot.key, snapshot.event) == (keys[1], "snapshot") and same(snapshot.book, written[1].books[0])
    finally:
        await updates.aclose()


async def test_a_deleted_stream_is_reset_and_started_again(depth_captures: list[Any], aredis: aioredis.Redis,
                                                           prefix: str) -> None:
    cap = longest(depth_captures)
    w = capture_entries(cap)
    key = f"{prefix}:binance:{cap.symbol}:depth"
    await xadd(aredis, key, w, 0, 5)
    updates = follow_books(aredis, [key], block_ms=100)
    try:
        assert same((await next_update(updates)).book, w.books[4])
        await aredis.delete(key)
        reset = await next_update(updates)
        assert reset.event == "reset"
        restarted = await next_update(updates)
        assert restarted.event == "start" and restarted.book is None
        # the writer starts again: IDs below the ones the reader had read are read too
        again = capture_entries(cap, {})
        await xadd(aredis, key, again, 0, 3)
        got = [await next_update(updates) for _ in range(3)]
        assert [u.event for u in got] == ["snapshot", "diff", "diff"]
        assert same(got[-1].book, again.books[2])
    finally:
        await updates.aclose()


async def test_a_stream_that_went_back_below_the_reader_is_reset(depth_captures: list[Any], aredis: aioredis.Redis,
                                                                prefix: str) -> None:
    cap = longest(depth_captures)
    w = capture_entries(cap)
    key = f"{prefix}:binance:{cap.symbol}:depth"
    await xadd(aredis, key, w, 0, 6)
    updates = follow_books(aredis, [key], block_ms=100)
    try:
        assert same((await next_update(updates)).book, w.books[5])
        # replaced in one step by a stream that ends below where the reader is: it never sees the key missing
        async with aredis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            for i in range(3):
                pipe.xadd(key, {"d": w.raw[i]}, id=w.ids[i])
            await pipe.execute()
        assert (await next_update(updates)).event == "reset"
        restarted = await next_update(updates)
        assert restarted.event == "start" and restarted.entry_id == w.ids[2] and same(restarted.book, w.books[2])
        await xadd(aredis, key, w, 3, 4)
        diff = await next_update(updates)
        assert diff.event == "diff" and same(diff.book, w.books[3])
    finally:
        await updates.aclose()


async def test_a_block_longer_than_the_clients_socket_timeout_is_not_an_error(
    depth_captures: list[Any], redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    cap = longest(depth_captures)
    w = capture_entries(cap)
    key = f"{prefix}:binance:{cap.symbol}:depth"
    name = f"{prefix}-reader"
    short = aioredis.Redis.from_url(redis_url, socket_timeout=0.2, client_name=name)
    try:
        await xadd(short, key, w, 0, 2)
        updates = follow_books(short, [key], block_ms=2000)
        try:
            assert same((await next_update(updates)).book, w.books[1])
            waiting = asyncio.ensure_future(next_update(updates))
            # until the reader has been blocked over a second (Redis counts idle in whole seconds): 5 socket timeouts
            async with asyncio.timeout(WAIT_S):
                while not any(c.get("name") == name and c.get("cmd") == "xread" and int(c.get("idle", 0)) >= 2
                              for c in await short.client_list()):
                    await asyncio.sleep(0.05)
            await xadd(short, key, w, 2, 3)
            diff = await waiting
            assert diff.event == "diff" and same(diff.book, w.books[2])
        finally:
            await updates.aclose()
    finally:
        await short.aclose()
    assert not [r for r in caplog.records if "follow_books_retry" in r.getMessage()]


async def test_the_live_reader_survives_a_redis_restart_without_its_data(
    depth_captures: list[Any], private_redis: RedisServer
) -> None:
    cap = longest(depth_captures)
    w = capture_entries(cap)
    key = f"t:binance:{cap.symbol}:depth"
    client = aioredis.Redis.from_url(private_redis.url)
    try:
        await xadd(client, key, w, 0, 8)
        updates = follow_books(private_redis.url, [key], block_ms=200)
        try:
            assert same((await next_update(updates)).book, w.books[7])
            private_redis.stop()
            restart(private_redis)  # no persistence: the stream is gone
            assert (await next_update(updates)).event == "reset"
            assert (await next_update(updates)).book is None
            await xadd(client, key, w, 0, 1)
            snapshot = await next_update(updates)
            assert snapshot.event == "snapshot" and same(snapshot.book, w.books[0])
        finally:
            await updates.aclose()
    finally:
        await client.aclose()


# -- the pure part ------------------------------------------------------------------------------------------------


def test_live_book_turns_every_entry_into_an_update(depth_captures: list[Any]) -> None:
    cap = longest(depth_captures)
    w = capture_entries(cap)
    live = LiveBook("md:binance:X:depth")
    assert live.take("1-1", w.raw[1]).event == "waiting"  # a diff before any snapshot
    assert live.take(w.ids[0], w.raw[0]).event == "snapshot"
    assert live.take(w.ids[1], w.raw[1]).event == "diff" and same(live.book, w.books[1])
    ignored = live.take(w.ids[1], w.raw[1])  # the same seq again
    assert ignored.event == "ignored" and same(ignored.book, w.books[1]) and "not above" in ignored.detail
    other = orjson.loads(w.raw[2])
    other["symbol"] = "OTHER"
    assert live.take(w.ids[2], orjson.dumps(other)).event == "ignored"
    assert live.take(w.ids[2], w.raw[2]).event == "diff" and same(live.book, w.books[2])
    broken = live.take(w.ids[3], b"not json")
    assert broken.event == "break" and broken.book is None and "not JSON" in broken.detail
    assert live.take(w.ids[4], None).event == "waiting"
    assert live.take(w.ids[0], w.raw[0]).event == "snapshot"  # a reader that lost the thread takes any snapshot
    small = LiveBook("md:binance:X:depth", max_entry_bytes=100)
    too_large = small.take(w.ids[0], w.raw[0])
    assert too_large.event == "waiting" and "too large" in too_large.detail


def test_entry_of_names_the_entry() -> None:
    with pytest.raises(InvalidBookEntry, match="entry 5-7: no field 'd'"):
        entry_of("5-7", None)
    with pytest.raises(InvalidBookEntry, match=r"entry 5-7: too large: 11 bytes \(a depth entry is at most 10\)"):
        entry_of(b"5-7", b"x" * 11, 10)
    with pytest.raises(InvalidBookEntry, match="entry 5-7: not a depth entry"):
        entry_of("5-7", b"{}")


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("md:binance:BTCUSDT:trade", "not an order-book stream"),
        ("md:binance:depth", "not a stream key"),
        ("bad prefix:binance:BTCUSDT:depth", "not a stream key"),
    ],
)
def test_check_depth_key_refuses(key: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        check_depth_key(key)


def test_check_depth_key_gives_the_prefix() -> None:
    assert check_depth_key("t1:okx:BTC-USDT:depth") == "t1"


async def test_follow_books_refuses_bad_arguments(aredis: aioredis.Redis) -> None:
    for keys, kwargs in (([], {}), (["md:a:B:depth", "md:a:B:depth"], {}), (["md:a:B:trade"], {}),
                         (["md:a:B:depth"], {"count": 0})):
        with pytest.raises(ConfigError):
            await anext(follow_books(aredis, keys, **kwargs))
