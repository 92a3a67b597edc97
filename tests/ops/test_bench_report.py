"""``market bench``: the report's pure parts, bad input, and a tiny run of the whole path on the real Redis."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from consumer_sdk.core.errors import ConfigError, TransientError
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY, LatencyHistogram
from distributor.hotpath import HOT_SAMPLE_EVERY
from ingestor.exposition import Histograms, as_family
from ops.bench.analysis import (
    Edge,
    analyse_step,
    final_tally,
    find_peak,
    growing,
    queue_slope,
    redis_commands,
    stage_stats,
    summarize_peak,
)
from ops.bench.profiles import SUBSCRIBERS
from ops.bench.render import progress_bar, render_markdown
from ops.bench.report import run_bench, write_report
from ops.bench.scrape import Scrape, parse_metrics, window_hist
from ops.redis_server import free_port

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


class _Fixed(Collector):
    def __init__(self, hist: LatencyHistogram) -> None:
        self.hist = hist

    def collect(self) -> Any:
        yield as_family(Histograms("market_e2e_latency_us", "test", [({"path": "hotpath"}, self.hist)]))


def _exposition(hist: LatencyHistogram) -> str:
    registry = CollectorRegistry()
    registry.register(_Fixed(hist))
    text = generate_latest(registry).decode()
    return text + 'market_published_total{channel="trade",venue="binance"} 7.0\n' \
                  'market_published_total{channel="agg_trade",venue="binance"} 5.0\n' \
                  'market_dropped_total{policy="block",stage="ingress"} 2.0\n'


def test_metrics_round_trip_through_prometheus_text() -> None:
    h = LatencyHistogram()
    for us in (1, 5, 40, 300, 300, 2_000, 90_000):
        h.observe(us)
    scrape = parse_metrics(_exposition(h))
    back = scrape.hist("market_e2e_latency_us")
    assert back.counts == h.counts
    assert back.sum_us == h.sum_us
    assert back.percentile(0.5) == h.percentile(0.5)
    assert scrape.total("market_published_total") == 12
    assert scrape.total("market_published_total", channel="trade") == 7
    assert scrape.total("market_dropped_total", stage="ingress") == 2
    assert scrape.total("market_dropped_total", stage="hotpath") == 0


class _Staged(Collector):
    def __init__(self, *stages: tuple[str, LatencyHistogram]) -> None:
        self.stages = stages

    def collect(self) -> Any:
        yield as_family(Histograms("market_fanout_latency_us", "test",
                                   [({"stage": name}, h) for name, h in self.stages]))


def test_a_histogram_of_several_stages_is_read_stage_by_stage() -> None:
    redis, sent = LatencyHistogram(), LatencyHistogram()
    for us in (900, 1_500, 3_000):
        redis.observe(us)
    for us in (100, 200):
        sent.observe(us)
    registry = CollectorRegistry()
    registry.register(_Staged(("redis", redis), ("redis_sent", sent)))
    scrape = parse_metrics(generate_latest(registry).decode())
    assert scrape.hist("market_fanout_latency_us", stage="redis").counts == redis.counts
    assert scrape.hist("market_fanout_latency_us", stage="redis_sent").counts == sent.counts
    assert scrape.hist("market_fanout_latency_us", stage="nothing").count == 0
    both = scrape.hist("market_fanout_latency_us")  # no label given: every stage merged
    assert both.count == 5 and both.sum_us == redis.sum_us + sent.sum_us
    assert scrape.hist("market_fanout_latency_us", stage="redis").counts == redis.counts  # merging changed no series


def test_a_histogram_family_takes_its_label_sets_by_name() -> None:
    h = LatencyHistogram()
    fam = as_family(Histograms("x_us", "test", [({"a": "1", "b": "2"}, h), ({"b": "4", "a": "3"}, h)]))
    assert {tuple(sorted(s.labels.items())) for s in fam.samples if s.name == "x_us_count"} == {
        (("a", "1"), ("b", "2")), (("a", "3"), ("b", "4"))}
    with pytest.raises(ValueError, match="label names"):
        as_family(Histograms("x_us", "test", [({"a": "1"}, h), ({"stage": "y"}, h)]))


def test_window_hist_covers_the_window_only() -> None:
    before = LatencyHistogram()
    before.observe(50_000)  # a slow tick before the window must not be the window's max
    after = before.copy()
    for us in (10, 20, 30):
        after.observe(us)
    window = window_hist(after, before)
    stats = stage_stats(window)
    assert stats["count"] == 3
    assert stats["max_us"] < 50
    assert stats["p50_us"] <= stats["p99_us"] <= stats["max_us"]


def test_queue_growth_is_a_trend_not_a_batch() -> None:
    flat = [(t * 0.5, 3000.0 if t % 2 else 0.0) for t in range(20)]  # a batch in flight now and then
    assert not growing(flat, 50_000)
    rising = [(t * 0.5, 5000.0 * t) for t in range(20)]
    assert queue_slope(rising) == pytest.approx(10_000)
    assert growing(rising, 50_000)
    assert not growing([], 1000)


def _step(rate: float, *, saturated: bool, p99: float) -> dict[str, Any]:
    return {"rate": rate, "status": "ran", "saturated": saturated,
            "latency": {"redis_e2e": {"count": 10, "p99_us": p99}}}


def test_peak_is_the_highest_clean_step_within_the_target() -> None:
    steps = [_step(1000, saturated=False, p99=900), _step(10_000, saturated=False, p99=1500),
             _step(50_000, saturated=False, p99=3000), _step(100_000, saturated=True, p99=1000),
             {"rate": 150_000, "status": "not run"}]
    peak = find_peak(steps, 2000)
    assert peak is not None and peak["rate"] == 10_000
    assert find_peak([_step(1000, saturated=True, p99=10)], 2000) is None


def _edge(t: float, *, sent: int, received: int, accepted: int, published: int, consumed: int,
          dropped: int = 0, queued: int = 0, reconnects: int = 0, cpu_s: float = 0.0) -> Edge:
    counters = {
        "market_frames_received_total": received, "market_ticks_accepted_total": accepted,
        "market_published_total": published, "market_ingress_len": queued, "broker_reconnect_total": reconnects,
        "market_writer_flushes_total": published // 100,
    }
    values = {(name, frozenset()): float(v) for name, v in counters.items()}
    values[("market_dropped_total", frozenset({("stage", "ingress")}))] = float(dropped)
    sim = {"stats": {"frames_sent": sent, "ticks_total": sent}}
    cpu: dict[str, float | None] = {"simulator": cpu_s, "ingestor": 2 * cpu_s, "bench": cpu_s, "machine": 5 * cpu_s,
                                    "redis-server": None}
    return Edge(t, Scrape(values, {}), sim, cpu, consumed)


def test_redis_commands_are_the_window_s_calls_and_time() -> None:
    before = {"evalsha": (100, 50_000), "xreadgroup": (10, 1_000), "xack": (5, 5)}
    after = {"evalsha": (300, 130_000), "xreadgroup": (410, 61_000), "xack": (5, 5)}
    got = redis_commands(before, after, 2.0)
    assert got == {
        "evalsha": {"calls_per_s": 100.0, "us_per_call": 400.0, "busy_share": 0.04},
        "xreadgroup": {"calls_per_s": 200.0, "us_per_call": 150.0, "busy_share": 0.03},
    }  # xack not called in the window: left out
    # rounded: calls a second and µs a call to 0.1, the busy share to 0.001; a call that took no whole µs counts
    odd = redis_commands({"evalsha": (0, 0), "xack": (0, 0)}, {"evalsha": (7, 1_000), "xack": (3, 0)}, 3.0)
    assert odd == {"evalsha": {"calls_per_s": 2.3, "us_per_call": 142.9, "busy_share": 0.0},
                   "xack": {"calls_per_s": 1.0, "us_per_call": 0.0, "busy_share": 0.0}}
    # a reading missing, or counters that went back (CONFIG RESETSTAT between the edges): nothing claimed
    assert redis_commands(None, after, 2.0) == {} and redis_commands(before, None, 2.0) == {}
    assert redis_commands(after, before, 2.0) == {}
    assert redis_commands({"evalsha": (10, 500)}, {"evalsha": (20, 100)}, 2.0) == {}  # calls up, µs down: a reset
    assert redis_commands(before, after, 0.0) == {}


def test_the_consumer_s_time_inside_redis_is_explained_when_measured() -> None:
    from ops.bench.render import _consumer_inside_redis

    commands = {"xreadgroup": {"calls_per_s": 400.0, "us_per_call": 150.0, "busy_share": 0.06},
                "xack": {"calls_per_s": 7000.0, "us_per_call": 1.3, "busy_share": 0.009}}
    line = _consumer_inside_redis(commands)
    assert "400 XREADGROUP a second" in line and "150 µs on average" in line
    assert "7.0k XACK a second (1.3 µs on average" in line
    assert "busy with them 7% of the window" in line
    # no XACK in the window (nothing read): the reads alone, their share alone
    alone = _consumer_inside_redis({"xreadgroup": commands["xreadgroup"]})
    assert "XACK" not in alone and "busy with them 6% of the window" in alone
    assert _consumer_inside_redis({"evalsha": {"calls_per_s": 1.0, "us_per_call": 1.0, "busy_share": 0.0}}) == ""


def test_a_clean_window_adds_up_and_is_not_saturated() -> None:
    a = _edge(100.0, sent=0, received=0, accepted=0, published=0, consumed=0)
    b = _edge(110.0, sent=10_000, received=10_000, accepted=10_000, published=10_000, consumed=10_000, cpu_s=1.0)
    samples = [[100.0 + t, 0.0, 0.0, 0.0, 0.0] for t in range(10)]
    e2e = LatencyHistogram()
    e2e.observe(800)
    step = analyse_step(1000, a, b, e2e, samples)
    assert not step["saturated"] and step["saturation"] == []
    assert step["throughput"]["published_per_s"] == 1000.0 and step["throughput"]["delivered_ratio"] == 1.0
    assert step["tallies"]["adds_up"] and step["tallies"]["unaccounted"] == 0
    assert step["latency"]["redis_e2e"]["count"] == 1 and step["latency"]["ingest"]["count"] == 0
    assert step["writer"] == {"flushes_per_s": 10.0, "ticks_per_flush": 100.0}
    assert step["cpu"]["ingestor"] == 0.2 and step["cpu"]["redis-server"] is None
    assert step["cpu"]["others"] == pytest.approx(0.1)  # machine 0.5 - ours 0.4


def test_drops_reconnects_and_lag_saturate_a_window() -> None:
    a = _edge(0.0, sent=0, received=0, accepted=0, published=0, consumed=0)
    b = _edge(10.0, sent=500_000, received=500_000, accepted=500_000, published=400_000, consumed=100_000,
              dropped=50, reconnects=1)
    lag = [[float(t), 0.0, 0.0, 0.0, 30_000.0 * t] for t in range(10)]
    step = analyse_step(50_000, a, b, LatencyHistogram(), lag)
    reasons = "; ".join(step["saturation"])
    assert step["saturated"]
    assert "50 ticks dropped at the ingress" in reasons
    assert "the venue connection was lost 1 times" in reasons
    assert "the consumer fell behind (300000 ticks unread at the end)" in reasons
    # Without a consumer (the ingest-only phase), its lag is no sign of saturation.
    alone = analyse_step(50_000, a, b, LatencyHistogram(), lag, consuming=False)
    assert not any("consumer" in r for r in alone["saturation"])


def test_final_tally_is_exact_after_a_drain() -> None:
    e = _edge(0.0, sent=1_003, received=1_003, accepted=1_000, published=990, consumed=990, dropped=10)
    tally = final_tally(True, e, consumer_duplicates=0, consumer_gaps=0, consumer_trimmed=0, consumer_error=None)
    assert tally["sent_equals_received"] and tally["accepted_equals_outcomes"] and tally["consumed_equals_published"]
    assert tally["other_frames"] == tally["replies"] == 3
    assert tally["published_not_accepted"] == 0
    short = final_tally(False, _edge(0.0, sent=5, received=4, accepted=4, published=3, consumed=2),
                        consumer_duplicates=1, consumer_gaps=2, consumer_trimmed=3, consumer_error="boom")
    assert not short["sent_equals_received"] and not short["accepted_equals_outcomes"]
    assert not short["consumed_equals_published"]
    assert (short["consumer_duplicates"], short["consumer_gaps"], short["consumer_trimmed"],
            short["consumer_error"]) == (1, 2, 3, "boom")


def test_peak_ingest_is_the_highest_step_before_the_first_saturated_one() -> None:
    ok = {**_step(60_000, saturated=False, p99=0), "throughput": {"published_per_s": 59_871.26}, "saturation": []}
    bad = {**_step(100_000, saturated=True, p99=0), "throughput": {"published_per_s": 80_000.0},
           "saturation": ["the ingress queue grew (900/s)"]}
    later = {"rate": 150_000, "status": "not run", "reason": "a lower rate saturated"}
    peak = summarize_peak([60_000, 100_000, 150_000], [ok, bad, later])
    assert peak["peak_rate"] == 60_000 and peak["peak_ingest_per_s"] == 59_871.3
    assert peak["limit_rate"] == 100_000 and peak["limit"] == ["the ingress queue grew (900/s)"]
    assert peak["steps"] == [ok, bad, later] and peak["subscribers"] == 0 and peak["consumer"] is False
    none = summarize_peak([100_000], [bad])
    assert none["peak_rate"] is None and none["peak_ingest_per_s"] == 0.0


def test_progress_bar_is_one_line() -> None:
    out = io.StringIO()
    show = progress_bar(out, width=10)
    show("step 1/2 500/s", 0.5)
    show("done", 1.0)
    show("after done", 1.0)
    text = out.getvalue()
    assert "\r[#####.....] step 1/2 500/s 0s" in text
    assert text.endswith("\n") and text.count("\n") == 1
    assert "after done" not in text


async def test_unreachable_redis_is_one_clear_error(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(TransientError, match="Redis unreachable"):
        await run_bench(quick=True, out_dir=tmp_path, redis_url=url, schedule=[500], step_s=1)


async def test_port_in_use_and_bad_arguments(tmp_path: Path, redis_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} .* in use"):
            await run_bench(quick=True, out_dir=tmp_path, redis_url=redis_url, schedule=[500], step_s=1,
                            sim_port=port)
    with pytest.raises(ConfigError, match="schedule"):
        await run_bench(quick=True, out_dir=tmp_path, redis_url=redis_url, schedule=[0.0])
    with pytest.raises(ConfigError, match="step_s"):
        await run_bench(quick=True, out_dir=tmp_path, redis_url=redis_url, schedule=[500], step_s=0.1)
    with pytest.raises(ConfigError, match="Redis URL"):
        await run_bench(quick=True, out_dir=tmp_path, redis_url="http://nowhere", schedule=[500])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write the report"):
        await run_bench(quick=True, out_dir=blocker / "out", redis_url=redis_url, schedule=[500])


@pytest.mark.slow
async def test_tiny_run_writes_the_report_and_the_counts_add_up(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, float]] = []
    report = await run_bench(
        quick=True, out_dir=tmp_path, redis_url=redis_url, seed=3, schedule=[500, 2000], step_s=3,
        progress=lambda label, fraction: seen.append((label, fraction)), writer_ticks=2000, hotpath_duration=1.0,
        ingest_rounds=1, ingest_ticks=5000, peak_schedule=[3000, 6000],
    )
    # Files.
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(report["summary"]))
    md = (tmp_path / "report.md").read_text()
    assert "Latency instrumentation, what it costs" in md
    for heading in ("## Machine", "## Reproduce", "## Summary against the targets", "## Steps", "## Tallies",
                    "## Where the time goes"):
        assert heading in md
    assert "shared" in md
    assert "XREADGROUP a second over every stream" in md  # the explained step says what the consumer's reads cost
    assert "Inside Redis one script call took" in md  # and what the writer's script calls cost
    if HAVE_MATPLOTLIB:
        assert report["plots"] == ["latency.png", "queue.png", "throughput_cpu.png"]
        for name in report["plots"]:
            assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert seen and seen[-1] == ("done", 1.0)
    assert all(0.0 <= f <= 1.0 for _, f in seen)

    # Structure.
    for key in ("machine", "versions", "configuration", "git", "seed", "started", "ended", "steps", "summary",
                "tallies", "writer_baseline", "hotpath_standalone", "writer_flush", "command"):
        assert key in report, key
    assert report["seed"] == 3
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu_model"]
    assert report["versions"]["redis-server"] and report["versions"]["orjson"] and report["versions"]["websockets"]
    summary = report["summary"]
    for key in ("hotpath_p99_us", "redis_e2e_p99_us", "peak_ingest_per_s", "baseline_ratio",
                "hotpath_standalone_p99_us"):
        assert key in summary, key
    assert summary["baseline_ratio"] > 0
    assert summary["hotpath_p99_us"] > 0 and summary["redis_e2e_p99_us"] > 0
    assert set(summary["targets"]) == {"hotpath_p99_us", "redis_e2e_p99_us", "no_queue_growth", "peak_ingest_per_s",
                                       "instrumentation_cost_pct"}
    # The ingest-only phase: the ingestor alone (no subscriber, no consumer); its figure is the peak ingest.
    pi = report["peak_ingest"]
    assert [st["rate"] for st in pi["steps"]] == [3000, 6000]
    for st in pi["steps"]:
        assert st["status"] == "ran" and not st["saturated"], st["saturation"]
        assert st["tallies"]["adds_up"]
        assert st["latency"]["hotpath"]["count"] == 0  # nobody on the hot path
    assert pi["peak_rate"] == 6000
    assert summary["peak_ingest_per_s"] == pi["peak_ingest_per_s"] == pi["steps"][1]["throughput"]["published_per_s"]
    assert "## Peak ingest: one ingestor, nothing else" in (tmp_path / "report.md").read_text()
    ins = report["instrumentation"]
    assert ins["ticks"] == 5000 and ins["rounds"] == 1
    assert summary["instrumentation_cost_pct"] == ins["summary"]["cost_pct"]
    assert summary["targets"]["instrumentation_cost_pct"]["met"] == (ins["summary"]["cost_pct"] <= 5.0)
    assert report["hotpath_standalone"]["accounted"] is True

    # Every step, and the counts at its edges.
    assert [s["rate"] for s in report["steps"]] == [500, 2000]
    for step in report["steps"]:
        assert step["status"] == "ran"
        lat = step["latency"]
        for stage in ("ingest", "hotpath", "redis", "redis_e2e"):
            assert lat[stage]["count"] > 0, stage
            assert lat[stage]["p50_us"] <= lat[stage]["p99_us"] <= lat[stage]["p999_us"] <= lat[stage]["max_us"]
        t = step["tallies"]
        assert t["adds_up"], t
        # Redis's own time in the writer's script and the consumer's reads (other clients' calls may add to it)
        cmds = step["redis_commands"]
        # every flush of the writer is one script call (other clients' calls may add to Redis's count)
        assert cmds["evalsha"]["calls_per_s"] >= 0.9 * step["writer"]["flushes_per_s"] > 0, (cmds, step["writer"])
        assert cmds["xreadgroup"]["calls_per_s"] > 0 and 0 < cmds["xreadgroup"]["busy_share"] < 1, cmds
        assert t["sent"] > 0.5 * step["rate"] * step["window_s"]
        assert abs(t["sent"] - t["received"]) <= t["tolerance"]
        assert abs(t["accepted"] - t["published"] - t["dropped"] - t["queued_change"]) <= t["tolerance"]
        assert abs(t["consumed"] - t["published"]) <= t["tolerance"]
        # Every tick reaches all 16 co-located subscribers.
        # Each of the 16 subscribers has one chunk in HOT_SAMPLE_EVERY timed, every tick of it counted.
        delivered = SUBSCRIBERS * t["accepted"]
        assert delivered / (2 * HOT_SAMPLE_EVERY) < lat["hotpath"]["count"] < 2 * delivered / HOT_SAMPLE_EVERY
        # The per-tick stages time one tick in DEFAULT_SAMPLE_EVERY, by position.
        assert abs(lat["ingest"]["count"] - t["accepted"] / DEFAULT_SAMPLE_EVERY) <= t["tolerance"]
        assert step["queue"]["samples"] and len(step["queue"]["samples"][0]) == 5
        assert set(step["cpu"]) >= {"simulator", "ingestor", "bench", "machine"}
        assert step["cpu"]["ingestor"] is not None and step["cpu"]["ingestor"] > 0

    # The whole run, after the final drain: exact.
    f = report["tallies"]
    assert f["drained"]
    assert f["sent"] == f["received"] > 0
    assert f["accepted"] == f["published"] + f["dropped"] + f["queued"]
    assert f["queued"] == 0 and f["dropped"] == 0
    assert f["consumed"] == f["published"]
    assert f["reconnects"] == 0 and f["subscribers"] == SUBSCRIBERS
    assert f["received"] - f["accepted"] == f["other_frames"] >= 0

    # Nothing left behind in Redis.
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(f"{report['configuration']['prefix']}:*", count=1000)) == []
        assert list(client.scan_iter(f"{report['configuration']['peak_prefix']}:*", count=1000)) == []
    finally:
        client.close()

    # Without matplotlib the report is still written, and says why there are no plots.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    bare = tmp_path / "bare"
    again = copy.deepcopy(report)
    write_report(again, bare)
    assert again["plots"] == [] and "matplotlib" in again["plots_note"]
    assert "No plots: matplotlib is not installed" in (bare / "report.md").read_text()
    assert not list(bare.glob("*.png"))
    assert render_markdown(again) == (bare / "report.md").read_text()
