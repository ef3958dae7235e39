"""The committed stubs in service/_proto/ are what tools/gen_protos.py makes from protos/ now, their
descriptors are named by the proto paths (what reflection reports), and the Open Inference Protocol
keeps the published field numbers, KServe's and Triton's (standard clients depend on them)."""

from __future__ import annotations

import importlib.util
import re
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
    """Byte for byte: the generator is pinned (tools/gen_protos.py installs it when missing)."""
    _load_gen_protos().generate(tmp_path)
    fresh, committed = _files(tmp_path), _files(ROOT)
    assert sorted(fresh) == sorted(committed), "stub files differ: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make protos` and commit service/_proto/"


def _requirement_floor(name: str) -> str:
    """The lower bound pyproject's base dependencies give `name` (`name>=X,...`)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        match = re.fullmatch(rf"{re.escape(name)}>=([0-9.]+)(?:,.*)?", requirement)
        if match:
            return match.group(1)
    raise AssertionError(f"no {name}>=... in pyproject's dependencies")


def test_stubs_are_unstamped_and_the_floors_are_the_generators() -> None:
    """The stubs load on every protobuf from the generator's up (5.x, 6.x, 7.x) only while protobuf
    has no version check to run in them (`runtime_version.ValidateProtobufRuntimeVersion`, which
    newer protoc writes: it refuses a runtime two majors apart and warns one apart). What they do
    need, a protobuf and a grpcio at least as new as the generator, is what pyproject asks for."""
    gen_protos = _load_gen_protos()
    pb2 = sorted((ROOT / "service" / "_proto").rglob("*_pb2.py"))
    grpc_stubs = sorted((ROOT / "service" / "_proto").rglob("*_pb2_grpc.py"))
    assert pb2 and grpc_stubs
    for stub in pb2:
        text = stub.read_text()
        assert "runtime_version" not in text, f"{stub.name} checks the protobuf runtime's version"
        assert f"# Protobuf Python Version: {gen_protos.PROTOBUF_GENCODE_VERSION}\n" in text
    for stub in grpc_stubs:
        assert f"GRPC_GENERATED_VERSION = '{gen_protos.GENERATOR_VERSION}'\n" in stub.read_text()
    assert _requirement_floor("protobuf") == gen_protos.PROTOBUF_GENCODE_VERSION
    assert _requirement_floor("grpcio") == gen_protos.GENERATOR_VERSION


def test_stubs_import_as_service_packages() -> None:
    from service._proto.cnnserve.v1 import inference_pb2, inference_pb2_grpc
    from service._proto.grpc.reflection.v1 import reflection_pb2, reflection_pb2_grpc
    from service._proto.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc, model_config_pb2

    assert inference_pb2.DESCRIPTOR.package == "cnnserve.v1"
    assert grpc_predict_v2_pb2.DESCRIPTOR.package == "inference"
    assert model_config_pb2.DESCRIPTOR.package == "inference"
    assert reflection_pb2.DESCRIPTOR.package == "grpc.reflection.v1"
    assert hasattr(inference_pb2_grpc, "InferenceServicer")
    assert hasattr(grpc_predict_v2_pb2_grpc, "GRPCInferenceServiceStub")
    assert hasattr(reflection_pb2_grpc, "ServerReflectionStub")
    # The generated classes report the module they live in (pickling, repr, tracebacks).
    assert (
        grpc_predict_v2_pb2.ModelConfigResponse.__module__ == "service._proto.inference.grpc_predict_v2_pb2"
    )
    assert type(grpc_predict_v2_pb2.ModelConfigResponse().config) is model_config_pb2.ModelConfig


def test_descriptors_are_named_by_their_proto_paths() -> None:
    """Reflection serves these names: grpcurl and Postman show them, and a client's own .proto
    imports them. Every file under protos/ is generated, and its descriptor has its path there."""
    import importlib

    paths = [p.relative_to(ROOT / "protos").as_posix() for p in (ROOT / "protos").rglob("*.proto")]
    assert {"cnnserve/v1/inference.proto", "inference/grpc_predict_v2.proto"} <= set(paths)
    for path in paths:
        module = importlib.import_module(
            "service._proto." + path.removesuffix(".proto").replace("/", ".") + "_pb2"
        )
        assert module.DESCRIPTOR.name == path
        assert all(not d.name.startswith("service/") for d in module.DESCRIPTOR.dependencies)


def test_rewrite_imports_moves_only_the_generated_modules() -> None:
    rewrite = _load_gen_protos().rewrite_imports
    ours = {
        "cnnserve.v1.inference_pb2",
        "inference.model_config_pb2",
        "grpc.reflection.v1.reflection_pb2",
        "top_pb2",
    }
    generated = "\n".join(
        [
            "import grpc",
            "import warnings",
            "from google.protobuf import descriptor as _descriptor",
            "from collections.abc import Iterable as _Iterable, Mapping as _Mapping",
            "from cnnserve.v1 import inference_pb2 as cnnserve_dot_v1_dot_inference__pb2",
            "from inference import model_config_pb2 as _model_config_pb2",
            "from inference import other_pb2 as other",  # not generated here: left alone
            "from grpc.reflection.v1 import reflection_pb2 as grpc_dot_reflection_dot_v1_dot_reflection__pb2",
            "import top_pb2 as top__pb2",
            "    from grpc._utilities import first_version_is_lower",
            "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'inference.model_config_pb2', _globals)",
            "  'inference.model_config_pb2'",  # not the builder's argument: left alone
        ]
    )
    expected = "\n".join(
        [
            "import grpc",
            "import warnings",
            "from google.protobuf import descriptor as _descriptor",
            "from collections.abc import Iterable as _Iterable, Mapping as _Mapping",
            "from service._proto.cnnserve.v1 import inference_pb2 as cnnserve_dot_v1_dot_inference__pb2",
            "from service._proto.inference import model_config_pb2 as _model_config_pb2",
            "from inference import other_pb2 as other",
            "from service._proto.grpc.reflection.v1 import reflection_pb2 as "
            "grpc_dot_reflection_dot_v1_dot_reflection__pb2",
            "from service._proto import top_pb2 as top__pb2",
            "    from grpc._utilities import first_version_is_lower",
            "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, "
            "'service._proto.inference.model_config_pb2', _globals)",
            "  'inference.model_config_pb2'",
        ]
    )
    assert rewrite(generated, ours) == expected
    assert rewrite(expected, ours) == expected  # idempotent


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


# Triton's additions (triton-inference-server/common protobuf/grpc_service.proto and
# model_config.proto): message -> {field: (number, type)}; checked field by field against
# tritonclient 2.73's generated grpc_service_pb2 and model_config_pb2. Type names are
# FieldDescriptor.TYPE_* without the prefix; a message field names its message.
TRITON_FIELDS: dict[str, dict[str, tuple[int, str]]] = {
    "ModelConfigRequest": {"name": (1, "STRING"), "version": (2, "STRING")},
    "ModelConfigResponse": {"config": (1, "inference.ModelConfig")},
    "ModelStatisticsRequest": {"name": (1, "STRING"), "version": (2, "STRING")},
    "StatisticDuration": {"count": (1, "UINT64"), "ns": (2, "UINT64")},
    "InferStatistics": {
        "success": (1, "inference.StatisticDuration"),
        "fail": (2, "inference.StatisticDuration"),
        "queue": (3, "inference.StatisticDuration"),
        "compute_input": (4, "inference.StatisticDuration"),
        "compute_infer": (5, "inference.StatisticDuration"),
        "compute_output": (6, "inference.StatisticDuration"),
    },
    "InferBatchStatistics": {
        "batch_size": (1, "UINT64"),
        "compute_input": (2, "inference.StatisticDuration"),
        "compute_infer": (3, "inference.StatisticDuration"),
        "compute_output": (4, "inference.StatisticDuration"),
    },
    "ModelStatistics": {
        "name": (1, "STRING"),
        "version": (2, "STRING"),
        "last_inference": (3, "UINT64"),
        "inference_count": (4, "UINT64"),
        "execution_count": (5, "UINT64"),
        "inference_stats": (6, "inference.InferStatistics"),
        "batch_stats": (7, "inference.InferBatchStatistics"),
    },
    "ModelStatisticsResponse": {"model_stats": (1, "inference.ModelStatistics")},
    "RepositoryIndexRequest": {"repository_name": (1, "STRING"), "ready": (2, "BOOL")},
    "RepositoryIndexResponse": {"models": (1, "inference.RepositoryIndexResponse.ModelIndex")},
    "RepositoryIndexResponse.ModelIndex": {
        "name": (1, "STRING"),
        "version": (2, "STRING"),
        "state": (3, "STRING"),
        "reason": (4, "STRING"),
    },
    "ModelConfig": {
        "name": (1, "STRING"),
        "platform": (2, "STRING"),
        "backend": (17, "STRING"),
        "max_batch_size": (4, "INT32"),
        "input": (5, "inference.ModelInput"),
        "output": (6, "inference.ModelOutput"),
        "dynamic_batching": (11, "inference.ModelDynamicBatching"),
        "instance_group": (7, "inference.ModelInstanceGroup"),
    },
    "ModelInput": {
        "name": (1, "STRING"),
        "data_type": (2, "inference.DataType"),
        "format": (3, "inference.ModelInput.Format"),
        "dims": (4, "INT64"),
    },
    "ModelOutput": {"name": (1, "STRING"), "data_type": (2, "inference.DataType"), "dims": (3, "INT64")},
    "ModelDynamicBatching": {
        "preferred_batch_size": (1, "INT32"),
        "max_queue_delay_microseconds": (2, "UINT64"),
    },
    "ModelInstanceGroup": {
        "name": (1, "STRING"),
        "kind": (4, "inference.ModelInstanceGroup.Kind"),
        "count": (2, "INT32"),
        "gpus": (3, "INT32"),
    },
}
TRITON_ENUMS = {
    "DataType": {"TYPE_INVALID": 0, "TYPE_FP16": 10, "TYPE_FP32": 11, "TYPE_STRING": 13},
    "ModelInput.Format": {"FORMAT_NONE": 0, "FORMAT_NHWC": 1, "FORMAT_NCHW": 2},
    "ModelInstanceGroup.Kind": {"KIND_AUTO": 0, "KIND_GPU": 1, "KIND_CPU": 2, "KIND_MODEL": 3},
}


def _message(name: str):
    from service._proto.inference import grpc_predict_v2_pb2, model_config_pb2

    top = name.split(".")[0]
    module = (
        grpc_predict_v2_pb2
        if top in grpc_predict_v2_pb2.DESCRIPTOR.message_types_by_name
        else model_config_pb2
    )
    descriptor = module.DESCRIPTOR.message_types_by_name[top]
    for nested in name.split(".")[1:]:
        descriptor = descriptor.nested_types_by_name[nested]
    return descriptor


@pytest.mark.parametrize(("message", "field"), sorted(PUBLISHED_FIELDS))
def test_open_inference_protocol_field_numbers(message: str, field: str) -> None:
    assert _message(message).fields_by_name[field].number == PUBLISHED_FIELDS[(message, field)]


@pytest.mark.parametrize("message", sorted(TRITON_FIELDS))
def test_triton_extension_field_numbers_and_types(message: str) -> None:
    from google.protobuf.descriptor import FieldDescriptor

    type_names = {
        v: k.removeprefix("TYPE_") for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")
    }
    descriptor = _message(message)
    declared = {}
    for field in descriptor.fields:
        kind = field.message_type or field.enum_type
        declared[field.name] = (field.number, kind.full_name if kind else type_names[field.type])
    # Exactly these: a field of ours that Triton numbers differently, or lacks, would be misread.
    assert declared == TRITON_FIELDS[message]


@pytest.mark.parametrize("enum", sorted(TRITON_ENUMS))
def test_triton_extension_enum_values(enum: str) -> None:
    from service._proto.inference import model_config_pb2

    top, *nested = enum.split(".")
    if nested:
        descriptor = model_config_pb2.DESCRIPTOR.message_types_by_name[top].enum_types_by_name[nested[0]]
    else:
        descriptor = model_config_pb2.DESCRIPTOR.enum_types_by_name[top]
    values = {v.name: v.number for v in descriptor.values}
    assert TRITON_ENUMS[enum].items() <= values.items()


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
        # Triton's read-only additions (its other ones answer UNIMPLEMENTED: service.frontend.triton).
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    }
    triton = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
    assert triton["ModelConfig"] == ("inference.ModelConfigRequest", "inference.ModelConfigResponse")
    assert triton["ModelStatistics"] == (
        "inference.ModelStatisticsRequest",
        "inference.ModelStatisticsResponse",
    )
    assert triton["RepositoryIndex"] == (
        "inference.RepositoryIndexRequest",
        "inference.RepositoryIndexResponse",
    )
