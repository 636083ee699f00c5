"""DenseNet-BC (Huang et al., 2017) for CIFAR, built from ``torchvision``'s dense block and transition.

DenseNet-BC-100 (k = 12): a 3x3 stem conv with 2k channels, three dense blocks of 16 bottleneck
layers (BN-ReLU-conv1x1 to ``bn_size * k``, BN-ReLU-conv3x3 to k), transitions with compression 0.5,
then BN-ReLU and global average pooling. Channels: 24 -> 216 -> 108 -> 300 -> 150 -> 342, so
``out_features = 342``. This matches the DenseNet of the IsoMax/IsoMax+/DisMax code.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from oodgate.learning.models.base import BACKBONES, check_dropout, init_weights


class CifarDenseNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        growth_rate: int = 12,
        block_config: tuple[int, ...] = (16, 16, 16),
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
    ) -> None:
        # torchvision is imported on use: it costs seconds at start-up (torch._dynamo)
        from torchvision.models.densenet import _DenseBlock, _Transition

        super().__init__()
        channels = 2 * growth_rate
        self.features = nn.Sequential()
        self.features.add_module(
            "conv0", nn.Conv2d(in_channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        )
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, channels, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i != len(block_config) - 1:
                reduced = int(channels * compression)
                self.features.add_module(f"transition{i + 1}", _Transition(channels, reduced))
                channels = reduced
        self.features.add_module("norm_final", nn.BatchNorm2d(channels))
        self.features.add_module("relu_final", nn.ReLU(inplace=True))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.pool(self.features(x)))


@BACKBONES.register("densenet_bc_100")
def densenet_bc_100(*, in_channels: int, image_size: int, dropout: float = 0.0) -> CifarDenseNet:
    return CifarDenseNet(in_channels, drop_rate=check_dropout("dropout", dropout))
