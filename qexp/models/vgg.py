"""VGG-style nets from a layer list: VGG-7 (BinaryConnect/WAGE "VGG-BC"), VGG-9, VGG-11, and cnn6
(Lacey et al.'s six-quantized-layer MNIST setting).

Numbers are 3x3 conv widths, "M" a 2x2 max-pool; ``fc`` the hidden fully-connected widths.
``order="conv_bn_relu"`` puts the pool after the ReLU (the usual VGG); ``order="conv_pool_bn_relu"`` is
BinaryConnect's code (conv -> pool -> BN -> ReLU in a block that ends with a pool). ``bn_out`` adds a
BatchNorm after the output layer (BinaryConnect's code); ``bn_affine=False`` drops the hidden BNs' scale
and shift (Yin et al. 2019); ``bn_warm_start`` see :func:`qexp.models.bn.warm_start_batchnorm`.
"""

from __future__ import annotations

import torch
from torch import nn

from qexp.models.bn import output_layer, warm_start_batchnorm

LAYOUTS: dict[str, tuple[list[int | str], list[int]]] = {
    # 2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-FC1024-FC10 (WAGE's VGG-7)
    "vgg7": ([128, 128, "M", 256, 256, "M", 512, 512, "M"], [1024]),
    # BinaryConnect's CIFAR-10 net, (2x1024FC) head: 6 conv + 3 FC = 9 weight layers
    "vgg9": ([128, 128, "M", 256, 256, "M", 512, 512, "M"], [1024, 1024]),
    # a six-weight-layer MNIST net for Lacey et al. 2018 (their MNIST network has six quantized layers;
    # the widths are our choice, sized like LeNet-5's cost): 16C3-16C3-MP2-32C3-32C3-MP2-FC256-FC10
    "cnn6": ([16, 16, "M", 32, 32, "M"], [256]),
    # VGG-11 (configuration A), used by Yin et al. 2019 on CIFAR-10
    "vgg11": ([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], [512]),
}

ORDERS = ("conv_bn_relu", "conv_pool_bn_relu")


class VGG(nn.Module):
    def __init__(self, layout: str = "vgg7", in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32, bn: bool = True, bias: bool = True, order: str = "conv_bn_relu",
                 bn_out: bool = False, bn_affine: bool = True,
                 bn_warm_start: bool = False) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"unknown VGG layout {layout!r}; choose from {sorted(LAYOUTS)}")
        if order not in ORDERS:
            raise ValueError(f"unknown VGG block order {order!r}; choose from {ORDERS}")
        convs, fcs = LAYOUTS[layout]
        layers: list[nn.Module] = []
        c, side = in_channels, image_size
        pool_first = order == "conv_pool_bn_relu"
        for i, v in enumerate(convs):
            if v == "M":
                if not pool_first:
                    layers.append(nn.MaxPool2d(2))
                side //= 2
                continue
            layers.append(nn.Conv2d(c, int(v), 3, padding=1, bias=bias and not bn))
            if pool_first and i + 1 < len(convs) and convs[i + 1] == "M":
                layers.append(nn.MaxPool2d(2))
            if bn:
                layers.append(nn.BatchNorm2d(int(v), affine=bn_affine))
            layers.append(nn.ReLU())
            c = int(v)
        if side < 1:
            raise ValueError(f"{layout} needs larger images than {image_size} pixels")
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten()]
        fan_in = c * side * side
        for width in fcs:
            head.append(nn.Linear(fan_in, width, bias=bias and not bn))
            if bn:
                head.append(nn.BatchNorm1d(width, affine=bn_affine))
            head.append(nn.ReLU())
            fan_in = width
        self.classifier = nn.Sequential(*head, *output_layer(fan_in, num_classes, bias, bn_out))
        if bn_warm_start:
            warm_start_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
