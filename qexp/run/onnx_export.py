"""``qexp export RUN --format onnx``: the run's network as an ONNX Q/DQ graph, checked by onnxruntime.

The graph is the float architecture (traced by ``torch.onnx.export``) with quantization written in
standard ONNX operators, placed by autograd functions whose ``symbolic`` emits exactly these nodes:

- quantized weights: integer codes (int8, or uint8 for affine grids; codes of fewer than 8 bits are
  stored in 8-bit integers, the true width is in the metadata) -> ``DequantizeLinear`` (per tensor, or
  per output channel with ``axis=0``) [-> ``Add`` of the grid's offset when it is not zero-centred];
- quantized activations (ste, dorefa, pact ReLUs; lsq and ptq layer inputs):
  ``Clip`` -> ``QuantizeLinear`` -> ``DequantizeLinear`` with the method's step (nearest rounding, ties
  to even as torch.round); STE's ``ceil`` staircase (Yin et al.) is ``Div`` -> ``Ceil`` -> ``Clip`` ->
  ``QuantizeLinear`` (scale 1: the codes) -> ``DequantizeLinear`` (the step), which is exact;
  an affine range (PTQ) is shifted by its ``lo`` with ``Sub``/``Add`` around the pair.

The export is evaluated with onnxruntime (CPU) on the run's test set before it is kept: exactly the
run's recorded test error for weight-only integer grids, within :data:`TOLERANCE` points otherwise.
``--fold-bn`` also writes ``model-folded.onnx``: each BatchNorm after a conv/linear layer is folded into
it *before* quantization: the folded weight ``w * gamma / sigma`` lies on the per-output-channel grid
``scale * gamma / sigma`` with the same integer codes (the folded model is per-channel), and its test
error is reported beside the unfolded one. Methods or modules that ONNX cannot express faithfully with
these operators (WAGE, learned precision, anything unrecognised) are refused in one line.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from qexp.errors import QexpError
from qexp.quant.format import LayerFormat, weight_formats
from qexp.quant.layers import FLOAT_BITS

OPSET = 13
ONNX_FILE = "model.onnx"
FOLDED_FILE = "model-folded.onnx"
#: test-error points onnxruntime may differ from the run by when activations are quantized (float
#: rounding of a division versus a multiplication by the reciprocal can move a value across a level)
TOLERANCE = 0.05
#: methods refused outright, with the reason
NOT_EXPRESSIBLE = {
    "wage": "its layers scale outputs by per-layer power-of-two shifts inside qexp's own WAGE modules, "
            "which qexp does not map to ONNX operators (refused rather than exported approximately)",
}


# ---- number formats ------------------------------------------------------------------------------
@dataclass
class WeightGrid:
    """Integer codes and the float32 grid that decodes them: ``w = codes * scale (+ offset)``; scale and
    offset are 0-d (per tensor) or shape [C] (per output channel)."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    bits: int
    exact: bool = True
    max_abs_error: float = 0.0

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        w = self.codes.to(torch.float32) * self.scale.view(shape if self.scale.dim() else ())
        if self.offset is not None:
            w = w + self.offset.view(shape if self.offset.dim() else ())
        return w

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() > 0


@dataclass(frozen=True)
class ActGrid:
    """An activation quantizer: ``clamp(rounding((x - offset) / step), lo, hi) * step + offset``, the
    division written as the method computes it (``multiply``: ``x * multiply``, the float32 reciprocal
    the method uses), so that onnxruntime rounds exactly the values torch rounds. ``rounding="clip"``:
    a float clipped ReLU ``clamp(x, lo * step, hi * step)`` (PACT's float-bit last input)."""

    step: float
    lo: int
    hi: int
    bits: int
    rounding: str = "round"  # round (to nearest, ties to even) | ceil | clip
    offset: float = 0.0
    multiply: float | None = None

    @property
    def dtype(self) -> torch.dtype:
        if 0 <= self.lo and self.hi <= 255:
            return torch.uint8
        if -128 <= self.lo and self.hi <= 127:
            return torch.int8
        raise QexpError(f"an activation grid {self.lo}..{self.hi} does not fit 8-bit ONNX codes")

    def row(self, name: str, where: str) -> dict[str, Any]:
        return {"name": name, "where": where, "bits": self.bits, "step": self.step, "codes": [self.lo, self.hi],
                "offset": self.offset, "rounding": self.rounding,
                "storage": "float32" if self.rounding == "clip" else str(self.dtype)[6:]}


def _codes_dtype(codes: torch.Tensor) -> torch.dtype | None:
    lo, hi = int(codes.min()), int(codes.max())
    if -128 <= lo and hi <= 127:
        return torch.int8
    if 0 <= lo and hi <= 255:
        return torch.uint8
    return None


def _grid(w: torch.Tensor, bits: int, scale: torch.Tensor, offset: torch.Tensor | None,
          exact_only: bool) -> WeightGrid | None:
    shape = (-1,) + (1,) * (w.dim() - 1)
    s = scale.view(shape if scale.dim() else ())
    o = 0.0 if offset is None else offset.view(shape if offset.dim() else ())
    if bool((scale <= 0).any()):
        return None
    k = torch.round((w - o) / s)
    dtype = _codes_dtype(k)
    if dtype is None:
        return None
    g = WeightGrid(k.to(dtype), scale, offset, bits)
    err = float((g.dequantize() - w).abs().max())
    g.exact, g.max_abs_error = err == 0.0, err
    if err == 0.0 or (not exact_only and err <= 1e-6 * max(float(w.abs().max()), 1e-30)):
        return g
    return None


def weight_grid(w: torch.Tensor, fmt: LayerFormat) -> WeightGrid | None:
    """The integer grid of an evaluated weight: its format record's ``offset + code * step`` (per tensor or
    per channel), exactly or else within float rounding (DoReFa's ``2 (i/n) - 1``, reported); failing that,
    fitted to the weight's own levels. A level-set format (power_of_two, grid) has no such grid: None."""
    if not fmt.integer_codes:
        return None
    w = w.detach().float().cpu()
    bits = fmt.bits
    scale = torch.tensor(fmt.step, dtype=torch.float32)
    offset = torch.tensor(fmt.offset, dtype=torch.float32) if any(torch.tensor(fmt.offset).flatten()) else None
    for exact_only in (True, False):
        g = _grid(w, bits, scale, offset, exact_only)
        if g is not None:
            return g
    levels = torch.unique(w.double())
    if levels.numel() > 1 << bits:
        return None
    if levels.numel() == 1:
        return _grid(w, bits, torch.tensor(max(abs(float(levels[0])), 1e-30)), None, exact_only=True)
    d = float((levels[1:] - levels[:-1]).min())
    candidates = [(d, None), (d / 2, None), (d, torch.tensor(float(levels[0])))]
    for exact_only in (True, False):
        for step, off in candidates:
            g = _grid(w, bits, torch.tensor(step, dtype=torch.float32), off, exact_only)
            if g is not None:
                return g
    return None


# ---- the ONNX nodes, emitted by autograd functions' symbolics --------------------------------------
class _DequantizeWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,  # type: ignore[override]
                has_offset: bool) -> torch.Tensor:
        shape = (-1,) + (1,) * (codes.dim() - 1)
        w = codes.to(torch.float32) * (scale.view(shape) if scale.dim() else scale)
        return w + (offset.view(shape) if offset.dim() else offset) if has_offset else w

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any, offset: Any, has_offset: bool) -> Any:
        per_channel = scale.type().dim() not in (None, 0)
        dtype = codes.type().dtype()
        channels = scale.type().sizes()[0] if per_channel else None
        zp = torch.zeros(channels, dtype=dtype) if per_channel else torch.zeros((), dtype=dtype)
        kw = {"axis_i": 0} if per_channel else {}
        w = g.op("DequantizeLinear", codes, scale, g.op("Constant", value_t=zp), **kw)
        if not has_offset:
            return w
        if per_channel:
            rank = codes.type().dim()
            shape = g.op("Constant", value_t=torch.tensor([-1] + [1] * (rank - 1), dtype=torch.int64))
            offset = g.op("Reshape", offset, shape)
        return g.op("Add", w, offset)


class _QuantizeActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, grid: ActGrid) -> torch.Tensor:  # type: ignore[override]
        if grid.rounding == "clip":
            return x.clamp(grid.lo * grid.step, grid.hi * grid.step)
        v = x - grid.offset if grid.offset else x
        v = v * grid.multiply if grid.multiply is not None else v / grid.step
        v = torch.ceil(v) if grid.rounding == "ceil" else torch.round(v)
        y = v.clamp_(grid.lo, grid.hi).mul_(grid.step)
        return y + grid.offset if grid.offset else y

    @staticmethod
    def symbolic(g: Any, x: Any, grid: ActGrid) -> Any:
        def const(v: float) -> Any:
            return g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32))

        if grid.rounding == "clip":
            return g.op("Clip", x, const(grid.lo * grid.step), const(grid.hi * grid.step))
        zp = g.op("Constant", value_t=torch.zeros((), dtype=grid.dtype))
        if grid.offset:
            x = g.op("Sub", x, const(grid.offset))
        v = g.op("Mul", x, const(grid.multiply)) if grid.multiply is not None else g.op("Div", x, const(grid.step))
        v = g.op("Ceil" if grid.rounding == "ceil" else "Round", v)
        q = g.op("QuantizeLinear", g.op("Clip", v, const(grid.lo), const(grid.hi)), const(1.0), zp)
        y = g.op("DequantizeLinear", q, const(grid.step), zp)  # the codes times the step
        return g.op("Add", y, const(grid.offset)) if grid.offset else y


class QuantizedActivation(nn.Module):
    """A ReLU replaced by its quantizer (the grid's lower code 0 is the ReLU), or a layer input's
    quantizer (called from a forward pre-hook)."""

    def __init__(self, grid: ActGrid) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantizeActivation.apply(x, self.grid)


class DequantizedWeight(nn.Module):
    """Parametrization: the layer's weight is ``DequantizeLinear(codes)`` (the stored float is unused)."""

    def __init__(self, grid: WeightGrid) -> None:
        super().__init__()
        self.register_buffer("codes", grid.codes.clone())
        self.register_buffer("scale", grid.scale.clone().float())
        self.register_buffer("offset", (grid.offset if grid.offset is not None else torch.zeros(())).clone().float())
        self.has_offset = grid.offset is not None

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        return _DequantizeWeight.apply(self.codes, self.scale, self.offset, self.has_offset)


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (module.onnx_input_quantizer(args[0]), *args[1:])


# ---- reading the run's quantizers ------------------------------------------------------------------
@dataclass
class Plan:
    """What the deployed network quantizes, read from the method's model and manifest."""

    weights: dict[str, WeightGrid] = field(default_factory=dict)
    relus: dict[str, ActGrid] = field(default_factory=dict)  # ReLU module name -> its quantizer
    inputs: dict[str, ActGrid] = field(default_factory=dict)  # conv/linear name -> its input quantizer
    float_weights: list[str] = field(default_factory=list)  # quantized in training, evaluated float

    @property
    def weight_only(self) -> bool:
        return not self.relus and not self.inputs

    @property
    def exact_weights(self) -> bool:
        return all(g.exact for g in self.weights.values())


def read_plan(method: Any, model: nn.Module, manifest: dict[str, Any]) -> Plan:
    """The deployed network's number formats; a module or hook ONNX export does not know is refused."""
    from qexp.methods.pact import PACTReLU
    from qexp.methods.ptq.method import ActivationQuantizer
    from qexp.quant.activation import QuantReLU, max_index

    name = method.name
    if name in NOT_EXPRESSIBLE:
        raise QexpError(f"method={name} cannot be exported to ONNX faithfully: {NOT_EXPRESSIBLE[name]}")
    known = (QuantReLU, PACTReLU)
    for lname, module in model.named_modules():
        cls = type(module)
        if ".parametrizations." in f".{lname}." or isinstance(module, known) or type(module).__name__ == "LSQInput":
            continue  # weight quantizers: their output is checked against an integer grid below
        if not cls.__module__.startswith(("torch.nn.", "torchvision.", "qexp.models.")):
            raise QexpError(f"method={name}: module {lname or 'model'} ({cls.__name__}) is not one ONNX export "
                            "knows how to write; refused rather than exported approximately")
    plan = Plan()
    rows = weight_formats(manifest)
    test_float = manifest.get("test_weights") == "float"
    for lname, module in model.named_modules():
        if isinstance(module, QuantReLU):
            plan.relus[lname] = ActGrid(float(module.alpha.detach()), 0, max_index(module.bits), module.bits,
                                        "ceil" if module.bits == 1 else module.staircase)  # 1 bit: alpha 1{x>0}
        elif isinstance(module, PACTReLU):
            a = float(module.alpha.detach())
            if module.bits >= 32:  # a float input kept clipped (PACT's float last layer)
                plan.relus[lname] = ActGrid(a, 0, 1, module.bits, "clip")
            else:  # pact_quantize: clamp(x, 0, a) * (n / a), rounded, times a / n
                n = max_index(module.bits)
                plan.relus[lname] = ActGrid(a / n, 0, n, module.bits, multiply=n / a)
        elif isinstance(module, nn.Hardtanh) and module.min_val == 0:  # DoReFa's float last-layer input
            plan.relus[lname] = ActGrid(float(module.max_val), 0, 1, FLOAT_BITS, "clip")
        elif type(module).__name__ == "LSQInput":
            from qexp.methods.lsq import qrange

            q_n, q_p = qrange(module.bits, bool(module.signed))
            step = float(module.step.detach())  # LSQ multiplies by 1/step on the CPU
            plan.inputs[lname.rpartition(".")[0]] = ActGrid(step, -q_n, q_p, module.bits, multiply=1.0 / step)
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, ActivationQuantizer) and hook.range is not None:
                lo, scale, top = hook._grid
                plan.inputs[lname] = ActGrid(float(scale), 0, int(top), hook.bits, offset=float(lo))
            elif (getattr(hook, "__name__", "") != "_quantize_input" and not isinstance(hook, ActivationQuantizer)
                  and not getattr(hook, "__module__", "").startswith("qexp.models.")):  # BN warm start: training only
                raise QexpError(f"method={name}: layer {lname} has a forward pre-hook ({hook!r}) that ONNX export "
                                "does not know; refused rather than exported approximately")
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or lname not in rows:
            continue
        row = rows[lname]
        if not row.quantized:
            continue
        if test_float:
            plan.float_weights.append(lname)
            continue
        g = weight_grid(module.weight, row)
        if g is None:
            raise QexpError(f"method={name}: layer {lname}'s evaluated weights are not on an integer grid of "
                            f"{row.bits} bits ({row.kind}) that ONNX DequantizeLinear can decode; refused")
        plan.weights[lname] = g
    return plan


def check_module_swaps(model: nn.Module, fresh: nn.Module, plan: Plan) -> None:
    """Every module the method swapped in (a ReLU that became a quantizer or a clip) is one the plan
    writes: the deployed network is the plain architecture plus the plan, so a swap the plan does not
    cover would be exported as the architecture's original module (DoReFa's clipped last input once
    went out as a ReLU). Refused in one line rather than exported approximately."""
    original = dict(fresh.named_modules())
    for lname, module in model.named_modules():
        kind = parametrize.type_before_parametrizations(module)
        was = original.get(lname)
        if was is not None and kind is not type(was) and lname not in plan.relus:
            raise QexpError(f"module {lname} is a {kind.__name__} in the run but a {type(was).__name__} in the "
                            "plain architecture, and ONNX export does not know how to write it; refused rather "
                            "than exported approximately")


# ---- building the deployed float-architecture model -------------------------------------------------
def deploy_model(fresh: nn.Module, state: dict[str, torch.Tensor], plan: Plan,
                 folded: list[tuple[str, str]] = ()) -> nn.Module:
    """The plain float architecture with the run's tensors, quantized weights decoded from their codes
    and activation quantizers in place of ReLUs / before layers; ``folded`` BatchNorms become identities
    (their layers then take the folded bias, created if the layer had none)."""
    for layer, _ in folded:
        module = fresh.get_submodule(layer)
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(state[f"{layer}.bias"]))
    fresh.load_state_dict(state)
    for _, bn in folded:
        parent, _, child = bn.rpartition(".")
        setattr(fresh.get_submodule(parent) if parent else fresh, child, nn.Identity())
    fresh.eval()
    for lname, g in plan.weights.items():
        parametrize.register_parametrization(fresh.get_submodule(lname), "weight", DequantizedWeight(g),
                                             unsafe=True)
    for lname, grid in plan.relus.items():
        parent, _, child = lname.rpartition(".")
        setattr(fresh.get_submodule(parent) if parent else fresh, child, QuantizedActivation(grid))
    for lname, grid in plan.inputs.items():
        layer = fresh.get_submodule(lname)
        layer.add_module("onnx_input_quantizer", QuantizedActivation(grid))
        layer.register_forward_pre_hook(_quantize_input)
    return fresh


def bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv/linear, BatchNorm) module names where the BatchNorm takes that layer's output alone."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - a model fx cannot trace is simply not folded
        raise QexpError(f"--fold-bn: cannot trace {type(model).__name__} to find its BatchNorm layers ({e})") from e
    mods = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        src = node.args[0]
        if (getattr(src, "op", None) == "call_module" and isinstance(mods.get(src.target), (nn.Conv2d, nn.Linear))
                and len(src.users) == 1):
            pairs.append((src.target, node.target))
    return pairs


def fold_batchnorm(fresh: nn.Module, state: dict[str, torch.Tensor], plan: Plan,
                   ) -> tuple[dict[str, torch.Tensor], Plan, list[tuple[str, str]]]:
    """Fold each BatchNorm that follows a conv/linear layer into it, then quantize: the folded weight
    ``w * gamma / sigma`` takes the per-output-channel grid ``scale * gamma / sigma`` with the same codes.
    Returns the new state (for :func:`deploy_model`), the folded plan and the (layer, BatchNorm) pairs."""
    state = dict(state)
    plan = Plan(dict(plan.weights), plan.relus, plan.inputs, plan.float_weights)
    pairs = bn_pairs(fresh)
    for layer, bn in pairs:
        m = fresh.get_submodule(bn)
        mean, var = state[f"{bn}.running_mean"].double(), state[f"{bn}.running_var"].double()
        gamma = state[f"{bn}.weight"].double() if m.affine else torch.ones_like(mean)
        beta = state[f"{bn}.bias"].double() if m.affine else torch.zeros_like(mean)
        factor = gamma / torch.sqrt(var + m.eps)
        bias = state.get(f"{layer}.bias")
        b = bias.double() if bias is not None else torch.zeros_like(mean)
        state[f"{layer}.bias"] = ((b - mean) * factor + beta).float()
        weight = state[f"{layer}.weight"]
        shape = (-1,) + (1,) * (weight.dim() - 1)
        state[f"{layer}.weight"] = (weight.double() * factor.view(shape)).float()
        g = plan.weights.get(layer)
        if g is not None:
            offset = None if g.offset is None else (g.offset.double() * factor).float()
            scale = g.scale.double() * factor  # per tensor becomes per output channel
            plan.weights[layer] = WeightGrid(g.codes, scale.float(), offset, g.bits, exact=False)
    return state, plan, pairs


# ---- writing and checking --------------------------------------------------------------------------
def to_onnx(model: nn.Module, in_shape: tuple[int, ...], metadata: dict[str, Any]) -> bytes:
    """The serialised ONNX model (opset 13, dynamic batch), metadata attached, checked by onnx.checker."""
    import onnx

    buf = io.BytesIO()
    x = torch.zeros((1, *in_shape))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=OPSET, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    rename = {i.name: i.name.replace(".parametrizations.weight.0.", ".weight.") for i in proto.graph.initializer}
    for init in proto.graph.initializer:  # features.0.weight.codes, not features.0.parametrizations.weight.0.codes
        init.name = rename[init.name]
    for node in proto.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"qexp_{k}", v if isinstance(v, str) else json.dumps(v)
    proto.producer_name = "qexp"
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def import_runtime() -> None:
    """Import onnxruntime with HOME and TMPDIR pointed at a scratch folder removed right after: at import
    its telemetry writes a device id below ``~/.cache/Microsoft`` and a ``.ses`` file into TMPDIR (1.32),
    outside ``out_root`` and the export's folder, even for an export then refused. ImportError passes."""
    if "onnxruntime" in sys.modules:
        return
    keys = ("HOME", "TMPDIR", "XDG_CACHE_HOME")
    saved = {k: os.environ.get(k) for k in keys}
    with tempfile.TemporaryDirectory(prefix="qexp-onnxruntime-") as scratch:
        os.environ.update(HOME=scratch, TMPDIR=scratch)
        os.environ.pop("XDG_CACHE_HOME", None)
        try:
            import onnxruntime  # noqa: F401
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def ort_errors(model_bytes: bytes, loader: Any, level: str = "all") -> tuple[int, int]:
    """(wrong, total) of the ONNX model on ``loader`` with onnxruntime's CPU execution provider, at graph
    optimisation level ``all`` (the default: fusions and blocked NCHWc conv kernels, which change float
    rounding) or ``basic`` (constant folding and node eliminations only)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    opts.intra_op_num_threads = max(torch.get_num_threads(), 1)
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    wrong = total = 0
    for batch in loader:
        x, y = batch[0], batch[1]
        logits = session.run(None, {"input": x.detach().cpu().float().numpy()})[0]
        wrong += int((torch.from_numpy(logits).argmax(1) != y.cpu()).sum())
        total += int(y.numel())
    return wrong, total


def check_error(model_bytes: bytes, loader: Any, expected: float | None, exact: bool) -> dict[str, Any]:
    """onnxruntime's test error against the run's recorded one: the same count of wrong images when
    ``exact``, else within TOLERANCE points. Checked with onnxruntime's default (all) graph optimisations;
    when those miss the rule, at the ``basic`` level (the graph's float arithmetic as written), which then
    decides, with both reported."""
    rule = "exact" if exact else f"within {TOLERANCE} points"
    out: dict[str, Any] = {"rule": rule, "run_test_error": expected}
    for level in ("all", "basic"):
        wrong, total = ort_errors(model_bytes, loader, level)
        got = 100.0 * wrong / total
        ok = True
        if expected is not None:
            ok = wrong == round(expected * total / 100.0) if exact else abs(got - expected) <= TOLERANCE + 1e-9
        out[level] = {"test_error": got, "wrong": wrong, "ok": ok}
        out.update(onnxruntime_test_error=got, wrong=wrong, total=total, level=level, ok=ok)
        if ok:
            break
    return out


def size_bytes(model_bytes: bytes) -> int:
    return len(model_bytes)


def describe(plan: Plan) -> dict[str, Any]:
    """The metadata rows: each quantized weight's true bit width and storage, each activation grid."""
    weights = [{"name": n, "bits": g.bits, "storage": str(g.codes.dtype)[6:],
                "scale": "per-channel" if g.per_channel else "per-tensor", "offset": g.offset is not None,
                "exact": g.exact, "max_abs_error": g.max_abs_error} for n, g in plan.weights.items()]
    acts = [g.row(n, "output (replaces ReLU)") for n, g in plan.relus.items()]
    acts += [g.row(n, "input of layer") for n, g in plan.inputs.items()]
    return {"weights": weights, "activations": acts, "float_weights": plan.float_weights}

