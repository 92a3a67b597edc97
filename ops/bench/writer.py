"""Redis tier benchmarks: our writer against the naive baseline, and the SDK reader.

``run_writer_bench``: a fixed set of normalized ticks (``ticks`` over ``streams`` streams,
interleaved as a feed delivers them) appended by :class:`distributor.writer.StreamWriter`
in batches, then, in the same run and on the same Redis, by the baseline feed handlers
commonly use: a redis-py pipeline of one ``XADD`` per tick with the tick's fields as
separate stream fields.  Both start from empty streams; the result is one flat dict.  On a
``redis+cluster://`` URL both run on the cluster (the baseline's pipeline is redis-py's cluster
pipeline: one round trip per node); ``run_writer_bench_on_cluster`` starts one for the run.

``run_reader_bench``: the same ticks read back through :class:`consumer_sdk.Consumer`
(``XREADGROUP``, decode, dedupe by seq, handler call, ``XACK``) until every one arrived.

``measure_flush``: what one writer flush costs by the number of streams it touches, next to a bare
``PING`` (the floor of the whole-path bench's Redis stage).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from consumer_sdk.consumer import Consumer
from consumer_sdk.core.redis import connect_redis, is_cluster
from consumer_sdk.core.tick import Tick
from distributor.writer import Retention, StreamWriter
from ops.bench.profiles import RETENTION_MAXLEN

__all__ = ["make_ticks", "measure_flush", "run_reader_bench", "run_writer_bench", "run_writer_bench_on_cluster"]

T0_US = 1_764_000_000_000_000


def make_ticks(n: int, streams: int) -> list[Tick]:
    """``n`` trade ticks over ``streams`` symbols, round-robin, seq and time increasing per stream."""
    out: list[Any] = []
    for i in range(n):
        s, k = i % streams, i // streams
        out.append({
            "v": 1, "venue": "binance", "symbol": f"SYM{s:04d}USDT", "channel": "trade", "seq": 1_000_000 + k,
            "ts_event": T0_US + k * 1000, "ts_recv": T0_US + k * 1000 + 150, "trade_id": 1_000_000 + k,
            "price": f"{27000 + (k % 100)}.{s:02d}000000", "qty": "0.01230000", "side": "buy" if k % 2 else "sell",
        })
    return out


async def _clear(redis: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(f"{prefix}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await redis.delete(*keys[i : i + 500])


async def _ours(redis: aioredis.Redis, ticks: list[Tick], prefix: str, batch: int) -> float:
    writer = StreamWriter(redis, prefix=prefix, retention=Retention(maxlen=0))
    started = time.perf_counter()
    for i in range(0, len(ticks), batch):
        await writer.append(ticks[i : i + batch])
    elapsed = time.perf_counter() - started
    assert writer.appended == len(ticks), (writer.appended, len(ticks))
    return elapsed


async def _baseline(redis: aioredis.Redis, ticks: list[Tick], prefix: str, batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(ticks), batch):
        pipe = redis.pipeline(transaction=False)
        for t in ticks[i : i + batch]:
            fields: Any = {k: (str(v) if not isinstance(v, str) else v) for k, v in t.items()}
            pipe.xadd(f"{prefix}:{t['venue']}:{t['symbol']}:{t['channel']}", fields)
        await pipe.execute()
    return time.perf_counter() - started


async def run_writer_bench(
    redis_url: str, *, ticks: int = 500_000, streams: int = 100, batch: int = 20_000, baseline_batch: int = 1000
) -> dict[str, Any]:
    data = make_ticks(ticks, streams)
    redis = await connect_redis(redis_url, socket_timeout=60)
    ours_prefix, base_prefix = f"bench-w-{uuid.uuid4().hex[:8]}", f"bench-b-{uuid.uuid4().hex[:8]}"
    try:
        info = await redis.info("server")
        cluster = is_cluster(redis)
        masters = len(redis.get_primaries()) if isinstance(redis, RedisCluster) else 1
        ours_s = await _ours(redis, data, ours_prefix, batch)
        stored = sum([await redis.xlen(f"{ours_prefix}:binance:SYM{s:04d}USDT:trade") for s in range(streams)])
        again = StreamWriter(redis, prefix=ours_prefix, retention=Retention(maxlen=0))
        added, dups = await again.append(data[: min(batch, len(data))])
        await _clear(redis, ours_prefix)
        base_s = await _baseline(redis, data, base_prefix, baseline_batch)
        await _clear(redis, base_prefix)
    finally:
        await _clear(redis, ours_prefix)
        await _clear(redis, base_prefix)
        await redis.aclose()
    return {
        "bench": "writer", "ticks": ticks, "streams": streams, "batch": batch,
        "ticks_per_s": round(ticks / ours_s), "baseline_ticks_per_s": round(ticks / base_s),
        "ratio": round(base_s / ours_s, 2), "stored": stored, "replayed_batch_added": added,
        "replayed_batch_duplicates": dups, "redis_version": info.get("redis_version"), "cluster": cluster,
        "masters": masters,
    }


async def run_writer_bench_on_cluster(masters: int, replicas: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`run_writer_bench` on a cluster of ``masters`` masters with ``replicas`` replicas each, started on
    this machine for the run and stopped after (:func:`ops.redis_cluster.start_cluster`)."""
    from ops.redis_cluster import start_cluster

    with start_cluster(masters, replicas) as cluster:
        url = "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in cluster.nodes[:masters])
        return await run_writer_bench(url, **kwargs) | {"replicas": replicas}


async def run_reader_bench(
    redis_url: str, *, ticks: int = 500_000, streams: int = 100, count: int = 5000
) -> dict[str, Any]:
    data = make_ticks(ticks, streams)
    redis = aioredis.Redis.from_url(redis_url, socket_timeout=60)
    prefix = f"bench-r-{uuid.uuid4().hex[:8]}"
    try:
        await _ours(redis, data, prefix, 20_000)
        received = 0
        done = asyncio.Event()

        def handler(tick: Tick) -> None:
            nonlocal received
            received += 1
            if received >= ticks:
                done.set()

        consumer = Consumer(
            redis_url=redis_url, patterns=[f"{prefix}:binance:*:trade"], prefix=prefix, group="bench",
            consumer="bench-1", start_id="0", count=count, block_ms=100, rescan_s=60.0,
        )
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(consumer.run(handler))
            async with asyncio.timeout(300):
                await done.wait()
                while consumer.stats().acked < ticks:  # noqa: ASYNC110 - the consumer exposes counters, no event
                    await asyncio.sleep(0.001)
            elapsed = time.perf_counter() - started
            consumer.stop()
            task.cancel()
        stats = consumer.stats()
        pending = sum([int((await redis.xpending(k, "bench"))["pending"]) for k in
                       [f"{prefix}:binance:SYM{s:04d}USDT:trade" for s in range(streams)]])
    finally:
        await _clear(redis, prefix)
        await redis.aclose()
    return {
        "bench": "reader", "ticks": ticks, "streams": streams, "count": count,
        "ticks_per_s": round(ticks / elapsed), "received": received, "duplicates": stats.duplicates,
        "gaps": stats.gaps, "pending_after": pending,
    }


async def measure_flush(redis_url: str, *, repeats: int = 30) -> dict[str, Any]:
    """Where the Redis stage's time goes: how long one writer flush (one round trip, one script call for
    every stream it touches) takes by the number of streams it touches, next to a bare PING round trip."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    prefix = f"bench-f{uuid.uuid4().hex[:10]}"
    out: dict[str, Any] = {"repeats": repeats, "flush_p50_us": {}, "flush_p90_us": {}}
    try:
        writer = StreamWriter(client, prefix=prefix, retention=Retention(maxlen=RETENTION_MAXLEN))
        sizes = (1, 5, 20, 60)
        ticks = make_ticks(60 * (1 + repeats * len(sizes)), 60)
        await writer.append(ticks[:60])  # streams and script in place
        at = 60
        for n in sizes:
            times = []
            for _ in range(repeats):
                batch = ticks[at : at + 60][:n]  # one tick on each of n streams
                at += 60
                started = time.perf_counter()
                await writer.append(batch)
                times.append((time.perf_counter() - started) * 1e6)
            times.sort()
            out["flush_p50_us"][str(n)] = round(times[len(times) // 2])
            out["flush_p90_us"][str(n)] = round(times[int(len(times) * 0.9)])
        pings = []
        for _ in range(repeats * 4):
            started = time.perf_counter()
            await client.ping()
            pings.append((time.perf_counter() - started) * 1e6)
        pings.sort()
        out["ping_p50_us"] = round(pings[len(pings) // 2])
    finally:
        with contextlib.suppress(OSError, aioredis.RedisError):
            keys = [k async for k in client.scan_iter(f"{prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        await client.aclose()
    return out
