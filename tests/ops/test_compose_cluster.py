"""compose.yaml's ``cluster`` profile: six Redis nodes with cluster mode on, a one-shot job that forms them into
three masters with a replica each, and an ingestor and a consumer on ``redis+cluster://`` naming those nodes.

Read with PyYAML (``docker compose config`` is not needed: tests/ops/test_compose.py checks the file stays in the
subset both readers agree on)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer_sdk.core.urls import parse_cluster_url

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"
NODES = [f"redis-node-{i}" for i in range(1, 7)]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services: dict[str, Any] = doc["services"]
    return services


def _cluster_services(services: dict[str, Any]) -> set[str]:
    return {name for name, s in services.items() if "cluster" in (s.get("profiles") or [])}


def test_the_profile_holds_six_nodes_the_job_the_ingestor_and_the_consumer(services: dict[str, Any]) -> None:
    assert _cluster_services(services) == {*NODES, "redis-cluster-init", "ingestor-cluster", "consumer-cluster"}
    for name in _cluster_services(services):
        assert services[name]["profiles"] == ["cluster"], name


@pytest.mark.parametrize("node", NODES)
def test_each_node_runs_in_cluster_mode_persisted_under_its_own_name(services: dict[str, Any], node: str) -> None:
    s = services[node]
    assert str(s["image"]).startswith("redis:7")
    command = [str(c) for c in s["command"]]

    def arg(name: str) -> str:
        assert name in command, (node, name)
        return command[command.index(name) + 1]

    assert command[0] == "redis-server"
    assert arg("--cluster-enabled") == "yes"
    assert arg("--port") == "6379"
    assert arg("--cluster-announce-hostname") == node
    assert arg("--cluster-preferred-endpoint-type") == "hostname"
    assert arg("--appendonly") == "yes"
    assert s["volumes"] == [f"{node}-data:/data"]
    assert s["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert not s.get("ports"), "the nodes announce names only the compose network resolves: publish none"


def test_the_job_forms_three_masters_with_a_replica_each_once_the_nodes_answer(services: dict[str, Any]) -> None:
    job = services["redis-cluster-init"]
    assert job["depends_on"] == {n: {"condition": "service_healthy"} for n in NODES}
    assert job.get("restart") == "no"
    script = job["command"][-1]
    assert job["command"][:2] == ["sh", "-c"]
    assert "redis-cli --cluster create" in script
    assert "--cluster-replicas 1" in script and "--cluster-yes" in script
    assert "for n in 1 2 3 4 5 6" in script and "redis-node-$$n" in script  # $$: a literal $ for compose
    assert script.startswith("redis-cli -h redis-node-1 cluster info | grep -q cluster_state:ok ||")
    assert script.endswith("do sleep 1; done")


@pytest.mark.parametrize("name", ["ingestor-cluster", "consumer-cluster"])
def test_the_ingestor_and_the_consumer_use_the_cluster_url(services: dict[str, Any], name: str) -> None:
    url = services[name]["environment"]["MARKET_REDIS_URL"]
    assert url.startswith("redis+cluster://")
    assert parse_cluster_url(url).nodes == (("redis-node-1", 6379), ("redis-node-2", 6379), ("redis-node-3", 6379))


def test_the_cluster_ingestor_starts_after_the_job_and_the_consumer_after_it(services: dict[str, Any]) -> None:
    ing = services["ingestor-cluster"]
    assert ing["depends_on"] == {"redis-cluster-init": {"condition": "service_completed_successfully"}}
    assert ing["command"][0] == "ingest"
    assert services["consumer-cluster"]["depends_on"] == ["ingestor-cluster"]
    command = services["consumer-cluster"]["command"]
    assert command[0] == "tail" and "--group" in command
