"""Request bodies that are not valid protobuf messages: INVALID_ARGUMENT naming the message type,
never UNKNOWN (grpc.aio's answer when its own parser fails) or INTERNAL.

MalformedRequestInterceptor on a grpc.aio server with our servicers (engine double), health and
reflection, called with identity serializers so the bytes reach the server unchanged. Without the
interceptor, ClassifyStream (whose items grpc.aio parses inside our handler) is covered by
test_classify_stream_with_a_malformed_item_without_the_interceptor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from servicer_fakes import FakeEngine, Harness, counter

from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.frontend.classify import ClassifyPath
from service.frontend.gradients import LocalGradients
from service.frontend.inference import InferenceServicer
from service.frontend.interceptors import MalformedRequestInterceptor
from service.frontend.oip import GRPCInferenceServicer, OpenInference
from service.frontend.state import ServingState
from service.settings import Settings

GARBAGE = b"\xff\xff\xff\xff"  # field 0x1fffffff... with wire type 7: never a valid message
MALFORMED = "malformed request: the body is not a valid"


async def _with_server(body: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    engine = FakeEngine()
    await engine.start()
    settings = Settings(workers=0)
    state = ServingState(engine, settings)
    classify = ClassifyPath(engine, settings)
    server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
    inference = InferenceServicer(state, classify=classify, gradients=LocalGradients(state))
    pb_grpc.add_InferenceServicer_to_server(inference, server)  # type: ignore[no-untyped-call]
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(
        GRPCInferenceServicer(state, OpenInference(state, classify)), server
    )  # type: ignore[no-untyped-call]
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection((reflection.SERVICE_NAME,), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await body(channel)
    finally:
        await server.stop(0)
        classify.close()


def _run(body: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(_with_server(body), timeout=30))


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    ("method", "kind", "message_type"),
    [
        ("/cnnserve.v1.Inference/Classify", "unary_unary", "cnnserve.v1.ClassifyRequest"),
        ("/cnnserve.v1.Inference/ListModels", "unary_unary", "cnnserve.v1.ListModelsRequest"),
        ("/cnnserve.v1.Inference/Dream", "unary_stream", "cnnserve.v1.DreamRequest"),
        ("/cnnserve.v1.Inference/ClassifyStream", "stream_stream", "cnnserve.v1.ClassifyStreamRequest"),
        ("/inference.GRPCInferenceService/ModelInfer", "unary_unary", "inference.ModelInferRequest"),
        ("/grpc.health.v1.Health/Check", "unary_unary", "grpc.health.v1.HealthCheckRequest"),
        ("/grpc.health.v1.Health/Watch", "unary_stream", "grpc.health.v1.HealthCheckRequest"),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "stream_stream",
            "grpc.reflection.v1alpha.ServerReflectionRequest",
        ),
    ],
)
def test_garbage_body_is_invalid_argument_naming_the_message(
    method: str, kind: str, message_type: str
) -> None:
    async def body(channel: grpc.aio.Channel) -> None:
        multicallable = getattr(channel, kind)(method)
        if kind.startswith("stream"):
            call = multicallable(iter([GARBAGE]), timeout=10)
        else:
            call = multicallable(GARBAGE, timeout=10)
        code, details = await _status(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert f"{MALFORMED} {message_type} message" in details

    _run(body)


def test_valid_bodies_still_reach_the_servicers_and_malformed_ones_are_counted() -> None:
    before = counter("cnnserve_rejections_total", method="Classify", model="", reason="malformed")

    async def body(channel: grpc.aio.Channel) -> None:
        # An empty body is a valid (all-default) message: the servicer answers it.
        code, details = await _status(channel.unary_unary("/cnnserve.v1.Inference/Classify")(b"", timeout=10))
        assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "model is required (see ListModels)")
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await check).status == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        models = await channel.unary_unary("/cnnserve.v1.Inference/ListModels")(b"", timeout=10)
        assert b"lenet5" in models
        await _status(channel.unary_unary("/cnnserve.v1.Inference/Classify")(GARBAGE, timeout=10))

    _run(body)
    after = counter("cnnserve_rejections_total", method="Classify", model="", reason="malformed")
    assert after == before + 1
    assert counter("cnnserve_requests_total", method="Classify", model="", code="INVALID_ARGUMENT") >= 2


def test_classify_stream_with_a_malformed_item_without_the_interceptor() -> None:
    """The stream's items are parsed inside our handler by grpc.aio: a DecodeError there is the
    client's fault (INVALID_ARGUMENT), not a server bug (INTERNAL)."""
    harness = Harness(FakeEngine())
    try:
        call = harness.channel.stream_stream("/cnnserve.v1.Inference/ClassifyStream")
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([b"", GARBAGE]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cnnserve.v1.ClassifyStreamRequest" in info.value.details()
    finally:
        harness.close()
