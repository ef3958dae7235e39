"""inference.GRPCInferenceService (Open Inference Protocol) through the real server wiring, with an
engine double. Requests are built the way tritonclient.grpc builds them (raw_input_contents,
BYTES with 4-byte length prefixes, requested outputs with a "classification" parameter)."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from servicer_fakes import FakeModel, Harness, counter, fake_logits, softmax

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service._proto.inference import model_config_pb2 as mc
from service.frontend import triton


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness(max_images_per_request=4)
    yield h
    h.close()


@pytest.fixture
def stub(harness: Harness) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(harness.channel)


def infer_request(
    batch: np.ndarray, *, datatype: str = "FP32", name: str = "input", **kwargs
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="lenet5", **kwargs)
    request.inputs.add(name=name, datatype=datatype, shape=list(batch.shape))
    request.raw_input_contents.append(batch.tobytes())
    return request


def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    result = {}
    for meta, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        assert not meta.HasField("contents")  # always raw
        if meta.datatype == "FP32":
            result[meta.name] = np.frombuffer(raw, dtype="<f4").reshape(list(meta.shape))
        else:
            elements, offset = [], 0
            while offset < len(raw):
                (n,) = struct.unpack_from("<I", raw, offset)
                elements.append(raw[offset + 4 : offset + 4 + n].decode())
                offset += 4 + n
            result[meta.name] = np.array(elements).reshape(list(meta.shape))
    return result


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_live_ready_and_model_ready(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="lenet5"), timeout=5).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="lenet5", version="1"), timeout=5).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="lenet5", version="7"), timeout=5).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="other"), timeout=5).ready


def test_server_metadata_lists_extensions_and_the_provider(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    metadata = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
    assert metadata.name == "cnnserve" and metadata.version
    assert "execution_provider:CPUExecutionProvider" in metadata.extensions
    assert {"classification", "encoded_image_input", "probabilities_output"} <= set(metadata.extensions)


def test_model_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="lenet5"), timeout=5)
    assert metadata.name == "lenet5" and list(metadata.versions) == ["1", "2"]
    assert metadata.platform == "onnxruntime_onnx"
    (inp,) = metadata.inputs
    assert (inp.name, inp.datatype, list(inp.shape)) == ("input", "FP32", [-1, 1, 32, 32])
    assert [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs] == [
        ("logits", "FP32", [-1, 10]),
        ("probabilities", "FP32", [-1, 10]),
    ]
    code, _ = code_of(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"), timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = code_of(stub.ModelMetadata, pb.ModelMetadataRequest(name="lenet5", version="3"), timeout=5)
    assert code == grpc.StatusCode.NOT_FOUND


def test_infer_raw_fp32_returns_logits_and_probabilities(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    batch = np.stack([np.full((1, 32, 32), v, np.float32) for v in (1.0, 4.0, 9.0)])
    response = stub.ModelInfer(infer_request(batch, id="req-1"), timeout=5)
    assert (response.model_name, response.model_version, response.id) == ("lenet5", "2", "req-1")
    assert response.parameters["execution_provider"].string_param == "CPUExecutionProvider"
    got = outputs(response)
    np.testing.assert_allclose(got["logits"], fake_logits(batch, 10), rtol=1e-6)
    np.testing.assert_allclose(got["probabilities"], softmax(fake_logits(batch, 10)), rtol=1e-5, atol=1e-7)
    assert got["logits"].argmax(axis=1).tolist() == [1, 4, 9]


def test_infer_typed_fp32_contents_and_requested_output(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    batch = np.full((1, 1, 32, 32), 6.0, np.float32)
    request = pb.ModelInferRequest(model_name="lenet5", model_version="1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    request.outputs.add(name="probabilities")
    response = stub.ModelInfer(request, timeout=5)
    assert response.model_version == "1"
    got = outputs(response)
    assert list(got) == ["probabilities"] and got["probabilities"].argmax() == 6


def test_infer_fp16_raw(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    batch = np.full((2, 1, 32, 32), 2.0, np.float16)
    got = outputs(stub.ModelInfer(infer_request(batch, datatype="FP16"), timeout=5))
    assert got["logits"].dtype == np.float32 and got["logits"].argmax(axis=1).tolist() == [2, 2]


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (32, 32), value).save(buf, "PNG")
    return buf.getvalue()


def test_infer_bytes_input_of_encoded_images(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    images = [_png(0), _png(255)]
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="input", datatype="BYTES", shape=[2])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i for i in images))
    raw = outputs(stub.ModelInfer(request, timeout=5))["logits"]
    typed = pb.ModelInferRequest(model_name="lenet5")
    typed.inputs.add(name="input", datatype="BYTES", shape=[2, 1]).contents.bytes_contents.extend(images)
    np.testing.assert_array_equal(outputs(stub.ModelInfer(typed, timeout=5))["logits"], raw)
    # Normalized with the DIGITS mean/std: black is (0 - 0.3055) / 0.3235 < 0, white 2.15.
    assert raw.argmax(axis=1).tolist() == [0, 2]


def test_infer_classification_extension(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    batch = np.full((1, 1, 32, 32), 3.0, np.float32)
    request = infer_request(batch)
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    got = outputs(stub.ModelInfer(request, timeout=5))["probabilities"]
    assert got.shape == (1, 2)
    value, index, label = got[0, 0].split(":")
    assert (index, label) == ("3", "digit 3") and 0.5 < float(value) <= 1.0


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda r: setattr(r, "model_version", "x1"), grpc.StatusCode.INVALID_ARGUMENT, "version"),
        (lambda r: setattr(r, "model_version", "9"), grpc.StatusCode.NOT_FOUND, "9"),
        (lambda r: setattr(r.inputs[0], "name", "data"), grpc.StatusCode.INVALID_ARGUMENT, "'input'"),
        (lambda r: setattr(r.inputs[0], "datatype", "INT8"), grpc.StatusCode.INVALID_ARGUMENT, "datatype"),
        (lambda r: r.inputs[0].shape.__setitem__(3, 31), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        (lambda r: r.outputs.add(name="features"), grpc.StatusCode.INVALID_ARGUMENT, "unknown output"),
        (lambda r: r.inputs.add(name="second"), grpc.StatusCode.INVALID_ARGUMENT, "exactly one input"),
        (
            lambda r: r.raw_input_contents.append(b"x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "one entry per input",
        ),
        (
            lambda r: r.inputs[0].contents.fp32_contents.append(1.0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not both",
        ),
    ],
)
def test_infer_request_errors(
    stub: pb_grpc.GRPCInferenceServiceStub, mutate, code: grpc.StatusCode, needle: str
) -> None:
    request = infer_request(np.zeros((1, 1, 32, 32), np.float32))
    mutate(request)
    got, details = code_of(stub.ModelInfer, request, timeout=5)
    assert got == code and needle in details


def test_infer_wrong_shape_nan_and_batch_cap(
    stub: pb_grpc.GRPCInferenceServiceStub, harness: Harness
) -> None:
    computed = harness.engine.computed_images
    for batch, needle in [
        (np.zeros((1, 3, 32, 32), np.float32), "shape"),
        (np.zeros((1, 32, 32), np.float32), "shape"),
        (np.full((1, 1, 32, 32), np.nan, np.float32), "NaN"),
        (np.zeros((5, 1, 32, 32), np.float32), "max_images_per_request is 4"),
    ]:
        got, details = code_of(stub.ModelInfer, infer_request(batch), timeout=5)
        assert got == grpc.StatusCode.INVALID_ARGUMENT and needle in details
    assert harness.engine.computed_images == computed


def test_fp16_model_declares_fp16_input() -> None:
    from servicer_fakes import FakeEngine

    h = Harness(FakeEngine([FakeModel("half", 3, input_dtype=np.dtype("float16"))]))
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(h.channel)
        (inp,) = stub.ModelMetadata(pb.ModelMetadataRequest(name="half"), timeout=5).inputs
        assert inp.datatype == "FP16"
        batch = np.full((1, 1, 32, 32), 4.0, np.float32)  # FP32 is converted for an FP16 model
        assert outputs(stub.ModelInfer(_named(batch, "half"), timeout=5))["logits"].argmax() == 4
    finally:
        h.close()


def _named(batch: np.ndarray, model: str) -> pb.ModelInferRequest:
    request = infer_request(batch)
    request.model_name = model
    return request


# --- Triton's extensions: ModelConfig, RepositoryIndex, ModelStatistics, the unimplemented RPCs ---


def test_model_config_of_the_default_harness(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    config = stub.ModelConfig(pb.ModelConfigRequest(name="lenet5"), timeout=5).config
    assert (config.name, config.platform, config.backend) == ("lenet5", "onnxruntime_onnx", "onnxruntime")
    # max_batch_size 16 (the default), but at most max_images_per_request=4 images per request.
    assert config.max_batch_size == 4
    (inp,) = config.input
    assert (inp.name, inp.data_type, inp.format, list(inp.dims)) == (
        "input",
        mc.TYPE_FP32,
        mc.ModelInput.FORMAT_NCHW,
        [1, 32, 32],
    )
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", mc.TYPE_FP32, [10]),
        ("probabilities", mc.TYPE_FP32, [10]),
    ]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000  # max_queue_delay_s 0.002
    assert list(config.dynamic_batching.preferred_batch_size) == []
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_CPU, 1, [])


def test_model_config_follows_the_settings_the_dtype_and_the_provider() -> None:
    from servicer_fakes import FakeEngine

    engine = FakeEngine(
        [
            FakeModel("lenet5", 1),
            FakeModel(
                "half", 3, input_dtype=np.dtype("float16"), provider=triton.CUDA_PROVIDER, num_classes=7
            ),
        ]
    )
    h = Harness(
        engine, max_batch_size=8, max_images_per_request=32, max_queue_delay_s=0.0125, cuda_device_id=1
    )
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(h.channel)
        config = stub.ModelConfig(pb.ModelConfigRequest(name="half", version="3"), timeout=5).config
        assert config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 12500
        assert config.input[0].data_type == mc.TYPE_FP16
        assert [list(o.dims) for o in config.output] == [[7], [7]]
        (group,) = config.instance_group
        assert (group.kind, group.count, list(group.gpus)) == (mc.ModelInstanceGroup.KIND_GPU, 1, [1])
        config = stub.ModelConfig(pb.ModelConfigRequest(name="lenet5"), timeout=5).config
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    finally:
        h.close()


def test_cuda_provider_name_is_the_engines() -> None:
    from service.engine.providers import CUDA

    assert triton.CUDA_PROVIDER == CUDA


@pytest.mark.parametrize(
    ("request_", "code", "needle"),
    [
        (pb.ModelConfigRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (pb.ModelConfigRequest(name="lenet5", version="9"), grpc.StatusCode.NOT_FOUND, "9"),
        (
            pb.ModelConfigRequest(name="lenet5", version="v2"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "positive integer",
        ),
        (pb.ModelConfigRequest(), grpc.StatusCode.INVALID_ARGUMENT, "model name is required"),
    ],
)
def test_model_config_errors(
    stub: pb_grpc.GRPCInferenceServiceStub,
    request_: pb.ModelConfigRequest,
    code: grpc.StatusCode,
    needle: str,
) -> None:
    got, details = code_of(stub.ModelConfig, request_, timeout=5)
    assert got == code and needle in details


def _index(stub: pb_grpc.GRPCInferenceServiceStub, **request: Any) -> list[tuple[str, str, str, str]]:
    response = stub.RepositoryIndex(pb.RepositoryIndexRequest(**request), timeout=5)
    return [(m.name, m.version, m.state, m.reason) for m in response.models]


def test_repository_index_lists_every_loaded_version(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    ready = [("lenet5", "1", "READY", ""), ("lenet5", "2", "READY", "")]
    assert _index(stub) == ready
    assert _index(stub, ready=True) == ready
    got, details = code_of(
        stub.RepositoryIndex, pb.RepositoryIndexRequest(repository_name="models"), timeout=5
    )
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "one model repository" in details


def test_repository_index_while_not_ready() -> None:
    h = Harness(load=False)  # started, models not loaded yet
    try:
        stub = pb_grpc.GRPCInferenceServiceStub(h.channel)
        loading = "the model is still loading"
        assert _index(stub) == [
            ("lenet5", "1", "UNAVAILABLE", loading),
            ("lenet5", "2", "UNAVAILABLE", loading),
        ]
        assert _index(stub, ready=True) == []
        h.run(h.server.load())
        h.server.state.draining = True
        try:
            assert {m[2:] for m in _index(stub)} == {("UNAVAILABLE", "the server is shutting down")}
        finally:
            h.server.state.draining = False
    finally:
        h.close()


@pytest.fixture(scope="module")
def stats_harness() -> Iterator[Harness]:
    """Models named only here, so the process-wide Prometheus registry holds nothing else for them."""
    from servicer_fakes import FakeEngine

    h = Harness(FakeEngine([FakeModel("statsnet", 1), FakeModel("statsnet", 2), FakeModel("statsother", 1)]))
    yield h
    h.close()


def _stats(stub: pb_grpc.GRPCInferenceServiceStub, **request: Any) -> list[pb.ModelStatistics]:
    return list(stub.ModelStatistics(pb.ModelStatisticsRequest(**request), timeout=5).model_stats)


def test_model_statistics_read_the_metrics(stats_harness: Harness) -> None:
    from service._proto.cnnserve.v1 import inference_pb2, inference_pb2_grpc
    from service.observability import metrics

    stub = pb_grpc.GRPCInferenceServiceStub(stats_harness.channel)
    (before,) = _stats(stub, name="statsnet", version="2")
    assert before.inference_count == before.execution_count == 0
    assert before.inference_stats.success.count == before.inference_stats.fail.count == 0

    # Requests: counted per RPC that runs the engine, by status code.
    batch = np.full((3, 1, 32, 32), 2.0, np.float32)
    stub.ModelInfer(_named(batch, "statsnet"), timeout=5)
    stub.ModelInfer(_named(batch[:1], "statsnet"), timeout=5)
    classify = inference_pb2_grpc.InferenceStub(stats_harness.channel).Classify
    # A tensor (the classify path would time an image's decode; this test sets those metrics below).
    nines = np.full((1, 32, 32), 9.0, "<f4").tobytes()
    tensor = inference_pb2.Tensor(shape=[1, 32, 32], dtype="float32", data=nines)
    classify(inference_pb2.ClassifyRequest(model="statsnet", image=inference_pb2.ImageInput(tensor=tensor)))
    code_of(stub.ModelInfer, _named(np.zeros((1, 3, 32, 32), np.float32), "statsnet"), timeout=5)  # bad shape
    stub.ModelMetadata(pb.ModelMetadataRequest(name="statsnet"), timeout=5)  # not an inference
    # What the engine records (the double does not run the real batcher): set it directly.
    metrics.IMAGES.labels(model="statsnet").inc(5)
    metrics.BATCH_SIZE.labels(model="statsnet").observe(4)
    metrics.BATCH_SIZE.labels(model="statsnet").observe(1)
    metrics.QUEUE_WAIT.labels(model="statsnet").observe(0.25)
    metrics.INFERENCE_DURATION.labels(model="statsnet", provider="CPUExecutionProvider").observe(0.5)
    metrics.INFERENCE_DURATION.labels(model="statsnet", provider="CUDAExecutionProvider").observe(0.25)
    metrics.DECODE_DURATION.labels(model="statsnet").observe(0.125)
    metrics.PREPROCESS_DURATION.labels(model="statsnet").observe(0.0625)
    metrics.INFERENCE_DURATION.labels(model="statsother", provider="CPUExecutionProvider").observe(8.0)

    stats = _stats(stub, name="statsnet")
    assert [(s.name, s.version) for s in stats] == [("statsnet", "1"), ("statsnet", "2")]
    # The metrics are per model, not per version: both versions report the same totals.
    assert stats[0].inference_stats == stats[1].inference_stats
    assert stats[0].inference_count == stats[1].inference_count
    s = stats[1]
    assert (s.inference_count, s.execution_count, s.last_inference, list(s.batch_stats)) == (5, 2, 0, [])
    i = s.inference_stats
    assert (i.success.count, i.fail.count, i.fail.ns) == (3, 1, 0)
    durations = sum(
        counter("cnnserve_request_duration_seconds_sum", method=method, model="statsnet")
        for method in ("ModelInfer", "Classify")
    )
    assert durations > 0 and abs(i.success.ns - durations * 1e9) <= 1
    assert (i.queue.count, i.queue.ns) == (1, 250_000_000)
    assert (i.compute_infer.count, i.compute_infer.ns) == (2, 750_000_000)
    # Nothing was decoded (a tensor): only the observations above feed compute_input.
    assert (i.compute_input.count, i.compute_input.ns) == (1, 187_500_000)
    assert (i.compute_output.count, i.compute_output.ns) == (0, 0)


def test_model_statistics_selection_and_errors(stats_harness: Harness) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(stats_harness.channel)
    every = [(s.name, s.version) for s in _stats(stub)]
    assert every == [("statsnet", "1"), ("statsnet", "2"), ("statsother", "1")]
    assert [(s.name, s.version) for s in _stats(stub, name="statsnet", version="1")] == [("statsnet", "1")]
    for request, code, needle in [
        (pb.ModelStatisticsRequest(name="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
        (pb.ModelStatisticsRequest(name="statsnet", version="3"), grpc.StatusCode.NOT_FOUND, "3"),
        (
            pb.ModelStatisticsRequest(name="statsnet", version="-1"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "positive",
        ),
        (pb.ModelStatisticsRequest(version="1"), grpc.StatusCode.INVALID_ARGUMENT, "without a model name"),
    ]:
        got, details = code_of(stub.ModelStatistics, request, timeout=5)
        assert got == code and needle in details, (request, got, details)


@pytest.mark.parametrize("method", sorted(triton.TRITON_UNIMPLEMENTED))
def test_triton_rpcs_we_do_not_serve_answer_unimplemented_saying_why(harness: Harness, method: str) -> None:
    path = f"/inference.GRPCInferenceService/{method}"
    before = counter("cnnserve_requests_total", method=method, model="", code="UNIMPLEMENTED")
    with pytest.raises(grpc.RpcError) as info:
        if method == "ModelStreamInfer":
            list(harness.channel.stream_stream(path)(iter([b"", b""]), timeout=5))
        else:
            harness.channel.unary_unary(path)(b"\x0a\x03abc", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == (
        f"inference.GRPCInferenceService/{method} is not implemented: {triton.TRITON_UNIMPLEMENTED[method]}"
    )
    assert counter("cnnserve_requests_total", method=method, model="", code="UNIMPLEMENTED") == before + 1


def test_an_unknown_method_is_still_grpcs_unimplemented(harness: Harness) -> None:
    code, _ = code_of(harness.channel.unary_unary("/inference.GRPCInferenceService/Nope"), b"", timeout=5)
    assert code == grpc.StatusCode.UNIMPLEMENTED
