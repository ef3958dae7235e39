"""The gradient-worker tier end to end: `python -m service worker` (one PyTorch worker process) and a
`python -m service serve --worker-address ...` frontend, two processes on 127.0.0.1 over the demo
repository (lenet5 trained, resnet18 random weights). Each tier's /metrics is its own, so the
worker's job counters show what happened to a forwarded job after the frontend answered.

The worker's cost budget (--max-task-cost) fits one LONG_DREAM and not two, so a second one is
refused with the pool's RESOURCE_EXHAUSTED (estimated wait) while the first runs. Small images and
jobs that are cancelled or expire long before their end keep the module at a few seconds of compute.
The last test kills the worker process: keep it last.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from server_process import ServerProcess

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.frontend.server import GRADIENTS_SERVICE
from service.worker import jobs
from service.worker.params import DreamParams

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# 96 x 96 and 1000 steps: tens of seconds of work even on a fast core; stopped after a few.
LONG_STEPS = 1000
LONG_SIDE = 96
LONG_COST = jobs.estimate_cost(
    jobs.DreamJob(
        model="resnet18",
        version=1,
        image=np.zeros((LONG_SIDE, LONG_SIDE, 3), np.float32),
        params=DreamParams(steps=LONG_STEPS, octaves=1),
    )
)
DEADLINE_S = 4.0


def _png(side: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


LONG_DREAM = pb.DreamRequest(
    model="resnet18", image=pb.ImageInput(encoded=_png(LONG_SIDE)), steps=LONG_STEPS, octaves=1
)


def _stop(server: ServerProcess) -> int | None:
    try:
        return server.terminate(timeout=60) if server.process.poll() is None else None
    finally:
        server.kill()


@pytest.fixture(scope="module")
def tiers(demo_repository: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(worker, frontend), both SERVING, the frontend's gradients health included. Started together:
    the worker's address is known once it listens, long before its PyTorch worker is ready."""
    worker = ServerProcess(
        demo_repository,
        "--workers", "1", "--torch-threads", "1", "--max-task-cost", str(int(LONG_COST * 1.5)),
        command="worker",
    )  # fmt: skip
    frontend: ServerProcess | None = None
    try:
        worker.wait_listening()
        frontend = ServerProcess(demo_repository, "--worker-address", worker.address, "--max-batch-size", "2")
        worker.wait_ready()
        frontend.wait_ready()
        _wait(lambda: _health(frontend, GRADIENTS_SERVICE) == SERVING, "the frontend's gradients SERVING")
        yield worker, frontend
        if frontend.process.poll() is None:
            assert frontend.terminate(timeout=60) == 0, frontend.log
    finally:
        if frontend is not None:
            _stop(frontend)
        _stop(worker)


@pytest.fixture(scope="module")
def worker(tiers: tuple[ServerProcess, ServerProcess]) -> ServerProcess:
    return tiers[0]


@pytest.fixture(scope="module")
def frontend(tiers: tuple[ServerProcess, ServerProcess]) -> ServerProcess:
    return tiers[1]


def _health(server: ServerProcess, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    try:
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
    except grpc.RpcError:
        return -1


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _stub(server: ServerProcess) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(server.channel)


def _error(call, request, timeout: float = 60) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=timeout)
        if not isinstance(result, Message):  # a server-streaming call: read it to the end
            list(result)
    return info.value


def _dream_jobs(worker: ServerProcess) -> tuple[float, float, float]:
    """(jobs in flight, jobs stopped by cancellation or deadline, steps run) on the worker."""
    return (
        worker.sample("cnnserve_tasks_inflight", task="dream"),
        worker.sample("cnnserve_task_cancellations_total", task="dream"),
        worker.sample("cnnserve_task_steps_total", task="dream", model="resnet18"),
    )


def _assert_stopped_early(worker: ServerProcess, before: tuple[float, float, float]) -> None:
    """The forwarded job was stopped by its worker, long before its LONG_STEPS steps."""
    _wait(
        lambda: _dream_jobs(worker)[0] == 0 and _dream_jobs(worker)[1] == before[1] + 1,
        "the worker to stop the job",
    )
    steps = _dream_jobs(worker)[2] - before[2]
    assert 0 < steps < LONG_STEPS, steps


def test_explain_through_the_frontend_is_the_workers(worker: ServerProcess, frontend: ServerProcess) -> None:
    request = pb.ExplainRequest(
        model="resnet18", images=[pb.ImageInput(encoded=_png(64))], target_classes=[7]
    )
    counts = (
        lambda: frontend.sample("cnnserve_requests_total", method="Explain", model="resnet18", code="OK"),
        lambda: worker.sample("cnnserve_requests_total", method="Explain", model="resnet18", code="OK"),
        lambda: worker.sample("cnnserve_task_duration_seconds_count", task="explain", model="resnet18"),
        lambda: frontend.sample("cnnserve_task_duration_seconds_count", task="explain", model="resnet18"),
    )
    before = [count() for count in counts]
    via_frontend = _stub(frontend).Explain(request, timeout=60)
    direct = _stub(worker).Explain(request, timeout=60)
    assert (via_frontend.model, via_frontend.version, via_frontend.method) == (
        direct.model, direct.version, direct.method
    )  # fmt: skip
    (a,), (b,) = via_frontend.explanations, direct.explanations
    assert list(a.saliency.shape) == list(b.saliency.shape) == [3, 224, 224]
    sa = np.frombuffer(a.saliency.data, "<f4")
    sb = np.frombuffer(b.saliency.data, "<f4")
    assert np.abs(sa).max() > 0 and np.allclose(sa, sb, atol=1e-6)
    assert a.explained.index == b.explained.index == 7 and a.predicted.index == b.predicted.index
    # Each tier counts the calls it answered (the frontend one, the worker two); jobs run on the worker.
    assert [count() - b for count, b in zip(counts, before, strict=True)] == [1, 2, 2, 0]


def test_dream_progress_streams_through(worker: ServerProcess, frontend: ServerProcess) -> None:
    request = pb.DreamRequest(
        model="resnet18", image=pb.ImageInput(encoded=_png(48)), steps=2, octaves=1, preview_every=1, jitter=4
    )
    streamed = list(_stub(frontend).Dream(request, timeout=60))
    direct = list(_stub(worker).Dream(request, timeout=60))
    assert [m.WhichOneof("kind") for m in streamed] == [m.WhichOneof("kind") for m in direct]
    assert [m.WhichOneof("kind") for m in streamed] == ["progress", "progress", "result"]
    assert [m.progress.step for m in streamed[:2]] == [1, 2] and streamed[0].progress.preview_png
    a, b = streamed[-1].result, direct[-1].result
    assert (a.width, a.height, a.steps, list(a.layers)) == (b.width, b.height, b.steps, list(b.layers))
    assert (a.width, a.height) == (48, 48) and a.png.startswith(b"\x89PNG")
    assert a.objective_before == pytest.approx(b.objective_before, rel=1e-5)


def test_worker_errors_come_back_unchanged(worker: ServerProcess, frontend: ServerProcess) -> None:
    image = pb.ImageInput(encoded=_png(64))
    cases = [
        ("DreamUnary", pb.DreamRequest(model="resnet18", image=image, steps=1001, octaves=1),
         "INVALID_ARGUMENT", "max_task_iterations"),
        ("Dream", pb.DreamRequest(model="resnet18", image=pb.ImageInput(encoded=_png(128)), steps=LONG_STEPS,
                                  octaves=1), "INVALID_ARGUMENT", "max_task_cost"),
        ("Explain", pb.ExplainRequest(model="nope", images=[image]), "NOT_FOUND", "nope"),
        ("DreamUnary", pb.DreamRequest(model="lenet5", image=image, steps=1), "INVALID_ARGUMENT", "dream"),
    ]  # fmt: skip
    for method, request, code, mentions in cases:
        via_frontend = _error(getattr(_stub(frontend), method), request)
        direct = _error(getattr(_stub(worker), method), request)
        assert (via_frontend.code().name, via_frontend.details()) == (direct.code().name, direct.details())
        assert via_frontend.code().name == code and mentions in via_frontend.details(), via_frontend.details()
    assert _health(frontend, GRADIENTS_SERVICE) == SERVING


def test_client_deadline_expires_across_the_hop_and_the_job_stops(
    worker: ServerProcess, frontend: ServerProcess
) -> None:
    before = _dream_jobs(worker)
    expired = frontend.sample(
        "cnnserve_requests_total", method="Dream", model="resnet18", code="DEADLINE_EXCEEDED"
    )
    call = _stub(frontend).Dream(LONG_DREAM, timeout=DEADLINE_S)
    assert next(call).progress.step >= 1  # the job runs on the worker
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_stopped_early(worker, before)
    _wait(
        lambda: (
            frontend.sample(
                "cnnserve_requests_total", method="Dream", model="resnet18", code="DEADLINE_EXCEEDED"
            )
            == expired + 1
        ),
        "the frontend to count the expiry",
    )


def test_client_cancel_stops_the_job_and_a_full_budget_is_refused(
    worker: ServerProcess, frontend: ServerProcess
) -> None:
    before = _dream_jobs(worker)
    call = _stub(frontend).Dream(LONG_DREAM, timeout=120)
    assert next(call).progress.step >= 1
    # While it runs the budget has no room for another: the pool's refusal, with its estimated wait,
    # comes back as the worker gave it.
    via_frontend = _error(_stub(frontend).DreamUnary, LONG_DREAM)
    direct = _error(_stub(worker).DreamUnary, LONG_DREAM)
    assert via_frontend.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "estimated wait" in via_frontend.details()
    assert via_frontend.details() == direct.details()
    call.cancel()
    _assert_stopped_early(worker, before)


def test_killed_worker_tier_is_unavailable_and_classification_goes_on(
    worker: ServerProcess, frontend: ServerProcess
) -> None:
    worker.kill()
    stub = _stub(frontend)
    request = pb.ExplainRequest(model="resnet18", images=[pb.ImageInput(encoded=_png(64))])
    error = _error(stub.Explain, request, timeout=30)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "gradient worker tier is unavailable" in error.details()
    streamed = _error(stub.Dream, pb.DreamRequest(model="resnet18", image=request.images[0], steps=1))
    assert streamed.code() == grpc.StatusCode.UNAVAILABLE
    _wait(lambda: _health(frontend, GRADIENTS_SERVICE) == NOT_SERVING, "gradients NOT_SERVING", timeout=30)
    assert _health(frontend, "") == SERVING
    image = pb.ImageInput(encoded=_png(32))
    assert stub.Classify(pb.ClassifyRequest(model="lenet5", image=image), timeout=30).classes
