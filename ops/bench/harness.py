"""The whole-path bench's harness: its children, what it reads from them, the drain, the clean-up.

:class:`Harness` owns one run's state: the ports, the simulator's and the ingestor's processes (started
with :func:`~ops.bench.processes.spawn`), the SDK consumer's :class:`Sink`, the key prefixes, the notes
and the progress bar.  It reads an :class:`~ops.bench.analysis.Edge` (the consumer's count, then the
ingestor's ``/metrics``, then the simulator's state), sets the simulator's rate, drains the path at rate
0 and deletes the run's keys.  What a run does with it (prime, steps, the ingest-only phase) is
:mod:`ops.bench.stages`.  Every wait is bounded: starts by :data:`~ops.bench.profiles.START_TIMEOUT_S`,
reads by :data:`~ops.bench.profiles.HTTP_TIMEOUT_S`, drains by their ``limit_s``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import redis.asyncio as aioredis

from consumer_sdk.core.errors import ConfigError, TransientError
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import Tick
from ops.bench.analysis import REDIS_COMMANDS, Edge
from ops.bench.processes import Child, cpu_seconds, free_port, http_get, machine_busy_seconds, spawn
from ops.bench.profiles import (
    CHANNELS,
    HTTP_TIMEOUT_S,
    PROBE,
    RETENTION_MAXLEN,
    SAMPLE_S,
    SIM_BATCH_S,
    START_TIMEOUT_S,
    SYMBOLS,
)
from ops.bench.render import Progress
from ops.bench.scrape import Scrape, parse_metrics

__all__ = ["Harness", "Sink"]


@dataclass
class Sink:
    """The SDK consumer's handler: counts ticks and measures frame received -> callback."""

    hist: LatencyHistogram = field(default_factory=LatencyHistogram)
    received: int = 0
    gaps: int = 0
    trimmed: int = 0
    error: str | None = None

    def __call__(self, tick: Tick) -> None:
        self.received += 1
        self.hist.observe(time.time_ns() // 1000 - tick["ts_recv"])

    def on_gap(self, key: str, first: int, last: int) -> None:
        self.gaps += 1

    def on_trimmed(self, key: str, first_missing: str, first_available: str | None) -> None:
        self.trimmed += 1


class Harness:
    """One run of the whole-path bench: its settings, its children's pids, its reads and its clean-up."""

    def __init__(self, *, redis_url: str, seed: int, schedule: Sequence[float], warmup_s: float, window_s: float,
                 writer_ticks: int, hotpath_s: float, drain_s: float, progress: Progress | None,
                 sim_port: int | None, metrics_port: int | None, subscribers: int, ingest_s: float = 0.0,
                 peak_schedule: Sequence[float] = ()) -> None:
        self.redis_url = redis_url
        self.subscribers = subscribers
        self.seed = seed
        self.schedule = list(schedule)
        self.warmup_s = warmup_s
        self.window_s = window_s
        self.writer_ticks = writer_ticks
        self.hotpath_s = hotpath_s
        self.drain_s = drain_s
        self.progress = progress
        self.prefix = f"bench-{uuid.uuid4().hex[:10]}"
        self.peak_prefix = f"{self.prefix}-peak"
        self.sim_port = sim_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.sink = Sink()
        self.pids: dict[str, int] = {}
        self.redis_pid: int | None = None
        self.notes: list[str] = []
        self.t0 = time.monotonic()
        # The time the whole run should take, for the progress bar.
        self.planned_s = (10.0 + sum(warmup_s + window_s + 1.5 for _ in self.schedule) + 3.0
                          + writer_ticks / 25_000 + (hotpath_s + min(hotpath_s, 5.0) + 3.0 if hotpath_s > 0 else 0.0)
                          + ingest_s)
        self.phase = "starting"
        #: whether the SDK consumer reads (not in the ingest-only phase)
        self.consuming = True
        self.received_before = 0
        self.peak_schedule = list(peak_schedule)
        self.planned_s += sum(warmup_s + window_s + 3.0 for _ in self.peak_schedule) + (8.0 if peak_schedule else 0.0)

    # -- progress
    def tick(self, label: str | None = None) -> None:
        """Report progress: ``label`` (else the phase so far) and the share of the planned time gone."""
        if label is not None:
            self.phase = label
        if self.progress is not None:
            self.progress(self.phase, min(0.99, (time.monotonic() - self.t0) / self.planned_s))

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, reporting progress every :data:`SAMPLE_S`."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, SAMPLE_S))
            self.tick()

    # -- reading the children
    async def scrape(self, names: Sequence[str] = ()) -> Scrape:
        """The ingestor's ``/metrics``, parsed, restricted to the samples ``names`` when given (``?name[]=``);
        :class:`TransientError` when it does not answer."""
        path = "/metrics" + (f"?{urlencode([('name[]', n) for n in names])}" if names else "")
        return parse_metrics((await http_get(self.metrics_port, path)).decode("utf-8", "replace"))

    async def sim_state(self) -> dict[str, Any]:
        """The simulator's ``/control/state`` (``stats.frames_sent``, ``stats.ticks_total``, ...)."""
        state: dict[str, Any] = orjson.loads(await http_get(self.sim_port, "/control/state"))
        return state

    async def set_rate(self, rate: float) -> None:
        """Set the simulator's rate (ticks/s; 0 stops it sending)."""
        await http_get(self.sim_port, f"/control/rate?value={rate:g}")

    def cpu(self) -> dict[str, float | None]:
        """CPU seconds so far of each child, this process (``bench``), Redis and the whole machine."""
        out: dict[str, float | None] = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        out["bench"] = cpu_seconds(os.getpid())
        out["redis-server"] = cpu_seconds(self.redis_pid) if self.redis_pid else None
        out["machine"] = machine_busy_seconds()
        return out

    async def edge(self) -> Edge:
        """Everything one edge of a window needs, read now (see :meth:`read_counts` for the order)."""
        consumed, ing, sim = await self.read_counts()
        return Edge(time.monotonic(), ing, sim, self.cpu(), consumed, self.received_before)

    async def read_counts(self, names: Sequence[str] = ()) -> tuple[int, Scrape, dict[str, Any]]:
        """The consumer's count, then the ingestor's (only ``names`` when given), then the simulator's: each
        later read can only be ahead of the one before, so published - consumed and sent - received are never
        negative."""
        consumed = self.sink.received
        ing = await self.scrape(names)
        sim = await self.sim_state()
        return consumed, ing, sim

    # -- start
    async def start(self, env: dict[str, str], workdir: Path, children: list[Child]) -> None:
        """Start the simulator, then the ingestor with :attr:`subscribers` probes; each appended to
        ``children`` as it starts (so the caller stops it), each waited for until it answers."""
        self.tick("starting the simulator")
        symbols = ",".join(SYMBOLS)
        sim = await spawn("simulator", [
            "simulate", "--port", str(self.sim_port), "--symbols", symbols, "--rate", "1", "--seed", str(self.seed),
            "--id-base", "0", "--log-level", "warning", "--batch-interval", f"{SIM_BATCH_S:g}", "--no-depth",
        ], env, workdir)
        children.append(sim)
        await self._wait(sim, lambda: self.sim_state())
        self.pids["simulator"] = sim.proc.pid
        await self.start_ingestor(env, workdir, children, self.subscribers)

    async def start_ingestor(self, env: dict[str, str], workdir: Path, children: list[Child],
                             subscribers: int, spill: str = "spill") -> None:
        """Start an ingestor on the simulator with ``subscribers`` co-located :data:`PROBE` subscribers and
        its spill log in ``workdir/spill``; waited for until it is connected (:class:`ConfigError` if not)."""
        self.tick("starting the ingestor")
        symbols = ",".join(SYMBOLS)
        config = workdir / "bench.toml"
        config.write_text(f"[retention]\nmaxlen = {RETENTION_MAXLEN}\n")
        args = [
            "ingest", "--config", str(config), "--url", f"ws://127.0.0.1:{self.sim_port}", "--symbols", symbols,
            "--channels", ",".join(CHANNELS), "--metrics-port", str(self.metrics_port), "--queue-policy", "block",
            "--spill-dir", str(workdir / spill), "--log-level", "warning",
        ]
        for _ in range(subscribers):
            args += ["--subscriber", PROBE]
        ing = await spawn("ingestor", args, env, workdir)
        children.append(ing)

        async def live() -> None:
            scrape = await self.scrape()
            if scrape.total("market_connection_up") < 1:
                raise TransientError("the ingestor is not connected to the simulator yet")

        await self._wait(ing, live)
        self.pids["ingestor"] = ing.proc.pid

    async def _wait(self, child: Child, ready: Callable[[], Any]) -> None:
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
            await asyncio.sleep(0.1)  # polling a child we just started: there is nothing to wait on instead
            self.tick()

    # -- the path
    async def drain(self, limit_s: float) -> tuple[bool, Edge]:
        """With the rate at 0: until nothing is in flight, queued, held back or unread by the consumer (bounded).

        Held back: ticks accepted but neither published, dropped nor queued are held by a gap repair
        (after a reconnect) until it ends, within the repair's own deadline.
        """
        deadline = time.monotonic() + limit_s
        while True:
            e = await self.edge()
            if (e.sent == e.received and e.queued == 0 and (e.consumed >= e.published or not self.consuming)
                    and e.accepted <= e.published + e.dropped_ingress):
                return True, e
            if time.monotonic() > deadline:
                return False, e
            await asyncio.sleep(0.1)  # the counters live in other processes: poll them
            self.tick()

    async def command_stats(self) -> dict[str, tuple[int, int]] | None:
        """Redis's own count of calls and the µs it spent in them, for each command of
        :data:`~ops.bench.analysis.REDIS_COMMANDS` (the writer's script; the consumer's reads and acks), from
        ``INFO commandstats``; None if it cannot tell.  On a shared Redis these include other clients' calls."""
        client = aioredis.Redis.from_url(self.redis_url, socket_timeout=HTTP_TIMEOUT_S,
                                         socket_connect_timeout=HTTP_TIMEOUT_S)
        try:
            info: dict[str, Any] = await client.info("commandstats")
        except (OSError, aioredis.RedisError):
            return None
        finally:
            await client.aclose()
        out: dict[str, tuple[int, int]] = {}
        for name in REDIS_COMMANDS:
            stat = info.get(f"cmdstat_{name}")
            out[name] = (int(stat.get("calls", 0)), int(stat.get("usec", 0))) if isinstance(stat, dict) else (0, 0)
        return out

    async def delete_keys(self) -> None:
        """Delete every key under the run's prefixes (bounded: 60 s); a failure becomes a note."""
        client = aioredis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)
        try:
            async with asyncio.timeout(60):
                keys = [k async for k in client.scan_iter(f"{self.prefix}:*", count=1000)]
                keys += [k async for k in client.scan_iter(f"{self.peak_prefix}:*", count=1000)]
                for i in range(0, len(keys), 500):
                    await client.delete(*keys[i : i + 500])
        except (OSError, TimeoutError, aioredis.RedisError) as exc:
            self.notes.append(f"could not delete the keys under {self.prefix}: {exc}")
        finally:
            await client.aclose()
