"""gRPC server reflection, `grpc.reflection.v1` and `grpc.reflection.v1alpha`, on one server.

Current grpcurl, Postman and grpc_cli ask for v1 first (v1alpha is deprecated); older tools ask only
for v1alpha. grpcio-reflection serves only v1alpha (grpc/grpc#38576), so v1 is served here by the
same grpcio-reflection servicer: v1 is v1alpha renamed, field for field (protos/grpc/reflection/v1/
reflection.proto; tests/unit/service/frontend/test_reflection.py checks it), so each v1 request is re-read
as a v1alpha one and each answer re-read as v1. Both answer from protobuf's default descriptor
pool, where every file is named by its path under protos/ (`cnnserve/v1/inference.proto`; see
tools/gen_protos.py). When grpcio-reflection ships v1, use its servicer and drop this module.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc

from .._proto.grpc.reflection.v1 import reflection_pb2 as v1_pb2
from .._proto.grpc.reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc

V1_SERVICE = v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1ALPHA_SERVICE = v1alpha.SERVICE_NAME
SERVICE_NAMES = (V1_SERVICE, V1ALPHA_SERVICE)


class ReflectionV1Servicer(v1_pb2_grpc.ServerReflectionServicer):
    """grpc.reflection.v1.ServerReflection answered by a v1alpha servicer (grpc.aio)."""

    def __init__(self, v1alpha_servicer: Any) -> None:
        self._v1alpha = v1alpha_servicer

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[v1_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[v1_pb2.ServerReflectionResponse]:
        async def as_v1alpha() -> AsyncIterator[v1alpha_pb2.ServerReflectionRequest]:
            async for request in request_iterator:
                yield v1alpha_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        async for response in self._v1alpha.ServerReflectionInfo(as_v1alpha(), context):
            yield v1_pb2.ServerReflectionResponse.FromString(response.SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on `server`, listing `service_names` and both reflection
    services."""
    servicer = v1alpha.aio.ReflectionServicer((*service_names, *SERVICE_NAMES))
    v1alpha_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    # Our generated *_pb2_grpc modules carry no annotations.
    v1_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        ReflectionV1Servicer(servicer), server
    )


__all__ = [
    "SERVICE_NAMES",
    "V1ALPHA_SERVICE",
    "V1_SERVICE",
    "ReflectionV1Servicer",
    "enable_server_reflection",
]
