"""GoogLeNet / Inception v1 (Szegedy et al. 2014, "Going deeper with convolutions"), torchvision layout.

The module tree, attribute names and `nn.Sequential` positions are torchvision's, so its published
ImageNet checkpoint loads with `strict=True`. Its quirks are kept on purpose:

- every convolution is a `BasicConv2d` (conv without bias, BatchNorm with eps=0.001, ReLU): the
  checkpoint was trained with batch norm, which the paper predates (the paper's two LRN layers are
  therefore absent);
- the "5x5" branch of each Inception block is really 3x3 in the checkpoint (pytorch/vision#906).
  `true_5x5=True` builds the paper's 5x5 convolution instead; that variant cannot load the checkpoint;
- the two auxiliary classifiers exist whenever `aux_logits=True` (the default, because the checkpoint
  holds their weights), but they run only in training mode. In eval mode, and so in every export,
  `forward` returns the plain logits tensor;
- `transform_input=True` converts an ImageNet-normalized input ((x - mean) / std) into the
  (x - 0.5) / 0.5 normalization the ported original weights expect.

Unlike torchvision, every ReLU is its own non-inplace `nn.ReLU` module (guided backprop hooks
modules). ReLU has no parameters, so the state_dict is unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from export.preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["BasicConv2d", "GoogLeNet", "GoogLeNetOutputs", "Inception", "InceptionAux", "googlenet"]


class GoogLeNetOutputs(NamedTuple):
    """What `GoogLeNet.forward` returns in training mode when it has auxiliary heads."""

    logits: torch.Tensor
    aux_logits2: torch.Tensor
    aux_logits1: torch.Tensor


class BasicConv2d(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding, bias=False
        )
        # eps=0.001, not PyTorch's default 1e-5: the checkpoint's running statistics were computed so.
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn(x)
        x = self.relu(x)
        return x


class Inception(nn.Module):
    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        true_5x5: bool = False,
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        # torchvision's checkpoint has a 3x3 convolution here where the paper has 5x5
        # (pytorch/vision#906); the default keeps 3x3 so that checkpoint loads.
        k = 5 if true_5x5 else 3
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=k, padding=k // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(outputs, 1)


class InceptionAux(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        # torchvision pools adaptively to 4x4 (the paper: 5x5 average pooling, stride 3, which also
        # gives 4x4 from 14x14); a module rather than F.adaptive_avg_pool2d so describe() sees it.
        self.avgpool = nn.AdaptiveAvgPool2d((4, 4))
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(p=dropout)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # aux1: N x 512 x 14 x 14, aux2: N x 528 x 14 x 14
        x = self.avgpool(x)
        # aux1: N x 512 x 4 x 4, aux2: N x 528 x 4 x 4
        x = self.conv(x)
        # N x 128 x 4 x 4
        x = torch.flatten(x, 1)
        # N x 2048
        x = self.relu(self.fc1(x))
        # N x 1024
        x = self.dropout(x)
        # N x 1024
        x = self.fc2(x)
        # N x num_classes
        return x


class GoogLeNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        aux_logits: bool = True,
        transform_input: bool = False,
        init_weights: bool = True,
        dropout: float = 0.2,
        dropout_aux: float = 0.7,
        true_5x5: bool = False,
    ) -> None:
        super().__init__()
        if transform_input and in_channels != 3:
            raise ValueError("transform_input converts ImageNet RGB normalization; it needs in_channels=3")
        self.aux_logits = aux_logits
        self.transform_input = transform_input

        self.conv1 = BasicConv2d(in_channels, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        # Table 1 of the paper: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32, true_5x5)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64, true_5x5)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64, true_5x5)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64, true_5x5)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64, true_5x5)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64, true_5x5)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128, true_5x5)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128, true_5x5)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128, true_5x5)

        self.aux1: InceptionAux | None
        self.aux2: InceptionAux | None
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, dropout=dropout_aux)
            self.aux2 = InceptionAux(528, num_classes, dropout=dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation (the paper gives none for this batch-normalized variant).
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transform_input:
            return x
        # x = (p - mean) / std  ->  (p - 0.5) / 0.5 = x * std / 0.5 + (mean - 0.5) / 0.5, per channel.
        channels = [
            torch.unsqueeze(x[:, c], 1) * (std / 0.5) + (mean - 0.5) / 0.5
            for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
        ]
        return torch.cat(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | GoogLeNetOutputs:
        """Logits (N x num_classes); in training mode with aux heads, `GoogLeNetOutputs`."""
        x = self._transform_input(x)
        # N x 3 x 224 x 224
        x = self.conv1(x)
        # N x 64 x 112 x 112
        x = self.maxpool1(x)
        # N x 64 x 56 x 56
        x = self.conv2(x)
        # N x 64 x 56 x 56
        x = self.conv3(x)
        # N x 192 x 56 x 56
        x = self.maxpool2(x)
        # N x 192 x 28 x 28
        x = self.inception3a(x)
        # N x 256 x 28 x 28
        x = self.inception3b(x)
        # N x 480 x 28 x 28
        x = self.maxpool3(x)
        # N x 480 x 14 x 14
        x = self.inception4a(x)
        # N x 512 x 14 x 14
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4b(x)
        # N x 512 x 14 x 14
        x = self.inception4c(x)
        # N x 512 x 14 x 14
        x = self.inception4d(x)
        # N x 528 x 14 x 14
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.inception4e(x)
        # N x 832 x 14 x 14
        x = self.maxpool4(x)
        # N x 832 x 7 x 7
        x = self.inception5a(x)
        # N x 832 x 7 x 7
        x = self.inception5b(x)
        # N x 1024 x 7 x 7
        x = self.avgpool(x)
        # N x 1024 x 1 x 1
        x = torch.flatten(x, 1)
        # N x 1024
        x = self.dropout(x)
        x = self.fc(x)
        # N x num_classes
        if aux1 is not None and aux2 is not None:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


def googlenet(
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    aux_logits: bool = True,
    transform_input: bool = False,
    init_weights: bool = True,
    dropout: float = 0.2,
    dropout_aux: float = 0.7,
    true_5x5: bool = False,
) -> GoogLeNet:
    """GoogLeNet, torchvision-compatible by default.

    aux_logits: build the two auxiliary classifiers (needed to load torchvision's checkpoint; they
        only run in training mode). transform_input: accept ImageNet-normalized input for weights that
        expect (x - 0.5) / 0.5. true_5x5: the paper's 5x5 convolutions (not checkpoint-compatible).
    """
    return GoogLeNet(
        num_classes=num_classes,
        in_channels=in_channels,
        aux_logits=aux_logits,
        transform_input=transform_input,
        init_weights=init_weights,
        dropout=dropout,
        dropout_aux=dropout_aux,
        true_5x5=true_5x5,
    )
