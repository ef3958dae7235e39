"""cnnserve.v1.Inference through the real server wiring, with an engine double (servicer_fakes)."""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image
from servicer_fakes import FakeEngine, FakeModel, Harness, counter, queue_full

from export.preprocessing import DIGITS
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.errors import GENERIC_INTERNAL_MESSAGE


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness(max_images_per_request=4, max_top_k=8)
    yield h
    h.close()


@pytest.fixture
def stub(harness: Harness) -> pb_grpc.InferenceStub:
    harness.engine.fail_with = None
    harness.engine.delay_s = 0.0
    return pb_grpc.InferenceStub(harness.channel)


def tensor(value: float, shape: tuple[int, ...] = (1, 32, 32), dtype: str = "float32") -> pb.ImageInput:
    arr = np.full(shape, value, dtype=dtype)
    return pb.ImageInput(tensor=pb.Tensor(shape=list(shape), dtype=dtype, data=arr.tobytes()))


def png(value: int = 128, size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, "PNG")
    return buf.getvalue()


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_classify_tensor_returns_top_k_with_labels_and_timings(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Classify(pb.ClassifyRequest(model="lenet5", image=tensor(3.0), top_k=3), timeout=10)
    assert (response.model, response.version) == ("lenet5", 2)  # 0 = latest
    assert [c.index for c in response.classes] == [3, 2, 4]  # ties (2 and 4) by lower index
    assert response.classes[0].label == "digit 3"
    probabilities = [c.probability for c in response.classes]
    assert probabilities == sorted(probabilities, reverse=True) and 0.5 < probabilities[0] <= 1.0
    assert response.timings.total_seconds > 0


def test_classify_explicit_version_and_default_top_k(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Classify(pb.ClassifyRequest(model="lenet5", version=1, image=tensor(7.0)), timeout=10)
    assert response.version == 1
    assert len(response.classes) == 5 and response.classes[0].index == 7


def test_classify_encoded_image(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Classify(
        pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=png())), timeout=10
    )
    assert len(response.classes) == 5
    assert response.timings.decode_seconds > 0


def test_float16_tensor_is_converted(stub: pb_grpc.InferenceStub) -> None:
    response = stub.Classify(
        pb.ClassifyRequest(model="lenet5", image=tensor(5.0, dtype="float16")), timeout=10
    )
    assert response.classes[0].index == 5


@pytest.mark.parametrize(
    ("request_kwargs", "code", "needle"),
    [
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
        ({"model": "lenet5", "version": 9}, grpc.StatusCode.NOT_FOUND, "version 9"),
        ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model is required"),
        ({"model": "lenet5", "version": -1}, grpc.StatusCode.INVALID_ARGUMENT, "version"),
        ({"model": "lenet5", "top_k": 9}, grpc.StatusCode.INVALID_ARGUMENT, "between 1 and 8"),
        ({"model": "lenet5", "top_k": -1}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ],
)
def test_request_errors(
    stub: pb_grpc.InferenceStub, request_kwargs: dict, code: grpc.StatusCode, needle: str
) -> None:
    before = counter("cnnserve_requests_total", method="Classify", model="", code=code.name) + counter(
        "cnnserve_requests_total", method="Classify", model="lenet5", code=code.name
    )
    got, details = code_of(stub.Classify, pb.ClassifyRequest(image=tensor(1.0), **request_kwargs), timeout=10)
    assert got == code and needle in details
    after = counter("cnnserve_requests_total", method="Classify", model="", code=code.name) + counter(
        "cnnserve_requests_total", method="Classify", model="lenet5", code=code.name
    )
    assert after == before + 1


def test_unknown_model_is_not_a_metrics_label(stub: pb_grpc.InferenceStub) -> None:
    code_of(stub.Classify, pb.ClassifyRequest(model="attacker-chosen-name", image=tensor(1.0)), timeout=10)
    from service.observability.metrics import registry

    labels = {s.labels.get("model") for m in registry.collect() for s in m.samples}
    assert "attacker-chosen-name" not in labels


@pytest.mark.parametrize(
    ("image", "needle"),
    [
        (tensor(1.0, shape=(3, 32, 32)), "shape"),
        (tensor(1.0, shape=(2, 1, 32, 32)), "one image"),
        (tensor(1.0, dtype="float64"), "dtype"),
        (pb.ImageInput(tensor=pb.Tensor(shape=[1, 32, 32], dtype="float32", data=b"\0" * 12)), "bytes"),
        (tensor(float("nan")), "NaN"),
        (tensor(float("inf")), "infinite"),
        (tensor(1e6, dtype="float32"), None),  # finite and valid: not an error (see below)
        (pb.ImageInput(), "empty"),
        (pb.ImageInput(encoded=b""), "empty"),
        (pb.ImageInput(encoded=b"GIF89a" + b"\0" * 20), "GIF"),
        (pb.ImageInput(encoded=png()[:40]), "corrupt"),
    ],
)
def test_invalid_images(
    stub: pb_grpc.InferenceStub, harness: Harness, image: pb.ImageInput, needle: str | None
) -> None:
    request = pb.ClassifyRequest(model="lenet5", image=image)
    if needle is None:
        stub.Classify(request, timeout=10)
        return
    computed = harness.engine.computed_images
    code, details = code_of(stub.Classify, request, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in details
    assert harness.engine.computed_images == computed


def test_float32_beyond_float16_range_is_refused_for_an_fp16_model() -> None:
    h = Harness(FakeEngine([FakeModel("half", 1, input_dtype=np.dtype("float16"))]))
    try:
        stub = pb_grpc.InferenceStub(h.channel)
        assert (
            stub.Classify(pb.ClassifyRequest(model="half", image=tensor(2.0)), timeout=10).classes[0].index
            == 2
        )
        code, details = code_of(
            stub.Classify, pb.ClassifyRequest(model="half", image=tensor(1e6)), timeout=10
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "infinite" in details
    finally:
        h.close()


def test_missing_image(stub: pb_grpc.InferenceStub) -> None:
    code, details = code_of(stub.Classify, pb.ClassifyRequest(model="lenet5"), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "image is required" in details


def test_batch_keeps_request_order_with_mixed_inputs(stub: pb_grpc.InferenceStub) -> None:
    images = [tensor(2.0), pb.ImageInput(encoded=png()), tensor(7.0), tensor(0.0)]
    response = stub.ClassifyBatch(pb.ClassifyBatchRequest(model="lenet5", images=images, top_k=1), timeout=10)
    assert len(response.results) == 4
    single = stub.Classify(pb.ClassifyRequest(model="lenet5", image=images[1], top_k=1), timeout=10)
    assert [r.classes[0].index for r in response.results] == [2, single.classes[0].index, 7, 0]


def test_batch_over_the_image_cap_names_it(stub: pb_grpc.InferenceStub, harness: Harness) -> None:
    computed = harness.engine.computed_images
    code, details = code_of(
        stub.ClassifyBatch, pb.ClassifyBatchRequest(model="lenet5", images=[tensor(1.0)] * 5), timeout=10
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_images_per_request is 4" in details
    assert harness.engine.computed_images == computed


def test_empty_batch(stub: pb_grpc.InferenceStub) -> None:
    code, _ = code_of(stub.ClassifyBatch, pb.ClassifyBatchRequest(model="lenet5"), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_batch_error_names_the_image(stub: pb_grpc.InferenceStub) -> None:
    images = [tensor(1.0), tensor(float("nan"))]
    code, details = code_of(
        stub.ClassifyBatch, pb.ClassifyBatchRequest(model="lenet5", images=images), timeout=10
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("image 1:")


def test_stream_answers_every_item_with_per_item_errors(stub: pb_grpc.InferenceStub) -> None:
    items = [
        pb.ClassifyStreamRequest(id="a", request=pb.ClassifyRequest(model="lenet5", image=tensor(1.0))),
        pb.ClassifyStreamRequest(id="b", request=pb.ClassifyRequest(model="missing", image=tensor(1.0))),
        pb.ClassifyStreamRequest(
            id="c", request=pb.ClassifyRequest(model="lenet5", image=tensor(float("nan")))
        ),
        pb.ClassifyStreamRequest(id="d"),
        *(
            pb.ClassifyStreamRequest(
                id=f"n{i}", request=pb.ClassifyRequest(model="lenet5", image=tensor(i % 10))
            )
            for i in range(40)
        ),
    ]
    responses = {r.id: r for r in stub.ClassifyStream(iter(items), timeout=20)}
    assert sorted(responses) == sorted(i.id for i in items)
    assert responses["a"].result.classes[0].index == 1
    assert responses["b"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert responses["c"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses["d"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for i in range(40):
        assert responses[f"n{i}"].result.classes[0].index == i % 10


def test_stream_items_are_answered_as_they_complete(stub: pb_grpc.InferenceStub) -> None:
    # A generator that waits for the first answer before sending the second item: only works if
    # the server answers items while the stream is still open.
    first_answer = threading.Event()

    def requests() -> Iterator[pb.ClassifyStreamRequest]:
        yield pb.ClassifyStreamRequest(id="1", request=pb.ClassifyRequest(model="lenet5", image=tensor(1.0)))
        assert first_answer.wait(10)
        yield pb.ClassifyStreamRequest(id="2", request=pb.ClassifyRequest(model="lenet5", image=tensor(2.0)))

    seen = []
    for response in stub.ClassifyStream(requests(), timeout=20):
        seen.append(response.id)
        first_answer.set()
    assert seen == ["1", "2"]


def test_internal_errors_are_generic_and_counted(stub: pb_grpc.InferenceStub, harness: Harness) -> None:
    harness.engine.fail_with = RuntimeError("secret path /srv/model.onnx exploded")
    before = counter("cnnserve_requests_total", method="Classify", model="lenet5", code="INTERNAL")
    code, details = code_of(stub.Classify, pb.ClassifyRequest(model="lenet5", image=tensor(1.0)), timeout=10)
    assert code == grpc.StatusCode.INTERNAL
    assert details == GENERIC_INTERNAL_MESSAGE and "secret" not in details
    assert (
        counter("cnnserve_requests_total", method="Classify", model="lenet5", code="INTERNAL") == before + 1
    )
    harness.engine.fail_with = None
    assert stub.Classify(pb.ClassifyRequest(model="lenet5", image=tensor(1.0)), timeout=10).classes


def test_stream_internal_error_stays_in_its_item(stub: pb_grpc.InferenceStub, harness: Harness) -> None:
    harness.engine.fail_with = RuntimeError("boom")
    items = [pb.ClassifyStreamRequest(id="x", request=pb.ClassifyRequest(model="lenet5", image=tensor(1.0)))]
    (response,) = list(stub.ClassifyStream(iter(items), timeout=10))
    assert response.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert response.error.message == GENERIC_INTERNAL_MESSAGE


def test_queue_full_is_resource_exhausted_and_counted(stub: pb_grpc.InferenceStub, harness: Harness) -> None:
    harness.engine.fail_with = queue_full()
    before = counter("cnnserve_rejections_total", method="Classify", model="lenet5", reason="queue_full")
    code, _ = code_of(stub.Classify, pb.ClassifyRequest(model="lenet5", image=tensor(1.0)), timeout=10)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        counter("cnnserve_rejections_total", method="Classify", model="lenet5", reason="queue_full")
        == before + 1
    )


def test_deadline_exceeded_is_counted(stub: pb_grpc.InferenceStub, harness: Harness) -> None:
    harness.engine.delay_s = 1.0
    before = counter("cnnserve_requests_total", method="Classify", model="lenet5", code="DEADLINE_EXCEEDED")
    code, _ = code_of(stub.Classify, pb.ClassifyRequest(model="lenet5", image=tensor(1.0)), timeout=0.2)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    harness.engine.delay_s = 0.0
    # The server notices when the handler is cancelled, a moment after the client gave up.
    for _ in range(100):
        if (
            counter("cnnserve_requests_total", method="Classify", model="lenet5", code="DEADLINE_EXCEEDED")
            > before
        ):
            break
        threading.Event().wait(0.02)
    assert (
        counter("cnnserve_requests_total", method="Classify", model="lenet5", code="DEADLINE_EXCEEDED")
        == before + 1
    )


def test_deadline_is_passed_to_the_engine_capped_or_refused(harness: Harness) -> None:
    import time

    from service.frontend.state import ServingState

    class Ctx:
        def __init__(self, remaining: float | None) -> None:
            self.remaining = remaining

        def time_remaining(self) -> float | None:
            return self.remaining

    state = ServingState(harness.engine, harness.settings.model_copy(update={"max_deadline_s": 2.0}))
    now = time.monotonic()
    assert state.deadline(Ctx(None)) == pytest.approx(now + 2.0, abs=0.5)
    assert state.deadline(Ctx(0.5)) == pytest.approx(now + 0.5, abs=0.2)
    from service.errors import DeadlineExceeded, InvalidArgument

    # Longer than max_deadline_s: refused naming the cap; capped only for ClassifyStream items.
    with pytest.raises(InvalidArgument, match="max_deadline_s is 2 s"):
        state.deadline(Ctx(1000.0))
    with pytest.raises(InvalidArgument, match="max_deadline_s is 2 s"):
        state.deadline(Ctx(2.2))
    # Exactly the cap, as gRPC's timeout encoding rounds it up (2 s arrives as 2.01 s): accepted.
    assert state.deadline(Ctx(2.01)) == pytest.approx(now + 2.0, abs=0.5)
    assert state.deadline(Ctx(1000.0), cap_longer=True) == pytest.approx(now + 2.0, abs=0.5)

    with pytest.raises(DeadlineExceeded):
        state.deadline(Ctx(0.0))


def test_list_and_get_model(stub: pb_grpc.InferenceStub) -> None:
    models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [(m.name, m.version) for m in models] == [("lenet5", 1), ("lenet5", 2)]
    info = stub.GetModel(pb.GetModelRequest(name="lenet5"), timeout=10)
    assert info.version == 2 and list(info.versions) == [1, 2]
    assert (
        list(info.input.shape) == [1, 32, 32] and info.input.dtype == "float32" and info.input.name == "input"
    )
    assert list(info.output.shape) == [10] and info.output.name == "logits"
    assert info.num_classes == 10 and info.labels_count == 10 and not info.labels
    assert info.preprocessing.color_mode == "L" and info.preprocessing.crop == 32
    assert not info.preprocessing.invert  # the zoo's LeNet-5 takes white on black as it learnt
    assert info.trained and info.trained_on == "digits"
    assert info.parameters == 61706 and info.flops == 429_000
    assert info.execution_provider == "CPUExecutionProvider"
    # metadata.json (here: without input.description, as exported before it existed) -> derived
    assert info.input_description.startswith("one handwritten digit, white (bright) strokes on a black")
    # metadata.json says explain is possible, but this server does not serve Explain (yet).
    assert list(info.capabilities) == [pb.CAPABILITY_CLASSIFY]
    assert info.ready
    labelled = stub.GetModel(pb.GetModelRequest(name="lenet5", version=1, include_labels=True), timeout=10)
    assert labelled.version == 1 and labelled.labels[3] == "digit 3"
    code, _ = code_of(stub.GetModel, pb.GetModelRequest(name="nope"), timeout=10)
    assert code == grpc.StatusCode.NOT_FOUND


def test_get_model_says_when_pixels_are_inverted() -> None:
    """A model exported with --invert: a client preprocessing images itself from ModelInfo must
    invert them too."""
    inverted = dataclasses.replace(DIGITS, invert=True)
    h = Harness(FakeEngine([FakeModel("dark-on-light", 1, preprocessing=inverted)]))
    try:
        info = pb_grpc.InferenceStub(h.channel).GetModel(pb.GetModelRequest(name="dark-on-light"), timeout=10)
        assert info.preprocessing.invert and info.preprocessing.color_mode == "L"
    finally:
        h.close()


@pytest.mark.parametrize(
    ("remaining", "reason"),
    [(None, "cancelled"), (5.0, "cancelled"), (0.1, "deadline"), (0.0, "deadline"), (-0.2, "deadline")],
)
def test_a_cancellation_at_the_deadline_counts_as_the_deadline(remaining: float | None, reason: str) -> None:
    """A client's own deadline cancels the stream a header transit before the server's copy of it
    expires: that cancellation is a deadline expiry, an earlier one is a cancellation."""
    from service.frontend.calls import Rpc

    class Ctx:
        def time_remaining(self) -> float | None:
            return remaining

    before = counter("cnnserve_rejections_total", method="Probe", model="m", reason=reason)
    rpc = Rpc("Probe")
    rpc.model = "m"
    rpc.cancelled(Ctx())  # type: ignore[arg-type]
    assert counter("cnnserve_rejections_total", method="Probe", model="m", reason=reason) == before + 1
