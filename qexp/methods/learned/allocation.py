"""Layer-wise bit allocation under a fixed total budget (Lacey, Taylor, Areibi 2018).

A budget of ``T`` bits is shared by ``L`` layers; every layer keeps ``min_bits`` and the
``F = T - L * min_bits`` free bits are drawn one by one from a Gumbel-softmax over the layers (hard
one-hot forward, soft gradient backward), a layer that reached ``max_bits`` being masked out, so every
draw sums to exactly ``T``. A layer quantizes its weights with ``Q_d`` on the k-bit grid of
:mod:`qexp.quant.grid` (the fused :func:`qexp.quant.kernels.nearest`) at its integer bit-width ``b``;
the gradient with respect to ``b`` is the forward difference ``Q(w, b + 1) - Q(w, b)`` (the quantized
weight interpolated linearly between integer widths).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qexp.errors import QexpError
from qexp.quant.kernels import nearest
from qexp.quant.straight_through import straight_through


def check_budget(layers: int, bits: int, min_bits: int, max_bits: int) -> None:
    """``min_bits <= bits <= max_bits`` is what makes a total of ``bits * layers`` reachable."""
    if layers < 1:
        raise QexpError("learned precision needs at least one conv/linear layer to quantize")
    if not 1 <= min_bits <= max_bits:
        raise QexpError(f"need 1 <= min_bits <= max_bits, got min_bits={min_bits}, max_bits={max_bits}")
    if not min_bits <= bits <= max_bits:
        raise QexpError(f"bits={bits} (average bits per layer) must lie in "
                        f"[min_bits, max_bits] = [{min_bits}, {max_bits}]")


def allocation_string(bits: list[int]) -> str:
    """The paper's notation: ``235466``; widths of 10 or more are separated by dashes (``2-10-4``)."""
    if all(b < 10 for b in bits):
        return "".join(str(b) for b in bits)
    return "-".join(str(b) for b in bits)


def most_likely_counts(logits: torch.Tensor, free: int, cap: int) -> list[int]:
    """The mode of ``Multinomial(free, softmax(logits))`` restricted to counts ``<= cap``.

    Its log-likelihood ``sum_l n_l log p_l - log n_l!`` is separable and concave in each ``n_l``, so
    handing out bits one at a time to the largest marginal gain ``log p_l - log(n_l + 1)`` is exact.
    Ties go to the earlier layer (uniform logits give the uniform allocation when it exists).
    """
    logp = torch.log_softmax(logits.detach().double().cpu(), 0).tolist()
    counts = [0] * len(logp)
    for _ in range(free):
        best, gain = -1, -math.inf
        for i, lp in enumerate(logp):
            if counts[i] < cap:
                g = lp - math.log(counts[i] + 1)
                if g > gain:
                    best, gain = i, g
        counts[best] += 1
    return counts


@dataclass
class Draw:
    """One sampled allocation: integer extra bits per layer (host) and the soft surrogate (device)."""

    counts: list[int]
    #: ``S - S.detach()`` where ``S`` sums the soft one-hots: zero valued, carries d/d logits
    soft: torch.Tensor | None


def sample_counts(logits: torch.Tensor, free: int, cap: int, tau: float,
                  generator: torch.Generator | None = None) -> Draw:
    """Draw ``free`` bits one by one from the straight-through Gumbel-softmax over layers.

    Draw ``j`` uses Gumbel noise ``g_j``; its hard one-hot is ``argmax(logits + g_j)`` over the layers
    that have not reached ``cap`` extra bits, its soft one-hot ``softmax((logits + g_j) / tau)`` over
    the same layers. The counts sum to ``free`` exactly. The draws run vectorised; only when a layer
    would exceed ``cap`` are they redone sequentially with the mask (same noise, so same result as
    the sequential definition).
    """
    n = logits.numel()
    if not 0 <= free <= n * cap:
        raise ValueError(f"{free} free bits cannot be spread over {n} layers of at most {cap} extra bits")
    if free == 0:
        return Draw([0] * n, None)
    u = torch.rand((free, n), generator=generator, device=logits.device, dtype=logits.dtype)
    g = -torch.log(-torch.log(u.clamp_(min=torch.finfo(u.dtype).tiny)))
    z = logits.detach() + g
    choice = z.argmax(1)
    counts = torch.bincount(choice, minlength=n).tolist()
    avail: torch.Tensor | None = None
    if max(counts) == cap:  # no draw hit a full layer, but later draws' soft parts must skip it
        one_hot = F.one_hot(choice, n)
        avail = (one_hot.cumsum(0) - one_hot) < cap
    elif max(counts) > cap:  # masking changes some draws: replay them in order on the host
        zs = z.cpu().tolist()
        counts = [0] * n
        mask = []
        for row in zs:
            open_ = [c < cap for c in counts]
            mask.append(open_)
            best = max((v, -i) for i, v in enumerate(row) if open_[i])
            counts[-best[1]] += 1
        avail = torch.tensor(mask, device=logits.device)
    soft = None
    if logits.requires_grad and torch.is_grad_enabled():
        s = (logits + g) / tau
        if avail is not None:
            s = s.masked_fill(~avail, -math.inf)
        total = F.softmax(s, 1).sum(0)
        soft = total - total.detach()
    return Draw(counts, soft)


class BitSource:
    """Where each layer's quantizer reads its bit-width: the step's draw in training, else ``eval_bits``.

    ``eval_bits`` comes from ``mode()`` (the most likely allocation), recomputed lazily after
    :meth:`invalidate` so that training steps never pay for it.
    """

    def __init__(self, bits: list[int], mode: Callable[[], list[int]] | None = None) -> None:
        self.train_bits = list(bits)
        self.soft: torch.Tensor | None = None
        self.mode = mode
        self._eval_bits: list[int] | None = list(bits)

    @property
    def eval_bits(self) -> list[int]:
        if self._eval_bits is None:
            assert self.mode is not None
            self._eval_bits = list(self.mode())
        return self._eval_bits

    def invalidate(self) -> None:
        self._eval_bits = None if self.mode is not None else self._eval_bits


class LearnedBitsQuantizer(nn.Module):
    """Weight parametrization: ``Q_d(w)`` at the layer's current bit-width, straight through to ``w``.

    In training with a soft surrogate present, adds ``(b - b.detach()) * (Q(w, b+1) - Q(w, b))``: zero
    in value, it routes ``sum(grad * forward difference)`` to the bit-width and on to the logits.
    """

    def __init__(self, scale: float, index: int, source: BitSource) -> None:
        super().__init__()
        self.scale, self.index, self.source = float(scale), index, source

    def bits(self) -> int:
        src = self.source
        return (src.train_bits if self.training else src.eval_bits)[self.index]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        k = self.bits()
        with torch.no_grad():
            q = nearest(w, k, self.scale)
        out = straight_through(w, q)
        soft = self.source.soft
        if self.training and soft is not None and torch.is_grad_enabled():
            with torch.no_grad():
                diff = nearest(w, k + 1, self.scale).sub_(q)
            out = out + soft[self.index].to(w.dtype) * diff
        return out

    def extra_repr(self) -> str:
        return f"index={self.index}, scale={self.scale:.4g}"
