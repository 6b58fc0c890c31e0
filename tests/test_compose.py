"""docker-compose.yml stays a valid Compose file (validated by the Compose client, no engine),
runs every sow stage, and its monitoring profile scrapes them into a Grafana dashboard whose
queries only name metrics sow really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana/dashboards/sow.json"
STAGES = {"publish", "cache", "persist", "api"}
SERVERS = {"nats", "dragonfly", "questdb"}
# Metrics Prometheus adds itself (not exposed by sow).
PROMETHEUS_BUILTINS = {"up"}


def _compose() -> list[str]:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("no docker compose client installed")


def _config(*args: str) -> str:
    cmd = _compose()
    out = subprocess.run(
        [*cmd, "-f", str(COMPOSE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_compose_file_is_valid_and_runs_the_servers_and_every_stage() -> None:
    _config("config", "--quiet")
    services = set(_config("config", "--services").split())
    assert services >= SERVERS | STAGES


def test_monitoring_profile_adds_prometheus_and_grafana() -> None:
    services = set(_config("--profile", "monitoring", "config", "--services").split())
    assert {"prometheus", "grafana"} | SERVERS | STAGES <= services


def _compose_doc() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(COMPOSE.read_text())


def test_stages_share_one_image_and_point_at_the_compose_servers() -> None:
    services = _compose_doc()["services"]
    for name in STAGES:
        svc = services[name]
        assert svc["build"] == ".", name
        env = svc["environment"]
        assert env["NATS_URL"] == "nats://nats:4222", name
        assert "dragonfly:6379" in env["DRAGONFLY_URL"], name
        assert "@questdb:8812" in env["QUESTDB_URL"], name
        assert env["QUESTDB_HTTP_URL"] == "http://questdb:9000", name
        deps = svc["depends_on"]
        assert deps["nats"]["condition"] == "service_healthy", name
    for name in ("publish", "cache", "persist"):
        env = services[name]["environment"]
        assert env["SOW_METRICS_PORT"] == "9100" and env["SOW_METRICS_HOST"] == "0.0.0.0", name
    api = services["api"]
    assert api["command"][0] == "serve-api" and "8080:8080" in api["ports"]
    assert api["environment"]["SOW_API_HOST"] == "0.0.0.0"
    assert {d for d, c in api["depends_on"].items() if c["condition"] == "service_healthy"} >= (
        SERVERS
    )
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]


def test_dockerfile_is_one_image_for_every_stage() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "pip install ." in text
    assert re.search(r"^USER (?!root)\S+", text, re.M), "the image runs as a non-root user"
    assert 'ENTRYPOINT ["sow"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "frontend/node_modules", "frontend/.next"} <= set(ignored)


def test_prometheus_scrapes_every_stage() -> None:
    yaml = pytest.importorskip("yaml")
    prom = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = {
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    assert {"publish:9100", "cache:9100", "persist:9100", "api:8080"} <= targets
    ds = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


# --- the metrics sow exposes, derived by running the real code --------------------------------


class _Doc:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def status(self) -> dict[str, Any]:
        return self.doc


def _representative(doc: dict[str, Any]) -> dict[str, Any]:
    """A freshly built stage's status with the values a running stage fills in later."""
    from sowcli.bus.jetstream import consumer_lag

    doc = dict(doc)
    for field, value in doc.items():
        if value is None and field.endswith(("_ms", "_ts", "_s")):
            doc[field] = 1.0  # e.g. last_flush_ms: null until the first flush
    if doc.get("lag") == {}:  # persist: filled from the consumer info once NATS answers
        seq = SimpleNamespace(stream_seq=1)
        info = SimpleNamespace(
            num_pending=1, num_ack_pending=1, num_redelivered=0, num_waiting=1,
            ack_floor=seq, delivered=seq,
        )  # fmt: skip
        doc["lag"] = consumer_lag(info)  # type: ignore[arg-type]
    if doc.get("last_age_s") == {}:  # publisher: per market:symbol once quotes flow
        doc["last_age_s"] = {"SPOT:BTCUSDT": 0.2}
    return doc


def _samples(text: str) -> Iterator[tuple[str, dict[str, str]]]:
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*?)\})?\s", line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        yield m.group(1), labels


@pytest.fixture(scope="module")
def exposed() -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets of everything the stages and serve-api expose."""
    from prometheus_client import generate_latest

    from sowcli.config import Settings
    from sowcli.metrics import registry_for
    from sowcli.persist import Persister
    from sowcli.publish import Publisher, SourceSpec
    from sowcli.servers.metrics import ServerMetrics
    from sowcli.servers.ws import Bridge
    from sowcli.sinks.cache import CacheStage

    settings = Settings()
    stages = {
        "publisher": Publisher(settings, source=SourceSpec("simulate")),
        "cache": CacheStage(settings),
        "persist": Persister(settings),
    }
    docs = [(name, _Doc(_representative(stage.status()))) for name, stage in stages.items()]
    text = generate_latest(registry_for(lambda: docs)).decode()
    api = ServerMetrics()  # what serve-api's /metrics renders: its counters plus the WS bridge
    api.register(Bridge(settings).collect)
    api.observe("/api/prices/latest", "GET", 200, 0.002)
    text += api.render().decode()
    names: dict[str, list[dict[str, str]]] = {}
    for name, labels in _samples(text):
        names.setdefault(name, []).append(labels)
    return names


def _selectors(expr: str) -> Iterator[tuple[str, str]]:
    """(metric name, label matchers) of every series selector in a PromQL expression."""
    # blank out label values (same length, so positions still index into expr)
    without_strings = re.sub(r'"[^"]*"', lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)
    keywords = {"sum", "by", "without", "rate", "increase", "histogram_quantile", "min", "max"}
    for m in re.finditer(r"\b([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?", without_strings):
        name = m.group(1)
        if name in keywords or without_strings[m.end() :].lstrip().startswith("("):
            continue
        if re.fullmatch(r"\d+\w*", name) or _inside_grouping(without_strings, m.start()):
            continue
        start = m.start(2) if m.group(2) else None
        yield name, expr[start : start + len(m.group(2))] if start is not None else ""


def _inside_grouping(expr: str, pos: int) -> bool:
    """True when pos is inside `by (...)` / `without (...)` or a selector's braces / range."""
    head = expr[:pos]
    if head.count("{") > head.count("}") or head.count("[") > head.count("]"):
        return True
    grouping = re.search(r"\b(by|without)\s*\(([^)]*)$", head)
    return grouping is not None


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_covers_the_pipeline() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    text = " ".join(_dashboard_exprs())
    for needed in (
        "sow_publisher_frames_in_total", "sow_publisher_quotes_out_total",
        "sow_publisher_reconnects_total", "sow_publisher_nats_buffered", "sow_cache_written_total",
        "sow_persist_rows_per_s", "sow_persist_lag", "sow_http_requests_total",
        "sow_http_request_duration_seconds_bucket", "sow_ws_clients",
    ):  # fmt: skip
        assert needed in text, needed
    ds_uid = {p["datasource"]["uid"] for p in dash["panels"]}
    assert ds_uid == {"sow-prometheus"}


def test_dashboard_queries_only_metrics_sow_exposes(
    exposed: dict[str, list[dict[str, str]]],
) -> None:
    checked = 0
    for expr in _dashboard_exprs():
        for name, matchers in _selectors(expr):
            if name in PROMETHEUS_BUILTINS:
                continue
            assert name in exposed, f"{name} (in {expr!r}) is not a metric sow exposes"
            checked += 1
            for label, op, value in re.findall(r'(\w+)\s*(=~|!=|!~|=)\s*"([^"]*)"', matchers):
                assert any(label in s for s in exposed[name]), f"{name} has no label {label}"
                if op == "=":
                    assert any(s.get(label) == value for s in exposed[name]), (
                        f'{name}{{{label}="{value}"}} never appears'
                    )
    assert checked >= 20


def test_nats_gets_room_for_a_publish_burst_in_compose_and_infra(tmp_path: Path) -> None:
    """nats-server >= 2.11 silently drops core-NATS publishes into a stream beyond
    ``max_buffered_msgs`` (default 10,000) waiting to be stored; sow publish flushes up to
    ``publish_buffer`` quotes at once after an outage. The servers sow starts (sow infra, the
    tests) and the compose file's must both leave room for that, with the same settings."""
    from sowcli.config import Settings
    from sowcli.infra import NATS_CONF, _nats_command

    limit = int(re.search(r"max_buffered_msgs:\s*(\d+)", NATS_CONF).group(1))  # type: ignore[union-attr]
    assert limit >= 5 * Settings().publish_buffer
    command = _nats_command(tmp_path, {"client": 4222, "monitor": 8222})
    conf = Path(command[command.index("-c") + 1])
    assert conf.read_text() == NATS_CONF
    deployed = (ROOT / "deploy/nats.conf").read_text()
    assert deployed.endswith(NATS_CONF)
    nats = _config("config")
    assert "./deploy/nats.conf:/etc/nats/sow.conf" in nats or "deploy/nats.conf" in nats
    assert "/etc/nats/sow.conf" in nats
