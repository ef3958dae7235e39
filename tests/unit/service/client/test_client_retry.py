"""The documented client retry policy (service.client.default_channel_options) against an in-process
fake server that fails calls on cue: gRPC accepts the config, retries what the docs say it retries
(also requests larger than gRPC's default retry buffer) and nothing else."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as oip_pb
from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.cli import main
from service.client import (
    DEFAULT_SERVICE_CONFIG,
    CnnserveClient,
    CnnserveError,
    default_channel_options,
)
from service.client.score import scorer

Code = grpc.StatusCode


class FakeServer(pb_grpc.InferenceServicer, oip_grpc.GRPCInferenceServiceServicer):
    """Answers each method's queued failure codes first, one per call, then OK; counts attempts."""

    def __init__(self) -> None:
        self.failures: dict[str, list[grpc.StatusCode]] = {}
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()

    def _attempt(self, method: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.attempts[method] = self.attempts.get(method, 0) + 1
            queued = self.failures.get(method, [])
            code = queued.pop(0) if queued else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        self._attempt("Classify", context)
        return pb.ClassifyResponse(model=request.model, version=1, classes=[pb.ClassScore(index=3)])

    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        self._attempt("Explain", context)
        return pb.ExplainResponse(model=request.model)

    def ClassifyStream(
        self, requests: Iterator[pb.ClassifyStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ClassifyStreamResponse]:
        self._attempt("ClassifyStream", context)
        for item in requests:
            result = pb.ClassifyResponse(model="m", version=1, classes=[pb.ClassScore(index=3)])
            yield pb.ClassifyStreamResponse(id=item.id, result=result)

    def ServerReady(
        self, request: oip_pb.ServerReadyRequest, context: grpc.ServicerContext
    ) -> oip_pb.ServerReadyResponse:
        self._attempt("ServerReady", context)
        return oip_pb.ServerReadyResponse(ready=True)


@pytest.fixture
def fake() -> Iterator[tuple[FakeServer, str]]:
    servicer = FakeServer()
    server = grpc.server(
        futures.ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    )
    pb_grpc.add_InferenceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_grpc_accepts_the_default_options_and_rejects_a_broken_config(fake: tuple[FakeServer, str]) -> None:
    servicer, address = fake
    with grpc.insecure_channel(address, options=default_channel_options()) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        assert stub.ServerReady(oip_pb.ServerReadyRequest(), timeout=10).ready
    # The control: gRPC validates the service config and fails every call of a channel whose
    # config it cannot use, so the call above would have failed with a bad one.
    broken = json.loads(json.dumps(DEFAULT_SERVICE_CONFIG))
    broken["methodConfig"][0]["retryPolicy"]["maxAttempts"] = "many"
    options = [
        ("grpc.service_config", json.dumps(broken)) if name == "grpc.service_config" else (name, value)
        for name, value in default_channel_options()
    ]
    with grpc.insecure_channel(address, options=options) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerReady(oip_pb.ServerReadyRequest(), timeout=10)
    assert info.value.code() == Code.INVALID_ARGUMENT and "service config" in info.value.details()


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.CANCELLED])
def test_classify_is_retried_until_it_succeeds(fake: tuple[FakeServer, str], code: grpc.StatusCode) -> None:
    servicer, address = fake
    servicer.failures["Classify"] = [code, code, code]  # the 4th and last attempt succeeds
    with CnnserveClient(address, timeout_s=10) as client:
        # A preprocessed 3x224x224 float32 tensor (602 KB) is over gRPC's default 256 KiB retry
        # buffer: it is retried only because default_channel_options() raises that buffer.
        image = np.zeros((3, 224, 224), np.float32)
        assert client.classify(image, model="resnet18").classes[0].index == 3
    assert servicer.attempts["Classify"] == 4


def test_classify_gives_up_after_four_attempts(fake: tuple[FakeServer, str]) -> None:
    servicer, address = fake
    servicer.failures["Classify"] = [Code.UNAVAILABLE] * 5
    with CnnserveClient(address, timeout_s=10) as client, pytest.raises(CnnserveError) as info:
        client.classify(b"png", model="lenet5")
    assert info.value.code == Code.UNAVAILABLE and servicer.attempts["Classify"] == 4


def test_open_inference_protocol_calls_are_retried(fake: tuple[FakeServer, str]) -> None:
    servicer, address = fake
    servicer.failures["ServerReady"] = [Code.UNAVAILABLE]
    with grpc.insecure_channel(address, options=default_channel_options()) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        assert stub.ServerReady(oip_pb.ServerReadyRequest(), timeout=10).ready
    assert servicer.attempts["ServerReady"] == 2


@pytest.mark.parametrize("code", [Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT, Code.INTERNAL])
def test_other_codes_are_not_retried(fake: tuple[FakeServer, str], code: grpc.StatusCode) -> None:
    servicer, address = fake
    servicer.failures["Classify"] = [code]
    with CnnserveClient(address, timeout_s=10) as client, pytest.raises(CnnserveError) as info:
        client.classify(b"png", model="lenet5")
    assert info.value.code == code and servicer.attempts["Classify"] == 1


def test_a_gradient_job_is_retried_once(fake: tuple[FakeServer, str]) -> None:
    servicer, address = fake
    servicer.failures["Explain"] = [Code.UNAVAILABLE]
    with grpc.insecure_channel(address, options=default_channel_options()) as channel:
        stub = pb_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        assert stub.Explain(pb.ExplainRequest(model="resnet18"), timeout=10).model == "resnet18"
        assert servicer.attempts["Explain"] == 2
        servicer.failures["Explain"] = [Code.UNAVAILABLE] * 3
        with pytest.raises(grpc.RpcError) as info:
            stub.Explain(pb.ExplainRequest(model="resnet18"), timeout=10)
    assert info.value.code() == Code.UNAVAILABLE and servicer.attempts["Explain"] == 4  # 2 + 2


def test_streams_are_not_retried(fake: tuple[FakeServer, str]) -> None:
    """ClassifyStream is left to its caller (`cnnserve score` reopens it and re-sends what is
    unanswered), so gRPC's attempts and the scorer's never multiply."""
    servicer, address = fake
    servicer.failures["ClassifyStream"] = [Code.UNAVAILABLE]
    with CnnserveClient(address, timeout_s=10) as client, pytest.raises(CnnserveError) as info:
        list(client.classify_stream([("a", b"png")], model="lenet5"))
    assert info.value.code == Code.UNAVAILABLE and servicer.attempts["ClassifyStream"] == 1


def test_the_batch_scorer_is_the_only_layer_retrying_its_stream(
    fake: tuple[FakeServer, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cnnserve score` uses the default options and reopens a failed stream itself: --max-attempts
    3 against a server that always fails opens exactly 3 streams (not 3 x 4), and one failure
    costs exactly one more stream."""
    monkeypatch.setattr(scorer, "BACKOFF_INITIAL_S", 0.01)
    servicer, address = fake
    image = tmp_path / "a.png"
    image.write_bytes(b"png")
    argv = ["score", str(image), "--address", address, "--model", "m", "--quiet"]
    servicer.failures["ClassifyStream"] = [Code.UNAVAILABLE] * 10
    assert main([*argv, "--output", str(tmp_path / "1.jsonl"), "--max-attempts", "3"]) == 2
    assert servicer.attempts["ClassifyStream"] == 3
    servicer.failures["ClassifyStream"] = [Code.UNAVAILABLE]
    assert main([*argv, "--output", str(tmp_path / "2.jsonl"), "--max-attempts", "3"]) == 0
    assert servicer.attempts["ClassifyStream"] == 3 + 2
    assert json.loads((tmp_path / "2.jsonl").read_text())["error"] == ""
