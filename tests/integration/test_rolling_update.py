"""Zero-loss rolling update (issue 6 item 6): two replicas on 127.0.0.1 behind one client channel
with the documented default options (round_robin over both, retries of UNAVAILABLE). One replica
is SIGTERMed under load, drains and exits 0, and is replaced by a new process on the same port;
not one request fails."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from PIL import Image
from server_process import ServerProcess

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.client import default_channel_options

pytestmark = pytest.mark.integration

TOTAL = 5000  # requests that must complete, every one OK
THREADS = 4
SERVED_BEFORE_DRAIN = 300  # requests replica A answers before it gets SIGTERM
STEP_TIMEOUT_S = 120.0  # generous: other jobs may share the 2 cores
OK_SAMPLE = ("cnnserve_requests_total", "Classify", "lenet5", "OK")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buf, "PNG")
    return buf.getvalue()


def _served(server: ServerProcess) -> float:
    name, method, model, code = OK_SAMPLE
    return server.sample(name, method=method, model=model, code=code)


class Load:
    """THREADS threads calling Classify back to back over one shared channel until stopped."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=default_channel_options())
        self.stub = pb_grpc.InferenceStub(self.channel)  # type: ignore[no-untyped-call]
        self.request = pb.ClassifyRequest(model="lenet5", top_k=1, image=pb.ImageInput(encoded=_png()))
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(THREADS)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.stub.Classify(self.request, timeout=30)
            except grpc.RpcError as exc:
                with self._lock:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
            else:
                with self._lock:
                    self.ok += 1

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self.channel.close()


def _wait(condition: Callable[[], bool], what: str, load: Load) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not condition():
        assert not load.failures, f"failed while waiting until {what}: {load.failures[:5]}"
        assert time.monotonic() < deadline, f"timed out waiting until {what} ({load.ok} OK so far)"
        time.sleep(0.05)


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_sigterm_drain_and_replacement_under_load_lose_nothing(
    demo_repository: Path, start_server: Callable[..., ServerProcess], frontends: str
) -> None:
    """frontends 2: each replica is a supervisor with two frontend processes and an engine process,
    and its SIGTERM drains them all."""
    flags = (
        "--models",
        "lenet5",
        "--intra-op-threads",
        "1",
        "--grace-period-s",
        "20",
        "--frontends",
        frontends,
    )
    replica_a = start_server(demo_repository, *flags)
    replica_b = start_server(demo_repository, *flags)
    replica_a.wait_ready()
    replica_b.wait_ready()
    port_a = replica_a.address.rsplit(":", 1)[1]
    load = Load(f"ipv4:{replica_a.address},{replica_b.address}")
    load.start()
    try:
        # Both replicas take traffic (round_robin), then A is stopped the way Kubernetes does it.
        _wait(lambda: _served(replica_a) >= SERVED_BEFORE_DRAIN, "replica A has served some", load)
        _wait(lambda: _served(replica_b) >= SERVED_BEFORE_DRAIN, "replica B has served some", load)
        served_by_a = _served(replica_a)
        ok_at_sigterm = load.ok
        code = replica_a.terminate(timeout=STEP_TIMEOUT_S)
        assert code == 0, f"replica A exited with {code}:\n{replica_a.log}"
        ok_after_drain = load.ok
        # The replacement binds A's port; the channel's subchannel for it reconnects by itself.
        replacement = start_server(demo_repository, *flags, "--grpc-port", port_a)
        replacement.wait_ready()
        _wait(lambda: _served(replacement) >= 1, "the replacement takes traffic", load)
        _wait(lambda: load.ok >= TOTAL, f"{TOTAL} requests completed", load)
    finally:
        load.stop()
    assert load.failures == [], f"{len(load.failures)} failed, e.g. {load.failures[:5]}"
    assert load.ok >= TOTAL
    assert served_by_a >= SERVED_BEFORE_DRAIN
    # B kept serving while A drained and was replaced (not just before and after).
    assert ok_after_drain > ok_at_sigterm
