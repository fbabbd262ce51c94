"""Post-training quantization, ``method=ptq`` ("are eight bits enough?": Warden 2015; Vanhoucke et al. 2011).

Training is plain float training (every hook is the base class's no-op). In :meth:`PTQ.finalize` a
*copy* of the trained model is quantized and evaluated:

- weights: every conv/linear weight gets its own affine min/max grid (``qexp.methods.ptq.affine``), stored as
  uint8 codes plus float32 ``lo`` and ``scale``; the copy computes with ``lo + q * scale``. Biases and
  BatchNorm parameters stay float32 (they are a tiny share of the memory; integer kernels keep biases
  at 32 bits as well).
- activations (``activations=true``): the *input* of every conv/linear layer (what an integer kernel
  multiplies by the integer weights; after ReLU/pooling in these models, and the normalised image for
  the first layer) is rounded onto a per-tensor affine ``act_bits`` grid. The range is the running
  min/max over the first ``calib_batches`` training batches, observed on the weight-quantized copy in
  eval mode (so BatchNorm uses its running statistics, as at deployment). Values outside the range
  are clipped.

The same functions serve ``qexp eval RUN --ptq-bits`` (:mod:`qexp.methods.ptq.curve`) on any finished run.
There the weights quantized are each layer's *effective* weight (``layer.weight`` in eval mode: the
output of a training method's weight quantizer when one is attached), so for a binarized run PTQ
re-encodes the already-quantized values.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from qexp.errors import QexpError, check_choice, check_range
from qexp.methods.base import Evaluate, Method, RunContext
from qexp.methods.ptq import affine
from qexp.quant.format import float_format, uniform
from qexp.quant.format import row as format_row
from qexp.quant.inject import weight_layers


@dataclass(frozen=True)
class Scheme:
    """How PTQ quantizes: weights per layer or per output channel, on an asymmetric (min/max) or
    symmetric (``+-max|w|``) grid; activation ranges from min/max, a percentile or the MSE-optimal clip,
    on the same kind of grid."""

    per_channel: bool = False
    grid: str = "asymmetric"
    calibration: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        check_choice("PTQ grid", self.grid, affine.GRIDS)
        check_choice("PTQ calibration", self.calibration, affine.CALIBRATIONS)
        check_range("PTQ percentile", float(self.percentile), 50, 100, strict_lo=True)

    @property
    def symmetric(self) -> bool:
        return self.grid == "symmetric"

    @property
    def name(self) -> str:
        """The weights' scheme, e.g. ``affine-minmax-per-layer`` (the default), ``symmetric-minmax-per-channel``."""
        kind = "symmetric" if self.symmetric else "affine"
        return f"{kind}-minmax-{'per-channel' if self.per_channel else 'per-layer'}"

    @property
    def act_name(self) -> str:
        """The activations' scheme, e.g. ``affine-minmax-per-tensor``, ``symmetric-percentile99.99-per-tensor``."""
        kind = "symmetric" if self.symmetric else "affine"
        cal = f"percentile{self.percentile:g}" if self.calibration == "percentile" else self.calibration
        return f"{kind}-{cal}-per-tensor"


DEFAULT_SCHEME = Scheme()
SCHEME = DEFAULT_SCHEME.name


def affine_weight_copy(model: nn.Module, bits: int, share: Iterable[object] = (), scheme: Scheme = DEFAULT_SCHEME,
                     ) -> tuple[nn.Module, dict[str, affine.AffineCodes]]:
    """A copy of ``model`` (in eval mode) whose conv/linear weights are their k-bit affine versions.

    Returns the copy and the stored form of each weight (uint8 codes, lo, scale) by layer name; the
    copy's ``layer.weight`` equals ``codes.dequantize()`` exactly. Objects in ``share`` are referenced,
    not copied: a training method whose bound methods are hooks on the model (and its data) must not be
    duplicated along with the layers.
    """
    was_training = model.training
    model.eval()
    try:
        qmodel = copy.deepcopy(model, memo={id(o): o for o in share})
    finally:
        model.train(was_training)
    qmodel.eval()
    codes: dict[str, affine.AffineCodes] = {}
    with torch.no_grad():
        for name, layer in weight_layers(qmodel):
            w = layer.weight.detach().clone()  # effective weight (a method's quantizer output, if any)
            if parametrize.is_parametrized(layer, "weight"):
                _unshare_class(layer)
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            c = affine.quantize(w, bits, scheme.per_channel, scheme.symmetric)
            codes[name] = c
            layer.weight = nn.Parameter(c.dequantize(w.dtype), requires_grad=False)
    return qmodel, codes


@torch.no_grad()
def weight_sqnr(model: nn.Module, codes: dict[str, affine.AffineCodes]) -> dict[str, float | None]:
    """Per layer, the SQNR (dB) of the quantized weight against the model's effective weight."""
    was_training = model.training
    model.eval()
    try:
        return {name: affine.sqnr_db(layer.weight, codes[name].dequantize(layer.weight.dtype))
                for name, layer in weight_layers(model) if name in codes}
    finally:
        model.train(was_training)


def _unshare_class(module: nn.Module) -> None:
    """Give a copied parametrized module a private clone of its class.

    ``deepcopy`` keeps the ``Parametrized<Layer>`` class that torch injected, shared with the original
    model, and ``remove_parametrizations`` deletes the ``weight`` property from that class: without this
    the original layer would lose its ``weight``.
    """
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


class ActivationQuantizer:
    """Forward pre-hook for a conv/linear layer: observes its input (calibration) or quantizes it."""

    def __init__(self, bits: int, scheme: Scheme = DEFAULT_SCHEME) -> None:
        self.bits, self.scheme = bits, scheme
        self.observer = affine.RangeObserver()
        self.range: tuple[float, float] | None = None  # set by freeze(): from then on, quantize
        self.sqnr_db: float | None = None  # of the calibration sample, once frozen

    def freeze(self) -> None:
        s = self.scheme
        lo, hi = affine.calibrate(self.observer, self.bits, s.calibration, s.symmetric, s.percentile)
        lo_t, scale_t = affine.grid(torch.tensor(lo), torch.tensor(hi), self.bits, s.symmetric)
        self._grid = (float(lo_t), float(scale_t), affine.max_code(self.bits, s.symmetric))
        self.range = (float(lo_t), float(lo_t) + float(scale_t) * self._grid[2])
        v = self.observer.sample()
        self.sqnr_db = affine.sqnr_db(v, affine.fake_quantize_grid(v, *self._grid))

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if self.range is None:
            self.observer.update(x)
            return None
        return (affine.fake_quantize_grid(x, *self._grid), *args[1:])


def calibration_batches(loader: Iterable, n: int) -> Iterable:
    """The first ``n`` (images, labels) batches of a training loader."""
    return itertools.islice(iter(loader), n)


@torch.no_grad()
def quantize_activations(model: nn.Module, bits: int, batches: Iterable, scheme: Scheme = DEFAULT_SCHEME,
                         ) -> dict[str, ActivationQuantizer]:
    """Attach input quantizers to every conv/linear layer of ``model`` (in place), calibrated on ``batches``.

    Ranges are observed in one pass with float activations; then every quantizer is frozen and active.
    """
    quantizers = {name: ActivationQuantizer(bits, scheme) for name, _ in weight_layers(model)}
    for name, layer in weight_layers(model):
        layer.register_forward_pre_hook(quantizers[name])
    was_training = model.training
    model.eval()
    seen = 0
    for x, _ in batches:
        model(x)
        seen += 1
    model.train(was_training)
    if seen == 0:
        raise QexpError("activation calibration got no training batches")
    for q in quantizers.values():
        q.freeze()
    return quantizers


def weight_memory(model: nn.Module, bits: int,
                  codes: dict[str, affine.AffineCodes] | None = None) -> dict[str, int]:
    """Parameter memory in bytes: conv/linear weights as uint8 codes (+ float32 lo, scale per layer),
    everything else float32; ``packed_bytes`` if k-bit codes were bit-packed; ``float32_bytes`` for all.
    """
    quantized = {id(_weight(m)) for _, m in weight_layers(model)}
    n_other = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    layers = [_weight(m).numel() for _, m in weight_layers(model)]
    stored = sum(layers) + 8 * len(layers) + 4 * n_other
    packed = sum((n * bits + 7) // 8 for n in layers) + 8 * len(layers) + 4 * n_other
    if codes is not None:  # the same numbers, counted from what is actually stored
        stored = sum(c.nbytes for c in codes.values()) + 4 * n_other
        packed = sum(c.packed_nbytes for c in codes.values()) + 4 * n_other
    return {"weight_bytes": stored, "packed_bytes": packed,
            "float32_bytes": 4 * (sum(layers) + n_other)}


def _weight(layer: nn.Module) -> torch.Tensor:
    """The stored weight tensor (the float shadow when a quantizer is attached)."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


class PTQ(Method):
    """Float training, then k-bit affine weights (and optionally activations) after training."""

    bits_range = (2, 8)
    #: ``qexp eval --ptq-bits``: the post-training curve (of any trained run, not only PTQ's)
    eval_analyses = ("qexp.methods.ptq.curve",)

    def __init__(self, bits: int | None = None, loss: str = "ce", activations: bool = False,
                 act_bits: int = 8, calib_batches: int = 8, per_channel: bool = False, grid: str = "asymmetric",
                 calibration: str = "minmax", percentile: float = 99.99) -> None:
        super().__init__(bits, loss)
        check_range("method.act_bits", int(act_bits), 2, 8)
        check_range("method.calib_batches", int(calib_batches), 1)
        self.activations = bool(activations)
        self.act_bits = int(act_bits)
        self.calib_batches = int(calib_batches)
        self.scheme = Scheme(bool(per_channel), str(grid), str(calibration), float(percentile))
        self._codes: dict[str, affine.AffineCodes] = {}
        self._acts: dict[str, ActivationQuantizer] = {}
        self._sqnr: dict[str, float | None] = {}
        self._data: Any = None  # the run's DataBundle (prepare): training batches to calibrate ranges

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        self._data = ctx.data
        return model

    def bits_label(self) -> str:
        return f"{self.bits}-{self.act_bits}" if self.activations else str(self.bits)

    def deployable_copy(self, model: nn.Module) -> nn.Module:
        """The deployed network: k-bit weights and, if asked, calibrated ``act_bits`` activations."""
        qmodel, self._codes = affine_weight_copy(model, self.bits, share=(self, self._data), scheme=self.scheme)
        self._sqnr = weight_sqnr(model, self._codes)
        self._acts = {}
        if self.activations:
            if self._data is None:
                raise QexpError("method.activations=true needs training batches to calibrate ranges, "
                                "but the method was given no data")
            batches = calibration_batches(self._data.train, self.calib_batches)
            self._acts = quantize_activations(qmodel, self.act_bits, batches, self.scheme)
        return qmodel

    def finalize(self, model: nn.Module, evaluate: Evaluate) -> dict[str, Any]:
        float_res = evaluate(model)
        q_res = evaluate(self.deployable_copy(model))
        mem = weight_memory(model, self.bits, self._codes)
        return {
            # test_error/test_acc describe the deployed (quantized) network; the float one is kept beside
            "test_error": q_res["error"],
            "test_acc": 100.0 - q_res["error"],
            "ptq_test_loss": q_res["loss"],
            "ptq_bits": self.bits,
            "ptq_act_bits": self.act_bits if self.activations else None,
            "ptq_scheme": self.scheme.name,
            "ptq_act_scheme": self.scheme.act_name if self.activations else None,
            "float_test_error": float_res["error"],
            "float_test_loss": float_res["loss"],
            "ptq_test_error": q_res["error"],
            "ptq_drop": q_res["error"] - float_res["error"],
            "ptq_weight_bytes": mem["weight_bytes"],
            "float32_bytes": mem["float32_bytes"],
        }

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        layers = []
        for name, layer in weight_layers(model):
            # float until quantized_copy (training is float); then lo + code * scale, codes 0..max_code
            fmt, info = float_format(name), {"shape": list(_weight(layer).shape), "scheme": self.scheme.name}
            if name in self._codes:
                c = self._codes[name]
                lo, scale = ((c.lo.tolist(), c.scale.tolist()) if isinstance(c.scale, torch.Tensor)  # type: ignore[union-attr]
                             else (c.lo, c.scale))
                fmt = uniform(name, self.bits, scale, 0, affine.max_code(self.bits, c.symmetric), offset=lo)
                info.update(lo=lo, scale=scale, storage="uint8", sqnr_db=self._sqnr.get(name))
            layers.append(format_row(fmt, **info))
            if self.activations:
                act: dict[str, Any] = {"scheme": self.scheme.act_name,
                                       "calibration": f"{self.scheme.calibration} over {self.calib_batches} "
                                                      "training batches"}
                q = self._acts.get(name)
                afmt = float_format(name, "input")
                if q is not None and q.range is not None:
                    lo, scale, top = q._grid
                    afmt = uniform(name, self.act_bits, scale, 0, top, offset=lo, tensor="input")
                    act.update(lo=q.range[0], hi=q.range[1], sqnr_db=q.sqnr_db)
                layers.append(format_row(afmt, **act))
        mem = weight_memory(model, self.bits, self._codes or None)
        act_bits = self.act_bits if self.activations else None
        return {"method": self.name, "bits": self.bits, "act_bits": act_bits,
                "when": "post-training (training is float)", "layers": layers, **mem,
                "compression": mem["float32_bytes"] / mem["weight_bytes"]}
