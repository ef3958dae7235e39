"""Per-model counters exist at 0 from the moment a model is loaded (service/observability/metrics.py).

A labelled counter has no series until its first increment, and `increase()`/`rate()` cannot see
a series' first step: without these series CnnserveEngineRestarts missed a pod's first engine
restart. Each test uses model names of its own: the registry is process-wide.
"""

from __future__ import annotations

import asyncio
import typing
from typing import Any

from servicer_fakes import FakeEngine, FakeModel, FakePoolLifecycle, Harness

from service._proto.cnnserve.v1 import inference_pb2
from service._proto.inference import grpc_predict_v2_pb2
from service.frontend.gradient_tier import GradientTierServer
from service.observability import metrics
from service.settings import Settings
from service.worker.jobs import JobKind

# Every gradient capability (service.catalog.loaded_model adds feature_maps and filters to any
# version with weights.pt).
GRADIENTS = {
    "classify": True,
    "explain": True,
    "dream": True,
    "stylize": True,
    "feature_maps": True,
    "filters": True,
}
CLASSIFY_ONLY = {"classify": True, "explain": False, "dream": False, "stylize": False}
GRADIENT_METHODS = [m for methods in metrics.TASK_METHODS.values() for m in methods]


def sample(name: str, **labels: str) -> float | None:
    """The sample's value, None when the series does not exist (unlike servicer_fakes.counter)."""
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


def classify_series(model: str) -> dict[str, float | None]:
    series = {
        "engine_restarts": sample("cnnserve_engine_restarts_total", model=model),
        "images": sample("cnnserve_images_total", model=model),
    }
    for method in metrics.CLASSIFY_METHODS:
        series[f"{method} OK"] = sample("cnnserve_requests_total", method=method, model=model, code="OK")
        series[f"{method} queue_full"] = sample(
            "cnnserve_rejections_total", method=method, model=model, reason="queue_full"
        )
    return series


def gradient_series(model: str) -> dict[str, float | None]:
    series = {
        f"{method} OK": sample("cnnserve_requests_total", method=method, model=model, code="OK")
        for method in GRADIENT_METHODS
    }
    for task in metrics.TASK_METHODS:
        series[f"{task} steps"] = sample("cnnserve_task_steps_total", task=task, model=model)
    return series


class IdlePool(FakePoolLifecycle):
    """A GradientPool double that starts, stays alive and runs nothing."""

    async def submit(self, task: Any, **kwargs: Any) -> Any:
        raise AssertionError("no job is submitted in these tests")


def test_label_values_are_the_real_rpc_methods_and_task_kinds() -> None:
    """The series created at load must be the ones the servicers increment: the methods are RPCs of
    our two services (frontend/calls.py labels each RPC by its short name), the jobs JobKind."""
    rpcs = {
        *inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods_by_name,
        *grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name,
    }
    rest = {f"rest:{method}" for method in ("ModelInfer", "Classify")}  # frontend/rest.py's labels
    assert set(metrics.CLASSIFY_METHODS) | set(GRADIENT_METHODS) <= rpcs | rest
    assert set(metrics.TASK_METHODS) == set(typing.get_args(JobKind))


def test_serving_server_creates_the_classification_counters_at_zero() -> None:
    digits = FakeModel("zero-serve-digits", 1, capabilities=CLASSIFY_ONLY)
    vgg = FakeModel("zero-serve-vgg", 1, capabilities=GRADIENTS)
    assert classify_series(digits.name)["engine_restarts"] is None  # nothing before the load
    harness = Harness(FakeEngine([digits, vgg]))  # workers=0, no worker tier: no gradient RPCs
    try:
        for model in (digits.name, vgg.name):
            assert classify_series(model) == dict.fromkeys(classify_series(model), 0.0), model
            # Nothing answers gradient RPCs here: no series that could never move.
            assert set(gradient_series(model).values()) == {None}, model
    finally:
        harness.close()


def test_a_local_worker_pool_adds_the_gradient_counters_of_capable_models() -> None:
    digits = FakeModel("zero-pool-digits", 1, capabilities=CLASSIFY_ONLY)
    vgg = FakeModel("zero-pool-vgg", 1, capabilities=GRADIENTS)
    explain_only = FakeModel("zero-pool-resnet", 1, capabilities={"classify": True, "explain": True})
    harness = Harness(FakeEngine([digits, vgg, explain_only]), pool=IdlePool())
    try:
        assert gradient_series(vgg.name) == dict.fromkeys(gradient_series(vgg.name), 0.0)
        assert set(gradient_series(digits.name).values()) == {None}
        assert {k: v for k, v in gradient_series(explain_only.name).items() if v is not None} == {
            "Explain OK": 0.0,
            "explain steps": 0.0,
        }
        assert classify_series(vgg.name)["engine_restarts"] == 0.0
    finally:
        harness.close()


def test_a_forwarding_serving_tier_counts_gradient_rpcs_but_runs_no_jobs() -> None:
    vgg = FakeModel("zero-forward-vgg", 1, capabilities=GRADIENTS)
    # Nothing listens there: the series are created at load, whatever the worker tier's state.
    harness = Harness(FakeEngine([vgg]), worker_address="127.0.0.1:9")
    try:
        series = gradient_series(vgg.name)
        assert {k: series[k] for k in series if k.endswith(" OK")} == {
            f"{m} OK": 0.0 for m in GRADIENT_METHODS
        }
        assert {series[f"{task} steps"] for task in metrics.TASK_METHODS} == {None}
    finally:
        harness.close()


def test_worker_tier_creates_the_gradient_counters_at_zero() -> None:
    vgg = FakeModel("zero-worker-vgg", 1, capabilities=GRADIENTS)
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0)

    async def load() -> None:
        worker = GradientTierServer(settings, catalog=FakeEngine([vgg]), pool=IdlePool())
        await worker.start()
        try:
            await worker.load()
        finally:
            await worker.shutdown(grace_s=0)

    asyncio.run(load())
    assert gradient_series(vgg.name) == dict.fromkeys(gradient_series(vgg.name), 0.0)
    # The worker tier classifies nothing: no classification series.
    assert set(classify_series(vgg.name).values()) == {None}
