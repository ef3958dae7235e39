"""The architectures: checkpoint compatibility, parameter counts, forward shapes, hookable activations.

Structural checks build on the "meta" device (shapes only, no weights, no compute); forward passes
that must produce numbers build each real model once (a module-scoped, parametrized fixture, so only
one large model is alive at a time).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

from export.models import ARCHITECTURES, build
from export.models.alexnet import alexnet
from export.models.googlenet import GoogLeNet, GoogLeNetOutputs, googlenet
from export.models.resnet import BasicBlock, Bottleneck, resnet18, resnet50
from export.models.vgg import vgg19
from export.preprocessing import IMAGENET_MEAN, IMAGENET_STD

REFERENCE_FILE = "torchvision_state_dicts.json"
TORCHVISION_ARCHS = sorted(name for name, spec in ARCHITECTURES.items() if spec.torchvision_name)

# Activation modules each network must have, counted from the papers' layer tables (eval path):
# AlexNet 5 conv + 2 hidden FC; GoogLeNet 3 stem convs + 9 Inception blocks x 6 convs (the aux heads
# add 2 x (conv + fc1) more, run only in training); ResNet 1 stem + 2 per basic block or 3 per
# bottleneck; VGG-19 16 conv + 2 hidden FC; LeNet-5 C1, C3, C5, F6 (tanh).
EXPECTED_ACTIVATIONS = {
    "lenet5": 4,
    "alexnet": 7,
    "alexnet_torchvision": 7,
    "googlenet": 3 + 9 * 6,
    "resnet18": 1 + 2 * (2 + 2 + 2 + 2),
    "resnet34": 1 + 2 * (3 + 4 + 6 + 3),
    "resnet50": 1 + 3 * (3 + 4 + 6 + 3),
    "resnet101": 1 + 3 * (3 + 4 + 23 + 3),
    "resnet152": 1 + 3 * (3 + 8 + 36 + 3),
    "vgg19": 16 + 2,
}
GOOGLENET_AUX_ACTIVATIONS = 2 * 2

# GoogLeNet's Inception blocks (#5x5 reduce, #5x5) from the paper's table 1.
GOOGLENET_5X5 = [(16, 32), (32, 96), (16, 48), (24, 64), (24, 64), (32, 64), (32, 128), (32, 128), (48, 128)]
GOOGLENET_NO_AUX_PARAMETERS = 6_624_904  # shared/reference/README.md


def _reference_path() -> Path:
    override = os.environ.get("CNNSERVE_REFERENCE_DIR")
    if override:
        return Path(override) / REFERENCE_FILE
    # The `shared` directory next to the repository root: tests/unit/export/ -> repo -> its parent.
    return Path(__file__).resolve().parents[3].parent / "shared" / "reference" / REFERENCE_FILE


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    path = _reference_path()
    if not path.is_file():
        # CI always has shared/ beside the clone: there a missing manifest is a failure, not a skip.
        if os.environ.get("CNNSERVE_REFERENCE_DIR") or os.environ.get("CI"):
            pytest.fail(f"reference manifest {path} does not exist (CI or CNNSERVE_REFERENCE_DIR set)")
        pytest.skip(f"{path} not found; set CNNSERVE_REFERENCE_DIR to the directory holding {REFERENCE_FILE}")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _meta(name: str, **kwargs: Any) -> nn.Module:
    with torch.device("meta"):
        return build(name, **kwargs)


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {key: list(tensor.shape) for key, tensor in model.state_dict().items()}


# --- checkpoint compatibility ------------------------------------------------------------------


@pytest.mark.parametrize("name", TORCHVISION_ARCHS)
def test_state_dict_keys_and_shapes_match_torchvision(name: str, reference: dict[str, Any]) -> None:
    expected = reference[ARCHITECTURES[name].torchvision_name or ""]["state_dict"]
    actual = _shapes(_meta(name))
    assert sorted(actual.keys() - expected.keys()) == []
    assert sorted(expected.keys() - actual.keys()) == []
    assert actual == expected


@pytest.mark.parametrize("name", TORCHVISION_ARCHS)
def test_parameter_count_matches_torchvision(name: str, reference: dict[str, Any]) -> None:
    expected = reference[ARCHITECTURES[name].torchvision_name or ""]["num_parameters"]
    assert _num_parameters(_meta(name)) == expected


@pytest.mark.parametrize("name", TORCHVISION_ARCHS)
def test_load_reference_state_dict_strict(name: str, reference: dict[str, Any]) -> None:
    """A checkpoint with torchvision's keys and shapes loads with strict=True and fills every tensor."""
    generator = torch.Generator().manual_seed(1)
    state = {
        key: torch.tensor(7)
        if key.endswith("num_batches_tracked")
        else torch.randn(shape, generator=generator)
        for key, shape in reference[ARCHITECTURES[name].torchvision_name or ""]["state_dict"].items()
    }
    # On the meta device with assign=True the checkpoint's tensors become the model's, so nothing is
    # initialised or copied; keys and shapes are checked exactly as in an ordinary load.
    model = _meta(name)
    model.load_state_dict(state, strict=True, assign=True)
    assert [k for k, t in model.state_dict().items() if t.is_meta] == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], tensor) for key, tensor in state.items())


# --- parameter counts from the papers --------------------------------------------------------------


def test_lenet5_parameters() -> None:
    assert _num_parameters(_meta("lenet5")) == 61_706


@pytest.mark.parametrize(("groups", "expected"), [(False, 62_378_344), (True, 60_965_224)])
def test_paper_alexnet_parameters(groups: bool, expected: int) -> None:
    with torch.device("meta"):
        model = alexnet(groups=groups)
    assert _num_parameters(model) == expected


def test_paper_alexnet_groups_split_conv2_conv4_conv5_only() -> None:
    with torch.device("meta"):
        model = alexnet(groups=True)
    groups = [m.groups for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert groups == [1, 2, 1, 2, 2]


def test_googlenet_without_aux_heads() -> None:
    with torch.device("meta"):
        model = googlenet(aux_logits=False)
    assert model.aux1 is None and model.aux2 is None
    assert _num_parameters(model) == GOOGLENET_NO_AUX_PARAMETERS


def test_googlenet_true_5x5_variant() -> None:
    with torch.device("meta"):
        model = googlenet(aux_logits=False, true_5x5=True)
    kernels = {m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert (5, 5) in kernels
    # Only the nine "5x5" convolutions change, from 3x3 to 5x5 weights.
    extra = sum(reduce * out * (25 - 9) for reduce, out in GOOGLENET_5X5)
    assert _num_parameters(model) == GOOGLENET_NO_AUX_PARAMETERS + extra


def test_googlenet_checkpoint_variant_has_no_5x5() -> None:
    kernels = {m.kernel_size for m in _meta("googlenet").modules() if isinstance(m, nn.Conv2d)}
    assert kernels == {(7, 7), (3, 3), (1, 1)}


def test_googlenet_batchnorm_eps_matches_checkpoint() -> None:
    eps = {m.eps for m in _meta("googlenet").modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps == {0.001}


# --- forward passes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_eval_forward_and_activation_modules(name: str) -> None:
    """Each activation is its own module, non-inplace, called exactly once per eval forward."""
    torch.manual_seed(0)
    model = build(name)
    spec = ARCHITECTURES[name]
    activations = [m for m in model.modules() if isinstance(m, nn.ReLU | nn.Tanh)]
    assert not any(getattr(m, "inplace", False) for m in activations)

    calls: dict[nn.Module, int] = dict.fromkeys(activations, 0)

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        calls[module] += 1

    handles = [m.register_forward_hook(count) for m in activations]
    try:
        with torch.no_grad():
            out = model(torch.randn(1, *spec.input_shape))
    finally:
        for handle in handles:
            handle.remove()

    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, spec.num_classes)
    assert torch.isfinite(out).all()
    called = [m for m, n in calls.items() if n]
    assert all(calls[m] == 1 for m in called)
    assert len(called) == EXPECTED_ACTIVATIONS[name]
    # Modules that did not run are exactly GoogLeNet's auxiliary heads (training only).
    uncalled = len(activations) - len(called)
    assert uncalled == (GOOGLENET_AUX_ACTIVATIONS if name == "googlenet" else 0)


_FUNCTIONAL_ACTIVATIONS = {torch.relu, torch.relu_, F.relu, F.relu_, torch.tanh, F.tanh}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_no_functional_activation(name: str) -> None:
    """Guided backprop hooks modules: a functional relu would silently escape it."""
    graph = fx.symbolic_trace(_meta(name)).graph
    functional = [
        node
        for node in graph.nodes
        if (node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS)
        or (node.op == "call_method" and node.target in ("relu", "relu_", "tanh", "tanh_"))
    ]
    assert functional == []


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_builders_take_num_classes_and_in_channels(name: str) -> None:
    spec = ARCHITECTURES[name]
    kwargs: dict[str, Any] = {"num_classes": 7}
    channels = spec.input_shape[0]
    if "in_channels" in inspect.signature(spec.builder).parameters:
        channels = 2
        kwargs["in_channels"] = channels
    model = _meta(name, **kwargs)
    out = model(torch.empty(3, channels, *spec.input_shape[1:], device="meta"))
    assert out.shape == (3, 7)


def test_googlenet_train_mode_returns_aux_outputs() -> None:
    torch.manual_seed(0)
    model = googlenet(num_classes=10).train()
    activations = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    calls: dict[nn.Module, int] = dict.fromkeys(activations, 0)

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        calls[module] += 1

    handles = [m.register_forward_hook(count) for m in activations]
    try:
        out = model(torch.randn(2, 3, 112, 112))  # any size the aux heads' adaptive pool accepts
    finally:
        for handle in handles:
            handle.remove()
    assert isinstance(out, GoogLeNetOutputs)
    assert [t.shape for t in out] == [(2, 10)] * 3
    assert set(calls.values()) == {1}  # in training every ReLU, aux heads' included, runs once
    assert len(calls) == EXPECTED_ACTIVATIONS["googlenet"] + GOOGLENET_AUX_ACTIVATIONS

    out_eval = model.eval()(torch.randn(1, 3, 112, 112))
    assert isinstance(out_eval, torch.Tensor) and out_eval.shape == (1, 10)


def test_googlenet_without_aux_returns_tensor_in_training() -> None:
    with torch.device("meta"):
        model = googlenet(aux_logits=False, num_classes=5)
    out = model.train()(torch.empty(2, 3, 224, 224, device="meta"))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_googlenet_transform_input() -> None:
    """ImageNet-normalized input reaches conv1 as the (p - 0.5) / 0.5 the original weights expect."""
    model: GoogLeNet = googlenet(transform_input=True, aux_logits=False).eval()
    seen: list[torch.Tensor] = []
    handle = model.conv1.register_forward_hook(lambda m, inputs, o: seen.append(inputs[0]))
    pixels = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    try:
        with torch.no_grad():
            model((pixels - mean) / std)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], (pixels - 0.5) / 0.5)


def test_googlenet_transform_input_needs_rgb() -> None:
    with pytest.raises(ValueError, match="in_channels=3"):
        googlenet(transform_input=True, in_channels=1)


# --- architecture details -------------------------------------------------------------------------


def test_paper_alexnet_lrn_is_the_papers_formula() -> None:
    """b = a / (k + alpha * sum of a^2 over n=5 adjacent maps)^beta, k=2, alpha=1e-4, beta=0.75."""
    model = alexnet()
    lrns = [m for m in model.features if isinstance(m, nn.LocalResponseNorm)]
    assert len(lrns) == 2
    a = torch.randn(1, 8, 3, 3) * 30  # large enough that alpha * sum(a^2) is not negligible
    squares = F.pad(a.pow(2), (0, 0, 0, 0, 2, 2))  # zero maps beyond the edges
    window = torch.stack([squares[:, i : i + 8] for i in range(5)]).sum(0)
    expected = a / (2 + 1e-4 * window) ** 0.75
    for lrn in lrns:
        torch.testing.assert_close(lrn(a), expected)


def test_paper_alexnet_layout_at_224() -> None:
    with torch.device("meta"):
        model = alexnet()
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:4] == ["Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d"]
    assert kinds[4:8] == ["Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d"]
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert all(p.kernel_size == 3 and p.stride == 2 for p in pools)  # overlapping pooling
    conv1_out = model.features[0](torch.empty(1, 3, 224, 224, device="meta"))
    assert conv1_out.shape == (1, 96, 55, 55)
    assert model.features(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 256, 6, 6)


def test_resnet_bottleneck_strides_on_3x3() -> None:
    with torch.device("meta"):
        model = resnet50()
    block = model.layer2[0]
    assert isinstance(block, Bottleneck)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)


@pytest.mark.parametrize(
    ("builder", "block", "bn"), [(resnet18, BasicBlock, "bn2"), (resnet50, Bottleneck, "bn3")]
)
def test_resnet_zero_init_residual(builder: Any, block: type[nn.Module], bn: str) -> None:
    blocks = [m for m in builder(zero_init_residual=True).modules() if isinstance(m, block)]
    assert blocks and all(torch.count_nonzero(getattr(b, bn).weight) == 0 for b in blocks)
    default = [m for m in builder().modules() if isinstance(m, block)]
    assert all(torch.count_nonzero(getattr(b, bn).weight) > 0 for b in default)


def test_vgg19_style_layers_are_relus_at_torchvision_positions() -> None:
    with torch.device("meta"):
        features = vgg19().features
    # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 and conv4_2 of Gatys et al.
    assert all(isinstance(features[i], nn.ReLU) for i in (1, 6, 11, 20, 29))
    assert isinstance(features[21], nn.Conv2d)
