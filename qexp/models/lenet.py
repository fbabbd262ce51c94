"""LeNet-5 as used by WAGE and Li et al. 2017: 32C5-MP2-64C5-MP2-FC512-FC10."""

from __future__ import annotations

import torch
from torch import nn


def warm_start_batchnorm(model: nn.Module) -> None:
    """The first training batch a BatchNorm sees sets its running mean/variance outright (momentum 1 for
    that batch), then the usual moving average goes on.

    Why: weights on a grid of scale ``s = 1e-3`` (the li2017 presets) give pre-BN variances near 1e-5,
    and the default start (variance 1, momentum 0.1) needs ~150 steps to forget it; a short run, or Big
    SR's 8x fewer steps, would otherwise evaluate with inflated variances (near chance) whatever it
    learned. Checked once per module and process (a resumed run has ``num_batches_tracked > 0``)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m._warm_pending = True
            m.register_forward_pre_hook(_warm_pre)
            m.register_forward_hook(_warm_post)


def _warm_pre(m: nn.Module, args: tuple) -> None:
    if m._warm_pending and m.training:
        m._warm_pending = False
        if int(m.num_batches_tracked) == 0:
            m._momentum_after, m.momentum = m.momentum, 1.0


def _warm_post(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
    if hasattr(m, "_momentum_after"):
        m.momentum = m._momentum_after
        del m._momentum_after


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
        out: list[nn.Module] = [nn.Linear(512, num_classes, bias=bias and not bn_out)]
        if bn_out:
            out.append(nn.BatchNorm1d(num_classes))
        self.classifier = nn.Sequential(nn.Flatten(), *hidden, nn.ReLU(), *out)
        if bn_warm_start:
            warm_start_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
