"""``market bench parse``: both modes on the same frames, alternating, the same ticks out of each."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

import ingestor.fields as fields
from consumer_sdk.core.errors import ConfigError
from ops.bench.parse import MODES, run_parse_bench
from ops.cli import app


def test_both_modes_run_alternating_rounds_on_the_same_frames_and_make_the_same_ticks() -> None:
    result = run_parse_bench(frames=3000, rounds=3, batch=50)
    assert result["frames"] == 3000 and result["same_ticks"] is True
    assert result["order"] == ["remembered", "checked", "checked", "remembered", "remembered", "checked"]
    assert set(result["modes"]) == set(MODES)
    for m in result["modes"].values():
        assert m["frames_per_s_min"] <= m["frames_per_s"] <= m["frames_per_s_max"]
        assert 0 < m["us_per_frame_p50"] <= m["us_per_frame_p99"]
    ratio = result["modes"]["remembered"]["frames_per_s"] / result["modes"]["checked"]["frames_per_s"]
    assert result["ratio"] == round(ratio, 2)


def test_the_bench_leaves_the_parser_remembering() -> None:
    run_parse_bench(frames=500, rounds=1)
    fields.forget_seen()
    fields.pos("7.25")
    assert "7.25" in fields._pos_seen


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError):
        run_parse_bench(frames=0)
    with pytest.raises(ConfigError):
        run_parse_bench(frames=10, rounds=0)
    with pytest.raises(ConfigError):
        run_parse_bench(frames=10, batch=0)


def test_the_command_prints_one_json_line_and_refuses_bad_sizes() -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["bench", "parse", "--frames", "2000", "--rounds", "1", "--json"])
    assert out.exit_code == 0, out.output
    line = out.stdout.strip()
    assert "\n" not in line
    assert orjson.loads(line)["frames"] == 2000
    bad = runner.invoke(app, ["bench", "parse", "--frames", "0"])
    assert bad.exit_code == 2
