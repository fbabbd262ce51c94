"""BinaryConnect (Courbariaux, Bengio, David 2015), and its k-bit form as Li et al. (2017) use it.

Float shadow weights ``W`` in ``[-H, H]``; every forward uses ``Wb = Q(W)`` (1 bit: ``H·sign(W)`` or the
stochastic binarization, ``bits >= 2``: the deterministic grid ``Q_d``); the gradient w.r.t. ``Wb`` is
applied to ``W`` (straight-through); after each step ``W`` is clipped back to ``[-H, H]``. ``H`` is the
layer's grid scale ``s``. BN parameters and biases are neither scaled nor clipped.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError, check_choice, check_range
from qexp.methods.base import MAX_SEED, Method, RunContext
from qexp.methods.diagnostics import FlipTracker
from qexp.quant.kernels import Noise, nearest
from qexp.quant.weight import (
    QuantLayer,
    WeightQuantizer,
    quantize_ahead,
    quantize_weights,
    release_ahead,
    weight_manifest,
)

LR_SCALES = ("glorot", "none")
EVAL_WEIGHTS = ("auto", "float", "quantized")


def layer_lr_scale(q: QuantLayer, rule: str) -> float:
    """The LR multiplier of a quantized layer's shadow weights: ``glorot`` is BinaryConnect's
    ``W_LR_scale = 1 / sqrt(1.5/(fan_in+fan_out))`` times H (the layer's grid scale), ``none`` is 1."""
    if rule == "none":
        return 1.0
    fan_in, fan_out = q.fans
    return q.scale / math.sqrt(1.5 / (fan_in + fan_out))


def shadow_param_groups(model: nn.Module, layers: list[QuantLayer], rule: str) -> list[dict[str, Any]]:
    """BinaryConnect's optimizer groups: the unscaled float parameters first (BN, biases; the logged lr is
    the base lr), then one group per quantized layer with its :func:`layer_lr_scale`."""
    taken = {id(q.weight) for q in layers}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": rest, "name": "float"}] if rest else []
    return groups + [{"params": [q.weight], "lr_scale": layer_lr_scale(q, rule), "name": q.name}
                     for q in layers]


class BinaryConnect(Method):
    """``method=bc``. Options (``method.<name>=...``):

    - ``stochastic``: stochastic binarization (1 bit only; ``bits >= 2`` always uses ``Q_d``).
    - ``scale``: ``glorot`` (H = sqrt(6/(fan_in+fan_out)) per layer) or a number (the paper's code: 1).
    - ``lr_scale``: ``glorot`` multiplies a layer's learning rate by ``H / sqrt(1.5/(fan_in+fan_out))``:
      the paper's ``W_LR_scale`` (written for H = 1, exact when ``scale=1``), times H so the step
      relative to the clip range is the paper's whatever H is. ``none``: no scaling.
    - ``eval_weights``: ``auto`` is the paper's test-time rule (deterministic BC tests with ``Q_d(W)``,
      stochastic BC with the real ``W``); ``float`` / ``quantized`` force one.
    - ``init_uniform``: re-initialise shadows uniformly in ``[-H, H]`` as the paper's code does.
    - ``skip_first`` / ``skip_last``: keep the first / last conv-linear layer float.
    - ``clip``: clip the shadows to ``[-H, H]`` after every step (BinaryConnect); ``false`` is Li et al.
      2017's BC, ``w_r <- w_r - lr*u`` with no clip (``method=bc_li``).
    """

    bits_range = (1, 8)

    def __init__(self, bits: int | None = None, loss: str = "ce", stochastic: bool = False,
                 scale: str | float = "glorot", lr_scale: str = "glorot", eval_weights: str = "auto",
                 init_uniform: bool = False, skip_first: bool = False, skip_last: bool = False,
                 seed: int = 0, clip: bool = True) -> None:
        super().__init__(bits, loss)
        if stochastic and self.bits != 1:
            raise QexpError("method.stochastic=true is 1-bit BinaryConnect; with bits>=2 BinaryConnect "
                            "uses the deterministic grid Q_d (set method.stochastic=false)")
        check_choice("method.lr_scale", lr_scale, LR_SCALES)
        check_choice("method.eval_weights", eval_weights, EVAL_WEIGHTS)
        self.stochastic, self.scale, self.lr_scale = bool(stochastic), scale, lr_scale
        self.eval_float = eval_weights == "float" or (eval_weights == "auto" and self.stochastic)
        self.init_uniform, self.skip_first, self.skip_last, self.seed = init_uniform, skip_first, skip_last, seed
        check_range("method.seed", int(seed), 0, MAX_SEED, why="torch's generator seed")
        self.clip = bool(clip)
        #: deterministic BC stacks (Q_d is elementwise); stochastic BC draws its noise in the forward
        self.vectorizable = not self.stochastic
        self.layers: list[QuantLayer] = []
        self.quantizers: list[WeightQuantizer] = []
        self.noise: Noise | None = None
        self.flips = FlipTracker()

    # ---- set-up ----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.noise = Noise(self.seed, ctx.device) if self.stochastic else None
        rounding = "stochastic" if self.stochastic else "nearest"  # 1 bit: nearest of {-s, +s} is the sign
        self.quantizers = []

        def make(q: QuantLayer) -> nn.Module:
            self.quantizers.append(WeightQuantizer(q.bits, q.scale, self.noise, self.eval_float))
            return self.quantizers[-1]

        self.layers = quantize_weights(model, self.bits, rounding, float_copy=True, scale=self.scale,
                                       skip_first=self.skip_first, skip_last=self.skip_last, make=make)
        with torch.no_grad():  # clip=false (Li et al.'s w_r): the initial weights stay as they are (a
            for q in self.layers:  # clamp to [-s, s] at s = lr let epoch 1 flip ~46% of BC's signs)
                if self.init_uniform:
                    q.weight.uniform_(-q.scale, q.scale)
                if self.clip:
                    q.weight.clamp_(-q.scale, q.scale)
        self.flips.start(self._indices())
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """One group per quantized layer (its LR scale); everything else (BN, biases) unscaled."""
        return shadow_param_groups(model, self.layers, self.lr_scale)

    # ---- per step --------------------------------------------------------------------------------
    def before_forward(self, model: nn.Module, step: int) -> None:
        """Every layer's ``Q_d(W)`` for this step's forward in a few multi-tensor launches."""
        quantize_ahead(self.quantizers, [q.weight for q in self.layers])

    def after_backward(self, model: nn.Module) -> None:
        release_ahead(self.quantizers)

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not self.clip:
            return
        ws = [q.weight for q in self.layers]  # clamp(-H, H), every layer in two multi-tensor calls
        torch._foreach_clamp_min_(ws, [-q.scale for q in self.layers])
        torch._foreach_clamp_max_(ws, [q.scale for q in self.layers])

    # ---- per epoch -------------------------------------------------------------------------------
    def _indices(self) -> list[torch.Tensor]:
        """Each layer's deterministic quantized weight as grid indices (int8)."""
        with torch.no_grad():
            return [FlipTracker.index(q.weight, q.bits, q.scale) for q in self.layers]

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        """flip_frac (of Q_d(W): the sign of the shadow at 1 bit) and the relative quantization error
        ||Wb - W|| / ||W||; for stochastic BC its expectation sqrt(sum(H^2 - W^2) / sum(W^2))."""
        err = num = 0.0
        for q in self.layers:
            w = q.weight
            if self.stochastic:
                err += (q.scale**2 * w.numel()) - w.pow(2).sum().item()
            else:
                err += (nearest(w, q.bits, q.scale) - w).pow(2).sum().item()
            num += w.pow(2).sum().item()
        self.flips.end(self._indices())
        self.flips.extra["rel_quant_error"] = math.sqrt(max(err, 0.0) / max(num, 1e-30))

    def metrics(self) -> dict[str, float]:
        return self.flips.metrics()

    # ---- reporting / resume ----------------------------------------------------------------------
    def manifest(self, model: nn.Module) -> dict[str, Any]:
        m = weight_manifest(model, self.layers, self.name, self.bits, stochastic=self.stochastic,
                            test_weights="float" if self.eval_float else "quantized")
        for row, q in zip(m["layers"], self.layers):
            row["lr_scale"] = layer_lr_scale(q, self.lr_scale)
            row["clip"] = q.scale if self.clip else None
        return m

    def bits_label(self) -> str:
        return str(self.bits)

    def state_dict(self) -> dict[str, Any]:
        s: dict[str, Any] = {"flips": self.flips.state_dict()}
        if self.noise is not None:
            s["noise"] = self.noise.state_dict()
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flips.load_state_dict(state.get("flips", {}))
        if self.noise is not None and "noise" in state:
            self.noise.load_state_dict(state["noise"])
