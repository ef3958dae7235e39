"""The server around the servicers: health, reflection, readiness, drain, size limits, metrics HTTP."""

from __future__ import annotations

import asyncio
import http.client
import logging
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from servicer_fakes import FakeEngine, Harness, counter

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service._proto.inference import grpc_predict_v2_pb2 as oip
from service._proto.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from service.frontend.server import grpc_options, run
from service.settings import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tensor(value: float) -> pb.ImageInput:
    arr = np.full((1, 32, 32), value, np.float32)
    return pb.ImageInput(tensor=pb.Tensor(shape=[1, 32, 32], dtype="float32", data=arr.tobytes()))


def health_of(channel: grpc.Channel, service: str) -> int:
    return (
        health_pb2_grpc.HealthStub(channel)
        .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        .status
    )


def http_request(port: int, method: str, path: str) -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        conn.close()


def test_not_ready_until_loaded_then_serving() -> None:
    h = Harness(load=False)
    try:
        stub = pb_grpc.InferenceStub(h.channel)
        assert health_of(h.channel, "") == NOT_SERVING
        assert health_of(h.channel, "cnnserve.v1.Inference") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(model="lenet5", image=tensor(1.0)), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in info.value.details()
        item = pb.ClassifyStreamRequest(id="a", request=pb.ClassifyRequest(model="lenet5", image=tensor(1.0)))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ClassifyStream(iter([item]), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        oip_stub = oip_grpc.GRPCInferenceServiceStub(h.channel)
        assert oip_stub.ServerLive(oip.ServerLiveRequest(), timeout=5).live
        assert not oip_stub.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
        status, body, _ = http_request(h.server.metrics_port, "GET", "/healthz")
        assert status == 503 and "loading" in body

        h.run(h.server.load())
        for service in ("", "cnnserve.v1.Inference", "inference.GRPCInferenceService", "model:lenet5"):
            assert health_of(h.channel, service) == SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health_of(h.channel, "model:unknown")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert stub.Classify(pb.ClassifyRequest(model="lenet5", image=tensor(1.0)), timeout=5).classes
        assert http_request(h.server.metrics_port, "GET", "/healthz")[0] == 200
    finally:
        h.close()


def test_reflection_lists_only_our_services() -> None:
    h = Harness()
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(h.channel)
        (response,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        assert sorted(s.name for s in response.list_services_response.service) == [
            "cnnserve.v1.Inference",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "inference.GRPCInferenceService",
        ]
        (described,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="cnnserve.v1.Inference")])
        )
        assert described.file_descriptor_response.file_descriptor_proto
    finally:
        h.close()


def test_sigterm_drain_finishes_accepted_calls_and_refuses_new_ones() -> None:
    engine = FakeEngine()
    h = Harness(engine)
    try:
        stub = pb_grpc.InferenceStub(h.channel)
        watch = health_pb2_grpc.HealthStub(h.channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=20
        )
        assert next(watch).status == SERVING
        engine.delay_s = 1.0
        result: dict[str, object] = {}

        def slow_call() -> None:
            try:
                result["response"] = stub.Classify(
                    pb.ClassifyRequest(model="lenet5", image=tensor(4.0)), timeout=10
                )
            except grpc.RpcError as exc:
                result["error"] = exc

        caller = threading.Thread(target=slow_call)
        caller.start()
        deadline = time.monotonic() + 5
        while engine.started_calls == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.started_calls == 1  # the call is being computed
        started = time.monotonic()
        shutdown = h.submit(h.server.shutdown(grace_s=5))
        # Health watchers hear NOT_SERVING at once, long before the accepted call finishes, and
        # then their stream ends (an open Watch must not hold the drain for the whole grace).
        assert next(watch).status == NOT_SERVING
        assert list(watch) == []
        assert not shutdown.done()
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(model="lenet5", image=tensor(1.0)), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        caller.join(10)
        assert "error" not in result, result.get("error")
        assert result["response"].classes[0].index == 4  # type: ignore[attr-defined]
        shutdown.result(10)
        assert time.monotonic() - started < 4.0  # done when the last call was, not at the grace
        assert engine.stopped
    finally:
        h.close()


def test_message_over_the_size_limit_is_resource_exhausted() -> None:
    h = Harness(max_images_per_request=1, max_message_bytes=1024)
    try:
        limit = h.settings.max_receive_message_bytes
        stub = pb_grpc.InferenceStub(h.channel)
        big = pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=b"\x89PNG" + b"\0" * limit))
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(big, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.Classify(pb.ClassifyRequest(model="lenet5", image=tensor(1.0)), timeout=5).classes
    finally:
        h.close()


def test_metrics_http_serves_only_metrics_and_healthz() -> None:
    h = Harness()
    try:
        pb_grpc.InferenceStub(h.channel).Classify(
            pb.ClassifyRequest(model="lenet5", image=tensor(2.0)), timeout=5
        )
        port = h.server.metrics_port
        status, body, headers = http_request(port, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(body)}
        samples = families["cnnserve_requests"].samples
        assert any(
            s.labels == {"method": "Classify", "model": "lenet5", "code": "OK"} and s.value >= 1
            for s in samples
        )
        assert http_request(port, "GET", "/metrics?x=1")[0] == 200
        assert http_request(port, "GET", "/healthz")[:2] == (200, "ok\n")
        assert http_request(port, "GET", "/")[0] == 404
        assert http_request(port, "GET", "/metrics/extra")[0] == 404
        # Everything but GET on the two paths is 404, other methods on those paths included.
        status, _, headers = http_request(port, "POST", "/metrics")
        assert status == 404 and "Allow" not in headers
        assert http_request(port, "HEAD", "/healthz")[0] == 404
        assert http_request(port, "DELETE", "/nope")[0] == 404
    finally:
        h.close()


def test_grpc_options_come_from_settings() -> None:
    settings = Settings(
        keepalive_time_s=20, keepalive_min_client_ping_s=5, max_connection_age_s=60, max_message_bytes=2048
    )
    options = dict(grpc_options(settings))
    assert options["grpc.keepalive_time_ms"] == 20_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 5_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_send_message_length"] == 2048
    assert options["grpc.max_receive_message_length"] == settings.max_receive_message_bytes
    assert options["grpc.so_reuseport"] == 0


def test_run_exits_1_when_no_model_can_be_loaded(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine()
    engine.load_error = RuntimeError("repository /nowhere has no models")
    settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0)
    with caplog.at_level(logging.ERROR, logger="service.server"):
        assert asyncio.run(run(settings, engine)) == 1
    assert "no model could be loaded" in caplog.text and "/nowhere" in caplog.text


def test_run_exits_1_when_the_port_is_taken(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    try:
        settings = Settings(host="127.0.0.1", grpc_port=h.server.grpc_port, metrics_port=0)
        with caplog.at_level(logging.ERROR, logger="service.server"):
            assert asyncio.run(run(settings, FakeEngine())) == 1
        assert f"cannot bind gRPC to 127.0.0.1:{h.server.grpc_port}" in caplog.text
        hint = "choose another port with --grpc-port or CNNSERVE_GRPC_PORT (0 picks a free one)"
        assert hint in caplog.text
    finally:
        h.close()


def test_a_taken_rest_port_says_which_setting_moves_it(caplog: pytest.LogCaptureFixture) -> None:
    """8000, REST's default, is many development servers' port too: `make serve` next to one must
    say how to get past it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=port)
        with caplog.at_level(logging.ERROR, logger="service.server"):
            assert asyncio.run(run(settings, FakeEngine())) == 1
    assert f"cannot bind HTTP/REST to 127.0.0.1:{port}" in caplog.text
    assert "choose another port with --http-port or CNNSERVE_HTTP_PORT (0 turns REST off)" in caplog.text


def test_counters_move_for_each_failure_path() -> None:
    h = Harness(max_images_per_request=2)
    try:
        stub = pb_grpc.InferenceStub(h.channel)
        cases = [
            (pb.ClassifyRequest(model="x", image=tensor(1.0)), "NOT_FOUND", "", "not_found"),
            (
                pb.ClassifyRequest(model="lenet5", image=pb.ImageInput(encoded=b"BM" + b"\0" * 30)),
                "INVALID_ARGUMENT",
                "lenet5",
                "unsupported_format",
            ),
        ]
        for request, code, model, reason in cases:
            requests_before = counter("cnnserve_requests_total", method="Classify", model=model, code=code)
            rejections_before = counter(
                "cnnserve_rejections_total", method="Classify", model=model, reason=reason
            )
            with pytest.raises(grpc.RpcError):
                stub.Classify(request, timeout=5)
            assert (
                counter("cnnserve_requests_total", method="Classify", model=model, code=code)
                == requests_before + 1
            )
            assert (
                counter("cnnserve_rejections_total", method="Classify", model=model, reason=reason)
                == rejections_before + 1
            )
        # The handler leaves the in-flight gauge in its `finally`, after context.abort() has sent
        # the status: the client can see the error a moment before the gauge drops.
        deadline = time.monotonic() + 2.0
        while counter("cnnserve_inflight_requests", method="Classify") != 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert counter("cnnserve_inflight_requests", method="Classify") == 0
    finally:
        h.close()


def test_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from service.observability.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(Settings(log_format="json", log_level="INFO"))
        logging.getLogger("service.server").info("listening grpc=%s metrics=%s", "127.0.0.1:1", "127.0.0.1:2")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("service.x").exception("failed")
        logging.getLogger("service.x").debug("not shown at INFO")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 2
    assert records[0]["message"] == "listening grpc=127.0.0.1:1 metrics=127.0.0.1:2"
    assert records[0]["level"] == "INFO" and records[0]["logger"] == "service.server"
    assert records[0]["ts"].endswith("Z")
    assert "ValueError: boom" in records[1]["exc_info"]


def test_run_sets_the_gil_switch_interval() -> None:
    """The model runner threads take the GIL back several times per ONNX Runtime call: the server
    shortens Python's 5 ms switch interval (measured on an H200: the GIL wait dominated)."""
    import sys

    saved = sys.getswitchinterval()
    engine = FakeEngine()
    engine.load_error = RuntimeError("repository /nowhere has no models")
    try:
        settings = Settings(host="127.0.0.1", grpc_port=0, metrics_port=0, gil_switch_interval_ms=0.75)
        assert asyncio.run(run(settings, engine)) == 1
        assert sys.getswitchinterval() == pytest.approx(0.00075)
    finally:
        sys.setswitchinterval(saved)
