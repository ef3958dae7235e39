"""Prometheus, alerting and Grafana files in deploy/: promtool accepts them, the alert unit tests
pass, every query names metrics and labels that service/observability/metrics.py really exports, the scrape
config selects the pods the manifests create, and (integration) a real Prometheus scrapes a real
cnnserve and finds its request metrics.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from deploy_helpers import DEPLOY, K8S, ROOT, Metric, config_map, require_tool

PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
SCRAPE_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "cnnserve.json"
README = DEPLOY / "README.md"

# Labels Prometheus or the scrape config add to every cnnserve series.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "node"}
# Series from elsewhere that the rules and the dashboard may use.
EXTERNAL_METRICS = {
    "up",  # Prometheus itself
    "kube_deployment_status_replicas_available",  # kube-state-metrics
    "process_cpu_seconds_total",  # client_python's process collector, same registry (metrics.py)
    "process_resident_memory_bytes",
}
PROMQL_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "rate", "increase", "irate", "histogram_quantile", "absent", "max_over_time",
    "label_values", "bool", "offset",
}  # fmt: skip


def promtool() -> str:
    return require_tool("promtool", "checks Prometheus configuration and rules (Debian package prometheus)")


def run_promtool(
    *args: str, cwd: Path | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


# --- PromQL inspection -------------------------------------------------------------------------------


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """(metric name, label names matched) of every series selector in a PromQL expression, with or
    without braces."""
    found = []
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", expr):
        name, body = match.group(1), match.group(2)
        if name in PROMQL_KEYWORDS:
            continue
        labels = re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body)
        found.append((name, labels))
    # Bare names: drop strings, matchers, ranges and label lists, then every identifier that is not a
    # function call, keyword or number is a metric.
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", bare):
        name = match.group(1)
        if name not in PROMQL_KEYWORDS and name.lower() not in {"inf", "nan"}:
            found.append((name, []))
    return found


def grouping_labels(expr: str) -> list[str]:
    labels: list[str] = []
    for match in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels += [label.strip() for label in match.group(1).split(",") if label.strip()]
    return labels


def check_query(expr: str, catalog: dict[str, Metric]) -> list[str]:
    """Problems with one query: unknown metric names, labels a metric does not have."""
    problems = []
    metrics = selectors(expr)
    if not metrics:
        problems.append(f"no metric selector in {expr!r}")
    known_labels = set(TARGET_LABELS)
    for name, labels in metrics:
        if name in EXTERNAL_METRICS:
            known_labels |= set(labels)
            continue
        if name not in catalog:
            problems.append(f"{name}: not a series of service/observability/metrics.py")
            continue
        metric_labels = set(catalog[name].labels)
        known_labels |= metric_labels
        for label in labels:
            if label not in metric_labels | TARGET_LABELS:
                problems.append(f"{name} has no label {label!r}")
    for label in grouping_labels(expr):
        if label not in known_labels:
            problems.append(f"grouping by {label!r}, which none of the selected metrics has")
    return problems


def test_query_checker_catches_mistakes(metric_catalog: dict[str, Metric]) -> None:
    assert (
        check_query('sum by (method) (rate(cnnserve_requests_total{job="cnnserve"}[5m]))', metric_catalog)
        == []
    )
    assert check_query("rate(cnnserve_request_total{}[5m])", metric_catalog)  # misspelt name
    assert check_query('cnnserve_queue_depth{method="Classify"}', metric_catalog)  # label it lacks
    assert check_query("sum by (reason) (cnnserve_queue_depth{})", metric_catalog)
    assert check_query(
        "histogram_quantile(0.9, rate(cnnserve_request_duration_seconds{}[5m]))", metric_catalog
    )
    assert check_query("cnnserve_task_queued_cost / cnnserve_task_budget > 0.9", metric_catalog)  # bare names
    assert (
        check_query("max by (pod) (cnnserve_task_queued_cost) / cnnserve_task_cost_budget", metric_catalog)
        == []
    )


# --- alert rules ----------------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_alert_unit_tests() -> None:
    result = run_promtool("test", "rules", ALERT_TESTS.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    # The unit tests must exercise at least the error-rate and both restart alerts.
    tested = {
        t["alertname"]
        for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert {
        "CnnserveHighErrorRate",
        "CnnserveWorkerRestarts",
        "CnnserveEngineRestarts",
        "CnnserveQueueSaturated",
        "CnnserveNoReadyReplicas",
    } <= tested


def test_the_required_alerts_exist() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "CnnserveHighErrorRate", "CnnserveHighLatencyP99", "CnnserveQueueSaturated",
        "CnnserveQueueFullRejections", "CnnserveWorkerRestarts", "CnnserveNoReadyReplicas",
    } <= names  # fmt: skip
    exprs = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    assert "histogram_quantile(0.99" in exprs["CnnserveHighLatencyP99"]
    assert "cnnserve_request_duration_seconds_bucket" in exprs["CnnserveHighLatencyP99"]
    assert 'reason="queue_full"' in exprs["CnnserveQueueFullRejections"]
    assert "increase(cnnserve_worker_restarts_total[15m])" in exprs["CnnserveWorkerRestarts"]
    assert 'absent(up{job="cnnserve"} == 1)' in exprs["CnnserveNoReadyReplicas"]
    assert "kube_deployment_status_replicas_available" in exprs["CnnserveNoReadyReplicas"]


def _readme_anchors() -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", README.read_text(), flags=re.MULTILINE):
        # GitHub's anchor rule: lowercase, drop punctuation except - and _, spaces to dashes.
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_every_alert_is_actionable() -> None:
    anchors = _readme_anchors()
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: needs a for: duration"
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "deploy/README.md" and anchor == name.lower(), (
            f"{name}: runbook_url {annotations['runbook_url']}"
        )
        assert anchor in anchors, f"{name}: deploy/README.md has no runbook section '{name}'"


def test_alert_queries_use_real_metrics_and_labels(metric_catalog: dict[str, Metric]) -> None:
    for rule in alert_rules():
        assert check_query(rule["expr"], metric_catalog) == [], rule["alert"]


def test_alert_jobs_match_the_scrape_config() -> None:
    jobs = {c["job_name"] for c in yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"]}
    for rule in alert_rules():
        for job in re.findall(r'job=~?"([^"]+)"', rule["expr"]):
            assert set(job.split("|")) <= jobs, f"{rule['alert']}: job {job!r} is never scraped"


def test_queue_alert_threshold_is_80_percent_of_max_queue_size(render: Any) -> None:
    rule = next(r for r in alert_rules() if r["alert"] == "CnnserveQueueSaturated")
    match = re.search(r">\s*0\.8\s*\*\s*(\d+)", rule["expr"])
    assert match, rule["expr"]
    threshold_size = int(match.group(1))
    for directory in (K8S / "base", K8S / "overlays" / "cpu", K8S / "overlays" / "gpu"):
        size = config_map(render(directory)).get("CNNSERVE_MAX_QUEUE_SIZE")
        assert size is not None, (
            f"{directory.name}: set CNNSERVE_MAX_QUEUE_SIZE explicitly (the alert depends on it)"
        )
        assert int(size) == threshold_size, (
            f"{directory}: queue size {size}, alert written for {threshold_size}"
        )


def test_prometheusrule_is_rendered_from_alerts_yml() -> None:
    result = subprocess.run(
        [sys.executable, str(PROMETHEUS_DIR / "render_prometheusrule.py"), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rule = yaml.safe_load((K8S / "components" / "monitoring" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


# --- scrape configuration --------------------------------------------------------------------------------


def _without_kubernetes_sd(config: dict[str, Any], targets_file: str) -> dict[str, Any]:
    """Debian's prometheus/promtool are built without Kubernetes service discovery: swap it for
    file_sd so the rest of the configuration (relabelling, rule files, alerting) is still checked."""
    config = json.loads(json.dumps(config))
    sections = [*config.get("scrape_configs", []), *config.get("alerting", {}).get("alertmanagers", [])]
    for section in sections:
        if section.pop("kubernetes_sd_configs", None) is not None:
            section["file_sd_configs"] = [{"files": [targets_file]}]
    return config


def test_promtool_check_config(tmp_path: Path) -> None:
    result = run_promtool("check", "config", str(SCRAPE_CONFIG))
    if result.returncode != 0 and "field kubernetes_sd_configs not found" in result.stdout + result.stderr:
        # Upstream Prometheus has kubernetes_sd_configs; this promtool build lacks only that.
        config = _without_kubernetes_sd(yaml.safe_load(SCRAPE_CONFIG.read_text()), "targets.json")
        (tmp_path / "targets.json").write_text("[]")
        shutil.copy(ALERTS, tmp_path / ALERTS.name)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        result = run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabelling (replace, keep, drop) with its defaults; None when the target is dropped."""
    labels = dict(labels)
    for config in configs:
        action = config.get("action", "replace")
        value = config.get("separator", ";").join(labels.get(s, "") for s in config.get("source_labels", []))
        match = re.fullmatch(config.get("regex", "(.*)"), value)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = config.get("replacement", "$1")
            result = match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", replacement))
            if result:
                labels[config["target_label"]] = result
            else:
                labels.pop(config["target_label"], None)
    return labels


def _pod_targets(objects: list[dict[str, Any]]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """What Kubernetes SD (role: pod) produces for each container port of each workload's pods."""
    for obj in objects:
        if obj["kind"] not in {"Deployment", "Job"}:
            continue
        template = obj["spec"]["template"]
        pod = f"{obj['metadata']['name']}-abc12"
        meta = {
            "__meta_kubernetes_namespace": obj["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_node_name": "node-1",
        }
        for key, value in template["metadata"]["labels"].items():
            meta["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
        for container in template["spec"]["containers"]:
            for port in container.get("ports", []) or [{"name": "", "containerPort": 0}]:
                labels = dict(meta)
                labels["__meta_kubernetes_pod_container_name"] = container["name"]
                labels["__meta_kubernetes_pod_container_port_name"] = port.get("name", "")
                labels["__address__"] = f"10.0.0.1:{port['containerPort']}"
                yield obj["metadata"]["name"], port.get("name", ""), labels


def test_scrape_config_finds_exactly_the_metrics_ports(render: Any) -> None:
    config = yaml.safe_load(SCRAPE_CONFIG.read_text())
    jobs = {c["job_name"]: c for c in config["scrape_configs"]}
    objects = [*render(K8S / "overlays" / "cpu"), *render(K8S / "batch"), *render(K8S / "models")]
    scraped: dict[str, list[tuple[str, str, dict[str, str]]]] = {}
    for job_name in ("cnnserve", "cnnserve-worker"):
        for workload, port, meta in _pod_targets(objects):
            kept = relabel(meta, jobs[job_name]["relabel_configs"])
            if kept is not None:
                scraped.setdefault(job_name, []).append((workload, port, kept))
    assert [(w, p) for w, p, _ in scraped["cnnserve"]] == [("cnnserve", "metrics")]
    assert [(w, p) for w, p, _ in scraped["cnnserve-worker"]] == [("cnnserve-worker", "metrics")]
    for job_name, targets in scraped.items():
        labels = targets[0][2]
        # prometheus-adapter maps these two labels to the HPA's pods.
        assert labels["namespace"] == "cnnserve" and labels["pod"].startswith(targets[0][0]), job_name
    # The same pods become unscrapeable once finished.
    _, _, meta = next(t for t in _pod_targets(objects) if t[0] == "cnnserve" and t[1] == "metrics")
    assert (
        relabel({**meta, "__meta_kubernetes_pod_phase": "Succeeded"}, jobs["cnnserve"]["relabel_configs"])
        is None
    )


def test_prometheus_adapter_series_query_names_real_labels(metric_catalog: dict[str, Metric]) -> None:
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    for rule in values["rules"]["custom"]:
        assert check_query(rule["seriesQuery"], metric_catalog) == []
        overrides = rule["resources"]["overrides"]
        assert set(overrides) <= TARGET_LABELS


# --- Grafana dashboard --------------------------------------------------------------------------------------


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows nest their panels
    return panels


def dashboard_queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard_panels()
        if panel["type"] != "row"
        for target in panel.get("targets", [])
    ]


def test_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 30
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        # Every query goes to the datasource picked in the variable, so import works on any Grafana.
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_covers_the_service(metric_catalog: dict[str, Metric]) -> None:
    used = {name for _, expr in dashboard_queries() for name, _ in selectors(expr)}
    required = {
        "cnnserve_requests_total",  # request rate by method/code, error ratio
        "cnnserve_request_duration_seconds_bucket",  # latency p50/p95/p99
        "cnnserve_batch_size_bucket",  # batch size distribution
        "cnnserve_queue_depth",
        "cnnserve_inflight_requests",
        "cnnserve_tasks_inflight",  # gradient jobs
        "cnnserve_task_duration_seconds_bucket",
        "cnnserve_task_steps_total",  # steps/s
        "cnnserve_worker_restarts_total",
        "cnnserve_execution_provider_info",
        "cnnserve_rejections_total",
    }
    assert required <= used, f"missing from the dashboard: {sorted(required - used)}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            f"histogram_quantile({quantile}" in expr and "cnnserve_request_duration_seconds_bucket" in expr
            for _, expr in dashboard_queries()
        ), quantile


def test_dashboard_queries_use_real_metrics_and_labels(metric_catalog: dict[str, Metric]) -> None:
    problems = [
        f"{title}: {p}" for title, expr in dashboard_queries() for p in check_query(expr, metric_catalog)
    ]
    assert problems == []


def _without_grafana_variables(expr: str) -> str:
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables substituted) as a recording rule."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": _without_grafana_variables(expr)}
        for i, (_, expr) in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- integration: a real Prometheus scraping a real cnnserve ------------------------------------------------

INTEGRATION = ROOT / "tests" / "integration"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


class PrometheusServer:
    """The `prometheus` binary on 127.0.0.1 with a throwaway config and TSDB."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w+")
        self.process = subprocess.Popen(
            [
                binary, f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
            ],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready after {timeout}s:\n{self.logs()}")

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = _http_json(url)
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, predicate: Any, timeout: float = 45.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise AssertionError(
            f"{promql}: condition not met in {timeout}s; last result {result}\n{self.logs()}"
        )

    def logs(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def lenet_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with LeNet-5 (untrained weights: metrics do not care), built with the export
    CLI as tests/integration/conftest.py does."""
    sys.path.insert(0, str(INTEGRATION))
    from server_process import ROOT as PROJECT_ROOT
    from server_process import clean_env

    repository = tmp_path_factory.mktemp("observability") / "repository"
    result = subprocess.run(
        [sys.executable, "-m", "export", "onnx", "lenet5", "--repository", str(repository)],
        cwd=PROJECT_ROOT, env=clean_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"export failed:\n{result.stderr[-4000:]}"
    return repository


@pytest.fixture
def cnnserve(lenet_repository: Path) -> Iterator[Any]:
    from server_process import ServerProcess

    server = ServerProcess(lenet_repository)
    try:
        server.wait_ready()
        yield server
        assert server.terminate(timeout=60) == 0, server.log
    finally:
        server.kill()


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (32, 32), color=128).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.integration
def test_per_model_counters_exist_at_zero_once_ready(cnnserve: Any) -> None:
    """A ready server already exports its models' counters at 0, so the first increment is a step
    rate() and increase() see (CnnserveEngineRestarts fires on the first restart), and they are the
    series the RPCs then increment."""
    from service.client import CnnserveClient

    def value(name: str, **labels: str) -> float | None:
        return cast(float | None, cnnserve.metrics().get((name, frozenset(labels.items()))))

    lenet = {"model": "lenet5"}
    assert value("cnnserve_engine_restarts_total", **lenet) == 0
    assert value("cnnserve_images_total", **lenet) == 0
    for method in ("Classify", "ClassifyBatch", "ClassifyStream", "ModelInfer"):
        assert value("cnnserve_requests_total", method=method, code="OK", **lenet) == 0, method
        assert value("cnnserve_rejections_total", method=method, reason="queue_full", **lenet) == 0, method
    # --workers 0: no gradient RPCs are answered, so none of their series is created.
    assert not [key for key in cnnserve.metrics() if key[0] == "cnnserve_task_steps_total"]

    with CnnserveClient(cnnserve.address, timeout_s=10) as client:
        client.classify(_png(), model="lenet5")
    assert value("cnnserve_requests_total", method="Classify", code="OK", **lenet) == 1
    assert value("cnnserve_images_total", **lenet) == 1


@pytest.mark.integration
def test_real_prometheus_scrapes_cnnserve(cnnserve: Any, tmp_path: Path) -> None:
    prometheus_binary = require_tool("prometheus", "the integration test runs a real Prometheus server")
    from service.client import CnnserveClient, CnnserveError

    # The exposition itself passes Prometheus' own linter.
    status, exposition = cnnserve.http_get("/metrics")
    assert status == 200
    lint = run_promtool("check", "metrics", stdin=exposition)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # The shipped alert rules load into a real server and evaluate against real series.
    shutil.copy(ALERTS, tmp_path / ALERTS.name)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [ALERTS.name],
        "scrape_configs": [
            {
                "job_name": "cnnserve",
                "static_configs": [
                    {"targets": [cnnserve.metrics_address], "labels": {"namespace": "cnnserve"}}
                ],
            }
        ],
    }
    prometheus = PrometheusServer(prometheus_binary, tmp_path, config)
    stop_traffic = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        # Bounded: at most 400 calls to 127.0.0.1, a few per 100 ms, until the assertions are done.
        image = _png()
        try:
            with CnnserveClient(cnnserve.address, timeout_s=10) as client:
                for _ in range(400):
                    if stop_traffic.is_set():
                        return
                    client.classify(image, model="lenet5")
                    try:
                        client.classify(image, model="no-such-model")
                    except CnnserveError:
                        pass
                    time.sleep(0.05)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    sender = threading.Thread(target=traffic, name="traffic", daemon=True)
    try:
        prometheus.wait_ready()
        sender.start()

        ok = prometheus.wait_for(
            'cnnserve_requests_total{job="cnnserve", method="Classify", model="lenet5", code="OK"}',
            lambda r: r and float(r[0]["value"][1]) >= 5,
        )
        assert ok[0]["metric"]["namespace"] == "cnnserve"
        prometheus.wait_for('cnnserve_requests_total{job="cnnserve", code="NOT_FOUND"}', lambda r: bool(r))
        buckets = prometheus.wait_for(
            'cnnserve_request_duration_seconds_bucket{job="cnnserve", method="Classify", model="lenet5"}',
            lambda r: any(s["metric"]["le"] == "+Inf" and float(s["value"][1]) >= 5 for s in r),
        )
        assert len({s["metric"]["le"] for s in buckets}) >= 10
        # The dashboard's and the latency alert's query shape works on the scraped histogram.
        p99 = prometheus.wait_for(
            "histogram_quantile(0.99, sum by (le) (rate("
            'cnnserve_request_duration_seconds_bucket{job="cnnserve", method="Classify"}[10s])))',
            lambda r: r and math.isfinite(float(r[0]["value"][1])),
        )
        assert 0 < float(p99[0]["value"][1]) < 10
        prometheus.wait_for(
            "cnnserve_execution_provider_info", lambda r: any(float(s["value"][1]) == 1 for s in r)
        )
        # The engine-restart alert's increase() has a series at 0 to rise from (created at load).
        restarts = prometheus.wait_for(
            'increase(cnnserve_engine_restarts_total{job="cnnserve", model="lenet5"}[1m])', lambda r: bool(r)
        )
        assert float(restarts[0]["value"][1]) == 0

        # Every shipped rule evaluated without error, and with a healthy target the availability page is
        # silent (proves the job label the rules expect is the one scraped).
        def rules_evaluated(_: Any) -> bool:
            groups = _http_json(f"{prometheus.url}/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return bool(rules) and all(
                r["health"] == "ok" and not r["lastEvaluation"].startswith("0001-") for r in rules
            )

        prometheus.wait_for("vector(1)", rules_evaluated)
        groups = _http_json(f"{prometheus.url}/api/v1/rules")["data"]["groups"]
        assert sum(len(g["rules"]) for g in groups) == len(alert_rules())
        alerts = _http_json(f"{prometheus.url}/api/v1/alerts")["data"]["alerts"]
        assert not [a for a in alerts if a["labels"]["alertname"] == "CnnserveNoReadyReplicas"], alerts
    finally:
        stop_traffic.set()
        sender.join(30)
        prometheus.stop()
    assert not errors, errors
