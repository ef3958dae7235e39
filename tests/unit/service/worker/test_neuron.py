"""Explain's neuron target (Springenberg et al. section 3.3) against its oracle: a unit depends on
its receptive field alone, so its guided-backprop and plain-gradient saliency must be exactly zero
outside the field export.receptive_field computes from the architecture, and not zero inside.

The fields are not the whole image (checked), so a field computed too small, a position resolved
wrongly or a gradient of the wrong unit makes these tests fail. Seeded random weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from job_helpers import Ctx

from export.layers import addressable_layers
from export.models import ARCHITECTURES, build
from export.preprocessing import IMAGENET
from service.errors import InvalidArgument
from service.worker.handlers import handle
from service.worker.jobs import ExplainJob, ExplainResult, NeuronTarget, check_layers
from service.worker.loading import LoadedModels, TorchModel
from service.worker.params import Limits

# (architecture, layer, (i, j)): a unit well inside the layer's output, so its field is clipped on
# no side or one and covers a fraction of the 224 x 224 input.
CASES = [
    ("resnet18", "layer2", (14, 9)),  # 28 x 28, field 99 px, jump 8
    ("alexnet", "features.10", (6, 3)),  # conv4 (paper layout), 13 x 13, field 131 px, jump 16
    ("alexnet_torchvision", "features.8", (4, 8)),  # conv4 (torchvision layout)
]


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    loaded: dict[tuple[str, int], TorchModel] = {}
    for arch, _, _ in CASES:
        torch.manual_seed(0)
        module = build(arch)
        # resnet18 carries metadata.json's layer table, the AlexNets are older exports without
        # one: their names are checked against the module's own (handlers.layer_table)
        layers = tuple(addressable_layers(module, (3, 224, 224))) if arch == "resnet18" else None
        capabilities = {"explain": True}
        loaded[(arch, 1)] = TorchModel(
            arch, 1, arch, module, 1000, (3, 224, 224), IMAGENET, capabilities, layers
        )
    return LoadedModels(models=loaded, device="cpu", limits=Limits(max_batch=4))


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, 224, 224)).astype(np.float32)


def _activation(module: torch.nn.Module, layer: str, x: np.ndarray) -> torch.Tensor:
    out: list[Any] = []
    handle_ = module.get_submodule(layer).register_forward_hook(lambda m, i, o: out.append(o))
    try:
        with torch.no_grad():
            module(torch.from_numpy(x))
    finally:
        handle_.remove()
    return out[0]


def _outside_inside(saliency: np.ndarray, field: tuple[int, int, int, int]) -> tuple[int, int, int]:
    """(non-zero pixels outside the field, non-zero pixels inside, pixels inside) of (C, H, W)."""
    top, left, bottom, right = field
    nonzero = (saliency != 0).any(axis=0)
    inside = np.zeros_like(nonzero)
    inside[top:bottom, left:right] = True
    return int((nonzero & ~inside).sum()), int((nonzero & inside).sum()), int(inside.sum())


@pytest.mark.parametrize(("arch", "layer", "position"), CASES)
def test_saliency_is_zero_outside_the_receptive_field_and_not_inside(
    models: LoadedModels, arch: str, layer: str, position: tuple[int, int]
) -> None:
    x = _images(1)
    i, j = position
    act = _activation(models.get(arch, 1).module, layer, x)
    channel = int(act[0, :, i, j].argmax())
    assert float(act[0, channel, i, j]) > 0  # an active unit: a dead one has no gradient at all
    job = ExplainJob(
        arch, 1, x, method="guided_backprop", plain_gradient=True, neuron=NeuronTarget(layer, channel, i, j)
    )
    result = handle(models, job, Ctx())
    assert isinstance(result, ExplainResult) and result.plain is not None
    (neuron,) = result.neurons
    assert (neuron.layer, neuron.channel, neuron.y, neuron.x) == (layer, channel, i, j)
    assert neuron.activation == pytest.approx(float(act[0, channel, i, j]), rel=1e-5)
    top, left, bottom, right = neuron.field
    assert 0 < (bottom - top) * (right - left) < 224 * 224 // 2  # not the whole image: the test can fail
    for name, saliency in (("guided", result.saliency[0]), ("plain", result.plain[0])):
        outside, inside, area = _outside_inside(saliency, neuron.field)
        assert outside == 0, f"{arch} {layer} {name}: {outside} non-zero pixels outside {neuron.field}"
        assert inside > area // 4, f"{arch} {layer} {name}: only {inside} of {area} pixels non-zero inside"


@pytest.mark.parametrize(("arch", "layer", "position"), CASES[:1] + CASES[2:])
def test_default_position_is_each_images_strongest(
    models: LoadedModels, arch: str, layer: str, position: tuple[int, int]
) -> None:
    x = _images(2)
    act = _activation(models.get(arch, 1).module, layer, x)
    result = handle(models, ExplainJob(arch, 1, x, method="gradient", neuron=NeuronTarget(layer, 3)), Ctx())
    assert isinstance(result, ExplainResult)
    for n, neuron in enumerate(result.neurons):
        plane = act[n, 3]
        assert float(plane[neuron.y, neuron.x]) == float(plane.max())
        assert neuron.activation == pytest.approx(float(plane.max()), rel=1e-5)
        outside, inside, _ = _outside_inside(result.saliency[n], neuron.field)
        assert outside == 0 and inside > 0


def test_neuron_refusals_name_the_layer_shape(models: LoadedModels) -> None:
    x = _images(1)

    def explain(neuron: NeuronTarget, **kw: Any) -> None:
        handle(models, ExplainJob("resnet18", 1, x, neuron=neuron, **kw), Ctx())

    with pytest.raises(
        InvalidArgument, match=r"channel 128 is out of range for layer 'layer2' of shape \[128, 28, 28\]"
    ):
        explain(NeuronTarget("layer2", 128))
    with pytest.raises(InvalidArgument, match=r"position \(y=28, x=0\) is out of range .* \[128, 28, 28\]"):
        explain(NeuronTarget("layer2", 0, 28, 0))
    with pytest.raises(InvalidArgument, match="both y and x, or neither"):
        explain(NeuronTarget("layer2", 0, 3, None))
    with pytest.raises(InvalidArgument, match=r"layer 'fc' has shape \[1000\], no spatial position"):
        explain(NeuronTarget("fc", 0, 0, 0))
    with pytest.raises(InvalidArgument, match="not guided_gradcam"):
        explain(NeuronTarget("layer2", 0), method="guided_gradcam")
    with pytest.raises(InvalidArgument, match="a neuron or target classes, not both"):
        explain(NeuronTarget("layer2", 0), targets=(1,))
    with pytest.raises(InvalidArgument, match=r"no layer 'layer9'.*see GetModel layers"):
        explain(NeuronTarget("layer9", 0))
    # the older export (no table in its metadata) gets the same answer from the module's own table
    with pytest.raises(
        InvalidArgument, match=r"channel 384 is out of range for layer 'features.10' of shape \[384, 13, 13\]"
    ):
        handle(models, ExplainJob("alexnet", 1, x, neuron=NeuronTarget("features.10", 384)), Ctx())


def test_a_layer_without_spatial_axes_takes_the_channel_alone(models: LoadedModels) -> None:
    x = _images(1)
    result = handle(
        models, ExplainJob("resnet18", 1, x, method="gradient", neuron=NeuronTarget("fc", 7)), Ctx()
    )
    assert isinstance(result, ExplainResult)
    (neuron,) = result.neurons
    assert (neuron.y, neuron.x, neuron.field) == (0, 0, (0, 0, 224, 224))
    # the fc unit is the logit of class 7: the same map as explaining class 7 with the plain gradient
    by_class = handle(models, ExplainJob("resnet18", 1, x, method="gradient", targets=(7,)), Ctx())
    assert isinstance(by_class, ExplainResult)
    np.testing.assert_array_equal(result.saliency, by_class.saliency)


def test_check_layers_without_a_table_defers_to_the_worker() -> None:
    job = ExplainJob("m", 1, _images(1), neuron=NeuronTarget("anything", 5))
    check_layers(job, None)  # nothing to check against in the serving process
    table = addressable_layers(build("lenet5"), ARCHITECTURES["lenet5"].input_shape)
    with pytest.raises(
        InvalidArgument, match="its layers are features.0, features.1, .*, classifier$"
    ):  # short: all listed
        check_layers(job, table)
