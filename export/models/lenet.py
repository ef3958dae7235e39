"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998), as in the paper's figure 2.

32x32x1 input; C1 conv 5x5 -> 6 maps, S2 average-pool, C3 conv 5x5 -> 16 maps, S4 average-pool,
C5 conv 5x5 -> 120 maps (1x1, equivalent to an FC of 120), F6 FC 84, output FC 10; tanh throughout.

Two simplifications every modern reproduction makes, kept explicit here:
- C3 connects every S2 map to every C3 map (the paper's sparse table saves 60 parameters x 6);
- S2/S4 are plain average pooling followed by tanh (the paper's subsampling also has a trainable
  coefficient and bias per map), and the output is a linear layer, not Euclidean RBF units.
That gives 61,706 parameters, the "about 60k" of the paper.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),  # C1
            nn.Tanh(),
            nn.AvgPool2d(kernel_size=2, stride=2),  # S2
            nn.Conv2d(6, 16, kernel_size=5),  # C3
            nn.Tanh(),
            nn.AvgPool2d(kernel_size=2, stride=2),  # S4
            nn.Conv2d(16, 120, kernel_size=5),  # C5
            nn.Tanh(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(120, 84),  # F6
            nn.Tanh(),
            nn.Linear(84, num_classes),  # output
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 1 x 32 x 32
        x = self.features(x)
        # N x 120 x 1 x 1
        x = torch.flatten(x, 1)
        # N x 120
        logits: torch.Tensor = self.classifier(x)
        return logits


def lenet5(*, num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    return LeNet5(num_classes=num_classes, in_channels=in_channels)
