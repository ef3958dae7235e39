"""The gradient RPCs (service/frontend/gradients.py) over a real server with a fake engine and a fake worker
pool: what reaches the pool, what comes back, refusals before submit, cancellation, health."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from servicer_fakes import FakeEngine, FakeModel, FakePoolLifecycle, Harness

from export.preprocessing import IMAGENET
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.errors import DeadlineExceeded, InvalidArgument
from service.frontend.convert import EXPLAIN_METHOD_ENUM, EXPLAIN_METHOD_NAMES
from service.frontend.server import GRADIENTS_SERVICE
from service.worker import jobs
from service.worker.params import EXPLAIN_METHODS, DreamParams
from service.worker.rendering import encode_png

ALL = {"classify": True, "explain": True, "dream": True, "stylize": True}


class FakePool(FakePoolLifecycle):
    """GradientPool double: records submits, reports progress, answers with fabricated results."""

    def __init__(self) -> None:
        super().__init__()
        self.submits: list[tuple[Any, float, float | None]] = []
        self.block = False
        self.cancelled = threading.Event()
        self.running = threading.Event()
        self.ready_summary: Any = None  # GradientPool.ready_summary: what the processes refused

    async def submit(self, task: Any, *, cost: float, deadline: float | None, on_progress: Any = None) -> Any:
        self.submits.append((task, cost, deadline))
        if self.block:
            self.running.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if isinstance(task, jobs.ExplainJob):
            n = task.inputs.shape[0]
            classes = np.array(task.targets if task.targets is not None else [3] * n, dtype=np.int64)
            return jobs.ExplainResult(
                model=task.model,
                version=task.version,
                saliency=task.inputs * 2,
                classes=classes,
                probabilities=np.full(n, 0.5, np.float32),
                predicted=np.full(n, 3, np.int64),
                predicted_probabilities=np.full(n, 0.75, np.float32),
                plain=task.inputs if task.plain_gradient else None,
                cam=None,
                cam_layer=None,
                pngs=tuple(encode_png(np.zeros((4, 4))) for _ in range(n)),
                seconds=0.01,
            )
        image = task.image if isinstance(task, jobs.DreamJob) else task.content
        total = 3
        for step in range(1, total + 1):
            if on_progress is None:
                continue
            on_progress(
                jobs.ProgressUpdate(
                    kind=task.kind,
                    step=step,
                    total_steps=total,
                    losses={"total": float(step)},
                    preview_png=encode_png(image) if step == 2 else None,
                )
            )
        if isinstance(task, jobs.DreamJob):
            return jobs.DreamResult(
                model=task.model,
                version=task.version,
                image=image,
                png=encode_png(image),
                layers=(("layer3", 1.0),),
                octave_sizes=(image.shape[:2],),
                steps=total,
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
            iterations=total,
            best_iteration=total,
            seconds=0.01,
        )


def _engine() -> FakeEngine:
    return FakeEngine(
        [
            FakeModel("lenet5", 1, capabilities={"classify": True, "explain": False, "dream": False}),
            FakeModel(
                "vgg19",
                1,
                architecture="vgg19",
                input_shape=(3, 224, 224),
                preprocessing=IMAGENET,
                capabilities=ALL,
            ),
        ]
    )


@pytest.fixture(scope="module")
def pool() -> FakePool:
    return FakePool()


@pytest.fixture(scope="module")
def harness(pool: FakePool) -> Iterator[Harness]:
    h = Harness(_engine(), pool=pool, max_task_iterations=50)
    deadline = time.monotonic() + 10
    while not pool.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield h
    h.close()
    assert pool.closed


@pytest.fixture
def stub(harness: Harness, pool: FakePool) -> pb_grpc.InferenceStub:
    pool.submits.clear()
    pool.block = False
    return pb_grpc.InferenceStub(harness.channel)


def png(side: int = 40, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side + 8), 100).save(buf, format="PNG")
    return buf.getvalue()


def error(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=10)
        if not hasattr(result, "ByteSize"):
            list(result)
    return info.value


def test_stylize_streams_progress_then_result(stub: pb_grpc.InferenceStub, pool: FakePool) -> None:
    request = pb.StylizeRequest(
        model="vgg19",
        content=pb.ImageInput(encoded=png(40)),
        styles=[
            pb.StyleImage(image=pb.ImageInput(encoded=png(48)), weight=2),
            pb.StyleImage(image=pb.ImageInput(encoded=png(36))),
        ],
        iterations=7,
        optimizer=pb.STYLE_OPTIMIZER_ADAM,
        init=pb.STYLE_INIT_NOISE,
        seed=5,
        style_weight=1e4,
        original_colors=True,
        max_side=64,
        preview_every=2,
    )
    messages = list(stub.Stylize(request, timeout=10))
    assert [m.WhichOneof("kind") for m in messages] == ["progress"] * 3 + ["result"]
    assert [m.progress.step for m in messages[:3]] == [1, 2, 3]
    assert messages[1].progress.preview_png and not messages[0].progress.preview_png
    result = messages[-1].result
    assert (result.width, result.height) == (40, 48) and result.png.startswith(b"\x89PNG")
    assert result.losses["total"] == 1.0 and result.initial_losses["total"] == 9.0
    (task, cost, deadline) = pool.submits[0]
    assert isinstance(task, jobs.StylizeJob) and task.model == "vgg19" and task.version == 1
    assert task.content.shape == (48, 40, 3) and len(task.styles) == 2 and task.style_blend == (2.0, 0.0)
    p = task.params
    assert (p.iterations, p.optimizer, p.init, p.seed, p.original_colors, p.max_side) == (
        7,
        "adam",
        "noise",
        5,
        True,
        64,
    )
    assert p.style_weight == 1e4 and p.content_weight == 1.0 and p.preview_every == 2
    assert cost == jobs.estimate_cost(task) and deadline is not None

    unary = stub.StylizeUnary(request, timeout=10)
    assert unary == result


def test_dream_unary_and_params(stub: pb_grpc.InferenceStub, pool: FakePool) -> None:
    result = stub.DreamUnary(
        pb.DreamRequest(
            model="vgg19",
            image=pb.ImageInput(encoded=png(40)),
            layers=[pb.DreamLayer(layer="features.22", weight=0.5, channels=[1, 2])],
            octaves=2,
            jitter=0,
            tile_size=0,
            steps=3,
        ),
        timeout=10,
    )
    assert result.steps == 3 and result.png.startswith(b"\x89PNG")
    task = pool.submits[0][0]
    assert task.params.layers == {"features.22": 0.5} and task.params.channels == {"features.22": (1, 2)}
    assert (task.params.octaves, task.params.jitter, task.params.tile_size, task.params.steps) == (2, 0, 0, 3)
    assert task.params.octave_scale == DreamParams().octave_scale


def test_explain_tensor_and_targets(stub: pb_grpc.InferenceStub, pool: FakePool) -> None:
    x = np.full((3, 224, 224), 0.25, np.float32)
    image = pb.ImageInput(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=x.tobytes()))
    response = stub.Explain(
        pb.ExplainRequest(
            model="vgg19",
            images=[image, image],
            target_classes=[4],
            method=pb.EXPLAIN_METHOD_GUIDED_GRADCAM,
            include_plain_gradient=True,
        ),
        timeout=10,
    )
    assert response.method == pb.EXPLAIN_METHOD_GUIDED_GRADCAM and len(response.explanations) == 2
    e = response.explanations[0]
    saliency = np.frombuffer(e.saliency.data, "<f4").reshape(list(e.saliency.shape))
    assert saliency.shape == (3, 224, 224) and np.allclose(saliency, 0.5)
    assert e.explained.index == 4 and e.predicted.index == 3 and e.plain_gradient.shape == [3, 224, 224]
    # each class with its own probability (the predicted one was always 0 before)
    assert e.explained.probability == pytest.approx(0.5) and e.predicted.probability == pytest.approx(0.75)
    task = pool.submits[0][0]
    assert task.targets == (4, 4) and task.method == "guided_gradcam" and task.plain_gradient


def test_refusals_before_submit(stub: pb_grpc.InferenceStub, pool: FakePool, harness: Harness) -> None:
    image = pb.ImageInput(encoded=png(40))
    cases = [
        (stub.Explain, pb.ExplainRequest(model="nope", images=[image]), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            stub.Explain,
            pb.ExplainRequest(model="vgg19", images=[image], target_classes=[10]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "target class 10",
        ),
        (
            stub.Explain,
            pb.ExplainRequest(model="lenet5", images=[image]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "explain",
        ),
        (stub.Explain, pb.ExplainRequest(model="vgg19"), grpc.StatusCode.INVALID_ARGUMENT, "images"),
        (
            stub.Dream,
            pb.DreamRequest(model="vgg19", image=image, steps=51, octaves=1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_task_iterations=50",
        ),
        (
            stub.Dream,
            pb.DreamRequest(model="vgg19", image=pb.ImageInput(encoded=b"GIF89a..")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "format",
        ),
        (
            stub.DreamUnary,
            pb.DreamRequest(model="vgg19", image=pb.ImageInput(encoded=png(16))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "at least 32",
        ),
        (
            stub.Stylize,
            pb.StylizeRequest(
                model="vgg19", content=image, styles=[pb.StyleImage(image=image)], iterations=51
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_task_iterations=50",
        ),
        (
            stub.StylizeUnary,
            pb.StylizeRequest(model="vgg19", content=image),
            grpc.StatusCode.INVALID_ARGUMENT,
            "styles",
        ),
        (
            stub.Stylize,
            pb.StylizeRequest(model="lenet5", content=image, styles=[pb.StyleImage(image=image)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stylize",
        ),
    ]
    for call, request, code, text in cases:
        err = error(call, request)
        assert err.code() == code and text in err.details(), (request, err.details())
    assert pool.submits == []


def test_a_version_the_workers_refused_is_not_offered_for_gradient_rpcs(
    stub: pb_grpc.InferenceStub, pool: FakePool
) -> None:
    before = stub.GetModel(pb.GetModelRequest(name="vgg19"), timeout=10)
    assert pb.CAPABILITY_EXPLAIN in before.capabilities
    reason = "the PyTorch network rebuilt from weights.pt disagrees with model.onnx (relative diff 0.3)"
    pool.ready_summary = {"refused": {"vgg19:1": reason}}
    try:
        image = pb.ImageInput(encoded=png(40))
        for call, request in (
            (stub.Explain, pb.ExplainRequest(model="vgg19", images=[image])),
            (stub.DreamUnary, pb.DreamRequest(model="vgg19", image=image)),
            (
                stub.StylizeUnary,
                pb.StylizeRequest(model="vgg19", content=image, styles=[pb.StyleImage(image=image)]),
            ),
        ):
            err = error(call, request)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.details() == f"model 'vgg19' version 1 is not offered for gradient RPCs: {reason}"
        assert pool.submits == []
        info = stub.GetModel(pb.GetModelRequest(name="vgg19"), timeout=10)
        assert list(info.capabilities) == [pb.CAPABILITY_CLASSIFY]
        listed = {
            m.name: list(m.capabilities) for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        }
        assert listed["vgg19"] == [pb.CAPABILITY_CLASSIFY]
    finally:
        pool.ready_summary = None
    assert stub.GetModel(pb.GetModelRequest(name="vgg19"), timeout=10).capabilities == before.capabilities


def test_cancel_stops_the_job(stub: pb_grpc.InferenceStub, pool: FakePool) -> None:
    pool.block = True
    pool.cancelled.clear()
    pool.running.clear()
    call = stub.Dream(pb.DreamRequest(model="vgg19", image=pb.ImageInput(encoded=png(40))), timeout=10)
    assert pool.running.wait(5)
    call.cancel()
    assert pool.cancelled.wait(5)


def test_capabilities_and_health(stub: pb_grpc.InferenceStub, harness: Harness, pool: FakePool) -> None:
    vgg = stub.GetModel(pb.GetModelRequest(name="vgg19"), timeout=10)
    assert list(vgg.capabilities) == [
        pb.CAPABILITY_CLASSIFY,
        pb.CAPABILITY_EXPLAIN,
        pb.CAPABILITY_DREAM,
        pb.CAPABILITY_STYLIZE,
    ]
    lenet = stub.GetModel(pb.GetModelRequest(name="lenet5"), timeout=10)
    assert list(lenet.capabilities) == [pb.CAPABILITY_CLASSIFY]
    health = health_pb2_grpc.HealthStub(harness.channel)

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=GRADIENTS_SERVICE), timeout=5).status

    def wait_for(wanted: int) -> None:
        deadline = time.monotonic() + 5
        while status() != wanted:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    wait_for(health_pb2.HealthCheckResponse.SERVING)
    pool.alive = 0
    try:
        wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        pool.alive = 1
    wait_for(health_pb2.HealthCheckResponse.SERVING)


def test_workers_disabled_is_unavailable() -> None:
    h = Harness(_engine())
    try:
        stub = pb_grpc.InferenceStub(h.channel)
        err = error(stub.Explain, pb.ExplainRequest(model="vgg19", images=[pb.ImageInput(encoded=png())]))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "gradient workers disabled" in err.details()
        err = error(stub.Dream, pb.DreamRequest(model="vgg19"))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        vgg = stub.GetModel(pb.GetModelRequest(name="vgg19"), timeout=10)
        assert list(vgg.capabilities) == [pb.CAPABILITY_CLASSIFY]
    finally:
        h.close()


def test_pool_errors_become_statuses(
    stub: pb_grpc.InferenceStub, pool: FakePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise InvalidArgument("dream: unknown layer 'x'", reason="unknown_layer")

    monkeypatch.setattr(pool, "submit", refuse)
    err = error(stub.Dream, pb.DreamRequest(model="vgg19", image=pb.ImageInput(encoded=png(40))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown layer" in err.details()


def test_max_task_duration_stops_a_job_the_client_would_let_run() -> None:
    """The job's deadline is min(client deadline, now + max_task_duration_s); a job stopped by the
    cap says so, naming the setting."""
    pool = FakePool()
    deadlines: list[float] = []

    async def run_until_deadline(
        task: Any, *, cost: float, deadline: float | None, on_progress: Any = None
    ) -> Any:
        assert deadline is not None
        deadlines.append(deadline - time.monotonic())
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        raise DeadlineExceeded("the dream job ran past its deadline")

    pool.submit = run_until_deadline  # type: ignore[method-assign]
    h = Harness(_engine(), pool=pool, max_task_duration_s=0.3)
    try:
        stub = pb_grpc.InferenceStub(h.channel)
        started = time.monotonic()
        try:
            stub.DreamUnary(pb.DreamRequest(model="vgg19", image=pb.ImageInput(encoded=png(40))), timeout=30)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "max_task_duration_s=0.3" in err.details()
        else:
            pytest.fail("the job was not stopped")
        assert time.monotonic() - started < 10
        assert deadlines and deadlines[0] <= 0.3
    finally:
        h.close()


def test_the_wire_explain_methods_are_the_job_methods() -> None:
    """One list of explain methods (params.EXPLAIN_METHODS): every ExplainMethod enum value maps to a
    job method (UNSPECIFIED: guided backprop), and every job method but "gradient" has its value."""
    assert set(EXPLAIN_METHOD_NAMES) == set(pb.ExplainMethod.values())
    assert set(EXPLAIN_METHOD_NAMES.values()) <= set(EXPLAIN_METHODS)
    assert EXPLAIN_METHOD_NAMES[pb.EXPLAIN_METHOD_UNSPECIFIED] == "guided_backprop"
    assert set(EXPLAIN_METHODS) - set(EXPLAIN_METHOD_ENUM) == {"gradient"}
