"""export.calibration: the demo's random ImageNet weights stay numerically alive (issue 15: the
demo's googlenet answered a uniform 0.001 for every class, its DeepDream objective 1e-16)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from export.calibration import calibrate
from export.models import build, get_spec
from export.preprocessing import to_tensor

ARCHS = ["alexnet", "googlenet", "resnet18", "resnet50", pytest.param("vgg19", marks=pytest.mark.slow)]


def _logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    spec = get_spec(arch)
    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    x = torch.stack([torch.from_numpy(to_tensor(p, spec.preprocessing)) for p in photos])
    with torch.no_grad():
        return model.eval()(x).double()


def _seeded(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)  # what export_to_repository does for random weights
    return build(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_demo_model_gives_a_uniform_softmax_on_a_real_photo(arch: str) -> None:
    spec = get_spec(arch)
    model = _seeded(arch)
    info = calibrate(model, spec.preprocessing, spec.head)
    assert info["logit_std_after"] == pytest.approx(1.0, rel=1e-3)
    logits = _logits(model, arch)
    probabilities = torch.softmax(logits, dim=1)
    # Uniform over 1000 classes is 0.001: alive means clearly above it, and not one saturated class.
    assert (probabilities.max(dim=1).values > 5 / spec.num_classes).all(), probabilities.max(dim=1)
    assert (probabilities.max(dim=1).values < 0.5).all()
    assert ((logits.std(dim=1) > 0.3) & (logits.std(dim=1) < 3)).all(), logits.std(dim=1)


def test_googlenet_was_dead_and_calibration_is_deterministic_and_leaves_eval_mode() -> None:
    spec = get_spec("googlenet")
    before = _logits(_seeded("googlenet"), "googlenet")
    assert float(before.std()) < 1e-6  # the problem: torchvision's init, served untrained
    a, b = _seeded("googlenet"), _seeded("googlenet")
    calibrate(a, spec.preprocessing, spec.head)
    calibrate(b, spec.preprocessing, spec.head)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    norms = [m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training and m.momentum == 0.1 for m in norms)
    assert not a.training
