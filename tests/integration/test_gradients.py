"""The gradient RPCs end to end: a real `python -m service serve` with one PyTorch worker over the
demo repository (lenet5 trained, resnet18 random weights). Small images and few steps keep it fast.

Stylize needs a VGG-19, which this repository does not have: here only its refusals; its happy path
end to end is test_stylize.py (marked slow: it exports and serves a real VGG-19)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from server_process import ServerProcess, module_server

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service._proto.cnnserve.v1 import inference_pb2_grpc as pb_grpc
from service.frontend.server import GRADIENTS_SERVICE

pytestmark = pytest.mark.integration

MAX_ITERATIONS = 20


@pytest.fixture(scope="module")
def gradient_server(demo_repository: Path) -> Iterator[ServerProcess]:
    yield from module_server(
        demo_repository,
        "--workers", "1",
        "--max-task-iterations", str(MAX_ITERATIONS),
        "--torch-threads", "1",
    )  # fmt: skip


def _health(server: ServerProcess, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def stub(gradient_server: ServerProcess) -> pb_grpc.InferenceStub:
    gradient_server.wait_serving(GRADIENTS_SERVICE, timeout=120)
    return pb_grpc.InferenceStub(gradient_server.channel)


def _png(side: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def _error(call, request) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        result = call(request, timeout=60)
        if not isinstance(result, Message):  # a server-streaming call: read it to the end
            list(result)
    return info.value


def _still_serving(server: ServerProcess) -> None:
    assert _health(server, "") == health_pb2.HealthCheckResponse.SERVING
    assert _health(server, GRADIENTS_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_capabilities_follow_metadata(stub: pb_grpc.InferenceStub) -> None:
    lenet = stub.GetModel(pb.GetModelRequest(name="lenet5"), timeout=10)
    resnet = stub.GetModel(pb.GetModelRequest(name="resnet18"), timeout=10)
    assert pb.CAPABILITY_DREAM not in lenet.capabilities and pb.CAPABILITY_STYLIZE not in lenet.capabilities
    assert pb.CAPABILITY_EXPLAIN not in lenet.capabilities  # tanh throughout: no guided backprop
    assert {pb.CAPABILITY_CLASSIFY, pb.CAPABILITY_EXPLAIN, pb.CAPABILITY_DREAM} <= set(resnet.capabilities)
    assert pb.CAPABILITY_STYLIZE not in resnet.capabilities


def test_explain_resnet18(stub: pb_grpc.InferenceStub, gradient_server: ServerProcess) -> None:
    response = stub.Explain(
        pb.ExplainRequest(
            model="resnet18",
            images=[pb.ImageInput(encoded=_png(64))],
            target_classes=[7],
            include_plain_gradient=True,
        ),
        timeout=60,
    )
    assert response.model == "resnet18" and response.version == 1
    assert response.method == pb.EXPLAIN_METHOD_GUIDED_BACKPROP
    (e,) = response.explanations
    assert list(e.saliency.shape) == [3, 224, 224] and e.saliency.dtype == "float32"
    saliency = np.frombuffer(e.saliency.data, dtype="<f4").reshape(3, 224, 224)
    assert np.isfinite(saliency).all() and np.abs(saliency).max() > 0
    assert list(e.plain_gradient.shape) == [3, 224, 224]
    assert e.explained.index == 7 and 0.0 <= e.explained.probability <= 1.0
    assert _open(e.png).size == (224, 224)
    _still_serving(gradient_server)


def test_explain_gradcam_alone_and_with_guided_backprop(stub: pb_grpc.InferenceStub) -> None:
    image = pb.ImageInput(encoded=_png(64))
    heatmaps = {}
    for method in (pb.EXPLAIN_METHOD_GRADCAM, pb.EXPLAIN_METHOD_GUIDED_GRADCAM):
        request = pb.ExplainRequest(model="resnet18", images=[image], target_classes=[7], method=method)
        response = stub.Explain(request, timeout=60)
        assert response.method == method
        (e,) = response.explanations
        assert list(e.gradcam.shape) == [224, 224] and e.gradcam.dtype == "float32"
        heatmaps[method] = np.frombuffer(e.gradcam.data, dtype="<f4").reshape(224, 224)
        assert heatmaps[method].min() >= 0 and heatmaps[method].max() == pytest.approx(1.0)
        if method == pb.EXPLAIN_METHOD_GRADCAM:  # the saliency is the heatmap itself, drawn as is
            assert list(e.saliency.shape) == [1, 224, 224]
            np.testing.assert_array_equal(np.frombuffer(e.saliency.data, "<f4"), heatmaps[method].ravel())
            png = np.asarray(_open(e.png))
            assert png.shape == (224, 224)
            np.testing.assert_allclose(png / 255.0, heatmaps[method], atol=1 / 255)
        else:
            assert list(e.saliency.shape) == [3, 224, 224]
    np.testing.assert_allclose(
        heatmaps[pb.EXPLAIN_METHOD_GRADCAM], heatmaps[pb.EXPLAIN_METHOD_GUIDED_GRADCAM], atol=1e-5
    )
    plain = stub.Explain(pb.ExplainRequest(model="resnet18", images=[image]), timeout=60)
    assert not plain.explanations[0].HasField("gradcam")  # guided backprop computes no Grad-CAM


def test_dream_streams_progress_then_final_png(stub: pb_grpc.InferenceStub) -> None:
    request = pb.DreamRequest(
        model="resnet18", image=pb.ImageInput(encoded=_png(64)), steps=2, octaves=1, preview_every=1, jitter=4
    )
    messages = list(stub.Dream(request, timeout=60))
    progress = [m.progress for m in messages if m.HasField("progress")]
    results = [m.result for m in messages if m.HasField("result")]
    assert len(results) == 1 and messages[-1].HasField("result")
    assert [p.step for p in progress] == [1, 2] and all(p.total_steps == 2 for p in progress)
    assert "objective" in progress[0].losses and progress[0].octave == 1
    assert _open(progress[0].preview_png).size[0] > 0
    result = results[0]
    assert (result.width, result.height) == (64, 64) and _open(result.png).size == (64, 64)
    assert result.steps == 2 and result.layers[0].layer == "layer3"


def test_dream_unary(stub: pb_grpc.InferenceStub) -> None:
    result = stub.DreamUnary(
        pb.DreamRequest(
            model="resnet18",
            image=pb.ImageInput(encoded=_png(48, seed=1)),
            layers=[pb.DreamLayer(layer="layer2", weight=1.0, channels=[0, 1])],
            steps=1,
            octaves=1,
        ),
        timeout=60,
    )
    assert isinstance(result, pb.DreamResult) and _open(result.png).size == (48, 48)
    assert result.untrained  # resnet18 has the demo's random weights, and the answer says so


def test_bad_requests_are_invalid_argument(
    stub: pb_grpc.InferenceStub, gradient_server: ServerProcess
) -> None:
    image = pb.ImageInput(encoded=_png(64))
    unknown_layer = _error(
        stub.DreamUnary,
        pb.DreamRequest(
            model="resnet18", image=image, layers=[pb.DreamLayer(layer="no.such")], steps=1, octaves=1
        ),
    )
    assert unknown_layer.code() == grpc.StatusCode.INVALID_ARGUMENT and "no.such" in unknown_layer.details()

    target = _error(stub.Explain, pb.ExplainRequest(model="resnet18", images=[image], target_classes=[1000]))
    assert target.code() == grpc.StatusCode.INVALID_ARGUMENT and "1000" in target.details()

    too_many = _error(
        stub.DreamUnary, pb.DreamRequest(model="resnet18", image=image, steps=MAX_ITERATIONS + 1, octaves=1)
    )
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_task_iterations" in too_many.details()

    not_image = _error(
        stub.Dream, pb.DreamRequest(model="resnet18", image=pb.ImageInput(encoded=b"not an image"), steps=1)
    )
    assert not_image.code() == grpc.StatusCode.INVALID_ARGUMENT

    unsupported = _error(stub.DreamUnary, pb.DreamRequest(model="lenet5", image=image, steps=1, octaves=1))
    assert unsupported.code() == grpc.StatusCode.INVALID_ARGUMENT and "dream" in unsupported.details()

    missing = _error(stub.Explain, pb.ExplainRequest(model="nope", images=[image]))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    _still_serving(gradient_server)


def test_stylize_refusals(stub: pb_grpc.InferenceStub, gradient_server: ServerProcess) -> None:
    image = pb.ImageInput(encoded=_png(64))
    styles = [pb.StyleImage(image=image)]
    missing = _error(stub.Stylize, pb.StylizeRequest(model="vgg19", content=image, styles=styles))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    not_vgg = _error(stub.StylizeUnary, pb.StylizeRequest(model="resnet18", content=image, styles=styles))
    assert not_vgg.code() == grpc.StatusCode.INVALID_ARGUMENT and "stylize" in not_vgg.details()
    _still_serving(gradient_server)


# --- what a CNN has learned: FeatureMaps, Filters, Explain's neuron target ---------------------------
# The demo repository's metadata.json may predate "layers": then the gradient process checks the
# names from the module (tests/unit/service/frontend covers the serving process's check).


def _resnet18(demo_repository: Path) -> torch.nn.Module:
    from export.models import build

    module = build("resnet18")
    module.load_state_dict(torch.load(demo_repository / "resnet18" / "1" / "weights.pt", weights_only=True))
    return module.eval()


def _tensor(seed: int = 3) -> tuple[np.ndarray, pb.ImageInput]:
    x = np.random.default_rng(seed).standard_normal((3, 224, 224)).astype(np.float32)
    return x, pb.ImageInput(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=x.tobytes()))


def _array(t: pb.Tensor) -> np.ndarray:
    assert t.dtype == "float32"
    return np.frombuffer(t.data, dtype="<f4").reshape(list(t.shape))


def test_feature_maps_are_the_pytorch_models_activations(
    stub: pb_grpc.InferenceStub, gradient_server: ServerProcess, demo_repository: Path
) -> None:
    x, image = _tensor()
    # (conv1's 64 x 112 x 112 alone is 3.2 MB: with more it would pass the client's 4 MiB default)
    layers = ["layer3", "maxpool", "layer1.1.bn2", "fc"]
    response = stub.FeatureMaps(
        pb.FeatureMapsRequest(model="resnet18", image=image, layers=layers), timeout=60
    )
    module = _resnet18(demo_repository)
    seen: dict[str, torch.Tensor] = {}
    for name in layers:
        module.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, o))
    with torch.no_grad():
        logits = module(torch.from_numpy(x)[None])
    assert [m.layer for m in response.maps] == layers
    for m in response.maps:
        np.testing.assert_allclose(_array(m.activations), seen[m.layer][0].numpy(), rtol=0, atol=1e-6)
        assert len(m.channels) == min(16, seen[m.layer].shape[1])  # the default max_channels
    maxpool = response.maps[1]
    assert _open(maxpool.png).size == (4 * 56 + 3, 4 * 56 + 3)  # 16 channels, 4 x 4, 1 px apart
    assert response.predicted.index == int(logits.argmax())
    unknown = _error(
        stub.FeatureMaps, pb.FeatureMapsRequest(model="resnet18", image=image, layers=["layer9"])
    )
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT and "see GetModel layers" in unknown.details()
    _still_serving(gradient_server)


def test_filters(stub: pb_grpc.InferenceStub, gradient_server: ServerProcess, demo_repository: Path) -> None:
    response = stub.Filters(pb.FiltersRequest(model="resnet18"), timeout=60)
    assert response.layer == "conv1" and list(response.weights.shape) == [64, 3, 7, 7]
    assert response.untrained
    assert not stub.Filters(pb.FiltersRequest(model="lenet5"), timeout=60).untrained  # trained on digits
    np.testing.assert_array_equal(
        _array(response.weights), _resnet18(demo_repository).conv1.weight.detach().numpy()
    )
    picture = _open(response.png)
    assert picture.mode == "RGB" and picture.size == (8 * 7 + 7, 8 * 7 + 7)
    not_conv = _error(stub.Filters, pb.FiltersRequest(model="resnet18", layer="layer1"))
    assert not_conv.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a Conv2d" in not_conv.details()
    _still_serving(gradient_server)


def test_explain_a_neuron(stub: pb_grpc.InferenceStub, gradient_server: ServerProcess) -> None:
    _, image = _tensor()
    request = pb.ExplainRequest(
        model="resnet18",
        images=[image, pb.ImageInput(encoded=_png(64))],
        neuron=pb.NeuronTarget(layer="layer2", channel=5),
        include_plain_gradient=True,
    )
    response = stub.Explain(request, timeout=60)
    for e in response.explanations:
        assert not e.HasField("explained") and e.HasField("predicted")
        n = e.neuron
        assert (n.layer, n.channel) == ("layer2", 5) and 0 <= n.y < 28 and 0 <= n.x < 28
        # layer2's units see 99 px (ResNet-18: jump 8, start -49), clipped to the image
        assert (n.field_top, n.field_left) == (max(0, 8 * n.y - 49), max(0, 8 * n.x - 49))
        assert (n.field_bottom, n.field_right) == (min(224, 8 * n.y + 50), min(224, 8 * n.x + 50))
        for tensor in (e.saliency, e.plain_gradient):
            nonzero = (_array(tensor) != 0).any(axis=0)
            inside = np.zeros_like(nonzero)
            inside[n.field_top : n.field_bottom, n.field_left : n.field_right] = True
            assert not (nonzero & ~inside).any() and (nonzero & inside).any()
    for bad, why in [
        (pb.ExplainRequest(method=pb.EXPLAIN_METHOD_GRADCAM), "Grad-CAM explains a class"),
        (pb.ExplainRequest(target_classes=[1]), "not both"),
        (pb.ExplainRequest(neuron=pb.NeuronTarget(layer="layer2", channel=0, y=28, x=0)), "[128, 28, 28]"),
        (pb.ExplainRequest(neuron=pb.NeuronTarget(layer="layer2", channel=0, y=3)), "both y and x"),
    ]:
        full = pb.ExplainRequest(model="resnet18", images=[image], neuron=pb.NeuronTarget(layer="layer2"))
        full.MergeFrom(bad)
        error = _error(stub.Explain, full)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and why in error.details(), error.details()
    _still_serving(gradient_server)


def test_capabilities_include_feature_maps_and_filters(stub: pb_grpc.InferenceStub) -> None:
    for name in ("lenet5", "resnet18"):  # any model with weights.pt, LeNet-5's tanh included
        info = stub.GetModel(pb.GetModelRequest(name=name), timeout=10)
        assert {pb.CAPABILITY_FEATURE_MAPS, pb.CAPABILITY_FILTERS} <= set(info.capabilities)
