"""ResNet-18/34/50/101/152 (He, Zhang, Ren & Sun 2015, "Deep residual learning"), torchvision layout.

BasicBlock (two 3x3 convolutions) for 18 and 34 layers, Bottleneck (1x1 reduce, 3x3, 1x1 expand x4)
for 50, 101 and 152. As in torchvision ("ResNet v1.5"), a bottleneck downsamples with the stride on
its 3x3 convolution rather than the paper's first 1x1, which is slightly more accurate; shortcuts
that change shape are projections (1x1 conv + BN, the paper's option B).

Unlike torchvision, every ReLU is its own non-inplace `nn.ReLU` module (`relu1`, `relu2`,
`relu_out` in the blocks; the stem keeps torchvision's `relu`), because guided backprop hooks
modules. ReLU has no parameters, so the state_dict keys are torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding; no bias, batch norm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution; no bias, batch norm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion: int = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu_out = nn.ReLU()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity: torch.Tensor = x if self.downsample is None else self.downsample(x)
        out: torch.Tensor = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out of place, so hooks that kept bn2's output see it unmodified.
        out = self.relu_out(out + identity)
        return out


class Bottleneck(nn.Module):
    # The stride sits on the 3x3 conv (conv2) as in torchvision / "ResNet v1.5"; the paper puts it on
    # the first 1x1 conv. The parameter count is the same either way.
    expansion: int = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.relu_out = nn.ReLU()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity: torch.Tensor = x if self.downsample is None else self.downsample(x)
        out: torch.Tensor = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.relu_out(out + identity)
        return out


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        # Zero the last BN gamma of each residual branch so every block starts as the identity, which
        # improves training by 0.2-0.3% (Goyal et al. 2017, https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Projection shortcut (option B) where the shape changes; identity elsewhere.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # N x 3 x 224 x 224
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        # N x 64 x 112 x 112
        x = self.maxpool(x)
        # N x 64 x 56 x 56
        x = self.layer1(x)
        # N x 64e x 56 x 56   (e = block expansion: 1 for BasicBlock, 4 for Bottleneck)
        x = self.layer2(x)
        # N x 128e x 28 x 28
        x = self.layer3(x)
        # N x 256e x 14 x 14
        x = self.layer4(x)
        # N x 512e x 7 x 7
        x = self.avgpool(x)
        # N x 512e x 1 x 1
        x = torch.flatten(x, 1)
        # N x 512e
        x = self.fc(x)
        # N x num_classes
        return x


def _resnet(
    block: type[BasicBlock | Bottleneck],
    layers: tuple[int, int, int, int],
    num_classes: int,
    in_channels: int,
    zero_init_residual: bool,
) -> ResNet:
    return ResNet(
        block, layers, num_classes=num_classes, in_channels=in_channels, zero_init_residual=zero_init_residual
    )


def resnet18(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ResNet-18: BasicBlock x (2, 2, 2, 2)."""
    return _resnet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, zero_init_residual)


def resnet34(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ResNet-34: BasicBlock x (3, 4, 6, 3)."""
    return _resnet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, zero_init_residual)


def resnet50(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ResNet-50: Bottleneck x (3, 4, 6, 3)."""
    return _resnet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, zero_init_residual)


def resnet101(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ResNet-101: Bottleneck x (3, 4, 23, 3)."""
    return _resnet(Bottleneck, (3, 4, 23, 3), num_classes, in_channels, zero_init_residual)


def resnet152(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ResNet-152: Bottleneck x (3, 8, 36, 3)."""
    return _resnet(Bottleneck, (3, 8, 36, 3), num_classes, in_channels, zero_init_residual)
