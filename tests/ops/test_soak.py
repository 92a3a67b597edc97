"""`market soak`: bad input refused before anything starts, and the CI-sized run (every fault kind, 5 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from consumer_sdk.core.latency import LatencyHistogram
from ops.soak import _read_tasks, latency_fields, scrape_latency, simulator_history, simulator_limits
from ops.soak_plan import FAULT_KINDS, VENUE_PLANS, history_path, newest_id, venue_plan


def market(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--faults", "stall,earthquake"), "unknown fault 'earthquake'"),
        (("--faults", "stall=often"), "rate must look like 4/h"),
        (("--duration", "60"), "do not fit"),
        (("--duration", "-5"), "--duration must be positive"),
        (("--rate", "0"), "--rate must be above 0"),
        (("--channels", "trades"), "trades"),
        (("--venue", "kraken"), "unknown venue 'kraken'"),
        (("--venue", "binance_usdm", "--channels", "trade,agg_trade"), "'trade' is not available on binance_usdm"),
        (("--venue", "binance_coinm", "--symbols", "BTC-USDT"), "BTC-USDT"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], message: str, tmp_path: Path) -> None:
    proc = market("soak", "--out", str(tmp_path / "r"), *args, timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "r").exists(), "nothing starts on bad input"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_five_minutes_every_fault_kind_no_invariant_break(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    proc = market("soak", "--duration", "300", "--rate", "400", "--faults", "all", "--seed", "3", "--out", str(out),
                  timeout=840)
    report = json.loads((out / "report.json").read_text())
    assert report["final"] and not report["stopped_early"]
    assert report["failures"] == [], report["failures"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["passed"]
    assert set(report["fault_kinds_injected"]) == set(FAULT_KINDS), report["faults_skipped"]
    assert report["faults_skipped"] == []
    assert all(s["recovered"] == s["injected"] for s in report["recovery"].values()), report["recovery"]
    streams = report["streams"]
    assert len(streams) == 4 and all(s["breaks"] == 0 and s["stored"] > 1000 for s in streams.values())
    assert all(s["consumer_missing"] == 0 for s in streams.values())
    assert all(s["venue_missing"] == 0 and s["venue_newest"] is not None for s in streams.values()), streams
    assert report["venue"] == "binance" and report["checked_channels"] == ["trade", "agg_trade"]
    assert report["faults_not_applicable"] == {} and report["extra_streams"] == {}
    kills = report["restarts"]
    assert sum(p["scheduled_kills"] for p in kills.values()) >= 2
    assert all(p["unexpected"] == [] for p in kills.values())
    assert (out / "report.md").read_text().startswith("# Soak report")
    sampled = {k for row in report["samples"] for k in row}
    for name in ("simulator", "ingestor-0", "ingestor-1", "consumer-0", "consumer-1"):
        assert {f"{name}.{r}" for r in ("rss_mb", "threads", "fds", "tasks")} <= sampled, name
        assert f"{name}.tasks" in report["growth"], name
    for name in ("ingestor-0", "ingestor-1"):
        assert {f"{name}.{stage}_p99_us" for stage in ("ingest", "redis", "hotpath")} <= sampled, name


# -- the sampler's pure parts ----------------------------------------------------------------------------------
def _page(**stages: LatencyHistogram) -> str:
    """A metrics page as the ingestor serves it, with the stages given."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import HistogramMetricFamily
    from prometheus_client.registry import Collector

    names = {"ingest": ("market_ingest_latency_us", {"venue": "binance"}),
             "redis": ("market_fanout_latency_us", {"stage": "redis"}),
             "hotpath": ("market_e2e_latency_us", {"path": "hotpath"})}

    class Page(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            for stage, hist in stages.items():
                metric, labels = names[stage]
                fam = HistogramMetricFamily(metric, "x", labels=list(labels))
                bounds = ["+Inf" if b == float("inf") else str(b) for b in hist.upper_bounds()]
                fam.add_metric(list(labels.values()), list(zip(bounds, hist.cumulative(), strict=True)),
                               float(hist.sum_us))
                yield fam
            other = HistogramMetricFamily("market_fanout_latency_us", "x", labels=["stage"])  # another label: skipped
            yield other

    reg = CollectorRegistry()
    reg.register(Page())
    return generate_latest(reg).decode()


def _hist(*values: int) -> LatencyHistogram:
    h = LatencyHistogram()
    for v in values:
        h.observe(v)
    return h


def test_latency_is_read_per_stage_and_taken_over_the_interval() -> None:
    first = scrape_latency(_page(ingest=_hist(*[100] * 99, 5000), redis=_hist(*[1000] * 100)))
    assert set(first) == {"ingest", "redis"}
    assert first["ingest"].count == 100 and first["redis"].count == 100
    fields = latency_fields("ingestor-0", first, {})
    assert fields["ingestor-0.ingest_p50_us"] <= 127 and fields["ingestor-0.ingest_p99_us"] <= 127
    assert 1000 <= fields["ingestor-0.redis_p99_us"] <= 1279
    # the next interval: only what was observed after the first page counts
    later = _hist(*[100] * 99, 5000, *[9000] * 100)
    second = scrape_latency(_page(ingest=later, redis=_hist(*[1000] * 100)))
    fields = latency_fields("ingestor-0", second, first)
    assert fields["ingestor-0.ingest_p50_us"] >= 9000, "the earlier fast ticks are not in this interval"
    assert "ingestor-0.redis_p50_us" not in fields, "a stage that observed nothing in the interval has no figure"
    # a restarted ingestor's counts go down: its whole histogram is the interval
    fields = latency_fields("ingestor-0", scrape_latency(_page(ingest=_hist(200, 200))), second)
    assert 200 <= fields["ingestor-0.ingest_p50_us"] < 256, "the whole restarted histogram, not the old one"


def test_task_counts_are_read_only_from_the_live_process(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    assert _read_tasks(path, 7) is None
    path.write_text(json.dumps({"tasks": 12, "pid": 7}))
    assert _read_tasks(path, 7) == 12
    assert _read_tasks(path, 8) is None, "written by an earlier process of that name"
    for bad in ("{", json.dumps([1]), json.dumps({"tasks": "12", "pid": 7})):
        path.write_text(bad)
        assert _read_tasks(path, 7) is None


def test_the_venue_keeps_ten_minutes_of_the_rate_and_at_least_100k_rows() -> None:
    assert simulator_history(400, 2) == 120_000
    assert simulator_history(100, 2) == 100_000
    assert simulator_history(10_000, 4) == 1_500_000


# -- each venue: its simulator profile, its ingestor settings, its REST history ------------------------------------
@pytest.mark.parametrize("venue", list(VENUE_PLANS))
def test_each_venues_defaults_are_what_its_ingestor_and_simulator_take(venue: str) -> None:
    from ingestor.config import load_settings
    from ops.simulator import SimulatorConfig

    p = venue_plan(venue)
    settings = load_settings({"venue": venue, "symbols": ",".join(p.symbols), "channels": ",".join(p.channels)}, {})
    assert (tuple(settings.symbols), tuple(settings.channels)) == (p.symbols, p.channels)
    config = SimulatorConfig(venue=venue, symbols=p.symbols, **simulator_limits(venue))
    assert config.venue == venue


def test_spot_keeps_the_simulators_own_settings_and_the_others_take_their_venues_limits() -> None:
    assert simulator_limits("binance") == {}
    assert simulator_limits("binance_usdm")["rest_weight_limit"] == 2400
    assert simulator_limits("okx")["idle_timeout"] == 30.0
    assert all("symbols" not in simulator_limits(v) for v in VENUE_PLANS)


@pytest.mark.parametrize("venue", list(VENUE_PLANS))
async def test_the_newest_ids_are_read_from_each_venues_own_rest_history(venue: str) -> None:
    """Against the venue's simulator: the ping path answers, and the newest id of every checked stream is read from
    the venue's REST history and grows as the venue trades."""
    import asyncio
    import urllib.request

    from ops.simulator import SimulatorConfig
    from ops.simulator.okx import OkxSimulator
    from ops.simulator.server import Simulator

    p = venue_plan(venue)
    config = SimulatorConfig(venue=venue, port=0, symbols=p.symbols, rate=2000.0, id_base=0, depth=False,
                             **simulator_limits(venue))
    sim: Simulator | OkxSimulator = OkxSimulator(config) if venue == "okx" else Simulator(config)

    def get(path: str) -> object:
        with urllib.request.urlopen(sim.rest_url + path, timeout=5) as r:
            return json.loads(r.read())

    async with sim:
        await asyncio.to_thread(get, p.ping)
        for symbol in p.symbols:
            for channel in p.checked:
                seen: list[int] = []
                deadline = asyncio.get_running_loop().time() + 30
                while len(set(seen)) < 2:
                    assert asyncio.get_running_loop().time() < deadline, (venue, symbol, channel, seen)
                    newest = newest_id(p, channel, await asyncio.to_thread(get, history_path(p, symbol, channel)))
                    if newest is not None:
                        seen.append(newest)
                    await asyncio.sleep(0.05)
                assert seen == sorted(seen) and seen[0] >= 0, seen
