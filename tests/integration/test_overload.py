"""Overload, exactly: N + Q + k requests yield exactly k RESOURCE_EXHAUSTED, each answered within
50 ms, and cnnserve_rejections_total rises by exactly k. Once for classification, once for the
gradient cost budget, on one real server; and classification again under `serve --frontends 2`,
where the calls spread over two frontend processes and the engine process admits them.

Classification (service/engine/batcher.py): a model version admits at most Q + N images at once,
Q = max_queue_size waiting and N = max_batch_size in the batch ONNX Runtime computes; an image
counts until its request is answered. The arithmetic holds as long as nothing is answered while
the flood arrives, so a blocker holds the runner: one ClassifyBatch of BLOCKER images (a request
is answered only when all its images are), on resnet18 with one intra-op thread. The queue-depth
gauge tells when it is in place (admitted, its first N images in the running batch: depth at most
BLOCKER - N, above 0 until its last batch starts), then the other N + Q + k - BLOCKER images
arrive as one-image Classify calls.

Gradients (service/worker/pool.py): the cost budget max_task_cost bounds the summed cost of the
admitted jobs, running (N = workers) and waiting alike. With jobs of cost c and a budget of
(N + Q) * c, N + Q + k identical jobs sent at once (they run for seconds: nothing finishes while
they arrive) yield exactly k refusals whose message carries the estimated wait.

"Within 50 ms" is asserted as the server measures it: cnnserve_request_duration_seconds runs from
the handler's start to its answer, and the refused calls are the only ones of their method and
model that can end within 50 ms (the others wait behind the blocker or run for seconds), so its
50 ms bucket must rise by exactly k. The client's per-call times (from just before each call starts
to its answer) are printed, not asserted: on an idle machine they are a few ms, but on the shared
2-core CI machine the blocker's ONNX Runtime thread and other jobs keep the client's and the
server's threads waiting for a CPU, which added 5-70 ms of scheduling delay outside the handler
(measured with calls that fail at once, NOT_FOUND, while the blocker runs).
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

N = 4  # max_batch_size: images in the batch being computed
Q = 20  # max_queue_size: images waiting
K = 8  # the excess
BLOCKER = 20  # images of the request holding the runner (5 batches of resnet18 on one thread)
REJECTION_BUDGET_S = 0.05

DREAM_STEPS = 200  # a job of seconds: the admitted ones are cancelled once counted
DREAM_SIDE = 64
# jobs.estimate_cost of a one-octave dream: side^2 * steps * 2 + 2 * side^2 (pass-pixels).
DREAM_COST = DREAM_SIDE * DREAM_SIDE * (2 * DREAM_STEPS + 2)
GRADIENT_WORKERS = 1
GRADIENT_QUEUE = 3  # jobs that may wait behind the running one
TASK_BUDGET = (GRADIENT_WORKERS + GRADIENT_QUEUE) * DREAM_COST


@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(
        demo_repository,
        "--models", "resnet18",
        "--max-batch-size", str(N),
        "--max-queue-size", str(Q),
        "--max-queue-delay-s", "0",
        "--intra-op-threads", "1",
        "--workers", str(GRADIENT_WORKERS),
        "--torch-threads", "1",
        "--max-task-cost", str(TASK_BUDGET),
        "--max-task-iterations", str(DREAM_STEPS),
    )  # fmt: skip


def tensor_image(seed: int) -> pb.ImageInput:
    arr = np.random.default_rng(seed).standard_normal((3, 224, 224)).astype(np.float32)
    return pb.ImageInput(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=arr.tobytes()))


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class Timed:
    """A future-style call with the client-side time from just before it started to its answer."""

    def __init__(self, start: Callable[[], grpc.Future]) -> None:
        self.done = threading.Event()
        self.elapsed_s = 0.0
        self._t0 = time.perf_counter()
        self.future = start()
        self.future.add_done_callback(self._finished)

    def _finished(self, _: grpc.Future) -> None:
        self.elapsed_s = time.perf_counter() - self._t0
        self.done.set()

    @property
    def code(self) -> grpc.StatusCode:
        if self.future.cancelled():
            return grpc.StatusCode.CANCELLED
        exc = self.future.exception()
        return grpc.StatusCode.OK if exc is None else exc.code()

    @property
    def details(self) -> str:
        if self.future.cancelled():
            return "cancelled by the test"
        exc = self.future.exception()
        return "" if exc is None else exc.details()


class ServerDurations:
    """cnnserve_request_duration_seconds of one method on resnet18: bucket counts at a start point."""

    def __init__(self, server: ServerProcess, method: str) -> None:
        self.server = server
        self.method = method
        self.start = self._buckets()

    def _buckets(self) -> dict[float, float]:
        return {
            float(labels["le"]): value
            for (name, frozen), value in self.server.metrics().items()
            for labels in [dict(frozen)]
            if name == "cnnserve_request_duration_seconds_bucket"
            and labels.get("method") == self.method
            and labels.get("model") == "resnet18"
        }

    def since_start(self) -> dict[float, float]:
        """Calls ended since the start within each bucket bound (seconds), cumulative."""
        now = self._buckets()
        return {le: now[le] - self.start.get(le, 0.0) for le in sorted(now)}


def rejections(server: ServerProcess, method: str, reason: str) -> float:
    return server.sample("cnnserve_rejections_total", method=method, model="resnet18", reason=reason)


def report(what: str, calls: list[Timed], server_side: dict[float, float]) -> None:
    rejected = sorted(c.elapsed_s * 1000 for c in calls if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED)
    within = ", ".join(
        f"<={le * 1000:g} ms: {n:g}" for le, n in server_side.items() if le <= REJECTION_BUDGET_S
    )
    print(
        f"\n{what}: {len(calls)} calls, {len(rejected)} RESOURCE_EXHAUSTED; "
        f"client ms: {', '.join(f'{ms:.1f}' for ms in rejected)}; server, calls ended {within}"
    )


def test_classification_queue_refuses_exactly_the_excess(server: ServerProcess) -> None:
    _queue_refuses_exactly_the_excess(server)


@pytest.fixture(scope="module")
def two_frontends(demo_repository: Path) -> Iterator[ServerProcess]:
    """The same classification settings under `serve --frontends 2`: admission is the engine
    process's, for both frontends at once."""
    yield from module_server(
        demo_repository,
        "--frontends", "2",
        "--models", "resnet18",
        "--max-batch-size", str(N),
        "--max-queue-size", str(Q),
        "--max-queue-delay-s", "0",
        "--intra-op-threads", "1",
        "--workers", "0",
    )  # fmt: skip


def test_classification_queue_refuses_exactly_the_excess_across_frontends(
    two_frontends: ServerProcess,
) -> None:
    _queue_refuses_exactly_the_excess(two_frontends)


def _queue_refuses_exactly_the_excess(server: ServerProcess) -> None:
    stub = pb_grpc.InferenceStub(server.channel)
    for seed in range(3):  # warm-up: channel, server paths, metric children
        stub.Classify(
            pb.ClassifyRequest(model="resnet18", image=pb.ImageInput(encoded=png(32, seed))), timeout=60
        )
    rejected_before = rejections(server, "Classify", "queue_full")
    durations = ServerDurations(server, "Classify")

    blocker = Timed(
        lambda: stub.ClassifyBatch.future(
            pb.ClassifyBatchRequest(model="resnet18", images=[tensor_image(100 + i) for i in range(BLOCKER)]),
            timeout=120,
        )
    )
    # In place: admitted, and the runner took its first batch (depth BLOCKER - N, then less). It
    # holds all BLOCKER images of the capacity until its last batch is done.
    wait_for(
        lambda: 0 < server.sample("cnnserve_queue_depth", model="resnet18") <= BLOCKER - N,
        what="the blocker in place",
    )
    flood_images = N + Q + K - BLOCKER
    # Small encoded images: each call's bytes are on the wire at once, and a refused one is never
    # decoded (the engine admits before decoding).
    requests = [
        pb.ClassifyRequest(model="resnet18", image=pb.ImageInput(encoded=png(32, seed=i)))
        for i in range(flood_images)
    ]
    flood = [Timed(lambda r=r: stub.Classify.future(r, timeout=120)) for r in requests]
    wait_for(lambda: sum(c.done.is_set() for c in flood) >= K, what="the refusals")
    # The precondition of the arithmetic: the blocker still held its images when they were refused.
    assert not blocker.done.is_set(), "the blocker finished while the flood arrived (machine too slow?)"

    for call in [blocker, *flood]:
        assert call.done.wait(120)
    server_side = durations.since_start()
    report("classification", flood, server_side)
    codes = [c.code for c in flood]
    assert blocker.code == grpc.StatusCode.OK, blocker.details
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == K, codes
    assert codes.count(grpc.StatusCode.OK) == flood_images - K, codes
    refused = [c for c in flood if c.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert all("overloaded" in c.details and f"of {Q + N} images admitted" in c.details for c in refused)
    assert rejections(server, "Classify", "queue_full") == rejected_before + K
    assert server_side[REJECTION_BUDGET_S] == K  # every refusal was answered within 50 ms
    assert server.sample("cnnserve_queue_depth", model="resnet18") == 0
    stub.Classify(pb.ClassifyRequest(model="resnet18", image=tensor_image(0)), timeout=60)  # still serving


def png(side: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dream(steps: int) -> pb.DreamRequest:
    return pb.DreamRequest(
        model="resnet18", image=pb.ImageInput(encoded=png(DREAM_SIDE)), octaves=1, steps=steps, jitter=0
    )


def test_gradient_cost_budget_refuses_exactly_the_excess(server: ServerProcess) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    wait_for(
        lambda: (
            health.Check(
                health_pb2.HealthCheckRequest(service="cnnserve.v1.Inference/gradients"), timeout=5
            ).status
            == health_pb2.HealthCheckResponse.SERVING
        ),
        timeout=120,
        what="the gradient worker",
    )
    stub = pb_grpc.InferenceStub(server.channel)
    # Warm-up, and a finished job gives the pool its throughput estimate (the wait in the message).
    stub.DreamUnary(dream(steps=2), timeout=120)
    rejected_before = rejections(server, "DreamUnary", "cost_budget")
    durations = ServerDurations(server, "DreamUnary")

    request = dream(steps=DREAM_STEPS)
    started = time.monotonic()
    jobs = [
        Timed(lambda: stub.DreamUnary.future(request, timeout=120))
        for _ in range(GRADIENT_WORKERS + GRADIENT_QUEUE + K)
    ]
    wait_for(lambda: sum(j.done.is_set() for j in jobs) >= K, what="the refusals")
    # Let the admitted calls outlive the 50 ms bucket before they are cancelled, then count.
    time.sleep(max(0.0, started + 0.5 - time.monotonic()))
    assert sum(j.done.is_set() for j in jobs) == K, "a job finished or failed while the burst arrived"
    for job in jobs:
        if not job.done.is_set():
            job.future.cancel()
    for job in jobs:
        assert job.done.wait(60)
    server_side = durations.since_start()
    report("gradients", jobs, server_side)
    codes = [j.code for j in jobs]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == K, codes
    assert codes.count(grpc.StatusCode.CANCELLED) == GRADIENT_WORKERS + GRADIENT_QUEUE, codes
    refused = [j for j in jobs if j.code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    for job in refused:
        assert re.search(r"estimated wait about \d+(\.\d+)? s", job.details), job.details
        assert f"{TASK_BUDGET:.4g} cost units are admitted" in job.details, job.details
    wait_for(lambda: rejections(server, "DreamUnary", "cost_budget") >= rejected_before + K, 10)
    assert rejections(server, "DreamUnary", "cost_budget") == rejected_before + K
    wait_for(lambda: server.sample("cnnserve_task_queued_cost") == 0, 60, what="the budget to drain")
    assert server_side[REJECTION_BUDGET_S] == K  # every refusal was answered within 50 ms
    assert stub.DreamUnary(dream(steps=1), timeout=120).steps == 1  # capacity is back
