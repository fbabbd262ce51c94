"""Affine (min/max) quantization as pure functions, uint8 storage, and calibration observers.

This is the scheme of post-training quantization (Warden 2015; Vanhoucke et al. 2011): a tensor's
range ``[lo, hi]`` is cut into ``2^k - 1`` equal steps,

    scale = (hi - lo) / (2^k - 1),   q = round((x - lo) / scale) in {0, ..., 2^k - 1},   x' = lo + q * scale

so ``q`` fits in one unsigned byte for ``k <= 8`` and ``|x - x'| <= scale / 2`` for every ``x`` in the range.
Unlike :mod:`qexp.quant.grid` (a symmetric grid with a fixed scale, used *during* training) the grid
here is fitted to the tensor after the fact and need not contain zero.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

MAX_BITS = 8  # codes are stored as uint8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"affine codes are stored as uint8: bits must be in 1..{MAX_BITS}, got {bits}")


def affine_scale(lo: float, hi: float, bits: int) -> float:
    """``(hi - lo) / (2^k - 1)``; 0 for a constant tensor (every code is 0 and ``x' = lo`` exactly)."""
    _check_bits(bits)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"invalid range [{lo}, {hi}]")
    return as_float32((hi - lo) / max_code(bits, False))


def as_float32(v: float) -> float:
    """``v`` rounded to float32: ``lo`` and ``scale`` are stored (and decoded) as float32."""
    return struct.unpack("f", struct.pack("f", v))[0]


@dataclass
class AffineCodes:
    """A quantized tensor as stored: uint8 codes plus the float32 ``lo`` and ``scale`` that decode them,
    one pair for the tensor (floats) or one per output channel (1-D tensors, ``per_channel``)."""

    q: torch.Tensor  # uint8, same shape as the original tensor
    lo: float | torch.Tensor
    scale: float | torch.Tensor
    bits: int
    symmetric: bool = False  # zero-centred grid of 2^k - 1 levels (codes 0..2^k - 2, zero exact)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if isinstance(self.scale, torch.Tensor):
            shape = (-1,) + (1,) * (self.q.dim() - 1)
            return self.q.to(dtype) * self.scale.view(shape).to(dtype) + self.lo.view(shape).to(dtype)  # type: ignore[union-attr]
        return dequantize(self.q, self.lo, self.scale, dtype)  # type: ignore[arg-type]

    @property
    def channels(self) -> int:
        """How many (lo, scale) pairs are stored: 1 per tensor, else one per output channel."""
        return self.scale.numel() if isinstance(self.scale, torch.Tensor) else 1

    @property
    def nbytes(self) -> int:
        """Bytes as stored here: one byte per code plus ``lo`` and ``scale`` as float32 (per channel)."""
        return self.q.numel() + 8 * self.channels

    @property
    def packed_nbytes(self) -> int:
        """Bytes if ``bits``-bit codes were bit-packed (the memory a k-bit format could reach)."""
        return math.ceil(self.q.numel() * self.bits / 8) + 8 * self.channels


def encode(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """uint8 codes ``clamp(round((x - lo) / scale), 0, 2^k - 1)`` for the range ``[lo, hi]``."""
    scale = affine_scale(lo, hi, bits)
    if scale == 0.0:
        return torch.zeros_like(x, dtype=torch.uint8)
    # lo/scale as float32 tensors on x's device: the same arithmetic the decoder inverts
    return torch.round((x - lo) / scale).clamp_(0, max_code(bits, False)).to(torch.uint8)


def dequantize(q: torch.Tensor, lo: float, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``lo + q * scale``: the values the quantized network actually computes with."""
    return q.to(dtype) * scale + lo


def quantize(x: torch.Tensor, bits: int, per_channel: bool = False, symmetric: bool = False) -> AffineCodes:
    """Quantize ``x`` over its own range: per tensor (per layer for a weight) or per output channel
    (dim 0); asymmetric (min/max, ``2^k`` levels) or symmetric (``+-max|x|``, ``2^k - 1`` levels)."""
    x = x.detach()
    if not per_channel and not symmetric:
        lo, hi = as_float32(float(x.min())), float(x.max())
        return AffineCodes(encode(x, bits, lo, hi), lo, affine_scale(lo, hi, bits), bits)
    _check_bits(bits)
    if bits < 2 and symmetric:
        raise ValueError("a symmetric grid needs at least 2 bits")
    flat = x.float().reshape(x.shape[0], -1) if per_channel else x.float().reshape(1, -1)
    lo_t, scale_t = grid(flat.amin(1), flat.amax(1), bits, symmetric)
    shape = (-1,) + (1,) * (x.dim() - 1) if per_channel else ()
    q = encode_grid(x, lo_t.view(shape), scale_t.view(shape), max_code(bits, symmetric))
    if per_channel:
        return AffineCodes(q, lo_t, scale_t, bits, symmetric)
    return AffineCodes(q, float(lo_t), float(scale_t), bits, symmetric)


GRIDS = ("asymmetric", "symmetric")
CALIBRATIONS = ("minmax", "percentile", "mse")


def max_code(bits: int, symmetric: bool) -> int:
    """The largest code: ``2^k - 1`` (asymmetric), ``2^k - 2`` (symmetric: an odd number of levels,
    so that zero is one of them)."""
    return 2**bits - (2 if symmetric else 1)


def grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, scale) float32 tensors of the k-bit grid covering ``[lo, hi]`` (symmetric: ``+-max(|lo|, |hi|)``)."""
    lo, hi = lo.float(), hi.float()
    if symmetric:
        m = torch.maximum(lo.abs(), hi.abs())
        return -m, 2 * m / max_code(bits, True)
    return lo, (hi - lo) / max_code(bits, False)


def encode_grid(x: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, top: int) -> torch.Tensor:
    """uint8 codes ``clamp(round((x - lo) / scale), 0, top)``; a zero scale gives code 0."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((x - lo) / safe).clamp_(0, top).to(torch.uint8)


def fake_quantize_grid(x: torch.Tensor, lo: float, scale: float, top: int) -> torch.Tensor:
    """``x`` rounded onto ``lo + scale * {0..top}`` (clipped), back in float."""
    if scale == 0.0:
        return torch.full_like(x, lo)
    return torch.round((x - lo) / scale).clamp_(0, top).mul_(scale).add_(lo)


def sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float | None:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - xq)^2)`` in dB (None: exact)."""
    x, xq = x.detach().double(), xq.detach().double()
    noise = float((x - xq).pow(2).sum())
    if noise == 0.0:
        return None
    return 10.0 * math.log10(max(float(x.pow(2).sum()), 1e-300) / noise)


def fake_quantize(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """Round ``x`` onto the k-bit grid of ``[lo, hi]`` (values outside are clipped), back in float.

    For activations, whose range comes from calibration: equal to ``dequantize(encode(x, ...))``.
    """
    scale = affine_scale(lo, hi, bits)
    if scale == 0.0:
        return torch.full_like(x, lo)
    return torch.round((x - lo) / scale).clamp_(0, max_code(bits, False)).mul_(scale).add_(lo)


class MinMaxObserver:
    """Running min and max of the tensors it sees: the activation range after calibration.

    Values are kept on the tensors' device and read back once, so calibration costs no per-batch sync.
    """

    def __init__(self) -> None:
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None
        self.batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min(), x.detach().max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        self.batches += 1

    def range(self) -> tuple[float, float]:
        if self._lo is None or self._hi is None:
            raise RuntimeError("observer saw no data: calibrate before quantizing activations")
        return float(self._lo), float(self._hi)


#: values kept per calibration batch (a fixed-seed random subset) and in all, per observed tensor
SAMPLES_PER_BATCH, MAX_SAMPLES = 4096, 1 << 16
#: candidate clip ranges the MSE calibration tries, as fractions of the min/max range
MSE_GRID = 100


class RangeObserver(MinMaxObserver):
    """Running min/max plus a fixed-seed random sample of the values seen (for percentile and MSE
    calibration and the activation SQNR)."""

    def __init__(self) -> None:
        super().__init__()
        self._samples: list[torch.Tensor] = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        if self._kept >= MAX_SAMPLES:
            return
        flat = x.detach().reshape(-1)
        n = min(SAMPLES_PER_BATCH, MAX_SAMPLES - self._kept)
        if flat.numel() > n:  # a random subset (a stride would alias with the layout)
            flat = flat[torch.randint(flat.numel(), (n,), generator=self._gen).to(flat.device)]
        self._samples.append(flat.float())
        self._kept += flat.numel()

    def sample(self) -> torch.Tensor:
        if not self._samples:
            raise RuntimeError("observer saw no data: calibrate before quantizing activations")
        return torch.cat(self._samples)


def calibrate(obs: RangeObserver, bits: int, method: str = "minmax", symmetric: bool = False,
              percentile: float = 99.99) -> tuple[float, float]:
    """The clip range ``[lo, hi]`` of an activation: the observed min/max, the ``percentile``-th and
    ``(100 - percentile)``-th percentiles of the sample, or the min/max range scaled by the factor
    (of :data:`MSE_GRID` in (0, 1]) that minimises the sample's quantization MSE on the k-bit grid."""
    lo, hi = obs.range()
    if method == "minmax":
        return lo, hi
    v = obs.sample()
    if method == "percentile":
        q = torch.quantile(v, torch.tensor([1 - percentile / 100, percentile / 100], device=v.device))
        return min(float(q[0]), 0.0) if lo < 0 else lo, float(q[1])
    if method != "mse":
        raise ValueError(f"unknown calibration {method!r}; choose from {CALIBRATIONS}")
    c = torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID, device=v.device)[:, None]
    lo_c, scale_c = grid(lo * c, hi * c, bits, symmetric)
    top = max_code(bits, symmetric)
    safe = torch.where(scale_c > 0, scale_c, torch.ones_like(scale_c))
    fq = torch.round((v[None] - lo_c) / safe).clamp_(0, top).mul_(scale_c).add_(lo_c)
    best = float(c[int((fq - v[None]).pow_(2).mean(1).argmin())])
    return lo * best, hi * best
