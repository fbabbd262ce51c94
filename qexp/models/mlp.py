"""BinaryConnect's permutation-invariant MNIST net: flatten, ``depth`` x (Linear-BN-ReLU), Linear."""

from __future__ import annotations

import torch
from torch import nn

from qexp.models.bn import output_layer


class MLP(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 width: int = 1024, depth: int = 3, bn: bool = True, bias: bool = True,
                 dropout: float = 0.0, bn_out: bool = False) -> None:
        super().__init__()
        if width < 1 or depth < 0:
            raise ValueError(f"an MLP needs width >= 1 and depth >= 0 hidden layers, got width={width}, depth={depth}")
        if not 0 <= dropout < 1:  # nan passed nn.Dropout's own check and failed at the first step
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_channels * image_size * image_size
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width, bias=bias and not bn))
            if bn:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
            fan_in = width
        self.net = nn.Sequential(*layers, *output_layer(fan_in, num_classes, bias, bn_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
