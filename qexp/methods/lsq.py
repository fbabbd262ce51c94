"""Learned Step Size Quantization (Esser et al., ICLR 2020): ``method=lsq``.

Every conv/linear layer quantizes its weight and its input with a learned step ``s`` each:

    v_hat = round(clip(v / s, -Q_N, Q_P)) * s

with ``Q_N = 2^(b-1), Q_P = 2^(b-1) - 1`` for signed data (weights; a layer input with negative values,
e.g. the normalised image) and ``Q_N = 0, Q_P = 2^b - 1`` for unsigned data (inputs after ReLU).
Backward (the paper's eqs. 3-5): ``d v_hat / d v = 1`` inside the range and 0 outside (straight-through
on the rounding); ``d v_hat / d s = round(v/s) - v/s`` inside, ``-Q_N`` below, ``Q_P`` above; the step's
gradient is multiplied by ``g = 1/sqrt(N * Q_P)`` with ``N`` the layer's weight count (weights) or
its number of input features per example (activations). Steps start at ``2 mean|v| / sqrt(Q_P)``: of
the initial weights, and of the first training batch's inputs (taken in ``prepare`` from the run's data,
so every data-parallel process starts alike; lazily on the first forward pass when there is no data).
``first_last_bits`` (default 8, as the paper) sets the first and last layer's weight and input
precision; 32 leaves them float.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError
from qexp.methods.base import Method, RunContext
from qexp.quant.format import float_format, uniform
from qexp.quant.format import row as format_row
from qexp.quant.inject import attach_weight_quantizer, shadow_weight, weight_quantizer
from qexp.quant.kernels import host_scalars
from qexp.quant.layers import FLOAT_BITS, LayerPlan, check_bits, plan_layers

#: steps are kept above this after every optimizer step (a step must stay positive)
MIN_STEP = 1e-8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """``(Q_N, Q_P)``: the grid is ``s * {-Q_N, ..., Q_P}``."""
    if signed:
        return 1 << (bits - 1), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def init_step(v: torch.Tensor, q_p: int) -> float:
    """The paper's initial step ``2 mean|v| / sqrt(Q_P)`` (a tiny positive value for an all-zero v)."""
    return max(2.0 * float(v.detach().abs().mean()) / math.sqrt(q_p), MIN_STEP)


class LSQFunction(torch.autograd.Function):
    """``v_hat`` forward; straight-through ``dv`` and the scaled step gradient in one backward.

    The step gradient ``g * sum(grad * (q - (v/s) 1{inside}))`` with ``q = v_hat / s`` is computed as
    ``g * (<grad, v_hat> - <grad_v, v>) / s`` on the host path (a CPU in eager mode: ``s`` read as a host
    number, one-pass kernels with scalar bounds) and as ``g * (<grad, v_hat> / s - <grad_v, v/s>)`` on
    the device path (a GPU, or any device under torch.compile: :func:`qexp.quant.kernels.host_scalars`),
    where ``v/s`` is kept from the forward so that the inside test is one kernel against constant
    bounds: two dot products, no per-element factor tensor, no host read of ``s`` (9 launches a
    quantizer, forward and backward, instead of 16). The forward records which path it took.
    """

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int,  # type: ignore[override]
                g: float) -> torch.Tensor:
        ctx.q_n, ctx.q_p, ctx.g = q_n, q_p, g
        ctx.host = host_scalars(v)
        if ctx.host:  # scalar arithmetic: several times faster than 0-dim tensor broadcasts on CPU
            sf = float(s)
            out = v.mul(1.0 / sf).round_().clamp_(-q_n, q_p).mul_(sf)
            ctx.save_for_backward(v, s, out)
        else:  # keep s on the device (no sync)
            r = v / s
            out = r.round().clamp_(-q_n, q_p).mul_(s)
            ctx.save_for_backward(r, s, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        t, s, out = ctx.saved_tensors  # t: v on the host path, v/s on the device path
        host = ctx.host
        if host:  # one-pass kernel with host bounds
            sf = float(s)
            grad_v = torch.ops.aten.hardtanh_backward(grad, t, -ctx.q_n * sf, ctx.q_p * sf)
        else:  # -Q_N < v/s < Q_P, the paper's inside, in one kernel
            grad_v = torch.ops.aten.hardtanh_backward(grad, t, -ctx.q_n, ctx.q_p)
        grad_s = None
        if ctx.needs_input_grad[1]:
            d_out = torch.dot(grad.reshape(-1), out.reshape(-1))
            d_in = torch.dot(grad_v.reshape(-1), t.reshape(-1))
            if host:
                grad_s = ((d_out - d_in) * (ctx.g / s)).reshape(s.shape)
            else:  # g <grad, v_hat> / s - g <grad_v, v/s>
                grad_s = torch.addcdiv(d_in.mul_(-ctx.g), d_out, s.reshape(()), value=ctx.g).reshape(s.shape)
        return grad_v, grad_s, None, None, None


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, q_n: int, q_p: int, g: float = 1.0) -> torch.Tensor:
    """Fake-quantize ``v`` with step ``s`` on ``s * {-Q_N..Q_P}`` (LSQ's gradients; see the module doc)."""
    return LSQFunction.apply(v, s, q_n, q_p, g)


class LSQWeight(nn.Module):
    """Parametrization ``w -> w_hat`` of a conv/linear weight with its own learned step."""

    def __init__(self, weight: torch.Tensor, bits: int, grad_scale: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.q_n, self.q_p = qrange(bits, signed=True)
        self.g = 1.0 / math.sqrt(weight.numel() * self.q_p) if grad_scale else 1.0
        self.step = nn.Parameter(torch.tensor(init_step(weight, self.q_p), device=weight.device))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return lsq_quantize(w, self.step.to(w.dtype), self.q_n, self.q_p, self.g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, step={float(self.step.detach()):.4g}"


class LSQInput(nn.Module):
    """The learned-step quantizer of a layer's input. Signedness and the initial step come from the
    first batch it sees (signed when that batch has negative values); both are buffers, so a resumed
    run keeps them."""

    def __init__(self, bits: int, grad_scale: bool = True) -> None:
        super().__init__()
        self.bits, self.grad_scale = bits, grad_scale
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(False))
        self._init, self._signed = False, False  # host mirrors: no device sync per call

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        self._signed = bool(x.min() < 0)
        _, q_p = qrange(self.bits, self._signed)
        self.step.fill_(init_step(x, q_p))
        self.signed.fill_(self._signed)
        self.initialized.fill_(True)
        self._init = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._init, self._signed = bool(self.initialized), bool(self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._init:
            self._initialize(x)
        q_n, q_p = qrange(self.bits, self._signed)
        g = 1.0 / math.sqrt(x[0].numel() * q_p) if self.grad_scale else 1.0
        return lsq_quantize(x, self.step.to(x.dtype), q_n, q_p, g)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self._signed}, step={float(self.step.detach()):.4g}"


@torch.no_grad()
def _initialize_inputs(model: nn.Module, train: Any) -> None:
    """Initialise every input step from the first training batch now, in prepare (the batch the first
    training step would see, in training mode), so that every data-parallel process starts from the same
    steps. The buffers this forward pass touches (BatchNorm's running statistics) are put back."""
    batch = next(iter(train), None)
    if batch is None:
        return
    keep = {n: b.clone() for n, b in model.named_buffers() if ".input_quantizer." not in f".{n}"}
    was_training = model.training
    model.train()
    model(batch[0])
    model.train(was_training)
    for n, b in model.named_buffers():
        if n in keep:
            b.copy_(keep[n])


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook of a conv/linear layer: its input goes through ``module.input_quantizer``."""
    return (module.input_quantizer(args[0]), *args[1:])


class LSQ(Method):
    """``method=lsq``: learned-step weights (``bits``) and layer inputs (``abits``). Options:

    - ``abits``: input bits (2..8, or 32 to keep activations float); null: same as ``bits``.
    - ``first_last_bits``: weight and input bits of the first and last layer (the paper: 8); null: no
      exception; 32: float.
    - ``grad_scale``: the paper's step-gradient scale ``g`` (false: g = 1, for ablations).
    - ``step_lr_scale``: learning-rate multiplier of the steps (their group has no weight decay).
    """

    bits_range = (2, 8)

    def __init__(self, bits: int | None = None, loss: str = "ce", abits: int | None = None,
                 first_last_bits: int | None = 8, grad_scale: bool = True, step_lr_scale: float = 1.0) -> None:
        super().__init__(bits, loss)
        self.abits = check_bits("abits", self.bits if abits is None else abits, 2, 8, allow_float=True)
        self.first_last_bits = check_bits("method.first_last_bits", first_last_bits, 2, 8, allow_float=True)
        if not float(step_lr_scale) > 0:
            raise QexpError(f"method.step_lr_scale must be positive, got {step_lr_scale}")
        self.grad_scale, self.step_lr_scale = bool(grad_scale), float(step_lr_scale)
        self.plan: list[LayerPlan] = []

    # ---- set-up --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self.plan = plan_layers(model, self.bits, self.abits, self.first_last_bits)  # type: ignore[arg-type]
        for p in self.plan:
            if p.wbits != FLOAT_BITS:
                attach_weight_quantizer(p.module, LSQWeight(shadow_weight(p.module), p.wbits, self.grad_scale))
            if p.abits != FLOAT_BITS:
                p.module.add_module("input_quantizer", LSQInput(p.abits, self.grad_scale).to(ctx.device))
                p.module.register_forward_pre_hook(_quantize_input)
        if ctx.data is not None and any(hasattr(p.module, "input_quantizer") for p in self.plan):
            _initialize_inputs(model, ctx.data.train)
        return model

    def steps(self) -> list[nn.Parameter]:
        return [q.step for q in self._quantizers()]

    def _quantizers(self) -> list[nn.Module]:
        out: list[nn.Module] = []
        for p in self.plan:
            w = weight_quantizer(p.module)
            if w is not None:
                out.append(w)
            if hasattr(p.module, "input_quantizer"):
                out.append(p.module.input_quantizer)
        return out

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        steps = self.steps()
        ids = {id(s) for s in steps}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "name": "float"},
                {"params": steps, "lr_scale": self.step_lr_scale, "weight_decay": 0.0, "name": "steps"}]

    # ---- per step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        steps = self.steps()
        if steps:  # every step size in one multi-tensor call
            torch._foreach_clamp_min_(steps, MIN_STEP)

    # ---- reporting -----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Each layer's learned weight step (``wstep/<layer>``) and input step (``astep/<layer>``)."""
        out: dict[str, float] = {}
        for p in self.plan:
            w = weight_quantizer(p.module)
            if w is not None:
                out[f"wstep/{p.name}"] = float(w.step.detach())
            if hasattr(p.module, "input_quantizer"):
                out[f"astep/{p.name}"] = float(p.module.input_quantizer.step.detach())
        return out

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        rows, acts, q_bits, quantized = [], [], 0, set()
        for p in self.plan:
            w = shadow_weight(p.module)
            info: dict[str, Any] = {"type": type(p.module).__name__, "shape": list(w.shape), "params": w.numel(),
                                    "input_bits": p.abits, "step_rule": "learned (LSQ)"}
            wq = weight_quantizer(p.module)
            fmt = float_format(p.name)
            if wq is not None:
                quantized.add(id(w))
                q_bits += w.numel() * p.wbits + 32  # codes + the step
                fmt = uniform(p.name, p.wbits, float(wq.step.detach()), -wq.q_n, wq.q_p)
                info.update(q_n=wq.q_n, q_p=wq.q_p)
            if hasattr(p.module, "input_quantizer"):
                iq = p.module.input_quantizer
                q_n, q_p = qrange(p.abits, bool(iq.signed))
                info.update(input_step=float(iq.step.detach()), input_signed=bool(iq.signed),
                            input_q_n=q_n, input_q_p=q_p)
                acts.append(format_row(uniform(p.name, p.abits, info["input_step"], -q_n, q_p, tensor="input")))
            rows.append(format_row(fmt, **info))
        params = [p for p in model.parameters() if not _is_step(p, self)]
        other = sum(p.numel() for p in params if id(p) not in quantized)
        total = sum(p.numel() for p in params)
        weight_bytes = math.ceil(q_bits / 8) + 4 * other
        return {"method": self.name, "bits": self.bits, "activation_bits": self.abits,
                "first_last_bits": self.first_last_bits, "grad_scale": self.grad_scale, "layers": rows,
                "activations": acts, "quantized_params": total - other, "float_params": other,
                "weight_bytes": weight_bytes,
                "float32_bytes": 4 * total, "compression": 4 * total / max(weight_bytes, 1)}

    def bits_label(self) -> str:
        return f"w{self.bits}a{self.abits}"


def _is_step(p: torch.Tensor, method: LSQ) -> bool:
    return any(p is s for s in method.steps())
