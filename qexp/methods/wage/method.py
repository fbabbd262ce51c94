"""WAGE (Wu, Li, Chen, Shi, ICLR 2018): weights, activations, gradients and errors all on integer grids.

As the official TF code (boluoweifenda/WAGE) does it, see docs/methods/wage.md:

- init ``U(-L, L)``, ``L = max(sqrt(3/n_in), 1.5 sigma(k_W))``, stored on the k_W grid; layer scale
  ``alpha`` (a power of two) divides the forward weight ``Q(C(W, k_W), k_W)``;
- after every ReLU: ``QE`` (errors, backward) then ``QA`` (activations, forward); ``QA`` on the input,
  ``QE`` on the output; SSE loss summed over the batch;
- WAGE's own SGD: ``dW = SR(Q(eta g / Shift(max|g|), k_R)) / S(k_G)`` and ``W <- C(W - dW, k_W)``.

**eta and k_W.** The paper's eta = 8 belongs to its 2-8-8-8 setting: the largest update, ``eta sigma(k_G) =
1/16``, is 1/8 of a 2-bit weight step. The update does not shrink with the weight grid, and from k_W = 4
(LeNet-5) the layer scale alpha is 1, so at k_W = 8 the same eta moves a weight by 8 of its grid steps per
update, as much as its whole initial range: the loss oscillated (79 -> 1718 -> 57 -> 4197 in the first
steps) until a layer's errors were all zero. With ``eta_per_bits`` (default) eta = lr * 2^(2 - k_W) keeps
the paper's ratio (the largest update is 1/8 of a k_W grid step); k_W = 2 is unchanged.

**Update order.** The official code clips lazily, ``W <- C(W, k_W) - dW`` (the clip runs just before
each update). Storing the clipped value instead, ``W <- C(W - dW, k_W)``, gives the identical sequence of
forward weights and updates (``C`` is idempotent and the forward applies ``C`` anyway), and keeps every
stored weight on the k_G grid inside ``+-(1 - sigma(k_W))``.

**The optimizer.** WAGE replaces the optimizer step: :meth:`Wage.after_backward` takes the gradients
away (the configured optimizer then skips these parameters, so momentum/weight decay never act) and
:meth:`Wage.after_step` applies the quantized update with ``eta`` = the optimizer's current learning
rate, so the configured schedule (8 / 1 / 1/8 in the presets) drives it. No engine change needed.

**Layer order.** The paper's order is conv -> [max-pool] -> ReLU -> QE -> QA; our models are
conv -> ReLU -> [max-pool]. Max-pool commutes with ReLU and with the monotone QA, so QE/QA go after the
max-pool where a ReLU is followed by one, and after the ReLU otherwise: the forward is identical, and the
backward sees the same errors (QE quantizes the error at the pooled position; the pool routes it to
the same arg-max, where ReLU' is 1 exactly when the paper's ReLU' of the pooled value is).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from qexp.errors import QexpError, check_range
from qexp.methods.base import Method, RunContext
from qexp.methods.wage import formats as wage
from qexp.methods.wage.layers import ShiftStats, WageActivation, WageNetwork, WageWeight
from qexp.quant.format import row as format_row
from qexp.quant.format import symmetric
from qexp.quant.inject import attach_weight_quantizer, shadow_weight, weight_layers, weight_quantizer
from qexp.quant.kernels import restore_generator

#: leaf modules a WAGE chain network may contain
LEAVES = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
FIX = ("method=wage sets model.bn=false model.bias=false itself; do not override them (LeNet-5, VGG, MLP), "
       "or use a preset: +experiment=wage_mnist / +experiment=wage_cifar10")


def check_supported(model: nn.Module) -> None:
    """Raise a :class:`QexpError` naming the offending layer unless WAGE can run ``model`` as is."""
    cls = type(model).__name__
    for name, m in model.named_modules():
        if m is model or isinstance(m, (nn.Sequential, _BatchNorm)):
            continue
        if not isinstance(m, LEAVES):
            raise QexpError(
                f"method=wage runs chain networks of conv/linear, ReLU and max-pool without BatchNorm or "
                f"biases (lenet5, vgg7, vgg9, vgg11, mlp); {cls} contains a {type(m).__name__} at '{name}'.")
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise QexpError(f"method=wage trains without dropout; '{name}' has p={m.p} (use model.dropout=0)")
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            raise QexpError(f"method=wage needs zero padding; conv '{name}' pads with {m.padding_mode!r}")
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            raise QexpError(f"method=wage trains without BatchNorm, but {cls} has a {type(m).__name__} at "
                            f"'{name}': {FIX}.")
    for name, m in weight_layers(model):
        if m.bias is not None:
            raise QexpError(f"method=wage trains without biases, but layer '{name}' of {cls} has one: {FIX}.")


def insert_activation_quantizers(model: nn.Module, bits_a: int, bits_e: int) -> list[WageActivation]:
    """QE+QA after every ReLU, or after the max-pool that directly follows it (see the module docstring)."""
    targets: list[nn.Module] = []
    in_sequential: set[int] = set()
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        kids = list(parent)
        for i, m in enumerate(kids):
            if isinstance(m, nn.ReLU):
                in_sequential.add(id(m))
                nxt = kids[i + 1] if i + 1 < len(kids) else None
                targets.append(nxt if isinstance(nxt, nn.MaxPool2d) else m)
    targets += [m for m in model.modules() if isinstance(m, nn.ReLU) and id(m) not in in_sequential]
    wanted = {id(t) for t in targets}
    sites: list[WageActivation] = []
    for name, module in list(model.named_modules()):
        if id(module) in wanted:
            act = WageActivation(bits_a, bits_e)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, nn.Sequential(module, act))
            sites.append(act)
    return sites


class Wage(Method):
    bits_range = (2, 8)  # k_W; 8 at most so that weights export to int8
    #: ``qexp eval --integer``: integer-only inference of the trained run
    eval_analyses = ("qexp.methods.wage.integer_eval",)
    data_parallel_refusal = ("WAGE scales each layer's errors by the largest error of the batch, which one "
                             "process's share of the batch does not see, so the update would not be WAGE's")

    def __init__(self, bits: int | None = None, loss: str = "sse", bits_a: int = 8, bits_g: int = 8,
                 bits_e: int = 8, bits_r: int = 16, beta: float = 1.5, qa_logits: bool = False,
                 eta_per_bits: bool = True) -> None:
        super().__init__(bits, loss)
        self.bits_a = check_range("method.bits_a", int(bits_a), 2, 8, why="activations export to int8")
        self.bits_e = check_range("method.bits_e", int(bits_e), 2, 16, why="error bits")
        self.bits_g = check_range("method.bits_g", int(bits_g), self.bits, 16,
                                  why="stored weights live on the k_G grid, which must contain the k_W grid")
        self.bits_r = check_range("method.bits_r", int(bits_r), 2, 24, why="randomizer bits, float32 mantissa")
        self.beta = float(check_range("method.beta", beta, 0, 1e3, strict_lo=True,
                                      why="L_min = beta sigma(k_W), the smallest uniform init limit"))
        self.qa_logits = bool(qa_logits)
        #: eta = lr * eta_scale: the largest update stays 1/8 of a k_W grid step, as in the paper's 2-8-8-8
        self.eta_scale = 2.0 ** (2 - self.bits) if eta_per_bits else 1.0
        self.layers: list[tuple[str, nn.Module]] = []
        self.sites: list[tuple[str, ShiftStats]] = []
        self.act_names: list[str] = []  # the WageActivation modules: their output's format
        self.generator: torch.Generator | None = None
        self._pending: list[tuple[int, nn.Parameter, torch.Tensor]] = []
        self._grad_shift: list[torch.Tensor] = []
        self._grad_zero: list[torch.Tensor] = []
        self._updates = 0

    def bits_label(self) -> str:
        return f"{self.bits}-{self.bits_a}-{self.bits_g}-{self.bits_e}"

    # ---- set-up ----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        check_supported(model)
        layers = weight_layers(model)
        if not layers:
            raise QexpError(f"method=wage found no conv/linear layer in {type(model).__name__}")
        with torch.no_grad():
            for _, layer in layers:
                fan_in = layer.weight[0].numel()
                lim = wage.init_limit(fan_in, self.bits, self.beta)
                w = layer.weight.uniform_(-lim, lim)
                w.copy_(wage.C(wage.Q(w, self.bits), self.bits))  # official: quantize W once at start
                attach_weight_quantizer(layer, WageWeight(self.bits, wage.weight_alpha(fan_in, self.bits, self.beta)))
        acts = insert_activation_quantizers(model, self.bits_a, self.bits_e)
        ids = {id(a) for a in acts}
        self.act_names = [n for n, m in model.named_modules() if id(m) in ids]
        net = WageNetwork(model, self.bits_a, self.bits_e, self.qa_logits)
        self.layers = [(n, m) for n, m in layers]
        # site i quantizes the error at the output of weight layer i (chain networks); else name by index
        stats = [a.error_shift for a in acts] + [net.output_error.error_shift]
        names = [n for n, _ in layers] if len(stats) == len(layers) else [f"site{i}" for i in range(len(stats))]
        self.sites = list(zip(names, stats))
        dev = ctx.device
        self.generator = torch.Generator(device=dev)
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        n = len(layers)
        self._grad_shift = [torch.zeros((), device=dev) for _ in range(n)]
        self._grad_zero = [torch.zeros((), device=dev) for _ in range(n)]
        return net

    # ---- per step: WAGE's own update replaces the optimizer's ------------------------------------
    def after_backward(self, model: nn.Module) -> None:
        """Take the gradients away from the optimizer (it skips parameters whose grad is None)."""
        for i, (_, layer) in enumerate(self.layers):
            p = shadow_weight(layer)
            if p.grad is not None:
                self._pending.append((i, p, p.grad))
                p.grad = None

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """``W <- C(W - dW, k_W)`` with WAGE's quantized, stochastically rounded update."""
        lr = float(optimizer.param_groups[0]["lr"]) * self.eta_scale
        m = 1.0 - wage.sigma(self.bits)
        for i, p, g in self._pending:
            r = wage.randomizer(p.shape, self.bits_r, self.generator, p.device, p.dtype)
            steps, shift = wage.round_update_steps(g, lr, self.bits_r, r)
            p.sub_(steps, alpha=wage.sigma(self.bits_g)).clamp_(-m, m)
            self._grad_shift[i] += shift
            self._grad_zero[i] += 1.0 - torch.count_nonzero(steps) / steps.numel()
        if self._pending:
            self._updates += 1
        self._pending.clear()

    # ---- diagnostics -----------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Per layer: mean Shift exponents of errors / gradients, fraction of updates rounded to zero,
        and the weight grid's occupancy (share of zero and saturated weights, share of levels in use)."""
        out: dict[str, float] = {}
        for name, st in self.sites:
            e = st.mean_and_reset()
            if e is not None:
                out[f"e_shift/{name}"] = e
        n_up = max(self._updates, 1)
        zero_all = 0.0
        for i, (name, layer) in enumerate(self.layers):
            if self._updates:
                out[f"g_shift/{name}"] = self._grad_shift[i].item() / n_up
                out[f"g_zero/{name}"] = self._grad_zero[i].item() / n_up
                zero_all += out[f"g_zero/{name}"]
            self._grad_shift[i].zero_()
            self._grad_zero[i].zero_()
            out.update({f"{k}/{name}": v for k, v in self.occupancy(layer).items()})
        if self._updates:
            out["g_zero"] = zero_all / len(self.layers)
        self._updates = 0
        return out

    def occupancy(self, layer: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            codes = torch.round(wage.quantize_weight(shadow_weight(layer), self.bits) * wage.S(self.bits))
            top = wage.S(self.bits) - 1
            used = torch.unique(codes).numel()
            return {"w_zero": (codes == 0).float().mean().item(),
                    "w_sat": (codes.abs() == top).float().mean().item(),
                    "w_levels": used / (2 * top + 1)}

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        layers = []
        n_params = 0
        for name, layer in self.layers:
            q = weight_quantizer(layer)
            w = shadow_weight(layer)
            n_params += w.numel()
            alpha = getattr(q, "alpha", 1.0)  # the forward weight: codes -(S-1)..S-1 times sigma(k_W) / alpha
            layers.append(format_row(symmetric(name, self.bits, wage.sigma(self.bits) / alpha),
                                     type=type(layer).__name__, shape=list(w.shape), alpha=alpha,
                                     fan_in=w[0].numel(), update=f"stochastic, {self.bits_g}-bit grid"))
        return {"method": self.name, "bits": self.bits, "tag": self.bits_label(),
                "bits_a": self.bits_a, "bits_g": self.bits_g, "bits_e": self.bits_e, "bits_r": self.bits_r,
                "layers": layers,
                "activations": [format_row(symmetric(n, self.bits_a, wage.sigma(self.bits_a), tensor="activation"))
                                for n in self.act_names],
                "logits_quantized": self.qa_logits, "eta_scale": self.eta_scale,
                "errors": {"bits": self.bits_e, "rounding": "nearest", "scale": "Shift(max|e|) per tensor",
                           "sites": [n for n, _ in self.sites]},
                "weight_bytes": (n_params * self.bits + 7) // 8, "float32_bytes": 4 * n_params}

    # ---- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state() if self.generator is not None else None,
                "sites": [st.state() for _, st in self.sites],
                "grad_shift": [t.detach().cpu() for t in self._grad_shift],
                "grad_zero": [t.detach().cpu() for t in self._grad_zero],
                "updates": self._updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None and self.generator is not None:
            restore_generator(self.generator, state["generator"])
        for (_, st), s in zip(self.sites, state.get("sites", [])):
            st.load(s)
        for dst, src in zip(self._grad_shift, state.get("grad_shift", [])):
            dst.copy_(src)
        for dst, src in zip(self._grad_zero, state.get("grad_zero", [])):
            dst.copy_(src)
        self._updates = int(state.get("updates", 0))
