"""The Open Inference Protocol (KServe v2) servicer, `inference.GRPCInferenceService`.

How cnnserve models look through it (also in docs/API.md):

* ModelMetadata: platform "onnxruntime_onnx"; one input (the model's input name, "input"), datatype
  FP32 (FP16 for a model exported with --fp16), shape [-1, C, H, W]; outputs "logits" and
  "probabilities" (softmax of the logits), both FP32 [-1, classes].
* ModelInfer input: the input tensor FP32 or FP16 [N, C, H, W], preprocessed, in
  raw_input_contents (FP32 may also use contents.fp32_contents); or, as an extension, BYTES [N] (or
  [N, 1]) of encoded JPEG/PNG/WebP images, decoded and preprocessed by the server (raw BYTES use
  the standard 4-byte little-endian length prefix per element). N is 1..max_images_per_request.
* ModelInfer outputs are always in raw_output_contents. No requested outputs means all of them.
  A requested output with the int64 parameter "classification" = k answers Triton's
  classification extension: BYTES [N, k] of "value:index:label", most likely first.
* Every ModelInferResponse carries the parameter "execution_provider" (string).
* ServerMetadata.extensions: "classification", "encoded_image_input", "probabilities_output",
  "grpc_health_v1", and "execution_provider:<ONNX Runtime provider>" for each provider in use.

Triton's read-only additions to this service, with Triton's message names and field numbers:

* ModelConfig: the subset of Triton's ModelConfig a client needs to batch and shape requests,
  from the model and the server settings (`model_config`).
* RepositoryIndex: every loaded model version, state "READY" (or "UNAVAILABLE" with the reason
  while the server is not ready); cnnserve has one repository, so repository_name must be empty.
* ModelStatistics: counts and durations read from the Prometheus metrics the server keeps
  (`model_statistics` says which metric feeds which field, and what is approximate).

Triton's other additions (`TRITON_UNIMPLEMENTED`) answer UNIMPLEMENTED with what to do instead.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

import service
from service.catalog import (
    UNTRAINED_WARNING,
    features_dim,
    features_name,
    imported,
    input_name,
    no_features_hint,
    output_name,
    reexport_command,
)
from service.engine.protocol import FEATURES, LOGITS
from service.errors import InvalidArgument
from service.frontend.calls import Rpc, unary
from service.frontend.classify import ClassifyPath, Timings, softmax
from service.frontend.state import ServingState
from service.frontend.triton import PLATFORM, PROBABILITIES, model_config, model_statistics

from .._proto.inference import grpc_predict_v2_pb2 as pb
from .._proto.inference import grpc_predict_v2_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from service.catalog import LoadedModel

EXTENSIONS = ("classification", "encoded_image_input", "probabilities_output", "grpc_health_v1")
_DATATYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2")}


def oip_datatype(dtype: np.dtype) -> str:
    return {"float32": "FP32", "float16": "FP16"}[np.dtype(dtype).name]


def _refuse_shared_memory(request: pb.ModelInferRequest) -> None:
    """Triton clients ask for shared memory with `shared_memory_*` parameters on an input or output.
    This server has no shared-memory API (docs/API.md, SECURITY.md): refuse such a request instead
    of silently answering in-band to a client that will read its shared-memory region."""
    for kind, tensors in (("input", request.inputs), ("output", request.outputs)):
        for tensor in tensors:
            if any(key.startswith("shared_memory") for key in tensor.parameters):
                raise InvalidArgument(
                    f"{kind} {tensor.name!r} asks for shared memory; this server has none: send inputs "
                    "in raw_input_contents and read outputs from raw_output_contents",
                    reason="invalid_argument",
                )


def parse_version(version: str) -> int | None:
    """An OIP version string -> engine version (None: the latest)."""
    if not version:
        return None
    if not version.isdecimal() or int(version) < 1:
        raise InvalidArgument(
            f"model version must be a positive integer, got {version!r}", reason="invalid_argument"
        )
    return int(version)


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES tensor raw form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidArgument(
                "BYTES input: truncated length prefix in raw_input_contents", reason="invalid_argument"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(
                "BYTES input: element longer than raw_input_contents", reason="invalid_argument"
            )
        elements.append(bytes(raw[offset : offset + length]))
        offset += length
    return elements


class OpenInference:
    """The Open Inference Protocol's operations over the classify path, whatever the transport:
    protobuf messages in and out, failures raised as service errors. The gRPC servicer below and
    the REST binding (service/frontend/rest.py) are two thin skins over it, so both answer every
    request alike: the same checks, the same messages, the same engine calls."""

    def __init__(self, state: ServingState, classify: ClassifyPath) -> None:
        self._state = state
        self._classify = classify

    def server_metadata(self, extensions: Sequence[str] = EXTENSIONS) -> pb.ServerMetadataResponse:
        providers = sorted({m.provider for m in self._state.models.models()})
        return pb.ServerMetadataResponse(
            name="cnnserve",
            version=service.__version__,
            extensions=[*extensions, *(f"execution_provider:{p}" for p in providers)],
        )

    def model_ready(self, name: str, version: str, rpc: Rpc) -> bool:
        """False (not an error) for an unknown model or version, like Triton: it is a probe."""
        parsed = parse_version(version)
        matching = [
            m
            for m in self._state.models.models()
            if m.name == name and (parsed is None or m.version == parsed)
        ]
        if matching:
            rpc.model = name
        return any(self._state.model_ready(m) for m in matching)

    def resolve(self, name: str, version: str) -> LoadedModel:
        if not name:
            raise InvalidArgument("model name is required", reason="invalid_argument")
        return self._state.models.get(name, parse_version(version))

    def model_metadata(self, name: str, version: str, rpc: Rpc) -> pb.ModelMetadataResponse:
        model = self.resolve(name, version)
        rpc.model = model.name
        return self.metadata_of(model)

    def metadata_of(self, model: LoadedModel) -> pb.ModelMetadataResponse:
        versions = sorted(m.version for m in self._state.models.models() if m.name == model.name)
        classes = [-1, model.num_classes]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        features = features_name(model)
        outputs = [
            tensor(name=output_name(model), datatype="FP32", shape=classes),
            tensor(name=PROBABILITIES, datatype="FP32", shape=classes),
        ]
        if features is not None:
            outputs.append(tensor(name=features, datatype="FP32", shape=[-1, features_dim(model)]))
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in versions],
            platform=PLATFORM,
            inputs=[
                tensor(
                    name=input_name(model),
                    datatype=oip_datatype(model.input_dtype),
                    shape=[-1, *model.input_shape],
                )
            ],
            outputs=outputs,
        )

    async def model_infer(
        self, request: pb.ModelInferRequest, rpc: Rpc, remaining: float | None
    ) -> pb.ModelInferResponse:
        """Infer with the deadline `remaining` seconds away (None: the client set none)."""
        state = self._state
        state.check_ready()
        model = self.resolve(request.model_name, request.model_version)
        rpc.model = model.name
        outputs = self._requested_outputs(request, model)
        features = features_name(model)
        # Logits and features come from the same engine run when both are asked for.
        engine_outputs = (LOGITS, FEATURES) if any(name == features for name, _ in outputs) else (LOGITS,)
        rows, _ = await self._infer(request, model, state.deadline_in(remaining), engine_outputs)
        rows = np.asarray(rows, dtype=np.float32)
        values = {output_name(model): rows[:, : model.num_classes]}
        if len(engine_outputs) == 2:
            values[str(features)] = rows[:, model.num_classes :]
        return self._response(request, model, values, outputs)

    def _requested_outputs(self, request: pb.ModelInferRequest, model: LoadedModel) -> list[tuple[str, int]]:
        """(output name, classification k or 0) for each requested output; all outputs if none (the
        OIP's rule: the features too, where the model has them)."""
        _refuse_shared_memory(request)
        features = features_name(model)
        known = (output_name(model), PROBABILITIES, *([features] if features is not None else []))
        if not request.outputs:
            return [(name, 0) for name in known]
        requested = []
        for output in request.outputs:
            if output.name not in known:
                hint = (
                    f"; re-export it for `features`: {reexport_command(model)}"
                    if output.name == "features" and not imported(model)
                    else f"; {no_features_hint(model)}"
                    if output.name == "features"
                    else ""
                )
                raise InvalidArgument(
                    f"unknown output {output.name!r}; {model.name} has {', '.join(known)}{hint}",
                    reason="invalid_argument",
                )
            k = 0
            if "classification" in output.parameters and output.name == features:
                raise InvalidArgument(
                    f"output {output.name!r}: the classification extension applies to class scores, "
                    "not to the embedding",
                    reason="invalid_argument",
                )
            if "classification" in output.parameters:
                parameter = output.parameters["classification"]
                k = parameter.int64_param if parameter.WhichOneof("parameter_choice") == "int64_param" else -1
                if not 1 <= k <= model.num_classes:
                    raise InvalidArgument(
                        f"output {output.name!r}: classification must be an int64 "
                        f"between 1 and {model.num_classes}",
                        reason="invalid_argument",
                    )
            requested.append((output.name, k))
        return requested

    async def _infer(
        self, request: pb.ModelInferRequest, model: LoadedModel, deadline: float, outputs: tuple[str, ...]
    ) -> tuple[np.ndarray, Timings]:
        """The engine `outputs` of the request's one input, down the classify path: a tensor is
        validated and encoded images decoded only after the engine admitted them."""
        tensor, raw = _the_input(request, model)
        shape = [int(d) for d in tensor.shape]
        if not shape or any(d < 0 for d in shape):
            raise InvalidArgument(f"invalid input shape {shape}", reason="invalid_argument")
        if shape[0] == 0:
            raise InvalidArgument(
                "empty batch: the first dimension of the input is 0", reason="invalid_argument"
            )
        self._state.check_image_count(shape[0])
        if tensor.datatype.upper() == "BYTES":
            encoded = _encoded_images(tensor, raw, shape)
            return await self._classify.images_logits(model, encoded, deadline, outputs)
        tensor_values = _float_tensor(tensor, raw, shape, model)
        return await self._classify.infer(model, tensor_values, deadline, outputs=outputs)

    def _response(
        self,
        request: pb.ModelInferRequest,
        model: LoadedModel,
        values_by_name: dict[str, np.ndarray],
        outputs: list[tuple[str, int]],
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=str(model.version), id=request.id
        )
        response.parameters["execution_provider"].string_param = model.provider
        if not model.trained:
            response.parameters["untrained"].bool_param = True
            response.parameters["warning"].string_param = UNTRAINED_WARNING
        probabilities = None
        for name, k in outputs:
            if name == PROBABILITIES:
                if probabilities is None:
                    probabilities = softmax(values_by_name[output_name(model)])
                values = probabilities
            else:
                values = values_by_name[name]
            out = response.outputs.add(name=name)
            if k:
                order = np.argsort(-values, axis=1, kind="stable")[:, :k]
                labels = model.labels
                elements = [
                    f"{values[row, i]:f}:{i}:{labels[i] if i < len(labels) else ''}".encode()
                    for row in range(values.shape[0])
                    for i in order[row]
                ]
                out.datatype = "BYTES"
                out.shape.extend([values.shape[0], k])
                response.raw_output_contents.append(serialize_bytes(elements))
            else:
                out.datatype = "FP32"
                out.shape.extend(values.shape)
                response.raw_output_contents.append(np.ascontiguousarray(values, dtype="<f4").tobytes())
        return response


class GRPCInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService: OpenInference inside the RPC skeleton of calls.py."""

    def __init__(self, state: ServingState, oip: OpenInference) -> None:
        self._state = state
        self._oip = oip

    # --- health and metadata -------------------------------------------------------------------

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        async def work(rpc: Rpc) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await unary("ServerLive", context, work)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        async def work(rpc: Rpc) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self._state.ready)

        return await unary("ServerReady", context, work)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        async def work(rpc: Rpc) -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=self._oip.model_ready(request.name, request.version, rpc))

        return await unary("ModelReady", context, work)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        async def work(rpc: Rpc) -> pb.ServerMetadataResponse:
            return self._oip.server_metadata()

        return await unary("ServerMetadata", context, work)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def work(rpc: Rpc) -> pb.ModelMetadataResponse:
            return self._oip.model_metadata(request.name, request.version, rpc)

        return await unary("ModelMetadata", context, work)

    # --- Triton's read-only extensions -----------------------------------------------------------

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        """Triton's configuration of a model version (`model_config`); NOT_FOUND for an unknown
        model or version."""

        async def work(rpc: Rpc) -> pb.ModelConfigResponse:
            model = self._oip.resolve(request.name, request.version)
            rpc.model = model.name
            return pb.ModelConfigResponse(config=model_config(model, self._state))

        return await unary("ModelConfig", context, work)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every loaded model version: state "READY", or "UNAVAILABLE" with the reason while the
        server does not accept inferences (loading, shutting down); `ready` keeps only the READY
        ones. Versions in the repository that were not loaded are not listed."""

        async def work(rpc: Rpc) -> pb.RepositoryIndexResponse:
            if request.repository_name:
                raise InvalidArgument(
                    f"repository_name {request.repository_name!r}: this server has one model repository; "
                    "send repository_name empty",
                    reason="invalid_argument",
                )
            reason = "the server is shutting down" if self._state.draining else "the model is still loading"
            index = []
            for m in self._state.models.models():
                ready = self._state.model_ready(m)
                if ready or not request.ready:
                    index.append(
                        pb.RepositoryIndexResponse.ModelIndex(
                            name=m.name,
                            version=str(m.version),
                            state="READY" if ready else "UNAVAILABLE",
                            reason="" if ready else reason,
                        )
                    )
            return pb.RepositoryIndexResponse(models=index)

        return await unary("RepositoryIndex", context, work)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Statistics of the loaded versions of one model (`name`; `version` narrows it to one), or
        of every model when `name` is empty (`model_statistics`)."""

        async def work(rpc: Rpc) -> pb.ModelStatisticsResponse:
            if request.name:
                model = self._oip.resolve(request.name, request.version)
                rpc.model = model.name
                models = (
                    [model]
                    if request.version
                    else [m for m in self._state.models.models() if m.name == model.name]
                )
            elif request.version:
                raise InvalidArgument(
                    f"version {request.version!r} without a model name; name the model, or send "
                    "neither for every model",
                    reason="invalid_argument",
                )
            else:
                models = self._state.models.models()
            return pb.ModelStatisticsResponse(model_stats=model_statistics(models))

        return await unary("ModelStatistics", context, work)

    # --- inference ----------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await unary(
            "ModelInfer", context, lambda rpc: self._oip.model_infer(request, rpc, context.time_remaining())
        )


def _encoded_images(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, shape: list[int]
) -> list[bytes]:
    """The encoded images of a BYTES input of shape [N] or [N, 1]."""
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise InvalidArgument(
            f"BYTES input shape must be [N] or [N, 1], got {shape}", reason="invalid_argument"
        )
    elements = deserialize_bytes(raw) if raw is not None else list(tensor.contents.bytes_contents)
    if len(elements) != shape[0]:
        raise InvalidArgument(
            f"BYTES input has {len(elements)} elements; shape {shape} needs {shape[0]}",
            reason="invalid_argument",
        )
    return elements


def _the_input(
    request: pb.ModelInferRequest, model: LoadedModel
) -> tuple[pb.ModelInferRequest.InferInputTensor, bytes | None]:
    """The request's one input tensor and its raw content (None: in `contents`)."""
    expected_name = input_name(model)
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"{model.name} takes exactly one input {expected_name!r}; got {len(request.inputs)}",
            reason="invalid_argument",
        )
    tensor = request.inputs[0]
    if tensor.name != expected_name:
        raise InvalidArgument(
            f"unknown input {tensor.name!r}; {model.name} takes {expected_name!r}", reason="invalid_argument"
        )
    if not request.raw_input_contents:
        return tensor, None
    if len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument("raw_input_contents must have one entry per input", reason="invalid_argument")
    if tensor.HasField("contents"):
        raise InvalidArgument(
            "use either raw_input_contents or contents, not both", reason="invalid_argument"
        )
    return tensor, request.raw_input_contents[0]


def _float_tensor(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, shape: list[int], model: LoadedModel
) -> np.ndarray:
    """An FP32/FP16 input as an [N, C, H, W] array, not yet validated (the classify path does it
    once admitted)."""
    datatype = tensor.datatype.upper()
    wire = _DATATYPES.get(datatype)
    if wire is None:
        raise InvalidArgument(
            f"unsupported input datatype {tensor.datatype!r}; use FP32, FP16, or BYTES (encoded images)",
            reason="invalid_argument",
        )
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * wire.itemsize:
            raise InvalidArgument(
                f"input has {len(raw)} bytes of raw content; "
                f"shape {shape} {datatype} needs {count * wire.itemsize}",
                reason="invalid_argument",
            )
        arr = np.frombuffer(raw, dtype=wire).reshape(shape)
    elif datatype == "FP32" and len(tensor.contents.fp32_contents) == count:
        arr = np.asarray(tensor.contents.fp32_contents, dtype=np.float32).reshape(shape)
    else:
        have = len(tensor.contents.fp32_contents)
        raise InvalidArgument(
            f"input has {have} {datatype} values in contents; shape {shape} needs {count}"
            + (" (FP16 must be sent in raw_input_contents)" if datatype == "FP16" else ""),
            reason="invalid_argument",
        )
    if arr.ndim != 4:
        raise InvalidArgument(
            f"input shape must be [N, {', '.join(map(str, model.input_shape))}], got {shape}",
            reason="invalid_argument",
        )
    return arr
