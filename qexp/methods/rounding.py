"""Fully quantized weights without a float copy (Li, De, Xu, Studer, Samet, Goldstein 2017).

After every optimizer step the stored weights ``w - α·u`` are rounded back onto the k-bit grid, in place:
stochastically (``method=sr``, ``Q_s``) or to nearest (``method=r``, ``Q_d``). ``method=big_sr`` is SR
with a larger batch. BN parameters and biases stay float and are not rounded.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from qexp.errors import check_choice, check_range
from qexp.methods.base import MAX_SEED, Method, RunContext
from qexp.methods.diagnostics import FlipTracker
from qexp.quant.kernels import Noise, nearest_round_all_, stochastic_round_all_
from qexp.quant.weight import QuantLayer, quantize_weights, weight_manifest

log = logging.getLogger("qexp")


class Rounding(Method):
    """``method=r``: ``w <- Q_d(w - α·u)``. Options: ``scale`` (``glorot`` or a number), ``skip_first``,
    ``skip_last``, ``seed`` (the rounding generator), ``diag_every`` (diagnostics sample every n-th step).

    Diagnostics (on the sampled steps): ``rounded_away`` = the fraction of weights the optimizer moved
    whose stored value came back unchanged; ``rel_quant_error`` = ||Q(x) - x|| / ||x|| for the
    pre-rounding weights ``x``; per epoch ``flip_frac`` = fraction of weights whose value changed.
    """

    bits_range = (1, 8)
    stochastic = False
    vectorizable = True  # the stored weights are rounded in place after the step, per seed

    def __init__(self, bits: int | None = None, loss: str = "ce", scale: str | float = "glorot",
                 skip_first: bool = False, skip_last: bool = False, seed: int = 0, diag_every: int = 10) -> None:
        super().__init__(bits, loss)
        check_range("method.diag_every", int(diag_every), 1)
        self.scale, self.skip_first, self.skip_last = scale, skip_first, skip_last
        self.seed, self.diag_every = seed, int(diag_every)
        check_range("method.seed", int(seed), 0, MAX_SEED, why="torch's generator seed")
        self.layers: list[QuantLayer] = []
        self.noise: Noise | None = None
        self.flips = FlipTracker()
        self._step = 0
        self._before: list[torch.Tensor] | None = None
        self._acc = torch.zeros(4, dtype=torch.float64)  # moved, rounded away, err^2, norm^2

    @property
    def rounding(self) -> str:
        return "stochastic" if self.stochastic else "nearest"

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.noise = Noise(self.seed, ctx.device)
        self._acc = self._acc.to(ctx.device)
        self.layers = quantize_weights(model, self.bits, self.rounding, float_copy=False, scale=self.scale,
                                       skip_first=self.skip_first, skip_last=self.skip_last)
        with torch.no_grad():  # the stored weights live on the grid from the start
            self._round()
        self.flips.start(self._indices())
        return model

    def _round(self) -> None:
        """Every layer's stored weights back onto the grid: one multi-tensor pass per operation (same
        values as rounding layer by layer, the noise drawn in layer order)."""
        ws, scales = [q.weight.data for q in self.layers], [q.scale for q in self.layers]
        if self.stochastic:
            assert self.noise is not None
            stochastic_round_all_(ws, self.bits, scales, self.noise)
        else:
            nearest_round_all_(ws, self.bits, scales)

    # ---- per step --------------------------------------------------------------------------------
    def before_forward(self, model: nn.Module, step: int) -> None:
        self._step = step

    def _sampled(self) -> bool:
        return self._step % self.diag_every == 0

    def after_backward(self, model: nn.Module) -> None:
        self._before = [q.weight.detach().clone() for q in self.layers] if self._sampled() else None

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        before = self._before
        if before is None:
            self._round()
            return
        xs = [q.weight.detach().clone() for q in self.layers]
        self._round()
        for q, b, x in zip(self.layers, before, xs):
            w = q.weight.data
            moved = x != b
            self._acc[0] += moved.sum()
            self._acc[1] += (moved & (w == b)).sum()
            self._acc[2] += (w - x).pow(2).sum()
            self._acc[3] += x.pow(2).sum()
        self._before = None

    # ---- per epoch -------------------------------------------------------------------------------
    def _indices(self) -> list[torch.Tensor]:
        return [FlipTracker.index(q.weight, q.bits, q.scale) for q in self.layers]

    def on_epoch_end(self, epoch: int) -> None:
        moved, away, err, num = self._acc.tolist()
        self.flips.end(self._indices())
        self.flips.extra = {"rounded_away": away / moved if moved else 0.0,
                            "rel_quant_error": math.sqrt(err / num) if num else 0.0}
        self._acc.zero_()
        if self.flips.flip_frac == 0.0:  # a frozen network says so: the error alone looks like a bug
            log.warning("method=%s: no quantized weight changed in epoch %d: every update was rounded back "
                        "to its grid point (%s rounding, %d-bit grid; Li et al.'s finding for R at low bits: "
                        "more bits, a finer grid (grid_scale) or method=sr train)", self.name, epoch + 1,
                        self.rounding, self.bits)

    def metrics(self) -> dict[str, float]:
        return self.flips.metrics()

    # ---- reporting / resume ----------------------------------------------------------------------
    def manifest(self, model: nn.Module) -> dict[str, Any]:
        return weight_manifest(model, self.layers, self.name, self.bits)

    def state_dict(self) -> dict[str, Any]:
        s: dict[str, Any] = {"flips": self.flips.state_dict(), "acc": self._acc.tolist()}
        if self.noise is not None:
            s["noise"] = self.noise.state_dict()
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flips.load_state_dict(state.get("flips", {}))
        if "acc" in state:
            self._acc = torch.tensor(state["acc"], dtype=torch.float64, device=self._acc.device)
        if self.noise is not None and "noise" in state:
            self.noise.load_state_dict(state["noise"])


class StochasticRounding(Rounding):
    """``method=sr``: ``w <- Q_s(w - α·u)``, unbiased stochastic rounding from a seeded generator that
    the checkpoint carries (same seed, same rounding; resume draws what an uninterrupted run would)."""

    stochastic = True


BUDGETS = ("epochs", "updates")


class BigSR(StochasticRounding):
    """``method=big_sr``: SR with ``batch_scale`` x the configured batch (default 8), same LR rule.

    ``budget=epochs`` keeps the configured epochs (``batch_scale`` x fewer updates); ``budget=updates``
    trains ``batch_scale`` x the epochs so the number of updates equals plain SR's.
    """

    def __init__(self, bits: int | None = None, loss: str = "ce", batch_scale: int = 8, budget: str = "epochs",
                 **kwargs: Any) -> None:
        super().__init__(bits, loss, **kwargs)
        check_range("method.batch_scale", int(batch_scale), 1)
        check_choice("method.budget", budget, BUDGETS)
        self.batch_scale = int(batch_scale)
        self.budget = budget
        self.epoch_scale = self.batch_scale if budget == "updates" else 1

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        return {**super().manifest(model), "batch_scale": self.batch_scale, "budget": self.budget}
