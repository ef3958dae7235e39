"""The client's gRPC channel: the default channel arguments, the retry policy they carry (why each
status is retried or not: service.client's docstring, "Retry policy"), and the hint the command-line
tools add when no gRPC server was reached at all."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import grpc

INFERENCE_SERVICE = "cnnserve.v1.Inference"
DEFAULT_ADDRESS = "localhost:8500"
# The client commands' default server; the server's own settings never read it (they have no
# `address` field: `cnnserve serve` binds --host and --grpc-port).
ADDRESS_ENV = "CNNSERVE_ADDRESS"
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
# retry policy (service.client's docstring), also used by `cnnserve score` and the docs.
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
    """The documented default channel arguments (see service.client's docstring)."""
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


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    """--address of a client command: host:port of the server's gRPC port, by default
    $CNNSERVE_ADDRESS when it is set and not empty, else localhost:8500 (`make serve`'s). Read when
    the parser is built (by `cnnserve`'s main), so the help shows the default in force."""
    from_env = os.environ.get(ADDRESS_ENV)
    if from_env:
        parser.add_argument(
            "--address", default=from_env, help=f"server host:port (default %(default)s, from ${ADDRESS_ENV})"
        )
    else:
        parser.add_argument(
            "--address",
            default=DEFAULT_ADDRESS,
            help=f"server host:port (default %(default)s, or ${ADDRESS_ENV} when set)",
        )


def connection_hint(address: str) -> str:
    """The line the command-line tools add to a not_connected failure."""
    return f"is cnnserve serving gRPC at {address}? (the metrics port is not the gRPC port)"
