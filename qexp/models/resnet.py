"""ResNets: the CIFAR family (depth 6n+2, He et al. 2016, option-A shortcuts) and ImageNet ResNet-18."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qexp.models.bn import output_layer, require_bn, warm_start_batchnorm


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Option A: subsample and zero-pad channels, no parameters (the CIFAR ResNet paper's choice).
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``bn_out``: a BatchNorm after the output layer; ``bn_warm_start``: running stats start from the
    first batch (both :mod:`qexp.models.bn`, for the li2017 presets' binary output weights). ``bias``: the
    output layer's bias, the net's only one (a BatchNorm follows every conv)."""

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
                 image_size: int = 32, width: int = 16, bn_out: bool = False,
                 bn_warm_start: bool = False, bn: bool = True, bias: bool = True) -> None:
        super().__init__()
        require_bn(bn, f"resnet{depth}")
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        if width < 1:
            raise ValueError(f"CIFAR ResNet width (the first stage's channels) must be at least 1, got {width}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, c = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(c, cout, 2 if (stage > 0 and i == 0) else 1))
                c = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  *output_layer(c, num_classes, bias, bn_out))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if bn_warm_start:
            warm_start_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def resnet18(in_channels: int = 3, num_classes: int = 1000, image_size: int = 224, bn: bool = True,
             bias: bool = True) -> nn.Module:
    """torchvision's ImageNet ResNet-18 (random init); a 1-channel stem when the data is grey; ``bias``:
    the output layer's (the only one)."""
    require_bn(bn, "resnet18")
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    if not bias:
        model.fc = nn.Linear(model.fc.in_features, num_classes, bias=False)
    return model
