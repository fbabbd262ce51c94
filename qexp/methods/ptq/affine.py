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


def levels(bits: int) -> int:
    """Number of codes: ``2^bits``."""
    return 2**bits


def affine_scale(lo: float, hi: float, bits: int) -> float:
    """``(hi - lo) / (2^k - 1)``; 0 for a constant tensor (every code is 0 and ``x' = lo`` exactly)."""
    _check_bits(bits)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise ValueError(f"invalid range [{lo}, {hi}]")
    return as_float32((hi - lo) / (levels(bits) - 1))


def as_float32(v: float) -> float:
    """``v`` rounded to float32: ``lo`` and ``scale`` are stored (and decoded) as float32."""
    return struct.unpack("f", struct.pack("f", v))[0]


@dataclass
class AffineCodes:
    """A quantized tensor as stored: uint8 codes plus the two float32 numbers that decode them."""

    q: torch.Tensor  # uint8, same shape as the original tensor
    lo: float
    scale: float
    bits: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.lo, self.scale, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes as stored here: one byte per code plus ``lo`` and ``scale`` as float32."""
        return self.q.numel() + 8

    @property
    def packed_nbytes(self) -> int:
        """Bytes if ``bits``-bit codes were bit-packed (the memory a k-bit format could reach)."""
        return math.ceil(self.q.numel() * self.bits / 8) + 8


def encode(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """uint8 codes ``clamp(round((x - lo) / scale), 0, 2^k - 1)`` for the range ``[lo, hi]``."""
    scale = affine_scale(lo, hi, bits)
    if scale == 0.0:
        return torch.zeros_like(x, dtype=torch.uint8)
    # lo/scale as float32 tensors on x's device: the same arithmetic the decoder inverts
    return torch.round((x - lo) / scale).clamp_(0, levels(bits) - 1).to(torch.uint8)


def dequantize(q: torch.Tensor, lo: float, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``lo + q * scale``: the values the quantized network actually computes with."""
    return q.to(dtype) * scale + lo


def quantize(x: torch.Tensor, bits: int) -> AffineCodes:
    """Quantize ``x`` over its own min/max range (per tensor, i.e. per layer for a weight)."""
    x = x.detach()
    lo, hi = as_float32(float(x.min())), float(x.max())
    return AffineCodes(encode(x, bits, lo, hi), lo, affine_scale(lo, hi, bits), bits)


def fake_quantize(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """Round ``x`` onto the k-bit grid of ``[lo, hi]`` (values outside are clipped), back in float.

    For activations, whose range comes from calibration: equal to ``dequantize(encode(x, ...))``.
    """
    scale = affine_scale(lo, hi, bits)
    if scale == 0.0:
        return torch.full_like(x, lo)
    return torch.round((x - lo) / scale).clamp_(0, levels(bits) - 1).mul_(scale).add_(lo)


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
