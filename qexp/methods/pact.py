"""PACT (Choi et al. 2018): ``method=pact``, a learned clipping level per activation layer.

Every ``nn.ReLU`` becomes ``y = clip(x, 0, alpha)`` quantized to ``abits`` bits on ``[0, alpha]``:
``y_q = round(y (2^k - 1) / alpha) alpha / (2^k - 1)``. Backward (the paper's eq. 3, straight-through
on the rounding): ``dy_q/dx = 1`` on ``[0, alpha)`` and 0 elsewhere; ``dy_q/dalpha = 1{x >= alpha}``,
so alpha's gradient is the upstream gradient summed over the clipped entries. ``alpha_l2`` adds
``lambda * sum alpha^2`` to the loss (the paper's L2 regularisation of alpha); the alphas get no
weight decay besides. Weights are DoReFa's (:mod:`qexp.methods.dorefa`, tanh-normalised, ``bits``);
the first and last layer keep float weights by default, as in the paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError
from qexp.methods.dorefa import DoReFa
from qexp.quant.activation import max_index
from qexp.quant.format import float_format, uniform
from qexp.quant.format import row as format_row
from qexp.quant.kernels import host_scalars
from qexp.quant.layers import FLOAT_BITS


class PACTFunction(torch.autograd.Function):
    """Clip to ``[0, alpha]`` and quantize; backward as in the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, alpha)
        return pact_quantize(x, alpha, bits)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        if host_scalars(x):  # host scalar: the one-pass kernel (open interval: x = 0 has measure 0)
            a = float(alpha)
            grad_x = torch.ops.aten.hardtanh_backward(grad, x, 0.0, a)
            clipped = x >= a
        else:
            clipped = x >= alpha
            grad_x = grad * ((x >= 0) & ~clipped)
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = torch.where(clipped, grad, 0).sum().reshape(alpha.shape)
        return grad_x, grad_alpha, None


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """``round(clip(x, 0, alpha) n / alpha) alpha / n`` with ``n = 2^k - 1`` (no gradient bookkeeping);
    ``bits=32``: the clip alone (a float last layer's input)."""
    if bits == FLOAT_BITS:
        return torch.minimum(x.clamp(min=0), alpha.to(x.dtype))
    n = max_index(bits)
    if host_scalars(x):
        a = float(alpha)
        return x.clamp(0.0, a).mul_(n / a).round_().mul_(a / n)
    return torch.minimum(x.clamp(min=0), alpha).mul_(n / alpha).round_().mul_(alpha / n)


class PACTReLU(nn.Module):
    """Drop-in for ``nn.ReLU`` with a learned clipping level ``alpha`` (an ``nn.Parameter``)."""

    def __init__(self, bits: int, alpha: float = 10.0) -> None:
        super().__init__()
        self.bits = bits
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.to(x.dtype)
        if torch.is_grad_enabled():
            return PACTFunction.apply(x, alpha, self.bits)
        return pact_quantize(x, alpha, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={float(self.alpha.detach()):.4g}"


#: the paper's initial clipping level
PAPER_ALPHA = 10.0


def default_alpha(abits: int) -> float:
    """The initial clipping level: the paper's 10 at 2+ activation bits. At 1 bit the only levels are 0
    and alpha and the only rounding threshold is alpha/2: at 10 every BatchNorm'd input rounds to 0 and
    the net does not learn (W1A1 LeNet-5, 5,000 MNIST images, 1 epoch: 85.7-86.0% validation error,
    seeds 0-1); 10/3 puts that threshold where the paper's 2-bit grid has its first one (alpha/6 at 10):
    4.2-4.4% validation error, the same runs (chosen on the validation split, not the test set)."""
    return PAPER_ALPHA if abits != 1 else PAPER_ALPHA / 3


class PACT(DoReFa):
    """``method=pact``. Options: ``abits`` (1..8, 32 = float ReLUs; null: same as ``bits``),
    ``alpha_init`` (null: :func:`default_alpha`), ``alpha_l2`` (lambda of the L2 term on alpha),
    ``alpha_lr_scale`` (learning-rate multiplier of the alphas), ``first_last_bits`` (32 = float weights,
    the paper)."""

    bits_range = (1, 8)
    abits_range = (1, 8)

    def __init__(self, bits: int | None = None, loss: str = "ce", abits: int | None = None,
                 first_last_bits: int | None = FLOAT_BITS, alpha_init: float | None = None,
                 alpha_l2: float = 2e-4, alpha_lr_scale: float = 1.0) -> None:
        super().__init__(bits, loss, abits=abits, gbits=None, first_last_bits=first_last_bits)
        if alpha_init is None:
            alpha_init = default_alpha(self.abits)  # type: ignore[arg-type]
        if not float(alpha_init) > 0:
            raise QexpError(f"method.alpha_init must be positive, got {alpha_init}")
        if not float(alpha_l2) >= 0:
            raise QexpError(f"method.alpha_l2 must be >= 0, got {alpha_l2}")
        if not float(alpha_lr_scale) > 0:
            raise QexpError(f"method.alpha_lr_scale must be positive, got {alpha_lr_scale}")
        self.alpha_init, self.alpha_l2 = float(alpha_init), float(alpha_l2)
        self.alpha_lr_scale = float(alpha_lr_scale)

    def activation(self, name: str) -> nn.Module:
        return PACTReLU(self.abits, self.alpha_init)  # type: ignore[arg-type]

    def float_activation(self) -> nn.Module:
        """A float last layer's input: the learned clip, not rounded."""
        return PACTReLU(FLOAT_BITS, self.alpha_init)

    def alphas(self) -> list[nn.Parameter]:
        return [m.alpha for _, m in self.activations]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        alphas = self.alphas()
        ids = {id(a) for a in alphas}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups: list[dict[str, Any]] = [{"params": rest, "name": "float"}]
        if alphas:
            groups.append({"params": alphas, "lr_scale": self.alpha_lr_scale, "weight_decay": 0.0,
                           "name": "alpha"})
        return groups

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        alphas = self.alphas()
        if not alphas or self.alpha_l2 == 0:
            return None
        return self.alpha_l2 * torch.stack([a.pow(2) for a in alphas]).sum()

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for a in self.alphas():
            a.clamp_(min=1e-3)  # a clipping level must stay positive

    def metrics(self) -> dict[str, float]:
        """Each activation layer's clipping level ``alpha/<name>``."""
        return {f"alpha/{n}": float(m.alpha.detach()) for n, m in self.activations}

    def _activation_row(self, name: str, module: nn.Module) -> dict[str, Any]:
        a, n = float(module.alpha.detach()), max_index(module.bits)
        fmt = (float_format(name, "activation") if module.bits == FLOAT_BITS
               else uniform(name, module.bits, a / n, 0, n, tensor="activation"))
        return format_row(fmt, range=[0.0, a], alpha=a)

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        return {**super().manifest(model), "alpha_l2": self.alpha_l2}

    def bits_label(self) -> str:
        return f"w{self.bits}a{self.abits}"
