"""k-bit weight quantization of conv/linear layers, and the per-layer manifest (quant.json).

Shared helper: :func:`quantize_weights` attaches a k-bit weight quantizer to every conv/linear layer
(optionally sparing the first and/or last) and returns :class:`QuantLayer` records that
:func:`weight_manifest` turns into the manifest. BinaryConnect (``qexp.methods.bc``) and SR/R
(``qexp.methods.rounding``) use it; learned precision and STE's ``wbits`` should reuse it too rather than
walking the model themselves. BN parameters and biases are never touched: they stay float.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError, check_choice, check_range
from qexp.quant import kernels
from qexp.quant.format import row as format_row
from qexp.quant.format import symmetric
from qexp.quant.grid import SymmetricGrid, glorot_scale
from qexp.quant.inject import attach_weight_quantizer, shadow_weight, weight_layers
from qexp.quant.kernels import Noise, nearest, nearest_all, stochastic_round
from qexp.quant.straight_through import straight_through


@dataclass
class QuantLayer:
    """One quantized conv/linear layer: where it is, its grid, and how it is stored."""

    name: str
    module: nn.Module
    bits: int
    scale: float  # s: the grid spans +-s (1 bit: {-s, +s})
    rounding: str  # nearest | stochastic | ...: how the stored or forward weight reaches the grid
    float_copy: bool  # a float shadow is kept next to the quantized weight (BC), or not (SR/R)

    @property
    def weight(self) -> torch.Tensor:
        """The stored tensor: the float shadow when a quantizer is attached, else the weight itself."""
        return shadow_weight(self.module)

    @property
    def fans(self) -> tuple[int, int]:
        """(fan_in, fan_out) with the receptive field counted on both sides (Glorot / BinaryConnect)."""
        w = self.weight
        receptive = w[0, 0].numel() if w.dim() > 2 else 1
        return w[0].numel(), w.shape[0] * receptive


def layer_scale(weight: torch.Tensor, scale: str | float) -> float:
    """The grid scale ``s``: ``"glorot"`` (sqrt(6/(fan_in+fan_out)), the default) or a number."""
    if isinstance(scale, str):
        check_choice("method.scale", scale, ("glorot", "a positive number"))
        return glorot_scale(weight)
    return check_range("method.scale", float(scale), 0, strict_lo=True)


def quantize_weights(model: nn.Module, bits: int, rounding: str, float_copy: bool,
                     scale: str | float = "glorot", skip_first: bool = False, skip_last: bool = False,
                     make: Callable[[QuantLayer], nn.Module] | None = None) -> list[QuantLayer]:
    """Describe (and, with ``make``, parametrize) every conv/linear layer's weight at ``bits`` bits.

    ``make(layer)`` builds the quantizer module attached as a parametrization: ``layer.weight`` then
    returns the quantized tensor and the optimizer updates the float shadow (BinaryConnect, learned
    precision, STE ``wbits``). Without ``make`` nothing is attached: the method keeps the stored weights
    on the grid itself (SR/R). ``bits`` was checked once, by the method's ``bits_range``; an empty
    selection is a :class:`QexpError`.
    """
    picked = weight_layers(model, skip_first=skip_first, skip_last=skip_last)
    if not picked:
        raise QexpError("no conv/linear layer left to quantize (check skip_first/skip_last)")
    layers = []
    for name, module in picked:
        q = QuantLayer(name, module, bits, layer_scale(module.weight, scale), rounding, float_copy)
        if make is not None:
            attach_weight_quantizer(module, make(q))
        layers.append(q)
    return layers


def weight_manifest(model: nn.Module, layers: list[QuantLayer], method: str, bits: int,
                    **extra: Any) -> dict[str, Any]:
    """quant.json: per quantized layer its format record (:mod:`qexp.quant.format`: the symmetric grid's
    step and codes), shape, params, grid scale ``s`` and range, float copy; the
    model's weight memory at its precision (every other parameter counted as float32) vs all-float32.
    ``train_bytes`` adds the float shadows kept during training."""
    rows, quantized = [], set()
    q_bits = train_bytes = 0
    for q in layers:
        w = q.weight
        quantized.add(id(w))
        n = w.numel()
        q_bits += n * q.bits
        train_bytes += 4 * n if q.float_copy else math.ceil(n * q.bits / 8)
        grid = SymmetricGrid(q.bits, q.scale)
        rows.append(format_row(symmetric(q.name, q.bits, grid.step, q.rounding), type=type(q.module).__name__,
                               shape=list(w.shape), params=n, scale=q.scale, range=grid.limit,
                               float_copy=q.float_copy, bytes=math.ceil(n * q.bits / 8), float32_bytes=4 * n))
    params = list({id(p): p for p in model.parameters()}.values())
    total = sum(p.numel() for p in params)
    other = sum(p.numel() for p in params if id(p) not in quantized)
    weight_bytes = math.ceil(q_bits / 8) + 4 * other
    return {"method": method, "bits": bits, "layers": rows,
            "float_params": other, "quantized_params": total - other,
            "weight_bytes": weight_bytes, "float32_bytes": 4 * total,
            "compression": 4 * total / max(weight_bytes, 1),
            "train_bytes": train_bytes + 4 * other, **extra}


class WeightQuantizer(nn.Module):
    """Parametrization ``shadow -> Q(shadow)`` with a straight-through gradient (BinaryConnect style).

    Training: deterministic ``Q_d`` (1 bit: ``s·sign``), or with ``noise`` stochastic binarization.
    Evaluation: ``Q_d`` again, except ``eval_float`` returns the real shadow (the BinaryConnect paper's
    test-time rule for stochastic BC).
    """

    def __init__(self, bits: int, scale: float, noise: Noise | None = None, eval_float: bool = False) -> None:
        super().__init__()
        self.bits, self.scale, self.noise, self.eval_float = bits, scale, noise, eval_float
        #: ``(shadow version, Q(shadow))`` computed ahead for the next training forward (:func:`quantize_ahead`)
        self.ahead: tuple[int, torch.Tensor] | None = None
        self.ahead_misses = 0  # steps in a row whose value computed ahead no forward took (compiled forward)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The quantized value (no autograd) the forward pass would use in the current mode."""
        with torch.no_grad():
            if self.training and self.noise is not None:
                # in a compiled forward: eagerly, one explicit graph break (kernels.use_fused)
                sr = kernels.eager_in_graphs() if torch.compiler.is_compiling() else stochastic_round
                return sr(w, self.bits, self.scale, self.noise)
            return nearest(w, self.bits, self.scale)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.training and self.eval_float:
            return w
        if torch.compiler.is_compiling():  # a compiled forward computes (and fuses) its own; read nothing
            return straight_through(w, self.quantize(w))  # else, so Dynamo guards on nothing that changes
        ahead = self.ahead
        # the value computed ahead is used only while the shadow is the one it was computed from (any
        # in-place change bumps ``_version``)
        if ahead is not None and self.training and ahead[0] == w._version:
            self.ahead, self.ahead_misses = None, 0
            return straight_through(w, ahead[1])
        return straight_through(w, self.quantize(w))

    def extra_repr(self) -> str:
        kind = "stochastic" if self.noise is not None else "nearest"
        return f"bits={self.bits}, scale={self.scale:.4g}, {kind}"


def quantize_ahead(quantizers: list[WeightQuantizer], shadows: list[torch.Tensor]) -> None:
    """Before a training forward: every layer's deterministic ``Q_d(shadow)`` in one multi-tensor pass
    per operation (:func:`qexp.quant.kernels.nearest_all`), handed to the quantizers, which would
    otherwise compute them one layer at a time (the same values). Stochastic quantizers draw in the
    forward's order and are left alone, and so is a layer whose value the forward has not taken three
    steps in a row (a compiled forward computes its own); :func:`release_ahead` drops what is left."""
    picked = [(q, w) for q, w in zip(quantizers, shadows) if q.noise is None and q.ahead_misses < 3]
    if not picked or not picked[0][0].training:
        return
    bits = picked[0][0].bits
    if any(q.bits != bits for q, _ in picked):  # one grid per call; mixed bit-widths: layer by layer
        return
    with torch.no_grad():
        values = nearest_all([w.detach() for _, w in picked], bits, [q.scale for q, _ in picked])
    for (q, w), v in zip(picked, values):
        q.ahead = (w._version, v)


def release_ahead(quantizers: list[WeightQuantizer]) -> None:
    """After the backward: drop values no forward took (and count the miss)."""
    for q in quantizers:
        if q.ahead is not None:
            q.ahead, q.ahead_misses = None, q.ahead_misses + 1
