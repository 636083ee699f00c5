"""Wide ResNet (Zagoruyko & Komodakis, 2016) with pre-activation wide basic blocks.

WRN-d-k: a 3x3 stem conv to 16 channels, three groups of ``n = (d - 4) / 6`` blocks with widths
16k, 32k, 64k and strides 1/2/2, then BN-ReLU and global average pooling; ``out_features = 64k``.
Each block is BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 with a 1x1 conv shortcut when the shape
changes. WRN-40-2 with dropout 0.3 is the LogitNorm paper's network.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from oodgate.learning.models.base import BACKBONES, check_dropout, init_weights


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # When the shape changes, the shortcut takes the pre-activated input, as in the reference code.
        identity = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return cast(torch.Tensor, self.conv2(out) + identity)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide ResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = widths[0]
        groups = []
        for width, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = []
            for i in range(n):
                blocks.append(WideBasicBlock(in_planes, width, stride if i == 0 else 1, dropout))
                in_planes = width
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = in_planes
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return cast(torch.Tensor, self.pool(F.relu(self.bn(x))))


@BACKBONES.register("wrn_28_10")
def wrn_28_10(*, in_channels: int, image_size: int, dropout: float = 0.0) -> WideResNet:
    return WideResNet(28, 10, in_channels, check_dropout("dropout", dropout))


@BACKBONES.register("wrn_40_2")
def wrn_40_2(*, in_channels: int, image_size: int, dropout: float = 0.3) -> WideResNet:
    return WideResNet(40, 2, in_channels, check_dropout("dropout", dropout))
