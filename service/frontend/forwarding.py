"""The serving tier's side of a separate gradient tier (`cnnserve worker`): `ForwardedGradients`.

With `settings.worker_address` set, `cnnserve serve` starts no local gradient pool: Explain, Dream,
DreamUnary, Stylize, StylizeUnary, FeatureMaps and Filters are forwarded, request as received, over
one grpc.aio channel to the gradient tier (service/frontend/gradient_tier.py), which runs the same
servicer with a `LocalGradients` backend (service/frontend/gradients.py) on its own pool. What crosses
the hop:

- Deadlines: the forwarded call's timeout is the caller's remaining time (a call without a deadline
  gets max_deadline_s, like every call here; see `hop_timeout`), so the worker's pool stops the job
  at the caller's deadline. Both tiers must share max_deadline_s (the shipped ConfigMap does).
- Cancellation: a cancelled caller cancels the handler coroutine, which cancels the forwarded call
  (RST_STREAM); the worker's handler is cancelled in turn and its pool stops the job within a step.
- Status: the worker marks every status it answers itself with the trailing metadata
  `cnnserve-tier: worker`; those come back with code and message unchanged. A status without the
  mark was made by gRPC on this side of the hop (no connection, connection lost, an address that is
  not a cnnserve worker): it is answered UNAVAILABLE with a message that says so (never UNKNOWN or
  INTERNAL), except DEADLINE_EXCEEDED (the caller's own deadline, passed on) and
  RESOURCE_EXHAUSTED (the worker's gRPC concurrency or message-size limits), which keep their code.
- Progress: Dream and Stylize progress messages are relayed one by one as they arrive.

The frontend still counts every forwarded call in its own metrics (cnnserve_requests_total and
friends, labelled with the model when the frontend serves a model of that name, else ""); the
gradient tier counts the jobs (cnnserve_task_*) on its own metrics endpoint.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.errors import ServiceError
from service.frontend.calls import REASON_METADATA_KEY
from service.frontend.gradients import GRADIENT_CAPABILITIES
from service.settings import Settings

from .._proto.cnnserve.v1 import inference_pb2 as pb
from .._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from service.catalog import LoadedModel
    from service.frontend.calls import Rpc
    from service.frontend.state import ServingState

log = logging.getLogger(__name__)

# Trailing metadata the gradient tier puts on every status it answers itself (gradient_tier.py).
TIER_METADATA_KEY = "cnnserve-tier"
TIER_METADATA = ((TIER_METADATA_KEY, "worker"),)

# The health service name whose status the frontend mirrors (the worker's gradient pool).
GRADIENTS_HEALTH_NAME = f"{pb.DESCRIPTOR.services_by_name['Inference'].full_name}/gradients"

# Name resolvers gRPC Python knows; any other target is a plain host:port and gets "dns:///".
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")

# Codes gRPC itself produces for a broken or missing hop: answered UNAVAILABLE (retryable).
_TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DATA_LOSS,
    }
)
# cnnserve_rejections_total reasons of statuses the worker answered (its own metrics have the
# precise reason, e.g. cost_budget or too_many_pixels).
_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.CANCELLED: "cancelled",
}
UNREACHABLE_REASON = "worker_unreachable"
# gRPC's wording when no connection could be made (only chooses the message's explanation).
_UNREACHABLE_SIGNS = (
    "failed to connect",
    "connection refused",
    "no route to host",
    "resolution",
    "resolve",
    "empty address list",
)
# At most one warning per this many seconds about an unreachable gradient tier (a flood of failing
# calls must not flood the log; the health poller logs every change of state anyway).
_WARN_EVERY_S = 10.0


def worker_target(address: str) -> str:
    """settings.worker_address -> a gRPC target: "host:port" becomes "dns:///host:port" (so a
    headless Service's every pod is resolved and round-robin spreads calls over them); a target
    that already names a resolver (dns:, ipv4:, ipv6:, unix:, ...) is used as it is.

    Raises ValueError for anything else (a startup error naming the setting).
    """
    address = address.strip()
    if address.startswith(_SCHEMES):
        return address
    match = _HOST_PORT.match(address)
    if match is None or not 0 < int(match[2]) <= 65535:
        raise ValueError(
            f"worker_address {address!r} is not host:port (e.g. cnnserve-worker:8600) or a gRPC target "
            "such as dns:///cnnserve-worker-headless:8600"
        )
    return f"dns:///{address}"


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Options of the frontend's channel to the gradient tier, consistent with the server settings that
    both tiers share (service.frontend.server.grpc_options is the server side)."""
    service_config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    return [
        ("grpc.service_config", json.dumps(service_config)),
        # A forwarded request is at most what this server accepted; a worker's answer is at most what
        # this server may send on (both tiers share the caps).
        ("grpc.max_send_message_length", settings.max_receive_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Keepalive pings no more often than the worker tolerates (keepalive_min_client_ping_s; more
        # often earns a GOAWAY "too_many_pings"), also between calls: a dead worker pod is noticed
        # before the next job is sent to it.
        ("grpc.keepalive_time_ms", _ms(max(settings.keepalive_time_s, settings.keepalive_min_client_ping_s))),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # A restarted or rescheduled worker is found again within seconds, not gRPC's default of up
        # to 120 s of reconnect backoff and 30 s between DNS resolutions.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5000),
        ("grpc.dns_min_time_between_resolutions_ms", 5000),
    ]


def hop_timeout(remaining_s: float, max_deadline_s: float) -> float:
    """The timeout to forward for a call with `remaining_s` left, under the shared max_deadline_s.

    gRPC sends a timeout rounded up to its third significant digit, up to one unit of that digit
    late (599.99 s arrives as 601 s), and the worker refuses a deadline beyond max_deadline_s. So a
    timeout near the cap (a call without a deadline has exactly the cap) is sent two such units
    below it: at most 2 s less of 600 s, and never a refusal the caller did not earn.
    """
    unit = 10.0 ** (math.floor(math.log10(max_deadline_s)) - 2)
    return max(0.001, min(remaining_s, max_deadline_s - 2 * unit))


class ForwardedError(ServiceError):
    """A status to answer the caller with, as the gradient tier (or the hop to it) gave it."""

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str) -> None:
        super().__init__(message, reason=reason)
        self.code = code


def answered_by_worker(exc: grpc.aio.AioRpcError) -> bool:
    """True when the gradient tier itself answered with this status (its trailing-metadata mark)."""
    return any(key == TIER_METADATA_KEY for key, _ in exc.trailing_metadata() or ())


def forwarded_error(exc: grpc.aio.AioRpcError, method: str) -> ForwardedError:
    """The status to answer the caller with for a failed forwarded call (see the module docstring)."""
    code = exc.code()
    details = exc.details() or ""
    if answered_by_worker(exc):
        told = [value for key, value in exc.trailing_metadata() or () if key == REASON_METADATA_KEY]
        reason = str(told[0]) if told else _REASONS.get(code, code.name.lower())
        return ForwardedError(code, details, reason=reason)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ForwardedError(
            code, f"deadline exceeded while the gradient worker tier ran {method}", reason="deadline"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ForwardedError(code, f"gradient worker tier: {details}", reason="resource_exhausted")
    if code in _TRANSPORT_CODES:
        if any(sign in details.lower() for sign in _UNREACHABLE_SIGNS):
            why = "it cannot be reached"
        elif code == grpc.StatusCode.UNIMPLEMENTED:
            why = f"the configured worker address does not serve {method}"
        else:
            why = "the connection to it broke"
        return ForwardedError(
            grpc.StatusCode.UNAVAILABLE,
            f"the gradient worker tier is unavailable ({why}); retry later",
            reason=UNREACHABLE_REASON,
        )
    return ForwardedError(code, details, reason=code.name.lower())


class GradientTier:
    """The channel to the gradient tier: forwarding stubs and its health.

    `open()` inside the event loop (the server's start), `await close()` after the server stopped.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.target = worker_target(settings.worker_address)  # ValueError: a startup error
        self._channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.InferenceStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None
        self._last_warning = 0.0

    def open(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=channel_options(self.settings))
        self.stub = pb_grpc.InferenceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def serving(self, timeout_s: float) -> tuple[bool, str]:
        """One health check of the gradient tier's gradient service: (SERVING?, why not)."""
        if self._health is None:
            return False, "not connected"
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=GRADIENTS_HEALTH_NAME), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return response.status == health_pb2.HealthCheckResponse.SERVING, status

    def warn_unreachable(self, method: str, exc: grpc.aio.AioRpcError) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            log.warning(
                "%s: the worker tier at %s failed: %s: %s (further failures in the next %.0f s not logged)",
                method,
                self.target,
                exc.code().name,
                exc.details(),
                _WARN_EVERY_S,
            )


class ForwardedGradients:
    """The gradient RPCs relayed to the gradient tier (a servicer backend, like LocalGradients)."""

    def __init__(self, state: ServingState, tier: GradientTier) -> None:
        self._state = state
        self._tier = tier

    def capabilities(self, model: LoadedModel) -> frozenset[str]:
        # The tier answers for its own refusals (FAILED_PRECONDITION, passed on unchanged).
        return GRADIENT_CAPABILITIES

    async def explain(self, request: pb.ExplainRequest, context: Any, rpc: Rpc) -> pb.ExplainResponse:
        response: pb.ExplainResponse = await self._unary("Explain", request, context, rpc)
        return response

    async def dream_unary(self, request: pb.DreamRequest, context: Any, rpc: Rpc) -> pb.DreamResult:
        result: pb.DreamResult = await self._unary("DreamUnary", request, context, rpc)
        return result

    async def stylize_unary(self, request: pb.StylizeRequest, context: Any, rpc: Rpc) -> pb.StylizeResult:
        result: pb.StylizeResult = await self._unary("StylizeUnary", request, context, rpc)
        return result

    async def feature_maps(
        self, request: pb.FeatureMapsRequest, context: Any, rpc: Rpc
    ) -> pb.FeatureMapsResponse:
        response: pb.FeatureMapsResponse = await self._unary("FeatureMaps", request, context, rpc)
        return response

    async def filters(self, request: pb.FiltersRequest, context: Any, rpc: Rpc) -> pb.FiltersResponse:
        response: pb.FiltersResponse = await self._unary("Filters", request, context, rpc)
        return response

    def dream(self, request: pb.DreamRequest, context: Any, rpc: Rpc) -> AsyncIterator[pb.DreamResponse]:
        return self._stream("Dream", request, context, rpc)

    def stylize(
        self, request: pb.StylizeRequest, context: Any, rpc: Rpc
    ) -> AsyncIterator[pb.StylizeResponse]:
        return self._stream("Stylize", request, context, rpc)

    # --- the hop -----------------------------------------------------------------------------------

    def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext, rpc: Rpc) -> Any:
        """Start the forwarded call: what is left of the caller's deadline is its timeout."""
        self._state.check_ready()
        rpc.model = self._model_label(request.model)
        stub = self._tier.stub
        assert stub is not None, "GradientTier.open() was not called"
        return getattr(stub, method)(request, timeout=self._timeout(context))

    async def _unary(self, method: str, request: Any, context: grpc.aio.ServicerContext, rpc: Rpc) -> Any:
        call = self._call(method, request, context, rpc)
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise self._fail(method, exc) from None
        finally:
            call.cancel()  # a no-op when done; stops the tier's job when we were cancelled

    async def _stream(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, rpc: Rpc
    ) -> AsyncIterator[Any]:
        """The tier's messages as they come (progress one by one, then the result)."""
        call = self._call(method, request, context, rpc)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise self._fail(method, exc) from None
        finally:
            call.cancel()

    def _model_label(self, name: str) -> str:
        """The metrics label: the model name only when this server serves it (bounded cardinality)."""
        return name if any(m.name == name for m in self._state.models.models()) else ""

    def _timeout(self, context: grpc.aio.ServicerContext) -> float:
        """The forwarded call's timeout: what is left of the caller's deadline (hop_timeout).
        InvalidArgument for a deadline beyond max_deadline_s, DeadlineExceeded when it passed."""
        remaining = self._state.deadline(context) - time.monotonic()
        return hop_timeout(remaining, self._state.settings.max_deadline_s)

    def _fail(self, method: str, exc: grpc.aio.AioRpcError) -> ForwardedError:
        error = forwarded_error(exc, method)
        if error.reason == UNREACHABLE_REASON:
            self._tier.warn_unreachable(method, exc)
        return error


__all__ = [
    "TIER_METADATA",
    "ForwardedError",
    "ForwardedGradients",
    "GradientTier",
    "channel_options",
    "forwarded_error",
    "hop_timeout",
    "worker_target",
]
