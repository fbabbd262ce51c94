"""WAGE's number formats as pure functions (Wu et al., ICLR 2018; official TF code boluoweifenda/WAGE).

Every WAGE tensor lives on a symmetric fixed-point grid in ``[-1, 1]`` with step ``sigma(k) = 2^(1-k)``:

- ``S(k) = 2^(k-1)``, ``C(x, k) = clip(x, -1 + sigma(k), 1 - sigma(k))``, ``Q(x, k) = round(x S(k)) / S(k)``
- ``Shift(x) = 2^round(log2 x)``: the power of two nearest (in log scale) to ``x``.

``torch.round`` rounds half to even, as ``tf.round`` does in the official code, so ties resolve the same
way (this matters for exactness: a 2-bit weight of 0.25 becomes 0, not 0.5).

Deviation kept on purpose: the official ``Q`` returns ``x`` unchanged for ``k > 15``, so its 16-bit
"randomizer" quantization ``Q(eta x, k_R)`` is a no-op there; the paper (and docs/methods/wage.md) apply it, which
makes the Bernoulli draw of :func:`round_update` a comparison of a 15-bit fraction with a 15-bit random
integer (the "randomizer"). The difference in the rounding probability is below ``2^-15``.
"""

from __future__ import annotations

import math

import torch


def S(bits: int) -> float:
    """Number of grid steps per unit: ``2^(k-1)``."""
    return 2.0 ** (bits - 1)


def sigma(bits: int) -> float:
    """Grid step ``1/S(k)``."""
    return 1.0 / S(bits)


def C(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Saturate to ``[-1 + sigma(k), 1 - sigma(k)]``, the largest grid level (keeps 2^k - 1 levels)."""
    m = 1.0 - sigma(bits)
    return x.clamp(-m, m)


def Q(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest rounding (half to even) to the grid ``sigma(k) Z``; no saturation."""
    s = S(bits)
    return torch.round(x * s) / s


#: the smallest ``max|x|`` that :func:`shift_exponent` normalises (see there)
SHIFT_FLOOR = 2.0**-100


def shift_exponent(x: torch.Tensor) -> torch.Tensor:
    """``round(log2 x)`` for ``x >= 2^-100``; below (``x = 0``: an all-zero tensor) the exponent is -100.

    The paper's ``e / Shift(max|e|)`` is ``0/0`` for an all-zero tensor (NaN in the official code too), and
    one fused multiplier ``2^-p S(k)`` (``2^-p eta S(k_R)``) overflows float32 for ``p`` below about
    -108, which turns the zeros into NaN: a layer whose errors all vanish (every unit dead or saturated by
    ``QA``) poisoned the whole network. With the floor, a zero tensor stays zero (a zero error, a zero
    update) and every tensor whose largest entry is at least ``2^-100`` is scaled exactly as the paper does.

    Returned as a float tensor so it stays on the device (no host sync in the training loop).
    """
    return torch.round(torch.log2(x.clamp_min(SHIFT_FLOOR)))


def Shift(x: torch.Tensor) -> torch.Tensor:
    """``2^round(log2 x)``: the power-of-two scale WAGE divides errors and gradients by."""
    return torch.exp2(shift_exponent(x))


def quantize(x: torch.Tensor, bits: int, divide: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """``Q(C(x, k), k) / divide`` as ``round(clamp(x S, -(S-1), S-1)) / (S divide)``, in place after one copy.

    Equal to the pure composition (scaling by a power of two is exact and the clip bounds are integers
    on the scaled axis), but about 4x faster on CPU than ``fake_quantize_per_tensor_affine``, whose CPU
    kernel is not vectorised.
    """
    s = S(bits)
    y = x.mul_(s) if inplace else x * s
    return y.clamp_(1.0 - s, s - 1.0).round_().mul_(1.0 / (s * divide))


def quantize_weight(w: torch.Tensor, bits: int, alpha: float = 1.0) -> torch.Tensor:
    """The forward weight ``Q(C(W, k_W), k_W) / alpha``."""
    return quantize(w, bits, alpha)


def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q(C(x, k_A), k_A)``: its STE passes gradients only inside the clip range (see :func:`clip_grad`)."""
    return quantize(x, bits)


def clip_grad(g: torch.Tensor, x: torch.Tensor, bits: int) -> torch.Tensor:
    """The gradient of ``C(x, k)``: ``g`` where ``|x| <= 1 - sigma(k)``, else 0 (a new tensor).

    ``tf.clip_by_value`` passes the gradient at the bounds too, so the (fast, vectorised) strict
    ``hardtanh_backward`` gets the bounds moved out by one ulp.
    """
    hi = _CLIP_BOUNDS[bits, x.dtype]
    return torch.ops.aten.hardtanh_backward(g, x, -hi, hi)


def _ulp_above(m: float, dtype: torch.dtype) -> float:
    """The next value of ``dtype`` above ``m`` (a float64 ulp would round back to ``m``)."""
    t = torch.tensor(m, dtype=dtype)
    return torch.nextafter(t, t + 1).item()


#: clip_grad's bound for every bit width and float dtype, computed once: a plain Python number inside
#: the backward keeps it traceable by torch.compile (a ``.item()`` there is a graph break per step)
_CLIP_BOUNDS = {(k, d): _ulp_above(1.0 - sigma(k), d) for k in range(1, 33)
                for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}



def abs_max(x: torch.Tensor) -> torch.Tensor:
    """``max|x|`` in one vectorised pass (``vector_norm(inf)`` is much slower on CPU)."""
    lo, hi = torch.aminmax(x)
    return torch.maximum(-lo, hi)


def quantize_error(e: torch.Tensor, bits: int, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q(C(e / Shift(max|e|), k_E), k_E)``, max over the whole tensor; also returns the Shift exponent.

    The result is *not* scaled back: WAGE renormalises errors to ``[-1, 1]`` at every layer (the lost
    magnitude is absorbed by the gradient normalisation of :func:`round_update`).
    """
    p = shift_exponent(abs_max(e))
    s = S(bits)
    y = e.mul_(torch.exp2(-p) * s) if inplace else e * (torch.exp2(-p) * s)
    return y.clamp_(1.0 - s, s - 1.0).round_().mul_(1.0 / s), p


def init_limit(fan_in: int, bits: int, beta: float = 1.5) -> float:
    """Uniform init limit ``L = max(sqrt(3/n_in), L_min)`` with ``L_min = beta sigma(k_W)``."""
    return max(math.sqrt(3.0 / fan_in), beta * sigma(bits))


def weight_alpha(fan_in: int, bits: int, beta: float = 1.5) -> float:
    """``alpha = max(1, 2^round(log2(L_min / sqrt(3/n_in))))``, a power of two.

    Python 2's ``round`` (half away from zero), as in the official ``myInitializer.py``.
    """
    r = math.log2(beta * sigma(bits) / math.sqrt(3.0 / fan_in))
    e = math.floor(abs(r) + 0.5) * (1 if r >= 0 else -1)
    return max(1.0, 2.0**e)


def randomizer(shape: torch.Size | tuple[int, ...], bits_r: int, generator: torch.Generator | None,
               device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The k_R-bit random integers ``r`` in ``[0, S(k_R))`` that :func:`round_update` rounds with."""
    return torch.randint(0, int(S(bits_r)), tuple(shape), generator=generator, device=device, dtype=dtype)


def round_update_steps(g: torch.Tensor, lr: float, bits_r: int,
                       r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The number of k_G grid steps of WAGE's update (``dW = steps / S(k_G)``) and the Shift exponent.

    ``x = g / Shift(max|g|)``, ``n = Q(lr x, k_R)``, then ``n`` is rounded stochastically to one of its two
    neighbouring integers, up with probability ``frac(n)``. With ``c = n S(k_R)`` (an integer) and the
    random integer ``r`` uniform in ``[0, S(k_R))``, ``floor((c + r) / S(k_R))`` is exactly that draw:
    the same distribution as the official ``sign(n) (floor|n| + Bernoulli(frac|n|))`` (both round to a
    neighbour with the same probabilities), computed exactly in float and in few passes.
    """
    p = shift_exponent(abs_max(g))
    sr = S(bits_r)
    c = torch.mul(g, torch.exp2(-p) * (lr * sr)).round_()
    return c.add_(r).mul_(1.0 / sr).floor_(), p


def round_update(g: torch.Tensor, lr: float, bits_g: int, bits_r: int,
                 r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """WAGE's quantized SGD step ``dW = steps / S(k_G)`` (see :func:`round_update_steps`).

    ``dW`` is an integer number of k_G grid steps, so weights stay on the k_G grid.
    """
    steps, p = round_update_steps(g, lr, bits_r, r)
    return steps.mul_(1.0 / S(bits_g)), p
