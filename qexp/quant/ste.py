"""Straight-through estimators: forward a quantizer, backward the identity (or a masked identity)."""

from __future__ import annotations

import torch


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value ``q``, gradient w.r.t. ``x`` equal to the upstream gradient (``dq/dx := 1``)."""
    return x + (q - x).detach()


def straight_through_masked(x: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Value ``q``, gradient passed only where ``mask`` is true (e.g. inside a clip range)."""
    m = mask.to(x.dtype)
    return x * m - (x * m).detach() + q.detach()
