"""The Open Inference Protocol's HTTP/REST binding (KServe v2), on its own port (settings.http_port).

Routes (docs/API.md has examples):

    GET  /v2                                            server metadata
    GET  /v2/health/live, /v2/health/ready              200, or 400 when not (the protocol's rule)
    GET  /v2/models/{name}[/versions/{v}]               model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready         200, or 400 when not
    POST /v2/models/{name}[/versions/{v}]/infer         JSON tensors, or the binary tensor data
                                                        extension (rest_tensors.py)
    POST /v2/models/{name}[/versions/{v}]/classify      ours, not OIP: the body is one encoded image,
                                                        the answer its top-k classes as JSON

It is a skin over what gRPC serves: inference goes through OpenInference.model_infer (oip.py) and
the classify route through InferenceServicer's Classify, so the engine, admission, caps, deadlines,
metrics and error messages are those of gRPC. Each failure answers `{"error": message}` with the
HTTP status of its gRPC code (`HTTP_STATUS`); a request body nobody can parse is a 400, never a 500.

Starlette routes, uvicorn parses HTTP (httptools), in the serving event loop beside grpc.aio: a
REST call costs what a gRPC call does there, with no hop between processes (BENCHMARKS.md, "REST").
Under `serve --frontends N` every frontend process serves REST on the port the supervisor holds
(SO_REUSEPORT), as it does gRPC.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import math
import socket
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.catalog import UNTRAINED_WARNING
from service.errors import InvalidArgument, ResourceExhausted, checked_response
from service.frontend.calls import Rpc
from service.frontend.oip import EXTENSIONS, OpenInference, parse_version
from service.frontend.rest_tensors import HEADER_LENGTH, metadata_json, parse_infer, render_infer
from service.observability.metrics import INFLIGHT, child

from .._proto.cnnserve.v1 import inference_pb2 as cnnserve_pb

if TYPE_CHECKING:
    from service.frontend.inference import InferenceServicer
    from service.frontend.state import ServingState
    from service.settings import Settings

log = logging.getLogger(__name__)

# A gRPC status code -> the HTTP status of a REST answer. KServe's own errors give the common ones
# (InvalidInput 400, ModelNotFound 404, ServerNotReady/ModelNotReady 503, InferenceError 500); for
# the rest, the HTTP mapping of google.rpc.Code (googleapis/google/rpc/code.proto).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# Server metadata over REST adds the binary tensor data extension (Triton's name for it).
REST_EXTENSIONS = (*EXTENSIONS, "binary_tensor_data")
CLASSIFY_QUERY = {"top_k", "timeout_ms"}
JSON = "application/json"


class BodyTooLarge(ResourceExhausted):
    """A request body over the receive limit: 413, where gRPC answers RESOURCE_EXHAUSTED."""

    http_status = 413


class _Deadline:
    """The one thing of a grpc.aio context the shared servicer code reads: the time left."""

    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining


def _json(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(document, separators=(",", ":")).encode(), status, headers, JSON)


def error_response(status: int, message: str) -> Response:
    # A 413 keeps the connection: uvicorn reads and drops the rest of the body once the answer is
    # sent. Closing instead would reset the connection under a client still sending, and a reset
    # can discard the answer before the client reads it.
    headers = {"Retry-After": "1"} if status in (429, 503) else {}
    return _json({"error": message}, status, headers)


class RestApi:
    """The routes above over one serving state; `app` is the ASGI application."""

    def __init__(
        self, state: ServingState, oip: OpenInference, inference: InferenceServicer, settings: Settings
    ) -> None:
        self._state = state
        self._oip = oip
        self._inference = inference
        self._receive_limit = settings.max_receive_message_bytes
        self._send_limit = settings.max_message_bytes
        self._max_inflight = settings.max_concurrent_rpcs
        self._inflight = 0
        model = "/v2/models/{model}"
        version = "/v2/models/{model}/versions/{version}"
        routes = [
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
        ]
        for prefix in (model, version):
            routes += [
                Route(prefix, self.model_metadata, methods=["GET"]),
                Route(prefix + "/ready", self.model_ready, methods=["GET"]),
                Route(prefix + "/infer", self.infer, methods=["POST"]),
                Route(prefix + "/classify", self.classify, methods=["POST"]),
            ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )

    # --- the call skeleton ------------------------------------------------------------------------

    async def _call(self, method: str, work: Callable[[Rpc], Awaitable[Response]]) -> Response:
        """calls.unary for REST: metrics under `rest:<method>`, a failure as its HTTP status."""
        rpc = Rpc(f"rest:{method}")
        inflight = child(INFLIGHT, rpc.method)
        if self._inflight >= self._max_inflight:
            code, message = rpc.failed(
                ResourceExhausted(
                    f"{self._inflight} requests in flight; max_concurrent_rpcs is {self._max_inflight}",
                    reason="too_many_requests",
                )
            )
            return error_response(HTTP_STATUS[code], message)
        self._inflight += 1
        inflight.inc()
        try:
            response = await work(rpc)
        except asyncio.CancelledError:
            rpc.record_cancelled(None)
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a 500 by accident
            code, message = rpc.failed(exc)
            return error_response(getattr(exc, "http_status", HTTP_STATUS.get(code, 500)), message)
        else:
            rpc.succeeded()
            return response
        finally:
            self._inflight -= 1
            inflight.dec()

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own answers (no such route, a method the route lacks) as JSON errors."""
        message = "not found: see docs/API.md for the REST routes" if exc.status_code == 404 else exc.detail
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {message}")

    async def _body(self, request: Request) -> bytes:
        """The request body, at most the receive limit, decompressed (gzip or deflate) within it."""
        limit = self._receive_limit
        declared = request.headers.get("content-length", "")
        too_large = BodyTooLarge(
            f"the request body is over this server's receive limit of {limit} bytes; send fewer images "
            "or use the binary tensor data extension",
            reason="too_large",
        )
        if declared.isdecimal() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        body = b"".join(chunks)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise InvalidArgument(
                f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none",
                reason="invalid_argument",
            )
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            inflated = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise InvalidArgument(
                f"the body is not valid {encoding}: {exc}", reason="invalid_argument"
            ) from None
        if len(inflated) > limit or inflater.unconsumed_tail:
            raise too_large
        return inflated

    def _sized(self, body: bytes) -> bytes:
        if len(body) > self._send_limit:
            raise ResourceExhausted(
                f"the response would be {len(body)} bytes, over this server's max_message_bytes of "
                f"{self._send_limit}; ask for fewer images or smaller outputs",
                reason="response_too_large",
            )
        return body

    # --- health and metadata ----------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self._state.ready else 400)

    async def server_metadata(self, request: Request) -> Response:
        async def work(rpc: Rpc) -> Response:
            metadata = self._oip.server_metadata(REST_EXTENSIONS)
            return _json(
                {"name": metadata.name, "version": metadata.version, "extensions": list(metadata.extensions)}
            )

        return await self._call("ServerMetadata", work)

    async def model_metadata(self, request: Request) -> Response:
        async def work(rpc: Rpc) -> Response:
            loaded = self._oip.resolve(*_target(request))
            rpc.model = loaded.name
            document = metadata_json(self._oip.metadata_of(loaded))
            if not loaded.trained:
                document["parameters"] = {"untrained": True, "warning": UNTRAINED_WARNING}
            return _json(document)

        return await self._call("ModelMetadata", work)

    async def model_ready(self, request: Request) -> Response:
        async def work(rpc: Rpc) -> Response:
            model, version = _target(request)
            return Response(status_code=200 if self._oip.model_ready(model, version, rpc) else 400)

        return await self._call("ModelReady", work)

    # --- inference --------------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        async def work(rpc: Rpc) -> Response:
            _refuse_query(request, set())
            model, version = _target(request)
            body = await self._body(request)
            call = parse_infer(body, request.headers.get(HEADER_LENGTH), model, version)
            response = await self._oip.model_infer(call.request, rpc, call.timeout_s)
            payload, header_length = render_infer(response, call)
            headers = {}
            media_type = JSON
            if header_length is not None:
                headers["Inference-Header-Content-Length"] = str(header_length)
                media_type = "application/octet-stream"
            payload, encoding = _compressed(payload, request.headers.get("accept-encoding", ""))
            if encoding:
                headers["Content-Encoding"] = encoding
            return Response(self._sized(payload), 200, headers, media_type)

        return await self._call("ModelInfer", work)

    async def classify(self, request: Request) -> Response:
        """Our image route: the body is an encoded image; `?top_k=K` (default 5) and
        `?timeout_ms=T`. The answer is Classify's response as JSON (proto3 JSON names)."""

        async def work(rpc: Rpc) -> Response:
            query = _refuse_query(request, CLASSIFY_QUERY)
            model, version = _target(request)
            top_k = _query_int(query, "top_k", 0)
            timeout_ms = _query_int(query, "timeout_ms", None)
            version_number = parse_version(version) or 0  # the same rule as /infer's; 0: the latest
            image = await self._body(request)
            grpc_request = cnnserve_pb.ClassifyRequest(
                model=model, version=version_number, top_k=top_k, image=cnnserve_pb.ImageInput(encoded=image)
            )
            remaining = None if timeout_ms is None else timeout_ms / 1000
            answer = checked_response(
                await self._inference.classify_one(grpc_request, _Deadline(remaining), rpc)
            )
            document = {
                "model": answer.model,
                "version": answer.version,
                "classes": [
                    {"index": c.index, "label": c.label, "probability": c.probability} for c in answer.classes
                ],
                "untrained": answer.untrained,
            }
            if answer.untrained:
                document["warning"] = UNTRAINED_WARNING
            return _json(document)

        return await self._call("Classify", work)


def _target(request: Request) -> tuple[str, str]:
    params = request.path_params
    return str(params["model"]), str(params.get("version", ""))


def _refuse_query(request: Request, known: set[str]) -> dict[str, str]:
    """The query parameters, each of them known and given once."""
    query = request.query_params
    unknown = sorted(set(query.keys()) - known)
    if unknown:
        allowed = f"; this route takes {', '.join(sorted(known))}" if known else "; this route takes none"
        raise InvalidArgument(
            f"unknown query parameter(s) {', '.join(unknown)}{allowed}", reason="invalid_argument"
        )
    repeated = sorted(k for k in query.keys() if len(query.getlist(k)) > 1)
    if repeated:
        raise InvalidArgument(
            f"query parameter(s) given twice: {', '.join(repeated)}", reason="invalid_argument"
        )
    return dict(query.items())


def _query_int(query: dict[str, str], name: str, default: int | None) -> int | None:
    if name not in query:
        return default
    value = query[name]
    if not value.isdecimal():
        raise InvalidArgument(
            f"{name} must be a non-negative integer, got {value!r}", reason="invalid_argument"
        )
    return int(value)


def _compressed(body: bytes, accept_encoding: str) -> tuple[bytes, str]:
    """The body compressed as the client accepts (gzip, then deflate), if it asked."""
    accepted = set()
    for item in accept_encoding.split(","):
        token, _, quality = item.strip().partition(";")
        if quality.strip().replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            continue
        accepted.add(token.strip().lower())
    if "gzip" in accepted:
        return gzip.compress(body, compresslevel=1), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, ""


# --- the server --------------------------------------------------------------------------------------


def bind_socket(host: str, port: int, *, share_port: bool) -> socket.socket:
    """A listening TCP socket on host:port; share_port: SO_REUSEPORT, beside sibling frontends."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto says
    # TCP. Without it uvicorn's answer (headers, then body: two writes) waited on Nagle for the
    # client's delayed ACK, 40 ms a call (measured: 44 ms for any JSON answer, 0.2 ms for an empty one).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if share_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class RestServer:
    """uvicorn serving RestApi.app in the running event loop, on a socket bound by `bind_socket`.

    uvicorn's `serve()` would take over SIGINT/SIGTERM; the server's own handlers drain both
    protocols, so this runs uvicorn's startup, main loop and shutdown itself."""

    def __init__(self, api: RestApi, sock: socket.socket, settings: Settings) -> None:
        config = uvicorn.Config(
            api.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            # An idle keep-alive connection is closed after this; clients reconnect transparently.
            timeout_keep_alive=30,
            timeout_graceful_shutdown=max(1, math.ceil(settings.grace_period_s)),
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._socket = sock
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    async def start(self) -> None:
        config = self._server.config
        self._server.lifespan = config.lifespan_class(config)  # as serve() does; lifespan="off"
        await self._server.startup(sockets=[self._socket])
        self._loop_task = asyncio.create_task(self._server.main_loop(), name="cnnserve-rest")

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (up to the grace period), close."""
        self._server.should_exit = True
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None
            await self._server.shutdown()
        self._socket.close()
