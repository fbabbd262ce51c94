"""Activation quantization with straight-through estimators (Yin et al., ICLR 2019): ``method=ste``.

Every ``nn.ReLU`` of the model becomes a b-bit :class:`~qexp.quant.activation.QuantReLU` with its own
resolution alpha; ``ste`` picks the backward estimator (identity | relu | clipped_relu), the forward is
the same for all three; ``staircase`` is the paper's ``ceil`` (default) or ``round``. Alpha is the paper's
fixed Lloyd-Max value for ReLU(N(0, 1)) (``alpha=lloyd_max``, with BN without affine before every
quantized ReLU: ``model.bn=true model.bn_affine=false``), a number, or (``alpha=null``) calibrated on the
first training batch (MSE-optimal, see :func:`~qexp.quant.activation.calibrate_alpha`) and then fixed,
or learned with ``learn_alpha``.
Weights stay float unless ``wbits`` quantizes them BinaryConnect-style.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError, check_range
from qexp.methods.base import Layered, RunContext
from qexp.methods.bc import BinaryConnect
from qexp.quant.activation import (
    QuantReLU,
    check_estimator,
    check_staircase,
    lloyd_max_alpha,
    max_index,
    quantize_relus,
    relu_format,
)
from qexp.quant.format import row as format_row

LLOYD_MAX = "lloyd_max"


class STE(Layered):
    """``method=ste``: quantized ReLUs layered over weight quantization (``wbits``: BinaryConnect as the
    :attr:`~qexp.methods.base.Layered.inner` method; none: float weights)."""

    bits_range = (1, 8)
    inner_state_key = "weights"  # checkpoints of wbits runs keep BinaryConnect's state under this key

    def __init__(self, bits: int | None = None, loss: str = "ce", ste: str = "clipped_relu",
                 learn_alpha: bool = False, alpha: float | str | None = None, alpha_lr_scale: float = 1.0,
                 wbits: int | None = None, stats_every: int = 10, staircase: str = "ceil") -> None:
        super().__init__(bits, loss)
        self.estimator = check_estimator(ste)
        self.staircase = check_staircase(staircase)
        if alpha == LLOYD_MAX:
            alpha = lloyd_max_alpha(self.bits, self.staircase)
        elif isinstance(alpha, str) or (alpha is not None and not alpha > 0):
            raise QexpError(f"method.alpha must be positive, {LLOYD_MAX}, or null to calibrate; got {alpha}")
        check_range("method.stats_every", stats_every, 1)
        # a negative multiplier would train the learned alphas uphill (PACT's check, the same knob)
        check_range("method.alpha_lr_scale", float(alpha_lr_scale), 0, strict_lo=True)
        self.learn_alpha, self.alpha, self.alpha_lr_scale = bool(learn_alpha), alpha, float(alpha_lr_scale)
        self.stats_every = int(stats_every)
        self.inner = _weight_quantization(wbits, loss)
        self.quantizers: list[tuple[str, QuantReLU]] = []

    # ---- set-up --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        def make(name: str, module: nn.Module) -> QuantReLU:
            return QuantReLU(self.bits, self.estimator, self.alpha, self.learn_alpha, self.staircase)

        self.quantizers = quantize_relus(model, make, "method=ste")
        return super().prepare(model, ctx)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The weights' groups (BinaryConnect's per-layer LR scale, or one float group) minus the alphas,
        then the learned alphas in their own group."""
        alphas = {id(q.alpha) for _, q in self.quantizers if self.learn_alpha}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in alphas]}
                  for g in super().param_groups(model)]
        groups = [g for g in groups if g["params"]]
        if self.learn_alpha:
            groups.append({"params": [q.alpha for _, q in self.quantizers], "lr_scale": self.alpha_lr_scale,
                           "weight_decay": 0.0})
        return groups

    def compile_ready(self, model: nn.Module) -> bool:
        """Eager until every quantized ReLU calibrated its alpha on the first batch."""
        return all(q.is_calibrated for _, q in self.quantizers) and super().compile_ready(model)

    # ---- per step ------------------------------------------------------------------------------------
    def before_forward(self, model: nn.Module, step: int) -> None:
        super().before_forward(model, step)
        track = step % self.stats_every == 0
        for _, q in self.quantizers:
            q.track = track

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.learn_alpha and self.quantizers:
            with torch.no_grad():  # a resolution must stay positive (all alphas in one multi-tensor call)
                torch._foreach_clamp_min_([q.alpha for _, q in self.quantizers], 1e-6)
        super().after_step(model, optimizer)

    # ---- reporting -----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Per quantized ReLU: alpha, and (on every ``stats_every``-th training batch of the epoch) the
        fraction of outputs at zero and at the top level ``(2^b - 1) alpha``; with ``wbits``, the
        BinaryConnect weight diagnostics (``weight/flip_frac``, ``weight/rel_quant_error``)."""
        out: dict[str, float] = {f"weight/{k}": v for k, v in super().metrics().items()}
        for name, q in self.quantizers:
            out[f"alpha/{name}"] = float(q.alpha.detach())
            stats = q.pop_stats()
            if stats is not None:
                out[f"zero/{name}"], out[f"top/{name}"] = stats
        return out

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        base = super().manifest(model)
        acts = []
        for n, q in self.quantizers:
            alpha = float(q.alpha.detach())  # a learned alpha requires grad: read it without autograd
            acts.append(format_row(relu_format(n, q), alpha=alpha,
                                   top=alpha * max_index(self.bits) if self.bits > 1 else alpha,
                                   call_sites=int(q.sites), shared_alpha=int(q.sites) > 1,
                                   estimator=self.estimator, learned_alpha=self.learn_alpha))
        return {**base, "method": self.name, "bits": self.bits, "activation_bits": self.bits,
                "weight_bits": self.inner.bits if self.inner is not None else 32,
                "estimator": self.estimator, "staircase": self.staircase, "activations": acts}

    def bits_label(self) -> str:
        return str(self.bits) if self.inner is None else f"{self.bits}a{self.inner.bits}w"

    # ---- resume --------------------------------------------------------------------------------------
    # Alpha, the calibration flag and the call-site count are buffers (or parameters) of the quantized
    # ReLUs, so the model's state_dict carries them; weight quantization keeps its own state.
    # The epoch's zero/top counts are kept too: a run stopped mid-epoch reports the whole epoch's counts.
    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s["stats"] = {n: q._stats.detach().cpu().clone() for n, q in self.quantizers if int(q._stats[2])}
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        stats = state.get("stats", {})
        for n, q in self.quantizers:
            q._stats.zero_()
            if n in stats:
                q._stats.copy_(stats[n])


def _weight_quantization(wbits: int | None, loss: str) -> BinaryConnect | None:
    """``method.wbits``: deterministic BinaryConnect on the conv/linear weights (float shadows clipped to
    the layer's grid scale, ``Q_d`` forward, straight-through backward, BC's per-layer LR scale).
    None keeps the weights float."""
    if wbits is None:
        return None
    check_range("method.wbits", int(wbits), 1, 8, why="or null for float weights")
    return BinaryConnect(bits=int(wbits), loss=loss)
