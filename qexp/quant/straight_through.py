"""Straight-through estimator: forward a quantized value, backward the upstream gradient unchanged."""

from __future__ import annotations

from typing import Any

import torch


class _StraightThrough(torch.autograd.Function):
    """Forward ``q`` (already computed), backward the upstream gradient unchanged: one pass, no
    ``x + (q - x).detach()`` arithmetic. Written in the ``setup_context`` style with a generated vmap
    rule so that it also runs under ``torch.func.vmap`` (seeds stacked in one model)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value ``q``, gradient w.r.t. ``x`` equal to the upstream gradient (``dq/dx := 1``)."""
    return _StraightThrough.apply(x, q)
