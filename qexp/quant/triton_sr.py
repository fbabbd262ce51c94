"""Stochastic rounding of a CUDA tensor in one Triton kernel, bit-identical to the eager passes.

Why: on a GPU the eager SR (:func:`qexp.quant.kernels.stochastic_round_`) is about ten small launches
per tensor (its thresholds XORed into a workspace, then scale, add, round, clamp, rescale), and the
torch.compile'd body pays Dynamo's guards and a host-to-device copy of its scalars per call. This kernel
reads each weight once, forms its threshold ``t = a[r] ^ b[k] ^ c[r + k]`` in registers from the same
three short seeded vectors (:class:`qexp.quant.kernels.Noise`; no random tensor of the weights' size),
and writes the rounded weight back: the three small ``randint`` draws and one launch.

Same values as the eager passes, operation for operation: ``x·(1/Δ)`` rounded, plus the threshold
``t·2^-16`` (an exact product), clamped to ``[-L, L]`` (clamping before rounding gives the same integer
for an integer ``L``), rounded half to even with the ``(y + 1.5·2^23) - 1.5·2^23`` identity (exact for
``|y| <= 2^22``; a zero keeps ``y``'s sign, as ``torch.round`` does), times ``Δ``; 1 bit: the sign of
``fma(t, -s/2^15, x)`` (as the eager ``add_(t, alpha)`` computes it on CPU; the check on first use
confirms the GPU's), ``±s``. Compiled with
floating-point contraction off, so no other multiply-add is fused. Checked against the eager kernel on
first use in a process (a mismatch or a failure to compile: one warning, and the eager kernel).

Imported only where Triton is there (:func:`qexp.quant.kernels.use_triton`). Tests run it on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from qexp.quant.grid import SymmetricGrid
from qexp.quant.kernels import COLS

BLOCK = 1024


@triton.jit
def _noise(a_ptr, b_ptr, c_ptr, offs, mask, COLS: tl.constexpr):
    r = offs // COLS
    k = offs - r * COLS
    a = tl.load(a_ptr + r, mask=mask, other=0)
    b = tl.load(b_ptr + k, mask=mask, other=0)
    c = tl.load(c_ptr + r + k, mask=mask, other=0)
    return (a ^ b ^ c).to(tl.float32)


@triton.jit
def _sr_grid(x_ptr, a_ptr, b_ptr, c_ptr, n, inv_step, top, step, COLS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = _noise(a_ptr, b_ptr, c_ptr, offs, mask, COLS)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    y = x * inv_step
    y = y + t * (1.0 / 65536.0)
    y = tl.minimum(tl.maximum(y, -top), top)
    r = (y + 12582912.0) - 12582912.0  # 1.5·2^23: to an integer, ties to even (|y| <= 2^22)
    r = tl.where(r == 0.0, y * 0.0, r)
    tl.store(x_ptr + offs, r * step, mask=mask)


@triton.jit
def _sr_binary(x_ptr, a_ptr, b_ptr, c_ptr, n, alpha, scale, COLS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = _noise(a_ptr, b_ptr, c_ptr, offs, mask, COLS)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    k = tl.fma(t, alpha, x)
    tl.store(x_ptr + offs, tl.where(k > 0.0, scale, -scale), mask=mask)


def sr_(x: torch.Tensor, bits: int, scale: float, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    """Round the contiguous float32 ``x`` in place on the ``bits``-bit grid of ``scale`` with the
    thresholds of :meth:`qexp.quant.kernels.Noise.vectors` ``a``, ``b``, ``c`` (int16)."""
    n = x.numel()
    grid = (triton.cdiv(n, BLOCK),)
    opts = {"COLS": COLS, "BLOCK": BLOCK}
    if os.environ.get("TRITON_INTERPRET") != "1":
        opts["enable_fp_fusion"] = False
    # Triton launches on the current device: make it x's (``cuda:1`` while the current device is 0)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        if bits == 1:
            _sr_binary[grid](x, a, b, c, n, -scale / (1 << 15), scale, **opts)
        else:
            g = SymmetricGrid(bits, scale)
            _sr_grid[grid](x, a, b, c, n, 1.0 / g.step, float(g.max_index), g.step, **opts)
