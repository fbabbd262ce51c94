"""WAGE's quantizers as modules: weight parametrization (W), activation + error quantizer (A, E).

Each is an autograd function rather than ``x + (q - x).detach()`` so that the backward is one saved
mask and a few fused elementwise ops: this keeps WAGE's step time near float training's.
The modules also declare their integer semantics (``integer_op``) for :mod:`qexp.methods.wage.integer`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qexp.methods.wage import formats as wage


class ShiftStats(nn.Module):
    """Running sum of Shift exponents seen by one quantizer (on the device: no host sync per step)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("total", torch.zeros(()), persistent=False)
        self.count = 0

    def add(self, exponent: torch.Tensor) -> None:
        self.total += exponent.detach()
        self.count += 1

    def mean_and_reset(self) -> float | None:
        if self.count == 0:
            return None
        m = self.total.item() / self.count
        self.total.zero_()
        self.count = 0
        return m

    def state(self) -> dict[str, Any]:
        return {"total": self.total.detach().cpu(), "count": self.count}

    def load(self, s: dict[str, Any]) -> None:
        self.total.copy_(s["total"])
        self.count = int(s["count"])


class _WeightFn(torch.autograd.Function):
    """``Q(C(W, k_W), k_W) / alpha`` forward, identity backward (the official ``W`` straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, alpha: float) -> torch.Tensor:  # type: ignore[override]
        return wage.quantize_weight(w, bits, alpha)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return g, None, None


class WageWeight(nn.Module):
    """Parametrization: ``layer.weight`` is the k_W-bit weight divided by the layer scale alpha."""

    def __init__(self, bits: int, alpha: float) -> None:
        super().__init__()
        self.bits, self.alpha = bits, float(alpha)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _WeightFn.apply(w, self.bits, self.alpha)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, alpha={self.alpha:g}"


class _ActErrorFn(torch.autograd.Function):
    """Forward ``QA = Q(C(x, k_A), k_A)``; backward: zero outside the clip range, then ``QE`` (if any)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits_a: int, bits_e: int | None,  # type: ignore[override]
                stats: ShiftStats | None) -> torch.Tensor:
        ctx.bits_a, ctx.bits_e, ctx.stats = bits_a, bits_e, stats
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)  # usually the ReLU's saved output already: no extra memory
        return wage.quantize_activation(x, bits_a)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        g = wage.clip_grad(g, x, ctx.bits_a)
        if ctx.bits_e is not None:
            g, p = wage.quantize_error(g, ctx.bits_e, inplace=True)
            if ctx.stats is not None:
                ctx.stats.add(p)
        return g, None, None, None


class _ErrorFn(torch.autograd.Function):
    """Identity forward; ``QE`` backward (the output layer's error, before any activation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bits_e: int, stats: ShiftStats | None) -> torch.Tensor:  # type: ignore[override]
        ctx.bits_e, ctx.stats = bits_e, stats
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        q, p = wage.quantize_error(g, ctx.bits_e)
        if ctx.stats is not None:
            ctx.stats.add(p)
        return q, None, None


class WageActivation(nn.Module):
    """``QE`` then ``QA`` after a ReLU (or its max-pool): k_A-bit values forward, k_E-bit errors backward.

    ``bits_e=None`` gives the bare ``QA`` (the network input, where no error is propagated).
    """

    def __init__(self, bits_a: int, bits_e: int | None) -> None:
        super().__init__()
        self.bits_a, self.bits_e = bits_a, bits_e
        self.error_shift = ShiftStats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ActErrorFn.apply(x, self.bits_a, self.bits_e, self.error_shift)

    def integer_op(self) -> dict[str, Any]:
        """Requantize to codes ``round(x 2^(k-1))`` clipped to ``+-(2^(k-1) - 1)``."""
        return {"kind": "requant", "exponent": 1 - self.bits_a, "max_code": int(wage.S(self.bits_a)) - 1}

    def extra_repr(self) -> str:
        return f"bits_a={self.bits_a}, bits_e={self.bits_e}"


class WageError(nn.Module):
    """The output's ``QE``: identity forward, the loss gradient quantized to k_E bits backward."""

    def __init__(self, bits_e: int) -> None:
        super().__init__()
        self.bits_e = bits_e
        self.error_shift = ShiftStats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ErrorFn.apply(x, self.bits_e, self.error_shift)

    def integer_op(self) -> dict[str, Any]:
        return {"kind": "identity"}

    def extra_repr(self) -> str:
        return f"bits_e={self.bits_e}"


class WageNetwork(nn.Module):
    """The float model between the input ``QA`` and the output ``QE`` (which the model itself lacks).

    ``qa_logits``: the logits pass ``QA`` (clip to ``+-(1 - 2^(1-k_A))``, k_A bits) before ``QE``, as the
    official MNIST LeNet-5 does (its CIFAR VGG-7 does not).
    """

    def __init__(self, net: nn.Module, bits_a: int, bits_e: int, qa_logits: bool = False) -> None:
        super().__init__()
        self.input_quant = WageActivation(bits_a, None)
        self.net = net
        self.output_quant = WageActivation(bits_a, None) if qa_logits else nn.Identity()
        self.output_error = WageError(bits_e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_error(self.output_quant(self.net(self.input_quant(x))))
