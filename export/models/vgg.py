"""VGG-19 (Simonyan & Zisserman 2014, configuration E), torchvision layout; the style-transfer network.

Sixteen 3x3 convolutions in five stages separated by 2x2 max-pooling, then three FC layers. The
`features` positions are torchvision's (conv at 0, 2, 5, 7, 10, ...), so its checkpoint loads and
style-transfer layer indices (relu1_1 = features.1, ..., relu5_1 = features.29) mean what they
usually mean. torchvision uses inplace ReLUs; here each is its own non-inplace module, because
guided backprop and the style losses hook them. That changes no key or index.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["CFG_E", "VGG", "make_layers", "vgg19"]

# Output channels of each 3x3 convolution, "M" for a 2x2 max-pool (the paper's table 1, column E).
CFG_E: tuple[int | Literal["M"], ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)  # fmt: skip


def make_layers(cfg: tuple[int | Literal["M"], ...], in_channels: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU()]
            channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(
        self,
        features: nn.Sequential,
        num_classes: int = 1000,
        dropout: float = 0.5,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.features = features
        # Identity at 224x224 input (the maps are already 7x7); lets other input sizes reach the FCs.
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 224 x 224
        x = self.features(x)
        # N x 512 x 7 x 7
        x = self.avgpool(x)
        # N x 512 x 7 x 7
        x = torch.flatten(x, 1)
        # N x 25088
        x = self.classifier(x)
        # N x num_classes
        return x


def vgg19(*, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> VGG:
    """VGG-19 (configuration E) without batch norm, as torchvision's `vgg19`."""
    return VGG(make_layers(CFG_E, in_channels), num_classes=num_classes, dropout=dropout)
