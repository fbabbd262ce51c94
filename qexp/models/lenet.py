"""LeNet-5 as used by WAGE and Li et al. 2017: 32C5-MP2-64C5-MP2-FC512-FC10."""

from __future__ import annotations

import torch
from torch import nn

from qexp.models.bn import output_layer, warm_start_batchnorm


class LeNet5(nn.Module):
    """``bn``: BatchNorm after every hidden conv/linear layer; ``bn_out``: also after the output layer
    (as BinaryConnect's nets): with both, the function does not depend on the scale of any layer's
    weights, so a weight grid's scale only sets the step-to-grid ratio (Li et al. presets).
    ``bn_affine=false``: the hidden BatchNorms normalise without scale and shift (Yin et al. 2019's BN
    before every quantized activation). ``bn_warm_start``: every BatchNorm's running statistics start
    from the first training batch's instead of (0, 1) (see :func:`warm_start_batchnorm`)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 bn: bool = False, bias: bool = True, bn_out: bool = False,
                 bn_affine: bool = True, bn_warm_start: bool = False) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 5, bias=bias and not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(cout, affine=bn_affine))
            return layers + [nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_channels, 32), *block(32, 64))
        side = ((image_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs images of at least 16 pixels, got {image_size}")
        hidden: list[nn.Module] = [nn.Linear(64 * side * side, 512, bias=bias and not bn)]
        if bn:
            hidden.append(nn.BatchNorm1d(512, affine=bn_affine))
        self.classifier = nn.Sequential(nn.Flatten(), *hidden, nn.ReLU(),
                                        *output_layer(512, num_classes, bias, bn_out))
        if bn_warm_start:
            warm_start_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
