"""``market bench depth``: the figures of a window from its two edges (pure), and the command at a small size,
whose output must add up.  No timing is asserted (a busy machine is slow, not wrong)."""

from __future__ import annotations

import orjson
import pytest
import redis

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import LatencyHistogram
from ops.bench.depth import Edge, bench_symbols, window_figures
from ops.bench.scrape import Scrape
from ops.cli import main


def _hist(*values: int) -> LatencyHistogram:
    h = LatencyHistogram()
    for v in values:
        h.observe(v)
    return h


def _scrape(entries: dict[str, int], resyncs: dict[tuple[str, str], int], hist: LatencyHistogram) -> Scrape:
    values = {("market_book_entries_total", frozenset({("venue", "binance"), ("kind", k)})): float(n)
              for k, n in entries.items()}
    values |= {("market_book_resync_total", frozenset({("venue", "binance"), ("symbol", s), ("reason", r)})): float(n)
               for (s, r), n in resyncs.items()}
    return Scrape(values, {("market_fanout_latency_us", frozenset({("stage", "redis")})): hist})


def test_bench_symbols_are_distinct_valid_names() -> None:
    names = bench_symbols(100)
    assert len(set(names)) == 100 and names[0] == "BTCUSDT" and names[-1] == "B080USDT"
    assert bench_symbols(3) == ("BTCUSDT", "ETHUSDT", "BNBUSDT")
    with pytest.raises(ConfigError, match="at least 1"):
        bench_symbols(0)


def test_a_window_is_the_difference_of_its_edges() -> None:
    early = _hist(100, 200)
    later = _hist(100, 200, 1000, 1000, 1000, 1000)
    first = Edge(10.0, {"trade": 100, "depth": 50}, _scrape({"diff": 40, "start": 10}, {}, early), 2.0, 100.0,
                 {"VmRSS": 50 * 1024, "VmHWM": 60 * 1024})
    last = Edge(14.0, {"trade": 500, "depth": 90}, _scrape({"diff": 76, "start": 10, "periodic": 4},
                                                           {("BTCUSDT", "gap"): 2, ("ETHUSDT", "gap"): 1}, later),
                3.0, 104.0, {"VmRSS": 70 * 1024, "VmHWM": 80 * 1024})
    fig = window_figures(first, last, {"trade": _hist(500, 600)}, cores=2)
    assert fig["wall_s"] == 4.0
    assert fig["stored"] == {"depth": 40, "trade": 400}
    assert fig["stored_per_s"] == {"depth": 10.0, "trade": 100.0}
    assert fig["book_entries"] == {"diff": 36, "start": 0, "resync": 0, "periodic": 4}
    assert fig["book_entries_total"] == 40
    assert fig["resyncs"] == {"gap": 3}
    assert fig["ingestor_cpu_s"] == 1.0 and fig["ingestor_cpu_share"] == 0.25
    assert fig["machine_busy_share"] == 0.5
    assert (fig["rss_mib"], fig["peak_rss_mib"]) == (70.0, 80.0)
    assert fig["frame_to_redis"]["count"] == 4  # the window's four observations, not the edge's two
    assert fig["frame_to_redis"]["p50_us"] >= 1000 > early.percentile(0.5)
    assert fig["frame_to_readback"]["trade"]["count"] == 2


def test_a_process_gone_gives_no_cpu_figure() -> None:
    empty = _scrape({}, {}, LatencyHistogram())
    fig = window_figures(Edge(0.0, {}, empty, None, None), Edge(1.0, {}, empty, 1.0, None), {}, cores=1)
    assert fig["ingestor_cpu_share"] is None and fig["machine_busy_share"] is None
    assert fig["stored"] == {} and fig["frame_to_redis"]["count"] == 0


@pytest.mark.timeout(180)
def test_the_command_at_a_small_size_adds_up(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["bench", "depth", "--symbols", "2", "--duration", "2", "--rate", "400", "--json"])
    assert done.value.code == 0
    result = orjson.loads(capsys.readouterr().out)
    assert (result["symbols"], result["duration_s"], result["rate"]) == (2, 2.0, 400.0)
    runs = result["runs"]
    assert list(runs) == ["trade", "trade+depth"]
    plain, books = runs["trade"], runs["trade+depth"]
    assert plain["channels"] == ["trade"] and books["channels"] == ["trade", "depth"]
    for run in (plain, books):
        assert run["wall_s"] >= 2.0
        for channel, n in run["stored"].items():
            assert run["stored_per_s"][channel] == pytest.approx(n / run["wall_s"], abs=0.1)
        assert sum(run["book_entries"].values()) == run["book_entries_total"]
        assert run["rss_mib"] > 0 and run["peak_rss_mib"] >= run["rss_mib"]
        assert run["stored"]["trade"] > 0 and run["frame_to_readback"]["trade"]["count"] > 0
        assert run["frame_to_redis"]["count"] > 0
    assert "depth" not in plain["stored"] and plain["book_entries_total"] == 0
    assert set(plain["frame_to_readback"]) == {"trade"}
    assert books["stored"]["depth"] > 0 and books["book_entries_total"] > 0
    assert books["frame_to_readback"]["depth"]["count"] > 0
    depth = result["depth"]
    assert depth["entries_per_s"] == books["stored_per_s"]["depth"]
    assert depth["rss_mib_added"] == pytest.approx(books["rss_mib"] - plain["rss_mib"], abs=0.1)
    assert depth["cpu_share_added"] == pytest.approx(books["ingestor_cpu_share"] - plain["ingestor_cpu_share"],
                                                     abs=1e-3)
    client = redis.Redis.from_url(redis_url)
    try:
        assert list(client.scan_iter(f"{result['prefix']}-*", count=1000)) == [], "the run's keys were deleted"
    finally:
        client.close()
