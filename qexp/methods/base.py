"""The method interface: hooks the training engine calls; the default implementation is float training."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qexp.errors import QexpError, check_choice

if TYPE_CHECKING:
    from qexp.data import DataBundle

Evaluate = Callable[[nn.Module], dict[str, float]]


def squared_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BinaryConnect's loss: mean over the batch of sum_k max(0, 1 - t_k y_k)^2 with t in {-1, +1}."""
    t = F.one_hot(target, logits.shape[1]).to(logits.dtype) * 2 - 1
    return F.relu(1 - t * logits).pow(2).sum(1).mean()


def squared_hinge_mean(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BinaryConnect's code (Lasagne): ``T.mean(T.sqr(T.maximum(0., 1. - target * output)))``, the mean
    over batch AND outputs, i.e. :func:`squared_hinge` divided by the number of classes."""
    t = F.one_hot(target, logits.shape[1]).to(logits.dtype) * 2 - 1
    return F.relu(1 - t * logits).pow(2).mean()


def sum_squared_error(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """WAGE's loss: 0.5 * sum (onehot - out)^2, summed over the batch."""
    t = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return 0.5 * (t - logits).pow(2).sum()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": F.cross_entropy,
    "sqhinge": squared_hinge,
    "sqhinge_mean": squared_hinge_mean,
    "sse": sum_squared_error,
}
#: losses that are sums over the batch (the others are batch means): totals and DDP gradients differ
SUM_LOSSES = frozenset({"sse"})
#: torch.manual_seed takes a 64-bit signed seed: the run's ``seed`` and a method's ``method.seed``
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RunContext:
    """What a method may know about the run it is part of, handed to :meth:`Method.prepare`.

    ``data`` is the run's whole (unsharded) DataBundle, or None where no data exists (a bare model in a
    test); every data-parallel process gets the same one, so calibration agrees between processes.
    """

    device: torch.device = torch.device("cpu")
    data: DataBundle | None = None
    seed: int = 0


def resolve_param_groups(groups: list[dict[str, Any]], lr: float) -> list[dict[str, Any]]:
    """Optimizer groups with an absolute ``lr``: a group's ``lr_scale`` multiplies the base ``lr``; a group
    that fixes its own ``lr`` keeps it (learned precision's logits). The input is left unchanged."""
    out = []
    for g in groups:
        g = dict(g)
        scale = g.pop("lr_scale", 1.0)
        g.setdefault("lr", lr * scale)
        out.append(g)
    return out


def read_options(method_dir: Any, where: str) -> dict[type, dict[str, Any]]:
    """The method options in ``method_dir`` (a folder of ``NAME.yaml``) by the class their ``_target_``
    names: the option's file stem, ``name`` (``method.name``) and ``default_bits`` (the top-level
    ``bits``). Options that share a class (bc, bc_li) must agree on both. ``where`` names the folder in
    errors."""
    import yaml

    out: dict[type, dict[str, Any]] = {}
    for f in sorted(method_dir.iterdir(), key=lambda f: f.name):
        if not f.name.endswith(".yaml"):
            continue
        doc = yaml.safe_load(f.read_text()) or {}
        node = doc.get("method") or {}
        if not isinstance(node, dict) or "_target_" not in node or "name" not in node or "bits" not in doc:
            raise QexpError(f"{where}/{f.name}: a method option needs method._target_, method.name and a "
                            "top-level bits (its default)")
        module, _, attr = str(node["_target_"]).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise QexpError(f"{where}/{f.name}: cannot import {node['_target_']}: {e}") from None
        entry = {"option": f.name[: -len(".yaml")], "name": str(node["name"]), "default_bits": int(doc["bits"])}
        seen = out.setdefault(cls, entry)
        if (seen["name"], seen["default_bits"]) != (entry["name"], entry["default_bits"]):
            raise QexpError(f"{where}/{seen['option']}.yaml and {f.name} build {cls.__name__} with a "
                            "different name or default bits")
    return out


@functools.cache
def registered_methods() -> dict[type, dict[str, Any]]:
    """Every method option in ``configs/method/`` (shipped as ``qexp.configs``) by its class (see
    :func:`read_options`). The YAML is the one place a method's name and default bits are written."""
    return read_options(resources.files("qexp.configs") / "method", "configs/method")


#: method classes whose YAML lies outside configs/method/ (a ``--config-dir``'s method/), by class
_PLUGINS: dict[type, dict[str, Any]] = {}


def register_option(cls: type, name: str, default_bits: int | None = None, where: str = "") -> None:
    """Record the YAML of a method class kept outside qexp: its ``method.name`` and, where known, its
    default ``bits`` (None: a composed config node, where the command line may have changed ``bits``).
    A class keeps one name: a second YAML (or the shipped one) naming it otherwise is a QexpError."""
    known = registered_methods().get(cls) or _PLUGINS.get(cls)
    if known is not None:
        bits_differ = None not in (default_bits, known["default_bits"]) and default_bits != known["default_bits"]
        if known["name"] != name or bits_differ:
            raise QexpError(f"{where or cls.__name__}: {cls.__name__} has name={known['name']} "
                            f"bits={known['default_bits']} in {known['option']}.yaml; a second YAML may not "
                            f"rename it (name={name} bits={default_bits})")
        if known["default_bits"] is not None or default_bits is None:
            return
    _PLUGINS[cls] = {"option": where, "name": name, "default_bits": default_bits}


def register_config_dir(folder: str | Path) -> dict[type, dict[str, Any]]:
    """Register the method options in ``folder/method/`` (a ``--config-dir``), as :func:`registered_methods`
    knows the shipped ones: their classes then read ``name`` and ``default_bits`` from those YAML files.
    Returns the folder's options by class (empty without a method/ folder)."""
    method_dir = Path(folder) / "method"
    if not method_dir.is_dir():
        return {}
    found = read_options(method_dir, str(method_dir))
    for cls, entry in found.items():
        register_option(cls, entry["name"], entry["default_bits"], f"{method_dir}/{entry['option']}.yaml")
    return found


def method_option(cls: type) -> dict[str, Any] | None:
    """The YAML entry of a method class: shipped, or registered from a config folder or config node."""
    return registered_methods().get(cls) or _PLUGINS.get(cls)


class _FromConfig:
    """A class attribute read from the method's YAML (:func:`method_option`); a class that no YAML
    builds (a test's throwaway subclass) gets ``fallback(cls)``."""

    def __init__(self, key: str, fallback: Callable[[type], Any]) -> None:
        self.key, self.fallback = key, fallback

    def __get__(self, obj: object, cls: type) -> Any:
        entry = method_option(cls)
        value = None if entry is None else entry[self.key]
        return self.fallback(cls) if value is None else value


class Method:
    """Float training; quantization methods override the hooks they need.

    The run session (:mod:`qexp.run.session`) is the only caller of the hooks, in this order::

        m = Method(bits=..., **options)          # once per run and process; validates: QexpError first
        m.ignored_knobs                          # config knobs outside the run's identity
        model = m.prepare(model, ctx)            # once, model already on ctx.device
        [init_from: the other run's model weights are loaded here]
        groups = m.param_groups(model)           # once, then the optimizer is built
        [m.load_state_dict(state)]               # on resume, after prepare
        m.manifest(model)                        # quant.json, at the start (main process)
        per training step:
            m.before_forward(model, step)
            loss = m.criterion(model(x), y) [+ m.extra_loss(model)]
            loss.backward(); m.after_backward(model)
            optimizer.step(); m.after_step(model, optimizer)
            m.compile_ready(model)               # compile=true: before each forward until it holds
        per epoch: m.before_evaluate(model), evaluation (model.eval(), m.criterion),
                   m.on_epoch_end(epoch), m.metrics(), m.state_dict() (checkpoint),
                   m.images() (TensorBoard, main process)
        after the last epoch: m.finalize(model, evaluate)
        m.manifest(model)                        # quant.json, at the end (main process)
        m.bits_label()                           # metrics.json's bits_tag (result tables)
        m.state_dict()                           # data parallel: the processes must agree at the end
    ``qexp eval`` / ``qexp export`` (a trained run reloaded): ``prepare``, ``load_state_dict``,
    ``criterion``, then ``deployable_copy(model)`` and ``manifest(model)`` (export) or the
    :attr:`eval_analyses` of every method (``qexp eval`` options).

    Hooks must be deterministic given the run's seed and the state they return from :meth:`state_dict`
    (a resumed run has to repeat an uninterrupted one bit for bit); randomness comes from generators the
    method owns and checkpoints. With data parallelism every process calls every hook at the same point on
    the plain (unwrapped) model; the hooks must leave every process in the same state.

    Subclasses declare ``bits_range`` (inclusive); an out-of-range ``bits`` is a :class:`QexpError` raised
    before any training. ``name`` and ``default_bits`` come from the method's YAML (``method.name`` and
    the top-level ``bits``), shipped in ``configs/method/`` or in a ``--config-dir``'s ``method/``
    (:func:`register_config_dir`, :func:`register_option`), written nowhere else: a class that assigns
    them is refused.
    """

    name: str = _FromConfig("name", lambda cls: cls.__name__.lower())  # type: ignore[assignment]
    bits_range: tuple[int, int] = (32, 32)
    default_bits: int = _FromConfig("default_bits", lambda cls: cls.bits_range[1])  # type: ignore[assignment]
    #: multiplies the configured batch size (Big SR trains with larger batches)
    batch_scale: int = 1
    #: multiplies the configured epochs (Big SR's equal-updates budget: batch_scale x the epochs)
    epoch_scale: int = 1
    #: config knobs this method does not use (float ignores ``bits``): left out of the run's identity
    #: (folder, resume check). The top-level ``bits``/``abits`` never need it: the method's keys carry them.
    ignored_knobs: tuple[str, ...] = ()
    #: ``qexp eval`` analyses this method ships, as module names; each module has ``add_arguments(ap)``,
    #: ``check(method_name, args)`` (refuse before loading) and ``run(loaded, args, base)`` (None when not
    #: asked). ``qexp eval`` offers the analyses of every registered method.
    eval_analyses: tuple[str, ...] = ()
    #: whether K seeds of this method can train stacked in one vectorised model
    #: (``trainer.seeds_per_process``, :mod:`qexp.run.seeds`): its hooks only change the model's tensors
    #: in place, its forward is the model's (or goes through elementwise weight parametrizations whose
    #: settings all seeds share), it adds no loss term and draws no noise inside the forward
    vectorizable: bool = False
    #: why the method cannot train with data parallelism (``trainer.devices > 1`` or torchrun), when a
    #: process's share of the batch would change what it computes (beyond BatchNorm's per-process
    #: statistics, as in any DDP run); None: it can
    data_parallel_refusal: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        repeated = sorted({"name", "default_bits"} & set(vars(cls)))
        if repeated:
            raise TypeError(f"{cls.__module__}.{cls.__qualname__} sets {' and '.join(repeated)}: a method's name "
                            "and default bits come from its YAML (method.name and the top-level bits); "
                            "remove them from the class")

    def __init__(self, bits: int | None = None, loss: str = "ce") -> None:
        self.bits = self.default_bits if bits is None else int(bits)
        lo, hi = self.bits_range
        if not lo <= self.bits <= hi:  # the message names the method: `bits` is a global knob
            allowed = f"{lo}" if lo == hi else f"{lo}..{hi}"
            raise QexpError(f"method={self.name} cannot use bits={self.bits}; allowed: {allowed}")
        self.loss_name = check_choice("method.loss", loss, sorted(LOSSES))

    @property
    def loss_is_sum(self) -> bool:
        """True when :meth:`criterion` sums over the batch (WAGE's SSE) instead of averaging: the engine
        then adds batch losses as they are and data parallelism sums gradients instead of averaging."""
        return self.loss_name in SUM_LOSSES

    # ---- set-up ----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        """Called once per run, before the optimizer is built and before a checkpoint is loaded, with the
        float model already on ``ctx.device``. May swap or wrap layers in place, attach parametrizations
        and hooks, create the method's own tensors and generators on ``ctx.device``, and keep ``ctx`` (or
        parts of it) for later hooks. Returns the model to train (the same object or a wrapper); the
        engine moves it to ``ctx.device`` again."""
        return model

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer parameter groups, called once after :meth:`prepare`. A group's ``lr_scale``
        multiplies the base learning rate; a group that sets ``lr`` itself keeps it (see
        :func:`resolve_param_groups`). Tensors outside the model may be included (they are averaged
        across data-parallel processes)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training and evaluation loss: a batch mean, or a batch sum when :attr:`loss_is_sum`."""
        return LOSSES[self.loss_name](logits, target)

    # ---- per step --------------------------------------------------------------------------------
    def before_forward(self, model: nn.Module, step: int) -> None:
        """Called before every training forward pass; ``step`` counts optimizer steps so far (0-based,
        continued across epochs and resumes). May set per-step state (draw bits, toggle statistics)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss before ``backward`` (not to the logged loss); None for none."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Called after ``loss.backward()``, before the optimizer step. May read or replace gradients
        (set ``p.grad = None`` to take a parameter away from the optimizer)."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after every optimizer step. May change weights in place (clip, round, own updates)."""

    # ---- per epoch / end -------------------------------------------------------------------------
    def before_evaluate(self, model: nn.Module) -> None:
        """Called at the end of every training epoch, before its validation and test evaluation. May
        prepare the model for evaluation (learned precision re-estimates BatchNorm statistics)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after each finished epoch (0-based) and its evaluation, before :meth:`metrics`."""

    def metrics(self) -> dict[str, float]:
        """Diagnostics for the epoch just finished (TensorBoard + metrics.json history as
        ``method/<key>``); called once per epoch, may reset per-epoch accumulators."""
        return {}

    def images(self) -> dict[str, Any]:
        """Pictures for TensorBoard after each epoch: name -> HWC uint8 array or matplotlib figure.
        Called on the main process only, so it must not change state."""
        return {}

    def finalize(self, model: nn.Module, evaluate: Evaluate) -> dict[str, Any]:
        """Called once after the last epoch of a completed run. ``evaluate(m)`` returns the test loss and
        error of any model ``m`` (e.g. a quantized copy). The returned keys are merged into metrics.json
        (and override the ones the engine wrote, e.g. PTQ's ``test_error`` of the deployed network)."""
        return {}

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        """Which tensors are quantized, to how many bits, with which rounding (quant.json). Read-only:
        must not change the model or the method's state."""
        n = sum(p.numel() for p in model.parameters())
        return {"method": self.name, "bits": self.bits, "layers": [],
                "weight_bytes": 4 * n, "float32_bytes": 4 * n}

    def bits_label(self) -> str:
        """The bits label of result tables, metrics.json's ``bits_tag`` (WAGE writes e.g. ``2-8-8-8``);
        not the method YAML's ``tag`` (``ste-2b``), which names the run folder."""
        return str(self.bits)

    def compile_ready(self, model: nn.Module) -> bool:
        """With ``compile=true`` the forward runs eagerly until this holds (asked before each training
        forward until it does): a one-off warm-up that Dynamo cannot trace, such as calibrating an
        activation range on the first batch."""
        return True

    # ---- deployment ------------------------------------------------------------------------------
    def deployable_copy(self, model: nn.Module) -> nn.Module | None:
        """The network a deployment runs when it is not the trained model itself (PTQ: a k-bit copy of
        the float network); None: the trained model (``qexp export`` reads its manifest). May record
        what it made for :meth:`manifest` (called after it)."""
        return None

    # ---- resume ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs beyond the model's own state_dict (generators, counters, schedules).
        Called at every checkpoint (end of epoch, interruption)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; called after :meth:`prepare` on resume."""


class Layered(Method):
    """A method layered over another one, :attr:`inner` (STE's activations over BinaryConnect's weights):
    the one declared way methods compose. Every hook below runs the inner method's hook (Method's own
    default when there is no inner one); a subclass adds its part and calls ``super()``. The outer
    method's own are :meth:`criterion` (its loss), :meth:`tag` and ``bits``. A hook added to
    :class:`Method` is added here once (a test checks that every hook is), never in the subclasses.
    """

    #: the method underneath (set by the subclass's constructor); None: plain float underneath
    inner: Method | None = None
    #: the key of the inner method's state in :meth:`state_dict` (written in checkpoints: keep it stable)
    inner_state_key: str = "inner"

    def prepare(self, model: nn.Module, ctx: RunContext) -> nn.Module:
        return super().prepare(model, ctx) if self.inner is None else self.inner.prepare(model, ctx)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return super().param_groups(model) if self.inner is None else self.inner.param_groups(model)

    def before_forward(self, model: nn.Module, step: int) -> None:
        if self.inner is not None:
            self.inner.before_forward(model, step)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None if self.inner is None else self.inner.extra_loss(model)

    def after_backward(self, model: nn.Module) -> None:
        if self.inner is not None:
            self.inner.after_backward(model)

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.inner is not None:
            self.inner.after_step(model, optimizer)

    def before_evaluate(self, model: nn.Module) -> None:
        if self.inner is not None:
            self.inner.before_evaluate(model)

    def on_epoch_end(self, epoch: int) -> None:
        if self.inner is not None:
            self.inner.on_epoch_end(epoch)

    def metrics(self) -> dict[str, float]:
        return {} if self.inner is None else self.inner.metrics()

    def images(self) -> dict[str, Any]:
        return {} if self.inner is None else self.inner.images()

    def finalize(self, model: nn.Module, evaluate: Evaluate) -> dict[str, Any]:
        return {} if self.inner is None else self.inner.finalize(model, evaluate)

    def manifest(self, model: nn.Module) -> dict[str, Any]:
        return super().manifest(model) if self.inner is None else self.inner.manifest(model)

    def compile_ready(self, model: nn.Module) -> bool:
        return self.inner is None or self.inner.compile_ready(model)

    def deployable_copy(self, model: nn.Module) -> nn.Module | None:
        return None if self.inner is None else self.inner.deployable_copy(model)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.inner is None else {self.inner_state_key: self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.inner is not None and self.inner_state_key in state:
            self.inner.load_state_dict(state[self.inner_state_key])
