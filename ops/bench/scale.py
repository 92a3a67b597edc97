"""``market bench scale``: ingest and write throughput with 1 or more Redis masters and 1 or more ingestors.

One *cell* per (masters, ingestors): a Redis of its own (a standalone server for 1 master, else a cluster of that
many masters with ``replicas`` replicas each, :func:`ops.redis_cluster.start_cluster`), the simulator (every
symbol of :data:`~ops.bench.profiles.SYMBOLS`, ``--no-depth``, a fixed seed) and that many ``market ingest``
processes, the symbols dealt between them (disjoint sets, one config each).  The simulator is driven at the
rates of the schedule in turn, each for a warm-up then a measured window, until a window saturates (see
:mod:`ops.bench.scale_report`); then the rate goes to 0 and the path drains until Redis holds every tick the
simulator sent (bounded by ``drain_s``).  Stored ticks are counted from Redis (``XINFO STREAM``
``entries-added`` of every stream), CPU from ``/proc`` for the simulator, each ingestor and each redis-server.

Everything runs on this machine: the processes share its cores, so a cell with more processes does not get
more CPU; the per-process CPU is what lets a reader project a deployment with one host per process.  Every wait
is bounded: starts by :data:`~ops.bench.profiles.START_TIMEOUT_S`, reads by
:data:`~ops.bench.profiles.HTTP_TIMEOUT_S`, the drain by ``drain_s``, stops by
:data:`~ops.bench.profiles.STOP_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from consumer_sdk.core.errors import ConfigError, MarketError, TransientError
from consumer_sdk.core.redis import connect_redis
from ops.bench.processes import Child, cpu_seconds, free_port, http_get, machine, machine_busy_seconds, spawn
from ops.bench.profiles import CHANNELS, HTTP_TIMEOUT_S, RETENTION_MAXLEN, SIM_BATCH_S, START_TIMEOUT_S, SYMBOLS
from ops.bench.scale_report import ScaleEdge, add_ratios, analyse_window, split_symbols, stream_keys, summarize_cell
from ops.bench.scrape import parse_metrics

__all__ = ["SCALE_RATES", "ScaleSettings", "run_scale"]

#: offered rates (ticks/s), in turn, until one saturates: one ingestor peaked near 120k/s on this machine
SCALE_RATES: tuple[float, ...] = (20_000.0, 40_000.0, 60_000.0, 80_000.0, 100_000.0, 120_000.0, 150_000.0, 200_000.0)
PREFIX = "scale"
#: the simulator's tick kinds the ingestors subscribe to (CHANNELS): each one generated goes to one ingestor
_STREAMED_KINDS = ("trade", "aggTrade", "bookTicker")
_POLL_S = 0.1


@dataclass(frozen=True)
class ScaleSettings:
    masters: tuple[int, ...] = (1, 3)
    ingestors: tuple[int, ...] = (1, 2)
    rates: tuple[float, ...] = SCALE_RATES
    warmup_s: float = 3.0
    window_s: float = 20.0
    drain_s: float = 60.0
    replicas: int = 1
    seed: int = 1


Log = Callable[[str], None]


@dataclass
class _Cell:
    """One cell's running parts: the Redis URL and server pids, the children, the stream keys per ingestor."""

    url: str
    redis_pids: dict[str, int]
    sim_port: int = 0
    metrics_ports: tuple[int, ...] = ()
    keys: tuple[list[str], ...] = ()
    pids: dict[str, int] | None = None


async def _stored(client: aioredis.Redis, keys: Sequence[str]) -> int:
    """Ticks ever added to ``keys`` (``entries-added``, which trimming does not lower); a missing stream is 0."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("XINFO", "STREAM", key)
    replies = await pipe.execute(raise_on_error=False)
    total = 0
    for reply in replies:
        if isinstance(reply, Exception):
            if "no such key" in str(reply).lower():
                continue
            raise TransientError(f"XINFO STREAM: {reply}")
        if isinstance(reply, dict):
            info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in reply.items()}
        else:
            flat = list(reply)
            info = {(k.decode() if isinstance(k, bytes) else k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}
        total += int(info["entries-added"])
    return total


async def _edge(cell: _Cell, client: aioredis.Redis) -> ScaleEdge:
    stored = tuple([await _stored(client, keys) for keys in cell.keys])
    scrapes = [parse_metrics((await http_get(p, "/metrics")).decode("utf-8", "replace")) for p in cell.metrics_ports]
    state: dict[str, Any] = orjson.loads(await http_get(cell.sim_port, "/control/state"))
    pids = (cell.pids or {}) | cell.redis_pids
    return ScaleEdge(
        t=time.monotonic(), stored=stored,
        received=tuple(int(s.total("market_frames_received_total")) for s in scrapes),
        reconnects=tuple(int(s.total("broker_reconnect_total")) for s in scrapes),
        sent=int(state["stats"]["frames_sent"]), generated=int(state["stats"]["ticks_total"]),
        streamed=sum(int(state["stats"]["ticks_generated"].get(kind, 0)) for kind in _STREAMED_KINDS),
        cpu={name: cpu_seconds(pid) for name, pid in pids.items()}, machine=machine_busy_seconds(),
    )


async def _wait_ready(child: Child, ready: Callable[[], Any]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if child.proc.returncode is not None:
            raise ConfigError(f"the {child.name} exited at start (status {child.proc.returncode}): "
                              f"{child.last_line() or 'no message'}")
        try:
            await ready()
            return
        except TransientError as exc:
            if time.monotonic() > deadline:
                raise ConfigError(f"the {child.name} was not ready within {START_TIMEOUT_S:.0f} s: {exc}; "
                                  f"its log: {child.last_line() or 'empty'}") from None
        await asyncio.sleep(_POLL_S)  # polling a child just started: there is nothing to wait on instead


def _check_alive(children: Sequence[Child]) -> None:
    for child in children:
        if child.proc.returncode is not None:
            raise MarketError(f"the {child.name} exited during the run (status {child.proc.returncode}): "
                              f"{child.last_line() or 'no message'}")


async def _sleep_watching(seconds: float, children: Sequence[Child]) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(left, 0.5))
        _check_alive(children)


async def _start(cell: _Cell, ingestors: int, settings: ScaleSettings, workdir: Path,
                 children: list[Child]) -> None:
    """The simulator, then ``ingestors`` ingestors on their share of the symbols, each waited for."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
    env |= {"MARKET_REDIS_URL": cell.url, "MARKET_PREFIX": PREFIX, "MARKET_QUEUE_CAPACITY": "100000"}
    cell.sim_port = free_port()
    sim = await spawn("simulator", [
        "simulate", "--port", str(cell.sim_port), "--symbols", ",".join(SYMBOLS), "--rate", "1",
        "--seed", str(settings.seed), "--id-base", "0", "--log-level", "warning",
        "--batch-interval", f"{SIM_BATCH_S:g}", "--no-depth",
    ], env | {"MARKET_STATE_DIR": str(workdir)}, workdir)
    children.append(sim)
    await _wait_ready(sim, lambda: http_get(cell.sim_port, "/control/state"))
    # It generates nothing until a connection subscribes: at 0 from now, the ingestors start on a quiet venue.
    await http_get(cell.sim_port, "/control/rate?value=0")
    pids = {"simulator": sim.proc.pid}
    ports: list[int] = []
    keys: list[list[str]] = []
    for i, symbols in enumerate(split_symbols(SYMBOLS, ingestors), start=1):
        home = workdir / f"ingestor-{i}"
        home.mkdir()
        config = home / "bench.toml"
        config.write_text(f"[retention]\nmaxlen = {RETENTION_MAXLEN}\n")
        port = free_port()
        ing = await spawn(f"ingestor-{i}", [
            "ingest", "--config", str(config), "--url", f"ws://127.0.0.1:{cell.sim_port}",
            "--symbols", ",".join(symbols), "--channels", ",".join(CHANNELS), "--metrics-port", str(port),
            "--queue-policy", "block", "--spill-dir", str(home / "spill"), "--log-level", "warning",
        ], env | {"MARKET_STATE_DIR": str(home)}, home)
        children.append(ing)

        async def live(port: int = port) -> None:
            scrape = parse_metrics((await http_get(port, "/metrics")).decode("utf-8", "replace"))
            if scrape.total("market_connection_up") < 1:
                raise TransientError("not connected to the simulator yet")

        await _wait_ready(ing, live)
        pids[f"ingestor-{i}"] = ing.proc.pid
        ports.append(port)
        keys.append(stream_keys(PREFIX, symbols, CHANNELS))
    cell.pids, cell.metrics_ports, cell.keys = pids, tuple(ports), tuple(keys)


async def _settled(cell: _Cell, client: aioredis.Redis, children: Sequence[Child]) -> ScaleEdge:
    """At rate 0, once every frame the simulator sent (its replies to the ingestors' subscriptions) has been
    received: the edge the final tally counts from, so that every frame sent after it is a tick."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        e = await _edge(cell, client)
        if e.sent == sum(e.received):
            return e
        if time.monotonic() > deadline:
            raise ConfigError(f"the simulator sent {e.sent} frames, the ingestors received {sum(e.received)}, "
                              f"{START_TIMEOUT_S:.0f} s after they started at rate 0")
        _check_alive(children)
        await asyncio.sleep(_POLL_S)  # counters in other processes: poll them


async def _drive(cell: _Cell, masters: int, ingestors: int, settings: ScaleSettings, workdir: Path,
                 log: Log) -> dict[str, Any]:
    children: list[Child] = []
    client: aioredis.Redis | None = None
    try:
        await _start(cell, ingestors, settings, workdir, children)
        client = await connect_redis(cell.url, socket_timeout=HTTP_TIMEOUT_S * 2)
        first = await _settled(cell, client, children)
        steps: list[dict[str, Any]] = []
        for rate in settings.rates:
            await http_get(cell.sim_port, f"/control/rate?value={rate:g}")
            await _sleep_watching(settings.warmup_s, children)
            a = await _edge(cell, client)
            await _sleep_watching(settings.window_s, children)
            b = await _edge(cell, client)
            step = analyse_window(rate, a, b)
            steps.append(step)
            log(f"{masters} master(s), {ingestors} ingestor(s), {rate:.0f}/s offered: {step['stored_per_s']}/s "
                f"stored{' (saturated: ' + '; '.join(step['reasons']) + ')' if step['saturated'] else ''}")
            if step["saturated"]:
                break
        await http_get(cell.sim_port, "/control/rate?value=0")
        deadline = time.monotonic() + settings.drain_s
        while True:
            e = await _edge(cell, client)
            drained = sum(e.stored) - sum(first.stored) >= e.sent - first.sent
            if drained or time.monotonic() > deadline:
                break
            _check_alive(children)
            await asyncio.sleep(_POLL_S)  # the counts live in other processes and in Redis: poll them
        return summarize_cell(masters, ingestors, steps, sent=e.sent - first.sent,
                              stored=sum(e.stored) - sum(first.stored), streamed=e.streamed - first.streamed,
                              drained=drained)
    finally:
        if client is not None:
            with contextlib.suppress(OSError, aioredis.RedisError):
                await client.aclose()
        for child in reversed(children):
            await child.stop()


async def run_cell(masters: int, ingestors: int, settings: ScaleSettings, log: Log) -> dict[str, Any]:
    """One cell on a Redis of its own (stopped after), in a work directory of its own (removed after)."""
    from ops.redis_cluster import start_cluster
    from ops.redis_server import start_redis

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="market-scale-")))
        if masters == 1:
            server = stack.enter_context(start_redis())
            cell = _Cell(server.url, {"redis": server.process.pid})
        else:
            cluster = stack.enter_context(start_cluster(masters, settings.replicas))
            nodes = cluster.nodes
            url = "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in nodes[:masters])
            pids = {f"redis-m{i + 1}": n.server.process.pid for i, n in enumerate(nodes[:masters])}
            pids |= {f"redis-r{i + 1}": n.server.process.pid for i, n in enumerate(nodes[masters:])}
            cell = _Cell(url, pids)
        return await _drive(cell, masters, ingestors, settings, workdir, log)


async def run_scale(settings: ScaleSettings, log: Log = lambda _: None) -> dict[str, Any]:
    """Every cell, masters outer and ingestors inner; the result holds the settings, the machine, the cells."""
    if not settings.rates or any(r <= 0 for r in settings.rates):
        raise ConfigError("the rates must be positive")
    if any(m < 1 for m in settings.masters) or any(i < 1 for i in settings.ingestors):
        raise ConfigError("masters and ingestors must be at least 1")
    if max(settings.ingestors) > len(SYMBOLS):
        raise ConfigError(f"at most {len(SYMBOLS)} ingestors (one symbol each at least)")
    started = machine()
    cells = []
    for masters in settings.masters:
        for ingestors in settings.ingestors:
            cells.append(await run_cell(masters, ingestors, settings, log))
    return {
        "bench": "scale",
        "settings": {"masters": list(settings.masters), "ingestors": list(settings.ingestors),
                     "rates": list(settings.rates), "warmup_s": settings.warmup_s, "window_s": settings.window_s,
                     "replicas": settings.replicas, "seed": settings.seed, "symbols": len(SYMBOLS),
                     "channels": list(CHANNELS)},
        "machine": started | {"loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "cells": add_ratios(cells),
    }
