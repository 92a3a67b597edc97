"""A step's latency stage by stage against the limits measured in the same run (:mod:`ops.bench.limits`); pure.

:func:`missed_targets` names the latency targets of a step's rate (:data:`STEP_TARGETS`) it missed;
:func:`stage_budget` sets its stages against the limits: ingest (frame -> ingress, in the ingestor's process, no
Redis), Redis write (ingress -> Redis acknowledged, limit one ``XADD``; where the step has the writer's send times,
split in two: in the writer before its flush is sent, no limit, and the round trip from sent to acknowledged, limit
one ``XADD``), consumer (Redis acknowledged -> consumer
callback, limit one append waking a blocked ``XREADGROUP``), the whole Redis path (limit the two together) and the
hot path in the loaded ingestor (limit: the stand-alone hot-path bench's p99).  The stage figures are differences
of percentiles of nested spans (frame -> ingress, frame -> Redis, frame -> consumer), so they are estimates of
each stage's share, not exact per-tick splits.
"""

from __future__ import annotations

from typing import Any

__all__ = ["STEP_TARGETS", "missed_targets", "stage_budget"]

#: latency targets by offered rate (ticks/s): stage -> percentile -> µs
STEP_TARGETS: dict[float, dict[str, dict[str, float]]] = {
    10_000.0: {"redis_e2e": {"p50_us": 1_000.0, "p99_us": 2_000.0}},
    50_000.0: {"redis_e2e": {"p99_us": 5_000.0}, "hotpath": {"p99_us": 500.0}},
}


def missed_targets(step: dict[str, Any]) -> list[tuple[str, str, float, float]]:
    """The :data:`STEP_TARGETS` a step that ran missed, as ``(stage, percentile, measured µs, target µs)``
    (pure)."""
    out: list[tuple[str, str, float, float]] = []
    for stage, bars in STEP_TARGETS.get(float(step.get("rate") or 0), {}).items():
        for p, bar in bars.items():
            value = ((step.get("latency") or {}).get(stage) or {}).get(p)
            if value is not None and value > bar:
                out.append((stage, p.removesuffix("_us"), float(value), bar))
    return out


def _stage(name: str, p50: float | None, p99: float | None, limit: float | None, what: str) -> dict[str, Any]:
    """One row: ``limit`` (µs, or None: none measured) against the p99, ``what`` says what the limit is."""
    above = None if p99 is None or limit is None else max(0.0, round(p99 - limit, 1))
    return {"stage": name, "p50_us": p50, "p99_us": p99, "limit_us": limit, "limit": what, "p99_above_limit_us": above}


def stage_budget(step: dict[str, Any], limits: dict[str, Any], hot_alone_p99_us: float | None = None
                 ) -> list[dict[str, Any]]:
    """A step's latency stage by stage (p50, p99) against the limits of the same run (see the module doc; the
    hot path's is its p99 in the stand-alone hot-path bench, ``hot_alone_p99_us``, when given)."""
    lat = step["latency"]

    def pct(stage: str, p: str) -> float | None:
        v = (lat.get(stage) or {}).get(p)
        return None if v is None else float(v)

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else max(0.0, round(a - b, 1))

    xadd = float(limits["xadd"]["p50_us"])
    wake = float(limits["wake"]["p50_us"])
    ing50, ing99 = pct("ingest", "p50_us"), pct("ingest", "p99_us")
    red50, red99 = pct("redis", "p50_us"), pct("redis", "p99_us")
    e2e50, e2e99 = pct("redis_e2e", "p50_us"), pct("redis_e2e", "p99_us")
    sent50, sent99 = pct("redis_sent", "p50_us"), pct("redis_sent", "p99_us")
    # an ingestor that does not time its sends (older, or sampling off) gives none or an empty histogram
    split = [] if not (lat.get("redis_sent") or {}).get("count") else [
        _stage("- of which in the writer (ingress -> flush sent)", diff(sent50, ing50), diff(sent99, ing99), None,
               "in the ingestor: the distributor, the hot path's turn, encoding"),
        _stage("- of which the round trip (sent -> acknowledged)", diff(red50, sent50), diff(red99, sent99), xadd,
               "one XADD"),
    ]
    return [
        _stage("ingest (frame -> ingress)", ing50, ing99, None, "in the ingestor, no Redis"),
        _stage("Redis write (ingress -> acknowledged)", diff(red50, ing50), diff(red99, ing99), xadd, "one XADD"),
        *split,
        _stage("consumer (acknowledged -> callback)", diff(e2e50, red50), diff(e2e99, red99), wake,
               "one append waking a blocked XREADGROUP"),
        _stage("Redis path e2e (frame -> consumer)", e2e50, e2e99, round(xadd + wake, 1), "XADD + wake"),
        _stage("hot path (publish -> callback)", pct("hotpath", "p50_us"), pct("hotpath", "p99_us"),
               hot_alone_p99_us, "p99 of the hot path alone, same subscribers"),
    ]
