"""The Prometheus files under ops/prometheus, checked by promtool: rule syntax, the rules' unit tests
(each alert fires on a failing stage's series and stays quiet on healthy ones), the configuration,
and every dashboard query as PromQL.  Skipped only where promtool is not installed (CI installs it:
``apt-get install -y prometheus``)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus); CI installs it"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_rules_are_valid() -> None:
    proc = promtool("check", "rules", "ops/prometheus/alerts.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_rules_unit_tests_pass() -> None:
    proc = promtool("test", "rules", "ops/prometheus/alerts_test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@needs_promtool
def test_prometheus_config_is_valid() -> None:
    proc = promtool("check", "config", "ops/prometheus/prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads((ROOT / "ops" / "grafana" / "dashboards" / "market.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    # Each query as a recording rule (JSON strings are YAML strings); Grafana's $instance becomes a regex.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        lines.append(f"      - record: dashboard:query_{i}")
        lines.append(f"        expr: {json.dumps(expr.replace('$instance', '.*'))}")
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(lines) + "\n")
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_unit_tested_both_ways() -> None:
    """Each alert has a case where it fires and one where it must not (read from the test file's text)."""
    alerts = set(re.findall(r"^\s*- alert: (\w+)\s*$", (PROM / "alerts.yml").read_text(), flags=re.M))
    tests = (PROM / "alerts_test.yml").read_text()
    fired = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:\n", tests))
    quiet = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts: \[\]", tests))
    assert len(alerts) >= 12
    assert alerts - fired == set(), f"never shown firing: {sorted(alerts - fired)}"
    assert alerts - quiet == set(), f"never shown quiet: {sorted(alerts - quiet)}"


def test_every_alert_names_its_stage_as_market_status_does() -> None:
    """The ``stage`` label is one of ``market status``'s stages, and the summary starts with it and the
    level its severity stands for (critical: FAIL, warning: WARN)."""
    import yaml

    from ops.status import STAGES

    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert rules
    for rule in rules:
        stage, severity = rule["labels"]["stage"], rule["labels"]["severity"]
        assert stage in STAGES, rule["alert"]
        level = {"critical": "FAIL", "warning": "WARN"}[severity]
        assert rule["annotations"]["summary"].startswith(f"{stage} {level}: "), rule["alert"]


def test_redis_refusals_are_alerted_apart_from_an_unreachable_redis() -> None:
    """Out of memory and other refusals (Redis reachable: market_redis_up stays 1) each have a rule."""
    import yaml

    rules = {r["alert"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert "market_redis_oom == 1" in rules["MarketRedisOutOfMemory"]["expr"]
    assert "maxmemory" in rules["MarketRedisOutOfMemory"]["annotations"]["description"]
    refused = rules["MarketRedisWritesRefused"]["expr"]
    assert "market_writer_retrying == 1" in refused and "market_redis_up == 1" in refused
    assert "market_writer_dead_lettered_total" in rules["MarketWriterDeadLetters"]["expr"]
    assert all(rules[name]["labels"]["stage"] == "redis" for name in
               ("MarketRedisDown", "MarketRedisOutOfMemory", "MarketRedisWritesRefused", "MarketWriterDeadLetters"))


def test_a_full_spill_log_is_alerted_on_the_redis_stage() -> None:
    """The spill log out of room (cap or disk) for a minute is its own critical alert, as ``market status``
    says it (redis FAIL: spill log full ...): the ingress policy now decides what becomes of new ticks."""
    import yaml

    rules = {r["alert"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    full = rules["MarketSpillFull"]
    assert full["expr"] == "market_spill_full == 1" and full["for"] == "1m"
    assert full["labels"] == {"severity": "critical", "stage": "redis"}
    assert full["annotations"]["summary"].startswith("redis FAIL: spill log full")
