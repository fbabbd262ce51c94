"""Per-epoch weight diagnostics shared by the weight-quantization methods (bc, sr, r, big_sr).

``flip_frac``: the fraction of quantized weights whose grid value at the end of an epoch differs from
the start (Li et al. 2017's "how many weights change": SR stalls when it drops towards zero).
"""

from __future__ import annotations

from typing import Any

import torch

from qexp.quant.grid import SymmetricGrid


class FlipTracker:
    """Remembers every layer's grid indices at the start of the epoch (int8: 1 byte per weight)."""

    def __init__(self) -> None:
        self.snapshot: list[torch.Tensor] = []
        self.extra: dict[str, float] = {}
        self.flip_frac: float | None = None

    @staticmethod
    @torch.no_grad()
    def index(w: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
        """Grid index of ``Q_d(w)`` (see :meth:`SymmetricGrid.index`)."""
        return SymmetricGrid(bits, scale).index(w)

    def start(self, indices: list[torch.Tensor]) -> None:
        self.snapshot = indices

    def end(self, indices: list[torch.Tensor]) -> None:
        """Fraction changed since :meth:`start`; the end becomes the next epoch's start."""
        changed = sum(int((a != b).sum()) for a, b in zip(indices, self.snapshot))
        total = sum(a.numel() for a in indices)
        self.flip_frac = changed / max(total, 1)
        self.snapshot = indices

    def metrics(self) -> dict[str, float]:
        out = dict(self.extra)
        if self.flip_frac is not None:
            out["flip_frac"] = self.flip_frac
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": list(self.snapshot), "extra": dict(self.extra), "flip_frac": self.flip_frac}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "snapshot" in state:  # the checkpoint is loaded onto the training device already
            self.snapshot = list(state["snapshot"])
        self.extra = dict(state.get("extra", {}))
        self.flip_frac = state.get("flip_frac")
