"""BatchNorm options every model shares: a BN after the output layer and warm-started running stats."""

from __future__ import annotations

import torch
from torch import nn


def output_layer(fan_in: int, num_classes: int, bias: bool, bn_out: bool) -> list[nn.Module]:
    """The classifier's last linear layer, followed by a BatchNorm when ``bn_out`` (BinaryConnect's nets
    normalise the logits too: with 1-bit output weights of a small grid scale the logits would otherwise
    stay tiny and the loss stick near log(classes); with it the net's function does not depend on the
    scale of any layer's weights). The BN's shift replaces the bias."""
    out: list[nn.Module] = [nn.Linear(fan_in, num_classes, bias=bias and not bn_out)]
    if bn_out:
        out.append(nn.BatchNorm1d(num_classes))
    return out


def require_bn(bn: bool, model: str) -> None:
    """Residual nets always normalise: ``model.bn`` exists on them (methods that assume BN set it) but
    cannot be false."""
    if not bn:
        raise ValueError(f"{model} always has BatchNorm (model.bn=false is not an option for it; a method "
                         "that trains without BatchNorm, such as wage, sets it: use lenet5, vgg* or mlp there)")


def warm_start_batchnorm(model: nn.Module) -> None:
    """The first training batch a BatchNorm sees sets its running mean/variance outright (momentum 1 for
    that batch), then the usual moving average goes on.

    Why: weights on a small grid (e.g. ``s = 1e-3``) give pre-BN variances near 1e-5, and the default
    start (variance 1, momentum 0.1) needs ~150 steps to forget it; a short run, or Big SR's 8x fewer
    steps, would otherwise evaluate with inflated variances (near chance) whatever it learned. Checked
    once per module and process (a resumed run has ``num_batches_tracked > 0``)."""
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
