# size: one harness: its processes, fault injection, checker and report share one run's state; the pure parts are in
#   soak_plan.py.
"""``market soak``: the whole path as in production, under faults on a seeded schedule, checked throughout.

What runs (every process a real one, every fault a real one):

- Redis with AOF (``appendfsync everysec``) in ``DIR/redis``, capped at ``maxmemory``, behind a TCP
  fault proxy that every client goes through (so the link to Redis can be black-holed);
- the venue simulator (``ops.soak simulator``) with the profile of ``--venue`` (Binance spot by default,
  USD-M or COIN-M futures, OKX) and its limits, with a short connection age so the venue's planned close
  (``serverShutdown``, OKX's 64008 notice) and make-before-break rotation happen many times an hour;
- two ingestors on the same feed for redundancy (``market ingest``), each behind its own fault
  proxy to the venue, each with its own spill log and a co-located subscriber that checks the order
  of what the hot path hands it (``ops.soak:co_located``); the second one has a 1 MB spill cap;
- two SDK consumers in one group (``ops.soak consumer``), each writing the seq runs it handled to its
  own file before its reads are acknowledged.

The checker reads every stream of the venue's contiguous ids (:data:`ops.soak_plan.VENUE_PLANS`: trades and
aggregate trades on spot, aggregate trades on futures, trades on OKX) as it grows and holds it to the invariant
of :class:`ops.soak_plan.StreamCheck`; the other channels (book tickers, mark prices) run alongside, unchecked.
At the end the venue's newest ids (its own REST history) are compared with what was stored, and every
consumer-handled run with what was stored.  Resources (RSS, threads, open fds and asyncio tasks of every
process; Redis memory; ingress and spill; reconnects) and each ingestor's latency per stage (p50 and p99 of
frame -> ingress, frame -> co-located subscriber, frame -> Redis acknowledged, over each sampling interval, from
its metrics endpoint) are sampled every ``sample_s`` seconds; the per-process series are tested for growth over
the second half.
The report (``report.json``, ``report.md``, plots) is written at the end, also after Ctrl-C, and
refreshed every minute while the run lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import Tick
from ops.faultproxy import FaultProxy
from ops.redis_server import RedisServer, free_port, restart, start_redis
from ops.soak_plan import (
    FAULT_KINDS,
    FaultEvent,
    StreamCheck,
    applicable_faults,
    checked_channels,
    grows_without_bound,
    history_path,
    missing_from,
    newest_id,
    plan,
    recovery_summary,
    venue_plan,
)

__all__ = [
    "SoakConfig", "co_located", "latency_fields", "run_soak", "scrape_latency", "simulator_history", "simulator_limits",
]

GROUP: Final = "soak"
CHECKED_CHANNELS: Final = ("trade", "agg_trade")
#: how long the ingestors get at the end to store the venue's newest ids before they stop
CATCH_UP_S: Final = 60.0
#: how long a fault's end may take to heal before it counts as not recovered
RECOVERY_LIMIT_S: Final = 300.0


@dataclass(frozen=True)
class SoakConfig:
    venue: str = "binance"
    duration: float = 300.0
    rate: float = 400.0
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    channels: tuple[str, ...] = CHECKED_CHANNELS
    faults: dict[str, float] = field(default_factory=dict)
    seed: int = 1
    out: Path = Path("soak-report")
    sample_s: float = 5.0
    maxmemory_mb: int = 1024
    max_age_s: float = 0.0  # 0: from the duration (rotations many times an hour)


# --------------------------------------------------------------------------- co-located subscriber

_sub_state: dict[str, Any] = {"last": {}, "ticks": 0, "disorder": 0, "written": 0.0}


def co_located(tick: Tick) -> None:
    """A co-located subscriber (``--subscriber ops.soak:co_located``): counts ticks and any seq that
    does not increase per stream, and writes the totals to ``$MARKET_SOAK_SUBSCRIBER_FILE`` every few seconds."""
    st = _sub_state
    ident = (tick["symbol"], tick["channel"])
    last = st["last"].get(ident)
    seq = tick["seq"]
    if last is not None and seq <= last:
        st["disorder"] += 1
    st["last"][ident] = seq
    st["ticks"] += 1
    if st["ticks"] % 1024 == 0:
        now = time.monotonic()
        if now - st["written"] >= 2.0:
            st["written"] = now
            path = os.environ.get("MARKET_SOAK_SUBSCRIBER_FILE")
            if path:
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(orjson.dumps({"ticks": st["ticks"], "disorder": st["disorder"], "pid": os.getpid()}))
                os.replace(tmp, path)


# --------------------------------------------------------------------------- child roles


async def _report_tasks(path: str, every: float = 2.0) -> None:
    """Write this process's asyncio task count to ``path`` every ``every`` seconds (the sampler reads it)."""
    while True:
        _write_stats(path, len(asyncio.all_tasks()))
        await asyncio.sleep(every)


def _write_stats(path: str, tasks: int) -> None:
    """A few bytes on a local disk, replaced whole: cheap enough to do on the loop every few seconds."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps({"tasks": tasks, "pid": os.getpid()}))
    os.replace(tmp, path)


async def _consumer_main(
    redis_url: str, prefix: str, name: str, out: str, channels: Sequence[str], stats: str, venue: str = "binance",
) -> None:
    """One consumer of the group: every batch's seq runs go to ``out`` (one write) before its acks."""
    from consumer_sdk import Consumer

    reporter = asyncio.create_task(_report_tasks(stats))

    patterns = [f"{venue}:*:{c}" for c in channels]
    consumer = Consumer(redis_url=redis_url, patterns=patterns, group=GROUP, consumer=name, prefix=prefix,
                        start_id="0", claim_idle_ms=5000, rescan_s=1.0)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        async for batch in consumer.batches():
            runs: dict[str, list[int]] = {}
            lines: list[bytes] = []
            for key, _entry, tick in batch:
                if "gap_first" in tick:
                    continue
                seq = tick["seq"]
                run = runs.get(key)
                if run is not None and seq == run[1] + 1:
                    run[1] = seq
                    continue
                if run is not None:
                    lines.append(b"%s %d %d\n" % (key.encode(), run[0], run[1]))
                runs[key] = [seq, seq]
            lines += [b"%s %d %d\n" % (k.encode(), a, b) for k, (a, b) in runs.items()]
            if lines:
                os.write(fd, b"".join(lines))  # before the next read acknowledges this batch
    finally:
        os.close(fd)
        reporter.cancel()


def simulator_history(rate: float, symbols: int) -> int:
    """Trades (and aggregate trades) the soak's venue keeps per symbol for REST: ten minutes of the whole rate,
    at least 100,000, so every outage the schedule makes is repairable."""
    return max(100_000, int(rate * 600 / max(1, symbols)))


def simulator_limits(venue: str) -> dict[str, Any]:
    """The venue's own limits the soak's simulator takes (``market simulate --venue``'s defaults, its symbols
    aside); Binance spot keeps :class:`~ops.simulator.SimulatorConfig`'s, as the soak always ran it."""
    from ops.simulator.profiles import VENUE_DEFAULTS

    if venue == "binance":
        return {}
    return {k: v for k, v in VENUE_DEFAULTS[venue].items() if k != "symbols"}


async def _simulator_main(
    port: int, symbols: Sequence[str], rate: float, seed: int, max_age: float, stats: str, venue: str = "binance",
) -> None:
    from ops.simulator import SimulatorConfig, run_simulator

    # The history is allocated in full at start: the venue's memory is flat from its first second, so a
    # slope in the report is the product's, not the test venue's rings filling.
    config = SimulatorConfig(venue=venue, port=port, symbols=tuple(symbols), rate=rate, seed=seed, id_base=0,
                             max_connection_age=max_age, shutdown_notice=min(10.0, max_age / 4),
                             history=simulator_history(rate, len(symbols)), preallocate_history=True,
                             depth=False,  # the soak's ingestors carry no order books yet
                             **simulator_limits(venue))
    reporter = asyncio.create_task(_report_tasks(stats))
    try:
        await run_simulator(config)
    finally:
        reporter.cancel()


# --------------------------------------------------------------------------- the harness


@dataclass
class _Proc:
    role: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    planned_kills: int = 0
    unexpected: list[str] = field(default_factory=list)
    #: down on purpose (a scheduled kill, the end of the run): its exit is not a failure
    paused: bool = False

    async def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.args, env=self.env, stdout=asyncio.subprocess.DEVNULL, stderr=fd, start_new_session=True
            )
        finally:
            os.close(fd)
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.planned_kills += 1
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self, grace: float = 30.0) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(p.wait(), grace)
            except TimeoutError:
                p.kill()
                await p.wait()
        return p.returncode


#: the series held to the growth test (Redis grows by design until each stream reaches its MAXLEN: it is held
#: to maxmemory instead)
GROWTH_SUFFIXES: Final = (".rss_mb", ".threads", ".fds", ".tasks")
#: the ingestor's latency histograms the sampler reads, by the name of their stage in the report
LATENCY_METRICS: Final = {
    "ingest": ("market_ingest_latency_us", None),
    "redis": ("market_fanout_latency_us", ("stage", "redis")),
    "hotpath": ("market_e2e_latency_us", ("path", "hotpath")),
}


def scrape_latency(text: str) -> dict[str, LatencyHistogram]:
    """The latency histograms of :data:`LATENCY_METRICS` in a Prometheus text page (the stages found)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {metric: (stage, label) for stage, (metric, label) in LATENCY_METRICS.items()}
    buckets: dict[str, list[int]] = {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        stage, label = wanted[family.name]
        for sample in family.samples:
            if label is not None and sample.labels.get(label[0]) != label[1]:
                continue
            if sample.name.endswith("_bucket"):
                buckets.setdefault(stage, []).append(int(sample.value))
            elif sample.name.endswith("_sum"):
                sums[stage] = sample.value
    return {stage: LatencyHistogram.from_buckets(b, sums.get(stage, 0.0)) for stage, b in buckets.items()}


def latency_fields(
    name: str, now: dict[str, LatencyHistogram], before: dict[str, LatencyHistogram],
) -> dict[str, float]:
    """``<name>.<stage>_p50_us`` and ``_p99_us`` of what each stage observed between ``before`` and ``now``
    (all of ``now`` when the process restarted in between, its counts having gone down); none for a stage
    that observed nothing."""
    out: dict[str, float] = {}
    for stage, hist in now.items():
        prev = before.get(stage)
        window = hist
        if prev is not None and all(a >= b for a, b in zip(hist.counts, prev.counts, strict=True)):
            window = hist.since(prev)
        if window.count:
            out[f"{name}.{stage}_p50_us"] = window.percentile(0.50)
            out[f"{name}.{stage}_p99_us"] = window.percentile(0.99)
    return out


def _read_tasks(path: Path, pid: int) -> int | None:
    """The task count a soak child wrote to ``path``, when it is the live process's (``pid``)."""
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("pid") != pid or not isinstance(doc.get("tasks"), int):
        return None
    return int(doc["tasks"])


def _proc_stats(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_mb"] = int(line.split()[1]) / 1024
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {}
    return out


def _http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.prefix = f"soak{cfg.seed}"
        self.venue = venue_plan(cfg.venue)
        #: the channels held to the stream invariant; the others run alongside, unchecked
        self.checked = checked_channels(self.venue, cfg.channels)
        #: the kinds asked for that the venue's profile cannot take (kind -> why): reported, never injected
        self.faults, self.not_applicable = applicable_faults(self.venue, cfg.faults)
        self.events = plan(self.faults, cfg.duration, cfg.seed)
        self.checks: dict[str, StreamCheck] = {}
        self.cursors: dict[str, str] = {}
        self.samples: list[dict[str, Any]] = []
        self.fault_log: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.failures: list[str] = []
        self.started = 0.0
        self.redis_server: RedisServer | None = None
        self.procs: dict[str, _Proc] = {}
        self.venue_proxies: list[FaultProxy] = []
        self.redis_proxy: FaultProxy | None = None
        self.client: Any = None  # redis.asyncio.Redis on the server itself (not through the proxy)
        self.sim_port = 0
        self._pending_recovery: list[tuple[dict[str, Any], dict[str, int]]] = []
        self.stopped_early = False
        #: per checked stream: the venue's newest id when the feed stopped, and how many ids up to it are neither
        #: stored nor marked
        self.venue_newest: dict[str, int] = {}
        self.venue_missing: dict[str, int | None] = {}
        #: the unchecked streams (book tickers, mark prices): their entries at the end
        self.extra_streams: dict[str, int] = {}
        #: each ingestor's Prometheus port, and its latency histograms at the last sample (for windowed percentiles)
        self.metrics_ports: dict[str, int] = {}
        self._latency_seen: dict[str, dict[str, LatencyHistogram]] = {}

    # -- helpers ------------------------------------------------------------------------------
    def t(self) -> float:
        return time.monotonic() - self.started

    def stats_path(self, name: str) -> Path:
        """Where the soak's own child ``name`` writes its asyncio task count."""
        return self.out / "stats" / f"{name}.json"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    def keys(self) -> list[str]:
        """The checked streams' keys."""
        return [f"{self.prefix}:{self.venue.name}:{s}:{c}" for s in self.cfg.symbols for c in self.checked]

    def extra_keys(self) -> list[str]:
        """The unchecked streams' keys (the channels asked for that are not the venue's contiguous ids)."""
        return [f"{self.prefix}:{self.venue.name}:{s}:{c}" for s in self.cfg.symbols for c in self.cfg.channels
                if c not in self.checked]

    async def venue_last(self) -> dict[str, int]:
        """The venue's newest id per checked stream (its REST history: trades, aggregate trades)."""
        out: dict[str, int] = {}
        for key in self.keys():
            _, _, symbol, channel = key.split(":")
            url = self.rest_url + history_path(self.venue, symbol, channel)
            newest = newest_id(self.venue, channel, await asyncio.to_thread(_http_json, url))
            if newest is not None:
                out[key] = newest
        return out

    # -- set-up ---------------------------------------------------------------------------------
    async def _start_processes(self, redis_url: str) -> None:
        cfg = self.cfg
        py = sys.executable
        self.sim_port = free_port()
        max_age = cfg.max_age_s or max(60.0, min(600.0, cfg.duration / 6))
        base_env = {**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": self.prefix,
                    "PYTHONUNBUFFERED": "1"}
        (self.out / "stats").mkdir(parents=True, exist_ok=True)
        sim = _Proc("simulator", [py, "-m", "ops.soak", "simulator", str(self.sim_port), ",".join(cfg.symbols),
                                  str(cfg.rate), str(cfg.seed), str(max_age), str(self.stats_path("simulator")),
                                  self.venue.name],
                    base_env,
                    self.out / "logs" / "simulator.log")
        self.procs["simulator"] = sim
        await sim.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                await asyncio.to_thread(_http_json, self.rest_url + self.venue.ping, 1.0)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the simulator did not answer within 20 s") from None
                await asyncio.sleep(0.1)
        for i in range(2):
            proxy = FaultProxy(self.sim_port)
            await proxy.__aenter__()
            self.venue_proxies.append(proxy)
            conf = self.out / f"ingestor-{i}.toml"
            spill_cap = "\n[spill]\nmax_mb = 1\n[writer]\ncapacity = 5000\n" if i == 1 else ""
            # ingestor-0 rotates at half the venue's age limit; ingestor-1 outlives it and meets serverShutdown
            age = max_age / 2 if i == 0 else 4 * max_age
            conf.write_text(
                f"[session]\nping_interval = 5.0\nping_timeout = 5.0\nstall_timeout = 10.0\nopen_timeout = 5.0\n"
                f"backoff_cap = 5.0\nhealthy_after = 5.0\nmax_age = {age}\n"
                f"[retention]\nmaxlen = 500000\n{spill_cap}"
            )
            env = {**base_env, "MARKET_SOAK_SUBSCRIBER_FILE": str(self.out / f"subscriber-{i}.json")}
            self.metrics_ports[f"ingestor-{i}"] = metrics_port = free_port()
            self.procs[f"ingestor-{i}"] = _Proc(
                f"ingestor-{i}",
                [py, "-m", "ops.cli", "ingest", "--venue", self.venue.name, "--url", proxy.url,
                 "--rest-url", self.rest_url,
                 "--symbols", ",".join(cfg.symbols), "--channels", ",".join(cfg.channels),
                 "--metrics-port", str(metrics_port),
                 "--config", str(conf), "--spill-dir", str(self.out / f"spill-{i}"),
                 "--subscriber", "ops.soak:co_located"],
                env, self.out / "logs" / f"ingestor-{i}.log",
            )
            await self.procs[f"ingestor-{i}"].start()
        for i in range(2):
            self.procs[f"consumer-{i}"] = _Proc(
                f"consumer-{i}",
                [py, "-m", "ops.soak", "consumer", redis_url, self.prefix, f"c{i}",
                 str(self.out / f"consumer-{i}.runs"), ",".join(self.checked),
                 str(self.stats_path(f"consumer-{i}")), self.venue.name],
                base_env, self.out / "logs" / f"consumer-{i}.log",
            )
            await self.procs[f"consumer-{i}"].start()

    # -- the loops ------------------------------------------------------------------------------
    async def _check_once(self) -> None:
        assert self.client is not None
        for key in self.keys():
            check = self.checks.setdefault(key, StreamCheck(key))
            while True:
                start = self.cursors.get(key)
                entries = await self.client.xrange(key, min=f"({start}" if start else "-", count=5000)
                for entry_id, fields in entries:
                    eid = entry_id.decode()
                    tick = orjson.loads(fields[b"d"])
                    gap = (int(tick["gap_first"]), int(tick["gap_last"])) if "gap_first" in tick else None
                    check.feed(eid, int(tick["seq"]), gap)
                    self.cursors[key] = eid
                if len(entries) < 5000:
                    break
        now = self.t()
        still: list[tuple[dict[str, Any], dict[str, int]]] = []
        for record, targets in self._pending_recovery:
            if all((self.checks[k].next or 0) > v for k, v in targets.items()):
                record["recovery_s"] = round(now - record["ended"], 2)
            elif now - record["ended"] > RECOVERY_LIMIT_S:
                record["recovery_s"] = None
                self.failures.append(f"{record['kind']} at {record['at']:.0f} s: not recovered in {RECOVERY_LIMIT_S} s")
            else:
                still.append((record, targets))
        self._pending_recovery = still

    async def _checker(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # Redis may be down or restarting: check again next round
                await self._check_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)

    async def _sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": round(self.t(), 1)}
        by_pid: dict[int, str] = {}
        for name, p in self.procs.items():
            if p.pid is not None:
                by_pid[p.pid] = name
                for k, v in _proc_stats(p.pid).items():
                    row[f"{name}.{k}"] = v
                tasks = _read_tasks(self.stats_path(name), p.pid)
                if tasks is not None:
                    row[f"{name}.tasks"] = tasks
        for name, port in self.metrics_ports.items():
            row.update(await asyncio.to_thread(self._latency_sample, name, port))
        if self.redis_server is not None and self.redis_server.process.poll() is None:
            direct: Any = aioredis.Redis.from_url(self.redis_server.url, socket_timeout=2)
            try:
                info = await direct.info("memory")
                row["redis.used_mb"] = round(int(info["used_memory"]) / 2**20, 2)
                for hb_key in await direct.keys(f"{self.prefix}:_hb:ingestor:*"):
                    raw = await direct.get(hb_key)
                    if raw is None:
                        continue
                    doc = orjson.loads(raw)
                    name = str(doc.get("id") or hb_key.decode())[-6:]
                    row.update(_hb_fields(name, doc))
                    owner = by_pid.get(doc.get("pid"))
                    if owner is not None and isinstance(doc.get("tasks"), int):
                        row[f"{owner}.tasks"] = doc["tasks"]
            except Exception:  # a sample is best effort while Redis restarts
                pass
            finally:
                await direct.aclose()
        return row

    def _latency_sample(self, name: str, port: int) -> dict[str, float]:
        """p50 and p99 of each latency stage of ingestor ``name`` since the last sample (its metrics endpoint)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as r:
                text = r.read().decode()
        except OSError:
            return {}
        now = scrape_latency(text)
        before = self._latency_seen.get(name, {})
        self._latency_seen[name] = now
        return latency_fields(name, now, before)

    async def _sampler(self, stop: asyncio.Event) -> None:
        last_report = time.monotonic()
        while not stop.is_set():
            self.samples.append(await self._sample())
            await self._supervise()
            self._progress()
            if time.monotonic() - last_report > 60:
                last_report = time.monotonic()
                self.write_report(final=False)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.sample_s)

    async def _supervise(self) -> None:
        """A process that ended without the schedule killing it is a failure (restarted so the run goes on)."""
        for name, p in self.procs.items():
            proc = p.proc
            if proc is None or proc.returncode is None or p.paused:
                continue
            msg = f"{name} exited with status {proc.returncode} at {self.t():.0f} s (not scheduled)"
            p.unexpected.append(msg)
            self.failures.append(msg)
            await p.start()

    def _progress(self) -> None:
        breaks = sum(c.breaks for c in self.checks.values())
        stored = sum(c.stored for c in self.checks.values())
        done = sum(1 for f in self.fault_log if "ended" in f)
        last = self.samples[-1] if self.samples else {}
        rss = max((v for k, v in last.items() if k.endswith(".rss_mb") and k.startswith("ingestor")), default=0)
        print(
            f"soak {self.t():6.0f}/{self.cfg.duration:.0f} s  stored {stored}  breaks {breaks}  "
            f"faults {done}/{len(self.events)}  ingestor rss {rss:.0f} MB  redis {last.get('redis.used_mb', 0)} MB",
            file=sys.stderr, flush=True,
        )

    async def _faults(self, stop: asyncio.Event) -> None:
        for event in self.events:
            delay = event.at - self.t()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            record: dict[str, Any] = {**event.as_dict(), "started": round(self.t(), 2)}
            self.fault_log.append(record)
            try:
                note = await self._inject(event)
            except Exception as exc:  # a fault that cannot be injected is reported, not hidden
                record["skipped"] = f"{type(exc).__name__}: {exc}"
                self.skipped.append(record)
                continue
            if note:
                record["note"] = note
            record["ended"] = round(self.t(), 2)
            try:
                targets = await self.venue_last()
            except (OSError, ValueError):
                targets = {}
            self._pending_recovery.append((record, targets))

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def _inject(self, e: FaultEvent) -> str:
        sim = self.rest_url + "/control"
        if e.kind == "close_storm":
            for _ in range(5):
                await asyncio.to_thread(_http_json, f"{sim}/close_all")
                await self._sleep(e.duration / 5)
            return ""
        if e.kind in ("stall", "refuse"):
            await asyncio.to_thread(_http_json, f"{sim}/{e.kind}?seconds={e.duration:.1f}")
            await self._sleep(e.duration)
            return ""
        if e.kind == "bad_frames":
            await asyncio.to_thread(_http_json, f"{sim}/faults?malformed=0.01&duplicate=0.02&out_of_order=0.02")
            await self._sleep(e.duration)
            await asyncio.to_thread(_http_json, f"{sim}/clear")
            return ""
        if e.kind == "blackhole":
            proxy = self.venue_proxies[e.target]
            proxy.blackhole()
            await self._sleep(e.duration)
            proxy.restore()
            return f"ingestor-{e.target}"
        if e.kind == "http_error":
            proxy = self.venue_proxies[e.target]
            proxy.http_error(e.status)
            await self._sleep(e.duration)
            proxy.restore()
            return f"ingestor-{e.target}, HTTP {e.status}, {proxy.refused} refused so far"
        if e.kind == "redis_restart":
            server = self.redis_server
            assert server is not None
            server.stop()
            await self._sleep(e.duration)
            await asyncio.to_thread(restart, server, appendonly=True, timeout=60)
            await self._configure_redis()
            return ""
        if e.kind in ("redis_unreachable", "spill_full"):
            assert self.redis_proxy is not None
            self.redis_proxy.blackhole()
            await self._sleep(e.duration)
            self.redis_proxy.restore()
            return ""
        if e.kind in ("ingestor_kill", "consumer_kill"):
            name = f"{e.kind.split('_')[0]}-{e.target}"
            p = self.procs[name]
            p.paused = True
            p.kill()
            if p.proc is not None:
                await p.proc.wait()
            await self._sleep(e.duration)
            await p.start()
            p.paused = False
            return name
        raise ValueError(f"unknown fault kind {e.kind!r}")

    async def _configure_redis(self) -> None:
        assert self.redis_server is not None
        direct = aioredis.Redis.from_url(self.redis_server.url)
        try:
            await direct.config_set("maxmemory", f"{self.cfg.maxmemory_mb}mb")
            await direct.config_set("maxmemory-policy", "noeviction")
            await direct.config_set("appendfsync", "everysec")
        finally:
            await direct.aclose()

    # -- the run --------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "redis").mkdir(exist_ok=True)
        stop = asyncio.Event()
        with start_redis(appendonly=True, directory=str(self.out / "redis"), timeout=30) as server:
            self.redis_server = server
            await self._configure_redis()
            self.redis_proxy = FaultProxy(server.port)
            await self.redis_proxy.__aenter__()
            redis_url = f"redis://127.0.0.1:{self.redis_proxy.port}/0"
            self.client = aioredis.Redis.from_url(server.url, socket_timeout=10)
            self.started = time.monotonic()
            try:
                await self._start_processes(redis_url)
                tasks = [asyncio.create_task(c(stop)) for c in (self._checker, self._sampler, self._faults)]
                try:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(asyncio.gather(*tasks)), cfg.duration)
                except asyncio.CancelledError:
                    self.stopped_early = True
                stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._finish()
            finally:
                await self._teardown()
                self.client = None
        return self.write_report(final=True)

    async def _catch_up(self) -> None:
        """The venue's newest ids now; the ingestors get :data:`CATCH_UP_S` to store (or mark) every id up to them.
        What is then neither stored nor marked is counted per stream (``venue_missing``)."""
        try:
            self.venue_newest = await self.venue_last()
        except (OSError, ValueError) as exc:
            self.failures.append(f"the venue's newest ids could not be read at the end: {exc}")
            return
        deadline = time.monotonic() + CATCH_UP_S
        while True:
            with contextlib.suppress(Exception):
                await self._check_once()
            behind = {k: v for k, v in self.venue_newest.items() if (self.checks[k].next or 0) <= v}
            if not behind or time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        for key, newest in self.venue_newest.items():
            check = self.checks[key]
            missing = None if check.next is None else max(0, newest - (check.next - 1))
            self.venue_missing[key] = missing
            if missing is None:
                self.failures.append(f"{key}: nothing stored, the venue is at id {newest}")
            elif missing:
                self.failures.append(f"{key}: {missing} ids up to the venue's newest ({newest}) neither stored "
                                     f"nor marked {CATCH_UP_S:.0f} s after the feed's end")

    async def _finish(self) -> None:
        """Stop the feed, let everything settle, check the whole streams and what the consumers saw."""
        await self._catch_up()
        for name in ("ingestor-0", "ingestor-1"):
            p = self.procs.get(name)
            if p is not None:
                p.paused = True
                code = await p.stop()
                if code not in (0, None):
                    self.failures.append(f"{name} stopped with status {code}")
        with contextlib.suppress(Exception):
            await self._check_once()
        assert self.client is not None
        for key in self.extra_keys():
            self.extra_streams[key] = int(await self.client.xlen(key))
            if not self.extra_streams[key]:
                self.failures.append(f"{key}: nothing stored")
        # the consumers drain what is stored (bounded)
        assert self.client is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                pending = 0
                for key in self.keys():
                    for g in await self.client.xinfo_groups(key):
                        if g["name"] == GROUP.encode() or g["name"] == GROUP:
                            pending += int(g.get("pending", 0)) + int(g.get("lag") or 0)
                if pending == 0:
                    break
            except Exception:  # a stream may not exist yet in a tiny run
                pass
            await asyncio.sleep(0.5)
        for name in ("consumer-0", "consumer-1"):
            p = self.procs.get(name)
            if p is not None:
                p.paused = True
                await p.stop()
        seen: dict[str, list[tuple[int, int]]] = {}
        for i in range(2):
            path = self.out / f"consumer-{i}.runs"
            if not path.exists():
                continue
            for line in path.read_bytes().splitlines():
                parts = line.split()
                if len(parts) == 3:
                    seen.setdefault(parts[0].decode(), []).append((int(parts[1]), int(parts[2])))
        self.consumer_missing = {}
        for key, check in self.checks.items():
            upto = (check.next or 1) - 1
            miss = missing_from([(a, b) for a, b in check.runs], seen.get(key, []), upto)
            self.consumer_missing[key] = miss
            if miss:
                self.failures.append(f"consumers never handled {miss} stored ticks of {key}")

    async def _teardown(self) -> None:
        for p in self.procs.values():
            p.paused = True
            await p.stop(10)
        for proxy in self.venue_proxies:
            await proxy.__aexit__(None, None, None)
        if self.redis_proxy is not None:
            await self.redis_proxy.__aexit__(None, None, None)
        if self.client is not None:
            await self.client.aclose()

    # -- the report -----------------------------------------------------------------------------
    def write_report(self, *, final: bool) -> dict[str, Any]:
        breaks = [c.first_break for c in self.checks.values() if c.breaks]
        failures = list(self.failures) + [f"invariant: {b}" for b in breaks]
        growth = self._growth()
        failures += [f"resource grows without bound: {name}" for name, grows in growth.items() if grows]
        redis_peak = max((row.get("redis.used_mb", 0.0) for row in self.samples), default=0.0)
        if redis_peak > self.cfg.maxmemory_mb:
            failures.append(f"Redis used {redis_peak:.0f} MB, above its cap of {self.cfg.maxmemory_mb} MB")
        subs = {}
        for i in range(2):
            path = self.out / f"subscriber-{i}.json"
            if path.exists():
                with contextlib.suppress(ValueError, OSError):
                    subs[f"ingestor-{i}"] = orjson.loads(path.read_bytes())
                    if subs[f"ingestor-{i}"].get("disorder"):
                        failures.append(f"co-located subscriber of ingestor-{i} saw a seq out of order")
        recoveries: dict[str, list[float | None]] = {}
        for f in self.fault_log:
            if "skipped" in f:
                continue
            recoveries.setdefault(f["kind"], []).append(f.get("recovery_s") if "recovery_s" in f else None)
        kinds_injected = {f["kind"] for f in self.fault_log if "skipped" not in f}
        events = _count_log_events(self.out / "logs", ("server_shutdown_notice", "gap_repaired", "gap_marked"))
        rotations = _count_log_events(self.out / "logs", ("rotated",), field="reason")
        report = {
            "final": final,
            "passed": final and not failures and not self.stopped_early,
            "stopped_early": self.stopped_early,
            "config": {**asdict(self.cfg), "out": str(self.cfg.out)},
            "venue": self.venue.name,
            "checked_channels": list(self.checked),
            "elapsed_s": round(self.t(), 1),
            "streams": {k: {"stored": c.stored, "marked": c.marked, "markers": c.markers, "breaks": c.breaks,
                            "next": c.next, "venue_newest": self.venue_newest.get(k),
                            "venue_missing": self.venue_missing.get(k),
                            "consumer_missing": getattr(self, "consumer_missing", {}).get(k)}
                        for k, c in self.checks.items()},
            "ticks_stored": sum(c.stored for c in self.checks.values()),
            "extra_streams": self.extra_streams,
            "faults": self.fault_log,
            "faults_skipped": self.skipped,
            "faults_not_applicable": self.not_applicable,
            "fault_kinds_injected": sorted(kinds_injected),
            "fault_kinds_missing": sorted(set(self.faults) - kinds_injected) if final else [],
            "recovery": recovery_summary(recoveries),
            "restarts": {n: {"starts": p.starts, "scheduled_kills": p.planned_kills, "unexpected": p.unexpected}
                         for n, p in self.procs.items()},
            "co_located": subs,
            "venue_events": {"rotations": rotations.get("rotated", 0),
                             "server_shutdown_notices": events.get("server_shutdown_notice", 0),
                             "gap_repairs": events.get("gap_repaired", 0), "gaps_marked": events.get("gap_marked", 0)},
            "growth": growth,
            "redis_peak_mb": redis_peak,
            "failures": failures,
            "samples": self.samples,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        (self.out / "report.md").write_text(_markdown(report))
        if final:
            _plots(self.out, self.samples)
        return report

    def _growth(self) -> dict[str, bool]:
        series: dict[str, list[tuple[float, float]]] = {}
        for row in self.samples:
            for k, v in row.items():
                if k == "t" or not isinstance(v, (int, float)):
                    continue
                # Redis grows by design until each stream reaches its MAXLEN: it is held to maxmemory instead
                if k.endswith(GROWTH_SUFFIXES):
                    series.setdefault(k, []).append((row["t"], float(v)))
        floors = {".rss_mb": 20.0, ".threads": 3.0, ".fds": 8.0, ".tasks": 10.0}
        out = {}
        for k, pts in series.items():
            floor = next((f for suffix, f in floors.items() if k.endswith(suffix)), 0.0)
            out[k] = grows_without_bound(pts, floor=floor) if len(pts) >= 8 else False
        return out


def _count_log_events(logs: Path, names: Sequence[str], *, field: str = "event") -> dict[str, int]:
    """How many JSON log lines of the ingestors have ``field`` starting with one of ``names``."""
    out: dict[str, int] = {}
    for path in logs.glob("ingestor-*.log"):
        with open(path, "rb") as f:
            for line in f:
                if not line.startswith(b"{"):
                    continue
                try:
                    value = orjson.loads(line).get(field)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(value, str):
                    for name in names:
                        if value.startswith(name):
                            out[name] = out.get(name, 0) + 1
    return out


def _hb_fields(name: str, doc: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}

    def num(path: str) -> None:
        node: Any = doc
        for part in path.split("."):
            if not isinstance(node, dict):
                return
            node = node.get(part)
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            out[f"hb-{name}.{path}"] = float(node)

    for path in ("ingress.length", "writer.buffered", "writer.spilled", "connections.reconnects"):
        num(path)
    return out


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Soak report",
        "",
        f"- verdict: **{'PASS' if r['passed'] else 'FAIL' if r['final'] else 'running'}**"
        + (" (stopped early)" if r["stopped_early"] else ""),
        f"- venue: {r['venue']}; elapsed: {r['elapsed_s'] / 60:.1f} min of {r['config']['duration'] / 60:.1f}; "
        f"seed {r['config']['seed']}; rate {r['config']['rate']:g} ticks/s; "
        f"symbols {', '.join(r['config']['symbols'])}; "
        f"channels {', '.join(r['config']['channels'])} (checked: {', '.join(r['checked_channels']) or 'none'})",
        f"- ticks stored and checked: {r['ticks_stored']}",
        f"- venue events: {r['venue_events']['rotations']} make-before-break rotations, "
        f"{r['venue_events']['server_shutdown_notices']} serverShutdown notices, "
        f"{r['venue_events']['gap_repairs']} gaps repaired over REST, {r['venue_events']['gaps_marked']} marked",
        f"- faults injected: {len([f for f in r['faults'] if 'skipped' not in f])} "
        f"({len(r['fault_kinds_injected'])} kinds); skipped: {len(r['faults_skipped'])}",
        *[f"- not applicable to {r['venue']}: {kind} ({why})" for kind, why in r["faults_not_applicable"].items()],
        "",
        "## Failures",
        "",
        *([f"- {f}" for f in r["failures"]] or ["none"]),
        "",
        "## Recovery per fault kind",
        "",
        "| kind | what | injected | recovered | median s | worst s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, s in r["recovery"].items():
        lines.append(f"| {kind} | {FAULT_KINDS[kind][0]} | {s['injected']} | {s['recovered']} | "
                     f"{s['median_s']} | {s['worst_s']} |")
    lines += ["", "## Streams", "",
              "| stream | stored | ids in gap markers | markers | breaks | venue newest | venue missing "
              "| consumer missing |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, s in r["streams"].items():
        lines.append(f"| {k} | {s['stored']} | {s['marked']} | {s['markers']} | {s['breaks']} | "
                     f"{s['venue_newest']} | {s['venue_missing']} | {s['consumer_missing']} |")
    if r["extra_streams"]:
        lines += ["", "Unchecked streams (entries at the end): "
                  + ", ".join(f"{k} {n}" for k, n in r["extra_streams"].items())]
    lines += ["", "## Processes", "", "| process | starts | scheduled kills | unexpected exits |",
              "| --- | --- | --- | --- |"]
    for n, p in r["restarts"].items():
        lines.append(f"| {n} | {p['starts']} | {p['scheduled_kills']} | {len(p['unexpected'])} |")
    lines += ["", "## Resources (growth over the second half)", "",
              f"Redis peak: {r['redis_peak_mb']:.0f} MB of its {r['config']['maxmemory_mb']} MB cap "
              "(streams grow by design until they reach their MAXLEN, so Redis is held to its cap, not to a slope).",
              "",
              "| series | first | last | grows |",
              "| --- | --- | --- | --- |"]
    samples = r["samples"]
    for name, grows in sorted(r["growth"].items()):
        vals = [row[name] for row in samples if name in row]
        if vals:
            lines.append(f"| {name} | {vals[0]:g} | {vals[-1]:g} | {'YES' if grows else 'no'} |")
    lines += ["", "## Faults", "", "| at s | kind | lasted s | recovery s | note |", "| --- | --- | --- | --- | --- |"]
    for f in r["faults"]:
        rec = f.get("skipped") or f.get("recovery_s")
        lines.append(f"| {f['started']:.0f} | {f['kind']} | {f['duration']:.1f} | {rec} | {f.get('note', '')} |")
    return "\n".join(lines) + "\n"


def _plots(out: Path, samples: list[dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = {"rss_mb": "RSS (MB)", "threads": "threads", "fds": "open fds", "tasks": "asyncio tasks",
              "ingest_p99_us": "frame -> ingress p99 (µs)", "hotpath_p99_us": "frame -> co-located p99 (µs)",
              "redis_p99_us": "frame -> Redis acknowledged p99 (µs)"}
    fig, axes = plt.subplots(len(groups) + 1, 1, figsize=(10, 3 * (len(groups) + 1)), sharex=True)
    for ax, (suffix, title) in zip(axes, groups.items(), strict=False):
        names = sorted({k for row in samples for k in row if k.endswith("." + suffix)})
        for name in names:
            pts = [(row["t"] / 60, row[name]) for row in samples if name in row]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name.rsplit(".", 1)[0])
        ax.set_ylabel(title)
        ax.legend(fontsize=7, loc="upper left")
    pts = [(row["t"] / 60, row["redis.used_mb"]) for row in samples if "redis.used_mb" in row]
    axes[-1].plot([p[0] for p in pts], [p[1] for p in pts], label="redis used")
    axes[-1].set_ylabel("Redis (MB)")
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(out / "resources.png", dpi=80)
    plt.close(fig)


async def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    return await Soak(cfg).run()


def _main(argv: list[str]) -> None:
    role = argv[0] if argv else ""
    if role == "consumer":
        redis_url, prefix, name, out, channels, stats = argv[1:7]
        venue = argv[7] if len(argv) > 7 else "binance"
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_consumer_main(redis_url, prefix, name, out, channels.split(","), stats, venue))
    elif role == "simulator":
        port, symbols, rate, seed, max_age, stats = argv[1:7]
        venue = argv[7] if len(argv) > 7 else "binance"
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_simulator_main(int(port), symbols.split(","), float(rate), int(seed), float(max_age), stats,
                                        venue))
    else:
        print("usage: python -m ops.soak consumer|simulator ... (started by `market soak`)", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    _main(sys.argv[1:])
