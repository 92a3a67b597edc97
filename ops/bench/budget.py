"""A step's latency stage by stage against the limits measured in the same run (:mod:`ops.bench.limits`); pure.

:func:`missed_targets` names the latency targets of a step's rate (:data:`STEP_TARGETS`) it missed;
:func:`stage_budget` follows a tick along the Redis path and sets each stage against its limit:

- ingest: frame -> ingress, in the ingestor's process, no Redis; no limit;
- in the writer: ingress -> its flush sent (the distributor, the hot path's turn, encoding, and the write itself, in
  which the kernel may run Redis first on the ingestor's core: ``docs/threading.md``); no limit;
- Redis and the consumer: flush sent -> consumer callback (the script, the blocked read woken, its follow-up,
  decoding, the handler); limit: one ``XADD`` through the SDK consumer (sent -> handler);
- the whole Redis path: frame -> consumer callback; the same limit;
- beside Redis and the consumer, the writer's round trip: flush sent -> acknowledged, limit one ``XADD``.  The
  consumer does not wait for the writer's reply (Redis wakes its read when the script has run), so this is no
  stage of the path: it can end after the tick's callback;
- the hot path in the loaded ingestor: publish -> callback; limit: the stand-alone hot-path bench's p99.

A limit is a bare operation's p50 on idle connections, the least a stage can take: a stage's mean and p99 are set
against it (the hot path's p99 against the stand-alone bench's p99).

Every span but the hot path's is timed from the frame, so a stage between two edges is the difference of two
spans.  Means add up: the stages' means sum to the path's mean (they are not clamped, so they always do), and each
stage's share of it is close to exact (the ingestor times one tick in 16, the consumer every tick).  Percentiles do
not add: a stage's p50 and p99 are the differences of the two spans' percentiles, which are bucket bounds, an
estimate that can even put a stage's p50 above its p99 (a negative difference is shown as 0); the ingest's, the
path's and the hot path's are their own.  A step whose ingestor did not time its sends (an empty ``redis_sent``)
has no writer stage: the next stage and the round trip then start at the ingress, and the round trip holds the
writer's time too.
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


#: a span's mean, p50 and p99 in µs (None: not measured)
Span = tuple[float | None, float | None, float | None]


def _stage(name: str, span: Span, limit: float | None, what: str, *, typical: bool = True) -> dict[str, Any]:
    """One row: ``span`` (mean, p50, p99 in µs) against ``limit`` (µs; None: none measured), ``what`` says what the
    limit is.  A ``typical`` limit (a bare operation's p50) bounds the mean and the p99 from below; otherwise (the
    hot path alone's p99) only the p99."""
    mean, p50, p99 = span

    def above(value: float | None) -> float | None:
        return None if value is None or limit is None else max(0.0, round(value - limit, 1))

    return {"stage": name, "mean_us": mean, "p50_us": p50, "p99_us": p99, "limit_us": limit, "limit": what,
            "mean_above_limit_us": above(mean) if typical else None, "p99_above_limit_us": above(p99)}


def stage_budget(step: dict[str, Any], limits: dict[str, Any], hot_alone_p99_us: float | None = None
                 ) -> list[dict[str, Any]]:
    """A step's latency stage by stage (mean, p50, p99) against the limits of the same run (see the module doc;
    the hot path's is its p99 in the stand-alone hot-path bench, ``hot_alone_p99_us``, when given)."""
    lat = step["latency"]

    def span(stage: str) -> Span:
        got = lat.get(stage) or {}

        def value(key: str) -> float | None:
            v = got.get(key)
            return None if v is None else float(v)

        return value("mean_us"), value("p50_us"), value("p99_us")

    def between(later: Span, earlier: Span) -> Span:
        """The stage from ``earlier``'s edge to ``later``'s: the mean as it is (means add up), the percentiles
        clamped at 0."""

        def diff(a: float | None, b: float | None, clamp: bool = True) -> float | None:
            if a is None or b is None:
                return None
            return max(0.0, round(a - b, 1)) if clamp else round(a - b, 1)

        return diff(later[0], earlier[0], clamp=False), diff(later[1], earlier[1]), diff(later[2], earlier[2])

    def limit(name: str) -> float:
        return float(limits[name]["p50_us"])

    ingest, sent, acked, e2e = span("ingest"), span("redis_sent"), span("redis"), span("redis_e2e")
    through = limit("consumer")
    through_what = "one XADD through the SDK consumer, sent -> handler"
    # an ingestor that does not time its sends (older, or sampling off) gives none or an empty histogram
    timed = bool((lat.get("redis_sent") or {}).get("count"))
    start, edge = (sent, "flush sent") if timed else (ingest, "ingress")
    trip = "the writer's round trip" if timed else "the writer and its round trip"
    writer = [_stage("in the writer (ingress -> flush sent)", between(sent, ingest), None,
                     "the distributor, the hot path's turn, encoding, the write")] if timed else []
    return [
        _stage("ingest (frame -> ingress)", ingest, None, "in the ingestor, no Redis"),
        *writer,
        _stage(f"Redis and the consumer ({edge} -> callback)", between(e2e, start), through, through_what),
        _stage("Redis path e2e (frame -> consumer)", e2e, through, through_what),
        _stage(f"beside Redis and the consumer: {trip} ({edge} -> acknowledged)", between(acked, start),
               limit("xadd"), "one XADD"),
        _stage("hot path (publish -> callback)", span("hotpath"), hot_alone_p99_us,
               "p99 of the hot path alone, same subscribers", typical=False),
    ]
