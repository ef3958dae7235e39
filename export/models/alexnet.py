"""AlexNet: the paper's network (Krizhevsky, Sutskever & Hinton 2012) and torchvision's variant.

The paper's network (`alexnet`):
    conv1 11x11/4 -> 96, ReLU, LRN, max-pool 3x3/2
    conv2  5x5    -> 256, ReLU, LRN, max-pool 3x3/2
    conv3  3x3    -> 384, ReLU
    conv4  3x3    -> 384, ReLU
    conv5  3x3    -> 256, ReLU, max-pool 3x3/2
    fc6 9216 -> 4096, ReLU, dropout 0.5; fc7 4096 -> 4096, ReLU, dropout 0.5; fc8 4096 -> classes
LRN is k=2, n=5, alpha=1e-4, beta=0.75, applied after the ReLU of conv1 and conv2 ("response
normalization layers follow the first and second convolutional layers"; "max-pooling layers follow
both response-normalization layers"). Pooling is the paper's overlapping 3x3 stride 2. Dropout
zeroes the *outputs* of the two hidden FC layers, as section 4.2 describes.

Input size: the paper says 224x224, but 11x11 stride 4 only yields its 55x55 maps from 227x227 (the
well-known discrepancy). We keep the 224x224 input every other ImageNet model here takes and give
conv1 padding 2: floor((224 + 2*2 - 11) / 4) + 1 = 55. conv2..conv5 use "same" padding, so the maps
are 55 -> 27 -> 27 -> 13 -> 13 -> 13 -> 13 -> 6, and the flatten is exactly 256 * 6 * 6 = 9216 by
geometry; there is no adaptive pool, so only 224x224 (up to 227x227) inputs are accepted.

`groups=True` reproduces the two-GPU split: conv2, conv4 and conv5 only see the kernel maps on
their own GPU (groups=2); conv3 and the FC layers communicate across GPUs. Parameter counts:
62,378,344 without groups, 60,965,224 with groups.

`alexnet_torchvision` is torchvision's "one weird trick" variant (Krizhevsky 2014): 64-192-384-256-256
maps, no LRN, an adaptive 6x6 average pool and dropout *before* fc6 and fc7. Its module positions
match torchvision's so its published checkpoint loads.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AlexNet", "AlexNetTorchvision", "alexnet", "alexnet_torchvision"]


def _lrn() -> nn.LocalResponseNorm:
    # The paper's b = a / (k + alpha * sum a^2)^beta sums over n=5 adjacent maps with alpha=1e-4;
    # PyTorch divides alpha by `size`, so the paper's alpha is alpha * size here.
    return nn.LocalResponseNorm(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)


class AlexNet(nn.Module):
    """The paper's AlexNet; see the module docstring for the layout and the input-size choice."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        groups: bool = False,
        dropout: float = 0.5,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        g = 2 if groups else 1
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 96, kernel_size=11, stride=4, padding=2),  # conv1
            nn.ReLU(),
            _lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=g),  # conv2
            nn.ReLU(),
            _lrn(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(256, 384, kernel_size=3, padding=1),  # conv3: connects across the GPUs
            nn.ReLU(),
            nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=g),  # conv4
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=g),  # conv5
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096),  # fc6
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),  # fc7
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),  # fc8
        )
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        # Section 5: weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden FC layers
        # (so the ReLUs start with positive inputs), 0 elsewhere.
        layers: list[nn.Conv2d | nn.Linear] = [
            m for m in (*self.features, *self.classifier) if isinstance(m, nn.Conv2d | nn.Linear)
        ]
        conv1, conv2, conv3, conv4, conv5, fc6, fc7, fc8 = layers
        ones = {conv2, conv4, conv5, fc6, fc7}
        for m in layers:
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            if m.bias is not None:
                nn.init.constant_(m.bias, 1.0 if m in ones else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 224 x 224
        x = self.features(x)
        # N x 256 x 6 x 6
        x = torch.flatten(x, 1)
        # N x 9216
        x = self.classifier(x)
        # N x num_classes
        return x


class AlexNetTorchvision(nn.Module):
    """torchvision's AlexNet: same attribute names and `nn.Sequential` positions as its checkpoint."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 224 x 224
        x = self.features(x)
        # N x 256 x 6 x 6
        x = self.avgpool(x)
        # N x 256 x 6 x 6
        x = torch.flatten(x, 1)
        # N x 9216
        x = self.classifier(x)
        # N x num_classes
        return x


def alexnet(
    *, num_classes: int = 1000, in_channels: int = 3, groups: bool = False, dropout: float = 0.5
) -> AlexNet:
    """The paper's AlexNet. `groups=True` gives the two-GPU grouped conv2/conv4/conv5."""
    return AlexNet(num_classes=num_classes, in_channels=in_channels, groups=groups, dropout=dropout)


def alexnet_torchvision(
    *, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5
) -> AlexNetTorchvision:
    """torchvision's AlexNet variant; loads torchvision's published `alexnet` checkpoint."""
    return AlexNetTorchvision(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
