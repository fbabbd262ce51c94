"""DoReFa-Net (Zhou et al. 2016): ``method=dorefa``, k-bit weights, activations and (optionally) gradients.

With ``quantize_k(r) = round((2^k - 1) r) / (2^k - 1)`` on ``r in [0, 1]`` (straight-through backward):

- weights (``bits``): ``w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``, levels
  ``{-1, ..., 1}`` in ``2^k - 1`` steps; the gradient flows through tanh and the max as in the paper's
  code. 1 bit: ``sign(w) E|w|`` (``E`` without gradient), straight-through.
- activations (``abits``): every ``nn.ReLU`` becomes ``quantize_k(clip(x, 0, 1))``; gradient 1 on
  ``(0, 1)``, 0 outside (the clip's). 32 keeps the ReLUs.
- gradients (``gbits``, off by default): the gradient ``dr`` reaching each quantized layer's output is
  replaced by ``2 max0|dr| [quantize_k(dr / (2 max0|dr|) + 1/2 + N(k)) - 1/2]``, ``max0`` taken per
  example, ``N(k)`` uniform noise of one level's width (seeded, saved in checkpoints); the values are
  clipped to ``[0, 1]`` before rounding as the paper's code does.

The first and last layer keep float weights (``first_last_bits: 32``, the paper's choice); any other
value quantizes them at that many bits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError
from qexp.methods.base import Method, RunContext
from qexp.quant.activation import QuantReLU, max_index, relu_format
from qexp.quant.format import LayerFormat, float_format, symmetric, uniform
from qexp.quant.format import row as format_row
from qexp.quant.inject import WEIGHT_LAYERS, attach_weight_quantizer, replace_modules, shadow_weight, weight_quantizer
from qexp.quant.kernels import HALF, Noise
from qexp.quant.layers import FLOAT_BITS, LayerPlan, check_bits, plan_layers
from qexp.quant.straight_through import straight_through


def quantize_unit(r: torch.Tensor, bits: int) -> torch.Tensor:
    """``quantize_k``: ``r`` in [0, 1] rounded to the nearest of ``2^k`` levels ``i / (2^k - 1)``."""
    n = max_index(bits)
    return r.mul(n).round_().div_(n)


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantized weight (with DoReFa's gradient: tanh and max differentiated, rounding straight-through)."""
    if bits == 1:
        e = w.detach().abs().mean()
        with torch.no_grad():
            q = torch.where(w >= 0, e, -e)
        return straight_through(w, q)
    t = torch.tanh(w)
    u = t / (2 * t.abs().max()) + 0.5
    with torch.no_grad():
        q = quantize_unit(u, bits)
    return 2 * straight_through(u, q) - 1


class DoReFaWeight(nn.Module):
    """Parametrization ``w -> w_q`` (see :func:`dorefa_weight`)."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return dorefa_weight(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def quantize_gradient(dr: torch.Tensor, bits: int, noise: Noise) -> torch.Tensor:
    """DoReFa's k-bit gradient (see the module docstring); ``noise`` supplies the uniform offsets."""
    n = max_index(bits)
    dims = tuple(range(1, dr.dim()))
    m = dr.abs().amax(dim=dims, keepdim=True) if dims else dr.abs().max()
    m = m.clamp_min(torch.finfo(dr.dtype).tiny) * 2
    t = noise.int16(dr.numel()).view(dr.shape)  # uniform on [-2^15, 2^15): offsets in [-1/2n, 1/2n)
    u = (dr / m).add_(0.5).add_(t, alpha=1.0 / (2 * HALF * n)).clamp_(0, 1)
    return quantize_unit(u, bits).sub_(0.5).mul_(m)


class _GradientQuantizer(torch.autograd.Function):
    """Identity forward; DoReFa's k-bit gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bits: int, noise: Noise) -> torch.Tensor:  # type: ignore[override]
        ctx.bits, ctx.noise = bits, noise
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        return quantize_gradient(grad, ctx.bits, ctx.noise), None, None


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]


def last_layer_input(model: nn.Module) -> str | None:
    """The ReLU whose output feeds the last conv/linear layer: the last ReLU registered before it."""
    leaves = _leaves(model)
    last = max((i for i, (_, m) in enumerate(leaves) if isinstance(m, WEIGHT_LAYERS)), default=None)
    if last is None:
        return None
    return next((n for n, m in reversed(leaves[:last]) if isinstance(m, nn.ReLU)), None)


def unnormalised_activations(model: nn.Module, names: set[str]) -> list[str]:
    """Those ReLUs among ``names`` that follow a conv/linear layer with no BatchNorm in between (in
    registration order, pools and reshapes skipped: every qexp model registers a block's BN after its
    conv, and a residual block's ReLUs after both of its BNs)."""
    bad, prev = [], None
    for n, m in _leaves(model):
        if isinstance(m, (*WEIGHT_LAYERS, nn.modules.batchnorm._BatchNorm)):
            prev = m
        elif isinstance(m, nn.ReLU) and n in names and isinstance(prev, WEIGHT_LAYERS):
            bad.append(n)
    return bad


class DoReFa(Method):
    """``method=dorefa``. Options: ``abits`` (2..8, 32 = float ReLUs; null: same as ``bits``),
    ``gbits`` (2..8 or null = float gradients; the noise is seeded by the run's seed), ``first_last_bits``
    (32 = float, the paper)."""

    bits_range = (1, 8)
    #: activation bits this method's activation function supports
    abits_range = (2, 8)

    def __init__(self, bits: int | None = None, loss: str = "ce", abits: int | None = None,
                 gbits: int | None = None, first_last_bits: int | None = FLOAT_BITS) -> None:
        super().__init__(bits, loss)
        lo, hi = self.abits_range
        a = self.bits if abits is None else abits
        try:
            self.abits = check_bits("abits", a, lo, hi, allow_float=True)
        except QexpError as e:
            if a == self.bits:  # abits: ${bits} in the config: the user typed bits, not abits
                raise QexpError(f"{e} (abits follows bits unless set: pass abits=2..{hi} or 32)") from None
            raise
        self.gbits = check_bits("method.gbits", gbits, 2, 8)
        self.first_last_bits = check_bits("method.first_last_bits", first_last_bits, 1, 8, allow_float=True)
        self.plan: list[LayerPlan] = []
        self.activations: list[tuple[str, nn.Module]] = []
        self.float_input: str | None = None  # the ReLU feeding a float last layer: clipped, not rounded
        self.noise: Noise | None = None

    # ---- set-up --------------------------------------------------------------------------------------
    def activation(self, name: str) -> nn.Module:
        """The module that replaces a ReLU: ``quantize_k(clip(x, 0, 1))`` (a fixed-resolution quantized
        ReLU with resolution ``1/(2^k - 1)``, nearest rounding and the clipped-ReLU straight-through
        estimator)."""
        return QuantReLU(self.abits, "clipped_relu", alpha=1.0 / max_index(self.abits),  # type: ignore[arg-type]
                         staircase="round")

    def float_activation(self) -> nn.Module:
        """The last layer's input when that layer is float: the official code's ``clip(x, 0, 1)``,
        not rounded (gradient 1 on (0, 1), as the quantized one)."""
        return nn.Hardtanh(0.0, 1.0)

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.plan = plan_layers(model, self.bits, FLOAT_BITS, self.first_last_bits)
        if self.gbits is not None:
            self.noise = Noise(ctx.seed, ctx.device)
        for p in self.plan:
            if p.wbits != FLOAT_BITS:
                attach_weight_quantizer(p.module, DoReFaWeight(p.wbits))
                if self.gbits is not None:
                    p.module.register_forward_hook(self._quantize_gradient)
        if self.abits != FLOAT_BITS:
            relus = {n for n, m in model.named_modules() if isinstance(m, nn.ReLU)}
            if not relus:
                raise QexpError(f"method={self.name} quantizes activations at nn.ReLU modules, and "
                                f"{type(model).__name__} has none (abits=32 keeps activations float)")
            self.float_input = last_layer_input(model) if self.first_last_bits == FLOAT_BITS else None
            bad = unnormalised_activations(model, relus - {self.float_input})
            if bad:
                raise QexpError(f"method={self.name} clips activations to a fixed range and needs a BatchNorm "
                                f"before each quantized one; {type(model).__name__}'s {bad[0]} has none "
                                f"(use model.bn=true, or abits=32 for float activations)")
            names = replace_modules(model, lambda n, m: isinstance(m, nn.ReLU),
                                    lambda n, m: (self.float_activation() if n == self.float_input
                                                  else self.activation(n)).to(ctx.device))
            self.activations = [(n, model.get_submodule(n)) for n in names]
        return model

    def _quantize_gradient(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.noise is None or not (torch.is_grad_enabled() and output.requires_grad):
            return None
        return _GradientQuantizer.apply(output, self.gbits, self.noise)

    # ---- reporting -----------------------------------------------------------------------------------
    def _layer_rows(self) -> tuple[list[dict[str, Any]], set[int], int]:
        rows, quantized, q_bits = [], set(), 0
        for p in self.plan:
            w = shadow_weight(p.module)
            q = weight_quantizer(p.module) is not None
            rows.append(format_row(self._weight_format(p.name, p.wbits, w) if q else float_format(p.name),
                                   type=type(p.module).__name__, shape=list(w.shape), params=w.numel(),
                                   weights=("sign(w) E|w|" if p.wbits == 1 else "tanh-normalised, k-bit on [-1, 1]")
                                   if q else "float", gradient_bits=self.gbits if q else None))
            if q:
                quantized.add(id(w))
                q_bits += w.numel() * p.wbits
        return rows, quantized, q_bits

    @staticmethod
    def _weight_format(name: str, bits: int, w: torch.Tensor) -> LayerFormat:
        """1 bit: ``+-E|w|`` (the mean the forward computes); else ``2 i/n - 1``: codes ``0..n``, step
        ``2/n``, offset -1 (decodes to within float rounding of the forward's ``2 (i/n) - 1``)."""
        if bits == 1:
            return symmetric(name, 1, float(w.detach().abs().mean()))
        n = max_index(bits)
        return uniform(name, bits, 2.0 / n, 0, n, offset=-1.0)

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        rows, quantized, q_bits = self._layer_rows()
        params = list(model.parameters())
        other = sum(p.numel() for p in params if id(p) not in quantized)
        total = sum(p.numel() for p in params)
        weight_bytes = -(-q_bits // 8) + 4 * other
        acts = [self._activation_row(n, m) for n, m in self.activations]
        return {"method": self.name, "bits": self.bits, "activation_bits": self.abits,
                "gradient_bits": self.gbits, "first_last_bits": self.first_last_bits, "layers": rows,
                "activations": acts, "quantized_params": total - other, "float_params": other,
                "weight_bytes": weight_bytes, "float32_bytes": 4 * total,
                "compression": 4 * total / max(weight_bytes, 1)}

    def _activation_row(self, name: str, module: nn.Module) -> dict[str, Any]:
        fmt = float_format(name, "activation") if isinstance(module, nn.Hardtanh) else relu_format(name, module)
        return format_row(fmt, range=[0.0, 1.0])

    def bits_label(self) -> str:
        g = f"g{self.gbits}" if self.gbits is not None else ""
        return f"w{self.bits}a{self.abits}{g}"

    # ---- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"noise": self.noise.state_dict()} if self.noise is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.noise is not None and "noise" in state:
            self.noise.load_state_dict(state["noise"])
