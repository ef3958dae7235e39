"""The server's interceptor: every request parsed inside its handler, so a malformed body gets a
status that names the message type, and each call's send limit and trailing metadata.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.errors import RESPONSE_LIMIT, InvalidArgument
from service.frontend.calls import Rpc

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

    def __init__(
        self, max_response_bytes: int | None = None, *, trailing_metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._limit = max_response_bytes
        self._trailing = trailing_metadata

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
            wrapped = self._wrapped[method] = _parsing_handler(handler, method, self._limit, self._trailing)
        return wrapped


class _Call:
    """What the wrapped behaviour of one method does around the servicer's own: parse the request
    (a malformed one answered INVALID_ARGUMENT naming its type, and counted for our two APIs), and
    set the call's send limit and trailing metadata."""

    def __init__(
        self,
        handler: grpc.RpcMethodHandler,
        method: str,
        limit: int | None,
        trailing: tuple[tuple[str, str], ...],
    ) -> None:
        self._parse = handler.request_deserializer
        message_type = getattr(getattr(self._parse, "__self__", None), "DESCRIPTOR", None)
        self._type_name = message_type.full_name if message_type is not None else "request"
        service, _, short = method.lstrip("/").rpartition("/")
        self._counted_as = short if service in _COUNTED_SERVICES else None
        self._limit = limit
        self._trailing = trailing

    def begin(self, context: grpc.aio.ServicerContext) -> None:
        RESPONSE_LIMIT.set(self._limit)  # this call's task only
        if self._trailing:
            context.set_trailing_metadata(self._trailing)

    def malformed(self, context: grpc.aio.ServicerContext, exc: Exception) -> InvalidArgument:
        message = f"malformed request: the body is not a valid {self._type_name} message ({exc})"
        if self._counted_as is not None:
            Rpc(self._counted_as).failed(InvalidArgument(message, reason="malformed"))
        # For servicers that let the error escape (reflection), grpc.aio answers with this code.
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details(message)
        return InvalidArgument(message, reason="malformed")

    async def parse_one(self, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return self._parse(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything a parser raises on bytes
            error = self.malformed(context, exc)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)

    async def parse_stream(
        self, raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # Raised inside the servicer's own `async for`: ours turn it into the status (ServiceError);
        # a foreign servicer lets it escape and grpc.aio answers the code set in `malformed`.
        async for raw in raws:
            try:
                request = self._parse(raw)
            except Exception as exc:  # noqa: BLE001
                raise self.malformed(context, exc) from None
            yield request

    async def request(self, raw: Any, context: grpc.aio.ServicerContext, streaming: bool) -> Any:
        return self.parse_stream(raw, context) if streaming else await self.parse_one(raw, context)


def _parsing_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    limit: int | None = None,
    trailing: tuple[tuple[str, str], ...] = (),
) -> grpc.RpcMethodHandler:
    """`handler` with the request parsing moved into its behaviour, `limit` as the call's
    RESPONSE_LIMIT and `trailing` on its status (MalformedRequestInterceptor)."""
    call = _Call(handler, method, limit, trailing)
    serialize = handler.response_serializer
    if handler.unary_unary is not None or handler.stream_unary is not None:
        request_streaming = handler.unary_unary is None
        inner_unary = handler.stream_unary if request_streaming else handler.unary_unary

        async def unary(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            call.begin(context)
            result = inner_unary(await call.request(raw, context, request_streaming), context)
            return await result if inspect.isawaitable(result) else result

        if request_streaming:
            return grpc.stream_unary_rpc_method_handler(unary, response_serializer=serialize)
        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    request_streaming = handler.unary_stream is None
    inner_stream = handler.stream_stream if request_streaming else handler.unary_stream
    if inspect.isasyncgenfunction(inner_stream):

        async def streaming(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call.begin(context)
            async for response in inner_stream(await call.request(raw, context, request_streaming), context):
                yield response

    else:  # writes with context.write() and returns None (e.g. health's Watch)

        async def streaming(raw: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            call.begin(context)
            return await inner_stream(await call.request(raw, context, request_streaming), context)

    if request_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=serialize)
    return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=serialize)


__all__ = ["MalformedRequestInterceptor"]
