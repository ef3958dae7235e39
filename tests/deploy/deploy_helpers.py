"""Helpers for tests/deploy: tool lookup, rendering kustomizations, the metric catalog of
service/observability/metrics.py. (A module of its own, not conftest.py, so that tests import it by
a unique name.)

External tools (kubectl, promtool, prometheus, hadolint) are required in CI (CI=true), where
tools/install_system_deps.sh and the dev extras provide them: a missing tool fails there. On a
developer machine without them the tests that need them skip, saying which tool is missing.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

# The Kubernetes version whose bundled schemas kubernetes-validate checks against (deploy/README.md).
KUBERNETES_VERSION = "1.30"
# The uid every image runs as and every pod's securityContext names.
APP_UID = 10001


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require_tool(name: str, why: str) -> str:
    """Path of an executable on PATH or in this interpreter's bin/; skip (or fail in CI) if absent."""
    here = Path(sys.executable).parent / name  # the venv's bin/, for pip-installed binaries
    found = shutil.which(name) or (str(here) if here.exists() else None)
    if found:
        return found
    message = f"{name} not found ({why})"
    if in_ci():
        pytest.fail(f"{message}: CI must provide it (tools/install_system_deps.sh / dev extras)")
    pytest.skip(f"{message}; run tools/install_system_deps.sh or install the dev extras")


def kustomization_dirs() -> list[Path]:
    """Every directory that `kubectl kustomize` can build (components only build inside overlays)."""
    dirs = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        kind = yaml.safe_load(path.read_text()).get("kind", "Kustomization")
        if kind == "Kustomization":
            dirs.append(path.parent)
    return dirs


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = require_tool("kubectl", "renders deploy/k8s with `kubectl kustomize`")
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def config_map(objects: list[dict[str, Any]], prefix: str = "cnnserve-config") -> dict[str, str]:
    """The data of the generated settings ConfigMap (its name carries a hash suffix)."""
    maps = [o for o in find(objects, "ConfigMap") if o["metadata"]["name"].startswith(prefix + "-")]
    assert len(maps) == 1, (
        f"expected one {prefix}-<hash> ConfigMap, found {[m['metadata']['name'] for m in maps]}"
    )
    data: dict[str, str] = maps[0].get("data", {})
    return data


# --- the metric catalog: every metric service/observability/metrics.py defines ----------------


@dataclass(frozen=True)
class Metric:
    name: str  # as declared, e.g. cnnserve_requests_total
    type: str  # counter, gauge, histogram, summary
    labels: tuple[str, ...]


def _metric_families() -> dict[str, Metric]:
    """Parse service/observability/metrics.py (without importing it) for Counter/Gauge/Histogram/
    Summary(...)."""
    tree = ast.parse((ROOT / "service" / "observability" / "metrics.py").read_text())
    families: dict[str, Metric] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        kind = node.func.id.lower()
        if kind not in {"counter", "gauge", "histogram", "summary"} or not node.args:
            continue
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        label_node = node.args[2] if len(node.args) > 2 else None
        for kw in node.keywords:
            if kw.arg == "labelnames":
                label_node = kw.value
        labels: tuple[str, ...] = ()
        if label_node is not None:
            labels = tuple(ast.literal_eval(label_node))
        families[first.value] = Metric(first.value, kind, labels)
    return families


def exposition_names() -> dict[str, Metric]:
    """Series name as Prometheus stores it -> its metric (counters get _total, histograms _bucket...)."""
    names: dict[str, Metric] = {}
    for metric in _metric_families().values():
        if metric.type == "counter":
            base = metric.name.removesuffix("_total")
            names[base + "_total"] = metric
            names[base + "_created"] = metric
        elif metric.type in {"histogram", "summary"}:
            # A classic histogram has no series under its bare name: only _bucket/_sum/_count.
            for suffix in ("_sum", "_count", "_created"):
                names[metric.name + suffix] = metric
            if metric.type == "histogram":
                names[metric.name + "_bucket"] = Metric(metric.name, metric.type, (*metric.labels, "le"))
            else:
                names[metric.name] = Metric(metric.name, metric.type, (*metric.labels, "quantile"))
        else:
            names[metric.name] = metric
    return names
