"""Stylize and StylizeUnary end to end: a real `python -m service serve` with one PyTorch worker over
a repository holding VGG-19 (seeded random weights, as `python -m export demo` builds it; conftest's
`vgg19_repository`, cached across sessions). Small images and few iterations keep it fast: the point
is the wire path (streamed progress, previews, the final PNG, errors), not the quality of the result,
which tests/unit/service/worker/test_style_transfer.py judges.

Marked slow (`make test-all` runs it): with the VGG-19 repository cached the module took 72 s on the
2 shared cores (load average 10), the server loading VGG-19 twice (ONNX Runtime and the worker); a cold
cache first exports VGG-19 (about 1 min and 2.6 GB of memory)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.frontend.server import GRADIENTS_SERVICE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_ITERATIONS = 20
# metadata.json's capability names -> the wire's enum (CAPABILITY_<NAME>), every one of them.
CAPABILITY = {
    name.removeprefix("CAPABILITY_").lower(): value for name, value in pb.Capability.items() if value
}


@pytest.fixture(scope="module")
def vgg_server(vgg19_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(
        vgg19_repository,
        "--workers", "1",
        "--max-task-iterations", str(MAX_ITERATIONS),
        "--torch-threads", "1",
        # ONNX Runtime warms every batch size up to this at start: 1..16 takes about 2 min for VGG-19
        # on 2 busy cores, and these tests classify one image at a time
        "--max-batch-size", "1",
    )  # fmt: skip


def _health(server: ServerProcess, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def stub(vgg_server: ServerProcess) -> pb_grpc.InferenceStub:
    vgg_server.wait_serving(GRADIENTS_SERVICE, timeout=180)
    return pb_grpc.InferenceStub(vgg_server.channel)


def _png(width: int, height: int, seed: int) -> bytes:
    """A smooth gradient with noise: something with structure for the Gram matrices to see."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x, y, 0.5 + 0.5 * np.sin(9 * (x + seed) * y)], axis=2)
    arr = np.clip(base + 0.1 * rng.standard_normal(base.shape), 0, 1)
    buf = io.BytesIO()
    Image.fromarray((arr * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def _still_serving(server: ServerProcess) -> None:
    assert _health(server, "") == health_pb2.HealthCheckResponse.SERVING
    assert _health(server, GRADIENTS_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_vgg19_capabilities_follow_its_metadata(stub: pb_grpc.InferenceStub, vgg19_repository: Path) -> None:
    meta = json.loads((vgg19_repository / "vgg19" / "1" / "metadata.json").read_text())
    expected = {CAPABILITY[name] for name, on in meta["capabilities"].items() if on}
    assert CAPABILITY["stylize"] in expected  # VGG-19 is the style network
    info = stub.GetModel(pb.GetModelRequest(name="vgg19"), timeout=10)
    assert info.architecture == "vgg19" and set(info.capabilities) == expected
    (listed,) = [m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models if m.name == "vgg19"]
    assert set(listed.capabilities) == expected
    # classify is listed because the server really serves it for VGG-19
    response = stub.Classify(
        pb.ClassifyRequest(model="vgg19", top_k=3, image=pb.ImageInput(encoded=_png(64, 64, 0))), timeout=60
    )
    assert len(response.classes) == 3


def test_stylize_streams_progress_previews_then_full_png(stub: pb_grpc.InferenceStub) -> None:
    iterations, every = 6, 3
    request = pb.StylizeRequest(
        model="vgg19",
        content=pb.ImageInput(encoded=_png(80, 64, 1)),
        styles=[pb.StyleImage(image=pb.ImageInput(encoded=_png(64, 64, 2)))],
        iterations=iterations,
        preview_every=every,
    )
    messages = list(stub.Stylize(request, timeout=120))
    assert messages and messages[-1].HasField("result")
    assert sum(m.HasField("result") for m in messages) == 1
    progress = [m.progress for m in messages if m.HasField("progress")]
    assert [p.step for p in progress] == list(range(1, iterations + 1))
    assert all(p.total_steps == iterations and p.octave == 0 for p in progress)
    for p in progress:
        assert {"content", "style", "tv", "total", "best"} <= set(p.losses)
        assert all(np.isfinite(v) for v in p.losses.values())
    assert progress[0].losses["content"] == 0.0  # it starts from the content image
    bests = [p.losses["best"] for p in progress]
    assert bests == sorted(bests, reverse=True)  # the best loss so far never rises
    previews = {p.step: p.preview_png for p in progress if p.preview_png}
    assert set(previews) == {3, 6}
    assert all(_open(png).size == (80, 64) for png in previews.values())

    result = messages[-1].result
    assert (result.model, result.version) == ("vgg19", 1)
    assert (result.width, result.height) == (80, 64) and result.iterations == iterations
    image = _open(result.png)
    assert image.size == (80, 64) and image.mode == "RGB"
    assert 1 <= result.best_iteration <= iterations
    assert result.losses["total"] == pytest.approx(min(p.losses["total"] for p in progress))
    assert result.losses["total"] < result.initial_losses["total"]  # the optimisation did something
    content = np.asarray(Image.open(io.BytesIO(request.content.encoded)).convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - content).max() > 0


def test_stylize_unary_returns_the_final_image_only(stub: pb_grpc.InferenceStub) -> None:
    result = stub.StylizeUnary(
        pb.StylizeRequest(
            model="vgg19",
            content=pb.ImageInput(encoded=_png(96, 64, 3)),
            styles=[
                pb.StyleImage(image=pb.ImageInput(encoded=_png(64, 64, 4)), weight=1.0),
                pb.StyleImage(image=pb.ImageInput(encoded=_png(48, 64, 5)), weight=2.0),
            ],
            iterations=3,
            max_side=48,  # downscaled to the working size: 48 x 32
            optimizer=pb.STYLE_OPTIMIZER_ADAM,
            original_colors=True,
        ),
        timeout=120,
    )
    assert isinstance(result, pb.StylizeResult)
    assert (result.width, result.height) == (48, 32) and _open(result.png).size == (48, 32)
    assert result.iterations == 3 and set(result.losses) >= {"content", "style", "total"}


def test_bad_style_image_is_invalid_argument_and_the_pool_stays_healthy(
    stub: pb_grpc.InferenceStub, vgg_server: ServerProcess
) -> None:
    content = pb.ImageInput(encoded=_png(64, 64, 6))
    for call in (stub.StylizeUnary, lambda r, timeout: list(stub.Stylize(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(
                pb.StylizeRequest(
                    model="vgg19",
                    content=content,
                    styles=[pb.StyleImage(image=pb.ImageInput(encoded=b"GIF89a but not really"))],
                    iterations=2,
                ),
                timeout=60,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "style image 0" in info.value.details()

    with pytest.raises(grpc.RpcError) as info:
        stub.StylizeUnary(
            pb.StylizeRequest(
                model="vgg19",
                content=content,
                styles=[pb.StyleImage(image=content)],
                iterations=MAX_ITERATIONS + 1,
            ),
            timeout=60,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_task_iterations" in info.value.details()

    _still_serving(vgg_server)
    after = stub.StylizeUnary(
        pb.StylizeRequest(
            model="vgg19", content=content, styles=[pb.StyleImage(image=content)], iterations=1
        ),
        timeout=120,
    )
    assert _open(after.png).size == (64, 64)
