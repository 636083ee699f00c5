"""CIFAR-style ResNet (He et al., 2016): 3x3 stride-1 stem, no max-pool, four stages of
``torchvision``'s ``BasicBlock`` with widths 64/128/256/512 and strides 1/2/2/2.

This is the ResNet of the IsoMax/IsoMax+/DisMax code (and of OpenOOD's CIFAR benchmarks);
``out_features = 512``.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from oodgate.learning.models.base import BACKBONES, init_weights


class CifarResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int], in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = 512  # BasicBlock.expansion == 1
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        # torchvision is imported on use: it costs seconds at start-up (torch._dynamo)
        from torchvision.models.resnet import BasicBlock, conv1x1

        downsample = None
        if stride != 1 or self.in_planes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.in_planes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return cast(torch.Tensor, self.pool(x))


@BACKBONES.register("resnet18")
def resnet18(*, in_channels: int, image_size: int) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), in_channels)


@BACKBONES.register("resnet34")
def resnet34(*, in_channels: int, image_size: int) -> CifarResNet:
    return CifarResNet((3, 4, 6, 3), in_channels)
