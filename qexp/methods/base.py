"""The method interface: hooks the training engine calls; the default implementation is float training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qexp.errors import QexpError

Evaluate = Callable[[nn.Module], dict[str, float]]


def squared_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BinaryConnect's loss: mean over the batch of sum_k max(0, 1 - t_k y_k)^2 with t in {-1, +1}."""
    t = F.one_hot(target, logits.shape[1]).to(logits.dtype) * 2 - 1
    return F.relu(1 - t * logits).pow(2).sum(1).mean()


def sum_squared_error(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """WAGE's loss: 0.5 * sum (onehot - out)^2, summed over the batch."""
    t = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return 0.5 * (t - logits).pow(2).sum()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": F.cross_entropy,
    "sqhinge": squared_hinge,
    "sse": sum_squared_error,
}


class Method:
    """Float training; quantization methods override the hooks they need.

    Subclasses declare ``bits_range`` (inclusive) and ``default_bits``; an out-of-range ``bits`` is a
    :class:`QexpError` raised before any training.
    """

    name = "float"
    bits_range: tuple[int, int] = (32, 32)
    default_bits: int = 32
    #: multiplies the configured batch size (Big SR trains with larger batches)
    batch_scale: int = 1
    #: multiplies the configured epochs (Big SR's equal-updates budget: batch_scale x the epochs)
    epoch_scale: int = 1
    #: the run's DataBundle, set by the Trainer (e.g. training batches to calibrate ranges in finalize)
    data: Any = None

    def __init__(self, bits: int | None = None, loss: str = "ce") -> None:
        self.bits = self.default_bits if bits is None else int(bits)
        lo, hi = self.bits_range
        if not lo <= self.bits <= hi:
            allowed = f"{lo}" if lo == hi else f"{lo}..{hi}"
            raise QexpError(f"method={self.name} cannot use bits={self.bits}; allowed: {allowed}")
        if loss not in LOSSES:
            raise QexpError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
        self.loss_name = loss
        self.device = torch.device("cpu")

    # ---- set-up ----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap or wrap layers once, before the optimizer is built."""
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups; a group's ``lr_scale`` multiplies the base learning rate (a group
        that sets ``lr`` itself keeps it)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return LOSSES[self.loss_name](logits, target)

    # ---- per step --------------------------------------------------------------------------------
    def before_forward(self, model: nn.Module, step: int) -> None:
        """Called before every training forward pass."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Called after ``loss.backward()``, before the optimizer step."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after every optimizer step."""

    # ---- per epoch / end -------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int) -> None:
        """Called after each finished epoch (0-based) and its evaluation."""

    def metrics(self) -> dict[str, float]:
        """Diagnostics for the epoch just finished (TensorBoard + metrics.json history)."""
        return {}

    def images(self) -> dict[str, Any]:
        """Pictures for TensorBoard after each epoch: name -> HWC uint8 array or matplotlib figure."""
        return {}

    def finalize(self, model: nn.Module, evaluate: Evaluate) -> dict[str, Any]:
        """After training: extra results for metrics.json (e.g. post-training quantization)."""
        return {}

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        """Which tensors are quantized, to how many bits, with which rounding (quant.json)."""
        n = sum(p.numel() for p in model.parameters())
        return {"method": self.name, "bits": self.bits, "layers": [],
                "weight_bytes": 4 * n, "float32_bytes": 4 * n}

    def tag(self) -> str:
        """The bits label used in result tables (WAGE writes e.g. ``2-8-8-8``)."""
        return str(self.bits)

    # ---- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
