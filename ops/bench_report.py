"""``market bench``: the whole path under a stepped load, measured stage by stage, and its report.

What runs, all on this machine:

- the venue simulator, a child process (``market simulate --id-base 0 --seed N``, 20 symbols);
- one ingestor, a child process (``market ingest``: trade, agg_trade, book_ticker on every symbol, with
  16 co-located ``ops.bench_probe:noop`` subscribers on its hot path), writing under a unique key prefix;
- in this process, an SDK :class:`~consumer_sdk.consumer.Consumer` reading every stream through a
  consumer group and measuring the Redis path end to end: ``now - tick["ts_recv"]`` (frame received by
  the ingestor -> consumer callback; one wall clock, one machine).

Then the peak ingest, on its own: the ingestor is restarted without subscribers, the consumer stops,
and the rate is stepped up (``peak_schedule``) until a step saturates: simulator -> WebSocket ->
normalize -> Redis and nothing else.  And the cost of the latency instrumentation
(:mod:`ops.bench_ingest`: the ingest path at full speed, timing off / sampled / every tick).

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
the naive per-tick ``XADD`` pipeline (:func:`ops.bench_writer.run_writer_bench`) and the hot path at
50k ticks/s with 16 subscribers (:func:`ops.bench_hotpath.run_hotpath_bench`).

Every wait is bounded, every child is stopped and every key deleted in ``finally`` blocks; a rate the
machine cannot sustain is reported as saturation, and the sweep stops early only when a backlog does
not drain in time or the venue connection was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final, TextIO
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis

from consumer_sdk.consumer import Consumer
from consumer_sdk.core.errors import ConfigError, MarketError, TransientError
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY, LatencyHistogram, bucket_bounds
from consumer_sdk.core.tick import Tick
from consumer_sdk.core.urls import redact_url, validate_redis_url
from distributor.hotpath import HOT_SAMPLE_EVERY

__all__ = [
    "CHANNELS",
    "FULL_PEAK_SCHEDULE",
    "FULL_SCHEDULE",
    "QUICK_PEAK_SCHEDULE",
    "QUICK_SCHEDULE",
    "SUBSCRIBERS",
    "SYMBOLS",
    "TARGETS",
    "Scrape",
    "capacity",
    "cpu_seconds",
    "find_peak",
    "growing",
    "http_get",
    "listener_pid",
    "machine_busy_seconds",
    "measure_flush",
    "memory_kib",
    "parse_metrics",
    "progress_bar",
    "queue_slope",
    "render_markdown",
    "run_bench",
    "stage_stats",
    "summarize",
    "tolerance",
    "window_hist",
    "write_report",
]

SYMBOLS: Final = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT", "DOTUSDT", "LINKUSDT",
    "LTCUSDT", "TRXUSDT", "ATOMUSDT", "UNIUSDT", "ETCUSDT", "XLMUSDT", "NEARUSDT", "APTUSDT", "FILUSDT", "ARBUSDT",
)
CHANNELS: Final = ("trade", "agg_trade", "book_ticker")
SUBSCRIBERS: Final = 16
QUICK_SCHEDULE: Final = (1_000.0, 10_000.0, 50_000.0, 100_000.0)
FULL_SCHEDULE: Final = (1_000.0, 10_000.0, 20_000.0, 30_000.0, 50_000.0, 100_000.0, 150_000.0, 200_000.0)
QUICK_PEAK_SCHEDULE: Final = (60_000.0, 100_000.0)
FULL_PEAK_SCHEDULE: Final = (60_000.0, 80_000.0, 100_000.0, 120_000.0, 150_000.0)
REFERENCE_RATE: Final = 50_000.0  # the rate the latency targets name

#: target name -> (bound, unit); latency targets at REFERENCE_RATE with SUBSCRIBERS co-located subscribers
TARGETS: Final[dict[str, tuple[float, str]]] = {
    "hotpath_p99_us": (500.0, "µs"),
    "redis_e2e_p99_us": (2_000.0, "µs"),
    "no_queue_growth": (1.0, ""),
    "peak_ingest_per_s": (100_000.0, "ticks/s"),
    "instrumentation_cost_pct": (5.0, "%"),
}

SAMPLE_S: Final = 0.5  # queue sampling period during a window
#: the simulator sends what is due every this many seconds (its default); 1 ms was measured too: lower
#: latency at 10k ticks/s, but at 50k the ingestor's per-read costs outweigh it on this machine
SIM_BATCH_S: Final = 0.005
REPAIR_WAIT_S: Final = 75.0  # the ingestor's gap repair deadline (60 s) and some
PRIME_RATE: Final = 500.0  # ticks/s until every stream exists and the consumer reads it
RETENTION_MAXLEN: Final = 20_000  # per stream: bounds what the bench leaves in a shared Redis at any time
CONSUMER_COUNT: Final = 2_000  # entries per stream per XREADGROUP
UNDER_DELIVERY: Final = 0.95  # the simulator generating less than this share of the offered rate is starved
GROWTH_SHARE: Final = 0.02  # a queue growing by more than this share of the offered rate is piling up
START_TIMEOUT_S: Final = 30.0
HTTP_TIMEOUT_S: Final = 5.0
STOP_TIMEOUT_S: Final = 10.0
SATURATED_CORE: Final = 0.75  # a single-threaded process (or the machine) this busy has no headroom left

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_BOUNDS: Final = bucket_bounds()
_ROOT: Final = Path(__file__).resolve().parents[1]

Progress = Callable[[str, float], None]


# ---------------------------------------------------------------------------------------------- pure parts
_LINE: Final = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL: Final = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class Scrape:
    """One read of a Prometheus text page: samples by (name, labels) and histograms by metric name."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]
    hists: dict[str, LatencyHistogram]

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.values.items() if n == name and want <= lab)

    def hist(self, name: str) -> LatencyHistogram:
        return self.hists.get(name) or LatencyHistogram()


def parse_metrics(text: str) -> Scrape:
    """Prometheus text exposition -> :class:`Scrape`; histograms in :class:`LatencyHistogram`'s layout
    are rebuilt from their cumulative buckets (label sets of one histogram are merged)."""
    values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    buckets: dict[tuple[str, frozenset[tuple[str, str]]], list[tuple[float, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, raw_labels, raw_value = m.groups()
        try:
            value = float(raw_value)
        except ValueError:
            continue
        labels = dict(_LABEL.findall(raw_labels or ""))
        if name.endswith("_bucket") and "le" in labels:
            le = labels.pop("le")
            key = (name.removesuffix("_bucket"), frozenset(labels.items()))
            buckets.setdefault(key, []).append((float(le), value))
            continue
        values[(name, frozenset(labels.items()))] = value
    hists: dict[str, LatencyHistogram] = {}
    for (base, label_set), pairs in buckets.items():
        pairs.sort()
        if len(pairs) != len(_BOUNDS) or any(a != b for (a, _), b in zip(pairs, _BOUNDS, strict=True)):
            continue  # not in our histogram layout
        h = LatencyHistogram.from_buckets([int(c) for _, c in pairs], values.get((f"{base}_sum", label_set), 0.0))
        h.max_us = _top_bound(h)  # the text carries no max: the upper bound of the highest bucket used
        if base in hists:
            hists[base].merge(h)
        else:
            hists[base] = h
    return Scrape(values, hists)


def _top_bound(h: LatencyHistogram) -> int:
    """The upper bound of the highest non-empty bucket (the last finite one for the overflow bucket)."""
    top = next((i for i in range(len(h.counts) - 1, -1, -1) if h.counts[i] > 0), None)
    if top is None:
        return 0
    bound = _BOUNDS[top]
    return int(bound if math.isfinite(bound) else _BOUNDS[-2])


def window_hist(later: LatencyHistogram, earlier: LatencyHistogram) -> LatencyHistogram:
    """What ``later`` observed after ``earlier``; its max is the upper bound of its highest bucket."""
    h = later.since(earlier)
    h.max_us = _top_bound(h)
    return h


def stage_stats(h: LatencyHistogram) -> dict[str, float]:
    """count, mean, p50, p95, p99, p99.9 and max of a histogram, in µs."""
    n = h.count
    return {
        "count": n,
        "mean_us": round(h.sum_us / n, 1) if n else 0.0,
        "p50_us": h.percentile(0.50),
        "p95_us": h.percentile(0.95),
        "p99_us": h.percentile(0.99),
        "p999_us": h.percentile(0.999),
        "max_us": float(h.max_us),
    }


def queue_slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope (per second) of (seconds, length) points; 0 with fewer than three."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mx) * (v - my) for t, v in points) / var


def growing(points: Sequence[tuple[float, float]], rate: float) -> bool:
    """A queue is growing when its trend adds more than :data:`GROWTH_SHARE` of the offered rate a
    second and it ends longer than that share of one second's ticks (a batch in flight is no growth)."""
    if not points:
        return False
    floor = max(GROWTH_SHARE * rate, 100.0)
    return queue_slope(points) > floor and points[-1][1] > floor


def tolerance(rate: float) -> int:
    """How far counts read at a window's edge may disagree (ticks in flight, scrapes not atomic): 0.1 s of ticks."""
    return max(100, int(0.1 * rate))


def find_peak(steps: Sequence[dict[str, Any]], target_us: float) -> dict[str, Any] | None:
    """The highest step that ran, is not saturated, and kept the Redis path's p99 within ``target_us``."""
    best: dict[str, Any] | None = None
    for step in steps:
        if step.get("status") == "not run":
            continue
        e2e = step["latency"]["redis_e2e"]
        if step["saturated"] or not e2e["count"] or e2e["p99_us"] > target_us:
            continue
        if best is None or step["rate"] > best["rate"]:
            best = step
    return best


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 10_000:
        return f"{v / 1000:.0f} ms"
    if v >= 1000:
        return f"{v / 1000:.1f} ms"
    return f"{v:.0f} µs"


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def _status(met: bool | None) -> str:
    return "N/A" if met is None else ("MET" if met else "MISSED")


def _cpu_line(cpu: dict[str, float | None], cores: int) -> str:
    parts = [f"{name} {100 * v:.0f}%" for name, v in cpu.items() if v is not None and name != "machine"]
    machine = cpu.get("machine")
    if machine is not None:
        parts.append(f"whole machine {100 * machine:.0f}% of {100 * cores}%")
    return ", ".join(parts)


def _saturated_processes(cpu: dict[str, float | None], cores: int) -> list[str]:
    out = []
    for name in ("simulator", "ingestor", "redis-server", "bench"):
        v = cpu.get(name)
        if v is not None and v >= SATURATED_CORE:
            out.append(f"{name} at {100 * v:.0f}% of one core (its work runs on one thread: near its ceiling)")
    machine = cpu.get("machine")
    if machine is not None and machine >= SATURATED_CORE * cores:
        out.append(f"the machine at {100 * machine:.0f}% of {100 * cores}%: every process also waits for a CPU")
    return out


def _where_time_goes(step: dict[str, Any], cores: int, subscribers: int) -> list[str]:
    """Sentences that explain a step: stage by stage, then who used the CPU."""
    lat = step["latency"]
    lines = [
        f"At {_fmt_rate(step['rate'])}/s offered: ingest (frame -> ingress) p50 {_fmt_us(lat['ingest']['p50_us'])} / "
        f"p99 {_fmt_us(lat['ingest']['p99_us'])}; frame -> Redis acknowledged p50 {_fmt_us(lat['redis']['p50_us'])} / "
        f"p99 {_fmt_us(lat['redis']['p99_us'])}; frame -> SDK consumer callback p50 "
        f"{_fmt_us(lat['redis_e2e']['p50_us'])} / p99 {_fmt_us(lat['redis_e2e']['p99_us'])}; hot path (publish -> "
        f"callback, {subscribers} subscribers) p50 {_fmt_us(lat['hotpath']['p50_us'])} / "
        f"p99 {_fmt_us(lat['hotpath']['p99_us'])}.",
        f"CPU in the window (share of one core): {_cpu_line(step['cpu'], cores)}.",
    ]
    wr = step.get("writer") or {}
    if wr.get("ticks_per_flush"):
        inside = ""
        if wr.get("redis_us_per_call"):
            inside = (f" Inside Redis one script call took {_fmt_us(wr['redis_us_per_call'])} on average "
                      f"({wr['redis_us_per_call'] / wr['ticks_per_flush']:.1f} µs a tick: the XADD, the duplicate "
                      "check and the record parsing in Lua), Redis busy with them "
                      f"{100 * wr['redis_busy_share']:.0f}% of the window.")
        lines.append(
            f"The writer made {wr['flushes_per_s']:.0f} round trips to Redis a second, {wr['ticks_per_flush']:.0f} "
            "ticks each on average; one is in flight at a time (Redis runs a connection's commands in order, and "
            "a second connection could store newer ticks first), so a tick waits for the round trip in progress, "
            f"then for its own.{inside} Before that, a tick waits for the rest of its socket read to be parsed and "
            "for the hot path's subscribers woken by the same batch: the simulator sends every 5 ms, so each "
            "burst goes through the ingestor's one event loop as a whole."
        )
    hot = _saturated_processes(step["cpu"], cores)
    if hot:
        lines.append("Out of CPU: " + "; ".join(hot) + ".")
    else:
        lines.append("No process was near a full core and the machine had CPU to spare: the time goes to waiting "
                     "(the venue's 5 ms send batches, the writer's round trip to Redis, the consumer's read cycle, "
                     "tasks queued behind each other on the ingestor's one event loop), not to computing.")
    if step["saturation"]:
        lines.append("Saturation signs: " + "; ".join(step["saturation"]) + ".")
    others = step["cpu"].get("others")
    if others is not None and others >= 0.25:
        lines.append(
            f"Other work on this shared machine used {100 * others:.0f}% of a core during the window."
        )
    return lines


def capacity(steps: Sequence[dict[str, Any]], cores: int) -> dict[str, Any] | None:
    """From the highest step that is not saturated: CPU per 1000 ticks/s of each process, the rate at which
    each (one thread each) would fill a core, and the rate at which all of them together would fill the
    machine.  A linear projection: batching makes the cost per tick fall with the rate, so it is a floor."""
    clean = [s for s in steps if s.get("status") != "not run" and not s["saturated"] and s["rate"] >= 5000]
    if not clean:
        return None
    step = max(clean, key=lambda s: s["rate"])
    rate = step["throughput"]["published_per_s"] or step["rate"]
    per_k: dict[str, float] = {}
    for name in ("simulator", "ingestor", "redis-server", "bench"):
        v = step["cpu"].get(name)
        if v is not None and v > 0:
            per_k[name] = round(1000 * v / rate, 4)
    if not per_k:
        return None
    total = sum(per_k.values())
    return {
        "from_rate": step["rate"],
        "cores_per_1k_per_s": per_k,
        "one_core_at_per_s": {k: round(1000 / v) for k, v in per_k.items()},
        "machine_full_at_per_s": round(1000 * cores / total),
    }


def summarize(steps: Sequence[dict[str, Any]], writer: dict[str, Any] | None,
              hot: dict[str, Any] | None, cores: int = 1,
              instrumentation: dict[str, Any] | None = None,
              peak_ingest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The headline figures and the verdict on each target."""
    ran = [s for s in steps if s.get("status") != "not run"]
    ref = next((s for s in ran if s["rate"] == REFERENCE_RATE), None)
    if ref is None:
        below = [s for s in ran if s["rate"] <= REFERENCE_RATE]
        ref = max(below, key=lambda s: s["rate"]) if below else (ran[0] if ran else None)
    at_ref = ref is not None and ref["rate"] == REFERENCE_RATE
    peak = find_peak(steps, TARGETS["redis_e2e_p99_us"][0])
    hot_p99 = ref["latency"]["hotpath"]["p99_us"] if ref else None
    e2e_p99 = ref["latency"]["redis_e2e"]["p99_us"] if ref else None
    peak_per_s = peak["throughput"]["published_per_s"] if peak else 0.0
    peak_target = TARGETS["peak_ingest_per_s"][0]
    peak_met = peak_per_s >= peak_target
    if peak_ingest is not None:  # measured on its own: no subscriber, no consumer on the machine
        peak_per_s = peak_ingest["peak_ingest_per_s"]
        # A step that did not saturate took in what was offered (within the window's counting edges).
        peak_met = (peak_ingest["peak_rate"] or 0.0) >= peak_target
    best_sustained = max((s for s in ran if not s["saturated"]), key=lambda s: s["rate"], default=None)
    summary: dict[str, Any] = {
        "reference_rate": ref["rate"] if ref else None,
        "hotpath_p99_us": hot_p99,
        "hotpath_standalone_p99_us": hot.get("p99_us") if hot else None,
        "hotpath_standalone_all_subscribers_p99_us": hot.get("all_subscribers_p99_us") if hot else None,
        "redis_e2e_p99_us": e2e_p99,
        "redis_e2e_p50_us": ref["latency"]["redis_e2e"]["p50_us"] if ref else None,
        "peak_rate": peak["rate"] if peak else None,
        "peak_ingest_rate": peak_ingest["peak_rate"] if peak_ingest else None,
        "peak_ingest_limit": peak_ingest["limit"] if peak_ingest else None,
        "peak_ingest_per_s": round(peak_per_s, 1),
        "max_sustained_rate": best_sustained["rate"] if best_sustained else None,
        "sustained_ingest_per_s": round(best_sustained["throughput"]["published_per_s"], 1) if best_sustained else 0.0,
        "max_published_per_s": round(max((s["throughput"]["published_per_s"] for s in ran), default=0.0), 1),
        "baseline_ratio": writer.get("ratio") if writer else None,
        "writer_ticks_per_s": writer.get("ticks_per_s") if writer else None,
        "baseline_writer_ticks_per_s": writer.get("baseline_ticks_per_s") if writer else None,
        "saturated_steps": [s["rate"] for s in ran if s["saturated"]],
        "instrumentation_cost_pct": instrumentation["summary"]["cost_pct"] if instrumentation else None,
        "instrumentation_cpu_cost_pct": instrumentation["summary"]["cpu_cost_pct"] if instrumentation else None,
        "ingest_path_ticks_per_s": instrumentation["summary"]["sampled_ticks_per_s"] if instrumentation else None,
    }
    no_growth = (not ref["saturated"]) if ref else None
    summary["capacity"] = capacity(steps, cores)
    summary["targets"] = {
        "hotpath_p99_us": {
            "target": f"<= {TARGETS['hotpath_p99_us'][0]:.0f} µs at 50k ticks/s, {SUBSCRIBERS} subscribers",
            "value": hot_p99, "met": (hot_p99 is not None and hot_p99 <= TARGETS["hotpath_p99_us"][0])
            if at_ref else None,
        },
        "redis_e2e_p99_us": {
            "target": f"<= {TARGETS['redis_e2e_p99_us'][0]:.0f} µs at 50k ticks/s",
            "value": e2e_p99, "met": (e2e_p99 is not None and e2e_p99 <= TARGETS["redis_e2e_p99_us"][0])
            if at_ref else None,
        },
        "no_queue_growth": {
            "target": "no queue growth and no drops at 50k ticks/s",
            "value": "none" if no_growth else ("; ".join(ref["saturation"]) if ref else None),
            "met": no_growth if at_ref else None,
        },
        "instrumentation_cost_pct": {
            "target": f"<= {TARGETS['instrumentation_cost_pct'][0]:.0f}% of the ingest path's throughput",
            "value": summary["instrumentation_cost_pct"],
            "met": summary["instrumentation_cost_pct"] <= TARGETS["instrumentation_cost_pct"][0]
            if instrumentation else None,
        },
        "peak_ingest_per_s": {
            "target": f">= {TARGETS['peak_ingest_per_s'][0]:.0f} ticks/s through one ingestor",
            "value": round(peak_per_s, 1),
            "met": peak_met if ran else None,
        },
    }
    return summary


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    m, cfg, summary = report["machine"], report["configuration"], report["summary"]
    steps = report["steps"]
    ran = [s for s in steps if s.get("status") != "not run"]
    cores = int(m.get("cores") or 1)
    out: list[str] = []
    w = out.append
    w(f"# Load test: simulator -> ingestor -> Redis Streams -> consumer ({report['mode']})")
    w("")
    w(f"Run {report['started']} to {report['ended']} ({report['duration_s']:.0f} s), seed {report['seed']}, "
      f"commit `{(report['git'].get('commit') or 'unknown')[:12]}`"
      f"{' (with uncommitted changes)' if report['git'].get('dirty') else ''}.")
    w("")
    w("## Reproduce")
    w("")
    w("```sh")
    w(report["command"])
    w("```")
    w("")
    w("## Machine")
    w("")
    w(f"- CPU: {m.get('cpu_model')}, {m.get('cores')} cores ({m.get('cpus_usable')} usable by this process); "
      f"memory {m.get('memory_gib')} GiB; Linux {m.get('kernel')}")
    w(f"- Load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}.")
    w("- This machine is shared: other test suites and benchmarks ran on its cores during this run. The `others` "
      "column in the CPU table is what they used during each window. Figures are what this load test got on a "
      "busy 2-core machine, not what a dedicated one would reach.")
    v = report["versions"]
    w("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".")
    w("")
    w("## Configuration")
    w("")
    where = (f"found by port: pid {cfg['redis_pid']}" if cfg.get("redis_pid")
             else "not found by port, its CPU is not measured")
    w(f"- {len(cfg['symbols'])} symbols x {len(cfg['channels'])} channels ({', '.join(cfg['channels'])}) = "
      f"{len(cfg['symbols']) * len(cfg['channels'])} streams; one simulator process, one ingestor process "
      f"({cfg['subscribers']} co-located `{cfg['subscriber']}` subscribers), one SDK consumer (a consumer group "
      "over every stream) in the bench process; Redis at "
      f"`{cfg['redis_url']}` ({where}).")
    w(f"- Rates offered: {', '.join(_fmt_rate(r) for r in cfg['schedule'])} ticks/s; each step: "
      f"{cfg['warmup_s']:.0f} s warm-up, {cfg['window_s']:.0f} s measured, then rate 0 until drained. "
      f"Queues sampled every {cfg['sample_s']} s.")
    w(f"- Ingress queue `{cfg['queue_policy']}`, capacity {cfg['queue_capacity']}; streams capped at "
      f"`MAXLEN ~ {cfg['retention_maxlen']}` (kept small so the bench leaves a shared Redis little to hold).")
    w("")
    w("## Summary against the targets")
    w("")
    w("| target | measured | verdict |")
    w("| --- | --- | --- |")
    t = summary["targets"]
    w(f"| hot path p99 {t['hotpath_p99_us']['target']} | {_fmt_us(t['hotpath_p99_us']['value'])} in the pipeline "
      f"(standalone hot-path bench: {_fmt_us(summary.get('hotpath_standalone_p99_us'))}) | "
      f"**{_status(t['hotpath_p99_us']['met'])}** |")
    w(f"| Redis path e2e p99 {t['redis_e2e_p99_us']['target']} | {_fmt_us(t['redis_e2e_p99_us']['value'])} | "
      f"**{_status(t['redis_e2e_p99_us']['met'])}** |")
    w(f"| {t['no_queue_growth']['target']} | {t['no_queue_growth']['value']} | "
      f"**{_status(t['no_queue_growth']['met'])}** |")
    peak_rate = summary.get("peak_rate")
    pi = report.get("peak_ingest")
    how = ""
    if pi:
        how = ("ingest-only phase, no subscriber and no consumer: the highest step that did not saturate, "
               f"{_fmt_rate(pi['peak_rate'])}/s offered" if pi.get("peak_rate")
               else "ingest-only phase: every step saturated")
        if pi.get("limit_rate"):
            how += f"; at {_fmt_rate(pi['limit_rate'])}/s: {'; '.join(pi['limit'])}"
        elif pi.get("peak_rate"):
            how += "; no higher step was offered"
        how += ". In the full pipeline: "
    w(f"| peak ingest {t['peak_ingest_per_s']['target']} | {_fmt_rate(t['peak_ingest_per_s']['value'])}/s "
      f"({how}highest step with no saturation and the e2e p99 within 2 ms: "
      f"{_fmt_rate(peak_rate) + '/s offered' if peak_rate else 'none'}; highest step with no saturation, whatever "
      f"the latency: {_fmt_rate(summary['sustained_ingest_per_s'])}/s published; most published in any step: "
      f"{_fmt_rate(summary['max_published_per_s'])}/s) | **{_status(t['peak_ingest_per_s']['met'])}** |")
    ic = t.get("instrumentation_cost_pct")
    if ic is not None:
        value = "-" if ic["value"] is None else f"{ic['value']:.1f}%"
        w(f"| latency instrumentation {ic['target']} | {value} (see below) | **{_status(ic['met'])}** |")
    w(f"| writer vs naive per-tick XADD | {summary.get('baseline_ratio')}x "
      f"({summary.get('writer_ticks_per_s')} vs {summary.get('baseline_writer_ticks_per_s')} ticks/s) | - |")
    w("")
    if summary.get("reference_rate") != REFERENCE_RATE:
        w(f"The schedule has no {REFERENCE_RATE:.0f}/s step: latency figures are from the "
          f"{_fmt_rate(summary.get('reference_rate'))}/s step and the latency targets are not judged.")
        w("")
    w("## Where the time goes")
    w("")
    ref = next((s for s in ran if s["rate"] == summary.get("reference_rate")), None)
    missed = [k for k, val in t.items() if val["met"] is False]
    if ref is not None:
        for line in _where_time_goes(ref, cores, cfg["subscribers"]):
            w(f"- {line}")
    first_bad = next((s for s in ran if s["saturated"]), None)
    if first_bad is not None and first_bad is not ref:
        w("")
        w(f"First saturated step, {_fmt_rate(first_bad['rate'])}/s:")
        w("")
        for line in _where_time_goes(first_bad, cores, cfg["subscribers"]):
            w(f"- {line}")
    cap = summary.get("capacity")
    if cap:
        w("")
        w(f"Cost per 1000 ticks/s, from the {_fmt_rate(cap['from_rate'])}/s step (share of one core): " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in cap["cores_per_1k_per_s"].items()) + ". Projected linearly, each "
          "process alone would fill its core at: " + ", ".join(
            f"{k} {_fmt_rate(v)}/s" for k, v in cap["one_core_at_per_s"].items())
          + f"; all of them together would fill the {cores} cores of this machine at "
          f"{_fmt_rate(cap['machine_full_at_per_s'])}/s, before anything else running on it. (Batching makes the cost "
          "per tick fall as the rate rises, so these are floors, not ceilings.)")
    fl = report.get("writer_flush")
    if fl:
        w("")
        w("The Redis stage, measured alone after the run: one writer flush (one round trip, one append-script "
          "call for every stream it touches, each stream read once for its newest ID) takes " + ", ".join(
              f"{_fmt_us(v)} for {k} stream{'s' if k != '1' else ''}" for k, v in fl["flush_p50_us"].items())
          + f" (p50; a bare PING: {_fmt_us(fl['ping_p50_us'])}). A tick waits for the flush in progress, then for "
          f"its own, and with {len(cfg['symbols']) * len(cfg['channels'])} streams busy a flush touches most of "
          "them: that is the floor of frame -> Redis acknowledged, before any CPU contention.")
    if not missed:
        w("")
        w("Every target judged was met.")
    w("")
    w("## Steps")
    w("")
    w("Throughput (per second over the window) and queues:")
    w("")
    w("| offered | generated | sent | received | published | consumed | ingress max | socket backlog "
      "(end) | consumer lag (end) | drops | reconnects | verdict |")
    w("| " + " | ".join(["---"] * 12) + " |")
    for s in steps:
        if s.get("status") == "not run":
            w(f"| {_fmt_rate(s['rate'])} | not run: {s.get('reason', '')} |" + " |" * 10)
            continue
        th, q = s["throughput"], s["queue"]
        verdict = "saturated" if s["saturated"] else "ok"
        if not s["saturated"] and s["latency"]["redis_e2e"]["p99_us"] > TARGETS["redis_e2e_p99_us"][0]:
            verdict = "ok, over the e2e target"
        w(f"| {_fmt_rate(s['rate'])} | {_fmt_rate(th['generated_per_s'])} | {_fmt_rate(th['sent_per_s'])} | "
          f"{_fmt_rate(th['received_per_s'])} | {_fmt_rate(th['published_per_s'])} | "
          f"{_fmt_rate(th['consumed_per_s'])} | {q['ingress_max']:.0f} | {q['backlog_end']:.0f} | "
          f"{q['consumer_lag_end']:.0f} | {s['drops']['ingress'] + s['drops']['hotpath']:.0f} | "
          f"{s['reconnects']:.0f} | {verdict} |")
    w("")
    w("Latency per stage, p50 / p95 / p99 / p99.9 / max:")
    w("")
    w("| offered | ingest (frame -> ingress) | hot path (publish -> callback) | Redis (frame -> ack) | "
      "Redis path e2e (frame -> consumer) |")
    w("| --- | --- | --- | --- | --- |")
    for s in ran:
        cells = []
        for stage in ("ingest", "hotpath", "redis", "redis_e2e"):
            st = s["latency"][stage]
            cells.append(" / ".join(_fmt_us(st[k]) for k in ("p50_us", "p95_us", "p99_us", "p999_us", "max_us")))
        w(f"| {_fmt_rate(s['rate'])} | " + " | ".join(cells) + " |")
    w("")
    w("CPU (share of one core over the window; `others` is the rest of the machine) and peak memory:")
    w("")
    w("| offered | simulator | ingestor | redis-server | bench (consumer) | others | machine |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for s in ran:
        c = s["cpu"]
        cells = [f"{100 * c[k]:.0f}%" if c.get(k) is not None else "-"
                 for k in ("simulator", "ingestor", "redis-server", "bench", "others", "machine")]
        w(f"| {_fmt_rate(s['rate'])} | " + " | ".join(cells) + " |")
    w("")
    rss = report.get("memory", {})
    if rss:
        w("Peak resident memory (VmHWM): " + ", ".join(
            f"{k} {val / 1024:.0f} MiB" for k, val in rss.items() if isinstance(val, int | float)) + ".")
        w("")
    w("## Tallies")
    w("")
    w("Per window (counts read at the window's edges; they may disagree by what is in flight, up to 0.1 s of "
      "ticks; the consumer can even be a batch ahead of `published`, reading entries before the writer has "
      "counted their acknowledgement):")
    w("")
    w("| offered | sent by simulator | received by ingestor | in flight (end) | accepted | published | dropped | "
      "queue change | unaccounted | consumed | adds up |")
    w("| " + " | ".join(["---"] * 11) + " |")
    for s in ran:
        tl = s["tallies"]
        w(f"| {_fmt_rate(s['rate'])} | {tl['sent']} | {tl['received']} | {tl['in_flight_end']} | {tl['accepted']} | "
          f"{tl['published']} | {tl['dropped']} | {tl['queued_change']} | {tl['unaccounted']} | {tl['consumed']} | "
          f"{'yes' if tl['adds_up'] else 'no'} |")
    w("")
    f = report["tallies"]
    w(f"Whole run, after the rate was held at 0 and everything drained (drained: {'yes' if f['drained'] else 'no'}):")
    w("")
    w(f"- frames sent by the simulator {f['sent']} = frames received by the ingestor {f['received']}: "
      f"**{'exact' if f['sent_equals_received'] else 'NOT equal'}**")
    w(f"- of which ticks accepted {f['accepted']}; other frames {f['other_frames']} (subscription replies "
      f"{f['replies']}, malformed {f['malformed']}, unsupported {f['unsupported']}, duplicates {f['duplicates']}, "
      f"out of order {f['out_of_order']})")
    w(f"- accepted {f['accepted']} = published {f['published']} + dropped {f['dropped']} + still queued "
      f"{f['queued']}: **{'exact' if f['accepted_equals_outcomes'] else 'NOT equal'}**")
    if not f["accepted_equals_outcomes"] and f["reconnects"]:
        w(f"  - the difference, {f['published_not_accepted']}, follows the {f['reconnects']} reconnect(s) at "
          f"saturation: the ingestor repaired {f['gaps']} gap(s) over REST and published the ticks it fetched (and "
          "gap markers for what it could not), which its venue connections never counted as accepted; the ingestor "
          "exports no "
          "counter of repaired ticks, so this tally cannot close exactly after a reconnect.")
    w(f"- consumed by the SDK consumer {f['consumed']} = published {f['published']}: "
      f"**{'exact' if f['consumed_equals_published'] else 'NOT equal'}** (duplicates {f['consumer_duplicates']}, "
      f"gaps {f['consumer_gaps']}, trimmed {f['consumer_trimmed']})")
    w("")
    if pi:
        w("## Peak ingest: one ingestor, nothing else")
        w("")
        w("After the sweep a new ingestor starts without subscribers, under a key prefix and a spill log of its own "
          "(as a new deployment would), and the consumer is stopped: simulator -> WebSocket -> normalize -> Redis "
          "only, the rate stepped up until a step saturates.")
        w("")
        w("| offered | generated | received | published | ingress max | socket backlog (end) | CPU simulator | "
          "CPU ingestor | CPU redis-server | machine | verdict |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for step in pi["steps"]:
            if step.get("status") == "not run":
                w(f"| {_fmt_rate(step['rate'])} | not run: {step['reason']} | | | | | | | | | |")
                continue
            th, q, c = step["throughput"], step["queue"], step["cpu"]

            def pct(v: float | None) -> str:
                return "-" if v is None else f"{100 * v:.0f}%"

            w(f"| {_fmt_rate(step['rate'])} | {_fmt_rate(th['generated_per_s'])} | {_fmt_rate(th['received_per_s'])} | "
              f"{_fmt_rate(th['published_per_s'])} | {q['ingress_max']:.0f} | {q['backlog_end']} | "
              f"{pct(c.get('simulator'))} | {pct(c.get('ingestor'))} | {pct(c.get('redis-server'))} | "
              f"{pct(c.get('machine'))} | {'; '.join(step['saturation']) or 'ok'} |")
        w("")
    w("## Stand-alone benchmarks (run after the pipeline, alone)")
    w("")
    hp = report.get("hotpath_standalone") or {}
    if hp:
        w(f"- Hot path, {hp.get('rate', 0):.0f} ticks/s, {hp.get('subscribers')} subscribers "
          f"({hp.get('slow_subscribers')} deliberately slow), {hp.get('duration')} s: p50 {_fmt_us(hp.get('p50_us'))}, "
          f"p99 {_fmt_us(hp.get('p99_us'))}, p99.9 {_fmt_us(hp.get('p999_us'))}, max {_fmt_us(hp.get('max_us'))} "
          f"(ingress -> callback, fast subscribers); publish -> callback p99 over all subscribers "
          f"{_fmt_us(hp.get('all_subscribers_p99_us'))}; accounted: {hp.get('accounted')}; one asyncio.Queue per "
          f"subscriber instead: p99 {_fmt_us(hp.get('baseline_p99_us'))}.")
    ins = report.get("instrumentation") or {}
    if ins:
        modes = ins["modes"]
        w(f"- Latency instrumentation, what it costs: the ingestor's path without the socket (frames -> parse -> "
          f"ingress -> {ins['subscribers']} no-op subscribers and Redis), {ins['ticks']} frames over "
          f"{ins['streams']} streams per round, {ins['rounds']} rounds of each mode, alternating (`market bench "
          f"ingest`):")
        w("")
        w("  | mode | per-tick stages timed | ticks/s (median, min-max) | CPU per tick | throughput cost | "
          "CPU cost |")
        w("  | --- | --- | --- | --- | --- | --- |")
        what = {"off": "none", "sampled": f"1 in {modes.get('sampled', {}).get('sample_every')}, hot path 1 chunk "
                f"in {HOT_SAMPLE_EVERY}", "every": "every tick, every chunk"}
        for name, mm in modes.items():
            w(f"  | {name} | {what.get(name, '')} | {mm['ticks_per_s']:.0f} ({mm['ticks_per_s_min']:.0f}-"
              f"{mm['ticks_per_s_max']:.0f}) | {mm['cpu_us_per_tick']:.2f} µs | {mm['throughput_cost_pct']:+.1f}% | "
              f"{mm['cpu_cost_pct']:+.1f}% |")
        w("")
        w("  The default is `sampled`. The socket and the WebSocket framing, left out here, cost the same whatever "
          "is measured, so in a live ingestor the share is smaller still.")
    wr = report.get("writer_baseline") or {}
    if wr:
        w(f"- Redis writer, {wr.get('ticks')} ticks over {wr.get('streams')} streams: {wr.get('ticks_per_s')} ticks/s; "
          f"the naive pipeline of one XADD per tick: {wr.get('baseline_ticks_per_s')} ticks/s; ratio "
          f"**{wr.get('ratio')}x**.")
    w("")
    w("## Plots")
    w("")
    if report.get("plots"):
        for name in report["plots"]:
            w(f"![{name}]({name})")
            w("")
    else:
        w(f"No plots: {report.get('plots_note') or 'none were drawn'}.")
        w("")
    w("## How it is measured")
    w("")
    w("- Latencies come from the ingestor's own histograms (four buckets per power of two: a percentile is the "
      "upper bound of its bucket, within 25% of the truth), read from `/metrics` at both edges of the window and "
      "subtracted; the Redis path e2e is measured in the bench process as `now - ts_recv`, on the same clock.")
    w("- A step is saturated when the simulator generates less than 95% of the offered rate (starved of CPU), "
      "frames pile up between the simulator and the ingestor, the ingress queue grows, anything is dropped, the "
      "connection is lost, or the consumer falls behind. The peak is the highest step that is not saturated and "
      "keeps the Redis path p99 within 2 ms.")
    w("- CPU: utime + stime from `/proc/<pid>/stat` over the window; `machine` from `/proc/stat`. The "
      "Redis server is shared with other users of this machine: its CPU includes their commands.")
    for note in report.get("notes", []):
        w(f"- {note}")
    w("")
    return "\n".join(out)


def _plots(report: dict[str, Any], out_dir: Path) -> tuple[list[str], str]:
    """Draw the PNGs; returns (file names, note).  Without matplotlib, no files and a note saying so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed (pip install 'market[bench]')"
    ran = [s for s in report["steps"] if s.get("status") != "not run"]
    if not ran:
        return [], "no step ran"
    names: list[str] = []
    rates = [s["rate"] for s in ran]
    stages = [("ingest", "ingest: frame -> ingress"), ("hotpath", "hot path: publish -> callback"),
              ("redis", "Redis: frame -> ack"), ("redis_e2e", "Redis path e2e: frame -> consumer")]
    targets = {"hotpath": TARGETS["hotpath_p99_us"][0], "redis_e2e": TARGETS["redis_e2e_p99_us"][0]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (key, title) in zip(axes.flat, stages, strict=True):
        for q, style in (("p50_us", "o-"), ("p95_us", "s-"), ("p99_us", "^-"), ("p999_us", "v--"), ("max_us", "x:")):
            ys = [max(s["latency"][key][q], 1.0) for s in ran]
            ax.plot(rates, ys, style, label=q.removesuffix("_us"))
        if key in targets:
            ax.axhline(targets[key], color="red", linewidth=1, linestyle="--", label="p99 target")
        ax.set_title(title)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("µs")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("offered ticks/s")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Latency per stage against the offered rate")
    fig.tight_layout()
    fig.savefig(out_dir / "latency.png", dpi=100)
    plt.close(fig)
    names.append("latency.png")

    fig, ax = plt.subplots(figsize=(13, 5))
    series = [(1, "ingress queue"), (2, "writer buffer"), (3, "socket backlog (sent - received)"),
              (4, "consumer lag (published - consumed)")]
    for index, label in series:
        xs: list[float] = []
        ys_: list[float] = []
        for s in ran:
            for sample in s["queue"]["samples"]:
                xs.append(sample[0])
                ys_.append(sample[index])
            xs.append(math.nan)
            ys_.append(math.nan)
        ax.plot(xs, ys_, label=label, linewidth=1.2)
    for s in ran:
        samples = s["queue"]["samples"]
        if samples:
            ax.axvspan(samples[0][0], samples[-1][0], alpha=0.08, color="gray")
            ax.text(samples[0][0], 1.01, f"{_fmt_rate(s['rate'])}/s", transform=ax.get_xaxis_transform(),
                    va="bottom", fontsize=8)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("ticks")
    ax.set_title("Queue lengths over time (measurement windows; rate 0 and drain in between)", pad=16)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "queue.png", dpi=100)
    plt.close(fig)
    names.append("queue.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, style in (("generated_per_s", "generated by simulator", "o-"),
                              ("received_per_s", "received by ingestor", "s-"),
                              ("published_per_s", "published to Redis", "^-"),
                              ("consumed_per_s", "consumed over Redis", "v-")):
        ax1.plot(rates, [s["throughput"][key] for s in ran], style, label=label)
    ax1.plot(rates, rates, "k:", label="offered")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("offered ticks/s")
    ax1.set_ylabel("ticks/s")
    ax1.set_title("Throughput")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    procs = ["simulator", "ingestor", "redis-server", "bench", "others"]
    bottom = [0.0] * len(ran)
    xs_idx = list(range(len(ran)))
    for name in procs:
        vals = [100 * (s["cpu"].get(name) or 0.0) for s in ran]
        ax2.bar(xs_idx, vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    cores = int(report["machine"].get("cores") or 1)
    ax2.axhline(100 * cores, color="red", linestyle="--", linewidth=1, label=f"{cores} cores")
    ax2.set_xticks(xs_idx, [_fmt_rate(r) for r in rates])
    ax2.set_xlabel("offered ticks/s")
    ax2.set_ylabel("% of one core")
    ax2.set_title("CPU per process")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput_cpu.png", dpi=100)
    plt.close(fig)
    names.append("throughput_cpu.png")
    return names, ""


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """Write the plots, ``report.json`` and ``report.md`` into ``out_dir`` (the plots' names go in the report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        plots, note = _plots(report, out_dir)
    except Exception as exc:  # a plot must never cost the report
        plots, note = [], f"plotting failed: {type(exc).__name__}: {exc}"
    report["plots"] = plots
    report["plots_note"] = note
    (out_dir / "report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")


def progress_bar(stream: TextIO | None = None, width: int = 30) -> Progress:
    """A one-line progress bar: ``[#####.....] step 3/6 50000/s 12s``; a newline once it reaches 1."""
    out = stream if stream is not None else sys.stderr
    started = time.monotonic()
    done = False

    def show(label: str, fraction: float) -> None:
        nonlocal done
        if done:
            return
        f = min(max(fraction, 0.0), 1.0)
        n = round(f * width)
        line = f"[{'#' * n}{'.' * (width - n)}] {label} {time.monotonic() - started:.0f}s"
        print(f"\r{line:<78}", end="", file=out, flush=True)
        if f >= 1.0:
            print(file=out, flush=True)
            done = True

    return show


# ---------------------------------------------------------------------------------------------- processes
def _read_proc(pid: int, name: str) -> str | None:
    try:
        return Path(f"/proc/{pid}/{name}").read_text()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (None when it is gone or not readable)."""
    text = _read_proc(pid, "stat")
    if text is None:
        return None
    fields = text.rpartition(")")[2].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (IndexError, ValueError):
        return None


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak) and VmRSS of a process in KiB."""
    text = _read_proc(pid, "status") or ""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            with contextlib.suppress(ValueError, IndexError):
                out[key] = int(rest.split()[0])
    return out


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent not idle since boot (all cores)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        values = [int(x) for x in first[1:]]
    except (OSError, IndexError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _CLK_TCK


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on TCP ``port`` (``ss``, else ``/proc/net/tcp`` and the fd tables)."""
    ss = shutil.which("ss")
    if ss:
        try:
            out = subprocess.run([ss, "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, timeout=5,
                                 check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        m = re.search(r"pid=(\d+)", out)
        if m:
            return int(m.group(1))
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rpartition(":")[2], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(proc.name)
    return None


def _free_port() -> int:
    from ops.redis_server import free_port

    return free_port()


def _check_port_free(port: int) -> None:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ConfigError(f"port {port} on 127.0.0.1 is in use: {exc.strerror or exc}") from None


@dataclass
class _Child:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path
    log_file: IO[bytes]

    def last_line(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        errors = [ln for ln in lines if ln.startswith("market: error:")]
        line = errors[-1] if errors else (lines[-1] if lines else "")
        return line.removeprefix("market: error: ")[:300]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        self.log_file.close()


async def _spawn(name: str, args: list[str], env: dict[str, str], workdir: Path) -> _Child:
    log_path = workdir / f"{name}.log"
    log_file = open(log_path, "ab")  # noqa: SIM115, ASYNC230 - closed by _Child.stop; opened once per child
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", *args, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
            stderr=log_file, env=env, cwd=str(_ROOT),
        )
    except BaseException:
        log_file.close()
        raise
    return _Child(name, proc, log_path, log_file)


async def http_get(port: int, path: str, *, limit_s: float = HTTP_TIMEOUT_S) -> bytes:
    """GET ``http://127.0.0.1:port/path`` -> the body of a 200 answer; :class:`TransientError` otherwise."""
    try:
        async with asyncio.timeout(limit_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
                length = headers.get("content-length")
                body = await (reader.readexactly(int(length)) if length else reader.read(-1))
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        raise TransientError(f"GET 127.0.0.1:{port}{path}: {type(exc).__name__}: {exc}") from None
    parts = status_line.split()
    if len(parts) < 2 or parts[1] != "200":
        raise TransientError(f"GET 127.0.0.1:{port}{path}: {status_line}")
    return body


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class _Sink:
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


@dataclass
class _Edge:
    """Everything read at one edge of a window."""

    t: float
    ing: Scrape
    sim: dict[str, Any]
    cpu: dict[str, float | None]
    consumed: int
    #: frames an earlier ingestor process received (its counters went with it; the simulator's did not)
    received_before: int = 0

    @property
    def sent(self) -> int:
        return int(self.sim["stats"]["frames_sent"])

    @property
    def generated(self) -> int:
        return int(self.sim["stats"]["ticks_total"])

    @property
    def received(self) -> int:
        return int(self.ing.total("market_frames_received_total")) + self.received_before

    @property
    def accepted(self) -> int:
        return int(self.ing.total("market_ticks_accepted_total"))

    @property
    def published(self) -> int:
        return int(self.ing.total("market_published_total"))

    @property
    def dropped_ingress(self) -> int:
        return int(self.ing.total("market_dropped_total", stage="ingress"))

    @property
    def dropped_hotpath(self) -> int:
        return int(self.ing.total("market_dropped_total", stage="hotpath"))

    @property
    def queued(self) -> int:
        return int(self.ing.total("market_ingress_len") + self.ing.total("market_writer_buffered"))

    @property
    def reconnects(self) -> int:
        return int(self.ing.total("broker_reconnect_total"))

    @property
    def flushes(self) -> int:
        return int(self.ing.total("market_writer_flushes_total"))


class _Bench:
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
        self.sim_port = sim_port or _free_port()
        self.metrics_port = metrics_port or _free_port()
        self.sink = _Sink()
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
        if label is not None:
            self.phase = label
        if self.progress is not None:
            self.progress(self.phase, min(0.99, (time.monotonic() - self.t0) / self.planned_s))

    async def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, SAMPLE_S))
            self.tick()

    # -- reading the children
    async def scrape(self) -> Scrape:
        return parse_metrics((await http_get(self.metrics_port, "/metrics")).decode("utf-8", "replace"))

    async def sim_state(self) -> dict[str, Any]:
        state: dict[str, Any] = orjson.loads(await http_get(self.sim_port, "/control/state"))
        return state

    async def set_rate(self, rate: float) -> None:
        await http_get(self.sim_port, f"/control/rate?value={rate:g}")

    def cpu(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        out["bench"] = cpu_seconds(os.getpid())
        out["redis-server"] = cpu_seconds(self.redis_pid) if self.redis_pid else None
        out["machine"] = machine_busy_seconds()
        return out

    async def edge(self) -> _Edge:
        consumed, ing, sim = await self.read_counts()
        return _Edge(time.monotonic(), ing, sim, self.cpu(), consumed, self.received_before)

    async def read_counts(self) -> tuple[int, Scrape, dict[str, Any]]:
        """The consumer's count, then the ingestor's, then the simulator's: each later read can only be
        ahead of the one before, so published - consumed and sent - received are never negative."""
        consumed = self.sink.received
        ing = await self.scrape()
        sim = await self.sim_state()
        return consumed, ing, sim

    # -- start
    async def start(self, env: dict[str, str], workdir: Path, children: list[_Child]) -> None:
        self.tick("starting the simulator")
        symbols = ",".join(SYMBOLS)
        sim = await _spawn("simulator", [
            "simulate", "--port", str(self.sim_port), "--symbols", symbols, "--rate", "1", "--seed", str(self.seed),
            "--id-base", "0", "--log-level", "warning", "--batch-interval", f"{SIM_BATCH_S:g}",
        ], env, workdir)
        children.append(sim)
        await self._wait(sim, lambda: self.sim_state())
        self.pids["simulator"] = sim.proc.pid
        await self.start_ingestor(env, workdir, children, self.subscribers)

    async def start_ingestor(self, env: dict[str, str], workdir: Path, children: list[_Child],
                             subscribers: int, spill: str = "spill") -> None:
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
            args += ["--subscriber", "ops.bench_probe:noop"]
        ing = await _spawn("ingestor", args, env, workdir)
        children.append(ing)

        async def live() -> None:
            scrape = await self.scrape()
            if scrape.total("market_connection_up") < 1:
                raise TransientError("the ingestor is not connected to the simulator yet")

        await self._wait(ing, live)
        self.pids["ingestor"] = ing.proc.pid

    async def _wait(self, child: _Child, ready: Callable[[], Any]) -> None:
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

    # -- steps
    async def drain(self, limit_s: float) -> tuple[bool, _Edge]:
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

    async def prime(self, consumer: Consumer) -> None:
        """A trickle until every stream exists and the consumer reads it, then drain: the first window must
        not measure the consumer finding streams (it reads a stream it finds from its beginning)."""
        self.tick("priming: every stream, every reader")
        await self.set_rate(PRIME_RATE)
        streams = len(SYMBOLS) * len(CHANNELS)
        deadline = time.monotonic() + START_TIMEOUT_S
        while consumer.stats().keys < streams:
            if time.monotonic() > deadline:
                self.notes.append(f"priming: the consumer read {consumer.stats().keys} of {streams} streams after "
                                  f"{START_TIMEOUT_S:.0f} s")
                break
            await asyncio.sleep(0.1)  # the consumer's own rescan finds the streams; poll its counter
            self.tick()
        await self.set_rate(0)
        drained, _ = await self.drain(self.drain_s)
        if not drained:
            self.notes.append("priming: the path did not drain before the first step")

    async def step(self, index: int, rate: float, children: list[_Child], of: int = 0,
                   phase: str = "step") -> dict[str, Any]:
        label = f"{phase} {index + 1}/{of or len(self.schedule)} {rate:.0f}/s"
        self.tick(label + " warm-up")
        await self.set_rate(rate)
        await self.sleep(self.warmup_s)
        self.tick(label)
        start = await self.edge()
        scripts_a = await self.script_stats()
        self.sink.hist = LatencyHistogram()
        samples: list[list[float]] = []
        next_at = start.t
        while True:
            next_at += SAMPLE_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            consumed, ing, sim = await self.read_counts()
            now = time.monotonic()
            samples.append([
                round(now - self.t0, 2), ing.total("market_ingress_len"), ing.total("market_writer_buffered"),
                int(sim["stats"]["frames_sent"]) - ing.total("market_frames_received_total") - self.received_before,
                max(0.0, ing.total("market_published_total") - consumed),
            ])
            self.tick()
            for child in children:
                if child.proc.returncode is not None:
                    raise MarketError(f"the {child.name} exited during the run (status {child.proc.returncode}): "
                                      f"{child.last_line() or 'no message'}")
            if now - start.t >= self.window_s - 1e-3:
                break
        e2e = self.sink.hist
        self.sink.hist = LatencyHistogram()
        end = await self.edge()
        scripts_b = await self.script_stats()
        step = self.analyse(rate, start, end, e2e, samples)
        if scripts_a is not None and scripts_b is not None and scripts_b[0] > scripts_a[0]:
            calls, usec = scripts_b[0] - scripts_a[0], scripts_b[1] - scripts_a[1]
            step["writer"]["redis_us_per_call"] = round(usec / calls)
            step["writer"]["redis_busy_share"] = round(usec / 1e6 / step["window_s"], 3)
        return step

    async def script_stats(self) -> tuple[int, int] | None:
        """Redis's own count of script calls (EVALSHA) and the µs it spent in them; None if it cannot tell.
        On a shared Redis these include other clients' scripts."""
        client = aioredis.Redis.from_url(self.redis_url, socket_timeout=HTTP_TIMEOUT_S,
                                         socket_connect_timeout=HTTP_TIMEOUT_S)
        try:
            info: dict[str, Any] = await client.info("commandstats")
        except (OSError, aioredis.RedisError):
            return None
        finally:
            await client.aclose()
        stat = info.get("cmdstat_evalsha")
        if not isinstance(stat, dict):
            return (0, 0)
        return int(stat.get("calls", 0)), int(stat.get("usec", 0))

    def analyse(self, rate: float, a: _Edge, b: _Edge, e2e: LatencyHistogram,
                samples: list[list[float]]) -> dict[str, Any]:
        window = b.t - a.t
        latency = {
            "ingest": stage_stats(window_hist(b.ing.hist("market_ingest_latency_us"),
                                              a.ing.hist("market_ingest_latency_us"))),
            "hotpath": stage_stats(window_hist(b.ing.hist("market_e2e_latency_us"),
                                               a.ing.hist("market_e2e_latency_us"))),
            "redis": stage_stats(window_hist(b.ing.hist("market_fanout_latency_us"),
                                             a.ing.hist("market_fanout_latency_us"))),
            "redis_e2e": stage_stats(e2e),
        }
        sent, received = b.sent - a.sent, b.received - a.received
        accepted, published = b.accepted - a.accepted, b.published - a.published
        dropped = b.dropped_ingress - a.dropped_ingress
        queued_change = b.queued - a.queued
        consumed = b.consumed - a.consumed
        unaccounted = accepted - published - dropped - queued_change
        in_flight_end = b.sent - b.received
        lag_end = b.published - b.consumed
        tol = tolerance(rate)
        generated_per_s = (b.generated - a.generated) / window
        ingress_pts = [(s[0], s[1] + s[2]) for s in samples]
        backlog_pts = [(s[0], s[3]) for s in samples]
        lag_pts = [(s[0], s[4]) for s in samples]
        reasons: list[str] = []
        if generated_per_s < UNDER_DELIVERY * rate:
            reasons.append(f"the simulator generated {generated_per_s:.0f}/s of the {rate:.0f}/s offered (starved)")
        if growing(backlog_pts, rate) or in_flight_end > 10 * tol:
            reasons.append(f"frames piled up between the simulator and the ingestor ({in_flight_end} in flight at "
                           "the end)")
        if growing(ingress_pts, rate):
            reasons.append(f"the ingress queue grew ({queue_slope(ingress_pts):.0f}/s)")
        if dropped:
            reasons.append(f"{dropped} ticks dropped at the ingress")
        hot_dropped = b.dropped_hotpath - a.dropped_hotpath
        if hot_dropped:
            reasons.append(f"{hot_dropped} ticks dropped by hot-path subscribers")
        reconnects = b.reconnects - a.reconnects
        if reconnects:
            reasons.append(f"the venue connection was lost {reconnects} times")
        if self.consuming and (growing(lag_pts, rate) or lag_end > 10 * tol):
            reasons.append(f"the consumer fell behind ({lag_end} ticks unread at the end)")
        cpu: dict[str, float | None] = {}
        for name in ("simulator", "ingestor", "redis-server", "bench", "machine"):
            x, y = a.cpu.get(name), b.cpu.get(name)
            cpu[name] = round((y - x) / window, 3) if x is not None and y is not None else None
        ours = sum(v for k, v in cpu.items() if k != "machine" and v is not None)
        cpu["others"] = round(max(0.0, cpu["machine"] - ours), 3) if cpu["machine"] is not None else None
        adds_up = abs(in_flight_end) <= tol and abs(unaccounted) <= tol and abs(received - accepted) <= tol
        return {
            "rate": rate,
            "status": "ran",
            "window_s": round(window, 3),
            "saturated": bool(reasons),
            "saturation": reasons,
            "throughput": {
                "generated_per_s": round(generated_per_s, 1),
                "sent_per_s": round(sent / window, 1),
                "received_per_s": round(received / window, 1),
                "accepted_per_s": round(accepted / window, 1),
                "published_per_s": round(published / window, 1),
                "consumed_per_s": round(consumed / window, 1),
                "delivered_ratio": round(generated_per_s / rate, 3) if rate else None,
            },
            "latency": latency,
            "queue": {
                "samples": samples,
                "ingress_max": max((s[1] for s in samples), default=0.0),
                "writer_max": max((s[2] for s in samples), default=0.0),
                "queue_slope_per_s": round(queue_slope(ingress_pts), 1),
                "backlog_end": in_flight_end,
                "backlog_slope_per_s": round(queue_slope(backlog_pts), 1),
                "consumer_lag_end": lag_end,
            },
            "drops": {"ingress": dropped, "hotpath": hot_dropped},
            "writer": {
                "flushes_per_s": round((b.flushes - a.flushes) / window, 1),
                "ticks_per_flush": round(published / (b.flushes - a.flushes), 1) if b.flushes > a.flushes else None,
            },
            "reconnects": reconnects,
            "cpu": cpu,
            "tallies": {
                "sent": sent, "received": received, "in_flight_start": a.sent - a.received,
                "in_flight_end": in_flight_end, "accepted": accepted, "published": published, "dropped": dropped,
                "queued_start": a.queued, "queued_end": b.queued, "queued_change": queued_change,
                "unaccounted": unaccounted, "consumed": consumed, "consumer_lag_end": lag_end, "tolerance": tol,
                "adds_up": adds_up,
            },
        }

    async def ingest_only(self, env: dict[str, str], workdir: Path, children: list[_Child]) -> dict[str, Any]:
        """Peak ingest: the ingestor restarted with no subscriber, the consumer stopped, rates stepped up
        until one saturates (simulator -> WebSocket -> normalize -> Redis, nothing else)."""
        await self.set_rate(0)
        self.tick("peak ingest: the ingestor again, without subscribers")
        old = next(c for c in children if c.name == "ingestor")
        await old.stop()
        children.remove(old)
        self.pids.pop("ingestor", None)
        # Drained at rate 0 before the stop: every frame sent so far was received by the old process.
        self.received_before = int((await self.sim_state())["stats"]["frames_sent"])
        # Streams and a spill log of its own: it starts as a new deployment would, with nothing from the sweep
        # (whose saturated steps leave reconnects and repairs behind) to resume.
        fresh = env | {"MARKET_PREFIX": self.peak_prefix}
        await self.start_ingestor(fresh, workdir, children, 0, spill="spill-peak")
        steps: list[dict[str, Any]] = []
        for index, rate in enumerate(self.peak_schedule):
            step = await self.step(index, rate, children, of=len(self.peak_schedule), phase="peak ingest")
            await self.set_rate(0)
            self.tick("peak ingest: draining")
            drained, _ = await self.drain(self.drain_s)
            step["drained"] = drained
            steps.append(step)
            if step["saturated"] or not drained:
                break
        for rate in self.peak_schedule[len(steps):]:
            steps.append({"rate": rate, "status": "not run", "reason": "a lower rate saturated"})
        ran = [s for s in steps if s.get("status") != "not run"]
        best = max((s for s in ran if not s["saturated"]), key=lambda s: s["rate"], default=None)
        first_bad = next((s for s in ran if s["saturated"]), None)
        return {
            "schedule": self.peak_schedule, "subscribers": 0, "consumer": False, "steps": steps,
            "peak_rate": best["rate"] if best else None,
            "peak_ingest_per_s": round(best["throughput"]["published_per_s"], 1) if best else 0.0,
            "limit": first_bad["saturation"] if first_bad else [],
            "limit_rate": first_bad["rate"] if first_bad else None,
        }

    def final_tally(self, drained: bool, e: _Edge, consumer: Consumer) -> dict[str, Any]:
        st = consumer.stats()
        malformed = int(e.ing.total("market_frames_skipped_total", reason="malformed"))
        unsupported = int(e.ing.total("market_frames_skipped_total", reason="unsupported"))
        duplicates = int(e.ing.total("market_duplicate_total"))
        late = int(e.ing.total("market_out_of_order_total"))
        other = e.received - e.accepted
        return {
            "drained": drained,
            "sent": e.sent, "received": e.received, "sent_equals_received": e.sent == e.received,
            "accepted": e.accepted, "other_frames": other, "malformed": malformed, "unsupported": unsupported,
            "duplicates": duplicates, "out_of_order": late,
            "replies": other - malformed - unsupported - duplicates - late,
            "published": e.published, "dropped": e.dropped_ingress, "queued": e.queued,
            "accepted_equals_outcomes": e.accepted == e.published + e.dropped_ingress + e.queued,
            # After a reconnect, gap repair publishes ticks fetched over REST (and gap markers) that no venue
            # connection counted as accepted; the ingestor exports no counter of them, so this is the difference.
            "published_not_accepted": e.published + e.dropped_ingress + e.queued - e.accepted,
            "consumed": e.consumed, "consumed_equals_published": e.consumed == e.published,
            "consumer_duplicates": st.duplicates, "consumer_gaps": self.sink.gaps,
            "consumer_trimmed": self.sink.trimmed, "consumer_error": self.sink.error,
            "hotpath_dropped": e.dropped_hotpath, "reconnects": e.reconnects,
            "gaps": int(e.ing.total("market_gap_total")),
            "subscribers": int(e.ing.total("market_subscriber_count")),
        }

    async def pipeline(
        self, workdir: Path
    ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int], dict[str, Any] | None]:
        """Children up, the sweep, the final drain, the ingest-only phase; children stopped and keys deleted
        whatever happens."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
        env |= {"MARKET_REDIS_URL": self.redis_url, "MARKET_PREFIX": self.prefix,
                "MARKET_STATE_DIR": str(workdir), "MARKET_QUEUE_CAPACITY": "100000"}
        children: list[_Child] = []
        steps: list[dict[str, Any]] = []
        memory: dict[str, int] = {}
        peak: dict[str, Any] | None = None
        try:
            await self.start(env, workdir, children)
            consumer = Consumer(
                redis_url=self.redis_url, patterns=["binance:*:*"], prefix=self.prefix, group="bench",
                consumer=f"bench-{os.getpid()}", start_id="0", rescan_s=1.0, count=CONSUMER_COUNT,
                on_gap=self.sink.on_gap, on_trimmed=self.sink.on_trimmed,
            )

            async def consume() -> None:
                try:
                    await consumer.run(self.sink)
                except MarketError as exc:
                    self.sink.error = f"{type(exc).__name__}: {exc}"

            # Owned here: stopped and awaited in the finally below (a TaskGroup would wrap our one-line errors).
            task = asyncio.create_task(consume(), name="bench-consumer")
            try:
                await self.prime(consumer)
                stop_reason = ""
                for index, rate in enumerate(self.schedule):
                    if stop_reason:
                        steps.append({"rate": rate, "status": "not run", "reason": stop_reason})
                        continue
                    step = await self.step(index, rate, children)
                    await self.set_rate(0)
                    self.tick(f"step {index + 1}/{len(self.schedule)} draining")
                    began = time.monotonic()
                    drained, _ = await self.drain(self.drain_s)
                    step["drain_s"] = round(time.monotonic() - began, 2)
                    step["drained"] = drained
                    steps.append(step)
                    if self.sink.error:
                        stop_reason = f"the consumer failed: {self.sink.error}"
                    elif not drained:
                        stop_reason = f"the backlog of the {rate:.0f}/s step did not drain in {self.drain_s:.0f} s"
                    elif step["reconnects"]:
                        stop_reason = f"the venue connection was lost at {rate:.0f}/s"
                self.tick("final drain")
                await self.set_rate(0)
                # A gap repair after a reconnect holds ticks for up to its 60 s deadline: wait for it.
                lost = any(s.get("reconnects") for s in steps)
                drained, last = await self.drain(max(self.drain_s, REPAIR_WAIT_S if lost else 30.0))
                tally = self.final_tally(drained, last, consumer)
                for name, pid in self.pids.items():
                    hwm = memory_kib(pid).get("VmHWM")
                    if hwm is not None:
                        memory[name] = hwm
                hwm = memory_kib(os.getpid()).get("VmHWM")
                if hwm is not None:
                    memory["bench"] = hwm
                if self.peak_schedule and drained and not self.sink.error:
                    consumer.stop()
                    task.cancel()
                    await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
                    self.consuming = False
                    peak = await self.ingest_only(env, workdir, children)
            finally:
                consumer.stop()
                task.cancel()
                await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
        finally:
            self.tick("stopping")
            for child in reversed(children):
                await child.stop()
            await self.delete_keys()
        return steps, tally, memory, peak

    async def delete_keys(self) -> None:
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


async def measure_flush(redis_url: str, *, repeats: int = 30) -> dict[str, Any]:
    """Where the Redis stage's time goes: how long one writer flush (one round trip, one script call for
    every stream it touches) takes by the number of streams it touches, next to a bare PING round trip."""
    from distributor.writer import Retention, StreamWriter
    from ops.bench_writer import make_ticks

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


# ---------------------------------------------------------------------------------------------- environment
def _machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": model or platform.processor() or "unknown", "cores": os.cpu_count(), "cpus_usable": usable,
        "memory_gib": mem, "kernel": platform.release(), "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    git = shutil.which("git")
    if git is None:
        return {"commit": None, "dirty": None}
    try:
        head = subprocess.run([git, "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10,
                              check=False)
        diff = subprocess.run([git, "--no-optional-locks", "diff", "--quiet", "HEAD", "--"], cwd=_ROOT,
                              capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    commit = head.stdout.strip() if head.returncode == 0 else None
    return {"commit": commit, "dirty": diff.returncode == 1 if commit else None}


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
        cmd += "   # custom schedule or window: call ops.bench_report.run_bench directly"
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
    instrumentation-cost benchmark (:mod:`ops.bench_ingest`; 0 skips it) and ``ingest_ticks`` its frames per
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
            _check_port_free(port)
    _check_out_dir(out_dir)
    info = await _redis_info(redis_url)

    bench = _Bench(redis_url=redis_url, seed=seed, schedule=rates, warmup_s=warmup_s, window_s=window_s,
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
    machine = _machine()
    # A bound on the whole run: it never hangs, whatever a child or Redis does.
    budget = 3 * bench.planned_s + 180.0
    workdir = Path(tempfile.mkdtemp(prefix="market-bench-"))
    try:
        async with asyncio.timeout(budget):
            steps, tally, memory, peak = await bench.pipeline(workdir)
            writer: dict[str, Any] | None = None
            if w_ticks > 0:
                from ops.bench_writer import run_writer_bench

                bench.tick("writer vs naive baseline")
                writer = await run_writer_bench(redis_url, ticks=w_ticks, streams=min(100, w_ticks))
            instrumentation: dict[str, Any] | None = None
            if i_rounds > 0:
                from ops.bench_ingest import run_ingest_bench

                bench.tick("instrumentation cost: ingest path, timing off / sampled / every tick")
                instrumentation = await run_ingest_bench(redis_url, ticks=i_ticks, rounds=i_rounds,
                                                         subscribers=SUBSCRIBERS, seed=seed)
            bench.tick("writer flush by streams touched")
            flush = await measure_flush(redis_url)
            hot: dict[str, Any] | None = None
            if h_s > 0:
                from ops.bench_hotpath import run_hotpath_bench

                bench.tick("hot path 50000/s, 16 subscribers")
                hot = await run_hotpath_bench(rate=REFERENCE_RATE, subscribers=SUBSCRIBERS, slow_subscribers=1,
                                              duration=h_s)
    except TimeoutError:
        raise MarketError(f"the bench did not finish within its {budget:.0f} s bound") from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    versions = {
        "python": platform.python_version(), "redis-server": info.get("redis_version"),
        "websockets": _version("websockets"), "redis-py": _version("redis"), "orjson": _version("orjson"),
        "hiredis": _version("hiredis"), "typer": _version("typer"), "prometheus-client": _version("prometheus-client"),
        "matplotlib": _version("matplotlib"), "market": _version("market"),
    }
    report: dict[str, Any] = {
        "schema": 1,
        "mode": "quick" if quick and schedule is None else ("full" if schedule is None else "custom"),
        "command": _command(quick, out_dir, seed, schedule, step_s),
        "seed": seed,
        "started": started,
        "ended": _now(),
        "duration_s": round(time.monotonic() - began, 1),
        "machine": machine,
        "versions": versions,
        "git": _git(),
        "configuration": {
            "symbols": list(SYMBOLS), "channels": list(CHANNELS), "subscribers": subscribers,
            "subscriber": "ops.bench_probe:noop", "schedule": rates, "warmup_s": warmup_s, "window_s": window_s,
            "sample_s": SAMPLE_S, "queue_policy": "block", "queue_capacity": 100_000,
            "retention_maxlen": RETENTION_MAXLEN, "redis_url": redact_url(redis_url), "redis_pid": bench.redis_pid,
            "prefix": bench.prefix, "peak_prefix": bench.peak_prefix, "simulator_id_base": 0,
            "consumer_count": CONSUMER_COUNT,
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
        "instrumentation": instrumentation,
        "peak_ingest": peak,
        "summary": summarize(steps, writer, hot, int(machine.get("cores") or 1), instrumentation, peak),
        "notes": bench.notes,
    }
    write_report(report, out_dir)
    if progress is not None:
        progress("done", 1.0)
    return report
