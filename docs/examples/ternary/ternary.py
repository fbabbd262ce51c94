"""Ternary weight networks (Li, Zhang, Liu 2016): W ~ alpha * t, t in {-1, 0, +1}, straight-through."""
import math
from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError
from qexp.methods.base import Method, RunContext
from qexp.quant.format import LayerFormat, row
from qexp.quant.inject import attach_weight_quantizer, shadow_weight, weight_layers
from qexp.quant.straight_through import straight_through


def ternarize(w: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha * t, alpha): t = sign(w) where |w| > threshold * mean|w|, alpha = mean |w| over those."""
    keep = w.abs() > threshold * w.abs().mean()
    alpha = w.abs()[keep].mean() if keep.any() else w.abs().max()
    return alpha * torch.sign(w) * keep, alpha


class TernaryWeight(nn.Module):
    """Parametrization: ``layer.weight`` is the ternary copy of the float shadow the optimizer updates."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return straight_through(w, ternarize(w.detach(), self.threshold)[0])


class TernaryWeights(Method):
    bits_range = (2, 2)  # name and default bits: method.name and bits in method/ternary.yaml

    def __init__(self, bits: int | None = None, loss: str = "ce", threshold: float = 0.7) -> None:
        super().__init__(bits, loss)
        if not 0 < threshold < 1:
            raise QexpError(f"method.threshold must be in (0, 1), got {threshold}")
        self.threshold, self.layers = threshold, []

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.layers = weight_layers(model)
        for _, layer in self.layers:
            attach_weight_quantizer(layer, TernaryWeight(self.threshold))
        return model

    @torch.no_grad()
    def manifest(self, model: nn.Module) -> dict[str, Any]:
        rows = []
        for name, layer in self.layers:
            alpha = float(ternarize(shadow_weight(layer), self.threshold)[1])
            fmt = LayerFormat(name, "weight", "ternary", 2, "nearest", alpha, code_range=(-1, 1))
            rows.append(row(fmt, shape=list(layer.weight.shape), params=layer.weight.numel()))
        quantized = {id(shadow_weight(layer)) for _, layer in self.layers}
        params = list(model.parameters())
        other = sum(p.numel() for p in params if id(p) not in quantized)
        return {"method": self.name, "bits": self.bits, "layers": rows,
                "weight_bytes": math.ceil(sum(r["params"] for r in rows) * 2 / 8) + 4 * other,
                "float32_bytes": 4 * sum(p.numel() for p in params)}
