"""Wide ResNets with pre-activation blocks (Zagoruyko & Komodakis 2016).

``depth`` counts weight layers as in ResNet-``depth``: (depth-2)/6 blocks per stage, widths
16k/32k/64k. This is how Li et al. 2017 use "WRN-56-2": ResNet-56's block count at twice the width.
"""

from __future__ import annotations

import torch
from torch import nn

from qexp.models.bn import output_layer, require_bn, warm_start_batchnorm


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.proj = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        shortcut = self.proj(o) if self.proj is not None else x
        o = self.conv1(o)
        o = self.conv2(self.drop(self.relu2(self.bn2(o))))
        return o + shortcut


class WideResNet(nn.Module):
    """``bn_out`` / ``bn_warm_start`` / ``bias``: as :class:`qexp.models.resnet.CifarResNet`."""

    def __init__(self, depth: int = 56, widen: int = 2, in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32, dropout: float = 0.0, bn_out: bool = False,
                 bn_warm_start: bool = False, bn: bool = True, bias: bool = True) -> None:
        super().__init__()
        require_bn(bn, f"wrn{depth}_{widen}")
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"WRN depth must be 6n+2 with n >= 1 (e.g. 26, 56), got {depth}")
        if widen < 1:
            raise ValueError(f"WRN widen (the width multiplier) must be at least 1, got {widen}")
        if not 0 <= dropout < 1:  # nan passed nn.Dropout's own check and failed at the first step
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 2) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, c = [], 16
        for stage, cout in enumerate(widths):
            for i in range(n):
                blocks.append(PreActBlock(c, cout, 2 if (stage > 0 and i == 0) else 1, dropout))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  *output_layer(c, num_classes, bias, bn_out))
        if bn_warm_start:
            warm_start_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))
