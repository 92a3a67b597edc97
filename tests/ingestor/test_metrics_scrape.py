"""The Prometheus endpoint of a running ingestor, scraped over HTTP.

A simulator and an ingestor run (in this process) until ticks reach Redis; ``serve_metrics`` starts the
exporter on a free port; one real HTTP scrape is taken and the exporter is shut down again.  The text
must carry every metric name CONTRACT.md lists, every metric the alert rules and the dashboard query
(those an ingestor exports), and pass ``promtool check metrics`` when promtool is installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

import ingestor.metrics as metrics_module
from ingestor.config import IngestSettings
from ingestor.metrics import serve_metrics
from ingestor.service import Ingestor
from ops.redis_server import free_port
from ops.simulator import Simulator, SimulatorConfig

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_COUNTERS = (
    "market_published_total", "market_dropped_total", "broker_reconnect_total", "market_backpressure_events_total",
    "market_gap_total", "market_duplicate_total", "market_out_of_order_total",
)
CONTRACT_GAUGES = ("market_ingress_len", "market_subscriber_count", "market_queue_fill_ratio")
CONTRACT_HISTOGRAMS = ("market_ingest_latency_us", "market_fanout_latency_us", "market_e2e_latency_us")
#: metrics the rules and the dashboard use that an ingestor does not export: Prometheus' own ``up``,
#: and the lag consumer processes export
NOT_FROM_THE_INGESTOR = {"market_consumer_lag"}
#: what promtool's linter says about names CONTRACT.md fixes (they stay as the contract spells them)
CONTRACT_LINT = {
    ("market_e2e_latency_us", "metric names should not contain abbreviated units"),
    ("market_fanout_latency_us", "metric names should not contain abbreviated units"),
    ("market_ingest_latency_us", "metric names should not contain abbreviated units"),
    ("market_subscriber_count", 'non-histogram and non-summary metrics should not have "_count" suffix'),
}


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


async def _scrape(redis_url: str) -> dict[str, Any]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    servers: list[Any] = []
    real = metrics_module.start_exporter

    def recording(*args: Any, **kw: Any) -> Any:
        started = real(*args, **kw)
        servers.append(started)
        return started

    metrics_module.start_exporter = recording  # type: ignore[assignment]
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=500.0)) as sim:
            settings = IngestSettings(url=sim.ws_url, rest_url=sim.rest_url, symbols=("BTCUSDT", "ETHUSDT"),
                                      channels=("trade", "kline_1m"), prefix=prefix)
            ing = Ingestor(settings, redis=redis)
            port = free_port()
            serve_metrics(ing, "127.0.0.1", port)
            task = asyncio.create_task(ing.run())
            try:
                async with asyncio.timeout(20):
                    while ing.writer is None or ing.writer.stats().appended < 50:
                        if task.done():
                            task.result()
                        await asyncio.sleep(0.05)  # poll
                status, ctype, text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        metrics_module.start_exporter = real
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(5)
        keys = [k async for k in redis.scan_iter(f"{prefix}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
    return {"status": status, "content_type": ctype, "text": text, "servers": servers}


@pytest.fixture(scope="module")
def scrape(redis_url: str) -> dict[str, Any]:
    before = set(threading.enumerate())
    result = asyncio.run(_scrape(redis_url))
    assert len(result["servers"]) == 1, "serve_metrics started one exporter"
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()], "the exporter is shut down"
    return result


def sample_names(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_scrape_over_http_has_every_contract_name(scrape: dict[str, Any]) -> None:
    assert scrape["status"] == 200 and scrape["content_type"].startswith("text/plain")
    text = scrape["text"]
    names = sample_names(text)
    for name in CONTRACT_COUNTERS:
        assert name in names, f"{name} missing"
        assert f"# TYPE {name} counter" in text or f"# TYPE {name.removesuffix('_total')} counter" in text
    for name in CONTRACT_GAUGES:
        assert name in names and f"# TYPE {name} gauge" in text, f"{name} missing"
    for name in CONTRACT_HISTOGRAMS:
        assert f"# TYPE {name} histogram" in text, f"{name} missing"
        assert {f"{name}_bucket", f"{name}_count", f"{name}_sum"} <= names
    published = [s for fam in text_string_to_metric_families(text) for s in fam.samples
                 if s.name == "market_published_total"]
    assert sum(s.value for s in published) >= 50 and all(s.labels["venue"] == "binance" for s in published)


def _names_in(expressions: list[str]) -> set[str]:
    found = set()
    for expr in expressions:
        for name in re.findall(r"\b((?:market|broker)_[a-z0-9_]+)", expr):
            found.add(name)
    return found


def queried_metrics() -> set[str]:
    rules = (ROOT / "ops" / "prometheus" / "alerts.yml").read_text()
    exprs = re.findall(r"^\s*expr:\s*'(.*)'\s*$", rules, flags=re.M)
    assert len(exprs) >= 12
    dashboard = json.loads((ROOT / "ops" / "grafana" / "dashboards" / "market.json").read_text())
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return _names_in(exprs)


def test_every_metric_the_alerts_and_dashboard_query_is_exported(scrape: dict[str, Any]) -> None:
    names = sample_names(scrape["text"])
    text = scrape["text"]
    missing = sorted(n for n in queried_metrics() - NOT_FROM_THE_INGESTOR
                     if n not in names and f"# TYPE {n} " not in text)
    assert not missing, f"queried by alerts.yml or the dashboard but not exported by the ingestor: {missing}"


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (apt-get install prometheus); CI installs it")
def test_promtool_check_metrics(scrape: dict[str, Any]) -> None:
    proc = subprocess.run(["promtool", "check", "metrics"], input=scrape["text"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "LC_ALL": "C"})
    findings = set()
    for line in (proc.stdout + proc.stderr).splitlines():
        name, _, message = line.strip().partition(" ")
        if name:
            findings.add((name, message))
    unexpected = sorted(findings - CONTRACT_LINT)
    assert not unexpected, f"promtool check metrics: {unexpected}"
    assert proc.returncode in (0, 3), proc  # 3: lint findings only (those the contract fixes)
