"""The whole path on the real Redis: simulator -> ingestor -> Redis Streams, checked against CONTRACT.md.

Every test writes under its own prefix and removes only what it wrote.  Child processes' output is read
by a thread into a queue, so every read of it has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import IO, Any

import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk.core.keys import parse_entry_id
from consumer_sdk.core.tick import BASE_FIELDS, channel_fields, decode_tick
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
            await asyncio.sleep(0.05)  # poll
    assert await predicate(), what


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)  # poll


class Lines:
    """The lines a child process writes to a pipe, pumped by a thread, so each read has a deadline."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[bytes]) -> None:
        for line in iter(pipe.readline, b""):
            self._lines.put(line)
        self._lines.put(b"")  # end of output

    def next(self, timeout: float, what: str) -> bytes:
        """The next line (``b""`` once the output ended); fails naming ``what`` after ``timeout`` seconds."""
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{what}: no line within {timeout} s") from None

    def close(self, timeout: float = 15.0) -> None:
        """After the child ended: the pump has read everything."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the child's output did not end"


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


def test_cli_ingest_stores_the_feed_and_serves_metrics(
    simulator_port_rest: tuple[int, str], redis_url: str, prefix: str, tmp_path: Any
) -> None:
    """`market ingest` as a process, under the test's own prefix: every trade once, in order; metrics served."""
    port, _ = simulator_port_rest
    env = {**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}
    import redis as sync_redis

    r = sync_redis.Redis.from_url(redis_url)
    key = f"{prefix}:binance:BNBUSDT:trade"
    metrics_port = free_port()
    log_file = open(tmp_path / "ingest.log", "wb")  # noqa: SIM115
    ingest = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "ingest", "--url", f"ws://127.0.0.1:{port}", "--symbols", "BNBUSDT",
         "--channels", "trade", "--metrics-port", str(metrics_port)],
        env=env, stdout=subprocess.DEVNULL, stderr=log_file,
    )
    try:
        wait_until(lambda: r.xlen(key) >= 300, 30, "300 trades stored")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for name in ("market_published_total", "market_ingest_latency_us_bucket", "broker_reconnect_total"):
            assert name in text
    finally:
        ingest.terminate()
        ingest.wait(15)
        log_file.close()
    ingest_log = (tmp_path / "ingest.log").read_text()
    assert ingest.returncode == 0, "\n".join(line for line in ingest_log.splitlines() if not line.startswith("{"))
    assert '"level":"error"' not in ingest_log, ingest_log[-3000:]
    ids = [orjson.loads(fields[b"d"])["trade_id"] for _, fields in r.xrange(key, "-", "+")]
    assert len(ids) >= 300 and ids == list(range(ids[0], ids[0] + len(ids)))
    r.close()


def trade_entry(symbol: str, seq: int) -> tuple[str, bytes]:
    """The entry ID and ``d`` field of trade ``seq``, as the writer stores it."""
    tick = {"v": 1, "venue": "binance", "symbol": symbol, "channel": "trade", "seq": seq,
            "ts_event": (1_700_000_000_000 + seq) * 1000, "ts_recv": 1, "trade_id": seq, "price": "1.0",
            "qty": "1", "side": "buy"}
    return f"{1_700_000_000_000 + seq}-{seq}", orjson.dumps(tick)


def own_md_key() -> tuple[str, str]:
    """A symbol no one else uses and its key under ``md``: `market tail` and `market replay` take only
    ``md:`` keys, so the test owns its key by its symbol, and deletes it afterwards."""
    symbol = f"T{uuid.uuid4().hex[:10].upper()}USDT"
    return symbol, f"md:binance:{symbol}:trade"


def test_cli_tail_follows_and_replay_equals_xrange(redis_url: str, prefix: str) -> None:
    """`market tail` prints JSON lines in order and follows new entries; `market replay` prints exactly XRANGE.

    The key is under the test's own prefix: both commands take any valid prefix, not only ``md``.
    """
    import redis as sync_redis

    r = sync_redis.Redis.from_url(redis_url)
    symbol = "BNBUSDT"
    key = f"{prefix}:binance:{symbol}:trade"
    env = {**os.environ, "MARKET_REDIS_URL": redis_url}
    tail: subprocess.Popen[bytes] | None = None
    try:
        for seq in range(1, 301):
            entry_id, d = trade_entry(symbol, seq)
            r.xadd(key, {"d": d}, id=entry_id)
        tail = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "tail", key, "--from", "0"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert tail.stdout is not None
        out = Lines(tail.stdout)
        try:
            printed = [orjson.loads(out.next(30, f"`market tail` line {i + 1}")) for i in range(300)]
            entry_id, d = trade_entry(symbol, 301)
            r.xadd(key, {"d": d}, id=entry_id)  # written after tail caught up: it follows
            printed.append(orjson.loads(out.next(30, "`market tail` following a new entry")))
        finally:
            tail.terminate()
            tail.wait(15)
            out.close()
            tail.stdout.close()
        assert tail.returncode in (0, -15)
        assert [p["tick"]["seq"] for p in printed] == list(range(1, 302))
        assert all(p["key"] == key and p["id"] == f"{1_700_000_000_000 + p['tick']['seq']}-{p['tick']['seq']}"
                   for p in printed)

        start_ms, end_ms = 1_700_000_000_050, 1_700_000_000_250
        want = r.xrange(key, start_ms, end_ms)
        done = subprocess.run(
            [sys.executable, "-m", "ops.cli", "replay", key, "--start", str(start_ms), "--end", str(end_ms)],
            env=env, capture_output=True, timeout=30, check=True,
        )
        got = [orjson.loads(line) for line in done.stdout.splitlines()]
        assert len(got) == 201
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

        # through a consumer group: the same lines, each with its entry ID
        grouped = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "tail", key, "--group", "g", "--from", "0"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        assert grouped.stdout is not None
        out = Lines(grouped.stdout)
        try:
            via_group = [orjson.loads(out.next(30, f"`market tail --group` line {i + 1}")) for i in range(301)]
        finally:
            grouped.terminate()
            grouped.wait(15)
            out.close()
            grouped.stdout.close()
        assert [(p["key"], p["id"], p["tick"]) for p in via_group] == [
            (p["key"], p["id"], p["tick"]) for p in printed
        ]
    finally:
        if tail is not None and tail.poll() is None:
            tail.kill()
            tail.wait(15)
        r.delete(key)
        r.close()


@pytest.fixture
def simulator_port_rest() -> Iterator[tuple[int, str]]:
    """A simulator in its own process (`market simulate`), as an operator runs it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "simulate", "--port", str(port), "--symbols", "BNBUSDT", "--rate", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = Lines(proc.stderr)  # read to the end, so its log never fills the pipe
    try:
        seen = [err.next(30, "the simulator saying it listens").decode()]
        while "listening" not in seen[-1] and seen[-1]:
            seen.append(err.next(30, "the simulator saying it listens").decode())
        assert "listening" in seen[-1], seen
        yield port, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        err.close()
        proc.stderr.close()


def test_cli_replay_copies_a_range_into_another_prefix(redis_url: str, prefix: str) -> None:
    import redis as sync_redis

    r = sync_redis.Redis.from_url(redis_url)
    symbol, key = own_md_key()
    target = f"{prefix}:binance:{symbol}:trade"
    try:
        for seq in range(1, 101):
            entry_id, d = trade_entry(symbol, seq)
            r.xadd(key, {"d": d}, id=entry_id)
        env = {**os.environ, "MARKET_REDIS_URL": redis_url}
        for _ in range(2):  # a second copy adds nothing: the IDs are already there
            subprocess.run(
                [sys.executable, "-m", "ops.cli", "replay", key, "--start", "seq:11", "--end", "seq:60",
                 "--to-prefix", prefix],
                env=env, capture_output=True, timeout=30, check=True,
            )
        assert r.xrange(target) == r.xrange(key, f"{1_700_000_000_011}-11", f"{1_700_000_000_060}-60")
        assert list(r.scan_iter(f"{prefix}:*")) == [target.encode()]  # nothing else was written there
    finally:
        r.delete(key)  # the copy under `prefix` goes with the fixture
        r.close()
