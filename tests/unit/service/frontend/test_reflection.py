"""Server reflection, v1 and v1alpha, through the real server wiring (engine double) over a real
channel, the way grpcurl and Postman use it: list the services, fetch the file declaring a symbol
(named by its proto path), and build request and response classes from the reflected descriptors
alone to make a call."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from servicer_fakes import Harness

from service._proto.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from service._proto.grpc.reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc

SERVICES = [
    "cnnserve.v1.Inference",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "inference.GRPCInferenceService",
]
VERSIONS = {"v1": (v1_pb2, v1_pb2_grpc), "v1alpha": (v1alpha_pb2, v1alpha_pb2_grpc)}


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness(max_batch_size=8, max_images_per_request=32)
    yield h
    h.close()


def reflect(channel: grpc.Channel, version: str, **request: Any) -> Any:
    pb, pb_grpc = VERSIONS[version]
    stub = pb_grpc.ServerReflectionStub(channel)
    (response,) = stub.ServerReflectionInfo(iter([pb.ServerReflectionRequest(**request)]), timeout=10)
    assert type(response) is pb.ServerReflectionResponse
    return response


def test_v1_is_v1alpha_renamed() -> None:
    """What lets the v1alpha servicer answer v1: every message, field (name, number, type, label,
    oneof) and method is the same, only the package differs."""

    def shape(module: Any) -> Any:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        package = "." + proto.package + "."
        messages = {
            m.name: [
                (
                    f.name,
                    f.number,
                    f.type,
                    f.label,
                    f.type_name.replace(package, "."),
                    f.HasField("oneof_index"),
                )
                for f in m.field
            ]
            for m in proto.message_type
        }
        methods = [
            (s.name, m.name, m.input_type.replace(package, "."), m.output_type.replace(package, "."))
            for s in proto.service
            for m in s.method
        ]
        return messages, methods

    assert v1_pb2.DESCRIPTOR.package == "grpc.reflection.v1"
    assert shape(v1_pb2) == shape(v1alpha_pb2)
    assert len(shape(v1_pb2)[0]) == 8


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_lists_the_services_and_describes_them_by_proto_path(harness: Harness, version: str) -> None:
    listed = reflect(harness.channel, version, list_services="")
    assert sorted(s.name for s in listed.list_services_response.service) == SERVICES

    described = reflect(harness.channel, version, file_containing_symbol="cnnserve.v1.Inference")
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(blob)
        for blob in described.file_descriptor_response.file_descriptor_proto
    ]
    assert files[0].name == "cnnserve/v1/inference.proto"
    assert [s.name for s in files[0].service] == ["Inference"]

    described = reflect(harness.channel, version, file_containing_symbol="inference.ModelConfigResponse")
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(blob).name
        for blob in described.file_descriptor_response.file_descriptor_proto
    ]
    assert names == ["inference/grpc_predict_v2.proto", "inference/model_config.proto"]  # with its import

    by_name = reflect(harness.channel, version, file_by_filename="inference/model_config.proto")
    assert by_name.file_descriptor_response.file_descriptor_proto

    # Each reflection version describes itself too (grpcurl `describe` of a listed service).
    own = f"grpc.reflection.{version}.ServerReflection"
    assert reflect(harness.channel, version, file_containing_symbol=own).file_descriptor_response


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_unknown_symbols_and_files_are_reflection_errors(harness: Harness, version: str) -> None:
    for request in (
        {"file_containing_symbol": "nope.Service"},
        {"file_by_filename": "service/_proto/x.proto"},
    ):
        response = reflect(harness.channel, version, **request)
        assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert response.original_request == VERSIONS[version][0].ServerReflectionRequest(**request)


def _pool_from_v1(channel: grpc.Channel, symbol: str) -> descriptor_pool.DescriptorPool:
    """What grpcurl does over v1: fetch the file declaring `symbol` and its dependencies, add them
    to an empty pool, dependencies first."""
    response = reflect(channel, "v1", file_containing_symbol=symbol)
    files = {
        proto.name: proto
        for proto in map(
            descriptor_pb2.FileDescriptorProto.FromString,
            response.file_descriptor_response.file_descriptor_proto,
        )
    }
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        add(name)
    return pool


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_a_client_calls_model_config_with_classes_built_from_reflection(
    harness: Harness, version: str
) -> None:
    if version == "v1alpha":  # grpcio-reflection's client-side descriptor database (v1alpha only)
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(harness.channel))
    else:
        pool = _pool_from_v1(harness.channel, "inference.GRPCInferenceService")
    method = pool.FindServiceByName("inference.GRPCInferenceService").FindMethodByName("ModelConfig")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    assert isinstance(method.input_type, Descriptor)
    assert method.input_type.file.name == "inference/grpc_predict_v2.proto"

    call = harness.channel.unary_unary(
        "/inference.GRPCInferenceService/ModelConfig",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    config = call(request_class(name="lenet5"), timeout=10).config
    assert (config.name, config.max_batch_size) == ("lenet5", 8)
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [1, 32, 32])]
    assert (
        config.input[0]
        .DESCRIPTOR.fields_by_name["data_type"]
        .enum_type.values_by_number[config.input[0].data_type]
        .name
        == "TYPE_FP32"
    )


def test_malformed_v1_request_is_invalid_argument(harness: Harness) -> None:
    call = harness.channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter([b"\xff\xff\xff\xff"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grpc.reflection.v1.ServerReflectionRequest" in info.value.details()
