"""Integer-only inference: export a fake-quantized chain network as integer tensors with power-of-two
scales, and run its forward pass in integer arithmetic.

Every tensor of the exported network is ``codes * 2^exponent`` with integer ``codes``:

- weights: int8 codes and one exponent per layer, found from the layer's (quantized) forward weight and
  *checked* to be exact, so a network whose weights are not power-of-two fixed point is refused;
- activations: the codes of the previous layer accumulate in int32 (int64 where the worst case could
  overflow int32) through conv/linear, pass ReLU and max-pool unchanged, and are requantized by a
  rounding arithmetic shift (round half to even, as ``torch.round``) and a clamp to int8;
- the input is encoded once, ``round(clamp(x 2^-e))``: the only float operation, on the data, not
  the network.

The program is the sequence of leaf modules the float model calls, recorded with forward hooks on a
sample batch and checked to be a chain (each op consumes the previous op's output). Quantizer modules
declare their integer meaning with ``integer_op()`` (``{"kind": "requant", "exponent", "max_code"}`` or
``{"kind": "identity"}``); conv, linear, ReLU, max-pool, flatten, identity and dropout are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qexp.errors import QexpError

WEIGHTED = (nn.Conv2d, nn.Linear)
PASSTHROUGH = (nn.Identity, nn.Dropout)
INT32_MAX = 2**31 - 1


def rshift_round(a: torch.Tensor, s: int) -> torch.Tensor:
    """``round_half_even(a / 2^s)`` for integer tensors (``s <= 0`` is an exact left shift)."""
    if s <= 0:
        return a << -s
    q = a >> s  # arithmetic shift: floor division
    r = a - (q << s)
    half = 1 << (s - 1)
    up = (r > half) | ((r == half) & ((q & 1) == 1))
    return q + up.to(q.dtype)


def weight_codes(w: torch.Tensor, max_code: int = 127, name: str = "") -> tuple[torch.Tensor, int]:
    """Integer codes and exponent with ``w == codes * 2^exponent`` exactly, the coarsest such grid."""
    w = w.detach().double().cpu()
    if not torch.isfinite(w).all():
        raise QexpError(f"layer {name!r}: non-finite weights cannot be exported to integers")
    if not w.any():
        return torch.zeros(w.shape, dtype=torch.int8), 0
    for e in range(16, -60, -1):
        c = w * 2.0**-e
        if torch.equal(c, c.round()):
            if c.abs().max() > max_code:
                raise QexpError(f"layer {name!r}: weights are not int8 codes with a power-of-two scale (they "
                                f"need codes up to {int(c.abs().max())} at scale 2^{e}; int8 holds +-{max_code}); "
                                "integer inference needs a quantized network (e.g. method=wage)")
            return c.to(torch.int8), e
    raise QexpError(f"layer {name!r}: weights are not fixed-point numbers with a power-of-two scale; "
                    "integer inference needs a quantized network (e.g. method=wage)")


@dataclass
class IntegerNetwork:
    """The exported program: a list of ops (plain values and int8 tensors; saved with ``torch.save``)."""

    ops: list[dict[str, Any]]
    layers: list[dict[str, Any]] = field(default_factory=list)  # per weighted layer: exponent, accumulator

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The input's integer codes (the first op is the input quantizer)."""
        op = self.ops[0]
        c = torch.round((x.detach().float().cpu() * 2.0 ** -op["exponent"]).clamp(-op["max_code"], op["max_code"]))
        return c.to(torch.int32)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Integer logits ``codes`` and their exponent: the real logits are ``codes * 2^exponent``."""
        a = self.encode(x)
        e = self.ops[0]["exponent"]
        for op in self.ops[1:]:
            k = op["kind"]
            if k == "conv2d":
                w = op["weight"].to(op["acc"])
                a = F.conv2d(a.to(op["acc"]), w, None, op["stride"], op["padding"], op["dilation"], op["groups"])
                e += op["exponent"]
            elif k == "linear":
                a = a.to(op["acc"]) @ op["weight"].to(op["acc"]).t()
                e += op["exponent"]
            elif k == "relu":
                a = a.clamp_min(0)
            elif k == "maxpool2d":
                a = F.max_pool2d(a, op["kernel_size"], op["stride"], op["padding"], op["dilation"],
                                 op["ceil_mode"])
            elif k == "flatten":
                a = torch.flatten(a, op["start_dim"], op["end_dim"])
            elif k == "requant":
                m = op["max_code"]
                a = rshift_round(a.long(), op["exponent"] - e).clamp_(-m, m).to(torch.int32)
                e = op["exponent"]
            else:  # pragma: no cover - export only emits the kinds above
                raise QexpError(f"unknown integer op {k!r}")
        return a.long(), e

    def state_dict(self) -> dict[str, Any]:
        ops = [{k: (str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v) for k, v in op.items()}
               for op in self.ops]
        return {"ops": ops, "layers": self.layers}

    def weight_bytes(self) -> int:
        return sum(op["weight"].numel() for op in self.ops if "weight" in op)


def _trace(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The leaf modules in call order; refuses anything that is not a simple chain."""
    weighted = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    ops = [(n, m) for n, m in model.named_modules()
           if n and not any(n.startswith(w + ".") for w in weighted)
           and (isinstance(m, WEIGHTED) or hasattr(m, "integer_op") or not list(m.children()))]
    calls: list[tuple[str, nn.Module, Any, Any]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: calls.append((n, mod, inp, out)))
               for n, m in ops]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    prev: Any = sample
    for n, _, inp, _o in calls:
        if len(inp) != 1 or inp[0] is not prev:
            raise QexpError(f"integer export needs a chain network; '{n}' does not take the previous "
                            "layer's output as its only input")
        prev = _o
    if not calls or out is not prev:
        raise QexpError("integer export needs a chain network whose output is its last layer's output")
    return [(n, m) for n, m, _, _ in calls]


def export(model: nn.Module, sample: torch.Tensor) -> IntegerNetwork:
    """Export ``model`` (fake-quantized, power-of-two scales) by tracing it on ``sample``."""
    program = _trace(model, sample)
    ops: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    bound = 0  # worst-case |code| of the current activation, to pick the accumulator width
    for i, (name, m) in enumerate(program):
        spec = m.integer_op() if hasattr(m, "integer_op") else None
        if i == 0 and (spec is None or spec["kind"] != "requant"):
            raise QexpError("integer export needs a quantized input: the network's first op must be an "
                            f"activation quantizer, found {type(m).__name__} ('{name}')")
        if spec is not None:
            if spec["kind"] == "requant":
                ops.append({"kind": "requant", "exponent": int(spec["exponent"]), "max_code": int(spec["max_code"])})
                bound = int(spec["max_code"])
            elif spec["kind"] != "identity":
                raise QexpError(f"'{name}': unknown integer op kind {spec['kind']!r}")
        elif isinstance(m, WEIGHTED):
            if m.bias is not None:
                raise QexpError(f"layer '{name}' has a bias; integer export supports bias-free layers")
            codes, e = weight_codes(m.weight, name=name)
            flat = codes.flatten(1).long().abs().sum(1) if codes.dim() > 1 else codes.long().abs()
            bound = bound * int(flat.max())
            acc = torch.int32 if bound <= INT32_MAX else torch.int64
            op: dict[str, Any] = {"kind": "conv2d" if isinstance(m, nn.Conv2d) else "linear", "name": name,
                                  "weight": codes, "exponent": e, "acc": acc}
            if isinstance(m, nn.Conv2d):
                if m.padding_mode != "zeros" or isinstance(m.padding, str):
                    raise QexpError(f"conv '{name}': only numeric zero padding is exported")
                op.update(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
            ops.append(op)
            layers.append({"name": name, "shape": list(codes.shape), "exponent": e,
                           "max_code": int(codes.abs().max()), "accumulator": str(acc).replace("torch.", ""),
                           "worst_case_acc": bound})
        elif isinstance(m, nn.ReLU):
            ops.append({"kind": "relu"})
        elif isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise QexpError(f"'{name}': max-pool with indices is not exported")
            ops.append({"kind": "maxpool2d", "kernel_size": m.kernel_size, "stride": m.stride,
                        "padding": m.padding, "dilation": m.dilation, "ceil_mode": m.ceil_mode})
        elif isinstance(m, nn.Flatten):
            ops.append({"kind": "flatten", "start_dim": m.start_dim, "end_dim": m.end_dim})
        elif isinstance(m, PASSTHROUGH):
            continue
        else:
            raise QexpError(f"'{name}': {type(m).__name__} has no integer implementation "
                            "(supported: conv, linear, ReLU, max-pool, flatten, activation quantizers)")
    return IntegerNetwork(ops, layers)
