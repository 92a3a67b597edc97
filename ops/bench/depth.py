"""``market bench depth``: the ingestor's whole path with order books, against the same run without them.

One simulator child (``market simulate``: ``symbols`` symbols, their books batched every 100 ms as Binance's
``@depth@100ms`` sends them, trades at ``rate`` market events a second in all) and, one after the other, two
``market ingest`` children on every symbol: ``trade`` alone, then ``trade,depth``.  Each runs ``duration_s``
after its start is over (connected; with depth, every book in step), and the window is measured from two
*edges* read at its ends:

- entries stored per second: the ``XLEN`` of every stream of the run's prefix (retention off, so nothing is
  trimmed meanwhile), trades and depth entries apart; the ingestor's own ``market_book_entries`` by kind;
- the ingestor's CPU (``/proc``: user + system seconds over wall seconds, one core = 1.0) and memory (VmRSS at
  the end, VmHWM);
- frame -> Redis latency: the ingestor's own ``market_fanout_latency_us{stage="redis"}`` (frame received ->
  Redis acknowledged, sampled over every tick it writes: trades alone in the first run, trades and depth
  entries together in the second), and per channel the time from the frame's receipt (``ts_recv``) to this
  process reading the entry back with ``XREAD BLOCK`` on a sample of the streams (frame -> Redis plus one
  read's wake-up: an upper bound of frame -> Redis, the only one split by channel).

The machine's busy share over each window is reported too: others' work on a shared machine shows there.
Every wait is bounded (:data:`~ops.bench.profiles.START_TIMEOUT_S`, :data:`~ops.bench.profiles.HTTP_TIMEOUT_S`);
the run's keys are deleted at the end.  :func:`window_figures` is the pure part.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from consumer_sdk.core.errors import ConfigError, TransientError
from consumer_sdk.core.latency import LatencyHistogram
from ops.bench.analysis import stage_stats
from ops.bench.processes import (
    Child,
    cpu_seconds,
    free_port,
    http_get,
    machine,
    machine_busy_seconds,
    memory_kib,
    spawn,
)
from ops.bench.profiles import START_TIMEOUT_S, SYMBOLS
from ops.bench.scrape import Scrape, parse_metrics, window_hist

__all__ = ["Edge", "bench_symbols", "run_depth_bench", "window_figures"]

#: the streams of this many symbols are read back for the per-channel latency
READBACK_SYMBOLS: Final = 10
#: the kinds ``market_book_entries`` counts
ENTRY_KINDS: Final = ("diff", "start", "resync", "periodic")
RUNS: Final = (("trade",), ("trade", "depth"))


def bench_symbols(n: int) -> tuple[str, ...]:
    """``n`` symbol names: the whole-path bench's, then ``B001USDT``, ``B002USDT``, ..."""
    if n < 1:
        raise ConfigError(f"--symbols must be at least 1, got {n}")
    extra = tuple(f"B{i:03d}USDT" for i in range(1, max(0, n - len(SYMBOLS)) + 1))
    return (SYMBOLS + extra)[:n]


@dataclass(frozen=True, slots=True)
class Edge:
    """One end of a window: when, the streams' lengths by channel, the ingestor's metrics, CPU and memory."""

    at: float
    lengths: dict[str, int]
    scrape: Scrape
    cpu_s: float | None
    machine_busy_s: float | None
    memory: dict[str, int] = field(default_factory=dict)


def _rate(n: float, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else 0.0


def window_figures(first: Edge, last: Edge, readback: dict[str, LatencyHistogram], cores: int) -> dict[str, Any]:
    """The figures of one window (see the module doc): plain numbers, ``report``-ready."""
    wall = last.at - first.at
    stored = {ch: last.lengths.get(ch, 0) - first.lengths.get(ch, 0) for ch in sorted(last.lengths)}
    kinds = {k: int(last.scrape.total("market_book_entries_total", kind=k)
                    - first.scrape.total("market_book_entries_total", kind=k)) for k in ENTRY_KINDS}
    resyncs: dict[str, int] = {}
    for (name, labels), value in last.scrape.values.items():
        if name == "market_book_resync_total":
            reason = dict(labels).get("reason", "?")
            resyncs[reason] = resyncs.get(reason, 0) + int(value)
    cpu = None if first.cpu_s is None or last.cpu_s is None else last.cpu_s - first.cpu_s
    busy = (None if first.machine_busy_s is None or last.machine_busy_s is None
            else last.machine_busy_s - first.machine_busy_s)
    redis = window_hist(last.scrape.hist("market_fanout_latency_us", stage="redis"),
                        first.scrape.hist("market_fanout_latency_us", stage="redis"))
    return {
        "wall_s": round(wall, 3),
        "stored": stored,
        "stored_per_s": {ch: _rate(n, wall) for ch, n in stored.items()},
        "book_entries": kinds,
        "book_entries_total": sum(kinds.values()),
        "resyncs": resyncs,
        "ingestor_cpu_s": None if cpu is None else round(cpu, 3),
        "ingestor_cpu_share": None if cpu is None or wall <= 0 else round(cpu / wall, 4),
        "machine_busy_share": None if busy is None or wall <= 0 else round(busy / wall / cores, 4),
        "rss_mib": round(last.memory.get("VmRSS", 0) / 1024, 1),
        "peak_rss_mib": round(last.memory.get("VmHWM", 0) / 1024, 1),
        "frame_to_redis": stage_stats(redis),
        "frame_to_readback": {ch: stage_stats(h) for ch, h in sorted(readback.items())},
    }


# ---------------------------------------------------------------- I/O


class _Run:
    """One bench run's children, ports, prefix and clean-up."""

    def __init__(self, redis_url: str, symbols: Sequence[str], workdir: Path) -> None:
        self.redis_url = redis_url
        self.symbols = tuple(symbols)
        self.workdir = workdir
        self.prefix = f"bench-depth-{uuid.uuid4().hex[:8]}"
        self.sim_port = free_port()
        self.env = {**os.environ, "MARKET_REDIS_URL": redis_url}
        self.children: list[Child] = []

    async def wait(self, child: Child, ready: Any, what: str, limit_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            if child.proc.returncode is not None:
                raise ConfigError(f"the {child.name} exited (status {child.proc.returncode}): "
                                  f"{child.last_line() or 'no message'}")
            try:
                if await ready():
                    return
            except TransientError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"the {child.name}: not {what} within {limit_s:.0f} s; its log: "
                                  f"{child.last_line() or 'empty'}")
            await asyncio.sleep(0.2)  # polling another process's state: nothing to wait on instead

    async def start_simulator(self, rate: float, seed: int) -> None:
        sim = await spawn("simulator", [
            "simulate", "--port", str(self.sim_port), "--symbols", ",".join(self.symbols), "--rate", f"{rate:g}",
            "--seed", str(seed), "--id-base", "0", "--log-level", "warning", "--rest-weight-limit", "0",
        ], self.env, self.workdir)
        self.children.append(sim)

        async def answers() -> bool:
            await http_get(self.sim_port, "/control/state")
            return True

        await self.wait(sim, answers, "answering")

    async def start_ingestor(self, channels: Sequence[str], metrics_port: int, name: str) -> Child:
        config = self.workdir / f"{name}.toml"
        # Retention off: the window's XLEN difference is what was stored.  The books' snapshot requests may
        # spend what the simulator allows (no limit): every book starts at once.
        config.write_text("[retention]\nmaxlen = 0\n[depth]\nweight_share = 1.0\nweight_per_minute = 1000000\n")
        ing = await spawn(name, [
            "ingest", "--config", str(config), "--url", f"ws://127.0.0.1:{self.sim_port}",
            "--symbols", ",".join(self.symbols), "--channels", ",".join(channels), "--metrics-port",
            str(metrics_port), "--queue-policy", "block", "--spill-dir", str(self.workdir / f"{name}-spill"),
            "--log-level", "warning", "--prefix", f"{self.prefix}-{name}",
        ], self.env, self.workdir)
        self.children.append(ing)
        books = len(self.symbols) if "depth" in channels else 0

        async def ready() -> bool:
            scrape = parse_metrics((await http_get(metrics_port, "/metrics")).decode("utf-8", "replace"))
            return scrape.total("market_connection_up") >= 1 and scrape.total("market_books_live") >= books

        await self.wait(ing, ready, "connected with every book in step", START_TIMEOUT_S * 4)
        return ing

    async def lengths(self, redis: aioredis.Redis, prefix: str, channels: Sequence[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        async with redis.pipeline(transaction=False) as pipe:
            for channel in channels:
                for symbol in self.symbols:
                    pipe.xlen(f"{prefix}:binance:{symbol}:{channel}")
            replies = await pipe.execute()
        i = 0
        for channel in channels:
            out[channel] = sum(int(n) for n in replies[i : i + len(self.symbols)])
            i += len(self.symbols)
        return out

    async def edge(self, redis: aioredis.Redis, prefix: str, channels: Sequence[str], ing: Child,
                   metrics_port: int) -> Edge:
        lengths = await self.lengths(redis, prefix, channels)
        scrape = parse_metrics((await http_get(metrics_port, "/metrics")).decode("utf-8", "replace"))
        pid = ing.proc.pid
        return Edge(time.monotonic(), lengths, scrape, cpu_seconds(pid), machine_busy_seconds(), memory_kib(pid))

    async def delete_keys(self, redis: aioredis.Redis) -> None:
        async with asyncio.timeout(60):
            keys = [k async for k in redis.scan_iter(f"{self.prefix}-*", count=1000)]
            for i in range(0, len(keys), 500):
                await redis.delete(*keys[i : i + 500])


async def _read_back(redis_url: str, keys: Sequence[str], hists: dict[str, LatencyHistogram],
                     stop: asyncio.Event) -> None:
    """Until ``stop``: read ``keys`` as entries arrive; per channel, now - the entry's ``ts_recv``."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        cursors: dict[Any, Any] = {}
        for key in keys:
            top: Any = await client.xrevrange(key, "+", "-", count=1)
            cursors[key] = top[0][0] if top else "0-0"
        while not stop.is_set():
            reply: Any = await client.xread(cursors, count=1000, block=200)
            now_us = time.time_ns() // 1000
            for key, entries in reply or ():
                name = key.decode() if isinstance(key, bytes) else key
                channel = name.rsplit(":", 1)[1]
                hist = hists.setdefault(channel, LatencyHistogram())
                for eid, fields in entries:
                    cursors[name] = eid
                    hist.observe(max(0, now_us - orjson.loads(fields[b"d"])["ts_recv"]))
    finally:
        await client.aclose()


async def _window(run: _Run, redis: aioredis.Redis, channels: Sequence[str], duration_s: float,
                  cores: int) -> dict[str, Any]:
    name = "ingest-" + "-".join(channels)
    metrics_port = free_port()
    ing = await run.start_ingestor(channels, metrics_port, name)
    prefix = f"{run.prefix}-{name}"
    try:
        keys = [f"{prefix}:binance:{s}:{ch}" for s in run.symbols[:READBACK_SYMBOLS] for ch in channels]
        hists: dict[str, LatencyHistogram] = {}
        stop = asyncio.Event()
        reader = asyncio.create_task(_read_back(run.redis_url, keys, hists, stop))
        try:
            first = await run.edge(redis, prefix, channels, ing, metrics_port)
            await asyncio.sleep(duration_s)  # the measured window itself
            last = await run.edge(redis, prefix, channels, ing, metrics_port)
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await reader
        return {"channels": list(channels), **window_figures(first, last, hists, cores)}
    finally:
        await ing.stop()
        run.children.remove(ing)


async def run_depth_bench(*, redis_url: str, symbols: int = 100, duration_s: float = 30.0, rate: float = 4000.0,
                          seed: int = 1, workdir: Path | None = None) -> dict[str, Any]:
    """The bench (see the module doc): ``{"symbols", "duration_s", "rate", "seed", "machine", "prefix" (of every
    key the run wrote, deleted at its end), "runs": {"trade": ..., "trade+depth": ...}, "depth"}``."""
    if duration_s <= 0 or rate <= 0:
        raise ConfigError("--duration and --rate must be positive")
    names = bench_symbols(symbols)
    host = machine()
    cores = int(host.get("cpus_usable") or host.get("cores") or os.cpu_count() or 1)
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="market-bench-depth-")))
        run = _Run(redis_url, names, workdir)
        redis = aioredis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
        runs: dict[str, Any] = {}
        try:
            await run.start_simulator(rate, seed)
            for channels in RUNS:
                runs["+".join(channels)] = await _window(run, redis, channels, duration_s, cores)
        finally:
            for child in run.children:
                await child.stop()
            with contextlib.suppress(OSError, TimeoutError, aioredis.RedisError):
                await run.delete_keys(redis)
            await redis.aclose()
    plain, books = runs["trade"], runs["trade+depth"]
    return {
        "symbols": symbols, "duration_s": duration_s, "rate": rate, "seed": seed, "machine": host,
        "prefix": run.prefix, "runs": runs,
        "depth": {
            "entries_per_s": books["stored_per_s"].get("depth", 0.0),
            "cpu_share_added": (None if plain["ingestor_cpu_share"] is None or books["ingestor_cpu_share"] is None
                                else round(books["ingestor_cpu_share"] - plain["ingestor_cpu_share"], 4)),
            "rss_mib_added": round(books["rss_mib"] - plain["rss_mib"], 1),
        },
    }
