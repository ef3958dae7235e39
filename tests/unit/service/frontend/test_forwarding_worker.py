"""`cnnserve worker`'s own parts: the command line, the model catalog (the repository read without
ONNX Runtime) and the drain of an in-flight forwarded job."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from servicer_fakes import FakeEngine, FakeModel, FakePoolLifecycle, Harness

from export.preprocessing import IMAGENET
from service import cli
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.catalog import ModelLoadError
from service.errors import NotFound
from service.frontend.gradient_tier import GradientTierServer, ModelCatalog
from service.frontend.server import GRADIENTS_SERVICE
from service.settings import Settings, WorkerSettings

ALL = {"classify": True, "explain": True, "dream": True, "stylize": True}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CNNSERVE_"):
            monkeypatch.delenv(name)


# --- command line ---------------------------------------------------------------------------------


def worker_settings(argv: list[str]) -> Settings:
    parser = cli.build_parser()
    args = parser.parse_args(["worker", *argv])
    return cli.settings_from_args(args, args.subparser, WorkerSettings)


def test_worker_flags_env_and_default_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = worker_settings([])
    assert (settings.grpc_port, settings.metrics_port) == (8600, 9091)  # beside a server's 8500/9090
    ports = ("grpc_port", "metrics_port", "http_port")
    assert {k: v for k, v in settings.model_dump().items() if k not in ports} == {
        k: v for k, v in Settings().model_dump().items() if k not in ports
    }
    monkeypatch.setenv("CNNSERVE_GRPC_PORT", "7000")
    monkeypatch.setenv("CNNSERVE_WORKERS", "3")
    settings = worker_settings(["--metrics-port", "7001", "--max-task-cost", "1e6"])
    assert (settings.grpc_port, settings.metrics_port, settings.workers) == (7000, 7001, 3)
    assert settings.max_task_cost == 1e6
    # What the worker Deployment runs (tests/deploy checks the manifests parse the same way).
    settings = worker_settings(["--grpc-port", "8600", "--metrics-port", "9091"])
    assert (settings.grpc_port, settings.metrics_port) == (8600, 9091)
    help_text = " ".join(cli.build_parser().parse_args(["worker"]).subparser.format_help().split())
    assert "--worker-address" in help_text and "default 8600" in help_text


def test_worker_refuses_zero_workers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["worker", "--workers", "0", "--grpc-port", "0", "--metrics-port", "0"])
    assert info.value.code == 2
    assert "at least one worker process" in capsys.readouterr().err


# --- the model catalog ------------------------------------------------------------------------------


def catalog(repository: Path, **overrides: Any) -> ModelCatalog:
    c = ModelCatalog(Settings(repository=repository, device="cpu", **overrides))
    c.load()
    asyncio.run(c.start())
    return c


def test_catalog_reads_the_repository_like_the_engine(model_repository: Path) -> None:
    c = catalog(model_repository)
    assert c.ready
    assert [(m.name, m.version) for m in c.models()] == [("lenet5", 1), ("resnet18", 1)]
    resnet = c.get("resnet18")
    assert resnet.provider == "pytorch:cpu" and resnet.path == model_repository / "resnet18" / "1"
    assert resnet.capabilities["explain"] and resnet.capabilities["dream"]
    assert resnet.input_shape == (3, 224, 224) and resnet.num_classes == 1000
    with pytest.raises(NotFound, match="'nope' is not loaded; loaded models: lenet5, resnet18"):
        c.get("nope")
    with pytest.raises(NotFound, match="no loaded version 2"):
        c.get("lenet5", 2)
    assert [m.name for m in catalog(model_repository, models="resnet18").models()] == ["resnet18"]
    with pytest.raises(ModelLoadError, match="'vgg19' is not in the repository"):
        catalog(model_repository, models="vgg19")
    asyncio.run(c.stop())
    assert not c.ready


def test_catalog_leaves_out_a_version_whose_weights_do_not_match(
    model_repository_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = model_repository_copy / "lenet5" / "1" / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR):
        c = catalog(model_repository_copy)
    assert [m.name for m in c.models()] == ["resnet18"]
    assert "lenet5:1" in caplog.text and "sha256" in caplog.text
    (model_repository_copy / "resnet18" / "1" / "weights.pt").write_bytes(b"short")
    with pytest.raises(ModelLoadError, match="no model could be loaded"):
        catalog(model_repository_copy)


# --- drain ----------------------------------------------------------------------------------------


class SlowPool(FakePoolLifecycle):
    """Ends every job after `delay_s` with a recognisable status (no result needs fabricating)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.running = threading.Event()
        self.finished = threading.Event()

    async def submit(self, task: Any, *, cost: float, deadline: float | None, on_progress: Any = None) -> Any:
        from service.errors import InvalidArgument

        self.running.set()
        await asyncio.sleep(self.delay_s)
        self.finished.set()
        raise InvalidArgument("finished after the delay", reason="invalid_argument")


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), 100).save(buf, format="PNG")
    return buf.getvalue()


def test_worker_drain_lets_the_forwarded_job_finish() -> None:
    """SIGTERM on the worker (shutdown): NOT_SERVING at once, the accepted job still finishes within
    the grace period and its answer reaches the caller through the frontend."""
    vgg = FakeModel(
        "vgg19", 1, architecture="vgg19", input_shape=(3, 224, 224), preprocessing=IMAGENET, capabilities=ALL
    )
    pool = SlowPool(delay_s=1.0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0)
    worker = GradientTierServer(settings, catalog=FakeEngine([vgg]), pool=pool)
    run(worker.start())
    run(worker.load())
    frontend = Harness(FakeEngine([vgg]), worker_address=f"127.0.0.1:{worker.grpc_port}")
    try:
        stub = pb_grpc.InferenceStub(frontend.channel)
        health = health_pb2_grpc.HealthStub(frontend.channel)
        deadline = time.monotonic() + 15
        request = health_pb2.HealthCheckRequest(service=GRADIENTS_SERVICE)
        while health.Check(request, timeout=5).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        call = stub.Explain.future(
            pb.ExplainRequest(model="vgg19", images=[pb.ImageInput(encoded=png())]), timeout=30
        )
        assert pool.running.wait(10)
        drain = asyncio.run_coroutine_threadsafe(worker.shutdown(grace_s=10), loop)
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "finished after the delay",
        )
        drain.result(30)
        assert pool.closed
    finally:
        frontend.close()
        if not worker.state.draining:
            run(worker.shutdown(grace_s=0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
