"""The committed stubs in service/_proto/ are what tools/gen_protos.py makes from protos/ now, and
the Open Inference Protocol keeps the published field numbers (standard clients depend on them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _load_gen_protos():  # tools/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "tools" / "gen_protos.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, bytes]:
    package = root / "service" / "_proto"
    return {
        p.relative_to(package).as_posix(): p.read_bytes()
        for p in package.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    _load_gen_protos().generate(tmp_path)
    fresh, committed = _files(tmp_path), _files(ROOT)
    assert sorted(fresh) == sorted(committed), "stub files differ: run `python tools/gen_protos.py`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `python tools/gen_protos.py` and commit service/_proto/"


def test_stubs_import_as_service_packages() -> None:
    from service._proto.cnnserve.v1 import inference_pb2, inference_pb2_grpc
    from service._proto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "cnnserve.v1"
    assert grpc_predict_v2_pb2.DESCRIPTOR.package == "inference"
    assert hasattr(inference_pb2_grpc, "InferenceServicer")
    assert hasattr(grpc_predict_v2_pb2_grpc, "GRPCInferenceServiceStub")


# (message full name, field name) -> published field number, from KServe's grpc_predict_v2.proto.
PUBLISHED_FIELDS = {
    ("ServerLiveResponse", "live"): 1,
    ("ServerReadyResponse", "ready"): 1,
    ("ModelReadyRequest", "name"): 1,
    ("ModelReadyRequest", "version"): 2,
    ("ModelReadyResponse", "ready"): 1,
    ("ServerMetadataResponse", "name"): 1,
    ("ServerMetadataResponse", "version"): 2,
    ("ServerMetadataResponse", "extensions"): 3,
    ("ModelMetadataRequest", "name"): 1,
    ("ModelMetadataRequest", "version"): 2,
    ("ModelMetadataResponse", "name"): 1,
    ("ModelMetadataResponse", "versions"): 2,
    ("ModelMetadataResponse", "platform"): 3,
    ("ModelMetadataResponse", "inputs"): 4,
    ("ModelMetadataResponse", "outputs"): 5,
    ("ModelMetadataResponse.TensorMetadata", "name"): 1,
    ("ModelMetadataResponse.TensorMetadata", "datatype"): 2,
    ("ModelMetadataResponse.TensorMetadata", "shape"): 3,
    ("ModelInferRequest", "model_name"): 1,
    ("ModelInferRequest", "model_version"): 2,
    ("ModelInferRequest", "id"): 3,
    ("ModelInferRequest", "parameters"): 4,
    ("ModelInferRequest", "inputs"): 5,
    ("ModelInferRequest", "outputs"): 6,
    ("ModelInferRequest", "raw_input_contents"): 7,
    ("ModelInferRequest.InferInputTensor", "name"): 1,
    ("ModelInferRequest.InferInputTensor", "datatype"): 2,
    ("ModelInferRequest.InferInputTensor", "shape"): 3,
    ("ModelInferRequest.InferInputTensor", "parameters"): 4,
    ("ModelInferRequest.InferInputTensor", "contents"): 5,
    ("ModelInferRequest.InferRequestedOutputTensor", "name"): 1,
    ("ModelInferRequest.InferRequestedOutputTensor", "parameters"): 2,
    ("ModelInferResponse", "model_name"): 1,
    ("ModelInferResponse", "model_version"): 2,
    ("ModelInferResponse", "id"): 3,
    ("ModelInferResponse", "parameters"): 4,
    ("ModelInferResponse", "outputs"): 5,
    ("ModelInferResponse", "raw_output_contents"): 6,
    ("ModelInferResponse.InferOutputTensor", "name"): 1,
    ("ModelInferResponse.InferOutputTensor", "datatype"): 2,
    ("ModelInferResponse.InferOutputTensor", "shape"): 3,
    ("ModelInferResponse.InferOutputTensor", "parameters"): 4,
    ("ModelInferResponse.InferOutputTensor", "contents"): 5,
    ("InferParameter", "bool_param"): 1,
    ("InferParameter", "int64_param"): 2,
    ("InferParameter", "string_param"): 3,
    ("InferTensorContents", "bool_contents"): 1,
    ("InferTensorContents", "int_contents"): 2,
    ("InferTensorContents", "int64_contents"): 3,
    ("InferTensorContents", "uint_contents"): 4,
    ("InferTensorContents", "uint64_contents"): 5,
    ("InferTensorContents", "fp32_contents"): 6,
    ("InferTensorContents", "fp64_contents"): 7,
    ("InferTensorContents", "bytes_contents"): 8,
}


@pytest.mark.parametrize(("message", "field"), sorted(PUBLISHED_FIELDS))
def test_open_inference_protocol_field_numbers(message: str, field: str) -> None:
    from service._proto.inference import grpc_predict_v2_pb2

    descriptor = grpc_predict_v2_pb2.DESCRIPTOR.message_types_by_name[message.split(".")[0]]
    for nested in message.split(".")[1:]:
        descriptor = descriptor.nested_types_by_name[nested]
    assert descriptor.fields_by_name[field].number == PUBLISHED_FIELDS[(message, field)]


def test_open_inference_protocol_service_methods() -> None:
    from service._proto.inference import grpc_predict_v2_pb2

    service = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
    }
