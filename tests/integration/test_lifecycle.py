"""Process lifecycle: UNAVAILABLE while the models load, SERVING after warm-up, a SIGTERM drain that
finishes accepted calls and exits 0, and a clear non-zero exit when no model can be loaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_process import ServerProcess

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRACE_S = 30


def batch_request(seed: int, n: int = 2) -> pb.ClassifyBatchRequest:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        arr = rng.standard_normal((3, 224, 224)).astype(np.float32)
        images.append(
            pb.ImageInput(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=arr.tobytes()))
        )
    return pb.ClassifyBatchRequest(model="resnet18", images=images, top_k=1)


def test_startup_unavailable_then_serving_then_sigterm_drain(
    demo_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    server = start_server(
        demo_repository, "--models", "resnet18", "--max-batch-size", "1", "--intra-op-threads", "1",
        "--grace-period-s", str(GRACE_S),
    )  # fmt: skip
    server.wait_listening()
    stub = pb_grpc.InferenceStub(server.channel)
    health = health_pb2_grpc.HealthStub(server.channel)

    # --- startup: the ports are open before the models are loaded ---
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == NOT_SERVING, "the model loaded before the first probe; nothing to observe"
    with pytest.raises(grpc.RpcError) as info:
        stub.ClassifyBatch(batch_request(0, 1), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert server.http_get("/healthz")[0] == 503
    server.wait_ready()
    assert server.http_get("/healthz")[0] == 200
    assert "ready in" in server.log

    # --- drain: calls accepted before SIGTERM finish; the health watcher hears NOT_SERVING ---
    watch = health.Watch(health_pb2.HealthCheckRequest(service="cnnserve.v1.Inference"), timeout=120)
    assert next(watch).status == SERVING
    results: dict[int, object] = {}

    def call(seed: int) -> None:
        channel = server.new_channel()
        try:
            results[seed] = pb_grpc.InferenceStub(channel).ClassifyBatch(batch_request(seed), timeout=120)
        except grpc.RpcError as exc:
            results[seed] = exc
        finally:
            channel.close()

    callers = [threading.Thread(target=call, args=(seed,)) for seed in range(1, 5)]
    for t in callers:
        t.start()
    deadline = time.monotonic() + 30
    while (
        server.sample("cnnserve_inflight_requests", method="ClassifyBatch") < 4
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    assert server.sample("cnnserve_inflight_requests", method="ClassifyBatch") == 4
    sent_at = time.monotonic()
    server.process.send_signal(15)
    assert next(watch).status == NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.InferenceStub(server.new_channel()).ClassifyBatch(batch_request(9, 1), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    for t in callers:
        t.join(120)
    failures = {seed: r for seed, r in results.items() if isinstance(r, grpc.RpcError)}
    assert not failures, {seed: (e.code(), e.details()) for seed, e in failures.items()}
    assert all(len(results[seed].results) == 2 for seed in range(1, 5))  # type: ignore[attr-defined]
    code = server.process.wait(GRACE_S + 10)
    assert code == 0, server.log
    assert time.monotonic() - sent_at < GRACE_S
    assert "shutting down" in server.log and "stopped" in server.log


def test_no_loadable_model_exits_non_zero(tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(empty)
    code = server.process.wait(120)
    server._reader.join(5)
    assert code == 1
    assert "no model could be loaded" in server.log
    assert "Traceback" not in server.log  # an operator error, said in one line


def test_sighup_serves_a_new_version_and_unloads_the_old(
    demo_repository: Path, start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Issue 13: SIGHUP rescans the repository of a running server; its default action (ending
    the process) is replaced. A second version of resnet18, published as the exporter does (built
    aside, renamed into place), takes over as the latest, and version 1 is unloaded. New gradient
    processes that know version 2 replace the running one, and then it answers Explain too."""
    import json
    import shutil
    import signal

    root = tmp_path / "repository"
    shutil.copytree(demo_repository / "resnet18" / "1", root / "resnet18" / "1")
    server = start_server(root, "--workers", "1")
    server.wait_ready()
    stub = pb_grpc.InferenceStub(server.channel)
    explain = pb.Capability.CAPABILITY_EXPLAIN
    first = stub.GetModel(pb.GetModelRequest(name="resnet18"), timeout=10)
    assert list(first.versions) == [1] and explain in first.capabilities

    staging = root / "resnet18" / ".tmp-2"
    shutil.copytree(root / "resnet18" / "1", staging)
    meta = json.loads((staging / "metadata.json").read_text())
    (staging / "metadata.json").write_text(json.dumps({**meta, "version": 2}))
    staging.rename(root / "resnet18" / "2")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while list(stub.GetModel(pb.GetModelRequest(name="resnet18"), timeout=10).versions) != [2]:
        assert server.process.poll() is None, server.log
        assert time.monotonic() < deadline, server.log[-3000:]
        time.sleep(0.1)
    shape = [3, 224, 224]
    tensor = pb.ImageInput(
        tensor=pb.Tensor(shape=shape, dtype="float32", data=np.zeros(shape, np.float32).tobytes())
    )
    assert stub.Classify(pb.ClassifyRequest(model="resnet18", image=tensor), timeout=10).version == 2
    assert "repository reload: serving resnet18:2" in server.log
    assert "repository reload: unloaded resnet18:1" in server.log

    # Classification first; Explain once gradient processes that know version 2 are ready.
    while explain not in stub.GetModel(pb.GetModelRequest(name="resnet18"), timeout=10).capabilities:
        assert server.process.poll() is None, server.log
        assert time.monotonic() < deadline + 120, server.log[-3000:]
        time.sleep(0.2)
    assert "repository reload: gradient workers renewed" in server.log
    explained = stub.Explain(pb.ExplainRequest(model="resnet18", images=[tensor]), timeout=120)
    assert explained.version == 2 and len(explained.explanations) == 1
