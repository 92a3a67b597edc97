"""What a run's numbers mean: per-step figures from two edges, saturation, the peak, the verdicts.

Pure: counters and histograms in (:class:`Edge`, read by :mod:`ops.bench.harness`), plain dicts out,
the same dicts ``report.json`` holds.  A step is *saturated* when anything piles up or is lost (the
simulator starved of CPU, frames piling up in the socket, the ingress queue growing, drops, a
reconnect, the consumer falling behind); the peak is the highest step that is not saturated and keeps
the Redis path's p99 within its target.  Costs: linear in the steps and the queue samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consumer_sdk.core.latency import LatencyHistogram
from ops.bench.profiles import GROWTH_SHARE, REFERENCE_RATE, SUBSCRIBERS, TARGETS, UNDER_DELIVERY
from ops.bench.scrape import Scrape, window_hist

__all__ = [
    "REDIS_COMMANDS",
    "Edge",
    "analyse_step",
    "capacity",
    "final_tally",
    "find_peak",
    "growing",
    "queue_slope",
    "redis_commands",
    "stage_stats",
    "summarize",
    "summarize_peak",
    "tolerance",
]


#: the commands whose time inside Redis a step reports: the writer's script, the consumer's reads and acks
REDIS_COMMANDS: tuple[str, ...] = ("evalsha", "xreadgroup", "xack")


def redis_commands(
    before: dict[str, tuple[int, int]] | None, after: dict[str, tuple[int, int]] | None, window_s: float
) -> dict[str, dict[str, float]]:
    """Per command of :data:`REDIS_COMMANDS` called in the window: calls a second, µs a call inside Redis, and
    the share of the window Redis spent in it, from two ``(calls, µs)`` readings of ``INFO commandstats``
    (``{}`` when either is missing; a command not called, or whose calls or µs went back, is left out: a reset
    between the edges that this can see; one followed by more calls than before cannot be told apart)."""
    if before is None or after is None or window_s <= 0:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name in REDIS_COMMANDS:
        calls = after.get(name, (0, 0))[0] - before.get(name, (0, 0))[0]
        usec = after.get(name, (0, 0))[1] - before.get(name, (0, 0))[1]
        if calls > 0 and usec >= 0:
            out[name] = {"calls_per_s": round(calls / window_s, 1), "us_per_call": round(usec / calls, 1),
                         "busy_share": round(usec / 1e6 / window_s, 3)}
    return out


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


@dataclass
class Edge:
    """Everything read at one edge of a window: the ingestor's ``/metrics``, the simulator's state, CPU
    seconds by process name (and ``machine``), the consumer's count; the counters derived from them."""

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


def analyse_step(rate: float, a: Edge, b: Edge, e2e: LatencyHistogram, samples: list[list[float]], *,
                 consuming: bool = True) -> dict[str, Any]:
    """One step's figures from the edges of its window (``a`` before ``b``), the SDK consumer's histogram
    over the window and the queue samples (rows ``[t, ingress, writer buffer, socket backlog, consumer
    lag]``): latency per stage, throughput per hop, queues, drops, CPU shares, the tallies and the
    saturation reasons.  ``consuming``: whether the SDK consumer reads (only then can it fall behind)."""
    window = b.t - a.t
    latency = {
        "ingest": stage_stats(window_hist(b.ing.hist("market_ingest_latency_us"),
                                          a.ing.hist("market_ingest_latency_us"))),
        "hotpath": stage_stats(window_hist(b.ing.hist("market_e2e_latency_us"),
                                           a.ing.hist("market_e2e_latency_us"))),
        "redis_sent": stage_stats(window_hist(b.ing.hist("market_fanout_latency_us", stage="redis_sent"),
                                              a.ing.hist("market_fanout_latency_us", stage="redis_sent"))),
        "redis": stage_stats(window_hist(b.ing.hist("market_fanout_latency_us", stage="redis"),
                                         a.ing.hist("market_fanout_latency_us", stage="redis"))),
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
    if consuming and (growing(lag_pts, rate) or lag_end > 10 * tol):
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


def final_tally(drained: bool, e: Edge, *, consumer_duplicates: int, consumer_gaps: int, consumer_trimmed: int,
                consumer_error: str | None) -> dict[str, Any]:
    """The whole run's tally from the edge read after the final drain (``drained``: whether it drained)."""
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
        "consumer_duplicates": consumer_duplicates, "consumer_gaps": consumer_gaps,
        "consumer_trimmed": consumer_trimmed, "consumer_error": consumer_error,
        "hotpath_dropped": e.dropped_hotpath, "reconnects": e.reconnects,
        "gaps": int(e.ing.total("market_gap_total")),
        "subscribers": int(e.ing.total("market_subscriber_count")),
    }


def summarize_peak(schedule: Sequence[float], steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ingest-only phase's result: its steps (those ``not run`` included), the highest rate that did
    not saturate and what it published, and what stopped the first step that did."""
    ran = [s for s in steps if s.get("status") != "not run"]
    best = max((s for s in ran if not s["saturated"]), key=lambda s: s["rate"], default=None)
    first_bad = next((s for s in ran if s["saturated"]), None)
    return {
        "schedule": list(schedule), "subscribers": 0, "consumer": False, "steps": list(steps),
        "peak_rate": best["rate"] if best else None,
        "peak_ingest_per_s": round(best["throughput"]["published_per_s"], 1) if best else 0.0,
        "limit": first_bad["saturation"] if first_bad else [],
        "limit_rate": first_bad["rate"] if first_bad else None,
    }
