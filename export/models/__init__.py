"""The architecture registry: name -> builder, native input shape and preprocessing.

Everything else (export, describe, the service and its gradient workers) looks architectures up
here, so a name means the same network everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from export.preprocessing import DIGITS, IMAGENET, Preprocessing

from .alexnet import alexnet, alexnet_torchvision
from .googlenet import googlenet
from .lenet import lenet5
from .resnet import resnet18, resnet34, resnet50, resnet101, resnet152
from .vgg import vgg19


class UnknownArchitecture(ValueError):
    """The requested architecture name is not in the registry."""


@dataclass(frozen=True)
class ArchSpec:
    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # native (C, H, W)
    num_classes: int
    preprocessing: Preprocessing
    dataset: Literal["digits", "imagenet"]
    torchvision_name: str | None  # key in shared/reference/torchvision_state_dicts.json
    description: str
    # Module path of the final classifier layer, the last operation of `forward`: its input is the
    # embedding (export.layers), e.g. "fc" or "classifier.6".
    head: str


def _imagenet(
    name: str, builder: Callable[..., nn.Module], tv: str | None, description: str, head: str = "fc"
) -> ArchSpec:
    return ArchSpec(name, builder, (3, 224, 224), 1000, IMAGENET, "imagenet", tv, description, head)


FC8 = "classifier.6"  # AlexNet's and VGG's last classifier layer (a Sequential position)

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec(
            "lenet5",
            lenet5,
            (1, 32, 32),
            10,
            DIGITS,
            "digits",
            None,
            "LeNet-5 (LeCun et al. 1998)",
            "classifier.2",
        ),
        _imagenet("alexnet", alexnet, None, "AlexNet as in the paper (Krizhevsky et al. 2012)", FC8),
        _imagenet(
            "alexnet_torchvision", alexnet_torchvision, "alexnet", "AlexNet, torchvision's variant", FC8
        ),
        _imagenet("googlenet", googlenet, "googlenet", "GoogLeNet / Inception v1 (Szegedy et al. 2014)"),
        _imagenet("resnet18", resnet18, "resnet18", "ResNet-18 (He et al. 2015)"),
        _imagenet("resnet34", resnet34, "resnet34", "ResNet-34 (He et al. 2015)"),
        _imagenet("resnet50", resnet50, "resnet50", "ResNet-50 (He et al. 2015)"),
        _imagenet("resnet101", resnet101, "resnet101", "ResNet-101 (He et al. 2015)"),
        _imagenet("resnet152", resnet152, "resnet152", "ResNet-152 (He et al. 2015)"),
        _imagenet("vgg19", vgg19, "vgg19", "VGG-19 (Simonyan & Zisserman 2014), the style network", FC8),
    )
}


def get_spec(name: str) -> ArchSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnknownArchitecture(f"unknown architecture {name!r}; known: {known}") from None


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build architecture `name` in eval mode. kwargs go to its builder (num_classes, ...)."""
    model = get_spec(name).builder(**kwargs)
    return model.eval()


__all__ = ["ARCHITECTURES", "ArchSpec", "UnknownArchitecture", "build", "get_spec"]
