"""``market verify``: stored trade streams held to "every venue id once, in order, or marked", on real Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import orjson
import redis.asyncio as aioredis

from ops.verify import verify_streams


def trade(seq: int, **extra: Any) -> bytes:
    return orjson.dumps({"v": 1, "venue": "binance", "symbol": "BTCUSDT", "channel": "trade", "seq": seq,
                         "ts_event": seq, "ts_recv": seq, "trade_id": seq, "price": "1", "qty": "1", "side": "buy",
                         **extra})


def marker(first: int, last: int) -> bytes:
    return orjson.dumps({"v": 1, "venue": "binance", "symbol": "BTCUSDT", "channel": "trade", "seq": last,
                         "ts_event": last, "ts_recv": last, "gap_first": first, "gap_last": last,
                         "reason": "repair_failed"})


async def fill(r: aioredis.Redis, key: str, payloads: list[bytes]) -> None:
    for i, d in enumerate(payloads, start=1):
        await r.xadd(key, {"d": d}, id=f"{i}-{i}")


def market(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "MARKET_REDIS_URL": url})


async def test_a_whole_stream_with_a_marked_hole_holds(aredis: aioredis.Redis, prefix: str, redis_url: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:trade"
    await fill(aredis, key, [trade(10), trade(11), marker(12, 14), trade(15)])
    await aredis.xadd(f"{prefix}:binance:BTCUSDT:kline_1m", {"d": b"{}"})  # not a counted channel: not checked
    [v] = await verify_streams(aredis, prefix)
    assert (v.key, v.entries, v.stored, v.marked, v.markers, v.breaks, v.first_id, v.last_id) == (
        key, 4, 3, 3, 1, 0, 10, 15)
    proc = market("verify", "--prefix", prefix, "--json", url=redis_url)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [s["key"] for s in doc["streams"]] == [key] and doc["streams"][0]["breaks"] == 0


async def test_a_duplicate_a_hole_and_garbage_are_breaks(aredis: aioredis.Redis, prefix: str, redis_url: str) -> None:
    dup = f"{prefix}:binance:BTCUSDT:trade"
    hole = f"{prefix}:binance:ETHUSDT:agg_trade"
    await fill(aredis, dup, [trade(1), trade(2), trade(2), trade(3)])
    await fill(aredis, hole, [trade(1), trade(2), trade(5), b"not json"])
    by_key = {v.key: v for v in await verify_streams(aredis, prefix)}
    assert by_key[dup].breaks == 1 and by_key[dup].stored == 3
    assert by_key[dup].first_break == f"{dup} at entry 3-3: id 2 where 3 was due (stored twice or out of order)"
    assert by_key[hole].breaks == 2 and by_key[hole].invalid == 1
    assert by_key[hole].first_break == f"{hole} at entry 3-3: id 5 where 3 was due (missing 3..4)"
    proc = market("verify", "--prefix", prefix, url=redis_url)
    assert proc.returncode == 1
    assert f"first break: {dup} at entry 3-3" in proc.stdout
    # one stream by name: only it is checked
    only = market("verify", "--prefix", prefix, dup, "--json", url=redis_url)
    assert only.returncode == 1 and [s["key"] for s in json.loads(only.stdout)["streams"]] == [dup]


async def test_pages_of_entries_are_walked_whole(aredis: aioredis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:trade"
    pipe = aredis.pipeline(transaction=False)
    for i in range(1, 12_001):
        pipe.xadd(key, {"d": trade(i)}, id=f"{i}-0")
    await pipe.execute()
    [v] = await verify_streams(aredis, prefix)
    assert (v.entries, v.stored, v.breaks, v.last_id) == (12_000, 12_000, 0, 12_000)


def test_nothing_found_and_bad_input(prefix: str, redis_url: str) -> None:
    empty = market("verify", "--prefix", prefix, url=redis_url)
    assert empty.returncode == 1 and "no trade or agg_trade stream under prefix" in empty.stderr
    bad = market("verify", "--prefix", "no spaces", url=redis_url)
    assert bad.returncode == 2 and bad.stderr.startswith("market: error: invalid stream prefix")
    other = market("verify", "--prefix", prefix, "md:binance:BTCUSDT:trade", url=redis_url)
    assert other.returncode == 2 and "is not under --prefix" in other.stderr
