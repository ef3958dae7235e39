"""Triton's additions to the Open Inference Protocol: ModelConfig and ModelStatistics as Triton
defines them, and UNIMPLEMENTED, saying what to do instead, for the ones cnnserve does not serve.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from service.catalog import features_dim, features_name, input_name, output_name
from service.errors import ServiceError
from service.frontend.calls import Rpc, unary
from service.observability import metrics

from .._proto.inference import grpc_predict_v2_pb2 as pb
from .._proto.inference import model_config_pb2 as mc

if TYPE_CHECKING:
    from service.catalog import LoadedModel
    from service.frontend.state import ServingState

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
PROBABILITIES = "probabilities"
# service.engine.providers.CUDA (not imported from there: that module loads onnxruntime).
CUDA_PROVIDER = "CUDAExecutionProvider"
_CONFIG_DATATYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16}
# The RPCs whose requests run the engine: what ModelStatistics counts as inferences.
INFERENCE_METHODS = frozenset({"ModelInfer", "Classify", "ClassifyBatch", "ClassifyStream"})

# --- Triton extensions: configuration, statistics, the RPCs this server does not serve -------------


def model_config(model: LoadedModel, state: ServingState) -> mc.ModelConfig:
    """Triton's ModelConfig of a loaded model version, from the model and the server settings.

    max_batch_size is the largest request that runs as one batch: min(the model's max_batch_size
    (its config.yaml over the setting), max_images_per_request). (A larger request, up to
    max_images_per_request, is accepted too and split over several batches; an ONNX model with a
    fixed batch dimension below max_batch_size runs smaller batches than this says.) dims leave the
    batch dimension out, as Triton's do. One instance group whose count is the version's
    instances (ONNX Runtime sessions, each computing a batch at once): KIND_GPU on
    settings.cuda_device_id when the model runs on CUDA, else KIND_CPU. dynamic_batching carries
    the model's max_queue_delay_s; cnnserve has no preferred batch sizes.
    """
    settings = state.settings
    gpu = model.provider == CUDA_PROVIDER
    # The model's effective values (its config.yaml over the settings), where an engine serves it.
    serving = model.serving
    max_batch = serving.max_batch_size if serving else settings.max_batch_size
    queue_delay_s = serving.max_queue_delay_s if serving else settings.max_queue_delay_s
    classes = [model.num_classes]
    return mc.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=min(max_batch, settings.max_images_per_request),
        input=[
            mc.ModelInput(
                name=input_name(model),
                data_type=_CONFIG_DATATYPES[np.dtype(model.input_dtype).name],
                format=mc.ModelInput.FORMAT_NCHW,
                dims=list(model.input_shape),
            )
        ],
        output=[
            mc.ModelOutput(name=output_name(model), data_type=mc.TYPE_FP32, dims=classes),
            mc.ModelOutput(name=PROBABILITIES, data_type=mc.TYPE_FP32, dims=classes),
            *(
                mc.ModelOutput(name=features, data_type=mc.TYPE_FP32, dims=[features_dim(model)])
                for features in [features_name(model)]
                if features is not None
            ),
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=round(queue_delay_s * 1_000_000)
        ),
        instance_group=[
            mc.ModelInstanceGroup(
                name=model.name,
                kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
                count=serving.instances if serving else state.settings.instances,
                gpus=[settings.cuda_device_id] if gpu else [],
            )
        ],
    )


class _Samples:
    """The current samples of one Prometheus metric whose name ends in `suffix` (`_total` of a
    counter, `_count` or `_sum` of a histogram), read once per RPC."""

    def __init__(self, metric: Any, suffix: str) -> None:
        self._samples: list[tuple[dict[str, str], float]] = [
            (sample.labels, float(sample.value))
            for family in metric.collect()
            for sample in family.samples
            if sample.name == family.name + suffix
        ]

    def total(self, model: str, **match: Collection[str]) -> float:
        """The sum over the samples of `model` whose other labels take one of the `match` values."""
        return sum(
            value
            for labels, value in self._samples
            if labels.get("model") == model and all(labels.get(k) in v for k, v in match.items())
        )


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _duration(count: float, seconds: float) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=max(0, round(count)), ns=_ns(seconds))


def model_statistics(models: Sequence[LoadedModel]) -> list[pb.ModelStatistics]:
    """Triton's ModelStatistics of each model version, read from the server's Prometheus metrics
    (service/observability/metrics.py). The metrics are labelled by model name, not version: with
    several versions of one model loaded, each version's entry carries the totals of all of them.

    * inference_count: cnnserve_images_total (images classified, every RPC of the engine).
    * execution_count: cnnserve_batch_size count (ONNX Runtime runs).
    * success.count: cnnserve_requests_total with code OK, fail.count: with any other code, of the
      RPCs that run the engine (INFERENCE_METHODS; ClassifyStream counts items). success.ns:
      cnnserve_request_duration_seconds sum of those RPCs, failed calls included (the latency
      histogram has no code label); fail.ns: 0.
    * queue: cnnserve_queue_wait_seconds (count: requests taken into a batch).
    * compute_input: cnnserve_decode_duration_seconds + cnnserve_preprocess_duration_seconds
      (count: images decoded and preprocessed on the server; raw tensors add nothing).
    * compute_infer: cnnserve_inference_duration_seconds (count: batches, not requests, so
      ns / count is the time of one batch, the time each request in it waited for the model).
    * compute_output: 0 (the softmax and serialisation are not measured).
    * last_inference: 0 (no metric records when); batch_stats: empty (cnnserve_batch_size's
      buckets merge batch sizes, and no duration is kept per size).
    """
    images_total = _Samples(metrics.IMAGES, "_total")
    batches = _Samples(metrics.BATCH_SIZE, "_count")
    requests = _Samples(metrics.REQUESTS, "_total")
    request_seconds = _Samples(metrics.REQUEST_DURATION, "_sum")
    queue_count, queue_seconds = _Samples(metrics.QUEUE_WAIT, "_count"), _Samples(metrics.QUEUE_WAIT, "_sum")
    decode_seconds = _Samples(metrics.DECODE_DURATION, "_sum")
    preprocess_count = _Samples(metrics.PREPROCESS_DURATION, "_count")
    preprocess_seconds = _Samples(metrics.PREPROCESS_DURATION, "_sum")
    infer_count = _Samples(metrics.INFERENCE_DURATION, "_count")
    infer_seconds = _Samples(metrics.INFERENCE_DURATION, "_sum")
    failed_codes = [code.name for code in grpc.StatusCode if code is not grpc.StatusCode.OK]

    stats = []
    for m in models:
        name = m.name
        stats.append(
            pb.ModelStatistics(
                name=name,
                version=str(m.version),
                inference_count=round(images_total.total(name)),
                execution_count=round(batches.total(name)),
                inference_stats=pb.InferStatistics(
                    success=_duration(
                        requests.total(name, method=INFERENCE_METHODS, code=["OK"]),
                        request_seconds.total(name, method=INFERENCE_METHODS),
                    ),
                    fail=_duration(requests.total(name, method=INFERENCE_METHODS, code=failed_codes), 0.0),
                    queue=_duration(queue_count.total(name), queue_seconds.total(name)),
                    compute_input=_duration(
                        preprocess_count.total(name),
                        decode_seconds.total(name) + preprocess_seconds.total(name),
                    ),
                    compute_infer=_duration(infer_count.total(name), infer_seconds.total(name)),
                    compute_output=pb.StatisticDuration(),
                ),
            )
        )
    return stats


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "unimplemented"


_NO_MANAGEMENT = (
    "cnnserve has no model management API: models are read once at startup from --repository "
    "(--models chooses which); restart the server to change them"
)
_NO_SHARED_MEMORY = (
    "cnnserve has no shared memory: send inputs in raw_input_contents and read outputs from "
    "raw_output_contents"
)
# Triton's additions to inference.GRPCInferenceService that this server does not serve, with what
# it answers (UNIMPLEMENTED). They are not in grpc_predict_v2.proto, so reflection does not list them.
TRITON_UNIMPLEMENTED = {
    "ModelStreamInfer": "streaming inference is not supported: call ModelInfer (concurrent calls are "
    "batched together), or cnnserve.v1.Inference/ClassifyStream",
    "RepositoryModelLoad": _NO_MANAGEMENT,
    "RepositoryModelUnload": _NO_MANAGEMENT,
    "SystemSharedMemoryStatus": _NO_SHARED_MEMORY,
    "SystemSharedMemoryRegister": _NO_SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryStatus": _NO_SHARED_MEMORY,
    "CudaSharedMemoryRegister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "TraceSetting": "cnnserve has no request tracing: see its Prometheus metrics and per-request Timings",
    "LogSettings": "log settings are fixed at startup: --log-level and --log-format",
}
_STREAMING = frozenset({"ModelStreamInfer"})


def _unimplemented_handler(method: str, message: str) -> grpc.RpcMethodHandler:
    """A handler answering UNIMPLEMENTED `message`; it reads no request (no deserializer), so any
    body gets the same clear answer, and counts the call in the request metrics."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(rpc: Rpc) -> Any:
            raise Unimplemented(f"inference.GRPCInferenceService/{method} is not implemented: {message}")

        return await unary(method, context, work)

    if method in _STREAMING:

        async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await refuse(None, context)
            yield b""  # never reached: refuse always aborts; the yield makes this a response stream

        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


def add_triton_unimplemented_to_server(server: grpc.aio.Server) -> None:
    """Answer TRITON_UNIMPLEMENTED's methods with UNIMPLEMENTED and their message (instead of gRPC's
    bare "Method not found!")."""
    service_name = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    handler = grpc.method_handlers_generic_handler(
        service_name,
        {method: _unimplemented_handler(method, message) for method, message in TRITON_UNIMPLEMENTED.items()},
    )
    server.add_generic_rpc_handlers((handler,))
