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


def _parsing_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    limit: int | None = None,
    trailing: tuple[tuple[str, str], ...] = (),
) -> grpc.RpcMethodHandler:
    """`handler` with the request parsing moved into its behaviour, `limit` as the call's
    RESPONSE_LIMIT and `trailing` on its status (MalformedRequestInterceptor)."""
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

    def begin(context: grpc.aio.ServicerContext) -> None:
        RESPONSE_LIMIT.set(limit)
        if trailing:
            context.set_trailing_metadata(trailing)

    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            begin(context)  # this call's task only
            result = inner_uu(await parse_one(raw, context), context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(raws: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            begin(context)
            result = inner_su(parse_stream(raws, context), context)
            return await result if inspect.isawaitable(result) else result

        return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)
    inner_stream = handler.unary_stream if handler.unary_stream is not None else handler.stream_stream
    request_streaming = handler.unary_stream is None
    if inspect.isasyncgenfunction(inner_stream):

        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            begin(context)
            request = (
                parse_stream(requests, context) if request_streaming else await parse_one(requests, context)
            )
            async for response in inner_stream(request, context):
                yield response

    else:  # writes with context.write() and returns None (e.g. health's Watch)

        async def streaming(requests: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
            begin(context)
            request = (
                parse_stream(requests, context) if request_streaming else await parse_one(requests, context)
            )
            return await inner_stream(request, context)

    if request_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=serialize)
    return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=serialize)


__all__ = ["MalformedRequestInterceptor"]
