"""`cnnserve serve --frontends 2` (service/multiprocess.py): two frontend processes on one
port in front of one engine process, under a supervisor. Answers, one /metrics view with the totals
the client counted, a SIGKILLed frontend replaced while a client keeps classifying without an
error, a SIGKILLed engine failing calls at once and coming back, and a clean SIGTERM."""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from server_process import ServerProcess

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.client import CnnserveClient, CnnserveError
from service.engine.slots import SHM_DIR
from service.frontend.server import GRADIENTS_SERVICE

pytestmark = pytest.mark.integration


def _digit() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def _pid(server: ServerProcess, name: str, after: int = 0) -> int:
    """The pid of the latest start of `name` ("engine", "frontend 0") logged after line `after`."""
    found = [
        int(m[1]) for line in server.lines[after:] if (m := re.search(rf"started {name} \(pid (\d+)\)", line))
    ]
    assert found, server.log
    return found[-1]


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, server: ServerProcess) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what} not within {timeout} s:\n{server.log}"
        time.sleep(0.05)
    return time.monotonic() - started


def test_two_frontends_one_engine(demo_repository: Path, start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(demo_repository, "--frontends", "2", "--models", "lenet5")
    server.wait_ready()
    supervisor = server.process.pid
    image = _digit()
    client = CnnserveClient(server.address)
    expected = client.classify(image, model="lenet5").classes[0].index

    # One /metrics view: the requests of both frontends, as the client counted them.
    for _ in range(29):
        assert client.classify(image, model="lenet5").classes[0].index == expected
    counted = server.sample("cnnserve_requests_total", method="Classify", model="lenet5", code="OK")
    assert counted == 30
    assert server.sample("cnnserve_images_total", model="lenet5") == 30

    # REST on the port the supervisor holds: every frontend serves it (a new connection per call,
    # so both get some), counted in the same view.
    for _ in range(10):
        answer = requests.post(
            f"http://{server.http_address}/v2/models/lenet5/classify", data=image, timeout=30
        )
        assert answer.status_code == 200 and answer.json()["classes"][0]["index"] == expected
    assert server.sample("cnnserve_requests_total", method="rest:Classify", model="lenet5", code="OK") == 10

    # Embed through a frontend process: the features cross the engine's socket with the logits of
    # the same run (its top-1 is Classify's).
    stub = pb_grpc.InferenceStub(server.channel)
    embedded = stub.Embed(
        pb.EmbedRequest(model="lenet5", image=pb.ImageInput(encoded=image), normalize=True, top_k=1),
        timeout=30,
    )
    vector = np.frombuffer(embedded.embedding.data, dtype="<f4")
    assert vector.shape == (84,) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert embedded.classes[0].index == expected

    # A frontend SIGKILLed under load: the calls it held fail UNAVAILABLE, and the client's retry
    # policy resends them (on an idle machine every one then succeeds: 0 errors in 6,500 calls; a
    # starved one may reconnect after the retries ran out); a replacement serves in < 5 s, and no
    # call fails after it.
    errors: list[tuple[float, grpc.StatusCode, str]] = []
    done = [0]
    stop = threading.Event()
    killed_at = [float("inf")]

    def load() -> None:
        own = CnnserveClient(server.address)
        while not stop.is_set():
            try:
                own.classify(image, model="lenet5")
                done[0] += 1
            except CnnserveError as exc:
                errors.append((time.monotonic() - killed_at[0], exc.code, str(exc)))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    _wait_for(lambda: done[0] > 50, 30, "load", server)
    mark = len(server.lines)
    killed_at[0] = time.monotonic()
    os.kill(_pid(server, "frontend 0"), signal.SIGKILL)
    replaced = _wait_for(
        lambda: any("supervised process listening" in line for line in server.lines[mark:]),
        5,
        "a new frontend",
        server,
    )
    settled = time.monotonic() - killed_at[0] + 2.0  # reconnect backoff after the replacement
    before = done[0]
    _wait_for(lambda: done[0] > before + 50, 30, "load after the replacement", server)
    stop.set()
    for thread in threads:
        thread.join(30)
    print(f"\nfrontend killed: replaced in {replaced:.2f} s; {len(errors)} client errors: {errors[:3]}")
    assert all(code == grpc.StatusCode.UNAVAILABLE for _, code, _ in errors), errors[:5]
    assert all(after < settled for after, _, _ in errors), errors[:5]
    assert replaced < 5

    # The engine SIGKILLed: calls fail at once (not at their deadline), health says so, it comes back.
    mark = len(server.lines)
    os.kill(_pid(server, "engine"), signal.SIGKILL)
    started = time.monotonic()
    failures = 0
    while time.monotonic() - started < 60:
        try:
            client.classify(image, model="lenet5")
            break
        except CnnserveError as exc:
            assert exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
            failures += 1
            time.sleep(0.05)
    else:
        pytest.fail(f"classification did not come back after the engine was replaced:\n{server.log}")
    assert failures == 0 or any("engine process" in line for line in server.lines[mark:])
    assert any("started engine" in line for line in server.lines[mark:])
    assert any("the engine process is gone: NOT_SERVING" in line for line in server.lines[mark:])
    health = health_pb2_grpc.HealthStub(server.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )

    # SIGTERM: every process drains and exits, nothing left in /dev/shm.
    assert server.terminate(timeout=60) == 0, server.log
    assert not list(SHM_DIR.glob(f"cnnserve-{supervisor}-*"))
    assert not any("Traceback" in line for line in server.lines), server.log


def test_the_gradient_process_is_reachable_from_every_frontend(
    demo_repository: Path, start_server: Callable[..., ServerProcess]
) -> None:
    from service._proto.cnnserve.v1 import inference_pb2 as pb
    from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

    server = start_server(demo_repository, "--frontends", "2", "--models", "resnet18", "--workers", "1")
    server.wait_ready()
    server.wait_serving(GRADIENTS_SERVICE)
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        buf, format="PNG"
    )
    image = pb.ImageInput(encoded=buf.getvalue())
    info = CnnserveClient(server.address).get_model("resnet18")
    assert pb.CAPABILITY_EXPLAIN in info.capabilities, info
    # New connections land on either frontend (SO_REUSEPORT): every one forwards to the one pool.
    for _ in range(4):
        with server.new_channel() as channel:
            response = pb_grpc.InferenceStub(channel).Explain(
                pb.ExplainRequest(model="resnet18", images=[image], target_classes=[3]), timeout=120
            )
            assert response.explanations[0].explained.index == 3
    assert server.sample("cnnserve_requests_total", method="Explain", model="resnet18", code="OK") == 4
    assert server.terminate(timeout=60) == 0, server.log
