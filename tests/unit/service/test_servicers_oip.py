"""inference.GRPCInferenceService (Open Inference Protocol) through the real server wiring, with an
engine double. Requests are built the way tritonclient.grpc builds them (raw_input_contents,
BYTES with 4-byte length prefixes, requested outputs with a "classification" parameter)."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image
from servicer_fakes import FakeModel, Harness, fake_logits, softmax

from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc


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
