"""Admission limits on a real server: a full queue answers RESOURCE_EXHAUSTED at once, and a
request whose deadline passes while it waits in the queue is answered DEADLINE_EXCEEDED and never
computed. The server: resnet18 only, one image per batch, QUEUE images may wait, one ORT thread
(so the queue drains one inference at a time)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

QUEUE = 16
BLOCKER = 12  # images of the request that keeps the queue busy (< QUEUE: the probe still fits)


@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(
        demo_repository,
        "--models", "resnet18",
        "--max-batch-size", "1",
        "--max-queue-size", str(QUEUE),
        "--max-queue-delay-s", "0",
        "--intra-op-threads", "1",
    )  # fmt: skip


def image(seed: int) -> pb.ImageInput:
    arr = np.random.default_rng(seed).standard_normal((3, 224, 224)).astype(np.float32)
    return pb.ImageInput(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=arr.tobytes()))


def classify(server: ServerProcess, seed: int, timeout: float = 60) -> grpc.StatusCode:
    stub = pb_grpc.InferenceStub(server.channel)
    try:
        stub.Classify(pb.ClassifyRequest(model="resnet18", image=image(seed)), timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def wait_for(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_queue_full_is_resource_exhausted(server: ServerProcess) -> None:
    flood = 32
    rejected_before = server.sample(
        "cnnserve_rejections_total", method="Classify", model="resnet18", reason="queue_full"
    )
    barrier = threading.Barrier(flood)

    def call(seed: int) -> grpc.StatusCode:
        barrier.wait(30)
        return classify(server, seed)

    with ThreadPoolExecutor(flood) as pool:
        codes = list(pool.map(call, range(flood)))
    rejected = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    # At most one running and QUEUE waiting when the flood arrived: most of it was refused.
    assert rejected >= flood - 2 * (QUEUE + 1)
    after = server.sample(
        "cnnserve_rejections_total", method="Classify", model="resnet18", reason="queue_full"
    )
    assert after == rejected_before + rejected
    assert classify(server, 99) == grpc.StatusCode.OK  # still serving


def test_deadline_in_the_queue_is_never_computed(server: ServerProcess) -> None:
    stub = pb_grpc.InferenceStub(server.channel)
    response = stub.Classify(pb.ClassifyRequest(model="resnet18", image=image(0)), timeout=60)
    inference_s = response.timings.inference_seconds
    images_before = server.sample("cnnserve_images_total", model="resnet18")
    deadline_before = server.sample(
        "cnnserve_rejections_total", method="Classify", model="resnet18", reason="deadline"
    )

    # A blocker of BLOCKER images, run one by one, leaves room for the probe in the queue.
    blocker_result: list[object] = []

    def blocker() -> None:
        request = pb.ClassifyBatchRequest(model="resnet18", images=[image(s) for s in range(1, BLOCKER + 1)])
        blocker_result.append(pb_grpc.InferenceStub(server.channel).ClassifyBatch(request, timeout=60))

    thread = threading.Thread(target=blocker)
    thread.start()
    assert wait_for(lambda: server.sample("cnnserve_inflight_requests", method="ClassifyBatch") >= 1)
    # Behind BLOCKER inferences, a deadline of one inference cannot be met: it expires queued.
    # Three inferences' time: long enough to reach the server on a loaded CI machine, far shorter
    # than the blocker's remaining work.
    code = classify(server, 99, timeout=max(0.1, 3 * inference_s))
    thread.join(60)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(blocker_result) == 1
    # Exactly the blocker's images were computed; the expired request never reached the model.
    assert wait_for(
        lambda: server.sample("cnnserve_images_total", model="resnet18") == images_before + BLOCKER
    )
    time.sleep(0.5)
    assert server.sample("cnnserve_images_total", model="resnet18") == images_before + BLOCKER
    assert wait_for(
        lambda: (
            server.sample("cnnserve_rejections_total", method="Classify", model="resnet18", reason="deadline")
            == deadline_before + 1
        )
    )
    assert classify(server, 5) == grpc.StatusCode.OK
