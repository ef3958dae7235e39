"""A response larger than the server's send limit (max_message_bytes) is refused by the service
itself: RESOURCE_EXHAUSTED naming the setting, counted as such (reason response_too_large), no
traceback in the log, and the server keeps serving. Before, gRPC core failed the send after the
call had been counted OK. The server: resnet18 (1000 ImageNet labels) and one gradient worker,
max_message_bytes 20000, so a top-1000 answer (~40 KB) or a 128x128 noise image (~49 KB as PNG) is
too large and a top-5 answer or a loss report is not."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.frontend.server import GRADIENTS_SERVICE

pytestmark = pytest.mark.integration

LIMIT = 20_000


@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(
        demo_repository,
        "--models", "resnet18",
        "--max-message-bytes", str(LIMIT),
        "--workers", "1",
        "--torch-threads", "1",
    )  # fmt: skip


def request(top_k: int) -> pb.ClassifyRequest:
    arr = np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32)
    tensor = pb.Tensor(shape=[3, 224, 224], dtype="float32", data=arr.tobytes())
    return pb.ClassifyRequest(model="resnet18", top_k=top_k, image=pb.ImageInput(tensor=tensor))


def rejections(server: ServerProcess, method: str) -> float:
    return server.sample(
        "cnnserve_rejections_total", method=method, model="resnet18", reason="response_too_large"
    )


def test_unary_response_over_the_limit_is_resource_exhausted_naming_it(server: ServerProcess) -> None:
    stub = pb_grpc.InferenceStub(server.channel)
    before = server.sample(
        "cnnserve_requests_total", method="Classify", model="resnet18", code="RESOURCE_EXHAUSTED"
    )
    rejected = rejections(server, "Classify")
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request(1000), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = caught.value.details() or ""
    assert f"max_message_bytes of {LIMIT}" in details and "top_k" in details, details
    assert (
        server.sample(
            "cnnserve_requests_total", method="Classify", model="resnet18", code="RESOURCE_EXHAUSTED"
        )
        == before + 1
    )
    assert rejections(server, "Classify") == rejected + 1
    # Still serving; a small answer goes out.
    response = stub.Classify(request(5), timeout=60)
    assert len(response.classes) == 5
    assert "ExecuteBatchError" not in server.log and "Traceback" not in server.log, server.log


def test_stream_item_over_the_limit_gets_its_own_status(server: ServerProcess) -> None:
    stub = pb_grpc.InferenceStub(server.channel)
    rejected = rejections(server, "ClassifyStream")
    items = [
        pb.ClassifyStreamRequest(id="big", request=request(1000)),
        pb.ClassifyStreamRequest(id="small", request=request(5)),
    ]
    responses = {r.id: r for r in stub.ClassifyStream(iter(items), timeout=60)}
    assert responses.keys() == {"big", "small"}
    assert responses["big"].WhichOneof("outcome") == "error"
    assert responses["big"].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert f"max_message_bytes of {LIMIT}" in responses["big"].error.message
    assert len(responses["small"].result.classes) == 5
    assert rejections(server, "ClassifyStream") == rejected + 1
    assert "Traceback" not in server.log, server.log


def test_streamed_gradient_message_over_the_limit_ends_the_call_naming_it(server: ServerProcess) -> None:
    server.wait_serving(GRADIENTS_SERVICE, timeout=120)
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    rejected = rejections(server, "Dream")
    call = pb_grpc.InferenceStub(server.channel).Dream(
        pb.DreamRequest(model="resnet18", image=pb.ImageInput(encoded=buf.getvalue()), steps=1, octaves=1),
        timeout=120,
    )
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for message in call:
            received.append(message)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_message_bytes of {LIMIT}" in (caught.value.details() or "")
    assert received and all(m.HasField("progress") for m in received)  # the losses went out
    assert rejections(server, "Dream") == rejected + 1
    assert "Traceback" not in server.log, server.log
