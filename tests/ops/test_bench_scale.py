"""``market bench scale`` and ``market bench writer`` on a cluster: the arithmetic (pure), then short real runs
whose output must add up (every cell present, Redis holding exactly the ticks the simulator sent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from ops.bench.profiles import CHANNELS, SYMBOLS
from ops.bench.scale import ScaleSettings, run_scale
from ops.bench.scale_report import (
    ScaleEdge,
    add_ratios,
    analyse_window,
    others_cores,
    render_scale_markdown,
    split_symbols,
    stream_keys,
    summarize_cell,
)


def market(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ), check=False)


# -- pure ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [1, 2, 3, 7, 20])
def test_split_symbols_deals_disjoint_sets_covering_every_symbol(parts: int) -> None:
    sets = split_symbols(SYMBOLS, parts)
    assert len(sets) == parts
    flat = [s for one in sets for s in one]
    assert sorted(flat) == sorted(SYMBOLS)
    assert len(set(flat)) == len(flat)
    assert max(map(len, sets)) - min(map(len, sets)) <= 1


def test_split_symbols_refuses_more_parts_than_symbols() -> None:
    with pytest.raises(ValueError, match="cannot split 2 symbols between 3"):
        split_symbols(("A", "B"), 3)


def test_stream_keys_are_the_ingestors_keys() -> None:
    assert stream_keys("p", ["BTCUSDT"], CHANNELS) == [f"p:binance:BTCUSDT:{c}" for c in CHANNELS]


def _edge(t: float, stored: tuple[int, ...], sent: int, generated: int, reconnects: tuple[int, ...] = (0, 0),
          cpu: float = 0.0) -> ScaleEdge:
    return ScaleEdge(t=t, stored=stored, received=(sent // 2, sent - sent // 2), reconnects=reconnects, sent=sent,
                     generated=generated, streamed=generated,
                     cpu={"simulator": cpu, "ingestor-1": cpu / 2, "ingestor-2": cpu / 4, "redis": None},
                     machine=cpu * 2)


def test_analyse_window_rates_cpu_and_a_clean_window() -> None:
    a = _edge(10.0, (100, 200), 300, 300, cpu=1.0)
    b = _edge(12.0, (10_100, 10_200), 20_300, 20_300, cpu=2.5)
    w = analyse_window(10_000, a, b)
    assert w["stored_per_s"] == 10_000
    assert w["stored_per_s_by_ingestor"] == [5_000, 5_000]
    assert w["sent_per_s"] == 10_000 and w["generated_per_s"] == 10_000
    assert w["cpu_s"] == {"simulator": 1.5, "ingestor-1": 0.75, "ingestor-2": 0.38, "redis": None}
    assert w["cpu_share"] == {"simulator": 0.75, "ingestor-1": 0.375, "ingestor-2": 0.19, "redis": None}
    # the simulator's per tick of all (20 000), each ingestor's per tick of its own (10 000)
    assert w["cpu_us_per_tick"] == {"simulator": 75.0, "ingestor-1": 75.0, "ingestor-2": 38.0, "redis": None}
    assert w["machine_busy_cores"] == 1.5
    assert w["others_cores"] is None  # redis's CPU unknown: the rest cannot be told
    assert others_cores(3.0, {"a": 1.0, "b": 0.5}, 2.0) == 0.75
    assert others_cores(1.0, {"a": 1.5}, 1.0) == 0.0
    assert others_cores(None, {"a": 1.0}, 1.0) is None
    assert not w["saturated"] and w["reasons"] == []


def test_analyse_window_names_each_saturation() -> None:
    a = _edge(0.0, (0, 0), 0, 0)
    starved = analyse_window(10_000, a, _edge(1.0, (4_000, 4_000), 8_000, 8_000))
    assert starved["saturated"] and "starved" in starved["reasons"][0]
    piling = analyse_window(10_000, a, _edge(1.0, (3_000, 3_000), 10_000, 10_000))
    assert piling["reasons"] == ["the backlog (sent, not stored) grew by 4000 ticks"]
    lost = analyse_window(10_000, a, _edge(1.0, (5_000, 5_000), 10_000, 10_000, reconnects=(1, 0)))
    assert lost["reasons"] == ["the venue connection was lost 1 time(s)"]
    with pytest.raises(ValueError):
        analyse_window(1.0, a, a)


def _step(rate: float, stored: int, saturated: bool) -> dict[str, Any]:
    return {"rate": rate, "stored_per_s": stored, "saturated": saturated, "cpu_share": {"simulator": 0.5},
            "cpu_us_per_tick": {"simulator": 50.0}, "machine_busy_cores": 1.0}


def test_summarize_cell_best_sustained_and_tally() -> None:
    steps = [_step(10_000, 9_990, False), _step(20_000, 19_900, False), _step(40_000, 25_000, True)]
    cell = summarize_cell(3, 2, steps, sent=100, stored=100, streamed=100, drained=True)
    assert cell["stored_per_s"] == 25_000 and cell["best"] is steps[2]
    assert cell["sustained_rate"] == 20_000 and cell["sustained_stored_per_s"] == 19_900
    assert cell["adds_up"]
    assert not summarize_cell(1, 1, steps, sent=100, stored=99, streamed=100, drained=False)["adds_up"]
    assert not summarize_cell(1, 1, steps, sent=100, stored=100, streamed=101, drained=True)["adds_up"]
    # after a lost connection: nothing sent missing, nothing stored that was never generated, the rest repaired
    lost = [{**steps[-1], "reconnects": 2}]
    cell = summarize_cell(1, 1, lost, sent=100, stored=104, streamed=110, drained=True)
    assert cell["adds_up"] and cell["reconnects"] == 2 and cell["repaired"] == 4
    assert "2 reconnects, 4 more fetched over REST" in render_scale_markdown([{**cell, "ratio": 1.0}])
    assert not summarize_cell(1, 1, lost, sent=100, stored=99, streamed=110, drained=True)["adds_up"]
    assert not summarize_cell(1, 1, lost, sent=100, stored=111, streamed=110, drained=True)["adds_up"]
    none = summarize_cell(1, 1, [_step(10_000, 5_000, True)], sent=1, stored=1, streamed=1, drained=True)
    assert none["sustained_rate"] is None and none["stored_per_s"] == 5_000


def test_add_ratios_and_the_table_name_every_cell() -> None:
    cells = [summarize_cell(m, i, [_step(10_000, 10_000 * m * i, False)], sent=5, stored=5, streamed=5,
                            drained=True) for m in (1, 3) for i in (1, 2)]
    add_ratios(cells)
    assert [c["ratio"] for c in cells] == [1.0, 2.0, 3.0, 6.0]
    table = render_scale_markdown(cells)
    for m, i, ratio in ((1, 1, "x1.00"), (1, 2, "x2.00"), (3, 1, "x3.00"), (3, 2, "x6.00")):
        assert f"| {m} | {i} | {10 * m * i:.1f}k | {ratio} |" in table
    assert "yes (5 of 5)" in table
    assert table.count("| 50.0 |") == 4  # the µs per tick table, a row a cell
    assert add_ratios([summarize_cell(3, 1, [], sent=0, stored=0, streamed=0, drained=True)])[0]["ratio"] is None


# -- real runs -----------------------------------------------------------------------------------------------------
def _check_cell(cell: dict[str, Any]) -> None:
    assert cell["stored"] > 0, cell
    assert cell["drained"] and cell["stored"] == cell["sent"] == cell["streamed"], cell
    assert cell["adds_up"]
    best = cell["best"]
    assert best["stored_per_s"] > 0
    assert len(best["stored_per_s_by_ingestor"]) == cell["ingestors"]
    assert all(r > 0 for r in best["stored_per_s_by_ingestor"])
    names = set(best["cpu_s"])
    assert {"simulator", *(f"ingestor-{i}" for i in range(1, cell["ingestors"] + 1))} <= names
    redis = {n for n in names if n.startswith("redis")}
    assert len(redis) == (1 if cell["masters"] == 1 else 2 * cell["masters"])
    assert all(best["cpu_s"][n] is not None and best["cpu_s"][n] >= 0 for n in names)


@pytest.mark.slow
async def test_every_cell_runs_and_redis_holds_what_the_simulator_sent() -> None:
    settings = ScaleSettings(masters=(1, 3), ingestors=(1, 2), rates=(2_000.0,), warmup_s=0.5, window_s=1.0,
                             drain_s=30.0)
    lines: list[str] = []
    result = await run_scale(settings, lines.append)
    cells = result["cells"]
    assert [(c["masters"], c["ingestors"]) for c in cells] == [(1, 1), (1, 2), (3, 1), (3, 2)]
    for cell in cells:
        _check_cell(cell)
    assert cells[0]["ratio"] == 1.0 and all(c["ratio"] > 0 for c in cells)
    assert len(lines) == 4
    assert result["settings"]["masters"] == [1, 3] and result["machine"]["cores"]


def test_the_command_prints_json_that_adds_up(tmp_path: Any) -> None:
    out = tmp_path / "scale.json"
    proc = market("bench", "scale", "--masters", "3", "--ingestors", "2", "--rates", "2000", "--duration", "1",
                  "--warmup", "0.5", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    [cell] = printed["cells"]
    assert (cell["masters"], cell["ingestors"], cell["ratio"]) == (3, 2, None)
    _check_cell(cell)
    assert "3 master(s), 2 ingestor(s), 2000/s offered" in proc.stderr


def test_the_command_prints_the_markdown_table() -> None:
    proc = market("bench", "scale", "--masters", "1", "--ingestors", "1", "--rates", "2000", "--duration", "1",
                  "--warmup", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| masters | ingestors | stored ticks/s")
    assert "| 1 | 1 | " in proc.stdout and "| x1.00 |" in proc.stdout and "yes (" in proc.stdout


def test_the_writer_bench_on_a_cluster_of_its_own() -> None:
    proc = market("bench", "writer", "--masters", "3", "--ticks", "6000", "--streams", "30", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["cluster"], result["masters"], result["replicas"]) == (True, 3, 1)
    assert result["stored"] == 6000 and result["replayed_batch_duplicates"] == 6000
    assert result["ticks_per_s"] > 0 and result["baseline_ticks_per_s"] > 0


@pytest.mark.parametrize(("args", "needle"), [
    (("scale", "--masters", "0"), "--masters takes integers >= 1"),
    (("scale", "--ingestors", "a"), "--ingestors takes comma-separated integers"),
    (("scale", "--rates", "x"), "--rates takes comma-separated numbers"),
    (("scale", "--duration", "0"), "--duration and --drain must be positive"),
    (("writer", "--masters", "3", "--redis-url", "redis://127.0.0.1:1/0"), "not with --redis-url"),
    (("writer", "--redis-url", "redis+cluster://h"), "invalid Redis Cluster URL"),
])
def test_bad_options_are_one_line(args: tuple[str, ...], needle: str) -> None:
    proc = market("bench", *args, timeout=30)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("market: error: ") and needle in lines[0], proc.stderr
