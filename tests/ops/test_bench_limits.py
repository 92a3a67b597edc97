"""The limits measured in the same run as the bench, and a step's time stage by stage against them."""

from __future__ import annotations

from typing import Any

from ops.bench.budget import STEP_TARGETS, missed_targets, stage_budget
from ops.bench.limits import measure_limits, percentiles
from ops.bench.render import _remaining_by_stage


def _step(rate: float, **lat: tuple[float, ...]) -> dict[str, Any]:
    """A step with these spans: ``(p50, p99)`` or ``(p50, p99, mean)`` in µs (the mean is the p50 when not given)."""
    return {"rate": rate, "saturated": False,
            "latency": {k: {"count": 1, "p50_us": v[0], "p99_us": v[1], "mean_us": v[2] if len(v) > 2 else v[0]}
                        for k, v in lat.items()}}


LIMITS = {"loop": "asyncio", "ping": {"p50_us": 50.0, "p99_us": 90.0}, "xadd": {"p50_us": 60.0, "p99_us": 100.0},
          "xreadgroup": {"p50_us": 70.0, "p99_us": 110.0}, "wake": {"p50_us": 100.0, "p99_us": 150.0},
          "consumer": {"p50_us": 200.0, "p99_us": 400.0}}


def test_percentiles() -> None:
    assert percentiles([]) == {"p50_us": 0.0, "p90_us": 0.0, "p99_us": 0.0}
    assert percentiles([float(i) for i in range(100, 0, -1)]) == {"p50_us": 51.0, "p90_us": 91.0, "p99_us": 100.0}


def test_missed_targets_by_rate() -> None:
    assert set(STEP_TARGETS) == {10_000.0, 50_000.0}
    ok = _step(10_000, redis_e2e=(900, 1900))
    assert missed_targets(ok) == []
    slow = _step(10_000, redis_e2e=(1100, 2500))
    assert missed_targets(slow) == [("redis_e2e", "p50", 1100.0, 1000.0), ("redis_e2e", "p99", 2500.0, 2000.0)]
    assert missed_targets(_step(50_000, redis_e2e=(3000, 4900), hotpath=(100, 600))) == [
        ("hotpath", "p99", 600.0, 500.0)]
    assert missed_targets(_step(1_000, redis_e2e=(9000, 9000))) == []  # no target at that rate


def test_stage_budget_follows_the_tick_from_the_frame() -> None:
    step = _step(50_000, ingest=(200, 1000, 250), redis_sent=(500, 2500, 700), redis=(1200, 4000, 1500),
                 redis_e2e=(2000, 7000, 2400), hotpath=(150, 800, 180))
    rows = {r["stage"].split(" (")[0]: r for r in stage_budget(step, LIMITS, 400.0)}
    assert list(rows) == ["ingest", "in the writer", "Redis and the consumer", "Redis path e2e",
                          "beside Redis and the consumer: the writer's round trip", "hot path"]
    ing, writer, rest, e2e, trip, hot = rows.values()
    assert (ing["mean_us"], ing["p50_us"], ing["p99_us"], ing["limit_us"]) == (250.0, 200.0, 1000.0, None)
    assert ing["mean_above_limit_us"] is None and ing["p99_above_limit_us"] is None
    assert (writer["mean_us"], writer["p50_us"], writer["p99_us"], writer["limit_us"]) == (450.0, 300.0, 1500.0, None)
    # the consumer's part starts at the flush sent, not at the writer's reading of the reply
    assert (rest["mean_us"], rest["p50_us"], rest["p99_us"]) == (1700.0, 1500.0, 4500.0)
    assert (rest["limit_us"], rest["mean_above_limit_us"], rest["p99_above_limit_us"]) == (200.0, 1500.0, 4300.0)
    assert "SDK consumer" in rest["limit"]
    # the stages' means add up to the path's
    assert ing["mean_us"] + writer["mean_us"] + rest["mean_us"] == e2e["mean_us"] == 2400.0
    assert (e2e["p50_us"], e2e["p99_us"], e2e["limit_us"], e2e["p99_above_limit_us"]) == (2000.0, 7000.0, 200.0,
                                                                                          6800.0)
    assert (trip["mean_us"], trip["p50_us"], trip["p99_us"], trip["limit_us"]) == (800.0, 700.0, 1500.0, 60.0)
    assert (trip["mean_above_limit_us"], trip["p99_above_limit_us"]) == (740.0, 1440.0)
    # the hot path's limit is a p99: it bounds the p99 only
    assert (hot["limit_us"], hot["mean_above_limit_us"], hot["p99_above_limit_us"]) == (400.0, None, 400.0)
    # a span shorter than the one it follows (percentiles of different samples) gives a percentile of 0, not a
    # negative time; the means are not clamped, so they still add up to the path's
    odd = _step(10_000, ingest=(500, 900, 450), redis_sent=(400, 800, 420), redis=(600, 900), redis_e2e=(600, 900, 700),
                hotpath=(1, 2))
    ing, writer, rest, e2e = stage_budget(odd, LIMITS)[:4]
    assert (writer["mean_us"], writer["p50_us"], writer["p99_us"]) == (-30.0, 0.0, 0.0)
    assert ing["mean_us"] + writer["mean_us"] + rest["mean_us"] == e2e["mean_us"] == 700.0


def test_the_report_shows_the_stages_of_a_step_that_missed() -> None:
    lines: list[str] = []
    steps = [_step(10_000, ingest=(100, 200), redis=(500, 900), redis_e2e=(800, 1500), hotpath=(50, 90)),
             _step(50_000, ingest=(200, 1000, 260), redis=(1200, 4000), redis_e2e=(2000, 7000, 2300),
                   hotpath=(150, 800, 170))]
    _remaining_by_stage(lines.append, steps, LIMITS, 400.0)
    text = "\n".join(lines)
    assert "a bare PING 50 µs" in text and "a bare XADD 60 µs" in text and "a bare XREADGROUP" in text
    assert "At 10.0k/s" not in text  # met its targets
    assert "At 50.0k/s, missed: redis_e2e p99 7.0 ms > 5.0 ms; hotpath p99 800 µs > 500 µs" in text
    # columns: stage, mean, p50, p99, limit, above the limit (mean / p99)
    assert ("| Redis and the consumer (ingress -> callback) | 2.0 ms | 1.8 ms | 6.0 ms | 200 µs (one XADD through the "
            "SDK consumer, sent -> handler) | 1.8 ms / 5.8 ms |") in text
    assert "| hot path (publish -> callback) | 170 µs | 150 µs | 800 µs | 400 µs (p99 of the hot path alone" in text
    assert "same subscribers) | - / 400 µs |" in text
    assert "The stages' means add up to the path's" in text


async def test_measure_limits_on_redis(redis_url: str) -> None:
    out = await measure_limits(redis_url, repeats=20)
    assert out["loop"] == "asyncio"
    for name in ("ping", "xadd", "xreadgroup", "wake", "consumer"):
        assert 0 < out[name]["p50_us"] <= out[name]["p90_us"] <= out[name]["p99_us"], name


def test_a_saturated_step_that_missed_shows_its_stages_and_the_cpu_its_rate_needs() -> None:
    lines: list[str] = []
    step = _step(50_000, ingest=(90_000, 300_000), redis=(3e6, 5e6), redis_e2e=(2.6e6, 4e6), hotpath=(4e5, 8e5))
    step.update(saturated=True, saturation=["the ingress queue grew (7489/s)"], cpu={"machine": 1.91})
    cap = {"from_rate": 20_000.0, "cores_per_1k_per_s": {"simulator": 0.014, "ingestor": 0.026}}
    _remaining_by_stage(lines.append, [step], LIMITS, 400.0, cap, 2)
    text = "\n".join(lines)
    assert ("At 50.0k/s, missed: redis_e2e p99 4000 ms > 5.0 ms; hotpath p99 800 ms > 500 µs. This step saturated "
            "(the ingress queue grew (7489/s)): at the cost per tick measured at 20.0k/s, the processes sharing the "
            "machine need 200% of one core at this rate, and it has 200%; it ran at 191% in the window.") in text
    assert "| ingest (frame -> ingress) | 90 ms | 90 ms | 300 ms |" in text
    # without a capacity estimate (no clean step) the sentence still says it saturated
    lines.clear()
    _remaining_by_stage(lines.append, [step], LIMITS, 400.0)
    assert "This step saturated (the ingress queue grew (7489/s)); it ran at 191% in the window." in "\n".join(lines)


def test_stage_budget_without_the_writers_send_times() -> None:
    """A report from before the writer timed its sends, or a step whose send histogram is empty: no writer stage,
    the consumer's part and the round trip start at the ingress."""
    old = _step(10_000, ingest=(100, 200), redis=(300, 400), redis_e2e=(500, 600), hotpath=(1, 2))
    empty = _step(10_000, ingest=(100, 200), redis_sent=(0, 0), redis=(300, 400), redis_e2e=(500, 600),
                  hotpath=(1, 2))
    empty["latency"]["redis_sent"]["count"] = 0
    for step in (old, empty):
        rows = stage_budget(step, LIMITS)
        assert [r["stage"] for r in rows][1:4] == [
            "Redis and the consumer (ingress -> callback)", "Redis path e2e (frame -> consumer)",
            "beside Redis and the consumer: the writer and its round trip (ingress -> acknowledged)"]
        assert (rows[1]["mean_us"], rows[1]["p99_us"], rows[3]["mean_us"], rows[3]["p99_us"]) == (400.0, 400.0,
                                                                                                  200.0, 200.0)
