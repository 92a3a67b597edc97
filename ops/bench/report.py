"""``market bench``: the whole path under a stepped load, measured stage by stage, and its report.

What runs, all on this machine:

- the venue simulator, a child process (``market simulate --id-base 0 --seed N``, 20 symbols);
- one ingestor, a child process (``market ingest``: trade, agg_trade, book_ticker on every symbol, with
  16 co-located ``ops.bench.probe:noop`` subscribers on its hot path), writing under a unique key prefix;
- in this process, an SDK :class:`~consumer_sdk.consumer.Consumer` reading every stream through a
  consumer group and measuring the Redis path end to end: ``now - tick["ts_recv"]`` (frame received by
  the ingestor -> consumer callback; one wall clock, one machine).

Then the peak ingest, on its own: the ingestor is restarted without subscribers, the consumer stops,
and the rate is stepped up (``peak_schedule``) until a step saturates: simulator -> WebSocket ->
normalize -> Redis and nothing else.  And the cost of the latency instrumentation
(:mod:`ops.bench.ingest`: the ingest path at full speed, timing off / sampled / every tick).

The simulator's rate is stepped through a schedule (``/control/rate``).  Each step: a warm-up, then a
measurement window, with the ingestor's ``/metrics`` and the simulator's ``/control/state`` read at
both edges (latency histograms are diffed bucket by bucket, so each step's percentiles cover its own
window only) and every :data:`SAMPLE_S` in between (queues over time); then the rate goes to 0 and
the path drains before the next step, so no step inherits the previous one's backlog.

Per step: latency percentiles of four stages (ingest: frame -> ingress; hot path: publish ->
co-located callback; Redis: frame -> Redis acknowledged; Redis path e2e: frame -> SDK consumer
callback), throughput at each hop, queue lengths, drops, reconnects, CPU per process from
``/proc/<pid>/stat`` and the tallies (what the simulator sent, what the ingestor received, accepted,
published, dropped or still holds, what the consumer got).  A step is *saturated* when anything piles
up or is lost: the simulator generating less than offered (starved of CPU), frames piling up between
the simulator and the ingestor (the socket), the ingress queue growing, drops, a reconnect, or the
consumer falling behind.  The peak is the highest step that is not saturated and keeps the Redis
path's p99 within its target.

At the end the rate is held at 0 until everything drained, so the final tally is exact: frames sent =
frames received; ticks accepted = published + dropped + still queued; consumed = published.  Then the
children stop, the keys are deleted, and two in-process benchmarks run alone: the Redis writer against
the naive per-tick ``XADD`` pipeline (:func:`ops.bench.writer.run_writer_bench`) and the hot path at
50k ticks/s with 16 subscribers (:func:`ops.bench.hotpath.run_hotpath_bench`).

Every wait is bounded, every child is stopped and every key deleted in ``finally`` blocks; a rate the
machine cannot sustain is reported as saturation, and the sweep stops early only when a backlog does
not drain in time or the venue connection was lost.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from consumer_sdk.core.errors import ConfigError, MarketError
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY
from consumer_sdk.core.loop import choose_loop, loop_name
from consumer_sdk.core.urls import redact_url, validate_redis_url
from distributor.hotpath import HOT_SAMPLE_EVERY
from ops.bench.analysis import summarize
from ops.bench.harness import Harness
from ops.bench.hotpath import run_hotpath_bench
from ops.bench.ingest import run_ingest_bench
from ops.bench.limits import measure_limits
from ops.bench.plots import draw_plots
from ops.bench.processes import check_port_free, git_state, listener_pid, machine, version
from ops.bench.profiles import (
    CHANNELS,
    CONSUMER_COUNT,
    FULL_PEAK_SCHEDULE,
    FULL_SCHEDULE,
    PROBE,
    QUICK_PEAK_SCHEDULE,
    QUICK_SCHEDULE,
    REFERENCE_RATE,
    RETENTION_MAXLEN,
    SAMPLE_S,
    SUBSCRIBERS,
    SYMBOLS,
    TARGETS,
)
from ops.bench.render import render_markdown
from ops.bench.stages import pipeline
from ops.bench.writer import measure_flush, run_writer_bench

__all__ = ["run_bench", "write_report"]


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """Write the plots, ``report.json`` and ``report.md`` into ``out_dir`` (the plots' names go in the report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        plots, note = draw_plots(report, out_dir)
    except Exception as exc:  # a plot must never cost the report
        plots, note = [], f"plotting failed: {type(exc).__name__}: {exc}"
    report["plots"] = plots
    report["plots_note"] = note
    (out_dir / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _redis_info(url: str) -> dict[str, Any]:
    """INFO server of the Redis at ``url``; :class:`TransientError` with one line when it does not answer."""
    from consumer_sdk.core.redis import connect_redis

    client = await connect_redis(url)
    try:
        info: dict[str, Any] = await client.info("server")
        return info
    finally:
        await client.aclose()


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {str(out_dir)!r}: {exc.strerror or exc}") from None


def _command(quick: bool, out_dir: Path, seed: int, schedule: Sequence[float] | None, step_s: float | None) -> str:
    cmd = "market bench" + (" --quick" if quick else "") + f" --seed {seed} --out {out_dir}"
    if schedule is not None or step_s is not None:
        cmd += "   # custom schedule or window: call ops.bench.report.run_bench directly"
    return cmd


async def run_bench(
    *,
    quick: bool,
    out_dir: Path,
    redis_url: str,
    seed: int = 1,
    schedule: Sequence[float] | None = None,
    step_s: float | None = None,
    progress: Callable[[str, float], None] | None = None,
    writer_ticks: int | None = None,
    hotpath_duration: float | None = None,
    sim_port: int | None = None,
    metrics_port: int | None = None,
    subscribers: int = SUBSCRIBERS,
    ingest_rounds: int | None = None,
    ingest_ticks: int | None = None,
    peak_schedule: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Run the load test and write its report into ``out_dir``; returns the report (``report.json``'s content).

    ``quick``: rates 1k, 10k, 50k, 100k with 8 s windows, a 100k-tick writer baseline and a 10 s hot-path
    run (under 3 minutes); otherwise 1k to 200k with 15 s windows, 500k ticks and 20 s.  ``schedule``
    (ticks/s) and ``step_s`` (the measured window) override the steps; ``writer_ticks`` and
    ``hotpath_duration`` the stand-alone benchmarks (0 skips one), ``ingest_rounds`` the rounds of the
    instrumentation-cost benchmark (:mod:`ops.bench.ingest`; 0 skips it) and ``ingest_ticks`` its frames per
    round; ``peak_schedule`` the rates of the ingest-only phase (no subscriber, no consumer: the peak
    ingest; empty skips it); ``subscribers`` the co-located no-op
    subscribers on the ingestor's hot path (the targets name 16).  ``progress(label, fraction)`` is
    called a few times a second.  Raises :class:`ConfigError` (bad argument, a port in use, an out_dir
    that cannot be written, a child that cannot start) or :class:`TransientError` (Redis unreachable)
    with one line.
    """
    redis_url = validate_redis_url(redis_url)
    rates = list(schedule) if schedule is not None else list(QUICK_SCHEDULE if quick else FULL_SCHEDULE)
    if not rates or any(not (math.isfinite(r) and r > 0) for r in rates):
        raise ConfigError(f"schedule must be a non-empty list of positive rates, got {rates!r}")
    window_s = step_s if step_s is not None else (8.0 if quick else 15.0)
    if not (math.isfinite(window_s) and window_s >= 1.0):
        raise ConfigError(f"step_s must be at least 1 second, got {window_s!r}")
    warmup_s = (2.0 if quick else 3.0) if step_s is None else min(3.0, max(1.0, window_s / 3))
    w_ticks = writer_ticks if writer_ticks is not None else (100_000 if quick else 500_000)
    h_s = hotpath_duration if hotpath_duration is not None else (10.0 if quick else 20.0)
    i_rounds = ingest_rounds if ingest_rounds is not None else (3 if quick else 5)
    peaks = list(peak_schedule) if peak_schedule is not None else list(QUICK_PEAK_SCHEDULE if quick
                                                                       else FULL_PEAK_SCHEDULE)
    if any(not (math.isfinite(r) and r > 0) for r in peaks):
        raise ConfigError(f"peak_schedule must be a list of positive rates, got {peaks!r}")
    i_ticks = ingest_ticks if ingest_ticks is not None else (150_000 if quick else 300_000)
    if w_ticks < 0 or h_s < 0 or i_rounds < 0:
        raise ConfigError("writer_ticks, hotpath_duration and ingest_rounds must be >= 0")
    if not 0 <= subscribers <= 1000:
        raise ConfigError(f"subscribers must be between 0 and 1000, got {subscribers}")
    for port in (sim_port, metrics_port):
        if port is not None:
            check_port_free(port)
    _check_out_dir(out_dir)
    info = await _redis_info(redis_url)

    bench = Harness(redis_url=redis_url, seed=seed, schedule=rates, warmup_s=warmup_s, window_s=window_s,
                    writer_ticks=w_ticks, hotpath_s=h_s, drain_s=15.0 if quick else 30.0, progress=progress,
                    sim_port=sim_port, metrics_port=metrics_port, subscribers=subscribers,
                    ingest_s=(1 + 3 * i_rounds) * i_ticks / 120_000 + (5.0 if i_rounds else 0.0),
                    peak_schedule=peaks)
    parts = urlsplit(redis_url)
    if parts.scheme in ("redis", "rediss") and parts.hostname in ("127.0.0.1", "localhost", "::1"):
        bench.redis_pid = listener_pid(parts.port or 6379)
    if bench.redis_pid is None:
        bench.notes.append("the Redis server's process was not found by its port: its CPU is not measured")
    started, began = _now(), time.monotonic()
    host = machine()
    # A bound on the whole run: it never hangs, whatever a child or Redis does.
    budget = 3 * bench.planned_s + 180.0
    workdir = Path(tempfile.mkdtemp(prefix="market-bench-"))
    try:
        async with asyncio.timeout(budget):
            steps, tally, memory, peak = await pipeline(bench, workdir)
            writer: dict[str, Any] | None = None
            if w_ticks > 0:
                bench.tick("writer vs naive baseline")
                writer = await run_writer_bench(redis_url, ticks=w_ticks, streams=min(100, w_ticks))
            instrumentation: dict[str, Any] | None = None
            if i_rounds > 0:
                bench.tick("instrumentation cost: ingest path, timing off / sampled / every tick")
                instrumentation = await run_ingest_bench(redis_url, ticks=i_ticks, rounds=i_rounds,
                                                         subscribers=SUBSCRIBERS, seed=seed)
            bench.tick("writer flush by streams touched")
            flush = await measure_flush(redis_url)
            bench.tick("limits: PING, XADD, XREADGROUP, a blocked read woken, the SDK consumer")
            limits = await measure_limits(redis_url)
            hot: dict[str, Any] | None = None
            if h_s > 0:
                bench.tick("hot path 50000/s, 16 subscribers")
                hot = await run_hotpath_bench(rate=REFERENCE_RATE, subscribers=SUBSCRIBERS, slow_subscribers=1,
                                              duration=h_s)
    except TimeoutError:
        raise MarketError(f"the bench did not finish within its {budget:.0f} s bound") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    versions = {
        "python": platform.python_version(), "redis-server": info.get("redis_version"),
        "websockets": version("websockets"), "redis-py": version("redis"), "orjson": version("orjson"),
        "hiredis": version("hiredis"), "typer": version("typer"), "prometheus-client": version("prometheus-client"),
        "matplotlib": version("matplotlib"), "market": version("market"), "uvloop": version("uvloop"),
    }
    report: dict[str, Any] = {
        "schema": 1,
        "mode": "quick" if quick and schedule is None else ("full" if schedule is None else "custom"),
        "command": _command(quick, out_dir, seed, schedule, step_s),
        "seed": seed,
        "started": started,
        "ended": _now(),
        "duration_s": round(time.monotonic() - began, 1),
        "machine": host,
        "versions": versions,
        "git": git_state(),
        "configuration": {
            "symbols": list(SYMBOLS), "channels": list(CHANNELS), "subscribers": subscribers,
            "subscriber": PROBE, "schedule": rates, "warmup_s": warmup_s, "window_s": window_s,
            "sample_s": SAMPLE_S, "queue_policy": "block", "queue_capacity": 100_000,
            "retention_maxlen": RETENTION_MAXLEN, "redis_url": redact_url(redis_url), "redis_pid": bench.redis_pid,
            "prefix": bench.prefix, "peak_prefix": bench.peak_prefix, "simulator_id_base": 0,
            "consumer_count": CONSUMER_COUNT,
            # the loop of this process (the SDK consumer) and the one MARKET_LOOP gives the children
            "event_loop": {"bench": loop_name(), "children": choose_loop()},
            "writer_ticks": w_ticks, "hotpath_duration_s": h_s, "ingest_ticks": i_ticks, "ingest_rounds": i_rounds,
            "peak_schedule": peaks, "latency_sample": DEFAULT_SAMPLE_EVERY, "hotpath_sample_chunks": HOT_SAMPLE_EVERY,
            "targets": {k: v[0] for k, v in TARGETS.items()},
        },
        "steps": steps,
        "tallies": tally,
        "memory": memory,
        "writer_baseline": writer,
        "hotpath_standalone": hot,
        "writer_flush": flush,
        "limits": limits,
        "instrumentation": instrumentation,
        "peak_ingest": peak,
        "summary": summarize(steps, writer, hot, int(host.get("cores") or 1), instrumentation, peak),
        "notes": bench.notes,
    }
    write_report(report, out_dir)
    if progress is not None:
        progress("done", 1.0)
    return report
