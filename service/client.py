"""A small synchronous Python client for cnnserve.v1.Inference.

    from service.client import CnnserveClient

    with CnnserveClient("localhost:8500") as client:
        result = client.classify(Path("cat.jpg").read_bytes(), model="resnet50", top_k=3)
        print(result.classes[0].label, result.classes[0].probability)

Images are encoded bytes (JPEG/PNG/WebP) or a path to such a file, sent as they are; a PIL image
or a uint8 numpy array of pixels ([H, W] grayscale, [H, W, C] with C 1, 3 or 4), encoded as PNG
(lossless: the server sees exactly these pixels); or a preprocessed numpy array (float32/float16,
[C, H, W] or [1, C, H, W]).

The default channel configuration (`default_channel_options`):

* load balancing `round_robin`: with a `dns:///name:port` target that resolves to several
  replicas (e.g. a Kubernetes headless service) calls spread over all of them;
* retries (`DEFAULT_SERVICE_CONFIG`, see "Retry policy" below) of UNAVAILABLE and CANCELLED for
  the unary RPCs: up to 4 attempts for classification and metadata, 2 for the gradient RPCs;
* keepalive pings every 30 s (timeout 10 s), also between calls: above the server's
  keepalive_min_client_ping_s (10 s by default), so the server never answers "too_many_pings";
* message limits of 64 MiB each way, matching the server's default max_message_bytes.

Errors are raised as `CnnserveError` with the gRPC status code and the server's message.

Retry policy (what a rolling update needs to lose nothing; tests/integration/test_rolling_update.py):

* Retried: UNAVAILABLE (a replica still loading or draining, "server is shutting down", a refused
  or reset connection, a crashed gradient worker) and CANCELLED. Our server never answers a call
  CANCELLED on purpose: it comes from a replica's graceful stop, which cancels the calls that had
  reached it but were not yet handed to a handler (gRPC core kills them when shutdown starts, so
  they never ran), and the calls still running when the grace period ends. A CANCELLED the
  caller asked for (call.cancel(), a deadline) is never retried by gRPC.
* Every retried RPC is idempotent: classification and metadata are pure reads, a gradient job
  has no side effects. Gradient jobs cost seconds of CPU, so they get 2 attempts (one retry; every
  attempt is a new round_robin pick, so usually another replica) against 4 for the rest: an input
  that crashes a worker is retried at most once (a server answers INTERNAL once it crashed twice).
* Not retried: RESOURCE_EXHAUSTED (a full queue or cost budget: an automatic retry by every
  client would multiply the load exactly when the server sheds it; gRPC also uses it for
  deterministic limits such as an oversize message); DEADLINE_EXCEEDED; streams (ClassifyStream,
  Dream, Stylize: an item or progress message may already have been answered; `cnnserve score`
  reopens its stream and re-sends the unanswered items itself, so the two never multiply).
* Backoff: gRPC waits a random 0..min(0.1 s x 2^n, 1 s) before attempt n+1, and the call's
  deadline covers every attempt. The per-call retry buffer is the message limit (gRPC's default,
  256 KiB, would silently make a request larger than that, one 224x224 float32 tensor say,
  unretryable).
"""

from __future__ import annotations

import io
import json
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc
import numpy as np
from PIL import Image

from ._proto.cnnserve.v1 import inference_pb2 as pb
from ._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

ImageLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray, Image.Image]

INFERENCE_SERVICE = "cnnserve.v1.Inference"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_KEEPALIVE_S = 30.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 10.0

OIP_SERVICE = "inference.GRPCInferenceService"
RETRYABLE_STATUS_CODES = ("UNAVAILABLE", "CANCELLED")
# The unary RPCs, by cost; the streaming ones (ClassifyStream, Dream, Stylize) are not retried.
CHEAP_UNARY_METHODS = ("Classify", "ClassifyBatch", "ListModels", "GetModel")
GRADIENT_UNARY_METHODS = ("Explain", "DreamUnary", "StylizeUnary")


def _retry_policy(max_attempts: int) -> dict[str, Any]:
    return {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(RETRYABLE_STATUS_CODES),
    }


# The gRPC service config of default_channel_options(): the single source of truth of the client
# retry policy (module docstring), also used by `cnnserve score` and the docs.
DEFAULT_SERVICE_CONFIG: dict[str, Any] = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [
                *({"service": INFERENCE_SERVICE, "method": method} for method in CHEAP_UNARY_METHODS),
                {"service": OIP_SERVICE},  # every OIP RPC is unary and idempotent
            ],
            "retryPolicy": _retry_policy(4),
        },
        {
            "name": [{"service": INFERENCE_SERVICE, "method": method} for method in GRADIENT_UNARY_METHODS],
            "retryPolicy": _retry_policy(2),
        },
    ],
}


def default_channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_s: float = DEFAULT_KEEPALIVE_S,
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S,
) -> list[tuple[str, Any]]:
    """The documented default channel arguments (see the module docstring)."""
    return [
        ("grpc.service_config", json.dumps(DEFAULT_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        # A call stays retryable only while its request fits this buffer (gRPC default 256 KiB).
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keepalive pings go out even when no data was sent since the last one.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class CnnserveError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Timings:
    decode_s: float
    preprocess_s: float
    queue_s: float
    inference_s: float
    total_s: float


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    version: int
    classes: tuple[ClassScore, ...]
    timings: Timings | None = None


@dataclass(frozen=True)
class StreamResult:
    """One answer of classify_stream: `result` on success, else `error` (a CnnserveError)."""

    id: str
    result: ClassifyResult | None = None
    error: CnnserveError | None = None


# Modes PNG stores as they are; any other (CMYK, YCbCr, F, ...) is converted to RGB first.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16"})


def _png(image: Image.Image) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    # Level 1: lossless all the same, and several times faster to encode than the default 6; the
    # few percent of extra bytes cost less than the CPU on any network worth serving over.
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _pixels(array: np.ndarray) -> Image.Image:
    """A uint8 [H, W] or [H, W, C] (C 1, 3, 4: L, RGB, RGBA) array as a PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(
            f"uint8 pixels must be [H, W] or [H, W, C] with C 1, 3 or 4, got shape {list(array.shape)} "
            "(a preprocessed tensor is float32 or float16)"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def image_input(image: ImageLike) -> pb.ImageInput:
    """An image as an ImageInput message: encoded bytes or a file path as they are, a PIL image or
    uint8 pixels as a PNG, a float32/float16 array as a preprocessed tensor (module docstring)."""
    if isinstance(image, Image.Image):
        return pb.ImageInput(encoded=_png(image))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            return pb.ImageInput(encoded=_png(_pixels(image)))
        if image.dtype not in (np.float32, np.float16):
            raise TypeError(
                f"array images must be uint8 pixels or a float32/float16 tensor, got {image.dtype}"
            )
        data = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder("<"))
        return pb.ImageInput(
            tensor=pb.Tensor(shape=list(data.shape), dtype=data.dtype.name, data=data.tobytes())
        )
    if isinstance(image, bytes | bytearray | memoryview):
        return pb.ImageInput(encoded=bytes(image))
    if isinstance(image, str | os.PathLike):
        return pb.ImageInput(encoded=Path(image).read_bytes())
    raise TypeError(f"unsupported image type {type(image).__name__}")


def _scores(classes: Iterable[pb.ClassScore]) -> tuple[ClassScore, ...]:
    return tuple(ClassScore(c.index, c.label, c.probability) for c in classes)


def _timings(t: pb.Timings) -> Timings:
    return Timings(
        t.decode_seconds, t.preprocess_seconds, t.queue_seconds, t.inference_seconds, t.total_seconds
    )


def _result(response: pb.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(
        response.model, response.version, _scores(response.classes), _timings(response.timings)
    )


def _error(exc: grpc.RpcError) -> CnnserveError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return CnnserveError(code, details or "")


class CnnserveClient:
    """Synchronous client; thread-safe (one channel, shared). Use as a context manager or close()."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float | None = 30.0,
        options: Sequence[tuple[str, Any]] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """`address` is any gRPC target ("host:port", "dns:///name:port"); `timeout_s` the default
        deadline of every call (None: no deadline); `options` replaces default_channel_options()."""
        channel_options = list(default_channel_options() if options is None else options)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=channel_options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=channel_options)
        self._stub = pb_grpc.InferenceStub(self._channel)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CnnserveClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def classify(
        self,
        image: ImageLike,
        *,
        model: str,
        version: int = 0,
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> ClassifyResult:
        """The top_k classes of one image (top_k 0: the server default, 5)."""
        request = pb.ClassifyRequest(model=model, version=version, top_k=top_k, image=image_input(image))
        try:
            return _result(self._stub.Classify(request, timeout=self._timeout(timeout_s)))
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def classify_batch(
        self,
        images: Sequence[ImageLike],
        *,
        model: str,
        version: int = 0,
        top_k: int = 0,
        timeout_s: float | None = None,
    ) -> list[ClassifyResult]:
        """One result per image, in order; one bad image fails the call (CnnserveError)."""
        request = pb.ClassifyBatchRequest(
            model=model, version=version, top_k=top_k, images=[image_input(i) for i in images]
        )
        try:
            response = self._stub.ClassifyBatch(request, timeout=self._timeout(timeout_s))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        timings = _timings(response.timings)
        return [
            ClassifyResult(response.model, response.version, _scores(r.classes), timings)
            for r in response.results
        ]

    def classify_stream(
        self,
        images: Iterable[tuple[str, ImageLike]],
        *,
        model: str,
        version: int = 0,
        top_k: int = 0,
        timeout_s: float | None = None,
        stream_timeout_s: float | None = None,
    ) -> Iterator[StreamResult]:
        """Classify (id, image) pairs over one stream; yields one StreamResult per pair as each
        completes (not necessarily in order). Per-item failures come back as StreamResult.error;
        a failure of the whole stream raises CnnserveError. `images` is consumed lazily, from a
        background thread, so it may be a generator producing images as they arrive.

        `timeout_s` is each item's deadline (default: the client's), counted from when the stream
        takes the item: an item not answered in time comes back as a DEADLINE_EXCEEDED error and
        its late answer is dropped. The stream itself has no deadline unless `stream_timeout_s`
        is given (the server still gives each item at most its max_deadline_s). Ids must be unique
        among the items in flight (ValueError).

        The caller's own errors (an item that is not an (id, image) pair: TypeError; a missing
        file: FileNotFoundError; ...) are raised as they are, never as a CnnserveError.
        """
        stream = _ItemStream(self._timeout(timeout_s))

        def requests() -> Iterator[pb.ClassifyStreamRequest]:
            try:
                for item in images:
                    item_id, image = _pair(item)
                    request = pb.ClassifyStreamRequest(
                        id=item_id,
                        request=pb.ClassifyRequest(
                            model=model, version=version, top_k=top_k, image=image_input(image)
                        ),
                    )
                    stream.sending(item_id)
                    yield request
            except GeneratorExit:  # gRPC dropped the iterator: the call is over already
                raise
            except BaseException as exc:
                # gRPC would swallow this and fail the call UNKNOWN ("Exception iterating
                # requests!"): hand it to the caller's thread instead, ahead of that failure.
                stream.events.put(("caller_error", exc))
                raise
            stream.events.put(("exhausted", None))

        call = self._stub.ClassifyStream(requests(), timeout=stream_timeout_s)
        reader = threading.Thread(
            target=_read_responses, args=(call, stream.events), daemon=True, name="classify-stream"
        )
        reader.start()
        try:
            yield from stream.results()
        finally:
            call.cancel()

    def list_models(self, *, timeout_s: float | None = None) -> list[pb.ModelInfo]:
        """Every loaded model version (the ModelInfo protobuf messages)."""
        try:
            return list(
                self._stub.ListModels(pb.ListModelsRequest(), timeout=self._timeout(timeout_s)).models
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def get_model(
        self, name: str, *, version: int = 0, include_labels: bool = False, timeout_s: float | None = None
    ) -> pb.ModelInfo:
        """One model version's metadata (version 0: the latest)."""
        request = pb.GetModelRequest(name=name, version=version, include_labels=include_labels)
        try:
            info: pb.ModelInfo = self._stub.GetModel(request, timeout=self._timeout(timeout_s))
            return info
        except grpc.RpcError as exc:
            raise _error(exc) from None


def _pair(item: object) -> tuple[str, ImageLike]:
    if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1]
    shown = repr(item)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise TypeError(f"classify_stream takes (id, image) pairs with a str id, got {shown}")


def _read_responses(call: Any, events: queue.SimpleQueue[tuple[str, Any]]) -> None:
    try:
        for response in call:
            events.put(("response", response))
        events.put(("end", None))
    except grpc.RpcError as exc:
        events.put(("broken", exc))


class _ItemStream:
    """classify_stream's bookkeeping: when each item in flight was taken, and the events of the
    call (responses, its end, the request iterator's end or failure) in arrival order. The wire
    API has no per-item deadline, so it is kept here: answers are awaited with a timeout."""

    def __init__(self, item_timeout_s: float | None) -> None:
        self.item_timeout_s = item_timeout_s
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sent: dict[str, float] = {}  # id -> time.monotonic() when taken; insertion order
        self._expired: set[str] = set()  # answered DEADLINE_EXCEEDED here, maybe still computing

    def sending(self, item_id: str) -> None:
        """Called from gRPC's request thread just before the item goes out."""
        with self._lock:
            if item_id in self._sent:
                raise ValueError(f"id {item_id!r} is already in flight: ids must be unique")
            self._sent[item_id] = time.monotonic()

    def _wait_s(self) -> float | None:
        with self._lock:
            oldest = next(iter(self._sent.values()), None)
        if oldest is None or self.item_timeout_s is None:
            return None
        return max(0.0, oldest + self.item_timeout_s - time.monotonic())

    def _expire(self) -> list[str]:
        if self.item_timeout_s is None:
            return []
        limit = time.monotonic() - self.item_timeout_s
        with self._lock:
            expired = [item_id for item_id, sent in self._sent.items() if sent <= limit]
            for item_id in expired:
                del self._sent[item_id]
            self._expired.update(expired)
        return expired

    def results(self) -> Iterator[StreamResult]:
        exhausted = False
        while True:
            with self._lock:
                idle = not self._sent
                abandoned = bool(self._expired)
            # Everything sent is answered: wait for the server's end of the stream, unless an
            # expired item may keep the server busy for up to its max_deadline_s.
            if exhausted and idle and abandoned:
                return
            try:
                kind, payload = self.events.get(timeout=self._wait_s())
            except queue.Empty:
                kind, payload = "tick", None
            if kind == "response":
                with self._lock:
                    known = self._sent.pop(payload.id, None) is not None
                    self._expired.discard(payload.id)
                if known:
                    yield _stream_result(payload)
            elif kind == "exhausted":
                exhausted = True
            elif kind == "caller_error":
                raise payload
            elif kind == "broken":
                raise _error(payload) from None
            elif kind == "end":
                # Every item gets one result: one the server never answered did not get classified.
                with self._lock:
                    unanswered, self._sent = list(self._sent), {}
                for item_id in unanswered:
                    error = CnnserveError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream first")
                    yield StreamResult(item_id, error=error)
                return
            for item_id in self._expire():
                message = f"no answer within {self.item_timeout_s:g} s"
                yield StreamResult(item_id, error=CnnserveError(grpc.StatusCode.DEADLINE_EXCEEDED, message))


def _stream_result(response: pb.ClassifyStreamResponse) -> StreamResult:
    if response.WhichOneof("outcome") == "result":
        return StreamResult(response.id, result=_result(response.result))
    code = _status_code(response.error.code)
    return StreamResult(response.id, error=CnnserveError(code, response.error.message))


# What gRPC core says when it could not reach a gRPC server at all: a refused connection, a name
# that does not resolve, or a peer that does not speak HTTP/2 (the metrics port answers HTTP/1.1:
# "Expected SETTINGS frame ..., got frame type 79"). cnnserve's own UNAVAILABLE messages (loading,
# draining) never contain these.
_NOT_CONNECTED_MARKERS = (
    "connections to all backends failing",
    "failed to connect to all addresses",
    "dns resolution failed",
    "failed parsing http/2",
)


def not_connected(code: grpc.StatusCode, message: str) -> bool:
    """Whether a failure means no gRPC server was reached at all (see connection_hint)."""
    lowered = message.lower()
    return code == grpc.StatusCode.UNAVAILABLE and any(m in lowered for m in _NOT_CONNECTED_MARKERS)


def connection_hint(address: str) -> str:
    """The line the command-line tools add to a not_connected failure."""
    return f"is cnnserve serving gRPC at {address}? (the metrics port is not the gRPC port)"


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)
