"""Errors that carry their gRPC status, and the one place that turns any exception into a status.

Domain code raises these; servicers catch everything and call `status_of`. Anything that is not a
ServiceError is a bug: it is logged with its traceback and answered INTERNAL with a generic message,
so a client never sees UNKNOWN or a stack trace.
"""

from __future__ import annotations

import contextvars
import logging
from typing import TypeVar

import grpc

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class: an error with a gRPC status code and a metrics `reason` label."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason: str = "internal"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "invalid_argument"


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "not_found"


class FailedPrecondition(ServiceError):
    """The request is well-formed but the model cannot do it in its present state (e.g. a version
    whose PyTorch network failed the parity self-test is not offered for gradient RPCs)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "failed_precondition"


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "queue_full"


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "deadline"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "unavailable"


class Cancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "cancelled"


class Internal(ServiceError):
    """A known internal failure whose message is safe to show (e.g. a worker crashed twice)."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "internal"


GENERIC_INTERNAL_MESSAGE = "internal error; the server logged the details"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """Map any exception to (status code, client-safe message, metrics reason)."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.reason
    log.error("unexpected error while serving a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL_MESSAGE, "internal"


# --- responses over the send limit ------------------------------------------------------------------

# The send limit (settings.max_message_bytes) of the server handling the current call, set for each
# call by service.frontend.interceptors.MalformedRequestInterceptor. A response over it would fail inside gRPC
# core: RESOURCE_EXHAUSTED with gRPC's own message and a logged traceback, after the call was
# already counted OK. `checked_response` refuses it first, naming the setting.
RESPONSE_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "cnnserve_response_limit", default=None
)


M = TypeVar("M")


def checked_response(message: M) -> M:
    """`message` (a protobuf message) if it fits the current call's send limit; else
    ResourceExhausted naming the limit."""
    limit = RESPONSE_LIMIT.get()
    byte_size = getattr(message, "ByteSize", None)
    if limit is not None and byte_size is not None:
        size = int(byte_size())
        if size > limit:
            raise ResourceExhausted(
                f"the response would be {size} bytes, over this server's max_message_bytes of {limit}; "
                "ask for fewer images, a smaller top_k or smaller outputs",
                reason="response_too_large",
            )
    return message
