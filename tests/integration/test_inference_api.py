"""The real server over a real channel: every RPC of cnnserve.v1.Inference, health and reflection,
the error table, batching, metrics, and LeNet-5 reading rendered held-out digits.

All on the session's shared server (conftest.server): lenet5 (trained) and resnet18 (random weights).
"""

from __future__ import annotations

import functools
import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from server_process import MAX_IMAGES, MAX_MESSAGE_BYTES, ROOT, ServerProcess, clean_env

from export import digits
from export.preprocessing import DIGITS, to_tensor
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.InferenceStub]:
    yield pb_grpc.InferenceStub(server.channel)
    # After every test, whatever it did to the server, it still serves.
    response = pb_grpc.InferenceStub(server.channel).Classify(
        pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=digit_png(held_out()[0])), top_k=1),
        timeout=30,
    )
    assert response.classes[0].index == digits.label(held_out()[0])


@functools.lru_cache(maxsize=1)
def held_out() -> list[int]:
    return [int(i) for i in digits.split_indices()[1]]


def digit_png(index: int) -> bytes:
    buf = io.BytesIO()
    digits.render(index).save(buf, "PNG")
    return buf.getvalue()


def digit_tensor(index: int, dtype: str = "float32") -> pb.ImageInput:
    arr = to_tensor(digits.render(index), DIGITS).astype(dtype)
    return pb.ImageInput(tensor=pb.Tensor(shape=list(arr.shape), dtype=dtype, data=arr.tobytes()))


def encoded(image: Image.Image, fmt: str, **save_kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# --- LeNet-5 reads digits ----------------------------------------------------------------------


def test_lenet5_classifies_held_out_rendered_digits(stub: pb_grpc.InferenceStub) -> None:
    samples = held_out()  # all 360: a stable estimate, still well under a second of inference
    correct = 0
    for start in range(0, len(samples), MAX_IMAGES):
        chunk = samples[start : start + MAX_IMAGES]
        response = stub.ClassifyBatch(
            pb.ClassifyBatchRequest(
                model="lenet5", images=[pb.ImageInput(encoded=digit_png(i)) for i in chunk], top_k=1
            ),
            timeout=60,
        )
        assert (response.model, response.version) == ("lenet5", 1)
        correct += sum(
            r.classes[0].index == digits.label(i) for r, i in zip(response.results, chunk, strict=True)
        )
    assert correct / len(samples) >= 0.95, f"{correct}/{len(samples)}"


def test_classify_png_jpeg_webp_and_tensor_agree(stub: pb_grpc.InferenceStub) -> None:
    index = held_out()[1]
    label = digits.label(index)
    image = digits.render(index)
    answers = {}
    for name, item in {
        "png": pb.ImageInput(encoded=encoded(image, "PNG")),
        "webp": pb.ImageInput(encoded=encoded(image, "WEBP", lossless=True)),
        "jpeg": pb.ImageInput(encoded=encoded(image, "JPEG", quality=95)),
        "tensor": digit_tensor(index),
        "tensor16": digit_tensor(index, "float16"),
    }.items():
        response = stub.Classify(pb.ClassifyRequest(model="lenet5", image=item, top_k=3), timeout=30)
        assert len(response.classes) == 3
        assert response.classes[0].label == str(response.classes[0].index)
        assert response.timings.total_seconds >= response.timings.inference_seconds > 0
        answers[name] = response.classes[0]
    assert answers["png"].index == label
    # PNG, lossless WebP and the tensor are the same pixels: the same probabilities.
    assert answers["webp"].probability == pytest.approx(answers["png"].probability, abs=1e-6)
    assert answers["tensor"].probability == pytest.approx(answers["png"].probability, abs=1e-6)
    assert answers["tensor16"].index == answers["jpeg"].index == label


def test_default_top_k_is_5_and_resnet18_serves_1000_classes(stub: pb_grpc.InferenceStub) -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    response = stub.Classify(
        pb.ClassifyRequest(model="resnet18", image=pb.ImageInput(encoded=encoded(photo, "JPEG"))), timeout=60
    )
    assert response.model == "resnet18" and len(response.classes) == 5
    assert all(c.label for c in response.classes)
    assert (
        stub.Classify(
            pb.ClassifyRequest(
                model="resnet18", image=pb.ImageInput(encoded=encoded(photo, "PNG")), top_k=1000
            ),
            timeout=60,
        )
        .classes[999]
        .probability
        >= 0
    )


def test_classify_stream_answers_every_id(stub: pb_grpc.InferenceStub) -> None:
    samples = held_out()[:20]
    items = [
        pb.ClassifyStreamRequest(
            id=f"d{i}",
            request=pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=digit_png(i)), top_k=1),
        )
        for i in samples
    ]
    items.insert(
        5,
        pb.ClassifyStreamRequest(
            id="gif",
            request=pb.ClassifyRequest(
                model="lenet5", image=pb.ImageInput(encoded=encoded(Image.new("L", (8, 8)), "GIF"))
            ),
        ),
    )
    items.insert(
        9,
        pb.ClassifyStreamRequest(
            id="ghost", request=pb.ClassifyRequest(model="ghost", image=digit_tensor(1))
        ),
    )
    responses = {r.id: r for r in stub.ClassifyStream(iter(items), timeout=60)}
    assert sorted(responses) == sorted(i.id for i in items)
    assert responses["gif"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert responses["ghost"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    correct = sum(responses[f"d{i}"].result.classes[0].index == digits.label(i) for i in samples)
    assert correct >= 18


def test_list_models_and_get_model(stub: pb_grpc.InferenceStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert sorted(models) == ["lenet5", "resnet18"]
    lenet = stub.GetModel(pb.GetModelRequest(name="lenet5", include_labels=True), timeout=10)
    assert lenet.trained and lenet.trained_on and lenet.architecture == "lenet5"
    assert list(lenet.input.shape) == [1, 32, 32] and lenet.input.dtype == "float32"
    assert lenet.num_classes == 10 and list(lenet.labels) == [str(d) for d in range(10)]
    assert lenet.preprocessing.color_mode == "L" and lenet.preprocessing.crop == 32
    assert lenet.parameters > 50_000 and lenet.flops > 0
    assert lenet.execution_provider.endswith("ExecutionProvider")
    assert pb.CAPABILITY_CLASSIFY in lenet.capabilities and lenet.ready
    # the convention at the point of use: what the export wrote into metadata.json
    assert "white (bright) strokes on a black background" in lenet.input_description
    assert "invert a black-on-white drawing" in lenet.input_description
    resnet = models["resnet18"]
    assert not resnet.trained and resnet.trained_on == ""
    assert (
        list(resnet.input.shape) == [3, 224, 224]
        and resnet.num_classes == 1000
        and resnet.labels_count == 1000
    )
    assert not resnet.labels  # only with include_labels
    assert resnet.parameters == 11_689_512


# --- the error table ---------------------------------------------------------------------------


def _bomb_png() -> bytes:
    # A 1-bit 20000 x 20000 PNG: ~48 KB on the wire, 400 million pixels declared in its header.
    return encoded(Image.new("1", (20000, 20000)), "PNG")


def _tensor_input(arr: np.ndarray, dtype: str | None = None) -> pb.ImageInput:
    return pb.ImageInput(
        tensor=pb.Tensor(shape=list(arr.shape), dtype=dtype or arr.dtype.name, data=arr.tobytes())
    )


def _truncated_png() -> bytes:
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # incompressible
    data = encoded(Image.fromarray(noise), "PNG")
    return data[: len(data) // 2]


def _case(
    case_id: str,
    code: str,
    needle: str,
    model: str = "lenet5",
    version: int = 0,
    top_k: int = 0,
    image: pb.ImageInput | None = None,
) -> object:
    request = pb.ClassifyRequest(model=model, version=version, top_k=top_k, image=image)
    return pytest.param(request, code, needle, id=case_id)


ERROR_TABLE = [
    _case("unknown-model", "NOT_FOUND", "ghost", model="ghost"),
    _case("unknown-version", "NOT_FOUND", "7", version=7),
    _case("empty-image", "INVALID_ARGUMENT", "empty", image=pb.ImageInput(encoded=b"")),
    _case(
        "corrupt-image",
        "INVALID_ARGUMENT",
        "corrupt",
        image=pb.ImageInput(encoded=b"\xff\xd8\xff\xe0" + b"junk" * 50),
    ),
    _case("truncated-image", "INVALID_ARGUMENT", "corrupt", image=pb.ImageInput(encoded=_truncated_png())),
    _case(
        "gif",
        "INVALID_ARGUMENT",
        "GIF",
        image=pb.ImageInput(encoded=encoded(Image.new("L", (32, 32)), "GIF")),
    ),
    _case(
        "bmp",
        "INVALID_ARGUMENT",
        "BMP",
        image=pb.ImageInput(encoded=encoded(Image.new("L", (32, 32)), "BMP")),
    ),
    _case(
        "tensor-shape", "INVALID_ARGUMENT", "shape", image=_tensor_input(np.zeros((3, 32, 32), np.float32))
    ),
    _case("tensor-dtype", "INVALID_ARGUMENT", "dtype", image=_tensor_input(np.zeros((1, 32, 32), np.int32))),
    _case(
        "tensor-nan", "INVALID_ARGUMENT", "NaN", image=_tensor_input(np.full((1, 32, 32), np.nan, np.float32))
    ),
    _case(
        "tensor-inf",
        "INVALID_ARGUMENT",
        "infinite",
        image=_tensor_input(np.full((1, 32, 32), np.inf, np.float32)),
    ),
    _case("top-k-too-large", "INVALID_ARGUMENT", "top_k", top_k=11),
]


@pytest.mark.parametrize(("request_", "code", "needle"), ERROR_TABLE)
def test_error_table(
    server: ServerProcess, stub: pb_grpc.InferenceStub, request_: pb.ClassifyRequest, code: str, needle: str
) -> None:
    if not request_.HasField("image"):
        request_.image.CopyFrom(digit_tensor(held_out()[0]))
    model = request_.model if request_.model in ("lenet5", "resnet18") and code != "NOT_FOUND" else ""
    before = server.sample("cnnserve_requests_total", method="Classify", model=model, code=code)
    error = rpc_error(stub.Classify, request_, timeout=30)
    assert error.code().name == code, error.details()
    assert needle in error.details()
    assert "Traceback" not in error.details()
    assert server.sample("cnnserve_requests_total", method="Classify", model=model, code=code) == before + 1


def test_image_over_the_pixel_cap(server: ServerProcess, stub: pb_grpc.InferenceStub) -> None:
    bomb = _bomb_png()
    assert len(bomb) < 100_000
    before = server.sample(
        "cnnserve_rejections_total", method="Classify", model="resnet18", reason="too_many_pixels"
    )
    error = rpc_error(
        stub.Classify, pb.ClassifyRequest(model="resnet18", image=pb.ImageInput(encoded=bomb)), timeout=30
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # our one form, never Pillow's decompression-bomb wording (issue 17)
    assert error.details().startswith("image is ") and "(max_image_pixels)" in error.details()
    assert "decompression bomb" not in error.details().lower()
    after = server.sample(
        "cnnserve_rejections_total", method="Classify", model="resnet18", reason="too_many_pixels"
    )
    assert after == before + 1


def test_too_many_images_names_the_cap(stub: pb_grpc.InferenceStub) -> None:
    images = [digit_tensor(i) for i in held_out()[: MAX_IMAGES + 1]]
    error = rpc_error(stub.ClassifyBatch, pb.ClassifyBatchRequest(model="lenet5", images=images), timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_images_per_request is {MAX_IMAGES}" in error.details()


def test_message_over_the_size_limit_is_resource_exhausted(stub: pb_grpc.InferenceStub) -> None:
    limit = MAX_IMAGES * 3 * 224 * 224 * 4 + MAX_MESSAGE_BYTES
    big = pb.ClassifyRequest(
        model="resnet18", image=pb.ImageInput(encoded=b"\x89PNG\r\n\x1a\n" + bytes(limit))
    )
    error = rpc_error(stub.Classify, big, timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# --- batching ----------------------------------------------------------------------------------


def test_concurrent_clients_are_batched_and_get_their_own_answers(server: ServerProcess) -> None:
    samples = held_out()[:24]
    single = {}
    stub = pb_grpc.InferenceStub(server.channel)
    for i in samples:
        response = stub.Classify(
            pb.ClassifyRequest(model="lenet5", image=digit_tensor(i), top_k=3), timeout=30
        )
        single[i] = response.classes
    before_sum = server.sample("cnnserve_batch_size_sum", model="lenet5")
    before_count = server.sample("cnnserve_batch_size_count", model="lenet5")

    channels = [server.new_channel() for _ in range(8)]
    barrier = threading.Barrier(len(samples))

    def call(position: int) -> tuple[int, list[tuple[int, float]]]:
        i = samples[position]
        client = pb_grpc.InferenceStub(channels[position % len(channels)])
        barrier.wait(30)
        response = client.Classify(
            pb.ClassifyRequest(model="lenet5", image=digit_tensor(i), top_k=3), timeout=30
        )
        return i, response.classes

    try:
        with ThreadPoolExecutor(len(samples)) as pool:
            answers = dict(pool.map(call, range(len(samples))))
    finally:
        for channel in channels:
            channel.close()
    # Unmixed: everyone got the answer to their own image (batched float math may differ in the
    # last bits from the single-image run, hence the tolerance on probabilities).
    assert sorted(answers) == sorted(single)
    for i, classes in answers.items():
        assert [c.index for c in classes] == [c.index for c in single[i]], i
        assert [c.probability for c in classes] == pytest.approx([c.probability for c in single[i]], abs=1e-4)
    batches = server.sample("cnnserve_batch_size_count", model="lenet5") - before_count
    images = server.sample("cnnserve_batch_size_sum", model="lenet5") - before_sum
    assert images == len(samples)
    assert batches < len(samples), "no two requests were merged into one batch"


# --- metrics, health, reflection ---------------------------------------------------------------


def test_metrics_move_for_success_and_failure(server: ServerProcess, stub: pb_grpc.InferenceStub) -> None:
    ok_before = server.sample("cnnserve_requests_total", method="Classify", model="lenet5", code="OK")
    images_before = server.sample("cnnserve_images_total", model="lenet5")
    latency_before = server.sample(
        "cnnserve_request_duration_seconds_count", method="Classify", model="lenet5"
    )
    stub.Classify(pb.ClassifyRequest(model="lenet5", image=digit_tensor(held_out()[2])), timeout=30)
    assert (
        server.sample("cnnserve_requests_total", method="Classify", model="lenet5", code="OK")
        == ok_before + 1
    )
    assert server.sample("cnnserve_images_total", model="lenet5") == images_before + 1
    assert server.sample("cnnserve_request_duration_seconds_count", method="Classify", model="lenet5") == (
        latency_before + 1
    )
    rejected_before = server.sample(
        "cnnserve_rejections_total", method="Classify", model="lenet5", reason="unsupported_format"
    )
    rpc_error(
        stub.Classify,
        pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=b"GIF89a....")),
        timeout=30,
    )
    assert (
        server.sample(
            "cnnserve_rejections_total", method="Classify", model="lenet5", reason="unsupported_format"
        )
        == rejected_before + 1
    )
    metrics = server.metrics()
    assert any(
        name == "cnnserve_model_info" and dict(labels).get("model") == "resnet18" for name, labels in metrics
    )
    assert server.sample("cnnserve_inflight_requests", method="Classify") == 0


def test_metrics_endpoint_answers_only_its_paths(server: ServerProcess) -> None:
    assert server.http_get("/healthz") == (200, "ok\n")
    assert server.http_get("/")[0] == 404
    assert server.http_get("/debug")[0] == 404


def test_health_per_service_and_model(server: ServerProcess) -> None:
    stub = health_pb2_grpc.HealthStub(server.channel)
    for service in (
        "",
        "cnnserve.v1.Inference",
        "inference.GRPCInferenceService",
        "model:lenet5",
        "model:resnet18",
    ):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        ), service
    error = rpc_error(stub.Check, health_pb2.HealthCheckRequest(service="model:ghost"), timeout=5)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # List: every name at once; this server runs no gradient worker (--workers 0).
    listed = stub.List(health_pb2.HealthListRequest(), timeout=5).statuses
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert {name: response.status for name, response in listed.items()} == {
        "": serving, "cnnserve.v1.Inference": serving, "inference.GRPCInferenceService": serving,
        "model:lenet5": serving, "model:resnet18": serving, "cnnserve.v1.Inference/gradients": not_serving,
    }  # fmt: skip


def test_reflection_lists_our_services(server: ServerProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    (response,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    assert sorted(s.name for s in response.list_services_response.service) == [
        "cnnserve.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection", "inference.GRPCInferenceService",
    ]  # fmt: skip
    (described,) = stub.ServerReflectionInfo(
        iter(
            [reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]
        ),
        timeout=10,
    )
    first = described.file_descriptor_response.file_descriptor_proto[0]
    assert descriptor_pb2.FileDescriptorProto.FromString(first).name == "inference/grpc_predict_v2.proto"


def test_cnnserve_classify_command(server: ServerProcess, tmp_path: Path) -> None:
    samples = held_out()[3:6]
    paths = []
    for i in samples:
        path = tmp_path / f"digit-{i}.png"
        path.write_bytes(digit_png(i))
        paths.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "service", "classify", *paths, "--model", "lenet5", "--top-k", "3",
         "--address", server.address],
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 * len(samples)
    stub = pb_grpc.InferenceStub(server.channel)
    for k, (path, i) in enumerate(zip(paths, samples, strict=True)):
        expected = stub.Classify(
            pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=digit_png(i)), top_k=3), timeout=30
        ).classes
        assert lines[4 * k] == f"{path}: lenet5 v1"
        for rank, c in enumerate(expected, 1):
            assert lines[4 * k + rank].split()[:3] == [f"{rank}.", c.label, f"{c.probability:.4f}"]
