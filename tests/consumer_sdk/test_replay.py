"""consumer_sdk.replay: bound parsing and trimming decisions (pure), then ranges, tails and copies on Redis."""

from __future__ import annotations

import asyncio
import math
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from consumer_sdk import (
    Bound,
    ConfigError,
    InvalidTick,
    Tick,
    TransientError,
    TrimmedError,
    decode_tick,
    encode_tick,
    follow,
    parse_bound,
    read_range,
    republish,
    resolve_bound,
)
from consumer_sdk.core.redis import MAX_SEQ, StreamView
from consumer_sdk.poison import PoisonedEntry
from consumer_sdk.replay import start_trimmed, trimmed_between
from tests.consumer_sdk.conftest import REDIS_URL

BASE_MS = 1_700_000_000_000
UNIT = 1.0


def make_tick(seq: int, ms: int, symbol: str = "BTCUSDT") -> Tick:
    tick: dict[str, Any] = {
        "v": 1, "venue": "binance", "symbol": symbol, "channel": "trade", "seq": seq,
        "ts_event": ms * 1000, "ts_recv": ms * 1000 + 3, "trade_id": seq, "price": "1.5", "qty": "2", "side": "sell",
    }
    return tick  # type: ignore[return-value]


async def add(client: Any, key: str, rows: list[tuple[int, int]]) -> list[str]:
    """Entries ``(ms, seq)``; returns their IDs."""
    ids = []
    async with client.pipeline(transaction=False) as pipe:
        for ms, seq in rows:
            ids.append(f"{ms}-{seq}")
            pipe.xadd(key, {"d": encode_tick(make_tick(seq, ms))}, id=ids[-1])
        await pipe.execute()
    return ids


def uneven_rows() -> list[tuple[int, int]]:
    """300 entries: bursts sharing one millisecond, long silences, and seqs that skip."""
    rows, ms, seq = [], BASE_MS, 0
    for i in range(300):
        seq += 1 if i % 7 else 3
        if i % 50 == 0:
            ms += 86_400_000  # a day of silence
        elif i % 9 == 0:
            ms += 1
        rows.append((ms, seq))
    return rows


# ---------------------------------------------------------------- parse_bound


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("1700000000000", False, Bound("ms", False, ms=1_700_000_000_000, text="1700000000000")),
        ("0", False, Bound("open", False, text="-")),
        ("0", True, Bound("ms", True, ms=0, text="0")),
        ("2023-11-14T22:13:20Z", False, Bound("ms", False, ms=1_700_000_000_000, text="2023-11-14T22:13:20Z")),
        ("2023-11-14T22:13:20+00:00", True, Bound("ms", True, ms=1_700_000_000_000, text="2023-11-14T22:13:20+00:00")),
        ("2023-11-14T22:13:20", False, Bound("ms", False, ms=1_700_000_000_000, text="2023-11-14T22:13:20")),
        (
            "2023-11-14T23:13:20.250+01:00",
            False,
            Bound("ms", False, ms=1_700_000_000_250, text="2023-11-14T23:13:20.250+01:00"),
        ),
        ("2023-11-14", False, Bound("ms", False, ms=1_699_920_000_000, text="2023-11-14")),
        ("seq:42", True, Bound("seq", True, seq=42, text="seq:42")),
        ("1700000000000-7", False, Bound("id", False, ms=1_700_000_000_000, seq=7, text="1700000000000-7")),
        ("-", False, Bound("open", False, text="-")),
        ("+", True, Bound("open", True, text="+")),
        (" seq:1 ", False, Bound("seq", False, seq=1, text="seq:1")),
    ],
)
def test_parse_bound_accepts(text: str, end: bool, expected: Bound) -> None:
    assert parse_bound(text, end=end) == expected


@pytest.mark.parametrize(
    ("text", "end"),
    [
        ("", False), ("yesterday", False), ("seq:", False), ("seq:-1", False), ("seq:x", False),
        ("-5", False), ("1.5", False), ("1700000000", False),  # seconds, not milliseconds
        ("+", False), ("-", True), ("1969-12-31T00:00:00Z", False), (f"1-{MAX_SEQ + 1}", False),
        ("2023-13-01", False),
    ],
)
def test_parse_bound_rejects_with_config_error(text: str, end: bool) -> None:
    with pytest.raises(ConfigError):
        parse_bound(text, end=end)


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_iso_and_epoch_ms_agree(ms: int) -> None:
    iso = datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    as_iso = parse_bound(iso, end=False)
    assert as_iso.kind == "ms" and abs(as_iso.ms - ms) <= 1  # float rendering may round the last ms
    if ms >= 100_000_000_000:
        assert parse_bound(str(ms), end=False).ms == ms


@given(st.text(max_size=40))
def test_parse_bound_only_ever_raises_config_error(text: str) -> None:
    try:
        bound = parse_bound(text, end=True)
    except ConfigError:
        return
    assert bound.kind in ("open", "ms", "seq", "id")


def test_static_ids() -> None:
    assert parse_bound("0", end=False).static_id() == (0, 0)
    assert parse_bound("0", end=True).static_id() == (0, MAX_SEQ)
    assert Bound("id", True, ms=5, seq=6).static_id() == (5, 6)
    assert parse_bound("100000000000", end=True).static_id() == (100_000_000_000, MAX_SEQ)
    assert parse_bound("seq:3", end=False).static_id() is None
    assert parse_bound("+", end=True).static_id() == (MAX_SEQ, MAX_SEQ)


# ---------------------------------------------------------------- trimming decisions


def view(first: tuple[int, int] | None = (50, 50), last: tuple[int, int] | None = (100, 100), length: int = 51,
         max_deleted: tuple[int, int] | None = None, added: int | None = 100) -> StreamView:
    return StreamView(first, last, length, max_deleted, added)


def test_start_trimmed() -> None:
    at = lambda t: parse_bound(t, end=False)  # noqa: E731
    assert start_trimmed(Bound("id", False, ms=10, seq=10), view())
    assert not start_trimmed(Bound("id", False, ms=50, seq=50), view())
    assert not start_trimmed(Bound("id", False, ms=10, seq=10), view(length=100))  # nothing ever removed
    assert not start_trimmed(Bound("id", False, ms=10, seq=10), view(added=None))  # Redis < 7: cannot tell
    assert start_trimmed(Bound("id", False, ms=10, seq=10), view(added=None, max_deleted=(20, 20)))
    assert not start_trimmed(at("-"), view())
    assert start_trimmed(at("seq:49"), view()) and not start_trimmed(at("seq:50"), view())
    assert start_trimmed(at("seq:100"), view(first=None, length=0))  # emptied
    assert not start_trimmed(at("seq:101"), view(first=None, length=0))
    assert start_trimmed(Bound("ms", False, ms=100), view(first=None, length=0))


def test_trimmed_between_pages() -> None:
    end = (MAX_SEQ, MAX_SEQ)
    after = (20, 20)
    assert not trimmed_between(after, (21, 21), end, view(first=(1, 1)))  # nothing passed the cursor
    assert not trimmed_between(after, (21, 21), end, view(first=(21, 21)))  # trimmed only what was read
    assert trimmed_between(after, (60, 60), end, view(first=(60, 60)))  # 21..59 trimmed before the page
    assert not trimmed_between(after, (25, 25), end, view(first=(1, 1)))  # a venue gap, no trimming
    assert trimmed_between(after, (25, 25), end, view(first=(1, 1), max_deleted=(22, 22)))  # XDEL in between
    assert not trimmed_between(after, (25, 25), end, view(first=(1, 1), max_deleted=(26, 26)))
    assert trimmed_between(after, None, end, view(first=None, length=0))  # emptied after more was added
    assert not trimmed_between((100, 100), None, end, view(first=None, length=0))


# ---------------------------------------------------------------- resolve_bound


def linear_first(rows: list[tuple[int, int]], n: int) -> str:
    for ms, seq in rows:
        if seq >= n:
            return f"{ms}-{seq}"
    last = rows[-1]
    return f"{last[0]}-{last[1] + 1}"


def linear_last(rows: list[tuple[int, int]], n: int) -> str:
    found = "0-0"
    for ms, seq in rows:
        if seq <= n:
            found = f"{ms}-{seq}"
    return found


async def test_seq_bounds_by_binary_search_on_uneven_ms(
    rc: aioredis.Redis, pfx: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    rows = uneven_rows()
    await add(rc, key, rows)
    probes: list[int] = []
    real_xrange = rc.xrange

    def counting(*args: Any, **kwargs: Any) -> Any:
        probes.append(1)
        return real_xrange(*args, **kwargs)

    monkeypatch.setattr(rc, "xrange", counting)
    span = rows[-1][0] - rows[0][0]
    worst = 0
    for n in [0, 1, 2, 3, 4, 5, 50, 51, 52, 150, 300, rows[-1][1] - 1, rows[-1][1], rows[-1][1] + 1, 10**9]:
        probes.clear()
        assert await resolve_bound(rc, key, f"seq:{n}", end=False) == linear_first(rows, n), n
        worst = max(worst, len(probes))
        probes.clear()
        assert await resolve_bound(rc, key, f"seq:{n}", end=True) == linear_last(rows, n), n
        worst = max(worst, len(probes))
    assert worst <= math.ceil(math.log2(span)) + 3  # O(log span) round trips, not a scan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3)), min_size=1, max_size=40),
    n=st.integers(0, 130),
)
def test_seq_search_matches_a_scan(steps: list[tuple[int, int]], n: int) -> None:
    rows, ms, seq = [], 1000, 0
    for dms, dseq in steps:
        ms += dms
        seq += dseq
        rows.append((ms, seq))

    async def check() -> None:
        client = fakeredis.FakeAsyncRedis()
        await add(client, "md:v:S:trade", rows)
        assert await resolve_bound(client, "md:v:S:trade", f"seq:{n}", end=False) == linear_first(rows, n)
        assert await resolve_bound(client, "md:v:S:trade", f"seq:{n}", end=True) == linear_last(rows, n)
        await client.aclose()

    asyncio.run(check())


async def test_resolve_other_bounds(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    assert await resolve_bound(rc, key, "seq:5", end=False) == "-"  # no stream yet
    assert await resolve_bound(rc, key, "seq:5", end=True) == "+"
    assert await resolve_bound(rc, key, "-", end=False) == "-"
    assert await resolve_bound(rc, key, parse_bound("+", end=True)) == "+"
    assert await resolve_bound(rc, key, "1700000000000", end=False) == "1700000000000-0"
    assert await resolve_bound(rc, key, "1700000000000", end=True) == f"1700000000000-{MAX_SEQ}"
    assert await resolve_bound(rc, key, "2023-11-14T22:13:20Z", end=False) == "1700000000000-0"


# ---------------------------------------------------------------- read_range


async def collect(it: AsyncIterator[tuple[str, Tick]]) -> list[tuple[str, Tick]]:
    return [row async for row in it]


async def test_ranges_by_ms_iso_and_seq_match_xrange(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    rows = uneven_rows()
    await add(rc, key, rows)

    async def expect(lo: str, hi: str) -> list[tuple[str, Tick]]:
        return [(eid.decode(), decode_tick(f[b"d"])) for eid, f in await rc.xrange(key, lo, hi)]

    a, b = rows[40], rows[200]
    iso = lambda ms: datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds")  # noqa: E731
    cases = [
        ((str(a[0]), str(b[0])), (str(a[0]), str(b[0]))),
        ((iso(a[0]), iso(b[0])), (str(a[0]), str(b[0]))),
        ((f"seq:{a[1]}", f"seq:{b[1]}"), (f"{a[0]}-{a[1]}", f"{b[0]}-{b[1]}")),
        (("-", "+"), ("-", "+")),
        ((f"seq:{a[1]}", "+"), (f"{a[0]}-{a[1]}", "+")),
        ((f"{a[0]}-{a[1]}", f"seq:{b[1] + 1}"), (f"{a[0]}-{a[1]}", linear_last(rows, b[1] + 1))),
        ((f"seq:{a[1] + 1}", f"seq:{b[1] - 1}"), (linear_first(rows, a[1] + 1), linear_last(rows, b[1] - 1))),
    ]
    for (start, end), (lo, hi) in cases:
        got = await collect(read_range(rc, key, start, end, page=37))
        assert got == await expect(lo, hi), (start, end)
        assert got
    assert await collect(read_range(rc, key, str(b[0]), str(a[0]))) == []


async def test_paging_reports_progress(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, [(BASE_MS + s, s) for s in range(1, 101)])
    calls: list[tuple[int, int | None]] = []
    got = await collect(read_range(rc, key, "seq:11", "seq:90", page=25, progress=lambda d, t: calls.append((d, t))))
    assert [t["seq"] for _i, t in got] == list(range(11, 91))
    assert calls == [(25, 80), (50, 80), (75, 80), (80, 80)]
    with pytest.raises(ConfigError):
        await collect(read_range(rc, key, "-", "+", page=0))


async def test_entries_that_are_not_ticks_stop_the_range_or_are_skipped_across_pages(
    rc: aioredis.Redis, pfx: str
) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, [(BASE_MS + s, s) for s in range(1, 4)])
    await rc.xadd(key, {"d": b"{broken"}, id=f"{BASE_MS + 3}-100")
    await rc.xadd(key, {"x": b"1"}, id=f"{BASE_MS + 3}-101")
    await rc.xadd(key, {"d": b"0" * 70_000}, id=f"{BASE_MS + 3}-102")  # over the 64 KiB cap: never parsed
    await add(rc, key, [(BASE_MS + s, s) for s in range(4, 6)])
    with pytest.raises(PoisonedEntry) as caught:
        await collect(read_range(rc, key, "-", "+", page=2))
    assert str(caught.value).startswith(f"{key} {BASE_MS + 3}-100: not JSON") and caught.value.kind == "not_json"
    assert isinstance(caught.value, InvalidTick)
    bad: list[tuple[str, str, str]] = []
    got = await collect(read_range(rc, key, "-", "+", page=2, on_invalid=lambda k, i, e: bad.append((k, i, e.kind))))
    assert [(i, t["seq"]) for i, t in got] == [(f"{BASE_MS + s}-{s}", s) for s in range(1, 6)]
    assert bad == [(key, f"{BASE_MS + 3}-{n}", kind) for n, kind in ((100, "not_json"), (101, "no_field"),
                                                                     (102, "too_large"))]


async def test_trimmed_start_is_an_error(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, [(BASE_MS + s, s) for s in range(1, 101)])
    assert len(await collect(read_range(rc, key, str(BASE_MS), "+"))) == 100  # before the first, never trimmed
    await rc.xtrim(key, maxlen=50, approximate=False)
    for start in (str(BASE_MS + 10), "seq:10", f"{BASE_MS + 10}-10", "2023-11-14T22:13:20.010Z"):
        with pytest.raises(TrimmedError) as err:
            await collect(read_range(rc, key, start, "+"))
        assert err.value.key == key and err.value.first_missing == start
        assert err.value.first_available == f"{BASE_MS + 51}-51"
    assert len(await collect(read_range(rc, key, "-", "+"))) == 50
    assert len(await collect(read_range(rc, key, "0", "+"))) == 50  # "0" is the oldest held, as in XRANGE
    assert len(await collect(read_range(rc, key, "seq:51", "+"))) == 50
    assert len(await collect(read_range(rc, key, str(BASE_MS + 60), "+"))) == 41


async def test_trimmed_while_reading_is_an_error(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, [(BASE_MS + s, s) for s in range(1, 101)])
    got: list[int] = []
    with pytest.raises(TrimmedError) as err:
        async for _eid, tick in read_range(rc, key, "-", "+", page=10):
            got.append(tick["seq"])
            if tick["seq"] == 10:
                await rc.xtrim(key, maxlen=30, approximate=False)  # the writer outruns the reader
    assert got == list(range(1, 11))
    assert err.value.first_missing == f"{BASE_MS + 10}-11"
    assert err.value.first_available == f"{BASE_MS + 71}-71"


async def test_errors_are_translated(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await rc.set(key, b"not a stream")
    with pytest.raises(ConfigError):
        await collect(read_range(rc, key, "-", "+"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = aioredis.Redis(port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    with pytest.raises(TransientError):
        await collect(read_range(down, key, "-", "+"))
    with pytest.raises(TransientError):
        await resolve_bound(down, key, "seq:1", end=False)
    with pytest.raises(TransientError):
        async for _ in follow(down, [key]):
            pass
    await down.aclose()


# ---------------------------------------------------------------- follow


async def test_follow_from_now_from_a_time_and_across_keys(rc: aioredis.Redis, pfx: str) -> None:
    btc, eth = f"{pfx}:binance:BTCUSDT:trade", f"{pfx}:binance:ETHUSDT:trade"
    await add(rc, btc, [(BASE_MS + s, s) for s in range(1, 11)])
    await rc.xadd(eth, {"d": b"junk"}, id=f"{BASE_MS + 1}-1")
    bad: list[tuple[str, str]] = []

    async def take(it: AsyncIterator[tuple[str, str, Tick]], n: int) -> list[tuple[str, str, int]]:
        out: list[tuple[str, str, int]] = []
        async with asyncio.timeout(5 * UNIT):
            async for key, eid, tick in it:
                out.append((key, eid, tick["seq"]))
                if len(out) == n:
                    break
        await it.aclose()  # type: ignore[attr-defined]
        return out

    reads = 0
    real_xread = rc.xread

    def counting_xread(*args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return real_xread(*args, **kwargs)

    rc.xread = counting_xread  # type: ignore[method-assign]
    live = follow(rc, [btc, eth], block_ms=200, on_invalid=lambda k, i, _e: bad.append((k, i)))
    from_time = follow(REDIS_URL, [btc], start=str(BASE_MS + 8), block_ms=200)
    from_seq = follow(rc, [btc], start="seq:9", block_ms=200)
    everything = follow(rc, [btc, eth], start="-", block_ms=200, on_invalid=lambda k, i, _e: bad.append((k, i)))
    tasks = [asyncio.create_task(take(it, n)) for it, n in ((live, 3), (from_time, 5), (from_seq, 4), (everything, 13))]
    # The live tail has resolved "$" once it issued its first XREAD.
    async with asyncio.timeout(5 * UNIT):
        while reads < 3:
            await asyncio.sleep(0.01)  # poll
    await add(rc, btc, [(BASE_MS + 11, 11)])
    await add(rc, eth, [(BASE_MS + 12, 2)])
    await add(rc, btc, [(BASE_MS + 13, 12)])
    got_live, got_time, got_seq, got_all = await asyncio.gather(*tasks)
    assert sorted((k, s) for k, _e, s in got_live) == [(btc, 11), (btc, 12), (eth, 2)]
    assert [s for _k, _e, s in got_time] == [8, 9, 10, 11, 12]
    assert [s for _k, _e, s in got_seq] == [9, 10, 11, 12]
    assert [s for k, _e, s in got_all if k == btc] == list(range(1, 13))
    assert [s for k, _e, s in got_all if k == eth] == [2]
    assert got_live[0][1] == f"{BASE_MS + 11}-11"
    assert (eth, f"{BASE_MS + 1}-1") in bad


async def test_follow_refuses_a_trimmed_start(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, [(BASE_MS + s, s) for s in range(1, 21)])
    await rc.xtrim(key, maxlen=5, approximate=False)
    with pytest.raises(TrimmedError):
        async for _ in follow(rc, [key], start="seq:3"):
            pass
    with pytest.raises(ConfigError):
        async for _ in follow(rc, []):
            pass


# ---------------------------------------------------------------- republish


async def test_republish_keeps_ids_and_adds_only_what_is_missing(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    target = f"{pfx}copy:binance:BTCUSDT:trade"
    await add(rc, key, [(BASE_MS + s, s) for s in range(1, 51)])
    assert await republish(rc, key, "seq:11", "seq:30", target_prefix=f"{pfx}copy", page=7) == 20
    assert await rc.xrange(target) == await rc.xrange(key, f"{BASE_MS + 11}-11", f"{BASE_MS + 30}-30")
    assert await republish(rc, key, "seq:11", "seq:30", target_prefix=f"{pfx}copy") == 0
    assert await republish(rc, key, "seq:1", "+", target_prefix=f"{pfx}copy") == 20  # only after the target's last
    assert [int(e.split(b"-")[1]) for e, _f in await rc.xrange(target)] == list(range(11, 51))
    with pytest.raises(ConfigError):
        await republish(rc, key, "-", "+", target_prefix=pfx)
    with pytest.raises(ConfigError):
        await republish(rc, key, "-", "+", target_prefix="a:b")


def test_bound_is_frozen() -> None:
    bound = parse_bound("seq:1", end=False)
    with pytest.raises(AttributeError):
        bound.seq = 2  # type: ignore[misc]
