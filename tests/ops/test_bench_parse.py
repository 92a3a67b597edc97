"""``market bench parse``: both modes on the same frames, alternating, the same verdicts out of each."""

from __future__ import annotations

import orjson
import pytest
from typer.testing import CliRunner

import ingestor.binance as binance
import ingestor.fields as fields
from consumer_sdk.core.errors import ConfigError, MarketError
from ingestor.venue import MalformedFrame
from ops.bench.ingest import make_frames
from ops.bench.parse import MODES, REFUSED_EVERY, run_parse_bench, with_refusals
from ops.cli import app


def test_both_modes_run_alternating_rounds_on_the_same_frames() -> None:
    result = run_parse_bench(frames=3000, rounds=3, batch=50)
    assert result["frames"] == 3000
    assert result["refused"] == 3000 // REFUSED_EVERY
    assert result["order"] == ["remembered", "checks_alone", "checks_alone", "remembered", "remembered", "checks_alone"]
    assert set(result["modes"]) == set(MODES)
    for m in result["modes"].values():
        assert m["frames_per_s_min"] <= m["frames_per_s"] <= m["frames_per_s_max"]
        assert 0 < m["us_per_frame_p50"] <= m["us_per_frame_p99"]
    ratio = result["modes"]["remembered"]["frames_per_s"] / result["modes"]["checks_alone"]["frames_per_s"]
    assert result["ratio"] == round(ratio, 2)


def test_every_frame_given_a_refused_value_is_refused_whatever_the_checks_remember() -> None:
    frames = make_frames(2000, 5)
    mixed = with_refusals(frames)
    changed = [i for i, (a, b) in enumerate(zip(frames, mixed, strict=True)) if a != b]
    assert changed == list(range(REFUSED_EVERY - 1, 2000, REFUSED_EVERY))
    for raw in frames:  # every valid value remembered first
        binance.parse_frame(raw, 1)
    kinds = set()
    for i in changed:
        with pytest.raises(MalformedFrame) as refused:
            binance.parse_frame(mixed[i], 1)
        kinds.add(refused.value.kind)
    assert kinds == {"bad_value", "bad_number", "malformed"}


def test_the_run_fails_when_the_modes_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    """A remembering check that let a refused value through would make the remembered rounds differ."""
    def lax(value: object) -> str:
        return value if isinstance(value, str) else fields.check_pos(value)

    monkeypatch.setattr(binance, "_pos", lax)
    with pytest.raises(MarketError, match="different ticks or refusals"):
        run_parse_bench(frames=500, rounds=1)


def test_the_bench_leaves_the_parser_remembering() -> None:
    kept = (binance._pos, binance._nonneg, binance._symbol)
    run_parse_bench(frames=500, rounds=1)  # its last round is the checks alone
    assert (binance._pos, binance._nonneg, binance._symbol) == kept == (fields.pos, fields.nonneg, fields.symbol)


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
