"""LeNet-5 as used by WAGE and Li et al. 2017: 32C5-MP2-64C5-MP2-FC512-FC10."""

from __future__ import annotations

import torch
from torch import nn


class LeNet5(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 bn: bool = False, bias: bool = True) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, bias=bias and not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_channels, 32), *block(32, 64))
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs images of at least 16 pixels, got {image_size}")
        hidden: list[nn.Module] = [nn.Linear(64 * side * side, 512, bias=bias and not bn)]
        if bn:
            hidden.append(nn.BatchNorm1d(512))
        self.classifier = nn.Sequential(nn.Flatten(), *hidden, nn.ReLU(), nn.Linear(512, num_classes, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
