"""The gradient-worker tier in one process: a real frontend Server (fake classification engine,
worker_address set) forwarding to a real GradientTierServer (fake catalog, fake pool), both on 127.0.0.1
over real channels. What crosses the hop: answers, progress, deadlines, cancellation, statuses,
health; plus the pure helpers (target, channel options, status mapping).

Both servers share this process's Prometheus registry, so a forwarded call is counted twice in
cnnserve_requests_total (once per tier); tests/integration/test_worker_tier.py reads each tier's
own /metrics.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from servicer_fakes import FakeEngine, FakeModel, FakePoolLifecycle, Harness, counter

from export.preprocessing import IMAGENET
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.errors import Internal, ResourceExhausted, Unavailable
from service.frontend.calls import REASON_METADATA_KEY
from service.frontend.forwarding import (
    TIER_METADATA,
    UNREACHABLE_REASON,
    channel_options,
    forwarded_error,
    hop_timeout,
    worker_target,
)
from service.frontend.gradient_tier import NOT_HERE_MESSAGE, GradientTierServer
from service.frontend.server import GRADIENTS_SERVICE, StartupError
from service.settings import Settings
from service.worker import jobs
from service.worker.rendering import encode_png

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ALL = {"classify": True, "explain": True, "dream": True, "stylize": True}
WORKER_MAX_ITERATIONS = 5


# --- pure helpers -------------------------------------------------------------------------------


def test_worker_target() -> None:
    assert worker_target("cnnserve-worker:8600") == "dns:///cnnserve-worker:8600"
    assert worker_target(" 10.0.0.7:8600 ") == "dns:///10.0.0.7:8600"
    assert worker_target("[::1]:8600") == "dns:///[::1]:8600"
    for target in ("dns:///cnnserve-worker-headless.ns.svc:8600", "ipv4:10.0.0.1:1,10.0.0.2:1", "unix:/s"):
        assert worker_target(target) == target
    for bad in ("", "cnnserve-worker", "host:0", "host:70000", "http://host:80", "a b:1"):
        with pytest.raises(ValueError, match="worker_address"):
            worker_target(bad)


def test_channel_options_match_the_server_settings() -> None:
    settings = Settings(
        keepalive_time_s=5.0,  # below what the worker tolerates: the channel must not ping that often
        keepalive_min_client_ping_s=12.0,
        keepalive_timeout_s=7.0,
        max_message_bytes=2 * 1024 * 1024,
        max_images_per_request=4,
    )
    options = dict(channel_options(settings))
    assert options["grpc.keepalive_time_ms"] == 12_000
    assert options["grpc.keepalive_timeout_ms"] == 7_000
    assert options["grpc.max_send_message_length"] == settings.max_receive_message_bytes
    assert options["grpc.max_receive_message_length"] == settings.max_message_bytes
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert options["grpc.max_reconnect_backoff_ms"] <= 5_000
    default = dict(channel_options(Settings()))
    assert default["grpc.keepalive_time_ms"] == 30_000


def test_hop_timeout_stays_below_the_cap_after_grpc_rounding() -> None:
    assert hop_timeout(5.0, 600.0) == 5.0
    assert hop_timeout(597.5, 600.0) == 597.5
    # gRPC sends 599.99 s as 601 s: near the cap, two of its rounding units (1 s here) are kept free
    assert hop_timeout(600.0, 600.0) == hop_timeout(599.5, 600.0) == 598.0
    assert hop_timeout(30.0, 30.0) == pytest.approx(29.8)
    assert hop_timeout(1500.0, 1500.0) == 1480.0
    assert hop_timeout(-0.5, 600.0) == 0.001


def _rpc_error(code: grpc.StatusCode, details: str, *, marked: bool) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(*TIER_METADATA) if marked else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


@pytest.mark.parametrize(
    ("code", "details", "marked", "want_code", "want_message", "want_reason"),
    [
        # The worker's own answers: unchanged, whatever the code.
        (grpc.StatusCode.NOT_FOUND, "model 'x' is not loaded", True, "NOT_FOUND", "model 'x' is not loaded",
         "not_found"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "estimated wait about 3.0 s", True, "RESOURCE_EXHAUSTED",
         "estimated wait about 3.0 s", "resource_exhausted"),
        (grpc.StatusCode.UNAVAILABLE, "server is shutting down", True, "UNAVAILABLE",
         "server is shutting down", "unavailable"),
        (grpc.StatusCode.INTERNAL, "internal error; the server logged the details", True, "INTERNAL",
         "internal error; the server logged the details", "internal"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "the dream job ran past its deadline", True, "DEADLINE_EXCEEDED",
         "the dream job ran past its deadline", "deadline"),
        # Made by gRPC on this side of the hop.
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: ...", False,
         "UNAVAILABLE", "cannot be reached", UNREACHABLE_REASON),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", False, "UNAVAILABLE", "connection to it broke",
         UNREACHABLE_REASON),
        (grpc.StatusCode.UNKNOWN, "Stream removed", False, "UNAVAILABLE", "connection to it broke",
         UNREACHABLE_REASON),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", False, "UNAVAILABLE",
         "connection to it broke", UNREACHABLE_REASON),
        (grpc.StatusCode.UNIMPLEMENTED, "Method not found!", False, "UNAVAILABLE", "does not serve Explain",
         UNREACHABLE_REASON),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False, "DEADLINE_EXCEEDED",
         "deadline exceeded while the gradient worker tier ran Explain", "deadline"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!", False, "RESOURCE_EXHAUSTED",
         "Concurrent RPC limit exceeded!", "resource_exhausted"),
    ],
)  # fmt: skip
def test_status_mapping(
    code: grpc.StatusCode, details: str, marked: bool, want_code: str, want_message: str, want_reason: str
) -> None:
    error = forwarded_error(_rpc_error(code, details, marked=marked), "Explain")
    assert error.code.name == want_code
    assert want_message in error.message
    assert error.reason == want_reason
    if marked:
        assert error.message == details


def test_the_tiers_reason_crosses_the_hop() -> None:
    """The tier tells its metrics reason in the trailing metadata (calls.REASON_METADATA_KEY): the
    frontend counts the rejection as the tier did, cost_budget rather than resource_exhausted."""
    trailing = grpc.aio.Metadata(*TIER_METADATA, (REASON_METADATA_KEY, "cost_budget"))
    told = grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), trailing, "full")
    error = forwarded_error(told, "Dream")
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.message, error.reason) == ("full", "cost_budget")


# --- a fake pool and the two tiers ----------------------------------------------------------------


class FakePool(FakePoolLifecycle):
    """GradientPool double on the worker tier: records submits, streams progress, fabricated results;
    `fail_with` is raised by submit, `block` makes a job run until cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.submits: list[tuple[Any, float, float | None, float]] = []  # task, cost, deadline, when
        self.block = False
        self.fail_with: BaseException | None = None
        self.running = threading.Event()
        self.cancelled = threading.Event()

    async def submit(self, task: Any, *, cost: float, deadline: float | None, on_progress: Any = None) -> Any:
        self.submits.append((task, cost, deadline, time.monotonic()))
        if self.fail_with is not None:
            raise self.fail_with
        image = None if isinstance(task, jobs.ExplainJob) else getattr(task, "image", None)
        if image is None and isinstance(task, jobs.StylizeJob):
            image = task.content
        if on_progress is not None:
            for step in (1, 2, 3):
                on_progress(
                    jobs.ProgressUpdate(
                        kind=task.kind,
                        step=step,
                        total_steps=3,
                        losses={"total": float(step)},
                        preview_png=encode_png(image) if step == 2 else None,
                    )
                )
        if self.block:
            self.running.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if isinstance(task, jobs.ExplainJob):
            n = task.inputs.shape[0]
            return jobs.ExplainResult(
                model=task.model,
                version=task.version,
                saliency=task.inputs * 2,
                classes=np.array(task.targets or [3] * n, dtype=np.int64),
                probabilities=np.full(n, 0.5, np.float32),
                predicted=np.full(n, 3, np.int64),
                predicted_probabilities=np.full(n, 0.75, np.float32),
                plain=None,
                cam=None,
                cam_layer=None,
                pngs=tuple(encode_png(np.zeros((4, 4))) for _ in range(n)),
                seconds=0.01,
            )
        if isinstance(task, jobs.DreamJob):
            return jobs.DreamResult(
                model=task.model,
                version=task.version,
                image=image,
                png=encode_png(image),
                layers=(("features.22", 1.0),),
                octave_sizes=(image.shape[:2],),
                steps=3,
                objective_before=1.0,
                objective_after=2.0,
                seconds=0.01,
            )
        return jobs.StylizeResult(
            model=task.model,
            version=task.version,
            image=image,
            png=encode_png(image),
            losses={"total": 1.0},
            initial_losses={"total": 9.0},
            iterations=3,
            best_iteration=3,
            seconds=0.01,
        )

    def reset(self) -> None:
        self.submits.clear()
        self.block = False
        self.fail_with = None
        self.alive = 1
        self.running.clear()
        self.cancelled.clear()


def _models() -> list[FakeModel]:
    vgg = FakeModel(
        "vgg19", 1, architecture="vgg19", input_shape=(3, 224, 224), preprocessing=IMAGENET, capabilities=ALL
    )
    return [FakeModel("lenet5", 1, capabilities={"classify": True}), vgg]


class WorkerHarness:
    """A real GradientTierServer (fake catalog and pool) on 127.0.0.1, its loop in a background thread."""

    def __init__(self, pool: FakePool, port: int = 0, **overrides: Any) -> None:
        self.pool = pool
        self.settings = Settings(
            host="127.0.0.1",
            grpc_port=port,
            metrics_port=0,
            grace_period_s=2.0,
            max_task_iterations=WORKER_MAX_ITERATIONS,
            **overrides,
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="worker-loop", daemon=True)
        self._thread.start()
        self.server = GradientTierServer(self.settings, catalog=FakeEngine(_models()), pool=pool)
        self.run(self.server.start())
        self.run(self.server.load())
        self.address = f"127.0.0.1:{self.server.grpc_port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.channel.close()
        if not self.server.state.draining:
            self.run(self.server.shutdown(grace_s=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


def health_of(channel: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def pool() -> FakePool:
    return FakePool()


@pytest.fixture(scope="module")
def worker(pool: FakePool) -> Iterator[WorkerHarness]:
    w = WorkerHarness(pool)
    yield w
    w.close()
    assert pool.closed


@pytest.fixture(scope="module")
def frontend(worker: WorkerHarness) -> Iterator[Harness]:
    h = Harness(FakeEngine(_models()), worker_address=worker.address)
    wait_for(lambda: health_of(h.channel, GRADIENTS_SERVICE) == SERVING, "the frontend's gradients SERVING")
    yield h
    h.close()


@pytest.fixture
def stub(frontend: Harness, pool: FakePool) -> pb_grpc.InferenceStub:
    pool.reset()
    return pb_grpc.InferenceStub(frontend.channel)


def png(side: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side + 8), 100).save(buf, format="PNG")
    return buf.getvalue()


def rpc_error(call: Any, request: Any, timeout: float = 10) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=timeout)
        if not hasattr(result, "ByteSize"):
            list(result)
    return info.value


# --- forwarding ---------------------------------------------------------------------------------------


def test_explain_is_answered_by_the_worker(
    stub: pb_grpc.InferenceStub, worker: WorkerHarness, pool: FakePool
) -> None:
    request = pb.ExplainRequest(model="vgg19", images=[pb.ImageInput(encoded=png())], target_classes=[4])
    before = counter("cnnserve_requests_total", method="Explain", model="vgg19", code="OK")
    forwarded = stub.Explain(request, timeout=10)
    assert len(pool.submits) == 1 and isinstance(pool.submits[0][0], jobs.ExplainJob)
    assert forwarded.explanations[0].explained.index == 4
    assert forwarded == worker.stub.Explain(request, timeout=10)
    # frontend + worker for the forwarded call, worker for the direct one
    assert counter("cnnserve_requests_total", method="Explain", model="vgg19", code="OK") == before + 3
    assert counter("cnnserve_inflight_requests", method="Explain") == 0


def test_dream_and_stylize_progress_flows_through(stub: pb_grpc.InferenceStub, worker: WorkerHarness) -> None:
    dream = pb.DreamRequest(model="vgg19", image=pb.ImageInput(encoded=png()), steps=3, preview_every=2)
    messages = list(stub.Dream(dream, timeout=10))
    assert [m.WhichOneof("kind") for m in messages] == ["progress"] * 3 + ["result"]
    assert [m.progress.step for m in messages[:3]] == [1, 2, 3] and messages[1].progress.preview_png
    assert messages == list(worker.stub.Dream(dream, timeout=10))
    assert stub.DreamUnary(dream, timeout=10) == messages[-1].result

    stylize = pb.StylizeRequest(
        model="vgg19",
        content=pb.ImageInput(encoded=png()),
        styles=[pb.StyleImage(image=pb.ImageInput(encoded=png(32)))],
        iterations=3,
    )
    messages = list(stub.Stylize(stylize, timeout=10))
    assert [m.WhichOneof("kind") for m in messages] == ["progress"] * 3 + ["result"]
    assert messages == list(worker.stub.Stylize(stylize, timeout=10))
    assert stub.StylizeUnary(stylize, timeout=10) == messages[-1].result


def test_worker_statuses_come_back_unchanged(
    stub: pb_grpc.InferenceStub, worker: WorkerHarness, pool: FakePool, frontend: Harness
) -> None:
    image = pb.ImageInput(encoded=png())
    over_cap = pb.DreamRequest(model="vgg19", image=image, steps=WORKER_MAX_ITERATIONS + 1)
    unknown = pb.ExplainRequest(model="nope", images=[image])
    cases: list[tuple[str, Any, Any]] = [
        ("DreamUnary", over_cap, None),  # the worker's cap (the frontend's own is 1000)
        ("Dream", over_cap, None),
        ("Explain", unknown, None),
        ("Explain", pb.ExplainRequest(model="vgg19", images=[image]), ResourceExhausted(
            "gradient workers are saturated: 9 of 10 cost units are admitted and this explain job needs 2; "
            "estimated wait about 4.2 s; retry later", reason="cost_budget")),
        ("StylizeUnary", pb.StylizeRequest(model="vgg19", content=image, styles=[pb.StyleImage(image=image)]),
         Unavailable("no gradient worker is ready (restarting); retry shortly")),
        ("Stylize", pb.StylizeRequest(model="vgg19", content=image, styles=[pb.StyleImage(image=image)]),
         Internal("this input crashed a gradient worker twice; it is not retried")),
    ]  # fmt: skip
    for method, request, failure in cases:
        pool.fail_with = failure
        direct = rpc_error(getattr(worker.stub, method), request)
        forwarded = rpc_error(getattr(stub, method), request)
        assert (forwarded.code(), forwarded.details()) == (direct.code(), direct.details()), method
    assert "max_task_iterations" in direct_details(worker, over_cap)
    not_found = rpc_error(stub.Explain, unknown)
    assert not_found.code() == grpc.StatusCode.NOT_FOUND and "nope" in not_found.details()
    # the frontend labels calls for models it does not serve with "" (bounded cardinality)
    assert counter("cnnserve_rejections_total", method="Explain", model="", reason="not_found") >= 1
    assert health_of(frontend.channel, "") == SERVING


def direct_details(worker: WorkerHarness, request: pb.DreamRequest) -> str:
    details: str = rpc_error(worker.stub.DreamUnary, request).details()
    return details


def test_a_call_without_deadline_reaches_the_worker(stub: pb_grpc.InferenceStub, pool: FakePool) -> None:
    """It gets max_deadline_s on the frontend; forwarded, gRPC's rounding of the timeout header must
    not make it a deadline beyond the worker's max_deadline_s (INVALID_ARGUMENT there)."""
    request = pb.ExplainRequest(model="vgg19", images=[pb.ImageInput(encoded=png())])
    for _ in range(5):
        assert stub.Explain(request).model == "vgg19"
    # The worker's job then runs to min(that deadline, max_task_duration_s): 300 s by default.
    cap = Settings.model_fields["max_task_duration_s"].default
    for _, _, deadline, submitted in pool.submits:
        assert deadline is not None and cap - 1 < deadline - submitted <= cap


def test_deadline_is_passed_on_and_stops_the_job(stub: pb_grpc.InferenceStub, pool: FakePool) -> None:
    pool.block = True
    before = counter("cnnserve_requests_total", method="Explain", model="vgg19", code="DEADLINE_EXCEEDED")
    sent = time.monotonic()
    error = rpc_error(
        stub.Explain, pb.ExplainRequest(model="vgg19", images=[pb.ImageInput(encoded=png())]), 1.5
    )
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert pool.cancelled.wait(10), "the worker's job was not stopped"
    (_, _, deadline, submitted) = pool.submits[0]
    # The worker's deadline is the caller's (1.5 s after sending; gRPC rounds the timeout header to
    # milliseconds), not its own max_deadline_s (600 s).
    assert deadline is not None and sent < deadline <= sent + 1.5 + 0.1
    wait_for(
        lambda: (
            counter("cnnserve_requests_total", method="Explain", model="vgg19", code="DEADLINE_EXCEEDED")
            >= before + 1
        ),
        "the frontend to count DEADLINE_EXCEEDED",
    )


@pytest.mark.parametrize("method", ["Explain", "Dream"])
def test_client_cancel_stops_the_worker_job(stub: pb_grpc.InferenceStub, pool: FakePool, method: str) -> None:
    pool.block = True
    image = pb.ImageInput(encoded=png())
    if method == "Explain":
        future = stub.Explain.future(pb.ExplainRequest(model="vgg19", images=[image]), timeout=30)
        assert pool.running.wait(10)
        future.cancel()
    else:
        call = stub.Dream(pb.DreamRequest(model="vgg19", image=image, steps=3), timeout=30)
        assert next(call).progress.step == 1  # the worker's progress arrives while the job runs
        assert pool.running.wait(10)
        call.cancel()
    assert pool.cancelled.wait(10), "the worker's job was not stopped"
    wait_for(lambda: counter("cnnserve_inflight_requests", method=method) == 0, "no call in flight")


def test_health_mirrors_the_worker_tier(frontend: Harness, worker: WorkerHarness, pool: FakePool) -> None:
    pool.reset()
    for service in ("", "cnnserve.v1.Inference", GRADIENTS_SERVICE, "model:vgg19"):
        assert health_of(worker.channel, service) == SERVING, service
    pool.alive = 0  # every worker process dead (restarting)
    try:
        wait_for(lambda: health_of(worker.channel, "") == NOT_SERVING, "the worker NOT_SERVING")
        wait_for(
            lambda: health_of(frontend.channel, GRADIENTS_SERVICE) == NOT_SERVING, "the frontend to follow"
        )
        assert health_of(frontend.channel, "") == SERVING  # classification is not affected
    finally:
        pool.alive = 1
    wait_for(lambda: health_of(frontend.channel, GRADIENTS_SERVICE) == SERVING, "the frontend SERVING again")


def test_model_rpcs_on_both_tiers(stub: pb_grpc.InferenceStub, worker: WorkerHarness) -> None:
    on_frontend = stub.GetModel(pb.GetModelRequest(name="vgg19"), timeout=5)
    assert set(on_frontend.capabilities) == {
        pb.CAPABILITY_CLASSIFY, pb.CAPABILITY_EXPLAIN, pb.CAPABILITY_DREAM, pb.CAPABILITY_STYLIZE
    }  # fmt: skip
    on_worker = worker.stub.ListModels(pb.ListModelsRequest(), timeout=5)
    capabilities = {m.name: set(m.capabilities) for m in on_worker.models}
    assert capabilities == {
        "lenet5": set(),
        "vgg19": {pb.CAPABILITY_EXPLAIN, pb.CAPABILITY_DREAM, pb.CAPABILITY_STYLIZE},
    }


def test_the_worker_does_not_classify(worker: WorkerHarness) -> None:
    request = pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=png()))
    for call, req in (
        (worker.stub.Classify, request),
        (worker.stub.ClassifyBatch, pb.ClassifyBatchRequest(model="lenet5", images=[request.image])),
    ):
        error = rpc_error(call, req)
        assert (error.code(), error.details()) == (grpc.StatusCode.UNIMPLEMENTED, NOT_HERE_MESSAGE)
    with pytest.raises(grpc.RpcError) as info:
        list(
            worker.stub.ClassifyStream(iter([pb.ClassifyStreamRequest(id="a", request=request)]), timeout=10)
        )
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert health_of(worker.channel, "") == SERVING


def test_unreachable_worker_tier_then_recovery(caplog: pytest.LogCaptureFixture) -> None:
    """No worker yet: UNAVAILABLE with a clear message, gradients NOT_SERVING, classification fine;
    a worker starting on that address is picked up (health SERVING, calls answered)."""
    port = free_port()
    frontend = Harness(FakeEngine(_models()), worker_address=f"127.0.0.1:{port}")
    worker: WorkerHarness | None = None
    try:
        stub = pb_grpc.InferenceStub(frontend.channel)
        request = pb.ExplainRequest(model="vgg19", images=[pb.ImageInput(encoded=png())])
        before = counter(
            "cnnserve_rejections_total", method="Explain", model="vgg19", reason=UNREACHABLE_REASON
        )
        with caplog.at_level(logging.WARNING, logger="service.frontend.forwarding"):
            error = rpc_error(stub.Explain, request)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            error.details() == "the gradient worker tier is unavailable (it cannot be reached); retry later"
        )
        assert f"127.0.0.1:{port}" in caplog.text  # the operator's log names the address
        dream = rpc_error(stub.Dream, pb.DreamRequest(model="vgg19", image=pb.ImageInput(encoded=png())))
        assert dream.code() == grpc.StatusCode.UNAVAILABLE
        assert (
            counter("cnnserve_rejections_total", method="Explain", model="vgg19", reason=UNREACHABLE_REASON)
            == before + 1
        )
        wait_for(lambda: health_of(frontend.channel, GRADIENTS_SERVICE) == NOT_SERVING, "NOT_SERVING")
        assert health_of(frontend.channel, "") == SERVING
        classify = pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=png()))
        assert stub.Classify(classify, timeout=5).classes

        pool = FakePool()
        worker = WorkerHarness(pool, port=port)
        wait_for(lambda: health_of(frontend.channel, GRADIENTS_SERVICE) == SERVING, "SERVING", timeout=30)
        assert stub.Explain(request, timeout=10).model == "vgg19"
    finally:
        frontend.close()
        if worker is not None:
            worker.close()


def test_bad_worker_address_is_a_startup_error() -> None:
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, worker_address="no-port")
    from service.frontend.server import Server

    async def start() -> None:
        await Server(settings, FakeEngine()).start()

    with pytest.raises(StartupError, match="worker_address 'no-port' is not host:port"):
        asyncio.run(start())


def test_worker_needs_a_worker_process() -> None:
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, workers=0)

    async def start() -> None:
        server = GradientTierServer(settings, catalog=FakeEngine())
        await server.start()
        try:
            await server.load()
        finally:
            await server.shutdown(grace_s=0)

    with pytest.raises(StartupError, match="workers >= 1"):
        asyncio.run(start())


def test_feature_maps_and_filters_are_forwarded(stub: pb_grpc.InferenceStub, worker: WorkerHarness) -> None:
    # the worker's own answers come back unchanged (here its refusals: no job result is faked)
    cases = [
        ("FeatureMaps", pb.FeatureMapsRequest(model="vgg19", image=pb.ImageInput(encoded=png()))),
        ("Filters", pb.FiltersRequest(model="vgg19", layer="features.1")),
    ]
    for method, request in cases:
        forwarded = rpc_error(getattr(stub, method), request)
        direct = rpc_error(getattr(worker.stub, method), request)
        assert forwarded.code() == direct.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert forwarded.details() == direct.details()
