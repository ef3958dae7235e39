"""Errors that carry their gRPC status, and the one place that turns any exception into a status.

Domain code raises these; servicers catch everything and call `status_of`. Anything that is not a
ServiceError is a bug: it is logged with its traceback and answered INTERNAL with a generic message,
so a client never sees UNKNOWN or a stack trace.
"""

from __future__ import annotations

import logging

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
