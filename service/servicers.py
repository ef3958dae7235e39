"""The cnnserve.v1.Inference servicer: protobuf -> domain -> engine -> protobuf, nothing more.

Every RPC goes through `Rpc`, which keeps the per-RPC metrics (requests by code, latency,
in-flight, rejections by reason) and turns every exception into a status with
`errors.status_of` -> `context.abort`: a client never sees UNKNOWN or a traceback.

The engine is used only through the interface in docs/SERVICE_INTERFACES.md (`Engine` below is
that interface as a Protocol, so tests can pass a double).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from export.preprocessing import describe_input
from service import errors, images
from service.errors import RESPONSE_LIMIT, DeadlineExceeded, InvalidArgument, Unavailable, checked_response
from service.gradients import GradientRpcs, served_capabilities
from service.observability.metrics import INFLIGHT, REJECTIONS, REQUEST_DURATION, REQUESTS, child
from service.settings import Settings

from ._proto.cnnserve.v1 import inference_pb2 as pb
from ._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from service.catalog import LoadedModel
    from service.classify.engine import Timings

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
T = TypeVar("T")

# Wire dtype names a client may use for a raw tensor -> little-endian numpy dtype.
TENSOR_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "fp32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "fp16": np.dtype("<f2"),
}

# What this server serves per model, as ModelInfo.capabilities. The gradient RPCs add theirs when
# the server runs a worker pool (service.gradients.served_capabilities); a model's metadata.json
# alone never advertises an RPC the server does not serve.
CAPABILITY_ENUM = {
    "classify": pb.CAPABILITY_CLASSIFY,
    "explain": pb.CAPABILITY_EXPLAIN,
    "dream": pb.CAPABILITY_DREAM,
    "stylize": pb.CAPABILITY_STYLIZE,
}
SERVED_CAPABILITIES = frozenset({"classify"})


class Engine(Protocol):
    """The classification engine as the servicers use it (service.classify.engine)."""

    @property
    def ready(self) -> bool: ...

    def models(self) -> list[LoadedModel]: ...

    def get(self, name: str, version: int | None = None) -> LoadedModel: ...

    async def classify_images(
        self, model: LoadedModel, images: list[bytes], deadline: float | None
    ) -> tuple[np.ndarray, Timings]: ...

    async def classify_tensors(
        self, model: LoadedModel, batch: np.ndarray, deadline: float | None
    ) -> tuple[np.ndarray, Timings]: ...

    async def infer(
        self, model: LoadedModel, batch: np.ndarray, deadline: float | None
    ) -> tuple[np.ndarray, Timings]: ...


class ServingState:
    """What every servicer needs to know about the server: the engine, the settings, and whether
    requests are accepted (engine warmed up and not shutting down)."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self.draining = False
        # The gradient pool (service.worker.pool.GradientPool); None when workers=0.
        self.gradients: Any = None

    @property
    def ready(self) -> bool:
        return self.engine.ready and not self.draining

    def check_ready(self) -> None:
        """Raise Unavailable unless requests are being accepted."""
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica", reason="shutting_down")
        if not self.engine.ready:
            raise Unavailable("server is starting: models are still loading", reason="not_ready")

    def deadline(self, context: grpc.aio.ServicerContext, *, cap_longer: bool = False) -> float:
        """The call's deadline as an absolute time.monotonic().

        A call without a deadline gets max_deadline_s. A deadline longer than max_deadline_s is a
        request over a cap: InvalidArgument naming it (the client asked for more time than this
        server grants; it learns so at once instead of being cut off later). `cap_longer=True`
        caps it instead: for the items of a ClassifyStream, whose deadline bounds the whole
        stream, not one item. Raises DeadlineExceeded when the deadline has already passed.
        """
        cap = self.settings.max_deadline_s
        remaining = context.time_remaining()
        # gRPC rounds a deadline up when it encodes it (grpc-timeout keeps about three significant
        # digits: 30 s arrives as 30.1 s, 600 s as 601 s, 3600 s as 3610 s), so a client asking for
        # exactly the cap is not refused: only what exceeds it by more than that rounding.
        if remaining is not None and remaining > cap * 1.01 + 0.1 and not cap_longer:
            raise InvalidArgument(
                f"the call's deadline is {remaining:.0f} s away; max_deadline_s is {cap:g} s "
                "(send a shorter deadline, or none to get max_deadline_s)",
                reason="deadline_too_long",
            )
        if remaining is None or remaining > cap:
            remaining = cap
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the request was handled", reason="deadline")
        return time.monotonic() + float(remaining)

    def check_image_count(self, count: int) -> None:
        cap = self.settings.max_images_per_request
        if count > cap:
            raise InvalidArgument(
                f"{count} images in one request; max_images_per_request is {cap}", reason="too_many_images"
            )

    def resolve_model(self, name: str, version: int) -> LoadedModel:
        """The loaded model for a request's (name, version); version 0 means the latest."""
        if not name:
            raise InvalidArgument("model is required (see ListModels)", reason="invalid_argument")
        if version < 0:
            raise InvalidArgument(
                f"version must be >= 0 (0 = latest), got {version}", reason="invalid_argument"
            )
        return self.engine.get(name, version or None)


# How close to its deadline a cancelled call counts as expired rather than cancelled (see
# Rpc.cancelled): generous for a loaded machine, far below any deadline worth setting.
DEADLINE_SLACK_S = 0.25


class Rpc:
    """Metrics and error mapping of one RPC (or of one item of a stream).

    `model` is the label for the metrics: set it once the model is resolved. Until then it is "",
    so a client sending made-up model names cannot blow up the label cardinality.
    """

    __slots__ = ("method", "model", "_start")

    def __init__(self, method: str) -> None:
        self.method = method
        self.model = ""
        self._start = time.perf_counter()

    def succeeded(self) -> None:
        self._record(grpc.StatusCode.OK, None)

    def failed(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """Record a failure; returns the (code, client-safe message) to answer with."""
        code, message, reason = errors.status_of(exc)
        self._record(code, None if code == grpc.StatusCode.INTERNAL else reason)
        return code, message

    def cancelled(self, context: grpc.aio.ServicerContext) -> None:
        """The call ended under us: the client cancelled it or its deadline passed.

        A client whose own deadline fires cancels the stream (RST_STREAM, seen here as a plain
        cancellation) while the server's copy of that deadline, started when the headers arrived,
        still has about one header transit to run. So a cancellation that lands within
        DEADLINE_SLACK_S of the deadline is counted as the deadline expiry it is.
        """
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            self._record(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
        else:
            self._record(grpc.StatusCode.CANCELLED, "cancelled")

    def _record(self, code: grpc.StatusCode, reason: str | None) -> None:
        child(REQUESTS, self.method, self.model, code.name).inc()
        child(REQUEST_DURATION, self.method, self.model).observe(time.perf_counter() - self._start)
        if reason is not None:
            child(REJECTIONS, self.method, self.model, reason).inc()


async def unary(method: str, context: grpc.aio.ServicerContext, work: Callable[[Rpc], Awaitable[T]]) -> T:
    """Run one unary RPC's `work` with metrics; any exception becomes `context.abort`."""
    rpc = Rpc(method)
    inflight = child(INFLIGHT, method)
    inflight.inc()
    try:
        response = checked_response(await work(rpc))
    except asyncio.CancelledError:
        rpc.cancelled(context)
        raise
    except Exception as exc:  # noqa: BLE001 - the one place every error becomes a status
        code, message = rpc.failed(exc)
        await context.abort(code, message)
        raise AssertionError("context.abort returned") from None  # abort always raises
    else:
        rpc.succeeded()
        return response
    finally:
        inflight.dec()


# Services whose malformed requests are counted in the request metrics (method = the short name).
_COUNTED_SERVICES = ("cnnserve.v1.Inference", "inference.GRPCInferenceService")


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Parses every request message inside the handler, so a body that is not a valid protobuf
    message is answered INVALID_ARGUMENT naming the message type.

    Without it grpc.aio parses the body before any servicer code runs and answers a parse failure
    with UNKNOWN and the parser's exception text. Applies to every service of the server (health
    and reflection too): `grpc.aio.server(interceptors=[MalformedRequestInterceptor(limit)])`.
    Malformed requests to our two APIs are counted (code INVALID_ARGUMENT, reason "malformed",
    model ""). It also sets the call's send limit (`max_response_bytes`, the server's
    max_message_bytes) for `errors.checked_response`.
    """

    def __init__(self, max_response_bytes: int | None = None) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._limit = max_response_bytes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = str(handler_call_details.method)
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = _parsing_handler(handler, method, self._limit)
        return wrapped


def _parsing_handler(
    handler: grpc.RpcMethodHandler, method: str, limit: int | None = None
) -> grpc.RpcMethodHandler:
    """`handler` with the request parsing moved into its behaviour, and `limit` as the call's
    RESPONSE_LIMIT (MalformedRequestInterceptor)."""
    parse = handler.request_deserializer
    message_type = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    type_name = message_type.full_name if message_type is not None else "request"
    service, _, short = method.lstrip("/").rpartition("/")
    counted = service in _COUNTED_SERVICES

    def malformed(context: grpc.aio.ServicerContext, exc: Exception) -> InvalidArgument:
        message = f"malformed request: the body is not a valid {type_name} message ({exc})"
        if counted:
            Rpc(short).failed(InvalidArgument(message, reason="malformed"))
        # For servicers that let the error escape (reflection), grpc.aio answers with this code.
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(message)
        return InvalidArgument(message, reason="malformed")

    async def parse_one(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything a parser raises on bytes
            error = malformed(context, exc)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

    async def parse_stream(
        raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # Raised inside the servicer's own `async for`: ours turn it into the status (ServiceError);
        # a foreign servicer lets it escape and grpc.aio answers the code set in `malformed`.
        async for raw in raws:
            try:
                request = parse(raw)
            except Exception as exc:  # noqa: BLE001
                raise malformed(context, exc) from None
            yield request

    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            RESPONSE_LIMIT.set(limit)  # this call's task only
            result = inner_uu(await parse_one(raw, context), context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            RESPONSE_LIMIT.set(limit)
            result = inner_su(parse_stream(raws, context), context)
            return await result if inspect.isawaitable(result) else result

        return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)
    inner_stream = handler.unary_stream if handler.unary_stream is not None else handler.stream_stream
    request_streaming = handler.unary_stream is None
    if inspect.isasyncgenfunction(inner_stream):

        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            RESPONSE_LIMIT.set(limit)
            request = (
                parse_stream(requests, context) if request_streaming else await parse_one(requests, context)
            )
            async for response in inner_stream(request, context):
                yield response

    else:  # writes with context.write() and returns None (e.g. health's Watch)

        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            RESPONSE_LIMIT.set(limit)
            request = (
                parse_stream(requests, context) if request_streaming else await parse_one(requests, context)
            )
            return await inner_stream(request, context)

    if request_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=serialize)
    return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=serialize)


def resolve_top_k(requested: int, model: LoadedModel, max_top_k: int) -> int:
    """top_k for a request: 0 means min(5, classes); otherwise 1..min(max_top_k, classes)."""
    limit = min(max_top_k, model.num_classes)
    if requested == 0:
        return min(DEFAULT_TOP_K, limit)
    if not 1 <= requested <= limit:
        raise InvalidArgument(
            f"top_k must be between 1 and {limit} for {model.name} (it has {model.num_classes} classes, "
            f"max_top_k is {max_top_k}), got {requested}",
            reason="invalid_argument",
        )
    return requested


def top_classes(probabilities: np.ndarray, k: int, labels: Sequence[str]) -> list[pb.ClassScore]:
    """The k most probable classes of one probability row, most probable first (ties: lower index)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        pb.ClassScore(
            index=int(i), label=labels[i] if i < len(labels) else "", probability=float(probabilities[i])
        )
        for i in order
    ]


def tensor_from_proto(tensor: pb.Tensor, model: LoadedModel) -> np.ndarray:
    """A request Tensor -> validated (1, C, H, W) array of the model's input dtype."""
    wire = TENSOR_DTYPES.get(tensor.dtype.lower())
    if wire is None:
        raise InvalidArgument(
            f"unsupported tensor dtype {tensor.dtype!r}; use float32 or float16", reason="invalid_argument"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidArgument(f"invalid tensor shape {list(shape)}", reason="invalid_argument")
    expected_bytes = math.prod(shape) * wire.itemsize
    if len(tensor.data) != expected_bytes:
        raise InvalidArgument(
            f"tensor data has {len(tensor.data)} bytes; "
            f"shape {list(shape)} of {wire.name} needs {expected_bytes}",
            reason="invalid_argument",
        )
    arr = np.frombuffer(tensor.data, dtype=wire).reshape(shape)
    if len(shape) == 4 and shape[0] != 1:
        raise InvalidArgument(
            f"one image per ImageInput: shape [C,H,W] or [1,C,H,W], got {list(shape)}",
            reason="invalid_argument",
        )
    return to_model_dtype(arr, model)


def to_model_dtype(arr: np.ndarray, model: LoadedModel) -> np.ndarray:
    """Validate a float tensor against the model's input shape and convert it to the input dtype.

    Finiteness is checked after the conversion too: a float32 value beyond float16's range becomes
    inf for an fp16 model, and that must be refused rather than computed.
    """
    arr = images.check_tensor(
        arr, shape=tuple(model.input_shape), dtype=[np.dtype("float32"), np.dtype("float16")]
    )
    target = np.dtype(model.input_dtype)
    if arr.dtype != target:
        with np.errstate(over="ignore"):
            arr = arr.astype(target)
        arr = images.check_tensor(arr, shape=tuple(model.input_shape), dtype=target)
    return arr


def timings_proto(timings: Timings | None, total_s: float) -> pb.Timings:
    if timings is None:
        return pb.Timings(total_seconds=total_s)
    return pb.Timings(
        decode_seconds=timings.decode_s,
        preprocess_seconds=timings.preprocess_s,
        queue_seconds=timings.queue_s,
        inference_seconds=timings.inference_s,
        total_seconds=total_s,
    )


def model_info(
    model: LoadedModel,
    *,
    versions: Iterable[int],
    ready: bool,
    include_labels: bool = False,
    served: frozenset[str] = SERVED_CAPABILITIES,
) -> pb.ModelInfo:
    meta = model.metadata or {}
    dtype = np.dtype(model.input_dtype).name
    p = model.preprocessing
    capabilities = [
        CAPABILITY_ENUM[name]
        for name in ("classify", "explain", "dream", "stylize")
        if name in served and model.capabilities.get(name, name == "classify")
    ]
    info = pb.ModelInfo(
        name=model.name,
        version=model.version,
        versions=sorted(versions),
        architecture=model.architecture,
        input=pb.TensorSpec(
            name=str(meta.get("input", {}).get("name", "input")), shape=list(model.input_shape), dtype=dtype
        ),
        output=pb.TensorSpec(
            name=str(meta.get("output", {}).get("name", "logits")), shape=[model.num_classes], dtype=dtype
        ),
        num_classes=model.num_classes,
        labels_count=len(model.labels),
        preprocessing=pb.Preprocessing(
            color_mode=p.color_mode, resize=p.resize, crop=p.crop, mean=list(p.mean), std=list(p.std)
        ),
        trained=model.trained,
        trained_on=model.trained_on or "",
        # Repositories exported before metadata.json carried it: derived from the preprocessing.
        input_description=str(meta.get("input", {}).get("description") or describe_input(p)),
        parameters=model.parameters,
        flops=model.flops,
        execution_provider=model.provider,
        capabilities=capabilities,
        ready=ready,
    )
    if include_labels:
        info.labels.extend(model.labels)
    return info


def merge_timings(parts: Sequence[Timings]) -> Timings | None:
    """Timings of a request served by several engine calls running concurrently: decode and
    preprocess work adds up, queue and inference overlap (the longest counts)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return type(parts[0])(
        decode_s=sum(t.decode_s for t in parts),
        preprocess_s=sum(t.preprocess_s for t in parts),
        queue_s=max(t.queue_s for t in parts),
        inference_s=max(t.inference_s for t in parts),
    )


async def first_error_gather(*aws: Awaitable[T]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the others (no orphaned work)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


class InferenceServicer(GradientRpcs, pb_grpc.InferenceServicer):
    """cnnserve.v1.Inference (the gradient RPCs: service.gradients)."""

    def __init__(
        self, state: ServingState, *, served_capabilities: frozenset[str] = SERVED_CAPABILITIES
    ) -> None:
        self._state = state
        self._served = served_capabilities

    # --- classification ----------------------------------------------------------------------

    async def _classify_inputs(
        self, model: LoadedModel, inputs: Sequence[pb.ImageInput], deadline: float
    ) -> tuple[np.ndarray, Timings | None]:
        """Probabilities [n, K] for request images in request order; encoded images and tensors
        may be mixed (they go to the engine as two concurrent calls)."""
        encoded: list[tuple[int, bytes]] = []
        tensors: list[tuple[int, np.ndarray]] = []
        for position, item in enumerate(inputs):
            kind = item.WhichOneof("kind")
            if kind == "encoded":
                encoded.append((position, item.encoded))
            elif kind == "tensor":
                try:
                    tensors.append((position, tensor_from_proto(item.tensor, model)))
                except InvalidArgument as exc:
                    where = f"image {position}: " if len(inputs) > 1 else ""
                    raise InvalidArgument(where + exc.message, reason=exc.reason) from None
            else:
                where = f"image {position}" if len(inputs) > 1 else "image"
                raise InvalidArgument(f"{where} is empty: set `encoded` or `tensor`", reason="empty_image")
        engine = self._state.engine
        calls: list[Awaitable[tuple[np.ndarray, Timings]]] = []
        if encoded:
            calls.append(engine.classify_images(model, [data for _, data in encoded], deadline))
        if tensors:
            calls.append(engine.classify_tensors(model, np.concatenate([t for _, t in tensors]), deadline))
        if len(calls) == 1:  # one kind of input, the usual case: already in request order
            return await calls[0]
        outcomes = await first_error_gather(*calls)
        probabilities = np.empty((len(inputs), model.num_classes), dtype=np.float32)
        groups = [g for g in (encoded, tensors) if g]
        for group, (probs, _) in zip(groups, outcomes, strict=True):
            probabilities[[position for position, _ in group]] = probs
        return probabilities, merge_timings([t for _, t in outcomes])

    async def _classify_one(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, rpc: Rpc
    ) -> pb.ClassifyResponse:
        start = time.perf_counter()
        state = self._state
        state.check_ready()
        model = state.resolve_model(request.model, request.version)
        rpc.model = model.name
        top_k = resolve_top_k(request.top_k, model, state.settings.max_top_k)
        if not request.HasField("image"):
            raise InvalidArgument("image is required", reason="empty_image")
        deadline = state.deadline(context, cap_longer=rpc.method == "ClassifyStream")
        probabilities, timings = await self._classify_inputs(model, [request.image], deadline)
        return pb.ClassifyResponse(
            model=model.name,
            version=model.version,
            classes=top_classes(probabilities[0], top_k, model.labels),
            timings=timings_proto(timings, time.perf_counter() - start),
        )

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await unary("Classify", context, lambda rpc: self._classify_one(request, context, rpc))

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        async def work(rpc: Rpc) -> pb.ClassifyBatchResponse:
            start = time.perf_counter()
            state = self._state
            state.check_ready()
            model = state.resolve_model(request.model, request.version)
            rpc.model = model.name
            top_k = resolve_top_k(request.top_k, model, state.settings.max_top_k)
            if not request.images:
                raise InvalidArgument("images is empty: send at least one image", reason="empty_image")
            state.check_image_count(len(request.images))
            deadline = state.deadline(context)
            probabilities, timings = await self._classify_inputs(model, request.images, deadline)
            return pb.ClassifyBatchResponse(
                model=model.name,
                version=model.version,
                results=[
                    pb.Classification(classes=top_classes(row, top_k, model.labels)) for row in probabilities
                ],
                timings=timings_proto(timings, time.perf_counter() - start),
            )

        return await unary("ClassifyBatch", context, work)

    def _stream_window(self) -> int:
        # Items of one stream classified concurrently: enough to fill a couple of batches, so a
        # single streaming client still gets batched, without one stream taking the whole queue.
        settings = self._state.settings
        return max(1, min(settings.max_queue_size, 2 * settings.max_batch_size))

    async def _stream_item(
        self, item: pb.ClassifyStreamRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyStreamResponse:
        """One stream item -> its response; never raises (errors become the item's status)."""
        rpc = Rpc("ClassifyStream")
        try:
            if not item.HasField("request"):
                raise InvalidArgument("stream item has no request", reason="invalid_argument")
            result = await self._classify_one(item.request, context, rpc)
            response = checked_response(pb.ClassifyStreamResponse(id=item.id, result=result))
        except asyncio.CancelledError:
            rpc.cancelled(context)
            raise
        except Exception as exc:  # noqa: BLE001 - becomes this item's status
            code, message = rpc.failed(exc)
            return pb.ClassifyStreamResponse(id=item.id, error=pb.Status(code=code.value[0], message=message))
        rpc.succeeded()
        return response

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Reads items as they come, classifies up to a window of them concurrently (so they can
        share batches) and answers each as soon as it is done. Exactly one response per item.

        Metrics count items (method="ClassifyStream"); the stream itself shows in the in-flight
        gauge and, when it fails as a whole (not ready at the start, a broken request stream), as
        one request with its code.
        """
        INFLIGHT.labels("ClassifyStream").inc()
        failure: Exception | None = None
        try:
            self._state.check_ready()
            async for response in self._stream(request_iterator, context):
                yield response
        except Exception as exc:  # noqa: BLE001 - whole-stream failures become a status too, never UNKNOWN
            failure = exc
        finally:
            INFLIGHT.labels("ClassifyStream").dec()
        if failure is not None:
            code, message = Rpc("ClassifyStream").failed(failure)
            await context.abort(code, message)

    async def _stream(
        self, request_iterator: AsyncIterator[pb.ClassifyStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        done: asyncio.Queue[pb.ClassifyStreamResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(self._stream_window())
        running: set[asyncio.Task[pb.ClassifyStreamResponse]] = set()
        reader_error: list[BaseException] = []

        def finished(task: asyncio.Task[pb.ClassifyStreamResponse]) -> None:
            running.discard(task)
            window.release()
            if not task.cancelled() and task.exception() is None:
                done.put_nowait(task.result())

        async def read() -> None:
            try:
                async for item in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(self._stream_item(item, context))
                    running.add(task)
                    task.add_done_callback(finished)
            except DecodeError as exc:
                # grpc.aio parses stream items as they are read, so a malformed one surfaces here.
                reader_error.append(
                    InvalidArgument(
                        "malformed request: a stream item is not a valid "
                        f"cnnserve.v1.ClassifyStreamRequest message ({exc})",
                        reason="malformed",
                    )
                )
            except Exception as exc:  # noqa: BLE001 - re-raised by the writer below
                reader_error.append(exc)
            finally:
                done.put_nowait(None)  # end of input

        reader = asyncio.create_task(read())
        try:
            input_ended = False
            while not input_ended or running or not done.empty():
                response = await done.get()
                if response is None:
                    input_ended = True
                    continue
                yield response
            if reader_error:
                raise reader_error[0]
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    # --- models -------------------------------------------------------------------------------

    def _info(self, model: LoadedModel, include_labels: bool = False) -> pb.ModelInfo:
        versions = [m.version for m in self._state.engine.models() if m.name == model.name]
        return model_info(
            model,
            versions=versions,
            ready=self._state.ready,
            include_labels=include_labels,
            served=served_capabilities(self._served, self._state.gradients, model),
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async def work(rpc: Rpc) -> pb.ListModelsResponse:
            return pb.ListModelsResponse(models=[self._info(m) for m in self._state.engine.models()])

        return await unary("ListModels", context, work)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        async def work(rpc: Rpc) -> pb.ModelInfo:
            model = self._state.resolve_model(request.name, request.version)
            rpc.model = model.name
            return self._info(model, include_labels=request.include_labels)

        return await unary("GetModel", context, work)
