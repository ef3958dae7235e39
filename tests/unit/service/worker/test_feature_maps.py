"""FeatureMaps and Filters jobs in a gradient process (handlers.py, feature_maps.py, rendering.py):
the activations against a forward hook on the same module, the channel ranking, the grids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from job_helpers import Ctx

from export.models import build
from export.preprocessing import IMAGENET
from service.errors import Cancelled, InvalidArgument
from service.worker import rendering
from service.worker.handlers import handle
from service.worker.jobs import (
    FeatureMapsJob,
    FeatureMapsResult,
    FiltersJob,
    FiltersResult,
    estimate_cost,
)
from service.worker.loading import LoadedModels, TorchModel
from service.worker.params import Limits


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    loaded = {}
    for arch in ("alexnet", "resnet18"):
        torch.manual_seed(0)
        module = build(arch)
        loaded[(arch, 1)] = TorchModel(arch, 1, arch, module, 1000, (3, 224, 224), IMAGENET, {})
    return LoadedModels(models=loaded, device="cpu", limits=Limits(max_batch=4))


def _image() -> np.ndarray:
    return np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)


def test_feature_maps_equal_a_forward_hook(models: LoadedModels) -> None:
    x = _image()
    layers = ("layer2", "layer1.0.conv1", "avgpool", "fc")
    result = handle(models, FeatureMapsJob("resnet18", 1, x, layers, max_channels=6), Ctx())
    assert isinstance(result, FeatureMapsResult)
    module = models.get("resnet18", 1).module
    seen: dict[str, Any] = {}
    handles = [
        module.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, o))
        for n in layers
    ]
    with torch.no_grad():
        logits = module(torch.from_numpy(x))
    for h in handles:
        h.remove()
    assert [m.layer for m in result.maps] == list(layers)  # request order, not forward order
    for m in result.maps:
        expected = seen[m.layer][0].numpy()
        assert m.activations.dtype == np.float32 and m.activations.shape == expected.shape
        np.testing.assert_allclose(m.activations, expected, rtol=0, atol=1e-6)
    assert result.predicted == int(logits.argmax())
    layer2 = result.maps[0]
    means = seen["layer2"][0].mean(dim=(1, 2)).numpy()
    assert list(layer2.channels) == list(np.argsort(-means, kind="stable")[:6])  # strongest first
    grid = rendering.decode_png(layer2.png)
    assert grid.shape == (2 * 28 + 1, 3 * 28 + 2)  # 6 channels: 2 rows of 3, 1 px apart
    # each cell min-max scaled on its own: the strongest channel's cell spans 0..255
    assert grid[:28, :28].min() == 0 and grid[:28, :28].max() == 255
    fc = result.maps[3]
    assert fc.activations.shape == (1000,) and rendering.decode_png(fc.png).shape == (1, 6 * 2 - 1)


def test_feature_maps_refusals_and_cost(models: LoadedModels) -> None:
    x = _image()
    with pytest.raises(InvalidArgument, match=r"no layer 'layer7'.*see GetModel layers"):
        handle(models, FeatureMapsJob("resnet18", 1, x, ("layer1", "layer7")), Ctx())
    with pytest.raises(InvalidArgument, match="5 layers; the limit is max_task_batch=4"):
        handle(models, FeatureMapsJob("resnet18", 1, x, ("layer1",) * 5), Ctx())
    with pytest.raises(InvalidArgument, match="max_channels must be 1..256"):
        handle(models, FeatureMapsJob("resnet18", 1, x, ("layer1",), max_channels=257), Ctx())
    with pytest.raises(Cancelled):
        handle(models, FeatureMapsJob("resnet18", 1, x, ("layer4",)), Ctx(stop_after=3))
    assert estimate_cost(FeatureMapsJob("resnet18", 1, x, ("layer1",))) == 224 * 224  # one forward


def test_alexnet_filters_are_the_papers_figure_3_grid(models: LoadedModels) -> None:
    result = handle(models, FiltersJob("alexnet", 1), Ctx())
    assert isinstance(result, FiltersResult)
    assert result.layer == "features.0"  # the first convolution
    assert result.weights.shape == (96, 3, 11, 11) and result.weights.dtype == np.float32
    np.testing.assert_array_equal(
        result.weights, models.get("alexnet", 1).module.features[0].weight.detach().numpy()
    )
    grid = rendering.decode_png(result.png)
    assert grid.shape == (10 * 11 + 9, 10 * 11 + 9, 3)  # 96 RGB cells, 10 x 10, 1 px apart
    # cell 0 is kernel 0, min-max scaled on its own, in RGB (channel-last)
    kernel = result.weights[0].transpose(1, 2, 0)
    expected = rendering.to_uint8((kernel - kernel.min()) / (kernel.max() - kernel.min()))
    np.testing.assert_array_equal(grid[:11, :11], expected)
    assert (grid[11, :] == 0).all() and (grid[-1, 6 * 12 :] == 0).all()  # the gap, the empty cells


def test_filters_of_a_grey_convolution_and_refusals(models: LoadedModels) -> None:
    result = handle(models, FiltersJob("resnet18", 1, "layer1.0.conv2"), Ctx())
    assert isinstance(result, FiltersResult)
    assert result.weights.shape == (64, 64, 3, 3)
    assert rendering.decode_png(result.png).shape == (8 * 3 + 7, 8 * 3 + 7)  # mean over inputs: grey
    with pytest.raises(
        InvalidArgument, match=r"'layer1.0.bn1' is a BatchNorm2d, not a Conv2d; convolutions: conv1"
    ):
        handle(models, FiltersJob("resnet18", 1, "layer1.0.bn1"), Ctx())
    with pytest.raises(InvalidArgument, match="no layer 'conv9'"):
        handle(models, FiltersJob("resnet18", 1, "conv9"), Ctx())
