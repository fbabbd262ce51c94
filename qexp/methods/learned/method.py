"""Learned layer-wise precision under a fixed bit budget (Lacey, Taylor, Areibi 2018): ``method=learned``.

``bits`` is the average per layer: the budget is ``T = bits * L`` over the ``L`` quantized conv/linear
layers. Every training step draws an allocation with exactly ``T`` bits from a Gumbel-softmax over
learned logits (see :mod:`qexp.methods.learned.allocation`); each layer trains exactly as ``method=bc`` does at
``bits >= 2`` (float shadow weights clipped to ``[-s, s]``, deterministic ``Q_d`` forward,
straight-through backward, the same grid scale and per-layer LR scale) but at its drawn bit-width, so
``method=bc`` at the same ``bits`` is the uniform-precision baseline. The temperature anneals from
``tau0`` to ``tau_min`` over the soft phase; after ``hard_after`` epochs the allocation freezes to the
most likely one (total exactly ``T``) and training continues. Evaluation during the soft phase uses
that most likely allocation too.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from qexp.errors import QexpError, check_choice, check_range
from qexp.methods.base import Evaluate, Method, RunContext
from qexp.methods.bc import LR_SCALES, layer_lr_scale, shadow_param_groups
from qexp.methods.learned.allocation import (
    BitSource,
    LearnedBitsQuantizer,
    allocation_string,
    check_budget,
    most_likely_counts,
    sample_counts,
)
from qexp.quant.activation import QuantReLU, quantize_relus, relu_format
from qexp.quant.format import row as format_row
from qexp.quant.kernels import restore_generator
from qexp.quant.weight import QuantLayer, quantize_weights, weight_manifest

#: training batches that re-estimate BatchNorm statistics before a soft-phase evaluation
BN_BATCHES = 20


class LearnedPrecision(Method):
    bits_range = (1, 8)

    def __init__(self, bits: int | None = None, loss: str = "ce", min_bits: int = 1, max_bits: int = 8,
                 tau0: float = 1.0, tau_min: float = 0.1, hard_after: int | None = None, epochs: int = 1,
                 logit_lr: float = 0.01, activations: bool = False, act_bits: int = 8,
                 scale: str | float = "glorot", lr_scale: str = "glorot", skip_first: bool = False,
                 skip_last: bool = False, clip: bool = True, seed: int = 0) -> None:
        super().__init__(bits, loss)
        self.min_bits, self.max_bits = int(min_bits), int(max_bits)
        check_budget(1, self.bits, self.min_bits, self.max_bits)
        check_range("method.max_bits", self.max_bits, hi=16)
        check_choice("method.lr_scale", lr_scale, LR_SCALES)
        check_range("method.tau0", tau0, 0, strict_lo=True, why="the first soft epoch's temperature")
        check_range("method.tau_min", tau_min, 0, tau0, strict_lo=True, why="positive, at most method.tau0")
        if hard_after is not None:
            check_range("method.hard_after", hard_after, 0, why="or null: half the epochs")
        check_range("method.logit_lr", logit_lr, 0)
        if activations:
            check_range("method.act_bits", act_bits, 1, 8)
        self.tau0, self.tau_min = float(tau0), float(tau_min)
        self.epochs = int(epochs)
        self.hard_after = math.ceil(self.epochs / 2) if hard_after is None else int(hard_after)
        self.logit_lr = float(logit_lr)
        self.activations, self.act_bits = bool(activations), int(act_bits)
        self.scale, self.lr_scale = scale, lr_scale
        self.skip_first, self.skip_last, self.clip, self.seed = skip_first, skip_last, bool(clip), int(seed)
        # filled by prepare()
        self.layers: list[QuantLayer] = []
        self.layer_names: list[str] = []
        self.quantizers: list[LearnedBitsQuantizer] = []
        self.act_quantizers: list[QuantReLU] = []
        self.act_names: list[str] = []
        self.logits: nn.Parameter | None = None
        self.generator: torch.Generator | None = None
        self.source = BitSource([])
        # state that the checkpoint carries
        self.tau = self.tau0
        self.frozen = False
        self.frozen_bits: list[int] = []
        self.history: list[str] = []  # allocation at the end of each epoch
        self._sum: list[int] = []  # sampled bits summed over this epoch's draws (expected bits)
        self._draws = 0
        self._report: dict[str, float] = {}

    # ---- budget ------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.quantizers)

    @property
    def budget(self) -> int:
        """``T``: the total number of bits over the quantized layers."""
        return self.bits * self.num_layers

    @property
    def free(self) -> int:
        return self.budget - self.min_bits * self.num_layers

    @property
    def cap(self) -> int:
        return self.max_bits - self.min_bits

    def most_likely(self) -> list[int]:
        """The allocation evaluation uses and the hard assignment freezes to (total exactly ``T``)."""
        if self.frozen:
            return list(self.frozen_bits)
        assert self.logits is not None
        return [self.min_bits + c for c in most_likely_counts(self.logits, self.free, self.cap)]

    def allocation(self) -> str:
        return allocation_string(self.most_likely())

    # ---- set-up ------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.source = BitSource([], mode=self.most_likely)
        self._train_data = None if ctx.data is None else ctx.data.train

        def make(q: QuantLayer) -> nn.Module:
            quantizer = LearnedBitsQuantizer(q.scale, len(self.quantizers), self.source)
            self.quantizers.append(quantizer)
            return quantizer

        self.layers = quantize_weights(model, self.bits, "nearest", float_copy=True, scale=self.scale,
                                       skip_first=self.skip_first, skip_last=self.skip_last, make=make)
        layers = self.layers
        check_budget(len(layers), self.bits, self.min_bits, self.max_bits)
        self.layer_names = [q.name for q in layers]
        self.source.train_bits = [self.bits] * len(layers)
        with torch.no_grad():
            for q in layers:
                q.weight.clamp_(-q.scale, q.scale)
        self.logits = nn.Parameter(torch.zeros(len(layers), device=ctx.device))
        self.generator = torch.Generator(device=ctx.device)
        self.generator.manual_seed(self.seed)
        self._sum = [0] * len(layers)
        if self.activations:
            self._quantize_activations(model)
        if self.hard_after == 0:
            self._freeze()
        self._refresh_eval_bits()
        return model

    def _quantize_activations(self, model: nn.Module) -> None:
        """Every ``nn.ReLU`` becomes an ``act_bits`` quantized ReLU (clipped-ReLU STE, calibrated alpha)."""
        pairs = quantize_relus(model, lambda n, m: QuantReLU(self.act_bits, "clipped_relu"),
                               "method.activations=true")
        self.act_quantizers = [q for _, q in pairs]
        self.act_names = [n for n, _ in pairs]

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """As ``method=bc``: unscaled float parameters, one group per quantized layer with its LR scale;
        then the logits at their own absolute learning rate."""
        assert self.logits is not None, "prepare() first"
        logits = {"params": [self.logits], "lr": self.logit_lr, "weight_decay": 0.0, "name": "logits"}
        return [*shadow_param_groups(model, self.layers, self.lr_scale), logits]

    def compile_ready(self, model: nn.Module) -> bool:
        """Eager until every quantized ReLU calibrated its alpha on the first batch."""
        return all(q.is_calibrated for q in self.act_quantizers)

    # ---- per step ----------------------------------------------------------------------------------
    def before_forward(self, model: nn.Module, step: int) -> None:
        if self.frozen:
            self.source.train_bits, self.source.soft = list(self.frozen_bits), None
            return
        assert self.logits is not None
        draw = sample_counts(self.logits, self.free, self.cap, self.tau, self.generator)
        bits = [self.min_bits + c for c in draw.counts]
        self.source.train_bits, self.source.soft = bits, draw.soft
        self._sum = [s + b for s, b in zip(self._sum, bits)]
        self._draws += 1

    def after_backward(self, model: nn.Module) -> None:
        self.source.soft = None  # the step's graph is spent; do not keep it alive

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.clip:  # BinaryConnect's clip of the shadows to [-H, H], H = s
            for q in self.layers:
                q.weight.clamp_(-q.scale, q.scale)
        if not self.frozen:
            self.source.invalidate()  # the logits moved: the most likely allocation is recomputed lazily

    def _refresh_eval_bits(self) -> None:
        self.source.invalidate()

    # ---- per epoch ---------------------------------------------------------------------------------
    @torch.no_grad()
    def before_evaluate(self, model: nn.Module) -> None:
        """In the soft phase, re-estimate BatchNorm's running statistics at the allocation evaluation uses.

        Why: every training step draws another allocation, and a layer's output scale depends strongly
        on its bit-width, so the running statistics average over many networks; evaluating the most
        likely one with them gave chance-level error (88.7% on MNIST) until the allocation froze. The
        statistics are recomputed (cumulative average) from the first ``BN_BATCHES`` batches of this
        epoch's training order, BatchNorm in training mode and everything else in eval mode: no weight,
        gradient or random number of the training run is touched. Frozen runs need nothing.
        """
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        if self.frozen or not bns or self._train_data is None:
            return
        was_training = model.training
        train_bits, soft = self.source.train_bits, self.source.soft
        self.source.train_bits, self.source.soft = list(self.source.eval_bits), None
        momenta = [m.momentum for m in bns]
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
            m.train()
        try:
            for i, (x, _) in enumerate(self._train_data):
                if i >= BN_BATCHES:
                    break
                model(x)
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            model.train(was_training)
            self.source.train_bits, self.source.soft = train_bits, soft

    def on_epoch_end(self, epoch: int) -> None:
        tau_used = self.tau
        sampled = [s / self._draws for s in self._sum] if self._draws else None
        if not self.frozen and epoch + 1 >= self.hard_after:
            self._freeze()
        self._refresh_eval_bits()
        alloc = self.most_likely()
        self.history.append(allocation_string(alloc))
        self.tau = self.temperature(epoch + 1)
        self._sum, self._draws = [0] * self.num_layers, 0
        assert self.logits is not None
        probs = torch.softmax(self.logits.detach().double(), 0).tolist()
        rep: dict[str, float] = {"tau": tau_used, "frozen": float(self.frozen),
                                 "total_bits": float(sum(alloc))}
        for i, name in enumerate(self.layer_names):
            rep[f"bits/{name}"] = float(alloc[i])
            rep[f"expected_bits/{name}"] = float(alloc[i] if sampled is None else sampled[i])
            rep[f"prob/{name}"] = probs[i]
        self._report = rep

    def temperature(self, epoch: int) -> float:
        """Geometric annealing from ``tau0`` (epoch 0) to ``tau_min`` (the last soft epoch)."""
        soft_epochs = min(self.hard_after, self.epochs)
        t = min(epoch / max(soft_epochs - 1, 1), 1.0)
        return self.tau0 * (self.tau_min / self.tau0) ** t

    def _freeze(self) -> None:
        """The hard assignment: keep the most likely allocation for the rest of training."""
        self.frozen_bits = self.most_likely()
        self.frozen = True
        self.source.soft = None
        self.source.train_bits = list(self.frozen_bits)

    # ---- reporting ---------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Per layer: the allocation (``bits/``), the mean drawn bits of the epoch (``expected_bits/``),
        the softmax of the logits (``prob/``); the temperature used, whether frozen, the total."""
        return dict(self._report)

    def images(self) -> dict[str, Any]:
        return {"allocation": self._bar_chart()} if self.quantizers and self._report else {}

    def _bar_chart(self) -> np.ndarray:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        alloc = self.most_likely()
        expected = [self._report.get(f"expected_bits/{n}", b) for n, b in zip(self.layer_names, alloc)]
        fig = Figure(figsize=(max(3.0, 0.45 * self.num_layers + 1.5), 2.6), dpi=80)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        x = np.arange(self.num_layers)
        ax.bar(x, alloc, color="#4c72b0", label="allocation")
        ax.plot(x, expected, "o", color="#dd8452", label="expected")
        ax.axhline(self.bits, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, self.max_bits + 0.5)
        ax.set_xticks(x)
        ax.set_xticklabels([str(i + 1) for i in x])
        ax.set_xlabel("layer")
        ax.set_ylabel("bits")
        ax.set_title(f"{allocation_string(alloc)}  (T={self.budget}{', frozen' if self.frozen else ''})",
                     fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()

    def finalize(self, model: nn.Module, evaluate: Evaluate) -> dict[str, Any]:
        return {"allocation": self.allocation(), "allocation_bits": self.most_likely(),
                "allocation_history": list(self.history), "budget_bits": self.budget,
                "quantized_layers": list(self.layer_names), "allocation_frozen": self.frozen}

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        """The shared per-layer manifest at the current (final: frozen) allocation, plus the budget."""
        alloc = self.most_likely() if self.layers else []
        at_alloc = [dataclasses.replace(q, bits=b) for q, b in zip(self.layers, alloc)]  # reporting only
        extra: dict[str, Any] = {
            "allocation": allocation_string(alloc), "budget_bits": self.budget, "min_bits": self.min_bits,
            "max_bits": self.max_bits, "frozen": self.frozen, "tau": self.tau,
            "logits": [] if self.logits is None else self.logits.detach().cpu().tolist(),
        }
        if self.act_quantizers:
            extra["activation_bits"] = self.act_bits
            extra["activations"] = [format_row(relu_format(n, q))
                                    for n, q in zip(self.act_names, self.act_quantizers)]
        m = weight_manifest(model, at_alloc, self.name, self.bits, **extra)
        for row, q in zip(m["layers"], self.layers):
            row["lr_scale"] = layer_lr_scale(q, self.lr_scale)
            row["clip"] = q.scale if self.clip else None
        return m

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        assert self.logits is not None and self.generator is not None
        return {"logits": self.logits.detach().cpu().clone(), "tau": self.tau, "frozen": self.frozen,
                "frozen_bits": list(self.frozen_bits), "history": list(self.history),
                "generator": self.generator.get_state(), "sum": list(self._sum), "draws": self._draws,
                "report": dict(self._report)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.logits is not None and self.generator is not None
        if state["logits"].numel() != self.num_layers:
            raise QexpError(f"checkpoint has logits for {state['logits'].numel()} layers, "
                            f"this model quantizes {self.num_layers}")
        with torch.no_grad():
            self.logits.copy_(state["logits"].to(self.logits.device))
        self.tau, self.frozen = float(state["tau"]), bool(state["frozen"])
        self.frozen_bits = [int(b) for b in state["frozen_bits"]]
        self.history = list(state["history"])
        restore_generator(self.generator, state["generator"])
        self._sum, self._draws = [int(s) for s in state["sum"]], int(state["draws"])
        self._report = dict(state["report"])
        if self.frozen:
            self.source.train_bits = list(self.frozen_bits)
        self.source.soft = None
        self._refresh_eval_bits()
