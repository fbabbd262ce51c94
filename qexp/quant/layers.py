"""Which conv/linear layers a weight-and-activation method quantizes, and at how many bits.

LSQ, PACT and DoReFa share their papers' convention: every conv/linear layer is quantized at the run's
``bits`` (weights) and ``abits`` (activations), except that the first and the last layer may be kept at
another precision (``first_last_bits``: LSQ keeps them at 8 bits, DoReFa and PACT leave them float).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qexp.errors import QexpError
from qexp.quant.inject import weight_layers

#: a bit width that means "leave this tensor in float"
FLOAT_BITS = 32


@dataclass
class LayerPlan:
    """One conv/linear layer and the bits its weight and its input get (32: float)."""

    name: str
    module: nn.Module
    wbits: int
    abits: int
    edge: bool  # the first or the last conv/linear layer


def check_bits(name: str, bits: int | None, lo: int, hi: int, allow_float: bool = False) -> int | None:
    """``bits`` as an int in ``lo..hi`` (or 32 = float when ``allow_float``); None passes through.
    Anything else is a :class:`QexpError` naming the option."""
    if bits is None:
        return None
    try:
        b = int(bits)
    except (TypeError, ValueError):
        b = -1
    if lo <= b <= hi or (allow_float and b == FLOAT_BITS):
        return b
    extra = f" or {FLOAT_BITS} (float)" if allow_float else ""
    raise QexpError(f"{name} must be in {lo}..{hi}{extra}, got {bits}")


def plan_layers(model: nn.Module, bits: int, abits: int, first_last_bits: int | None) -> list[LayerPlan]:
    """Every conv/linear layer in definition order with its weight and input bits; the first and the
    last get ``first_last_bits`` for both unless it is None. :class:`QexpError` when there is none."""
    layers = weight_layers(model)
    if not layers:
        raise QexpError(f"{type(model).__name__} has no conv/linear layer to quantize")
    plan = []
    for i, (name, module) in enumerate(layers):
        edge = i in (0, len(layers) - 1)
        fl = edge and first_last_bits is not None
        plan.append(LayerPlan(name, module, first_last_bits if fl else bits,  # type: ignore[arg-type]
                              first_last_bits if fl else abits, edge))  # type: ignore[arg-type]
    return plan
