"""CnnserveClient's gradient and embedding methods against a recording fake servicer: each maps its
arguments onto the request fields, converts the answer back exactly (numpy arrays bit for bit),
reports streamed progress in order, and turns failures into CnnserveError."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from gradient_fake import (
    ACTIVATIONS,
    EMBEDDING,
    GRADCAM,
    SALIENCY,
    STEPS,
    WEIGHTS,
    RecordingInference,
    png,
    serve,
)
from PIL import Image

from service._proto.cnnserve.v1 import inference_pb2 as pb
from service.client import (
    ClassScore,
    CnnserveClient,
    CnnserveError,
    DreamLayer,
    GradientProgress,
    Neuron,
    NeuronExplained,
)


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[RecordingInference, CnnserveClient]]:
    servicer = RecordingInference()
    server, address = serve(servicer)
    with CnnserveClient(address, timeout_s=10) as client:
        yield servicer, client
    server.stop(None)


def _last(servicer: RecordingInference, method: str) -> object:
    return servicer.requests[method][-1]


def test_explain_maps_arguments_and_converts_saliency_exactly(
    fake: tuple[RecordingInference, CnnserveClient], tmp_path: Path
) -> None:
    servicer, client = fake
    path = tmp_path / "x.png"
    path.write_bytes(png(9))
    result = client.explain(path, model="resnet18", version=3)
    request = _last(servicer, "Explain")
    assert isinstance(request, pb.ExplainRequest)
    assert (request.model, request.version, list(request.target_classes)) == ("resnet18", 3, [])
    assert request.method == pb.EXPLAIN_METHOD_GUIDED_BACKPROP and not request.include_plain_gradient
    assert [i.encoded for i in request.images] == [png(9)] and not request.HasField("neuron")
    assert (result.model, result.version, result.method, result.seconds) == (
        "resnet18",
        4,
        "guided_backprop",
        0.5,
    )
    (e,) = result.explanations
    assert e.saliency.dtype == np.float32 and e.saliency.shape == (3, 4, 5)
    np.testing.assert_array_equal(e.saliency, SALIENCY)
    assert e.explained == ClassScore(3, "class 3", 0.25) and e.predicted == ClassScore(3, "three", 0.5)
    assert e.plain_gradient is None and e.gradcam is None and e.neuron is None
    assert Image.open(io.BytesIO(e.png)).size == (8, 8)


def test_explain_batch_targets_methods_and_plain_gradient(
    fake: tuple[RecordingInference, CnnserveClient],
) -> None:
    servicer, client = fake
    pixels = np.zeros((8, 8, 3), np.uint8)
    result = client.explain(
        [png(), pixels], model="m", target=[5, 6], method="guided_gradcam", plain_gradient=True
    )
    request = _last(servicer, "Explain")
    assert isinstance(request, pb.ExplainRequest)
    assert list(request.target_classes) == [5, 6] and request.include_plain_gradient
    assert request.method == pb.EXPLAIN_METHOD_GUIDED_GRADCAM and len(request.images) == 2
    assert result.method == "guided_gradcam"
    assert [e.explained.index for e in result.explanations if e.explained] == [5, 6]
    np.testing.assert_array_equal(result.explanations[1].saliency, SALIENCY + 1)
    for e in result.explanations:
        np.testing.assert_array_equal(e.plain_gradient, -SALIENCY)  # type: ignore[arg-type]
        np.testing.assert_array_equal(e.gradcam, GRADCAM)  # type: ignore[arg-type]
    client.explain(png(), model="m", target=7, method="gradcam")
    request = _last(servicer, "Explain")
    assert list(request.target_classes) == [7] and request.method == pb.EXPLAIN_METHOD_GRADCAM  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown method 'saliency': one of guided_backprop"):
        client.explain(png(), model="m", method="saliency")


def test_explain_a_neuron(fake: tuple[RecordingInference, CnnserveClient]) -> None:
    servicer, client = fake
    result = client.explain(png(), model="m", neuron="layer4:12:3,5")
    request = _last(servicer, "Explain")
    assert isinstance(request, pb.ExplainRequest)
    assert (request.neuron.layer, request.neuron.channel, request.neuron.y, request.neuron.x) == (
        "layer4",
        12,
        3,
        5,
    )
    assert result.explanations[0].explained is None
    assert result.explanations[0].neuron == NeuronExplained("layer4", 12, 3, 5, 2.5, (0, 1, 10, 11))
    client.explain(png(), model="m", neuron=Neuron("conv1", 2))
    request = _last(servicer, "Explain")
    assert isinstance(request, pb.ExplainRequest)
    assert not request.neuron.HasField("y") and not request.neuron.HasField("x")
    for bad in ("layer4", "layer4:x", "layer4:1:2", ":1"):
        with pytest.raises(ValueError, match="LAYER:CHANNEL"):
            Neuron.parse(bad)
    with pytest.raises(ValueError, match="both or neither"):
        Neuron("l", 1, y=2)


def test_dream_streams_progress_in_order_then_returns_the_result(
    fake: tuple[RecordingInference, CnnserveClient],
) -> None:
    servicer, client = fake
    seen: list[GradientProgress] = []
    result = client.dream(
        png(), model="resnet18", version=2, layers=["layer3", DreamLayer("layer4", 0.5, (1, 2))], octaves=2,
        steps=3, step_size=0.01, jitter=0, max_side=64, seed=7, preview_every=2, on_progress=seen.append,
    )  # fmt: skip
    request = _last(servicer, "Dream")
    assert isinstance(request, pb.DreamRequest)
    assert (request.model, request.version, request.seed, request.preview_every) == ("resnet18", 2, 7, 2)
    assert [(la.layer, la.weight, list(la.channels)) for la in request.layers] == [
        ("layer3", 1.0, []),
        ("layer4", 0.5, [1, 2]),
    ]
    assert (request.octaves, request.steps, request.step_size, request.jitter, request.max_side) == (
        2,
        3,
        0.01,
        0,
        64,
    )
    # None leaves a field unset: the server's default, not 0.
    assert not request.HasField("octave_scale") and not request.HasField("tile_size")
    assert [p.step for p in seen] == list(range(1, STEPS + 1))
    assert all(p.total_steps == STEPS and p.octave == 1 for p in seen)
    assert seen[0].losses == {"objective": 1.0} and seen[0].preview_png is None
    assert seen[1].preview_png is not None and Image.open(io.BytesIO(seen[1].preview_png)).size == (4, 4)
    assert (result.model, result.version, result.width, result.height, result.steps) == (
        "resnet18",
        2,
        16,
        16,
        STEPS,
    )
    assert (result.objective_before, result.objective_after, result.seconds) == (1.0, 9.0, 1.5)
    assert result.layers == (DreamLayer("layer3"), DreamLayer("layer4", 0.5, (1, 2)))
    assert Image.open(io.BytesIO(result.png)).size == (16, 16)

    client.dream(png(), model="resnet18")  # no callback, every optional field unset
    request = _last(servicer, "Dream")
    assert isinstance(request, pb.DreamRequest)
    assert not request.layers and not any(request.HasField(f) for f in ("octaves", "steps", "max_side"))


def test_stylize_maps_styles_and_options(fake: tuple[RecordingInference, CnnserveClient]) -> None:
    servicer, client = fake
    seen: list[GradientProgress] = []
    result = client.stylize(
        png(1), [png(2), (png(3), 2.0)], iterations=50, style_weight=1e5, optimizer="adam", init="noise",
        max_side=128, original_colors=True, seed=3, on_progress=seen.append,
    )  # fmt: skip
    request = _last(servicer, "Stylize")
    assert isinstance(request, pb.StylizeRequest)
    assert (request.model, request.iterations, request.style_weight, request.max_side) == (
        "vgg19",
        50,
        1e5,
        128,
    )
    assert request.optimizer == pb.STYLE_OPTIMIZER_ADAM and request.init == pb.STYLE_INIT_NOISE
    assert request.original_colors and request.seed == 3 and not request.HasField("content_weight")
    assert request.content.encoded == png(1)
    assert [(s.image.encoded, s.weight) for s in request.styles] == [(png(2), 0.0), (png(3), 2.0)]
    assert [p.step for p in seen] == list(range(1, STEPS + 1)) and seen[-1].losses == {"total": float(STEPS)}
    assert (result.width, result.iterations, result.best_iteration) == (12, STEPS, 3)
    assert result.losses == {"total": 1.0, "style": 0.5} and result.initial_losses == {"total": 8.0}
    client.stylize(png(1), png(2))  # one style image, not in a list
    request = _last(servicer, "Stylize")
    assert isinstance(request, pb.StylizeRequest)
    assert len(request.styles) == 1 and request.optimizer == pb.STYLE_OPTIMIZER_UNSPECIFIED
    client.stylize(png(1), (png(2), png(3)))  # a tuple of images, not an (image, weight) pair
    request = _last(servicer, "Stylize")
    assert [(s.image.encoded, s.weight) for s in request.styles] == [(png(2), 0.0), (png(3), 0.0)]  # type: ignore[attr-defined]
    client.stylize(png(1), (png(2), 3))  # one (image, weight) pair
    request = _last(servicer, "Stylize")
    assert [(s.image.encoded, s.weight) for s in request.styles] == [(png(2), 3.0)]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        client.stylize(png(1), png(2), optimizer="sgd")


def test_embed_feature_maps_and_filters(fake: tuple[RecordingInference, CnnserveClient]) -> None:
    servicer, client = fake
    embedded = client.embed(png(), model="m", normalize=True, top_k=2)
    request = _last(servicer, "Embed")
    assert isinstance(request, pb.EmbedRequest) and request.normalize and request.top_k == 2
    assert embedded.vector.dtype == np.float32
    np.testing.assert_array_equal(embedded.vector, EMBEDDING)
    assert embedded.norm == 3.5 and [c.index for c in embedded.classes] == [0, 1]

    maps = client.feature_maps(png(), model="m", layers=["conv1", "layer1"], max_channels=4)
    request = _last(servicer, "FeatureMaps")
    assert isinstance(request, pb.FeatureMapsRequest)
    assert list(request.layers) == ["conv1", "layer1"] and request.max_channels == 4
    assert [m.layer for m in maps.maps] == ["conv1", "layer1"] and maps.maps[0].channels == (1, 0)
    np.testing.assert_array_equal(maps.maps[1].activations, ACTIVATIONS + 1)
    assert maps.predicted == ClassScore(2, "two", 0.75)
    client.feature_maps(png(), model="m", layers="conv1")
    request = _last(servicer, "FeatureMaps")
    assert list(request.layers) == ["conv1"] and request.max_channels == 16  # type: ignore[attr-defined]

    filters = client.filters(model="m")
    request = _last(servicer, "Filters")
    assert isinstance(request, pb.FiltersRequest) and request.layer == ""
    assert filters.layer == "conv1" and filters.weights.shape == (2, 3, 2, 2)
    np.testing.assert_array_equal(filters.weights, WEIGHTS)
    assert client.filters(model="m", layer="features.3").layer == "features.3"


@pytest.mark.parametrize(
    ("method", "code"),
    [
        ("explain", grpc.StatusCode.NOT_FOUND),
        ("dream", grpc.StatusCode.NOT_FOUND),
        ("stylize", grpc.StatusCode.NOT_FOUND),
        ("embed", grpc.StatusCode.NOT_FOUND),
        ("feature_maps", grpc.StatusCode.NOT_FOUND),
        ("filters", grpc.StatusCode.NOT_FOUND),
        ("explain_bad_image", grpc.StatusCode.INVALID_ARGUMENT),
        ("dream_bad_image", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_errors_become_cnnserve_errors(
    fake: tuple[RecordingInference, CnnserveClient], method: str, code: grpc.StatusCode
) -> None:
    _, client = fake
    calls = {
        "explain": lambda: client.explain(png(), model="missing"),
        "dream": lambda: client.dream(png(), model="missing"),
        "stylize": lambda: client.stylize(png(), png(), model="missing"),
        "embed": lambda: client.embed(png(), model="missing"),
        "feature_maps": lambda: client.feature_maps(png(), model="missing", layers="x"),
        "filters": lambda: client.filters(model="missing"),
        "explain_bad_image": lambda: client.explain(b"bad", model="m"),
        "dream_bad_image": lambda: client.dream(b"bad", model="m"),
    }
    with pytest.raises(CnnserveError) as info:
        calls[method]()
    assert info.value.code == code and info.value.message


def test_an_exception_from_on_progress_cancels_the_job(
    fake: tuple[RecordingInference, CnnserveClient],
) -> None:
    servicer, client = fake
    servicer.hang, servicer.cancelled = True, threading.Event()
    try:

        def stop(progress: GradientProgress) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            client.dream(png(), model="m", on_progress=stop)
        assert servicer.cancelled.wait(5), "the server never saw the call cancelled"
    finally:
        servicer.hang = False


def test_a_missing_image_file_is_the_callers_error(fake: tuple[RecordingInference, CnnserveClient]) -> None:
    _, client = fake
    with pytest.raises(FileNotFoundError):
        client.dream("/nonexistent/x.png", model="m")
