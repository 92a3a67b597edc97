"""`market soak`: bad input refused before anything starts, and the CI-sized run (every fault kind, 5 minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops.soak_plan import FAULT_KINDS


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
    kills = report["restarts"]
    assert sum(p["scheduled_kills"] for p in kills.values()) >= 2
    assert all(p["unexpected"] == [] for p in kills.values())
    assert (out / "report.md").read_text().startswith("# Soak report")
