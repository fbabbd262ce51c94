"""The k-bit symmetric grid and its rounding functions, as pure functions (QPyTorch style).

For ``k >= 2`` the grid step is ``delta = s * 2^(1-k)`` and the grid is
``delta * {-(2^(k-1)-1), ..., 2^(k-1)-1}``: 2^k - 1 levels clipped to ``+-s(1 - 2^(1-k))``.
For ``k = 1`` the grid is ``{-s, +s}``. ``s`` is a fixed per-layer scale (see :func:`glorot_scale`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SymmetricGrid:
    """The k-bit symmetric grid of scale ``s``: levels ``index * step`` for integer
    ``index`` in ``-max_index..max_index`` (``k >= 2``), or ``{-s, +s}`` (``k = 1``, index +-1)."""

    bits: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        # a caller's bug, not user input: a method's ``bits_range`` refuses bad ``bits`` in one line first
        if int(self.bits) != self.bits or self.bits < 1:
            raise ValueError(f"a symmetric grid needs an integer bits >= 1, got {self.bits!r}")

    @property
    def step(self) -> float:
        """Grid spacing: ``scale * 2^(1-bits)`` (for 1 bit, the distance from 0 to a level)."""
        return self.scale * 2.0 ** (1 - self.bits) if self.bits >= 2 else self.scale

    @property
    def max_index(self) -> int:
        """The largest level as a multiple of :attr:`step`: ``2^(bits-1) - 1`` (1 for 1 bit)."""
        return (1 << (self.bits - 1)) - 1 if self.bits >= 2 else 1

    @property
    def limit(self) -> float:
        """Largest grid level: ``scale * (1 - 2^(1-bits))``, or ``scale`` for 1 bit."""
        return self.scale * (1.0 - 2.0 ** (1 - self.bits)) if self.bits >= 2 else self.scale

    def index(self, w: torch.Tensor) -> torch.Tensor:
        """``Q_d(w)`` as int8 grid indices: ``clamp(round(w/step), -max_index, max_index)``; 1 bit: +1 for
        ``w >= 0``, else -1."""
        if self.bits == 1:
            return (w >= 0).to(torch.int8).mul_(2).sub_(1)
        m = self.max_index
        return torch.round(w / self.step).clamp_(-m, m).to(torch.int8)


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
    g = SymmetricGrid(bits, scale)
    d, m = g.step, g.limit
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
    g = SymmetricGrid(bits, scale)
    d, m = g.step, g.limit
    # x in [-m, m] and u < 1 keep floor(x/d + u) inside the grid: no second clamp needed.
    return x.clamp(-m, m).div_(d).add_(u).floor_().mul_(d)


def on_grid(x: torch.Tensor, bits: int, scale: float = 1.0, atol: float = 0.0) -> bool:
    """True when every value of ``x`` is a level of the grid (within ``atol``)."""
    if bits == 1:
        return bool(((x.abs() - scale).abs() <= atol + 1e-7 * scale).all())
    g = SymmetricGrid(bits, scale)
    d, m = g.step, g.limit
    k = x / d
    return bool(((k - k.round()).abs() <= atol / d + 1e-5).all() and (x.abs() <= m * (1 + 1e-6)).all())
