"""The deployment files: compose.yaml, Prometheus and Grafana configuration, alert rules, the dashboard.

They are YAML.  :func:`load_yaml` reads the subset these files use (block mappings and sequences,
one-line flow collections, quoted and plain scalars, comments) and refuses anything else (anchors,
block scalars, multi-line flows) loudly, so a file that grows past the subset fails here; PyYAML (a
dev dependency) reads every file too, and the two readers must agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingestor.config import IngestSettings
from ops.status import STAGES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
PROM_DIR = ROOT / "ops" / "prometheus"
GRAFANA_DIR = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "market.json"
YAML_FILES = [
    COMPOSE,
    PROM_DIR / "prometheus.yml",
    PROM_DIR / "alerts.yml",
    GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml",
    GRAFANA_DIR / "provisioning" / "dashboards" / "market.yml",
]


# ---------------------------------------------------------------------------------------------- YAML subset
class YamlSubsetError(ValueError):
    pass


_INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
_FLOAT = re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _strip_comment(text: str) -> str:
    quote = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            escaped = ch == "\\" and quote == '"'
            doubled = ch == "'" and quote == "'" and text[i + 1:i + 2] == "'"
            if escaped or doubled:
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "'\"" and (i == 0 or text[i - 1] in " \t[{,:-"):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
        i += 1
    return text.rstrip()


def _scalar(text: str) -> Any:
    t = text.strip()
    if not t or t in ("~", "null", "Null", "NULL"):
        return None
    if t[0] == "'":
        if len(t) < 2 or t[-1] != "'":
            raise YamlSubsetError(f"unterminated quote: {text!r}")
        return t[1:-1].replace("''", "'")
    if t[0] == '"':
        if len(t) < 2 or t[-1] != '"':
            raise YamlSubsetError(f"unterminated quote: {text!r}")
        return json.loads(t)
    if t[0] in "&*!|>%@`":
        raise YamlSubsetError(f"unsupported YAML construct: {text!r}")
    if t.lower() in _BOOLS:
        return _BOOLS[t.lower()]
    if _INT.match(t):
        return int(t)
    if _FLOAT.match(t):
        return float(t)
    return t


class _Flow:
    """A one-line flow collection: ``[a, "b", {c: d}]``."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0

    def parse(self) -> Any:
        value = self._value(())
        self._ws()
        if self.i != len(self.s):
            raise YamlSubsetError(f"trailing text after a flow collection: {self.s!r}")
        return value

    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def _value(self, stops: tuple[str, ...]) -> Any:
        self._ws()
        if self.i >= len(self.s):
            raise YamlSubsetError(f"unterminated flow collection: {self.s!r}")
        ch = self.s[self.i]
        if ch == "[":
            return self._seq()
        if ch == "{":
            return self._map()
        if ch in "'\"":
            j = self.i + 1
            while True:
                j = self.s.find(ch, j)
                if j < 0:
                    raise YamlSubsetError(f"unterminated quote: {self.s!r}")
                if ch == "'" and self.s[j + 1:j + 2] == "'":
                    j += 2
                    continue
                if ch == '"' and self.s[j - 1] == "\\":
                    j += 1
                    continue
                break
            text = self.s[self.i:j + 1]
            self.i = j + 1
            return _scalar(text)
        j = self.i
        while j < len(self.s) and self.s[j] not in ",]}" and not (
            ":" in stops and self.s[j] == ":" and self.s[j + 1:j + 2] in (" ", "")
        ):
            j += 1
        text = self.s[self.i:j]
        self.i = j
        return _scalar(text)

    def _seq(self) -> list[Any]:
        self.i += 1
        out: list[Any] = []
        self._ws()
        if self.s[self.i:self.i + 1] == "]":
            self.i += 1
            return out
        while True:
            out.append(self._value((",", "]")))
            self._ws()
            ch = self.s[self.i:self.i + 1]
            self.i += 1
            if ch == "]":
                return out
            if ch != ",":
                raise YamlSubsetError(f"expected , or ] in {self.s!r}")

    def _map(self) -> dict[str, Any]:
        self.i += 1
        out: dict[str, Any] = {}
        self._ws()
        if self.s[self.i:self.i + 1] == "}":
            self.i += 1
            return out
        while True:
            key = self._value((":",))
            self._ws()
            if self.s[self.i:self.i + 1] != ":":
                raise YamlSubsetError(f"expected : in {self.s!r}")
            self.i += 1
            out[str(key)] = self._value((",", "}"))
            self._ws()
            ch = self.s[self.i:self.i + 1]
            self.i += 1
            if ch == "}":
                return out
            if ch != ",":
                raise YamlSubsetError(f"expected , or }} in {self.s!r}")


def _value(text: str) -> Any:
    t = text.strip()
    if t[:1] in "[{":
        return _Flow(t).parse()
    return _scalar(t)


def _split_key(content: str) -> tuple[str, str] | None:
    """``key: value`` -> (key, value); None when the line is not a mapping entry."""
    quote = None
    depth = 0
    for i, ch in enumerate(content):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"" and i == 0:
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == ":" and depth == 0 and (i + 1 == len(content) or content[i + 1] in " \t"):
            return content[:i], content[i + 1:]
    return None


def load_yaml(text: str) -> Any:
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlSubsetError(f"tab in indentation: {raw!r}")
        content = _strip_comment(raw)
        if content.strip() in ("", "---"):
            continue
        lines.append((len(content) - len(content.lstrip(" ")), content.strip()))
    if not lines:
        return None
    value, end = _block(lines, 0, lines[0][0])
    if end != len(lines):
        raise YamlSubsetError(f"unexpected indentation at {lines[end][1]!r}")
    return value


def _is_item(content: str) -> bool:
    return content == "-" or content.startswith("- ")


def _block(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[Any, int]:
    if _is_item(lines[i][1]):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _nested(lines: list[tuple[int, str]], i: int, indent: int, allow_same_indent_seq: bool) -> tuple[Any, int]:
    if i < len(lines):
        ind, content = lines[i]
        if ind > indent or (allow_same_indent_seq and ind == indent and _is_item(content)):
            return _block(lines, i, ind)
    return None, i


def _sequence(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[list[Any], int]:
    out: list[Any] = []
    while i < len(lines) and lines[i][0] == indent and _is_item(lines[i][1]):
        rest = lines[i][1][1:].lstrip(" ")
        if not rest:
            value, i = _nested(lines, i + 1, indent, False)
            out.append(value)
            continue
        if rest[:1] not in "[{'\"" and _split_key(rest) is not None:
            # "- key: value": a mapping whose entries are indented to where "key" starts.
            inner = indent + len(lines[i][1]) - len(rest)
            lines[i] = (inner, rest)
            value, i = _mapping(lines, i, inner)
            out.append(value)
            continue
        out.append(_value(rest))
        i += 1
    return out, i


def _mapping(lines: list[tuple[int, str]], i: int, indent: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while i < len(lines) and lines[i][0] == indent and not _is_item(lines[i][1]):
        split = _split_key(lines[i][1])
        if split is None:
            raise YamlSubsetError(f"expected 'key: value', got {lines[i][1]!r}")
        key_text, rest = split
        key = _scalar(key_text)
        key = str(key) if not isinstance(key, str) else key
        if key in out:
            raise YamlSubsetError(f"duplicate key {key!r}")
        if rest.strip():
            out[key] = _value(rest)
            i += 1
        else:
            out[key], i = _nested(lines, i + 1, indent, True)
    if i < len(lines) and lines[i][0] > indent:
        raise YamlSubsetError(f"unexpected indentation at {lines[i][1]!r}")
    return out, i


def read_yaml(path: Path) -> Any:
    return load_yaml(path.read_text())


# ---------------------------------------------------------------------------------------------- the reader itself
def test_yaml_subset_reader() -> None:
    text = """
# comment
a: 1
b: "two # not a comment"   # a comment
c: [x, 'y z', {k: v, n: 2}, []]
d:
  - plain
  - key: value
    other: ${VAR:-ws://host:9443}
  -
    nested: true
e:
- same-indent item
f: {}
g:
h: 'it''s'
"""
    assert load_yaml(text) == {
        "a": 1, "b": "two # not a comment", "c": ["x", "y z", {"k": "v", "n": 2}, []],
        "d": ["plain", {"key": "value", "other": "${VAR:-ws://host:9443}"}, {"nested": True}],
        "e": ["same-indent item"], "f": {}, "g": None, "h": "it's",
    }
    for bad in ("a: &anchor 1", "a: |\n  text", "a: [1, 2", "a: 1\na: 2", "a:\n    b: 1\n  c: 2"):
        with pytest.raises(YamlSubsetError):
            load_yaml(bad)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_subset_reader_agrees_with_pyyaml(path: Path) -> None:
    assert read_yaml(path) == yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------- compose.yaml
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = read_yaml(COMPOSE)
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "compose.yaml has no services"
    return doc


def _ports(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host address, text) for each published port; long syntax included."""
    out: list[tuple[str | None, str]] = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.append((p.get("host_ip"), json.dumps(p)))
        else:
            parts = str(p).rsplit(":", 2)
            out.append((parts[0] if len(parts) == 3 else None, str(p)))
    return out


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(host path, container path, read-only) of each bind mount (named volumes left out)."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            if v.get("type") == "bind":
                out.append((str(v["source"]), str(v["target"]), bool(v.get("read_only"))))
            continue
        source, _, rest = str(v).partition(":")
        target, _, mode = rest.partition(":")
        if source.startswith((".", "/", "~")):
            out.append((source, target, "ro" in mode.split(",")))
    return out


def _named_volumes(service: dict[str, Any]) -> list[str]:
    out = []
    for v in service.get("volumes") or []:
        source = str(v.get("source", "")) if isinstance(v, dict) else str(v).partition(":")[0]
        if source and not source.startswith((".", "/", "~")):
            out.append(source)
    return out


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("redis", "simulator", "ingestor", "prometheus", "grafana"):
        assert name in services, f"compose.yaml: no {name!r} service"


def test_compose_redis_persists_with_aof(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert str(redis["image"]).startswith("redis:")
    command = [str(c) for c in redis["command"]]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes", command
    assert _named_volumes(redis), "redis keeps its AOF in a named volume"


def test_compose_simulator_only_in_a_profile(compose: dict[str, Any]) -> None:
    assert "sim" in compose["services"]["simulator"].get("profiles", [])
    for name in ("redis", "ingestor", "prometheus", "grafana"):
        assert not compose["services"][name].get("profiles"), f"{name} must start without a profile"


def test_compose_ingestor_exports_metrics_to_prometheus(compose: dict[str, Any]) -> None:
    ingestor = compose["services"]["ingestor"]
    command = [str(c) for c in ingestor["command"]]
    assert command[0] == "ingest" and "--metrics-port" in command
    assert command[command.index("--metrics-port") + 1] == "9464"
    # Prometheus scrapes it from another container.
    assert ingestor["environment"].get("MARKET_METRICS_HOST") == "0.0.0.0"


def _seconds(duration: str) -> float:
    """A compose duration (``30s``, ``1m30s``, ``1h``) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?", duration)
    assert parts and duration, f"not a compose duration: {duration!r}"
    h, m, sec, ms = (int(x) if x else 0 for x in parts.groups())
    return 3600 * h + 60 * m + sec + ms / 1000


def test_compose_ingestor_stop_outlasts_its_final_flush(compose: dict[str, Any]) -> None:
    """A stop may spend ``[shutdown] flush_timeout_s`` saving what the process holds: Docker must not send
    SIGKILL before that (its default grace is 10 s)."""
    assert _seconds("1m30s") == 90 and _seconds("30s") == 30 and _seconds("500ms") == 0.5
    grace = compose["services"]["ingestor"].get("stop_grace_period")
    assert grace is not None, "the ingestor needs a stop_grace_period (Docker's default 10 s is too short)"
    assert _seconds(str(grace)) > IngestSettings().shutdown_flush_s, grace


def test_compose_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = str(service.get("image", ""))
        assert image, f"{name}: no image"
        if "build" in service:
            continue  # built from this repository
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: pin the image tag, not {image!r}"
    assert str(compose["services"]["prometheus"]["image"]).startswith("prom/prometheus:")
    assert str(compose["services"]["grafana"]["image"]).startswith("grafana/grafana")


def test_compose_ports_bound_to_localhost(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for host, text in _ports(service):
            assert host == "127.0.0.1", f"{name}: port {text} must be bound to 127.0.0.1"
    published = {name: [t for _, t in _ports(s)] for name, s in compose["services"].items()}
    assert "127.0.0.1:9090:9090" in published["prometheus"]
    assert "127.0.0.1:3000:3000" in published["grafana"]


def test_compose_mounted_files_exist(compose: dict[str, Any]) -> None:
    declared = set((compose.get("volumes") or {}).keys())
    for name, service in compose["services"].items():
        for source, target, _ in _bind_mounts(service):
            path = (ROOT / source).resolve()
            assert path.exists(), f"{name}: mounts {source!r}, which is not in the repository"
            assert ROOT in path.parents or path == ROOT, f"{name}: mounts {source!r} from outside the repository"
            assert target.startswith("/"), f"{name}: mount target {target!r}"
        for volume in _named_volumes(service):
            assert volume in declared, f"{name}: volume {volume!r} is not declared under top-level volumes"


def test_compose_prometheus_and_grafana_mounts(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    mounts = {(Path(ROOT / s).resolve(), t) for s, t, ro in _bind_mounts(prom) if ro}
    assert (PROM_DIR, "/etc/prometheus") in mounts, "mount ./ops/prometheus read-only at /etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in [str(c) for c in prom.get("command", [])]
    graf = compose["services"]["grafana"]
    gmounts = {(Path(ROOT / s).resolve(), t) for s, t, ro in _bind_mounts(graf) if ro}
    assert (GRAFANA_DIR / "provisioning", "/etc/grafana/provisioning") in gmounts
    provider = read_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "market.yml")["providers"][0]
    assert (GRAFANA_DIR / "dashboards", provider["options"]["path"]) in gmounts, "dashboards mounted where provisioned"


# ---------------------------------------------------------------------------------------------- Prometheus and Grafana
def test_prometheus_scrapes_the_ingestor_service(compose: dict[str, Any]) -> None:
    conf = read_yaml(PROM_DIR / "prometheus.yml")
    jobs = {j["job_name"]: j for j in conf["scrape_configs"]}
    targets = [t for sc in jobs["market-ingestor"]["static_configs"] for t in sc["targets"]]
    assert targets == ["ingestor:9464"]
    assert "ingestor" in compose["services"]
    for rule_file in conf["rule_files"]:
        assert (PROM_DIR / rule_file).is_file(), f"rule file {rule_file} (relative to prometheus.yml)"


def test_grafana_datasource_points_at_prometheus(compose: dict[str, Any]) -> None:
    ds = read_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert len(ds) == 1 and ds[0]["type"] == "prometheus" and ds[0]["uid"] == "prometheus"
    assert ds[0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def test_dashboard_has_a_row_per_stage(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Ingestor", "Connection", "Ingress queue", "Fan-out", "Redis", "Consumers"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert dashboard["uid"] == "market-overview"


def test_dashboard_panels_query_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    uid = read_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]["uid"]
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == uid and t["expr"].strip(), panel["title"]
            exprs.append(t["expr"])
    joined = "\n".join(exprs)
    for needle in ("market_connection_up", "market_reconnect_reasons_total", "market_stale_streams",
                   "market_ingress_len", "market_queue_fill_ratio", "market_dropped_total",
                   "market_backpressure_events_total", "market_subscriber_count",
                   "histogram_quantile(0.99, sum by (le, stage) (rate(market_fanout_latency_us_bucket",
                   "market_e2e_latency_us_bucket", "market_published_total", "market_redis_errors_total",
                   "market_spill_records", "market_consumer_lag", "market_redis_oom", "market_writer_retrying",
                   "sum by (reason) (rate(market_writer_rejected_total",
                   "increase(market_writer_dead_lettered_total", "market_spill_full",
                   "rate(market_subscriber_handler_seconds_total", "market_subscriber_lag"):
        assert needle in joined, f"the dashboard shows no {needle}"


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine


# ---------------------------------------------------------------------------------------------- alert rules
def alert_rules() -> list[dict[str, Any]]:
    doc = read_yaml(PROM_DIR / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_names_its_stage() -> None:
    rules = alert_rules()
    assert len(rules) >= 12
    for rule in rules:
        stage, severity = rule["labels"]["stage"], rule["labels"]["severity"]
        assert stage in STAGES, f"{rule['alert']}: stage {stage!r} is not one of {STAGES}"
        level = {"critical": "FAIL", "warning": "WARN"}[severity]
        summary = rule["annotations"]["summary"]
        assert summary.startswith(f"{stage} {level}: "), f"{rule['alert']}: summary {summary!r}"
        assert rule["annotations"]["description"]


def test_alerts_cover_every_failure_the_issue_names() -> None:
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "MarketConnectionDown": "market_connection_up == 0",
        "MarketReconnectStorm": "increase(broker_reconnect_total[5m]) > 10",
        "MarketStreamStale": "market_stale_streams > 0",
        "MarketIngressFilling": "market_queue_fill_ratio > 0.8",
        "MarketIngressDrops": 'increase(market_dropped_total{stage="ingress"}[1m]) > 0',
        "MarketFanoutDrops": 'increase(market_dropped_total{stage="hotpath"}[1m]) > 0',
        "MarketRedisWriteErrors": "increase(market_redis_errors_total[1m]) > 0",
        "MarketSpillInUse": "market_spill_records > 0",
        "MarketRedisDown": "market_redis_up == 0",
        "MarketGapsUnrepaired": "increase(market_gap_unrepaired_total[5m]) > 0",
        "MarketConsumerLag": "market_consumer_lag > 1000",
        "MarketIngestorDown": 'up{job="market-ingestor"} == 0',
        "MarketIngestorAbsent": 'absent(up{job="market-ingestor"})',
    }
    for name, expr in wanted.items():
        assert exprs.get(name) == expr, f"{name}: {exprs.get(name)!r}"
