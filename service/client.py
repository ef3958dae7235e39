"""A small synchronous Python client for cnnserve.v1.Inference.

    from service.client import CnnserveClient

    with CnnserveClient("localhost:8500") as client:
        result = client.classify(Path("cat.jpg").read_bytes(), model="resnet50", top_k=3)
        print(result.classes[0].label, result.classes[0].probability)

Images are encoded bytes (JPEG/PNG/WebP), a path to such a file, or a preprocessed numpy array
(float32/float16, [C, H, W] or [1, C, H, W]).

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

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc
import numpy as np

from ._proto.cnnserve.v1 import inference_pb2 as pb
from ._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

ImageLike = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]", np.ndarray]

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


def image_input(image: ImageLike) -> pb.ImageInput:
    """An image (encoded bytes, a file path, or a preprocessed array) as an ImageInput message."""
    if isinstance(image, np.ndarray):
        if image.dtype not in (np.float32, np.float16):
            raise TypeError(f"tensor images must be float32 or float16, got {image.dtype}")
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
    ) -> Iterator[StreamResult]:
        """Classify (id, image) pairs over one stream; yields one StreamResult per pair as each
        completes (not necessarily in order). Per-item failures come back as StreamResult.error;
        a failure of the whole stream raises CnnserveError. `images` is consumed lazily, from a
        background thread, so it may be a generator producing images as they arrive.
        """
        errors: list[BaseException] = []

        def requests() -> Iterator[pb.ClassifyStreamRequest]:
            try:
                for item_id, image in images:
                    yield pb.ClassifyStreamRequest(
                        id=item_id,
                        request=pb.ClassifyRequest(
                            model=model, version=version, top_k=top_k, image=image_input(image)
                        ),
                    )
            except BaseException as exc:
                # grpc would swallow this and just half-close; remember it to raise to the caller.
                errors.append(exc)
                raise

        call = self._stub.ClassifyStream(requests(), timeout=self._timeout(timeout_s))
        try:
            for response in call:
                if response.WhichOneof("outcome") == "result":
                    yield StreamResult(response.id, result=_result(response.result))
                else:
                    code = _status_code(response.error.code)
                    yield StreamResult(response.id, error=CnnserveError(code, response.error.message))
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()
        if errors:
            raise errors[0]

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


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status_code(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)
