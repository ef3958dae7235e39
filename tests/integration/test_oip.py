"""The Open Inference Protocol on the real server, spoken the way a standard client speaks it.

tritonclient[grpc] is not a dependency of the project's environment (it pins protobuf < 7 and would
downgrade the server's; tests/integration/test_light_client.py runs the real tritonclient against the
server from a venv of its own), so `TritonStyleClient` reproduces what tritonclient.grpc puts on the
wire: InferInput.set_data_from_numpy -> raw_input_contents; BYTES as 4-byte little-endian length
prefixed elements; InferRequestedOutput(name, class_count=k) -> parameters["classification"];
InferResult.as_numpy -> raw_output_contents at the output's index. Triton's read-only extensions
(get_model_config, get_model_repository_index, get_inference_statistics) are plain unary calls.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from PIL import Image
from server_process import MAX_IMAGES, ServerProcess

from export import digits
from export.preprocessing import DIGITS, to_tensor
from service._proto.cnnserve.v1 import inference_pb2, inference_pb2_grpc
from service._proto.inference import grpc_predict_v2_pb2 as pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service._proto.inference import model_config_pb2 as mc
from service.frontend.triton import TRITON_UNIMPLEMENTED

pytestmark = pytest.mark.integration

NP_TO_TRITON = {np.dtype("float32"): "FP32", np.dtype("float16"): "FP16", np.dtype("object"): "BYTES"}


@dataclass
class InferInput:
    name: str
    shape: list[int]
    datatype: str
    raw: bytes = b""

    def set_data_from_numpy(self, array: np.ndarray) -> None:
        if self.datatype == "BYTES":
            self.raw = b"".join(struct.pack("<I", len(e)) + e for e in array.ravel())
        else:
            self.raw = np.ascontiguousarray(array).tobytes()


@dataclass
class InferRequestedOutput:
    name: str
    class_count: int = 0


@dataclass
class InferResult:
    response: pb.ModelInferResponse
    _index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {o.name: i for i, o in enumerate(self.response.outputs)}

    def as_numpy(self, name: str) -> np.ndarray | None:
        if name not in self._index:
            return None
        i = self._index[name]
        meta, raw = self.response.outputs[i], self.response.raw_output_contents[i]
        if meta.datatype == "BYTES":
            out, offset = [], 0
            while offset < len(raw):
                (n,) = struct.unpack_from("<I", raw, offset)
                out.append(raw[offset + 4 : offset + 4 + n])
                offset += 4 + n
            return np.array(out, dtype=object).reshape(list(meta.shape))
        dtype = {"FP32": "<f4", "FP16": "<f2"}[meta.datatype]
        return np.frombuffer(raw, dtype=dtype).reshape(list(meta.shape))


class TritonStyleClient:
    """The calls of tritonclient.grpc.InferenceServerClient the tests use, on the raw stubs."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def is_server_live(self) -> bool:
        return self._stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live

    def is_server_ready(self) -> bool:
        return self._stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready

    def is_model_ready(self, name: str, version: str = "") -> bool:
        return self._stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=10).ready

    def get_server_metadata(self) -> pb.ServerMetadataResponse:
        return self._stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10)

    def get_model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        return self._stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=10)

    def infer(
        self, model_name: str, inputs: list[InferInput], *, model_version: str = "", request_id: str = "",
        outputs: list[InferRequestedOutput] | None = None, timeout: float = 60,
    ) -> InferResult:  # fmt: skip
        request = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
        for item in inputs:
            request.inputs.add(name=item.name, datatype=item.datatype, shape=item.shape)
            request.raw_input_contents.append(item.raw)
        for output in outputs or []:
            requested = request.outputs.add(name=output.name)
            if output.class_count:
                requested.parameters["classification"].int64_param = output.class_count
        return InferResult(self._stub.ModelInfer(request, timeout=timeout))

    def get_model_config(self, model_name: str, model_version: str = "") -> pb.ModelConfigResponse:
        return self._stub.ModelConfig(
            pb.ModelConfigRequest(name=model_name, version=model_version), timeout=10
        )

    def get_model_repository_index(self) -> pb.RepositoryIndexResponse:
        return self._stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)

    def get_inference_statistics(
        self, model_name: str = "", model_version: str = ""
    ) -> pb.ModelStatisticsResponse:
        request = pb.ModelStatisticsRequest(name=model_name, version=model_version)
        return self._stub.ModelStatistics(request, timeout=10)


@pytest.fixture
def client(server: ServerProcess) -> TritonStyleClient:
    return TritonStyleClient(server.channel)


def held_out(n: int) -> list[int]:
    return [int(i) for i in digits.split_indices()[1][:n]]


def digit_batch(indices: list[int]) -> np.ndarray:
    return np.stack([to_tensor(digits.render(i), DIGITS) for i in indices])


def test_liveness_readiness_and_server_metadata(client: TritonStyleClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("lenet5") and client.is_model_ready("lenet5", "1")
    assert not client.is_model_ready("lenet5", "2") and not client.is_model_ready("ghost")
    metadata = client.get_server_metadata()
    assert metadata.name == "cnnserve" and metadata.version
    providers = [e for e in metadata.extensions if e.startswith("execution_provider:")]
    assert providers and all(p.endswith("ExecutionProvider") for p in providers)
    assert "classification" in metadata.extensions


def test_model_metadata(client: TritonStyleClient) -> None:
    metadata = client.get_model_metadata("resnet18")
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        "resnet18",
        ["1"],
        "onnxruntime_onnx",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, 3, 224, 224])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("logits", "FP32", [-1, 1000]),
        ("probabilities", "FP32", [-1, 1000]),
        ("features", "FP32", [-1, 512]),
    ]
    with pytest.raises(grpc.RpcError) as info:
        client.get_model_metadata("ghost")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_infer_fp32_matches_classify_and_reads_digits(
    server: ServerProcess, client: TritonStyleClient
) -> None:
    indices = held_out(MAX_IMAGES)
    batch = digit_batch(indices)
    inp = InferInput("input", list(batch.shape), NP_TO_TRITON[batch.dtype])
    inp.set_data_from_numpy(batch)
    result = client.infer(
        "lenet5", [inp], request_id="batch-7",
        outputs=[InferRequestedOutput("logits"), InferRequestedOutput("probabilities")],
    )  # fmt: skip
    assert (result.response.id, result.response.model_version) == ("batch-7", "1")
    logits, probabilities = result.as_numpy("logits"), result.as_numpy("probabilities")
    assert logits is not None and probabilities is not None
    assert logits.shape == probabilities.shape == (len(indices), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (logits.argmax(axis=1) == [digits.label(i) for i in indices]).mean() >= 0.85
    # The same image over cnnserve.v1.Classify gives the same probabilities.
    stub = inference_pb2_grpc.InferenceStub(server.channel)
    arr = batch[0]
    single = stub.Classify(
        inference_pb2.ClassifyRequest(
            model="lenet5", top_k=1,
            image=inference_pb2.ImageInput(tensor=inference_pb2.Tensor(shape=list(arr.shape), dtype="float32",
                                                                       data=arr.tobytes())),
        ),
        timeout=30,
    )  # fmt: skip
    assert single.classes[0].index == logits[0].argmax()
    assert single.classes[0].probability == pytest.approx(probabilities[0].max(), abs=1e-5)


def test_infer_bytes_of_encoded_images_with_classification(client: TritonStyleClient) -> None:
    indices = held_out(4)
    pngs = []
    for i in indices:
        buf = io.BytesIO()
        digits.render(i).save(buf, "PNG")
        pngs.append(buf.getvalue())
    inp = InferInput("input", [len(pngs)], "BYTES")
    inp.set_data_from_numpy(np.array(pngs, dtype=object))
    result = client.infer("lenet5", [inp], outputs=[InferRequestedOutput("probabilities", class_count=2)])
    top = result.as_numpy("probabilities")
    assert top is not None and top.shape == (4, 2)
    for row, i in zip(top, indices, strict=True):
        value, index, label = row[0].decode().split(":")
        assert int(index) == digits.label(i) and label == str(digits.label(i)) and 0 < float(value) <= 1
    assert result.as_numpy("logits") is None  # only what was requested


def test_infer_fp16_input_on_resnet18(client: TritonStyleClient) -> None:
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((2, 3, 224, 224)).astype(np.float16)
    inp = InferInput("input", list(batch.shape), "FP16")
    inp.set_data_from_numpy(batch)
    logits = client.infer("resnet18", [inp]).as_numpy("logits")
    assert logits is not None and logits.shape == (2, 1000) and logits.dtype == np.float32
    assert np.isfinite(logits).all()


NAN_IMAGE = np.full((1, 1, 32, 32), np.nan, np.float32).tobytes()


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        pytest.param(lambda r: setattr(r, "model_name", "ghost"), "NOT_FOUND", id="unknown-model"),
        pytest.param(lambda r: setattr(r, "model_version", "3"), "NOT_FOUND", id="unknown-version"),
        pytest.param(lambda r: r.inputs[0].shape.__setitem__(1, 3), "INVALID_ARGUMENT", id="wrong-shape"),
        pytest.param(lambda r: setattr(r.inputs[0], "datatype", "INT64"), "INVALID_ARGUMENT", id="datatype"),
        pytest.param(lambda r: r.raw_input_contents.__setitem__(0, NAN_IMAGE), "INVALID_ARGUMENT", id="nan"),
        pytest.param(
            lambda r: (r.inputs[0].shape.__setitem__(0, MAX_IMAGES + 1),
                       r.raw_input_contents.__setitem__(0, bytes(4 * 32 * 32 * (MAX_IMAGES + 1)))),
            "INVALID_ARGUMENT", id="too-many-images",
        ),
        pytest.param(lambda r: r.outputs.add(name="embedding"), "INVALID_ARGUMENT", id="unknown-output"),
    ],
)  # fmt: skip
def test_infer_errors(server: ServerProcess, mutate, code: str) -> None:
    request = pb.ModelInferRequest(model_name="lenet5")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
    request.raw_input_contents.append(np.zeros((1, 1, 32, 32), np.float32).tobytes())
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(request, timeout=30)
    assert info.value.code().name == code, info.value.details()
    # Still serving.
    ok = pb.ModelInferRequest(model_name="lenet5")
    ok.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
    ok.raw_input_contents.append(np.zeros((1, 1, 32, 32), np.float32).tobytes())
    assert pb_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer(ok, timeout=30).raw_output_contents


def test_infer_bytes_gif_is_invalid(client: TritonStyleClient) -> None:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "GIF")
    inp = InferInput("input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([buf.getvalue()], dtype=object))
    with pytest.raises(grpc.RpcError) as info:
        client.infer("lenet5", [inp])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "GIF" in info.value.details()


# --- Triton's extensions ---------------------------------------------------------------------------


def test_model_config_from_the_server_settings(client: TritonStyleClient) -> None:
    """The session server: --max-images-per-request 8 (below max_batch_size 16), --max-queue-delay-s 0.01."""
    gpu = "execution_provider:CUDAExecutionProvider" in client.get_server_metadata().extensions
    config = client.get_model_config("lenet5").config
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "lenet5",
        "onnxruntime_onnx",
        "onnxruntime",
        MAX_IMAGES,
    )
    assert [(i.name, i.data_type, i.format, list(i.dims)) for i in config.input] == [
        ("input", mc.TYPE_FP32, mc.ModelInput.FORMAT_NCHW, [1, 32, 32])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("logits", mc.TYPE_FP32, [10]),
        ("probabilities", mc.TYPE_FP32, [10]),
        ("features", mc.TYPE_FP32, [84]),
    ]
    assert config.dynamic_batching.max_queue_delay_microseconds == 10_000
    (group,) = config.instance_group
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    assert (group.kind, group.count) == (kind, 1)
    assert list(client.get_model_config("resnet18", "1").config.input[0].dims) == [3, 224, 224]
    for name, version, code in [
        ("ghost", "", "NOT_FOUND"),
        ("lenet5", "2", "NOT_FOUND"),
        ("", "", "INVALID_ARGUMENT"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            client.get_model_config(name, version)
        assert info.value.code().name == code, info.value.details()


def test_repository_index_lists_the_loaded_versions(client: TritonStyleClient) -> None:
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        ("lenet5", "1", "READY", ""),
        ("resnet18", "1", "READY", ""),
    ]


def test_inference_statistics_follow_the_requests(server: ServerProcess, client: TritonStyleClient) -> None:
    def lenet5() -> pb.ModelStatistics:
        (stats,) = client.get_inference_statistics("lenet5").model_stats
        assert (stats.name, stats.version) == ("lenet5", "1")
        return stats

    before = lenet5()
    batch = digit_batch(held_out(3))
    inp = InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    client.infer("lenet5", [inp])
    after = lenet5()
    assert after.inference_count - before.inference_count == 3
    assert after.execution_count - before.execution_count == 1  # one request alone: one batch
    b, a = before.inference_stats, after.inference_stats
    assert (a.success.count - b.success.count, a.fail.count - b.fail.count) == (1, 0)
    assert a.success.ns > b.success.ns
    assert a.queue.count - b.queue.count == 1
    assert a.compute_infer.count - b.compute_infer.count == 1 and a.compute_infer.ns > b.compute_infer.ns
    assert a.compute_input.count == b.compute_input.count  # a raw tensor: nothing decoded
    # The same numbers as the server's own /metrics.
    assert after.inference_count == server.sample("cnnserve_images_total", model="lenet5")
    every = client.get_inference_statistics().model_stats
    assert [(s.name, s.version) for s in every] == [("lenet5", "1"), ("resnet18", "1")]
    with pytest.raises(grpc.RpcError) as info:
        client.get_inference_statistics("ghost")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_triton_rpcs_we_do_not_serve_say_why(server: ServerProcess) -> None:
    for method in ("RepositoryModelLoad", "SystemSharedMemoryRegister", "LogSettings"):
        with pytest.raises(grpc.RpcError) as info:
            server.channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(b"", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert TRITON_UNIMPLEMENTED[method] in info.value.details()
