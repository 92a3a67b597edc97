"""The whole path on the real Redis: simulator -> ingestor -> Redis Streams, checked against CONTRACT.md."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk.keys import parse_entry_id
from consumer_sdk.tick import BASE_FIELDS, channel_fields, decode_tick
from ingestor.config import load_settings
from ingestor.service import Ingestor
from ops.redis_server import free_port
from ops.simulator import Simulator, SimulatorConfig

SYMBOLS = ("BTCUSDT", "ETHUSDT")
CHANNELS = ("trade", "agg_trade", "book_ticker", "kline_1m")


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(symbols=SYMBOLS, rate=2000.0, seed=7, kline_update_ms=200)) as sim:
        yield sim


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    """Poll an async predicate until true; fail naming ``what`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)
    assert await predicate(), what


def rest_get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=5) as resp:
        return json.loads(resp.read())


async def check_stream(redis: aioredis.Redis, key: str) -> list[dict[str, Any]]:
    """Every entry matches the contract: ID <ms>-<seq>, one field d, tick fields exact, seq strictly increasing."""
    entries = await redis.xrange(key, "-", "+")
    assert entries, f"{key} is empty"
    _, venue, symbol, channel = key.split(":")
    ticks = []
    last_ms, last_seq = -1, -1
    for raw_id, fields in entries:
        ms, seq = parse_entry_id(raw_id)
        assert set(fields) == {b"d"}
        tick: Any = decode_tick(fields[b"d"])
        assert list(tick) == [*BASE_FIELDS, *channel_fields(channel)]
        assert (tick["v"], tick["venue"], tick["symbol"], tick["channel"]) == (1, venue, symbol, channel)
        assert tick["seq"] == seq
        assert seq > last_seq and ms >= last_ms
        assert ms >= tick["ts_event"] // 1000 or ms == last_ms
        last_ms, last_seq = ms, seq
        ticks.append(tick)
    return ticks


async def test_ingestor_to_redis_matches_contract(simulator: Simulator, aredis: aioredis.Redis, prefix: str) -> None:
    settings = load_settings(
        {"url": simulator.ws_url, "symbols": ",".join(SYMBOLS), "channels": ",".join(CHANNELS), "prefix": prefix},
        {"MARKET_REDIS_URL": os.environ.get("MARKET_REDIS_URL", "redis://127.0.0.1:6379/0")},
    )
    ingestor = Ingestor(settings, redis=aredis)
    task = asyncio.create_task(ingestor.run())
    keys = [f"{prefix}:binance:{s}:{c}" for s in SYMBOLS for c in CHANNELS]

    async def enough() -> bool:
        lengths = [await aredis.xlen(k) for k in keys]
        return all(n >= 3 for n in lengths) and min(lengths[0], lengths[4]) >= 200

    try:
        await wait_for(enough, 20, "every stream filled")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    for key in keys:
        ticks = await check_stream(aredis, key)
        channel = key.rsplit(":", 1)[1]
        symbol = key.split(":")[2]
        if channel == "kline_1m":
            # A kline's seq is its event time in ms: the same for every ingestor, increasing per stream.
            assert all(t["seq"] * 1000 == t["ts_event"] for t in ticks)
        if channel == "trade":
            # Every trade id the venue made between the first and the last stored one, exactly once, in order.
            ids = [t["trade_id"] for t in ticks]
            assert ids == list(range(ids[0], ids[0] + len(ids)))
            path = f"/api/v3/historicalTrades?symbol={symbol}&fromId={ids[0]}&limit=100"
            venue_trades = await asyncio.to_thread(rest_get, simulator.rest_url, path)
            assert len(venue_trades) == 100
            by_id = {t["trade_id"]: t for t in ticks}
            for vt in venue_trades:
                if vt["id"] in by_id:
                    mine = by_id[vt["id"]]
                    assert (mine["price"], mine["qty"]) == (vt["price"], vt["qty"])
                    assert mine["side"] == ("sell" if vt["isBuyerMaker"] else "buy")
                    assert mine["ts_event"] == vt["time"] * 1000
    stats = ingestor.stats()
    assert stats.malformed == 0
    assert stats.ticks > 0 and ingestor.sequencer.stats().duplicates == 0


async def test_restart_continues_without_duplicates(simulator: Simulator, aredis: aioredis.Redis, prefix: str) -> None:
    """A second ingestor run on the same streams stores nothing twice, klines included."""
    settings = load_settings(
        {"url": simulator.ws_url, "symbols": "BTCUSDT", "channels": "trade,kline_1m", "prefix": prefix}, {}
    )
    trade_key, kline_key = f"{prefix}:binance:BTCUSDT:trade", f"{prefix}:binance:BTCUSDT:kline_1m"
    for round_ in range(2):
        ingestor = Ingestor(settings, redis=aredis)
        task = asyncio.create_task(ingestor.run())
        target = 100 * (round_ + 1)

        async def grown(target: int = target, klines: int = 2 * (round_ + 1)) -> bool:
            return await aredis.xlen(trade_key) >= target and await aredis.xlen(kline_key) >= klines

        try:
            await wait_for(grown, 20, "streams grew")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    await check_stream(aredis, trade_key)
    klines = await check_stream(aredis, kline_key)
    assert len({t["seq"] for t in klines}) == len(klines)


def test_cli_ingest_tail_and_replay(simulator_port_rest: tuple[int, str], redis_url: str, tmp_path: Any) -> None:
    """`market ingest` as a process; `market tail` prints JSON lines; `market replay` equals XRANGE."""
    port, _ = simulator_port_rest
    env = {**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": "md"}
    import redis as sync_redis

    r = sync_redis.Redis.from_url(redis_url)
    key = "md:binance:BNBUSDT:trade"
    r.delete(key)
    metrics_port = free_port()
    log_file = open(tmp_path / "ingest.log", "wb")  # noqa: SIM115
    ingest = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "ingest", "--url", f"ws://127.0.0.1:{port}", "--symbols", "BNBUSDT",
         "--channels", "trade", "--metrics-port", str(metrics_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=log_file,
    )
    tail = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "tail", key], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert tail.stdout is not None
        lines = [tail.stdout.readline() for _ in range(20)]
        for line in lines:
            obj = orjson.loads(line)
            assert obj["key"] == key and obj["tick"]["symbol"] == "BNBUSDT"
            assert obj["id"] == f"{obj['id'].split('-')[0]}-{obj['tick']['seq']}"
        deadline = time.monotonic() + 20
        while r.xlen(key) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for name in ("market_published_total", "market_ingest_latency_us_bucket", "broker_reconnect_total"):
            assert name in text
    finally:
        tail.terminate()
        ingest.terminate()
        ingest.wait(15)
        tail.communicate(timeout=15)
        log_file.close()
    ingest_log = (tmp_path / "ingest.log").read_text()
    assert ingest.returncode == 0, "\n".join(line for line in ingest_log.splitlines() if not line.startswith("{"))
    assert '"level":"error"' not in ingest_log, ingest_log[-3000:]
    assert tail.returncode in (0, -15)
    entries = r.xrange(key, "-", "+")
    assert len(entries) >= 300
    start_ms = int(entries[50][0].split(b"-")[0])
    end_ms = int(entries[250][0].split(b"-")[0])
    want = r.xrange(key, start_ms, end_ms)
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "replay", key, "--start", str(start_ms), "--end", str(end_ms)],
        env=env, capture_output=True, timeout=30, check=True,
    )
    got = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [g["id"] for g in got] == [w[0].decode() for w in want]
    assert [g["tick"] for g in got] == [orjson.loads(w[1][b"d"]) for w in want]
    seq_out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "replay", key, "--start", f"seq:{got[10]['tick']['seq']}",
         "--end", f"seq:{got[20]['tick']['seq']}", "--format", "csv"],
        env=env, capture_output=True, timeout=30, check=True, text=True,
    )
    rows = seq_out.stdout.splitlines()
    assert rows[0].split(",")[:3] == ["id", "v", "venue"]
    assert [row.split(",")[0] for row in rows[1:]] == [g["id"] for g in got[10:21]]
    r.delete(key)
    r.close()


@pytest.fixture
def simulator_port_rest() -> Any:
    """A simulator in its own process (`market simulate`), as an operator runs it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "simulate", "--port", str(port), "--symbols", "BNBUSDT", "--rate", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = []
    for _ in range(50):
        seen.append(proc.stderr.readline().decode())
        if "listening" in seen[-1] or not seen[-1]:
            break
    assert "listening" in seen[-1], seen
    yield port, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.communicate(timeout=10)


def test_cli_replay_copies_a_range_into_another_prefix(redis_url: str, prefix: str) -> None:
    import redis as sync_redis

    r = sync_redis.Redis.from_url(redis_url)
    key = "md:binance:CPYUSDT:trade"
    target = f"{prefix}:binance:CPYUSDT:trade"
    try:
        for seq in range(1, 101):
            tick = {"v": 1, "venue": "binance", "symbol": "CPYUSDT", "channel": "trade", "seq": seq,
                    "ts_event": (1_700_000_000_000 + seq) * 1000, "ts_recv": 1, "trade_id": seq, "price": "1.0",
                    "qty": "1", "side": "buy"}
            r.xadd(key, {"d": orjson.dumps(tick)}, id=f"{1_700_000_000_000 + seq}-{seq}")
        env = {**os.environ, "MARKET_REDIS_URL": redis_url}
        for _ in range(2):  # a second copy adds nothing: the IDs are already there
            subprocess.run(
                [sys.executable, "-m", "ops.cli", "replay", key, "--start", "seq:11", "--end", "seq:60",
                 "--to-prefix", prefix],
                env=env, capture_output=True, timeout=30, check=True,
            )
        assert r.xrange(target) == r.xrange(key, f"{1_700_000_000_011}-11", f"{1_700_000_000_060}-60")
    finally:
        r.delete(key)
        r.close()
