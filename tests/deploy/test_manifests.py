"""The Kubernetes manifests in deploy/k8s: they render, validate against the Kubernetes API schemas,
and hold the operational promises deploy/README.md makes (restricted pod security, probes, shutdown
budget, GPU scheduling, network isolation, disruption budgets, autoscaling).

Everything is checked on the output of `kubectl kustomize`, i.e. on what `kubectl apply -k` sends.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    APP_UID,
    DEPLOY,
    K8S,
    KUBERNETES_VERSION,
    ROOT,
    config_map,
    find,
    in_ci,
    kustomization_dirs,
    one,
)

from service.settings import Settings

OVERLAYS = [K8S / "overlays" / "cpu", K8S / "overlays" / "gpu"]
APPLIED = [K8S / "base", *OVERLAYS]  # what carries the serving and worker tiers
WORKLOAD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet", "CronJob"}
TIERS = {"cnnserve": "serving", "cnnserve-worker": "worker"}
# Tier -> (gRPC port, metrics port), as `cnnserve serve` and `cnnserve worker --grpc-port 8600
# --metrics-port 9091` listen.
TIER_PORTS = {"serving": (8500, 9090), "worker": (8600, 9091)}
SETTINGS_DEFAULTS = Settings.model_fields


def _id(path: Path) -> str:
    return str(path.relative_to(K8S))


def pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for obj in objects:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        spec = obj["spec"]
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        out.append((f"{obj['kind']}/{obj['metadata']['name']}", spec["template"]))
    return out


def all_containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels + In/NotIn/Exists/DoesNotExist)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def tier_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one application container per pod"
    container: dict[str, Any] = containers[0]
    return container


def effective_settings(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """CNNSERVE_* as the container sees them: ConfigMap via envFrom, then explicit env."""
    values: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        values.update(one(objects, "ConfigMap", name).get("data", {}))
    for env in container.get("env", []):
        if "value" in env:
            values[env["name"]] = env["value"]
    return values


def setting(values: dict[str, str], field: str) -> float:
    """A numeric setting as the server will read it: the manifest's value, else Settings' default
    (max_connection_age_grace_s unset follows max_task_duration_s: Settings.connection_age_grace_s)."""
    raw = values.get(f"CNNSERVE_{field.upper()}")
    if raw is None:
        default = SETTINGS_DEFAULTS[field].default
        if default is None and field == "max_connection_age_grace_s":
            return setting(values, "max_task_duration_s")
        return float(default)
    return float(raw)


def prestop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in {"sleep", "/bin/sleep"} and len(command) == 2, f"unexpected preStop {command}"
    return float(command[1])


# --- rendering and schema validation -------------------------------------------------------------


def test_kustomization_dirs_cover_base_overlays_and_jobs() -> None:
    found = {_id(d) for d in kustomization_dirs()}
    assert {"base", "overlays/cpu", "overlays/gpu", "models", "batch"} <= found


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=_id)
def test_kustomization_renders_into_the_cnnserve_namespace(render: Any, directory: Path) -> None:
    objects = render(directory)
    assert objects, "renders nothing"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "cnnserve", f"{obj['kind']}/{obj['metadata']['name']}"
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "cnnserve", (
            f"{obj['kind']}/{obj['metadata']['name']}"
        )


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:  # pragma: no cover - depends on the environment
        if in_ci():
            pytest.fail("kubernetes-validate is missing: it is in the dev extras")
        pytest.skip("kubernetes-validate not installed (pip install -e '.[dev]')")
    return kubernetes_validate


# Custom resources of the Prometheus Operator have no schema in kubernetes-validate's bundle (it
# ships the core API only); test_monitoring_custom_resources checks them by structure instead.
CRD_GROUPS = ("monitoring.coreos.com/",)


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=_id)
def test_every_object_passes_strict_schema_validation(render: Any, directory: Path) -> None:
    kv = _validator()
    validated = 0
    for obj in render(directory):
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue
        try:
            kv.validate(obj, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
        validated += 1
    assert validated > 0


def test_strict_validation_catches_a_misspelt_field(render: Any) -> None:
    """The schema check above is only worth something if strict mode rejects unknown fields."""
    kv = _validator()
    deployment = copy.deepcopy(one(render(K8S / "base"), "Deployment", "cnnserve"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_monitoring_custom_resources(render: Any) -> None:
    for overlay in OVERLAYS:
        objects = render(overlay)
        monitor = one(objects, "PodMonitor", "cnnserve")
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        endpoints = spec["podMetricsEndpoints"]
        assert [e["port"] for e in endpoints] == ["metrics"]
        assert endpoints[0]["path"] == "/metrics"
        for name, tier in TIERS.items():
            deployment = one(objects, "Deployment", name)
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert selects(spec["selector"], labels), f"the PodMonitor does not select the {tier} pods"
            ports = {p["name"]: p["containerPort"] for p in tier_container(deployment)["ports"]}
            assert ports["metrics"] == TIER_PORTS[tier][1]
        # Batch scoring and export pods have no metrics endpoint: not selected.
        assert not selects(
            spec["selector"],
            {"app.kubernetes.io/name": "cnnserve", "app.kubernetes.io/component": "batch-scoring"},
        )
        # The job label the alerts and dashboard expect, per tier.
        relabel = {
            (r["regex"], r["replacement"]) for r in endpoints[0]["relabelings"] if r["targetLabel"] == "job"
        }
        assert relabel == {("serving", "cnnserve"), ("worker", "cnnserve-worker")}

        rule = one(objects, "PrometheusRule", "cnnserve")
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
        assert "CnnserveHighErrorRate" in alerts and "CnnserveNoReadyReplicas" in alerts


# --- pod security ----------------------------------------------------------------------------------


def _dockerfile_uid(path: Path) -> int:
    users = re.findall(r"^USER\s+(\S+)", path.read_text(), flags=re.MULTILINE)
    assert users, f"{path.name} has no USER"
    return int(users[-1].split(":")[0])


def test_pods_run_as_the_images_uid() -> None:
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.client"):
        assert _dockerfile_uid(DEPLOY / dockerfile) == APP_UID


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=_id)
def test_pod_templates_meet_the_restricted_pod_security_standard(render: Any, directory: Path) -> None:
    templates = pod_templates(render(directory))
    assert templates, "no workload"
    for where, template in templates:
        spec = template["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] == APP_UID and pod_sc["runAsGroup"] == APP_UID, where
        assert pod_sc["fsGroup"] == APP_UID, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden), f"{where}: {forbidden}"
        assert not any("hostPath" in v for v in spec.get("volumes", [])), f"{where}: hostPath volume"
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["serviceAccountName"] == "cnnserve", where
        # Service links would put CNNSERVE_*_PORT=tcp://... into the environment, which Settings reads.
        assert spec["enableServiceLinks"] is False, where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in all_containers(spec):
            cwhere = f"{where} container {container['name']}"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, cwhere
            assert not sc.get("privileged"), cwhere
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), cwhere
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == APP_UID, cwhere
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", cwhere
            assert sc["readOnlyRootFilesystem"] is True, cwhere
            assert not container.get("ports") or all("hostPort" not in p for p in container["ports"]), cwhere
            # Resources on every container, init containers included (quota admission needs them).
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in container["resources"][bound], f"{cwhere}: no {bound}.{resource}"
            # The image name is the one the overlays retag (the batch Job: the client image's); never a
            # floating tag.
            image = container["image"]
            assert re.fullmatch(r"[\w./-]*cnnserve(?:-client)?:[\w.-]+", image), f"{cwhere}: image {image}"
            assert not image.endswith(":latest"), cwhere
            assert container["imagePullPolicy"] == "IfNotPresent", cwhere
            # A read-only root needs a writable /tmp (HOME and caches point there) in the app containers.
            if container in spec["containers"]:
                tmp = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{cwhere}: /tmp must be an emptyDir"


def test_namespace_enforces_restricted_pod_security(render: Any) -> None:
    namespace = one(render(K8S / "base"), "Namespace", "cnnserve")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_service_account_mounts_no_token(render: Any) -> None:
    account = one(render(K8S / "base"), "ServiceAccount", "cnnserve")
    assert account["automountServiceAccountToken"] is False
    # No RBAC objects: the pods do not talk to the API server.
    for directory in kustomization_dirs():
        kinds = {o["kind"] for o in render(directory)}
        assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}, _id(directory)


# --- probes, shutdown, settings ---------------------------------------------------------------------


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_tiers_have_grpc_probes_and_a_startup_budget(render: Any, directory: Path) -> None:
    objects = render(directory)
    for name, tier in TIERS.items():
        container = tier_container(one(objects, "Deployment", name))
        grpc_port, metrics_port = TIER_PORTS[tier]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        # The serving tier also answers REST (http_port's default); the worker tier gRPC only.
        rest = {"http": SETTINGS_DEFAULTS["http_port"].default} if tier == "serving" else {}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port, **rest}, name
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[probe_name]
            # Native gRPC probe against grpc.health.v1, overall status (service "").
            assert probe["grpc"]["port"] == grpc_port, f"{name} {probe_name}"
            assert probe["grpc"].get("service", "") == "", f"{name} {probe_name}"
        startup = container["startupProbe"]
        budget = startup["failureThreshold"] * startup["periodSeconds"]
        # Model loading + warm-up of the full demo set on CPU; deploy/README.md documents the figure.
        assert budget >= 300, f"{name}: startupProbe allows only {budget}s"
        # Liveness must tolerate a stall longer than one slow scrape/GC pause.
        live = container["livenessProbe"]
        assert live["failureThreshold"] * live["periodSeconds"] >= 30, name
        if name == "cnnserve":
            assert container["args"] == ["serve"]
        else:
            assert container["args"] == [
                "worker",
                "--grpc-port",
                str(grpc_port),
                "--metrics-port",
                str(metrics_port),
            ]


def test_gpu_overlay_allows_a_longer_startup(render: Any) -> None:
    def budget(directory: Path) -> int:
        probe = tier_container(one(render(directory), "Deployment", "cnnserve"))["startupProbe"]
        return int(probe["failureThreshold"] * probe["periodSeconds"])

    assert budget(K8S / "overlays" / "gpu") >= 600 > budget(K8S / "overlays" / "cpu")


def shutdown_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Where a tier's shutdown budget does not add up (empty when every promise holds)."""
    problems = []
    for name in TIERS:
        deployment = one(objects, "Deployment", name)
        container = tier_container(deployment)
        values = effective_settings(objects, container)
        pre_stop = prestop_seconds(container)
        needed = pre_stop + setting(values, "max_task_duration_s") + setting(values, "grace_period_s")
        granted = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        if granted < needed:
            problems.append(
                f"{name}: terminationGracePeriodSeconds {granted} < preStop {pre_stop} + "
                f"max_task_duration_s + grace_period_s = {needed}"
            )
        if pre_stop < 3:
            problems.append(
                f"{name}: preStop sleep {pre_stop}s is too short for endpoint removal to propagate"
            )
        # server.stop(grace_period_s) cancels what still runs after the grace (docs/API.md, Lifecycle).
        if setting(values, "grace_period_s") < setting(values, "max_task_duration_s"):
            problems.append(f"{name}: grace_period_s < max_task_duration_s, a drain cancels running jobs")
        # A GOAWAY at max connection age must not cut off the longest gradient job.
        if setting(values, "max_connection_age_grace_s") < setting(values, "max_task_duration_s"):
            problems.append(f"{name}: max_connection_age_grace_s < max_task_duration_s")
        if "CNNSERVE_MAX_CONNECTION_AGE_S" not in values:
            problems.append(f"{name}: CNNSERVE_MAX_CONNECTION_AGE_S unset, clients never rebalance")
    return problems


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_termination_grace_covers_prestop_longest_job_and_drain(render: Any, directory: Path) -> None:
    assert shutdown_problems(render(directory)) == []


def test_grace_check_reads_the_configmap(render: Any) -> None:
    """Raising the longest job duration in the ConfigMap alone must break the budget."""
    objects = copy.deepcopy(render(K8S / "base"))
    config_map(objects)["CNNSERVE_MAX_TASK_DURATION_S"] = "900"
    problems = shutdown_problems(objects)
    assert any("cnnserve: terminationGracePeriodSeconds" in p for p in problems)
    assert any("cnnserve-worker: terminationGracePeriodSeconds" in p for p in problems)


def test_grace_check_falls_back_to_settings_defaults(render: Any) -> None:
    objects = copy.deepcopy(render(K8S / "base"))
    data = config_map(objects)
    for key in (
        "CNNSERVE_MAX_TASK_DURATION_S",
        "CNNSERVE_GRACE_PERIOD_S",
    ):
        data.pop(key)
    assert "CNNSERVE_MAX_CONNECTION_AGE_GRACE_S" not in data  # unset: follows the job duration
    values = effective_settings(objects, tier_container(one(objects, "Deployment", "cnnserve")))
    assert setting(values, "max_task_duration_s") == Settings.model_fields["max_task_duration_s"].default
    assert setting(values, "grace_period_s") == Settings.model_fields["grace_period_s"].default
    # Settings' default drain (30 s) is shorter than its default job duration (300 s): the manifests
    # must override it, and the check must notice when they do not. The connection-age grace follows
    # the job duration when unset, so its default holds; a smaller explicit value is caught.
    problems = shutdown_problems(objects)
    assert not any("max_connection_age_grace_s" in p for p in problems)
    assert any("grace_period_s < max_task_duration_s" in p for p in problems)
    data["CNNSERVE_MAX_CONNECTION_AGE_GRACE_S"] = "30"
    assert any("max_connection_age_grace_s < max_task_duration_s" in p for p in shutdown_problems(objects))


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_every_setting_in_the_manifests_is_a_valid_settings_field(render: Any, directory: Path) -> None:
    objects = render(directory)
    for name in TIERS:
        container = tier_container(one(objects, "Deployment", name))
        values = effective_settings(objects, container)
        fields: dict[str, str] = {}
        for key, value in values.items():
            assert key.startswith("CNNSERVE_"), f"{name}: {key} in the settings ConfigMap"
            field = key.removeprefix("CNNSERVE_").lower()
            assert field in Settings.model_fields, f"{name}: {key} is not a Settings field (ignored silently)"
            fields[field] = value
        # The values must pass Settings' own validation, exactly as the server will parse them.
        Settings.model_validate(fields)


def test_worker_address_points_at_the_headless_worker_service(render: Any) -> None:
    for directory in APPLIED:
        objects = render(directory)
        values = effective_settings(objects, tier_container(one(objects, "Deployment", "cnnserve")))
        host, port = values["CNNSERVE_WORKER_ADDRESS"].rsplit(":", 1)
        service = one(objects, "Service", host.split(".")[0])
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        # Headless: DNS gives every ready worker pod, and the forwarding channel's round_robin
        # spreads jobs over them (a virtual IP would pin each serving pod to one worker pod).
        assert service["spec"].get("clusterIP") == "None"
        assert not service["spec"].get("publishNotReadyAddresses", False)
        worker = one(objects, "Deployment", "cnnserve-worker")
        assert selects(
            {"matchLabels": service["spec"]["selector"]}, worker["spec"]["template"]["metadata"]["labels"]
        )
        # The worker itself must not forward gradient jobs anywhere.
        worker_values = effective_settings(objects, tier_container(worker))
        assert not worker_values.get("CNNSERVE_WORKER_ADDRESS")
        assert int(worker_values["CNNSERVE_WORKERS"]) >= 1


# --- GPU --------------------------------------------------------------------------------------------


def test_gpu_overlay_requests_a_gpu_and_the_cuda_image(render: Any) -> None:
    objects = render(K8S / "overlays" / "gpu")
    assert config_map(objects)["CNNSERVE_DEVICE"] == "cuda"
    for name in TIERS:
        deployment = one(objects, "Deployment", name)
        spec = deployment["spec"]["template"]["spec"]
        container = tier_container(deployment)
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1", name
        assert container["image"].endswith("-cuda"), name
        assert any(
            t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"]
        ), name
        assert spec["nodeSelector"], name


def test_cpu_overlay_uses_no_gpu(render: Any) -> None:
    objects = render(K8S / "overlays" / "cpu")
    assert config_map(objects)["CNNSERVE_DEVICE"] == "cpu"
    for name in TIERS:
        container = tier_container(one(objects, "Deployment", name))
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        assert container["image"].endswith("-cpu")


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_thread_pools_match_the_cpu_limit(render: Any, directory: Path) -> None:
    """ONNX Runtime's "0 = one per core" counts the node's cores, not the container's limit."""
    objects = render(directory)
    container = tier_container(one(objects, "Deployment", "cnnserve"))
    cpus = float(container["resources"]["limits"]["cpu"])
    values = effective_settings(objects, container)
    assert 1 <= int(values["CNNSERVE_INTRA_OP_THREADS"]) <= cpus
    worker = tier_container(one(objects, "Deployment", "cnnserve-worker"))
    wvalues = effective_settings(objects, worker)
    assert int(wvalues["CNNSERVE_WORKERS"]) * int(wvalues["CNNSERVE_TORCH_THREADS"]) <= float(
        worker["resources"]["limits"]["cpu"]
    )


# --- Services, HPA, PDB ------------------------------------------------------------------------------


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_services_select_their_tier_and_named_ports(render: Any, directory: Path) -> None:
    objects = render(directory)
    serving = one(objects, "Deployment", "cnnserve")
    labels = serving["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in tier_container(serving)["ports"]}
    clusterip = one(objects, "Service", "cnnserve")
    headless = one(objects, "Service", "cnnserve-headless")
    assert clusterip["spec"].get("clusterIP") != "None"
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)
    for service in (clusterip, headless):
        assert selects({"matchLabels": service["spec"]["selector"]}, labels)
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
        grpc_ports = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_ports and grpc_ports[0]["port"] == 8500 and grpc_ports[0]["appProtocol"] == "grpc"


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_autoscalers(render: Any, directory: Path, metric_catalog: Any) -> None:
    objects = render(directory)
    for name in TIERS:
        hpa = one(objects, "HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        resources = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert resources == ["cpu"], name
        # Utilization is relative to requests: the container needs a CPU request.
        assert "cpu" in tier_container(one(objects, "Deployment", name))["resources"]["requests"]
    pods_metrics = [
        m["pods"]
        for m in one(objects, "HorizontalPodAutoscaler", "cnnserve")["spec"]["metrics"]
        if m["type"] == "Pods"
    ]
    assert [m["metric"]["name"] for m in pods_metrics] == ["cnnserve_inflight_requests"]
    assert metric_catalog["cnnserve_inflight_requests"].type == "gauge"
    assert pods_metrics[0]["target"]["type"] == "AverageValue"

    # prometheus-adapter must publish exactly that name from that series.
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    rules = adapter["rules"]["custom"]
    published = {r["name"]["as"]: r for r in rules}
    rule = published["cnnserve_inflight_requests"]
    assert rule["seriesQuery"].startswith("cnnserve_inflight_requests{")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_disruption_budgets_protect_both_tiers_without_blocking_drains(render: Any, directory: Path) -> None:
    objects = render(directory)
    budgets = find(objects, "PodDisruptionBudget")
    for name in TIERS:
        labels = one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        matching = [b for b in budgets if selects(b["spec"]["selector"], labels)]
        assert len(matching) == 1, f"{name}: {len(matching)} PDBs select it"
        spec = matching[0]["spec"]
        min_replicas = one(objects, "HorizontalPodAutoscaler", name)["spec"]["minReplicas"]
        if "maxUnavailable" in spec:
            assert int(spec["maxUnavailable"]) >= 1
        else:
            assert int(spec["minAvailable"]) < min_replicas, f"{name}: a drain could never evict a pod"
        assert spec.get("unhealthyPodEvictionPolicy") == "AlwaysAllow"


# --- network policy -----------------------------------------------------------------------------------


def _opened_ports(policies: list[dict[str, Any]], labels: dict[str, str], direction: str) -> set[int]:
    ports: set[int] = set()
    for policy in policies:
        spec = policy["spec"]
        if direction.capitalize() not in spec.get("policyTypes", []) or not selects(
            spec["podSelector"], labels
        ):
            continue
        for rule in spec.get(direction, []):
            assert rule.get("ports"), (
                f"{policy['metadata']['name']}: a {direction} rule without ports opens all"
            )
            ports |= {int(p["port"]) for p in rule["ports"]}
    return ports


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_network_policies_default_deny_and_open_only_service_ports(render: Any, directory: Path) -> None:
    objects = render(directory)
    policies = find(objects, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, "no default-deny policy"

    serving = one(objects, "Deployment", "cnnserve")["spec"]["template"]["metadata"]["labels"]
    worker = one(objects, "Deployment", "cnnserve-worker")["spec"]["template"]["metadata"]["labels"]
    batch = {"app.kubernetes.io/name": "cnnserve", "app.kubernetes.io/component": "batch-scoring"}
    assert _opened_ports(policies, serving, "ingress") == {8500, 8000, 9090}  # gRPC, REST, metrics
    assert _opened_ports(policies, worker, "ingress") == {8600, 9091}
    assert _opened_ports(policies, batch, "ingress") == set()
    # Egress: DNS for all; serving -> worker gRPC; batch scoring -> serving gRPC.
    assert _opened_ports(policies, serving, "egress") == {53, 8600}
    assert _opened_ports(policies, worker, "egress") == {53}
    assert _opened_ports(policies, batch, "egress") == {53, 8500}

    # The worker's gRPC port is reachable from serving pods only.
    for policy in policies:
        if not selects(policy["spec"]["podSelector"], worker):
            continue
        for rule in policy["spec"].get("ingress", []):
            if 8600 in {int(p["port"]) for p in rule["ports"]}:
                assert rule["from"] and all(
                    "podSelector" in peer
                    and selects(peer["podSelector"], serving)
                    and not selects(peer["podSelector"], batch)
                    and "namespaceSelector" not in peer
                    for peer in rule["from"]
                )


# --- model repository volume, model export Job, batch scoring -----------------------------------------


@pytest.mark.parametrize("directory", APPLIED, ids=_id)
def test_serving_pods_mount_the_model_repository_read_only(render: Any, directory: Path) -> None:
    objects = render(directory)
    claim = one(objects, "PersistentVolumeClaim", "cnnserve-models")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for name in TIERS:
        spec = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in all_containers(spec):
            mounts = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
            assert len(mounts) == 1 and mounts[0]["readOnly"] is True, f"{name}/{container['name']}"
            pvc = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
            assert pvc == {"claimName": "cnnserve-models", "readOnly": True}
        values = effective_settings(objects, tier_container(one(objects, "Deployment", name)))
        assert values["CNNSERVE_REPOSITORY"] == "/models"


def test_model_export_job_writes_the_repository(render: Any) -> None:
    job = one(render(K8S / "models"), "Job", "cnnserve-models")
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    (container,) = spec["containers"]
    assert job_steps(job) == [
        ["python", "-m", "export", "demo", "--repository", "/models"],
        ["touch", f"/models/{DEMO_MARKER}"],
    ]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
    assert not mount.get("readOnly")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == "cnnserve-models"


def test_batch_scoring_is_an_indexed_job_with_one_shard_per_index(render: Any) -> None:
    job = one(render(K8S / "batch"), "Job", "cnnserve-score")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    completions = spec["completions"]
    assert 1 <= spec["parallelism"] <= completions
    (container,) = spec["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "score"
    shard = next(a for a in args if a.startswith("--shard="))
    assert shard == f"--shard=$(JOB_COMPLETION_INDEX)/{completions}", "the shard count must equal completions"
    output = next(a for a in args if a.startswith("--output="))
    assert "$(JOB_COMPLETION_INDEX)" in output, "shards would overwrite each other's output"
    # $(VAR) in args only expands for variables declared in the container's env.
    assert "JOB_COMPLETION_INDEX" in {e["name"] for e in container["env"]}
    # The scorer reaches the serving tier through the ClusterIP Service.
    address = next(a for a in args if a.startswith("--address=")).split("=", 1)[1]
    assert address.split(":")[0] == "cnnserve" and address.endswith(":8500")
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "batch-scoring"
    # The light client image (deploy/Dockerfile.client), tagged as its build line says.
    assert container["image"] == "cnnserve-client:0.1.0"
    assert "-t cnnserve-client:0.1.0 " in (DEPLOY / "Dockerfile.client").read_text()


def test_readme_states_the_validated_kubernetes_version() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert f"Kubernetes {KUBERNETES_VERSION}" in readme
    assert (ROOT / "deploy" / "k8s" / "base" / "cnnserve.env").exists()


# --- wait-for-models: pods start with the whole model set ----------------------------------------------

# Written into the repository root by the cnnserve-models Job (and `make demo`) after the last model.
DEMO_MARKER = ".demo-complete"


def job_script(job: dict[str, Any]) -> str:
    """The shell script the model export Job runs (`/bin/sh -c SCRIPT`)."""
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:2] == ["/bin/sh", "-c"] and len(command) == 3, command
    script: str = command[2]
    return script


def job_steps(job: dict[str, Any]) -> list[list[str]]:
    """The Job script's commands, one argv per line (comments and `set -e` left out)."""
    lines = [line.strip() for line in job_script(job).splitlines()]
    assert "set -e" in lines, "without set -e a failed export would still write the marker"
    return [shlex.split(line) for line in lines if line and not line.startswith("#") and line != "set -e"]


def wait_for_models_script(objects: list[dict[str, Any]], deployment: str) -> str:
    """The source the wait-for-models init container of `deployment` runs, followed through its
    command, volume mount and ConfigMap as the kubelet would."""
    spec = one(objects, "Deployment", deployment)["spec"]["template"]["spec"]
    (init,) = [c for c in spec["initContainers"] if c["name"] == "wait-for-models"]
    program, path = init["command"]
    assert program == "python" and not init.get("args"), init["command"]
    (mount,) = [m for m in init["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    data: dict[str, str] = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    return data[path.removeprefix(mount["mountPath"].rstrip("/") + "/")]


def _init_scripts(render: Any) -> str:
    """The one script both tiers' init containers run, in base and both overlays."""
    scripts = set()
    for directory in APPLIED:
        objects = render(directory)
        for name in TIERS:
            scripts.add(wait_for_models_script(objects, name))
            # CNNSERVE_REPOSITORY and CNNSERVE_MODELS reach the init container as they reach the server.
            spec = one(objects, "Deployment", name)["spec"]["template"]["spec"]
            (init,) = [c for c in spec["initContainers"] if c["name"] == "wait-for-models"]
            assert init["envFrom"] == tier_container(one(objects, "Deployment", name))["envFrom"], name
    (script,) = scripts
    return script


def _fake_export(bin_dir: Path, *, fail: bool = False) -> Path:
    """A `python` for the Job's script that does what `python -m export demo` does to the volume,
    in its order: each version is built under .tmp-* and renamed into place, lenet5 first. Between
    the two models it waits for the file `release` next to bin_dir, so a test can look at the
    repository mid-Job. Its argv goes to `argv`."""
    bin_dir.mkdir()
    fake = bin_dir / "python"
    fake.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            printf '%s\\n' "$@" > '{bin_dir.parent}/argv'
            repo="$5"
            publish() {{
                mkdir -p "$repo/$1/.tmp-1-abc" && echo '{{}}' > "$repo/$1/.tmp-1-abc/metadata.json"
                mv "$repo/$1/.tmp-1-abc" "$repo/$1/1"
            }}
            publish lenet5
            while [ ! -e '{bin_dir.parent}/release' ]; do sleep 0.05; done
            {"exit 1" if fail else "publish resnet50"}
            """
        )
    )
    fake.chmod(0o755)
    return fake


def _run_job(script: str, repository: Path, bin_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["/bin/sh", "-c", script.replace("/models", str(repository))],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _init_env(repository: Path, models: str = "") -> dict[str, str]:
    return {"CNNSERVE_REPOSITORY": str(repository), "CNNSERVE_MODELS": models, "PATH": "/usr/bin:/bin"}


def _blocks(script: str, env: dict[str, str], seconds: float = 2.0) -> str:
    """Run the init script; it must still be waiting after `seconds`. Returns what it logged."""
    with pytest.raises(subprocess.TimeoutExpired) as waited:
        subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=seconds
        )
    out = waited.value.stdout or b""
    return out.decode() if isinstance(out, bytes) else out


def _finishes(script: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_pods_wait_until_the_model_job_has_exported_every_model(render: Any, tmp_path: Path) -> None:
    """The init container as rendered, against the Job's own script as rendered (its `python -m
    export demo` simulated): a pod must not start while only LeNet-5 is exported, and must start
    once the Job is done, without a restart."""
    script = _init_scripts(render)
    job = job_script(one(render(K8S / "models"), "Job", "cnnserve-models"))
    repository = tmp_path / "models"
    repository.mkdir()
    env = _init_env(repository)
    log = _blocks(script, env)  # empty volume
    assert f"waiting for {repository / DEMO_MARKER}" in log and "Found so far: nothing yet" in log, log

    bin_dir = tmp_path / "bin"
    _fake_export(bin_dir)
    with _run_job(job, repository, bin_dir) as exporting:
        _wait_for(repository / "lenet5" / "1" / "metadata.json")
        # Mid-Job: one complete version on the volume. The pod goes on waiting, and says why.
        with subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as pod:
            try:
                with pytest.raises(subprocess.TimeoutExpired):
                    pod.wait(timeout=2)
                (tmp_path / "release").touch()
                assert exporting.wait(timeout=20) == 0
                # The same init container process sees the marker at its next poll: the pod starts.
                assert pod.wait(timeout=20) == 0
            finally:
                pod.kill()
                exporting.kill()
            log, _ = pod.communicate()
    assert (tmp_path / "argv").read_text().split() == [
        "-m",
        "export",
        "demo",
        "--repository",
        str(repository),
    ]
    assert "waiting for" in log and "Found so far: lenet5/1" in log, log
    assert log.rstrip().endswith("model repository ready: lenet5/1, resnet50/1"), log
    assert _finishes(script, env).strip() == "model repository ready: lenet5/1, resnet50/1"


def test_a_failed_model_job_writes_no_marker(render: Any, tmp_path: Path) -> None:
    script = _init_scripts(render)
    job = job_script(one(render(K8S / "models"), "Job", "cnnserve-models"))
    repository = tmp_path / "models"
    repository.mkdir()
    _fake_export(tmp_path / "bin", fail=True)
    (tmp_path / "release").touch()
    with _run_job(job, repository, tmp_path / "bin") as exporting:
        assert exporting.wait(timeout=20) != 0
    assert (repository / "lenet5" / "1").is_dir() and not (repository / DEMO_MARKER).exists()
    assert "Found so far: lenet5/1" in _blocks(script, _init_env(repository))


def test_wait_for_models_without_the_job_says_how_to_proceed(render: Any, tmp_path: Path) -> None:
    """Own models copied onto the volume, no Job, no CNNSERVE_MODELS: the pod waits for the marker,
    and its log names both ways out."""
    script = _init_scripts(render)
    (tmp_path / "mine" / "3").mkdir(parents=True)
    (tmp_path / "mine" / "3" / "metadata.json").write_text("{}")
    log = _blocks(script, _init_env(tmp_path))
    assert str(tmp_path / DEMO_MARKER) in log and "CNNSERVE_MODELS" in log and "mine/3" in log, log
    (tmp_path / DEMO_MARKER).touch()
    assert _finishes(script, _init_env(tmp_path)).strip() == "model repository ready: mine/3"


def test_wait_for_models_honours_cnnserve_models(render: Any, tmp_path: Path) -> None:
    """With CNNSERVE_MODELS set the pod waits for exactly those models (and pinned versions), with
    or without a marker; versions still being built (.tmp-*) do not count."""
    script = _init_scripts(render)
    env = _init_env(tmp_path, "lenet5, resnet50:2")
    (tmp_path / "lenet5" / "1").mkdir(parents=True)
    (tmp_path / "lenet5" / "1" / "metadata.json").write_text("{}")
    for version in ("1", ".tmp-2-x1y2"):
        (tmp_path / "resnet50" / version).mkdir(parents=True)
        (tmp_path / "resnet50" / version / "metadata.json").write_text("{}")
    (tmp_path / DEMO_MARKER).touch()  # a marker does not stand in for a model the settings name
    log = _blocks(script, env)
    assert "waiting for resnet50 version 2: the models CNNSERVE_MODELS=lenet5, resnet50:2 selects" in log, log
    assert "lenet5 (any" not in log
    (tmp_path / DEMO_MARKER).unlink()
    (tmp_path / "resnet50" / ".tmp-2-x1y2").rename(tmp_path / "resnet50" / "2")
    assert _finishes(script, env).strip() == "model repository ready: lenet5/1, resnet50/1, resnet50/2"

    missing_model = _blocks(script, _init_env(tmp_path, "lenet5,vgg19:all"))
    assert "waiting for vgg19 (any version)" in missing_model, missing_model
    # A malformed selection is the server's to report (with its precise message), not a silent hang.
    assert "malformed" in _finishes(script, _init_env(tmp_path, "lenet5:latest"))


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parses(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """'' when argv parses, else argparse's complaint."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parser.parse_args(argv)
    except SystemExit as exc:
        return stderr.getvalue() or f"exit {exc.code}"
    return ""


def _container_argv(render: Any) -> list[tuple[str, str, list[str]]]:
    """(where, program, argv) of every container command in the rendered manifests; $(VAR) filled."""
    out = []
    for directory in kustomization_dirs():
        for where, template in pod_templates(render(directory)):
            for container in template["spec"]["containers"]:
                command = [*container.get("command", []), *container.get("args", [])]
                # A shell script (the model export Job): each of its lines is a command.
                lines = (
                    [shlex.split(line) for line in command[2].splitlines() if line.strip()]
                    if command[:2] == ["/bin/sh", "-c"]
                    else [command]
                )
                for line in lines:
                    argv = [re.sub(r"\$\(\w+\)", "3", a) for a in line]
                    if argv[:3] == ["python", "-m", "export"]:
                        out.append((f"{_id(directory)} {where}", "export", argv[3:]))
                    elif not container.get("command"):  # the image's ENTRYPOINT: cnnserve
                        out.append((f"{_id(directory)} {where}", "cnnserve", argv))
    return out


def test_container_commands_parse_with_the_real_command_lines(render: Any) -> None:
    """Every `cnnserve ...` and `python -m export ...` the manifests run is accepted by the project's
    own argument parsers: the subcommand exists and its arguments parse."""
    from export.__main__ import build_parser as export_parser
    from service.cli import build_parser as cnnserve_parser

    parsers = {"cnnserve": cnnserve_parser(), "export": export_parser()}
    checked: collections.Counter[str] = collections.Counter()
    for where, program, argv in _container_argv(render):
        assert argv[0] in _subcommands(parsers[program]), f"{where}: `{program} {argv[0]}` does not exist"
        complaint = _parses(parsers[program], argv)
        assert complaint == "", f"{where}: {program} {' '.join(argv)}: {complaint}"
        checked[f"{program} {argv[0]}"] += 1
    # serve and worker in base, cpu and gpu at least; the model export Job's demo build
    assert checked["cnnserve serve"] >= 3 and checked["cnnserve worker"] >= 3, checked
    assert checked["export demo"] >= 1, checked
