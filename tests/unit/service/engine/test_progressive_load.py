"""Fast start (issue 13): versions load in parallel and each serves as soon as it is warm; a
model's config.yaml overrides the batching settings, visible in GetModel and Triton's ModelConfig."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from linear_repo import settings_for
from servicer_fakes import Harness

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as oip
from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.engine.engine import ClassificationEngine
from service.engine.session import ModelSession
from service.errors import Unavailable

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def hold_warmup_of(monkeypatch: pytest.MonkeyPatch, model: str) -> threading.Event:
    """`model`'s warm-up waits until the returned event is set (a slow model, like VGG-19)."""
    release = threading.Event()
    real = ModelSession.warmup

    def warmup(self: ModelSession, sizes: Any) -> float:
        if self.path.parent.parent.name == model:
            assert release.wait(30), "never released"
        return real(self, sizes)

    monkeypatch.setattr(ModelSession, "warmup", warmup)
    return release


def test_a_warm_version_serves_while_another_still_loads(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = hold_warmup_of(monkeypatch, "rgb")
    engine = ClassificationEngine(settings_for(repo["root"], models="gray,rgb", load_concurrency=2))
    warm: list[str] = []
    planned: list[list[str]] = []
    loading = threading.Thread(
        target=engine.load, kwargs={"on_loaded": lambda m: warm.append(m.name), "on_planned": planned.append}
    )
    loading.start()
    try:
        deadline = time.monotonic() + 30
        while warm != ["gray"]:
            assert time.monotonic() < deadline, warm
            time.sleep(0.01)
        assert planned == [["gray", "rgb"]]
        assert not engine.ready and not engine.accepting  # nothing started yet
        with pytest.raises(Unavailable, match="'rgb' is still loading"):
            engine.get("rgb")
        gray = engine.get("gray")
        assert gray.serving is not None and gray.serving.warmup_batch_sizes == (1, 4)  # auto
    finally:
        release.set()
        loading.join(30)
    assert warm == ["gray", "rgb"] and engine.ready is False  # ready once started


def test_health_per_model_during_a_staggered_load(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = hold_warmup_of(monkeypatch, "rgb")
    root = repo["root"]
    engine = ClassificationEngine(settings_for(root, models="gray,rgb", load_concurrency=2))
    h = Harness(engine, load=False, repository=root, models="gray,rgb")  # type: ignore[arg-type]
    try:
        loading = h.submit(h.server.load())
        health = health_pb2_grpc.HealthStub(h.channel)

        def status(name: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status

        deadline = time.monotonic() + 30
        while True:
            try:
                if status("model:gray") == SERVING:
                    break
            except grpc.RpcError:
                pass  # not registered yet
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert status("model:rgb") == NOT_SERVING and status("") == NOT_SERVING
        stub = pb_grpc.InferenceStub(h.channel)
        tensor = np.zeros((1, 8, 8), np.float32)
        request = pb.ClassifyRequest(
            model="gray",
            image=pb.ImageInput(tensor=pb.Tensor(shape=[1, 8, 8], dtype="float32", data=tensor.tobytes())),
        )
        assert len(stub.Classify(request, timeout=10).classes) > 0  # gray answers while rgb loads
        with pytest.raises(grpc.RpcError) as loading_model:
            stub.Classify(pb.ClassifyRequest(model="rgb", image=request.image), timeout=10)
        assert loading_model.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "still loading" in str(loading_model.value.details())
        info = stub.GetModel(pb.GetModelRequest(name="gray"), timeout=5)
        assert info.ready
        release.set()
        loading.result(30)
        assert status("") == SERVING and status("model:rgb") == SERVING
    finally:
        release.set()
        h.close()


def test_serve_when_any_turns_the_overall_status_serving_with_the_first_model(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = hold_warmup_of(monkeypatch, "rgb")
    root = repo["root"]
    engine = ClassificationEngine(settings_for(root, models="gray,rgb", load_concurrency=2, serve_when="any"))
    h = Harness(engine, load=False, repository=root, models="gray,rgb", serve_when="any")  # type: ignore[arg-type]
    try:
        loading = h.submit(h.server.load())
        health = health_pb2_grpc.HealthStub(h.channel)
        deadline = time.monotonic() + 30
        while health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status != SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="model:rgb"), timeout=5).status == NOT_SERVING
        )
        release.set()
        loading.result(30)
    finally:
        release.set()
        h.close()


def test_a_models_config_overrides_the_settings_and_is_reported(repo: dict[str, Any]) -> None:
    root: Path = repo["root"]
    (root / "gray" / "config.yaml").write_text(
        "max_batch_size: 2\nmax_queue_delay_s: 0.005\nmax_queue_size: 3\nwarmup_batch_sizes: all\n"
    )
    engine = ClassificationEngine(settings_for(root, models="gray,rgb"))
    h = Harness(engine, repository=root, models="gray,rgb")  # type: ignore[arg-type]
    try:
        gray, rgb = engine.get("gray"), engine.get("rgb")
        assert engine.capacity(gray) == 2 + 3 and engine.capacity(rgb) == 4 + 256  # settings: 4, 256
        info = pb_grpc.InferenceStub(h.channel).GetModel(pb.GetModelRequest(name="gray"), timeout=5)
        assert info.serving.max_batch_size == 2 and info.serving.max_queue_size == 3
        assert info.serving.max_queue_delay_s == pytest.approx(0.005)
        assert list(info.serving.warmup_batch_sizes) == [1, 2]
        assert info.serving.config_file == str(root / "gray" / "config.yaml")
        other = pb_grpc.InferenceStub(h.channel).GetModel(pb.GetModelRequest(name="rgb"), timeout=5)
        assert other.serving.max_batch_size == 4 and other.serving.config_file == ""
        config = oip_grpc.GRPCInferenceServiceStub(h.channel).ModelConfig(
            oip.ModelConfigRequest(name="gray"), timeout=5
        )
        assert config.config.max_batch_size == 2
        assert config.config.dynamic_batching.max_queue_delay_microseconds == 5000
    finally:
        h.close()


def test_load_concurrency_defaults_to_the_cores_on_cpu(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod.os, "cpu_count", lambda: 8)
    engine = ClassificationEngine(settings_for(repo["root"], models="gray"))
    engine.load()
    assert engine._load_workers == 4  # the cores, at most 4
    engine = ClassificationEngine(settings_for(repo["root"], models="gray", load_concurrency=1))
    engine.load()
    assert engine._load_workers == 1
    assert "loaded 1 at a time" in engine.startup_summary()


def test_the_biggest_models_start_first_and_the_rest_smallest_first() -> None:
    from types import SimpleNamespace

    from service.engine.engine import load_order

    def version(name: str, size: int) -> Any:
        return SimpleNamespace(name=name, metadata={"files": {"model.onnx": {"bytes": size}}})

    models = [version(n, s) for n, s in [("alexnet", 244), ("lenet5", 1), ("vgg19", 574), ("resnet50", 102)]]
    names = lambda order: [v.name for v in order]  # noqa: E731
    # 2 threads: VGG-19 alone on one from the start, the others smallest first on the other.
    assert names(load_order(models, 2)) == ["vgg19", "lenet5", "resnet50", "alexnet"]
    assert names(load_order(models, 3)) == ["vgg19", "alexnet", "lenet5", "resnet50"]
    assert names(load_order(models, 1)) == ["lenet5", "resnet50", "alexnet", "vgg19"]
    assert names(load_order(models, 9)) == ["vgg19", "alexnet", "resnet50", "lenet5"]
    assert load_order([], 2) == []
