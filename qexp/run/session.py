"""One run's session: build the method once, assemble data and model, train (init_from, resume, fit,
finalize), write the manifest, evaluate and hand a deployable network to export.

This is the only module under ``qexp/run`` that calls :class:`~qexp.methods.base.Method` hooks, in the
order :class:`~qexp.methods.base.Method` documents; the engine, the callbacks, data parallelism and
export get plain callables and values from here. Imports flow one way: the entry
(:mod:`qexp.run.train`: Hydra, run folder, lock, exit codes) -> this session -> engine, callbacks,
checkpoint. Nothing here reads Hydra's global state: the entry hands over the composed config.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qexp.data import DataBundle
from qexp.data.loader import same_data, stack_batches
from qexp.errors import ForeignRun, QexpError
from qexp.methods.base import MAX_SEED, Method, RunContext, register_option, resolve_param_groups
from qexp.quant import kernels
from qexp.run import (
    checkpoint,
    compiled,
    distributed,
    engine,
    identity,
    optim,
    precision,
    preempt,
    record,
    resources,
    seeds,
    tune,
)
from qexp.run.callbacks import BestCheckpoint, RunRecord, TensorBoard, final_record
from qexp.run.engine import Engine
from qexp.run.precision import MixedPrecision
from qexp.run.preempt import stop_on_signals
from qexp.run.record import CHECKPOINT

log = logging.getLogger("qexp")

#: config keys that name the component but are not constructor arguments
META_KEYS = ("name", "tag")


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` minus the naming keys; constructor errors become user errors. A method
    class kept outside qexp learns its ``name`` from the node (its YAML's ``method.name``)."""
    conf = OmegaConf.to_container(node, resolve=True)
    name = conf.get("name")
    for k in META_KEYS:
        conf.pop(k, None)
    clash = sorted(set(conf) & set(kwargs))
    if clash:  # +dataset.seed=5, +sched.epochs=5: the run passes its own value, so the setting is never read
        raise QexpError(f"cannot build {conf.get('_target_')}: {', '.join(f'{k}={conf[k]}' for k in clash)} "
                        "would not be read, the run passes its own (the top-level knobs set it: seed=, "
                        "epochs=, batch_size=, ...)")
    try:
        factory = hydra.utils.instantiate(conf, _partial_=True)
    except hydra.errors.InstantiationException as e:
        raise QexpError(f"cannot build {conf.get('_target_')}: {e}") from None
    cls = getattr(factory, "func", None)
    if isinstance(cls, type) and issubclass(cls, Method) and name is not None:
        register_option(cls, str(name), where=f"method={name}")
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as e:  # a bad option value or name in the config
        raise QexpError(f"cannot build {conf.get('_target_')}: {e}") from None
    except (IndexError, KeyError) as e:  # a list too short, a name not there: say which settings
        given = ", ".join(f"{k}={v}" for k, v in conf.items() if k != "_target_")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise QexpError(f"cannot build {conf.get('_target_')} with {given}: {first or type(e).__name__}") from None


def default_device() -> str:
    """``$QEXP_DEVICE``, else ``auto``: the device of a run (config ``device``) and of ``qexp eval`` when
    none is given (the test suite sets ``cpu``)."""
    return os.environ.get("QEXP_DEVICE") or "auto"


def resolve_device(name: Any) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device; a GPU that is not there is a user error.

    ``cuda:N`` also becomes the current CUDA device, so that kernels, generators and compiled code that
    use "the" GPU (``device="cuda"``) land on the same one.
    """
    name = str(getattr(name, "value", name)).strip()
    if name in ("auto", ""):  # "": an empty $QEXP_DEVICE, as unset
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if m is None or (m[1] == "cpu" and m[2] is not None):
        raise QexpError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if m[1] == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise QexpError(f"device={name} was asked for but no CUDA device is available; use device=auto or cpu")
    count = torch.cuda.device_count()
    if m[2] is not None and int(m[2]) >= count:
        raise QexpError(f"device={name}: there is no GPU {m[2]}; {count} visible (cuda:0..cuda:{count - 1})")
    device = torch.device(name)
    if device.index is not None:
        torch.cuda.set_device(device)
    return device


# ---- the method: built once per run (per process) ----------------------------------------------------
def check_inputs(cfg: DictConfig) -> Method:
    """Reject impossible top-level values and bits the method cannot use, before any folder exists;
    return the run's method (built here, once: the caller passes it on to :func:`build`)."""
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if int(cfg[key]) < 1:
            raise QexpError(f"{key} must be at least 1, got {key}={cfg[key]}")
    lr = float(cfg.lr)
    if not math.isfinite(lr) or lr <= 0:
        raise QexpError(f"lr must be a positive number, got lr={cfg.lr}")
    if not 0 <= int(cfg.seed) <= MAX_SEED:
        raise QexpError(f"seed must be in 0..{MAX_SEED} (torch's generator seed), got seed={cfg.seed}")
    if cfg.progress is not None and not isinstance(cfg.progress, bool):
        raise QexpError(f"progress must be true, false or null (a bar when stderr is a terminal), "
                        f"got progress={cfg.progress}")
    if str(cfg.lock) not in ("auto", "fail", "wait"):
        raise QexpError(f"lock must be auto, fail or wait, got lock={cfg.lock}")
    if int(cfg.tensorboard.step_every) < 0:
        raise QexpError(f"tensorboard.step_every must be 0 (off) or a step count, got {cfg.tensorboard.step_every}")
    if int(cfg.trainer.devices) < 1:
        raise QexpError(f"trainer.devices must be at least 1, got {cfg.trainer.devices}")
    distributed.check_backend(cfg.trainer.backend)
    tune.check_objective(cfg.objective)
    optim.check_options(OmegaConf.to_container(cfg.optim, resolve=True))  # momentum >= 1, betas not a pair
    device = resolve_device(cfg.device)  # device=cuda:N that is not there
    precision.check(cfg.precision, device)  # 16-mixed off CUDA
    # compile=true without a working compiler, cuda_graphs=true off CUDA or without compile=true
    if cfg.compile:
        resources.place_kernel_caches()  # the compiler check imports torch._inductor
    compiled.check(device, bool(cfg.compile), bool(cfg.cuda_graphs), _data_parallel(cfg))
    method = build_method(cfg)
    if _data_parallel(cfg) and method.data_parallel_refusal:
        raise QexpError(f"method={method.name} cannot train with data parallelism (trainer.devices > 1 or "
                        f"torchrun): {method.data_parallel_refusal}")
    return method


def _data_parallel(cfg: DictConfig) -> bool:
    """Whether the run is one process of several (``trainer.devices > 1``, or launched by torchrun)."""
    return int(cfg.trainer.devices) > 1 or bool(distributed.env_ranks())


def build_method(cfg: DictConfig) -> Method:
    """The run's method from ``cfg.method`` (it validates its bits and options: QexpError)."""
    return instantiate(cfg.method)


def ignored_knobs(method: Method) -> tuple[str, ...]:
    """Config knobs the method does not use (:attr:`Method.ignored_knobs`): not part of the run's
    identity (folder, resume check)."""
    return tuple(method.ignored_knobs)


def comparable_config(cfg: DictConfig, ignored: tuple[str, ...] = (), data: str | None = None) -> str:
    """The run's fingerprint (:func:`qexp.run.identity.fingerprint`): what a resume must match."""
    return identity.fingerprint(cfg, ignored, data)


def run_meta(cfg: DictConfig, method: Method, overrides: str | None = None,
             fingerprint: str | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json's identifying fields; ``fingerprint`` and ``data`` (the resolved data root, the files
    read and their digest) let a later launch, ``qexp eval`` and ``qexp table`` tell which configuration
    and which data the result answers for."""
    extra = {"fingerprint": fingerprint} if fingerprint is not None else {}
    if data is not None:
        extra["data"] = data
    return {
        "name": cfg.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "bits": method.bits,
        "bits_tag": method.bits_label(),
        "seed": cfg.seed,
        "epochs": cfg.epochs * method.epoch_scale,
        "overrides": overrides or "",
        "optim": cfg.optim.name,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size * method.batch_scale,
        **extra,
    }


# ---- assembling a run --------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A run's method, data and model (prepared by the method): enough to evaluate."""

    method: Method
    data: DataBundle
    model: torch.nn.Module


@dataclass
class Built(Prepared):
    """:class:`Prepared` plus what training needs: the optimizer and the schedule."""

    optimizer: torch.optim.Optimizer
    scheduler: Any


def assemble(cfg: DictConfig, device: torch.device, method: Method | None = None) -> Prepared:
    """Data and model, prepared by the run's ``method`` (built from ``cfg`` when not given) on ``device``."""
    resources.place_kernel_caches()  # before torchvision (imported by the builders) imports torch._dynamo
    resources.keep_freed_memory()  # before the first batch: activations reuse the heap
    method = build_method(cfg) if method is None else method
    data = instantiate(cfg.dataset, root=cfg.data_root, batch_size=cfg.batch_size * method.batch_scale,
                       eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=str(device))
    c, h, _ = data.in_shape
    model = instantiate(cfg.model, in_channels=c, num_classes=data.num_classes, image_size=h)
    ctx = RunContext(device=device, data=data, seed=int(cfg.seed))
    model = method.prepare(model.to(device), ctx).to(device)
    return Prepared(method, data, model)


def build(cfg: DictConfig, device: torch.device, method: Method | None = None) -> Built:
    """:func:`assemble`, ``init_from``, then the optimizer (over the method's parameter groups; Adam's groups
    share its multi-tensor calls where torch takes them: :mod:`qexp.run.optim`) and the schedule."""
    p = assemble(cfg, device, method)
    check_feature_norm_batches(p.model, p.data.train.num_samples, p.data.train.batch_size,
                               int(cfg.trainer.devices))
    if cfg.get("init_from"):  # a new run that starts from another run's weights (not a resume)
        init_weights(p.model, Path(str(cfg.init_from)), device)
    groups = resolve_param_groups(p.method.param_groups(p.model), cfg.lr)
    optim_cfg = OmegaConf.masked_copy(cfg.optim, [k for k in cfg.optim if k != "lr"])
    optimizer = optim.grouped(instantiate(optim_cfg, params=groups, lr=cfg.lr))
    scheduler = instantiate(cfg.sched, optimizer=optimizer, epochs=cfg.epochs * p.method.epoch_scale)
    return Built(p.method, p.data, p.model, optimizer, scheduler)


def check_feature_norm_batches(model: nn.Module, samples: int, batch: int, processes: int) -> None:
    """BatchNorm over features (``BatchNorm1d``: an MLP's, LeNet-5's dense layers) cannot normalise one
    sample per feature: a training batch, or a process's share of one, of a single image fails in the
    first epoch with torch's traceback. Refused here, in one line, before the run's folder."""
    if not any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        return
    last = samples % batch or batch
    shares = [batch // processes] + ([last // processes] if last >= processes else [])  # DDP drops a tail
    if min(shares) == 1:  # (a share of none is refused before, by distributed.check_batch_share)
        per = f", {processes} processes" if processes > 1 else ""
        raise QexpError(f"a training batch of one image ({samples} training images, batch_size={batch}{per}) "
                        "cannot pass the model's BatchNorm over features; change batch_size or "
                        "dataset.train_subset")


def init_weights(model: torch.nn.Module, run_dir: Path, device: torch.device) -> None:
    """``init_from=RUN_DIR``: start from that run's model weights (its checkpoint), nothing else of it."""
    state = checkpoint.load(identity.init_checkpoint(run_dir), map_location=device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise QexpError(f"init_from={run_dir}: its weights do not fit this model/method "
                        f"({str(e).splitlines()[0][:200]})") from None


def restore(p: Prepared, state: dict[str, Any]) -> None:
    """A checkpoint's model and method state into an assembled run (``qexp eval``, ``qexp export``)."""
    p.model.load_state_dict(state["model"])
    p.method.load_state_dict(state["method"])


# ---- the method's hooks in a training step and an evaluation -----------------------------------------
def train_step(model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, step: int, forward_model: nn.Module | None = None,
               amp: MixedPrecision | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step with every per-step hook, in the documented order; returns the (detached) loss
    the method's criterion gave and the logits. ``forward_model`` runs the forward (the DDP wrapper);
    the hooks see ``model``. ``amp``: conv/linear layers in 16 bits during the forward (and so their
    backward); with float16 the loss is scaled and the gradients unscaled before the hooks see them."""
    method.before_forward(model, step)
    with amp.active() if amp is not None else contextlib.nullcontext():
        out = (model if forward_model is None else forward_model)(x)
    loss = method.criterion(out, y)
    extra = method.extra_loss(model)
    total = loss if extra is None else loss + extra
    optimizer.zero_grad(set_to_none=True)
    scaler = None if amp is None else amp.scaler
    if scaler is None:
        total.backward()
    else:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    method.after_backward(model)
    if not _stepped(optimizer.step if scaler is None else lambda: _scaled_step(scaler, optimizer)):
        return torch.full_like(loss.detach(), math.nan), out.detach()
    method.after_step(model, optimizer)
    return loss.detach(), out.detach()


def _scaled_step(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    scaler.step(optimizer)  # skipped when a gradient overflowed float16
    scaler.update()


def _stepped(step: Callable[[], Any]) -> bool:
    """Run an optimizer step; False when its step size is past float32 (lr=1e39, or Adam's first step,
    10x lr, on the per-tensor path raises): the update is infinite, as the foreach kernels make it, so
    the run diverged there, and the caller hands the engine a non-finite loss that says so."""
    try:
        step()
    except RuntimeError as e:
        if "without overflow" not in str(e):
            raise
        return False
    return True


def evaluate(model: nn.Module, method: Method, loader: Any, device: torch.device,
             reduce: engine.Reduce | None = None) -> dict[str, float]:
    """Mean loss (the method's criterion) and error in percent of ``model`` over ``loader``
    (:func:`qexp.run.engine.measure`)."""
    return engine.measure(model, method.criterion, method.loss_is_sum, loader, device, reduce)


class Trainer(Engine):
    """The engine (:class:`qexp.run.engine.Engine`) with the method's hooks at its hook points: the
    per-step sequence of :func:`train_step`, ``before_evaluate``, ``on_epoch_end`` then ``metrics``,
    ``finalize``, and the method's ``state_dict`` in every checkpoint."""

    def __init__(self, model: nn.Module, method: Method, optimizer: torch.optim.Optimizer, scheduler: Any,
                 data: DataBundle, device: torch.device, epochs: int, **kwargs: Any) -> None:
        self.method = method
        super().__init__(model, optimizer, scheduler, data, device, epochs, loss_is_sum=method.loss_is_sum,
                         compile_ready=lambda: method.compile_ready(model), **kwargs)

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return train_step(self.model, self.method, self.optimizer, x, y, step, self.forward_model, self.amp)

    def _criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.method.criterion(logits, target)

    def _before_evaluate(self) -> None:
        self.method.before_evaluate(self.model)

    def _epoch_end(self, epoch: int) -> dict[str, float]:
        self.method.on_epoch_end(epoch)
        return self.method.metrics()

    def _finalize(self, evaluate: engine.Evaluate) -> dict[str, Any]:
        return self.method.finalize(self.model, evaluate)

    def _method_state(self) -> dict[str, Any]:
        return self.method.state_dict()

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)


def manifest(p: Prepared) -> dict[str, Any]:
    """The method's manifest of the run's model (quant.json)."""
    return p.method.manifest(p.model)


def deployment(p: Prepared) -> tuple[nn.Module, dict[str, Any], bool]:
    """The network a deployment runs and its manifest: the method's deployable copy
    (:meth:`Method.deployable_copy`, e.g. PTQ's k-bit copy; the manifest is read after it was made) or
    the trained model itself. The flag says whether it is a copy."""
    copy = p.method.deployable_copy(p.model)
    return (p.model if copy is None else copy), p.method.manifest(p.model), copy is not None


# ---- a run's result on disk --------------------------------------------------------------------------
def stored_fingerprint(run_dir: Path, rec: dict[str, Any]) -> str | None:
    """The fingerprint a run folder's result answers for: metrics.json's, else (a run from before
    metrics.json kept it) its checkpoint's; None when neither can be read."""
    if isinstance(rec.get("fingerprint"), str):
        return rec["fingerprint"]
    try:
        return str(checkpoint.load(run_dir / CHECKPOINT).get("config"))
    except (OSError, QexpError):
        return None


def data_record(cfg: DictConfig, sources: tuple[Path, ...]) -> dict[str, Any]:
    """The resolved data root, the files read (relative, with their sha1) and their digest."""
    from qexp.data.common import digest

    return digest(str(cfg.data_root), sources)


def finished_run(cfg: DictConfig, run_dir: Path, ignored: tuple[str, ...], quiet: bool = False,
                 data: str | None = None) -> dict[str, Any] | None:
    """The record of a completed or diverged run in ``run_dir`` (not retrained), else None.

    Its stored fingerprint must be this run's: a finished run of another configuration (or of other data:
    ``data`` is this run's data digest when the data are loaded already; before that, the files the
    stored run read are hashed under this run's data root) is refused and kept, never reported as this
    run's result nor replaced (``resume=false`` retrains only a run of the same configuration). So is an
    unfinished one that this run would resume from its checkpoint: refused here, before its folder is
    written, as :func:`_resume` would refuse it after."""
    previous = record.read(run_dir)
    if not previous:
        return None
    finished = previous.get("status") in record.FINISHED
    if not finished and not (cfg.resume and (run_dir / CHECKPOINT).exists()):
        return None  # nothing this run would continue: it starts over in the folder
    stored = stored_fingerprint(run_dir, previous)
    if stored is not None:
        stored_data = previous.get("data") if isinstance(previous.get("data"), dict) else {}
        files = stored_data.get("files")
        if data is None and files:
            from qexp.data.common import same_files_under

            data = same_files_under(str(cfg.data_root), files, stored_data.get("root")) or "missing"
        diff = identity.differences(stored, comparable_config(cfg, ignored, data), ignored)
        if diff:
            raise foreign_run(run_dir, diff, finished)
    if not finished or not cfg.resume:
        return None
    if not quiet:
        print(f"{run_dir}: already {previous['status']}, not retrained (resume=false retrains).\n"
              f"  {record.summary_line(previous)}")
    return previous


def foreign_run(run_dir: Path, diff: list[str], finished: bool) -> ForeignRun:
    """The one line refusing a folder that holds another configuration's run (``diff``: how it differs)."""
    what = ("the finished run of another configuration" if finished
            else "an unfinished run with a different configuration")
    return ForeignRun(f"{run_dir} holds {what} ({'; '.join(diff[:8])}); it is kept: give this run its own place "
                      "with name=NAME or out_root=DIR" + ("" if finished else " (resume=false would discard that run)"))


# ---- training ----------------------------------------------------------------------------------------
def train(cfg: DictConfig, run_dir: Path, ctx: distributed.Context = distributed.SINGLE,
          overrides: str | None = None, built: Built | None = None,
          method: Method | None = None) -> dict[str, Any] | None:
    """Train (or resume, or skip) the run whose folder is ``run_dir``; return its metrics record.

    With several processes (``ctx``) each trains on its share of every batch and only the main one
    writes the run folder. None when a stop signal arrived before this run started (a sweep winding down).
    ``built``: the run's objects when the caller already built them (after ``torch.manual_seed``);
    else ``method``: the run's method when the caller built it already (it is built once per process).
    """
    main = ctx.is_main
    if built is not None:
        method = built.method
    elif method is None:
        method = build_method(cfg)
    ignored = ignored_knobs(method)
    previous = finished_run(cfg, run_dir, ignored, quiet=not main)
    if previous is not None:
        return previous
    if preempt.requested():
        if main:
            print(f"{run_dir}: not started, this process was asked to stop")
        return None

    device = resolve_device(cfg.device)
    device = distributed.rank_device(device, ctx.local_rank) if ctx.enabled else device
    resources.log_threads()
    compiled.check(device, bool(cfg.compile), bool(cfg.cuda_graphs), ctx.enabled)
    if cfg.compile:
        resources.keep_compiled_headers_beside_kernels()
    kernels.use_fused(bool(cfg.compile), device, probe=False)  # per run: a sweep's runs may differ
    if built is None:
        torch.manual_seed(cfg.seed)
    b = build(cfg, device, method) if built is None else built
    ckpt = run_dir / CHECKPOINT
    fingerprint, meta = _identify(cfg, b, overrides, ignored, device)
    parallel = (distributed.DataParallel(ctx, device, cfg.trainer.find_unused_parameters)
                if ctx.enabled else None)
    with stop_on_signals() as stop:
        trainer = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, device,
                          cfg.epochs * b.method.epoch_scale, ckpt_path=ckpt if main else None,
                          should_stop=stop.is_set, progress_bar=cfg.progress if main else False,
                          callbacks=_callbacks(cfg, run_dir, meta, b) if main else [], parallel=parallel,
                          extra_state={"config": fingerprint}, patience=cfg.patience, compile=bool(cfg.compile),
                          cuda_graphs=bool(cfg.cuda_graphs),
                          precision=str(cfg.precision))
        if cfg.resume and ckpt.exists():
            _resume(trainer, checkpoint.load(ckpt, map_location=device), run_dir, fingerprint, ignored)
        outcome = trainer.fit()
    rec = final_record(meta, outcome)
    if main:
        seeds.forget_previous(run_dir, outcome.status)  # a seed of a stacked group finished alone
        print(f"{run_dir}\n  {record.summary_line(rec)}")
    return rec


def _identify(cfg: DictConfig, b: Built, overrides: str | None, ignored: tuple[str, ...],
              device: torch.device) -> tuple[str, dict[str, Any]]:
    """The run's fingerprint and metrics.json's identifying fields (with where it ran)."""
    data = data_record(cfg, b.data.sources)
    fingerprint = comparable_config(cfg, ignored, data["digest"])
    meta = run_meta(cfg, b.method, overrides, fingerprint, data)
    # where and how it ran (not part of the identity; images_per_s depends on it): cpu, cuda:0, ... (plain
    # "cuda" is the current GPU: its index is recorded), and torch's thread count, which a CPU result's last
    # digits depend on (the order of float sums: Li et al.'s BC at seed 1 gave 2.79% test error on 1 thread,
    # 2.48% on 2)
    where = torch.device("cuda", torch.cuda.current_device()) if str(device) == "cuda" else device
    meta.update(device=str(where), torch=torch.__version__, threads=torch.get_num_threads())
    if b.data.val is None:
        tune.check_patience(cfg)  # also refused before launch (tune.InputCheck); here for DDP workers
    return fingerprint, meta


def _callbacks(cfg: DictConfig, run_dir: Path, meta: dict[str, Any], b: Built) -> list[Any]:
    """What the main process writes: metrics.json and quant.json, best.pt, TensorBoard."""
    tb = cfg.tensorboard
    return [RunRecord(run_dir, meta, lambda: manifest(b)), BestCheckpoint(run_dir),
            TensorBoard(run_dir, meta, tb.step_every, tb.histograms, b.method.images)]


def _resume(trainer: Trainer, state: dict[str, Any], run_dir: Path, fingerprint: str,
            ignored: tuple[str, ...]) -> None:
    """Load an unfinished run's checkpoint into ``trainer``, if it is this configuration's."""
    if not identity.same_run(str(state.get("config")), fingerprint, ignored):
        raise foreign_run(run_dir, identity.differences(str(state.get("config")), fingerprint, ignored), False)
    trainer.load_state_dict(state)
    log.info("resuming %s at epoch %d, batch %d", run_dir, trainer.progress.epoch, trainer.progress.batch)


# ---- K seeds in one process (trainer.seeds_per_process) ----------------------------------------------
def check_seeds(cfg: DictConfig, method: Method) -> int:
    """``trainer.seeds_per_process`` as K after checking what it cannot go with (one line each)."""
    k = cfg.trainer.get("seeds_per_process", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise QexpError(f"trainer.seeds_per_process must be a whole number of at least 1, got {k}")
    if k == 1:
        return 1
    why = ("trainer.devices > 1 (data parallelism)" if _data_parallel(cfg)
           else "compile=true" if cfg.compile
           else f"precision={cfg.precision} (it needs precision=32)" if str(cfg.precision) != "32"
           else f"method={method.name} (its seeds cannot be stacked into one vectorised model; see docs/scaling.md)"
           if not method.vectorizable
           else None)
    if why is not None:
        raise QexpError(f"trainer.seeds_per_process={k} cannot go with {why}")
    if int(cfg.seed) + k - 1 > MAX_SEED:
        raise QexpError(f"trainer.seeds_per_process={k} from seed={cfg.seed} goes past seed {MAX_SEED}")
    return k


def stack_seeds(builts: list[Built]) -> seeds.Stack:
    """The seeds' models stacked (:class:`qexp.run.seeds.Stack`), checked on one batch of each seed."""
    random = sorted({type(m).__name__ for m in builts[0].model.modules()
                     if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0})
    if random:  # vmap(randomness="different") draws the masks from another stream than separate runs
        raise QexpError(f"trainer.seeds_per_process cannot go with {', '.join(random)} in the model: under "
                        f"vmap its masks come from another random stream than a separate seed=k run's, so "
                        f"the result would not answer for it (set model.dropout=0, or train the seeds "
                        f"separately)")
    stack = seeds.Stack([b.model for b in builts])
    xs = torch.stack([next(iter(b.data.train.iter_from(0)))[0][:2] for b in builts])
    stack.check(xs)
    return stack


def group_train_step(stack: seeds.Stack, builts: list[Built], optimizer: seeds.SharedOptimizer, loss: GroupLoss,
                     requests: list[Any], active: list[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """One optimizer step of every active seed of a stacked group, with every per-step hook in the order
    of :func:`train_step`: each seed's hooks on its own model; one forward, one loss (the criterion
    under ``vmap`` where it batches, else seed by seed), one backward and one optimizer step for all.
    A seed that has finished (None) is fed an active seed's batch and left out of the loss. Each seed's
    summed loss and correct count are computed for all seeds at once (its engine adds them to its sums)."""
    step = requests[active[0]][2]
    fed = [i if requests[i] is not None else active[0] for i in range(len(builts))]
    xs, ys = stack_batches([requests[i][:2] for i in fed])
    for i in active:
        builts[i].method.before_forward(builts[i].model, step)
    out = stack.forward(xs)
    losses = loss(builts, out, ys, active)
    for i in active:
        builts[i].optimizer.zero_grad(set_to_none=True)
    stack.zero_grad()
    losses.sum().backward()
    stack.hand_out_grads()
    for i in active:
        builts[i].method.after_backward(builts[i].model)
    if _stepped(lambda: optimizer.step(active)):
        for i in active:
            builts[i].method.after_step(builts[i].model, builts[i].optimizer)
    else:  # diverged: every seed's loss is not finite (train_step)
        losses = torch.full_like(losses, math.nan)
    with torch.no_grad():
        losses, out = losses.detach(), out.detach()
        sums = engine.batch_total(builts[active[0]].method.loss_is_sum, losses, ys.shape[1])
        correct = (out.argmax(2) == ys).sum(1)
    return {i: (losses[j], out[i], sums[j], correct[i]) for j, i in enumerate(active)}


class GroupLoss:
    """Each active seed's criterion value: one batched call when the criterion runs under ``vmap`` (the
    seeds' methods are one configuration), else one call per seed. Which of the two is decided on the
    group's first step and kept for the group (one instance per :func:`group_step`)."""

    def __init__(self) -> None:
        self.batched: bool | None = None  # None: not tried yet

    def __call__(self, builts: list[Built], out: torch.Tensor, ys: torch.Tensor, active: list[int]) -> torch.Tensor:
        if self.batched is not False:
            index = torch.tensor(active, device=out.device) if len(active) < len(builts) else None
            logits, labels = (out, ys) if index is None else (out.index_select(0, index), ys.index_select(0, index))
            try:
                losses = torch.func.vmap(builts[active[0]].method.criterion)(logits, labels)
                self.batched = True
                return losses
            except Exception:  # an operation without a batching rule (one_hot of a hinge loss, ...)
                if self.batched:
                    raise
                self.batched = False
        return torch.stack([builts[i].method.criterion(out[i], ys[i]) for i in active])


def group_step(stack: seeds.Stack, builts: list[Built]) -> seeds.GroupStep:
    """:func:`group_train_step` of this group (with its :class:`~qexp.run.seeds.SharedOptimizer`), as
    :func:`qexp.run.seeds.drive` takes it."""
    optimizer = seeds.SharedOptimizer(stack, [b.optimizer for b in builts])
    first = builts[0].data.train
    if all(same_data(first, b.data.train) for b in builts[1:]):  # one gather of all seeds' batches
        for b in builts:
            b.data.train.defer = True
    loss = GroupLoss()
    return lambda requests, active: group_train_step(stack, builts, optimizer, loss, requests, active)


def train_group(cfgs: list[DictConfig], run_dirs: list[Path], builts: list[Built], stack: seeds.Stack,
                overrides: list[str]) -> list[dict[str, Any]]:
    """Train K seeds of one configuration (``cfgs``, unfinished, folders open and locked, ``builts`` made
    after ``torch.manual_seed`` of each seed) as one stacked model; return their metrics records.

    Each seed writes its own folder as a separate run would; metrics.json adds ``seeds_per_process``
    (how many seeds trained together). A group resumes together; a seed also resumes on its own."""
    first = cfgs[0]
    device = resolve_device(first.device)
    resources.log_threads()
    kernels.use_fused(False, device, probe=False)
    ignored = ignored_knobs(builts[0].method)
    identities = [_identify(c, b, o, ignored, device) for c, b, o in zip(cfgs, builts, overrides)]
    states = seeds.agree(run_dirs, CHECKPOINT, device) if first.resume else [None] * len(cfgs)
    clock = seeds.StepClock()
    with stop_on_signals() as stop:
        trainers = []
        for j, (c, d, b, (fingerprint, meta)) in enumerate(zip(cfgs, run_dirs, builts, identities)):
            meta["seeds_per_process"] = len(cfgs)
            t = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, device, c.epochs * b.method.epoch_scale,
                        ckpt_path=d / CHECKPOINT, should_stop=stop.is_set, progress_bar=c.progress if j == 0 else False,
                        callbacks=_callbacks(c, d, meta, b), extra_state={"config": fingerprint},
                        patience=c.patience, before_save=seeds.keep_previous, train_clock=clock)
            if states[j] is not None:
                with seeds.turn(d):
                    _resume(t, states[j], d, fingerprint, ignored)
            trainers.append(t)
        outcomes = seeds.drive([t.steps() for t in trainers], group_step(stack, builts), clock, run_dirs)
    recs = []
    for d, (_, meta), outcome in zip(run_dirs, identities, outcomes):
        rec = final_record(meta, outcome)
        seeds.forget_previous(d, outcome.status)
        print(f"{d}\n  {record.summary_line(rec)}")
        recs.append(rec)
    return recs
