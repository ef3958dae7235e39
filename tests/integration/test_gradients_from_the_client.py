"""CnnserveClient's gradient methods and `cnnserve explain` / `cnnserve dream` against a real
server with one PyTorch worker over the demo repository (lenet5 trained, resnet18 random weights).
Small images and few steps keep it fast.

Stylize needs a VGG-19, which the demo repository does not have: client.stylize and `cnnserve
stylize` are covered against a fake servicer only (tests/unit/service/client/)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.cli import main
from service.client import CnnserveClient, GradientProgress
from service.frontend.server import GRADIENTS_SERVICE

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[ServerProcess]:
    for process in module_server(demo_repository, "--workers", "1", "--max-task-iterations", "20",
                                 "--torch-threads", "1"):  # fmt: skip
        process.wait_serving(GRADIENTS_SERVICE, timeout=120)
        yield process


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[CnnserveClient]:
    with CnnserveClient(server.address, timeout_s=60) as c:
        yield c


def _png(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _opened(data: bytes | Path) -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        image.load()
        assert image.format == "PNG"
        return image


def test_explain_equals_the_raw_stub(client: CnnserveClient, server: ServerProcess) -> None:
    image = _png(64)
    result = client.explain(image, model="resnet18", target=7, plain_gradient=True)
    (explanation,) = result.explanations
    assert (result.model, result.version, result.method) == ("resnet18", 1, "guided_backprop")
    assert explanation.saliency.shape == (3, 224, 224) and explanation.saliency.dtype == np.float32
    assert explanation.explained is not None and explanation.explained.index == 7
    assert explanation.plain_gradient is not None and explanation.plain_gradient.shape == (3, 224, 224)
    assert _opened(explanation.png).size == (224, 224)

    stub = pb_grpc.InferenceStub(server.channel)  # type: ignore[no-untyped-call]
    raw = stub.Explain(
        pb.ExplainRequest(model="resnet18", images=[pb.ImageInput(encoded=image)], target_classes=[7],
                          include_plain_gradient=True),
        timeout=60,
    ).explanations[0]  # fmt: skip
    expected = np.frombuffer(raw.saliency.data, "<f4").reshape(tuple(raw.saliency.shape))
    np.testing.assert_array_equal(explanation.saliency, expected)  # guided backprop is deterministic


def test_dream_reports_every_step_then_returns_the_image(client: CnnserveClient) -> None:
    seen: list[GradientProgress] = []
    result = client.dream(
        _png(48, seed=1),
        model="resnet18",
        octaves=1,
        steps=3,
        jitter=4,
        preview_every=2,
        on_progress=seen.append,
    )
    assert [p.step for p in seen] == [1, 2, 3] and all(p.total_steps == 3 for p in seen)
    assert "objective" in seen[0].losses and seen[1].preview_png is not None and seen[0].preview_png is None
    assert (result.width, result.height, result.steps) == (48, 48, 3)
    assert _opened(result.png).size == (48, 48) and result.layers[0].layer == "layer3"


def test_cnnserve_explain_and_dream_write_pngs(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(_png(40, seed=2))
    saliency, dream = tmp_path / "saliency.png", tmp_path / "dream.png"
    common = ["--model", "resnet18", "--address", server.address]
    assert main(["explain", str(image), *common, "--method", "guided_gradcam", "-o", str(saliency)]) == 0
    assert _opened(saliency).size == (224, 224)
    out = capsys.readouterr().out
    assert "explained:" in out and "predicted:" in out
    argv = ["dream", str(image), *common, "--octaves", "1", "--steps", "2", "--seed", "3", "-o", str(dream)]
    assert main([*argv, "--progress-interval", "0"]) == 0
    assert _opened(dream).size == (40, 40)
    captured = capsys.readouterr()
    assert "dream: step 2/2" in captured.err and f"{dream}: 40x40 dream of {image}" in captured.out
