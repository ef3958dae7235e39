"""A frontend whose worker address resolves to several worker pods spreads its gradient jobs over
all of them (the forwarding channel's round_robin policy), as the headless worker Service in
deploy/k8s gives it. Here two `python -m service worker` processes on 127.0.0.1 stand in for two
pods and an `ipv4:` target for the DNS answer with two addresses."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_process import ServerProcess

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.frontend.server import GRADIENTS_SERVICE

pytestmark = pytest.mark.integration


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def tier(demo_repository: Path) -> Iterator[tuple[list[ServerProcess], ServerProcess]]:
    started: list[ServerProcess] = []
    try:
        workers = [
            ServerProcess(
                demo_repository,
                "--models",
                "resnet18",
                "--workers",
                "1",
                "--torch-threads",
                "1",
                command="worker",
            )
            for _ in range(2)
        ]
        started.extend(workers)
        for worker in workers:
            worker.wait_listening()
        target = "ipv4:" + ",".join(worker.address for worker in workers)
        frontend = ServerProcess(demo_repository, "--models", "resnet18", "--worker-address", target)
        started.append(frontend)
        for server in started:
            server.wait_ready()
        frontend.wait_serving(GRADIENTS_SERVICE, timeout=120)
        yield workers, frontend
        for server in reversed(started):
            assert server.terminate(timeout=60) == 0, server.log
    finally:
        for server in started:
            server.kill()


def test_gradient_jobs_are_spread_over_every_worker(tier: tuple[list[ServerProcess], ServerProcess]) -> None:
    workers, frontend = tier
    stub = pb_grpc.InferenceStub(frontend.channel)
    request = pb.ExplainRequest(
        model="resnet18", images=[pb.ImageInput(encoded=_png(32))], target_classes=[3]
    )

    def jobs(worker: ServerProcess) -> float:
        return worker.sample("cnnserve_task_duration_seconds_count", task="explain", model="resnet18")

    before = [jobs(w) for w in workers]
    for _ in range(6):
        assert stub.Explain(request, timeout=60).explanations[0].explained.index == 3
    done = [jobs(w) - b for w, b in zip(workers, before, strict=True)]
    # Round robin over two ready connections: 3 and 3 (one worker may have connected a call late).
    assert sum(done) == 6 and min(done) >= 2, done
