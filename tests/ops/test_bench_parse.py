"""``market bench parse``: both modes on the same frames, alternating, the same verdicts out of each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def test_both_modes_share_every_round_batch_by_batch() -> None:
    result = run_parse_bench(frames=3000, rounds=4, batch=50)
    assert result["frames"] == 3000
    assert result["refused"] == 3000 // REFUSED_EVERY
    assert result["first"] == ["remembered", "checks_alone", "remembered", "checks_alone"]
    assert set(result["modes"]) == set(MODES)
    for m in result["modes"].values():
        assert 0 < m["us_per_frame_p50"] <= m["us_per_frame_p99"]


def test_each_mode_parses_its_batches_with_its_own_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half the batches of a round each, the price and symbol checks the mode's own."""
    calls = {"price": 0, "pos": 0}

    def counting(name: str, check: Callable[[Any], str]) -> Callable[[Any], str]:
        def wrapped(value: Any) -> str:
            calls[name] += 1
            return check(value)
        return wrapped

    monkeypatch.setattr(binance, "_price", counting("price", fields.price))
    monkeypatch.setattr("ops.bench.parse.pos", counting("pos", fields.pos))
    run_parse_bench(frames=1280, rounds=2, batch=64)
    # every frame has one price at least (a book ticker two); 3 passes (the uncounted first one too), 10 of 20
    # batches to each mode in each
    assert calls["price"] > 0 and calls["pos"] > 0
    assert 0.8 < calls["price"] / calls["pos"] < 1.25


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
        # refused by a price, quantity or symbol check: the checks the two modes compare
        assert "decimal" in str(refused.value) or "symbol" in str(refused.value), str(refused.value)
    assert kinds == {"bad_value", "bad_number", "malformed"}


def test_the_run_fails_when_the_modes_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    """A remembering check that let a refused value through would make the remembered rounds differ."""
    def lax(value: object) -> str:
        return value if isinstance(value, str) else fields.pos(value)

    monkeypatch.setattr(binance, "_price", lax)
    with pytest.raises(MarketError, match="different ticks or refusals"):
        run_parse_bench(frames=500, rounds=2)


def test_the_bench_leaves_the_parser_remembering() -> None:
    kept = (binance._price, binance._symbol)
    run_parse_bench(frames=500, rounds=2)
    assert (binance._price, binance._symbol) == kept == (fields.price, fields.symbol)


def test_the_checks_come_back_after_an_error_in_the_baseline() -> None:
    with pytest.raises(RuntimeError), MODES["checks_alone"]():
        assert (binance._price, binance._symbol) == (fields.pos, fields.check_symbol)
        raise RuntimeError("inside")
    assert (binance._price, binance._symbol) == (fields.price, fields.symbol)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError):
        run_parse_bench(frames=100, batch=64)  # one batch: nothing to alternate
    with pytest.raises(ConfigError):
        run_parse_bench(frames=1000, rounds=1)
    with pytest.raises(ConfigError):
        run_parse_bench(frames=1000, rounds=3)  # a pass without its pair
    with pytest.raises(ConfigError):
        run_parse_bench(frames=1000, batch=0)


def test_the_command_prints_one_json_line_and_refuses_bad_sizes() -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["bench", "parse", "--frames", "2000", "--rounds", "2", "--json"])
    assert out.exit_code == 0, out.output
    line = out.stdout.strip()
    assert "\n" not in line
    assert orjson.loads(line)["frames"] == 2000
    for args in (["--rounds", "1"], ["--rounds", "3"], ["--frames", "100"]):
        bad = runner.invoke(app, ["bench", "parse", *args])
        assert bad.exit_code == 2, args
