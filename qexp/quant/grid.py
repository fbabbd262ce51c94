"""The k-bit symmetric grid and its rounding functions, as pure functions (QPyTorch style).

For ``k >= 2`` the grid step is ``delta = s * 2^(1-k)`` and the grid is
``delta * {-(2^(k-1)-1), ..., 2^(k-1)-1}``: 2^k - 1 levels clipped to ``+-s(1 - 2^(1-k))``.
For ``k = 1`` the grid is ``{-s, +s}``. ``s`` is a fixed per-layer scale (see :func:`glorot_scale`).
"""

from __future__ import annotations

import math

import torch


def step(bits: int, scale: float = 1.0) -> float:
    """Grid spacing: ``scale * 2^(1-bits)`` (for 1 bit, the distance from 0 to a level)."""
    return scale * 2.0 ** (1 - bits) if bits >= 2 else scale


def limit(bits: int, scale: float = 1.0) -> float:
    """Largest grid level: ``scale * (1 - 2^(1-bits))``, or ``scale`` for 1 bit."""
    return scale * (1.0 - 2.0 ** (1 - bits)) if bits >= 2 else scale


def glorot_scale(weight: torch.Tensor) -> float:
    """Default per-layer scale: the Glorot-uniform limit sqrt(6 / (fan_in + fan_out))."""
    fan_out = weight.shape[0]
    fan_in = weight[0].numel()
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    return math.sqrt(6.0 / (fan_in + fan_out * receptive))


def quantize_nearest(x: torch.Tensor, bits: int, scale: float = 1.0) -> torch.Tensor:
    """Nearest rounding onto the grid, ``Q_d``; 1 bit is ``scale * sign(x)`` with sign(0) = +1."""
    if bits == 1:
        return torch.where(x >= 0, scale, -scale).to(x.dtype)
    d, m = step(bits, scale), limit(bits, scale)
    return torch.round(x.clamp(-m, m) / d) * d


def quantize_stochastic(x: torch.Tensor, bits: int, scale: float = 1.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Stochastic rounding ``Q_s``: unbiased (``E[Q_s(x)] = x``) for x inside the grid's range.

    Implemented as ``floor(x/d + u) * d`` with ``u ~ U[0, 1)``, which rounds up with probability
    equal to the fractional part. 1 bit: ``+scale`` with probability ``(x/scale + 1)/2`` (BinaryConnect).
    """
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if bits == 1:
        p = (x / scale + 1) * 0.5
        return torch.where(u < p, scale, -scale).to(x.dtype)
    d, m = step(bits, scale), limit(bits, scale)
    # x in [-m, m] and u < 1 keep floor(x/d + u) inside the grid: no second clamp needed.
    return x.clamp(-m, m).div_(d).add_(u).floor_().mul_(d)


def on_grid(x: torch.Tensor, bits: int, scale: float = 1.0, atol: float = 0.0) -> bool:
    """True when every value of ``x`` is a level of the grid (within ``atol``)."""
    if bits == 1:
        return bool(((x.abs() - scale).abs() <= atol + 1e-7 * scale).all())
    d, m = step(bits, scale), limit(bits, scale)
    k = x / d
    return bool(((k - k.round()).abs() <= atol / d + 1e-5).all() and (x.abs() <= m * (1 + 1e-6)).all())
