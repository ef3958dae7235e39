"""What the client hands back: the result types, `CnnserveError`, and the protobuf -> result
conversions (the one place a wire status number becomes a grpc.StatusCode on this side)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from service._proto.cnnserve.v1 import inference_pb2 as pb


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
    # The version's weights are untrained (the demo's random weights): the classes mean nothing.
    untrained: bool = False


@dataclass(frozen=True)
class StreamResult:
    """One answer of classify_stream: `result` on success, else `error` (a CnnserveError)."""

    id: str
    result: ClassifyResult | None = None
    error: CnnserveError | None = None


def scores(classes: Iterable[pb.ClassScore]) -> tuple[ClassScore, ...]:
    return tuple(ClassScore(c.index, c.label, c.probability) for c in classes)


def timings(t: pb.Timings) -> Timings:
    return Timings(
        t.decode_seconds, t.preprocess_seconds, t.queue_seconds, t.inference_seconds, t.total_seconds
    )


# What the client says of an answer with `untrained` set (the server logs the same words).
UNTRAINED_WARNING = "untrained demo weights: answers are meaningless"


def classify_result(response: pb.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(
        response.model,
        response.version,
        scores(response.classes),
        timings(response.timings),
        untrained=response.untrained,
    )


def call_error(exc: grpc.RpcError) -> CnnserveError:
    """A failed call's grpc.RpcError as a CnnserveError."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return CnnserveError(code, details or "")


def stream_result(response: pb.ClassifyStreamResponse) -> StreamResult:
    if response.WhichOneof("outcome") == "result":
        return StreamResult(response.id, result=classify_result(response.result))
    code = status_code(response.error.code)
    return StreamResult(response.id, error=CnnserveError(code, response.error.message))


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a status number carried in a message (a stream item's error)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)
