"""Security properties of a real `python -m service serve` (issue 6, SECURITY.md):

1. Attack surface: reflection lists exactly our two APIs, health and reflection (v1 and v1alpha); no
   exposed method loads or unloads models, takes a path or URL, or touches shared memory (Triton's
   ModelConfig, RepositoryIndex and ModelStatistics are read-only views of the loaded models, and
   its other management RPCs answer UNIMPLEMENTED); the metrics port answers
   only GET /metrics and GET /healthz (404 for everything else); both listeners bind the configured
   address only.
2. Model integrity: a model whose bytes differ from metadata.json's sha256 is refused at startup
   (logged with the file, never reported ready anywhere) while the others serve, and the process
   exits non-zero when nothing is left; ONNX models whose external data escapes their folder are
   refused before any ONNX Runtime session exists. The same holds for imported ONNX models
   (`python -m export import`, no weights.pt): an intact one serves, one whose external data file
   was changed or whose graph points outside its folder is refused.
3. Resource caps: a request over each cap gets INVALID_ARGUMENT naming the cap.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from server_process import ServerProcess, module_server

from export import repository
from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service._proto.grpc.reflection.v1 import reflection_pb2 as reflection_v1_pb2
from service._proto.inference import grpc_predict_v2_pb2 as oip
from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.engine import session as session_mod
from service.engine.engine import ClassificationEngine
from service.frontend.server import GRADIENTS_SERVICE
from service.settings import Settings

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def rpc_error(call: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):  # a server-streaming call: read it to the end
            list(result)
    return info.value


def png(width: int, height: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# =================================================================================================
# 1. Attack surface (on the session's shared server: conftest.server, started with --host 127.0.0.1)
# =================================================================================================

OUR_SERVICES = [
    "cnnserve.v1.Inference",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "inference.GRPCInferenceService",
]
# What other model servers expose and we must not: model management (Triton's repository API,
# TorchServe's management API, TF Serving's ModelService), shared memory, config, tracing, logging.
MANAGEMENT_METHODS = [
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
    "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
    "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
    "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
    "/inference.GRPCInferenceService/CudaSharedMemoryStatus",
    "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
    "/inference.GRPCInferenceService/CudaSharedMemoryUnregister",
    "/inference.GRPCInferenceService/TraceSetting",
    "/inference.GRPCInferenceService/LogSettings",
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/org.pytorch.serve.grpc.management.ManagementAPIsService/RegisterModel",
    "/org.pytorch.serve.grpc.management.ManagementAPIsService/UnregisterModel",
    "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
    "/cnnserve.v1.Inference/LoadModel",
    "/cnnserve.v1.Inference/UnloadModel",
    "/grpc.channelz.v1.Channelz/GetServers",
    "/grpc.admin.v1.Admin/Get",
]
# A method name with one of these words would manage models or reach outside the request.
FORBIDDEN_METHOD = re.compile(
    r"load|register|repositor|shared ?memory|cuda|upload|download|config|trace|log|admin|exec|shell"
    r"|file|url|path|fetch|import|export|save|delete|update|control",
    re.IGNORECASE,
)
# Triton's read-only additions to the Open Inference Protocol, whose names match FORBIDDEN_METHOD:
# they answer from the models already loaded and take a model name and version, nothing else.
READ_ONLY_METHODS = {
    "inference.GRPCInferenceService.ModelConfig",
    "inference.GRPCInferenceService.RepositoryIndex",
}
# A request field with one of these words would name something outside the request: a path, a URL,
# a shared-memory region, a host to contact.
FORBIDDEN_FIELD = re.compile(
    r"path|url|uri|file|folder|dir|location|shared|memory|region|offset|cuda|repository|host|address"
    r"|command|script|module",
    re.IGNORECASE,
)
# Reflection's own request fields are the exception: they name .proto files and symbols of the
# server's in-memory descriptor pool (read-only), never the filesystem; `host` is unused by gRPC.
REFLECTION_FIELDS = {
    f"grpc.reflection.{version}.ServerReflectionRequest.{field}"
    for version in ("v1", "v1alpha")
    for field in ("host", "file_by_filename", "file_containing_symbol", "file_containing_extension")
}
# RepositoryIndexRequest.repository_name names no path: any name but "" is refused (INVALID_ARGUMENT).
ALLOWED_FIELDS = REFLECTION_FIELDS | {"inference.RepositoryIndexRequest.repository_name"}


def reflect(channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest) -> Any:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    assert not response.HasField("error_response"), response.error_response
    return response


def exposed_pool(channel: grpc.Channel) -> tuple[list[str], descriptor_pool.DescriptorPool]:
    """The service names reflection lists and a descriptor pool of everything it describes."""
    listed = reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = sorted(s.name for s in listed.list_services_response.service)
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    for name in names:
        response = reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=name))
        for blob in response.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(blob)
            files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file_name: str) -> None:
        if file_name in added:
            return
        for dependency in files[file_name].dependency:
            add(dependency)
        pool.Add(files[file_name])
        added.add(file_name)

    for file_name in files:
        add(file_name)
    return names, pool


def request_fields(message: Descriptor, seen: set[str] | None = None) -> Iterator[tuple[str, str]]:
    """(full field name, field type) of every field reachable from `message` (maps and nesting)."""
    seen = set() if seen is None else seen
    if message.full_name in seen:
        return
    seen.add(message.full_name)
    for field in message.fields:
        type_name = field.message_type.full_name if field.message_type else str(field.type)
        yield field.full_name, type_name
        if field.message_type is not None:
            yield from request_fields(field.message_type, seen)


def test_reflection_lists_exactly_our_services(server: ServerProcess) -> None:
    names, _ = exposed_pool(server.channel)
    assert names == OUR_SERVICES


def test_no_exposed_method_manages_models_takes_a_path_or_touches_shared_memory(
    server: ServerProcess,
) -> None:
    names, pool = exposed_pool(server.channel)
    methods = []
    for name in names:
        service = pool.FindServiceByName(name)
        for method in service.methods:
            methods.append(method.full_name)
            if method.full_name not in READ_ONLY_METHODS:
                assert not FORBIDDEN_METHOD.search(method.name), f"{method.full_name} looks like management"
            for field_name, type_name in request_fields(method.input_type):
                if field_name in ALLOWED_FIELDS:
                    continue
                short = field_name.rsplit(".", 1)[1]
                assert not FORBIDDEN_FIELD.search(short), f"{method.full_name}: request field {field_name}"
                assert type_name != "google.protobuf.Any", f"{field_name} could carry anything"
    # The walk covered exactly the methods our protos (and grpc's health and reflection) define:
    # a broken reflection answer cannot pass vacuously, and nothing is exposed beyond them.
    defined = {
        m.full_name
        for module in (pb, oip, health_pb2, reflection_v1_pb2, reflection_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert sorted(methods) == sorted(defined)
    assert "inference.GRPCInferenceService.ModelInfer" in defined and len(defined) >= 19


@pytest.mark.parametrize("method", MANAGEMENT_METHODS)
def test_management_and_shared_memory_rpcs_do_not_exist(server: ServerProcess, method: str) -> None:
    call = server.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    error = rpc_error(call, b"", timeout=10)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED, (method, error.code(), error.details())


@pytest.mark.parametrize("where", ["input", "output"])
def test_oip_shared_memory_parameters_are_refused(server: ServerProcess, where: str) -> None:
    """Triton clients ask for shared memory with tensor parameters, not a separate RPC: refused."""
    data = np.zeros((1, 1, 32, 32), np.float32)
    request = oip.ModelInferRequest(model_name="lenet5")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 32, 32])
    request.raw_input_contents.append(data.tobytes())
    target = tensor if where == "input" else request.outputs.add(name="logits")
    target.parameters["shared_memory_region"].string_param = "/dev/shm/cnnserve-test"
    target.parameters["shared_memory_byte_size"].int64_param = data.nbytes
    error = rpc_error(oip_grpc.GRPCInferenceServiceStub(server.channel).ModelInfer, request, timeout=30)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shared memory" in error.details()


HTTP_METHODS = ["HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"]
HTTP_PATHS = ["/metrics", "/healthz", "/", "/debug/vars", "/api/v1/models", "/../../etc/passwd"]


def http_call(server: ServerProcess, method: str, path: str) -> tuple[int, bytes]:
    host, port = server.metrics_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, body=b"{}" if method in ("POST", "PUT", "PATCH") else None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_metrics_port_answers_only_get_metrics_and_healthz(server: ServerProcess) -> None:
    status, body = http_call(server, "GET", "/metrics")
    assert status == 200 and b"cnnserve_requests_total" in body
    assert http_call(server, "GET", "/healthz") == (200, b"ok\n")
    for path in HTTP_PATHS[2:]:
        assert http_call(server, "GET", path)[0] == 404, path
    for method in HTTP_METHODS:
        for path in HTTP_PATHS:
            assert http_call(server, method, path)[0] == 404, (method, path)


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state the process owns, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: TCP_LISTEN
                    continue
                hex_address, hex_port = local.split(":")
                assert len(hex_address) == width
                # /proc prints each 32-bit word of the address in host (little-endian) order.
                raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, width, 8))
                address = ".".join(map(str, raw)) if width == 8 else _ipv6(raw)
                found.add((address, int(hex_port, 16)))
    return found


def _ipv6(raw: bytes) -> str:
    # gRPC listens on a dual-stack IPv6 socket even for an IPv4 host: bound to ::ffff:127.0.0.1 it
    # accepts exactly what a socket on 127.0.0.1 accepts, so it is reported as 127.0.0.1.
    address = ipaddress.IPv6Address(raw)
    return str(address.ipv4_mapped or address)


def test_every_listener_binds_only_the_configured_address(server: ServerProcess) -> None:
    assert "--host" in server.args and server.args[server.args.index("--host") + 1] == "127.0.0.1"
    ports = [int(a.rsplit(":", 1)[1]) for a in (server.address, server.metrics_address, server.http_address)]
    # Exactly these three sockets (gRPC, metrics, REST): not 0.0.0.0 or ::, no other listener (debug
    # port, admin port).
    assert _listening(server.process.pid) == {("127.0.0.1", port) for port in ports}


# =================================================================================================
# 2. Model integrity
# =================================================================================================


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _copy_model(source: Path, root: Path, name: str) -> Path:
    """source (a version directory) as root/name/1, metadata.json renamed (files and hashes kept)."""
    target = root / name / "1"
    shutil.copytree(source, target)
    meta = json.loads((target / "metadata.json").read_text())
    meta["name"], meta["version"] = name, 1
    (target / "metadata.json").write_text(json.dumps(meta, indent=2))
    return target


def _crafted(root: Path, name: str, lenet: Path, location: str, extra: dict[str, bytes | Path]) -> None:
    """A version of LeNet-5 whose first initializer keeps its data in `location`, committed with
    VersionWriter, so metadata.json holds the true sha256 of every file: only the external-data
    check can refuse it. `extra`: more files in the version (bytes, or a Path to symlink to)."""
    model = onnx.load(str(lenet / "model.onnx"))
    tensor = model.graph.initializer[0]
    onnx.external_data_helper.set_external_data(tensor, location=location)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    meta = json.loads((lenet / "metadata.json").read_text())
    for key in ("name", "version", "files"):
        meta.pop(key)
    with repository.VersionWriter(root, name, 1) as writer:
        (writer.path / "model.onnx").write_bytes(model.SerializeToString())
        shutil.copyfile(lenet / "weights.pt", writer.path / "weights.pt")
        for file_name, content in extra.items():
            if isinstance(content, Path):
                os.symlink(content, writer.path / file_name)
            else:
                (writer.path / file_name).write_bytes(content)
        committed = writer.commit(meta)
    repository.verify_files(committed)  # the hashes really match


def _imported(root: Path, name: str, base: Path, onnx_classifier: Callable[..., Any]) -> Path:
    """An imported ONNX model (tests/conftest.py onnx_classifier, its tensors in external data, so
    the version holds model.onnx.data too) as root/name/1; returns the version directory."""
    from export.importing import import_onnx
    from export.preprocessing import Preprocessing

    source = base / f"{name}-source"
    source.mkdir()
    onnx.save_model(
        onnx_classifier(), str(source / "user.onnx"), save_as_external_data=True,
        all_tensors_to_one_file=True, location="user.bin", size_threshold=0,
    )  # fmt: skip
    preprocessing = Preprocessing("RGB", 32, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    labels = [f"class {i}" for i in range(5)]
    return import_onnx(
        source / "user.onnx", root, name=name, labels=labels, preprocessing=preprocessing
    ).version.path


def _crafted_import(root: Path, name: str, intact: Path, location: str) -> None:
    """A copy of the imported version `intact` whose model.onnx points its external data at
    `location`, committed with VersionWriter (true hashes): only the external-data check refuses it."""
    model = onnx.load(str(intact / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    meta = json.loads((intact / "metadata.json").read_text())
    for key in ("name", "version", "files"):
        meta.pop(key)
    with repository.VersionWriter(root, name, 1) as writer:
        (writer.path / "model.onnx").write_bytes(model.SerializeToString())
        committed = writer.commit(meta)
    repository.verify_files(committed)


# name -> (what the server must log about it)
REFUSED = {
    "tampered": r"tampered/1/model\.onnx sha256 \w+\.\.\. differs from metadata\.json",
    "evil-dotdot": r"keeps its data in '\.\./\.\./etc/passwd', a path with '\.\.'",
    "evil-absolute": r"keeps its data in '/etc/passwd', an absolute path",
    "evil-symlink": r"keeps its data in 'weights\.bin', a path through the symlink weights\.bin",
    "evil-unlisted": r"keeps its data in 'extra\.bin', which metadata\.json does not list",
    "imported-tampered": r"imported-tampered/1/model\.onnx\.data sha256 \w+\.\.\. differs from metadata",
    "imported-evil": r"keeps its data in '\.\./\.\./etc/passwd', a path with '\.\.'",
}
SERVED = ["imported", "lenet5"]


@pytest.fixture(scope="module")
def hostile_repository(
    demo_repository: Path, tmp_path_factory: pytest.TempPathFactory, build_onnx_classifier: Callable[..., Any]
) -> Path:
    """lenet5 (intact) next to a copy with one byte of model.onnx flipped and four crafted models
    whose external data points outside their folder or at a file metadata.json does not list."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "repository"
    lenet = demo_repository / "lenet5" / "1"
    _copy_model(lenet, root, "lenet5")
    _flip_one_byte(_copy_model(lenet, root, "tampered") / "model.onnx")
    outside = base / "outside.bin"
    outside.write_bytes(b"\0" * 4096)
    _crafted(root, "evil-dotdot", lenet, "../../etc/passwd", {})
    _crafted(root, "evil-absolute", lenet, "/etc/passwd", {})
    _crafted(root, "evil-symlink", lenet, "weights.bin", {"weights.bin": outside})
    _crafted(root, "evil-unlisted", lenet, "extra.bin", {})
    # Added after the commit, so no sha256 covers it.
    (root / "evil-unlisted" / "1" / "extra.bin").write_bytes(b"\0" * 4096)
    intact = _imported(root, "imported", base, build_onnx_classifier)
    _flip_one_byte(_imported(root, "imported-tampered", base, build_onnx_classifier) / "model.onnx.data")
    _crafted_import(root, "imported-evil", intact, "../../etc/passwd")
    return root


@pytest.fixture(scope="module")
def hostile_server(hostile_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(hostile_repository, "--max-batch-size", "2")


def test_refused_models_are_logged_and_never_ready_while_the_good_one_serves(
    hostile_server: ServerProcess,
) -> None:
    log = hostile_server.log
    for name, reason in REFUSED.items():
        line = next((x for x in log.splitlines() if f"not serving {name}:1:" in x), None)
        assert line is not None, f"no refusal logged for {name}:\n{log}"
        assert re.search(reason, line), line
    assert "Traceback" not in log
    # Only the intact ones serve; the line then says where the start-up time went.
    served = ", ".join(rf"{name}:1 \(\w+\)" for name in SERVED)
    assert re.search(rf"ready in [\d.]+s: serving {served}(; |$)", log, re.MULTILINE), log

    health = health_pb2_grpc.HealthStub(hostile_server.channel)
    check = health_pb2.HealthCheckRequest
    assert health.Check(check(service=""), timeout=5).status == SERVING
    assert health.Check(check(service="model:lenet5"), timeout=5).status == SERVING
    inference = pb_grpc.InferenceStub(hostile_server.channel)
    assert [(m.name, m.version) for m in inference.ListModels(pb.ListModelsRequest(), timeout=10).models] == [
        (name, 1) for name in SERVED
    ]
    v2 = oip_grpc.GRPCInferenceServiceStub(hostile_server.channel)
    assert v2.ModelReady(oip.ModelReadyRequest(name="lenet5"), timeout=10).ready
    image = pb.ImageInput(encoded=png(32, 32))
    assert inference.Classify(pb.ClassifyRequest(model="lenet5", image=image), timeout=30).classes
    rgb = pb.ImageInput(encoded=png(48, 40))
    assert inference.Classify(pb.ClassifyRequest(model="imported", image=rgb), timeout=30).classes
    for name in REFUSED:
        # Registered when the load was planned, and never SERVING (issue 13: a model still loading,
        # or one that failed, is NOT_SERVING rather than unknown).
        assert health.Check(check(service=f"model:{name}"), timeout=5).status == NOT_SERVING
        assert not v2.ModelReady(oip.ModelReadyRequest(name=name), timeout=10).ready
        assert not v2.ModelReady(oip.ModelReadyRequest(name=name, version="1"), timeout=10).ready
        error = rpc_error(inference.Classify, pb.ClassifyRequest(model=name, image=image), timeout=30)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert rpc_error(v2.ModelMetadata, oip.ModelMetadataRequest(name=name), timeout=10).code() == (
            grpc.StatusCode.NOT_FOUND
        )


def test_no_onnx_runtime_session_is_created_for_a_refused_model(
    hostile_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same repository loaded in-process, with every InferenceSession recorded."""
    real = session_mod.ort.InferenceSession
    opened: list[Path] = []

    def recording(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(session_mod.ort, "InferenceSession", recording)
    engine = ClassificationEngine(
        Settings(repository=hostile_repository, device="cpu", max_batch_size=1, intra_op_threads=1)
    )
    try:
        engine.load()
        assert [m.name for m in engine.models()] == SERVED
        assert sorted(opened) == [hostile_repository / name / "1" / "model.onnx" for name in SERVED]
    finally:
        asyncio.run(engine.stop())


def test_a_repository_with_no_intact_model_exits_non_zero(
    demo_repository: Path, tmp_path: Path, start_server: Callable[..., ServerProcess]
) -> None:
    root = tmp_path / "repository"
    lenet = demo_repository / "lenet5" / "1"
    _flip_one_byte(_copy_model(lenet, root, "lenet5") / "model.onnx")
    _flip_one_byte(_copy_model(lenet, root, "digits") / "weights.pt")
    server = start_server(root)
    code = server.process.wait(120)
    server._reader.join(5)
    assert code == 1, server.log
    log = server.log
    assert re.search(r"not serving lenet5:1: \S+lenet5/1/model\.onnx sha256 \w+\.\.\. differs", log), log
    assert re.search(r"not serving digits:1: \S+digits/1/weights\.pt sha256 \w+\.\.\. differs", log), log
    assert "no model could be loaded" in log
    assert "ready in" not in log and "Traceback" not in log


# =================================================================================================
# 3. Resource caps: INVALID_ARGUMENT naming the cap, on a server with small caps
# =================================================================================================

CAPS = {
    "max_images_per_request": 2,
    "max_image_pixels": 16384,  # 128x128 passes, 129x129 does not
    "max_deadline_s": 60,
    "max_top_k": 3,
    "max_task_iterations": 4,
    "max_task_batch": 1,
    "max_task_image_side": 256,  # explain's 224x224 input passes
    "max_task_cost": 50_000,  # a 64x64 one-step dream costs 16,384; explaining one 224x224 image 100,352
}
# Every call on the caps server stays within max_deadline_s (a longer one would be refused).
TIMEOUT_S = 50


@pytest.fixture(scope="module")
def caps_server(demo_repository: Path) -> Iterator[ServerProcess]:
    flags = [item for key, value in CAPS.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    yield from module_server(
        demo_repository, "--models", "resnet18", "--max-batch-size", "1", "--workers", "1",
        "--torch-threads", "1", *flags,
    )  # fmt: skip


@pytest.fixture(scope="module")
def caps_stub(caps_server: ServerProcess) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(caps_server.channel)


def tensor(seed: int = 0) -> pb.ImageInput:
    arr = np.random.default_rng(seed).standard_normal((3, 224, 224)).astype(np.float32)
    return pb.ImageInput(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=arr.tobytes()))


def bytes_infer(*images: bytes) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="resnet18")
    request.inputs.add(name="input", datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(b"".join(len(i).to_bytes(4, "little") + i for i in images))
    return request


def dream(side: int = 64, *, steps: int = 1, octaves: int = 1, height: int | None = None) -> pb.DreamRequest:
    image = pb.ImageInput(encoded=png(side, height or side))
    return pb.DreamRequest(model="resnet18", image=image, octaves=octaves, steps=steps, tile_size=0)


def assert_names_cap(error: grpc.RpcError, cap: str, *, with_value: bool = True) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert cap in error.details(), error.details()
    if with_value:
        assert str(CAPS[cap]) in error.details().replace(",", ""), error.details()


def test_images_per_request(caps_server: ServerProcess, caps_stub: pb_grpc.InferenceStub) -> None:
    cap = CAPS["max_images_per_request"]
    ok = caps_stub.ClassifyBatch(
        pb.ClassifyBatchRequest(model="resnet18", images=[tensor()] * cap), timeout=TIMEOUT_S
    )
    assert len(ok.results) == cap
    over = pb.ClassifyBatchRequest(model="resnet18", images=[tensor()] * (cap + 1))
    assert_names_cap(rpc_error(caps_stub.ClassifyBatch, over, timeout=TIMEOUT_S), "max_images_per_request")
    v2 = oip_grpc.GRPCInferenceServiceStub(caps_server.channel)
    request = bytes_infer(*[png(40, 40)] * (cap + 1))
    assert_names_cap(rpc_error(v2.ModelInfer, request, timeout=TIMEOUT_S), "max_images_per_request")


def test_image_pixels(caps_server: ServerProcess, caps_stub: pb_grpc.InferenceStub) -> None:
    at_cap = pb.ClassifyRequest(model="resnet18", image=pb.ImageInput(encoded=png(128, 128)))
    assert caps_stub.Classify(at_cap, timeout=TIMEOUT_S).classes
    over = pb.ClassifyRequest(model="resnet18", image=pb.ImageInput(encoded=png(129, 129)))
    assert_names_cap(rpc_error(caps_stub.Classify, over, timeout=TIMEOUT_S), "max_image_pixels")
    v2 = oip_grpc.GRPCInferenceServiceStub(caps_server.channel)
    assert_names_cap(
        rpc_error(v2.ModelInfer, bytes_infer(png(129, 129)), timeout=TIMEOUT_S), "max_image_pixels"
    )
    assert_names_cap(rpc_error(caps_stub.DreamUnary, dream(129), timeout=TIMEOUT_S), "max_image_pixels")


def test_top_k(caps_stub: pb_grpc.InferenceStub) -> None:
    request = pb.ClassifyRequest(model="resnet18", image=tensor(), top_k=CAPS["max_top_k"] + 1)
    assert_names_cap(rpc_error(caps_stub.Classify, request, timeout=TIMEOUT_S), "max_top_k")


def test_deadline(caps_server: ServerProcess, caps_stub: pb_grpc.InferenceStub) -> None:
    cap = CAPS["max_deadline_s"]
    request = pb.ClassifyRequest(model="resnet18", image=tensor())
    assert caps_stub.Classify(request, timeout=cap - 1).classes
    # Exactly the cap passes although gRPC's timeout encoding rounds it up on the wire (60 s -> 60.1 s).
    assert caps_stub.Classify(request, timeout=cap).classes
    assert caps_stub.Classify(request).classes  # no deadline: the server gives it max_deadline_s
    assert_names_cap(rpc_error(caps_stub.Classify, request, timeout=cap + 10), "max_deadline_s")
    batch = pb.ClassifyBatchRequest(model="resnet18", images=[tensor()])
    assert_names_cap(rpc_error(caps_stub.ClassifyBatch, batch, timeout=cap + 10), "max_deadline_s")
    v2 = oip_grpc.GRPCInferenceServiceStub(caps_server.channel)
    infer = bytes_infer(png(40, 40))
    assert_names_cap(rpc_error(v2.ModelInfer, infer, timeout=cap + 10), "max_deadline_s")
    assert_names_cap(rpc_error(caps_stub.DreamUnary, dream(), timeout=cap + 10), "max_deadline_s")
    assert_names_cap(rpc_error(caps_stub.Dream, dream(), timeout=cap + 10), "max_deadline_s")
    # A ClassifyStream's deadline bounds the stream (e.g. `cnnserve score` over a directory), not
    # one item: its items are served, each within max_deadline_s.
    items = [pb.ClassifyStreamRequest(id=str(i), request=request) for i in range(2)]
    answers = list(caps_stub.ClassifyStream(iter(items), timeout=cap + 10))
    assert sorted(a.id for a in answers) == ["0", "1"] and all(a.HasField("result") for a in answers)


def test_gradient_caps(caps_server: ServerProcess, caps_stub: pb_grpc.InferenceStub) -> None:
    over_iterations = dream(steps=CAPS["max_task_iterations"] + 1)
    assert_names_cap(
        rpc_error(caps_stub.DreamUnary, over_iterations, timeout=TIMEOUT_S), "max_task_iterations"
    )
    # 2 octaves x 3 steps = 6 > 4: the cap counts the steps of every octave.
    assert_names_cap(
        rpc_error(caps_stub.Dream, dream(steps=3, octaves=2), timeout=TIMEOUT_S), "max_task_iterations"
    )
    wide = dream(CAPS["max_task_image_side"] + 1, height=40)  # 10,280 pixels: under max_image_pixels
    assert_names_cap(rpc_error(caps_stub.DreamUnary, wide, timeout=TIMEOUT_S), "max_task_image_side")
    explain = pb.ExplainRequest(model="resnet18", images=[tensor(1), tensor(2)])
    assert_names_cap(rpc_error(caps_stub.Explain, explain, timeout=TIMEOUT_S), "max_task_batch")

    # The cost cap is checked by the running worker pool: wait for it.
    caps_server.wait_serving(GRADIENTS_SERVICE, timeout=180)
    one = pb.ExplainRequest(model="resnet18", images=[tensor(1)])
    assert_names_cap(rpc_error(caps_stub.Explain, one, timeout=TIMEOUT_S), "max_task_cost", with_value=False)
    # Within every cap, a job runs.
    result = caps_stub.DreamUnary(dream(steps=1), timeout=TIMEOUT_S)
    assert result.width == 64 and result.height == 64
