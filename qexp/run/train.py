"""``qexp train``: the single Hydra entry point. Compose -> build -> fit -> write results.

This is the only module that reads the Hydra config; everything it builds takes plain arguments.
"""

from __future__ import annotations

import errno
import importlib
import logging
import math
import os
import re
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qexp.data import DataBundle
from qexp.errors import QexpError
from qexp.jsonio import atomic_write_bytes
from qexp.methods.base import Method, RunContext, register_config_dir, register_option, resolve_param_groups
from qexp.quant import kernels
from qexp.run import (
    checkpoint,
    compiled,
    distributed,
    identity,
    lock,
    precision,
    preempt,
    record,
    resources,
    sweep,
    tune,
)
from qexp.run.callbacks import BestCheckpoint, RunRecord, TensorBoard, final_record
from qexp.run.config import register
from qexp.run.engine import Trainer
from qexp.run.preempt import stop_on_signals  # noqa: F401  (re-exported: train.stop_on_signals)

log = logging.getLogger("qexp")

CHECKPOINT = "checkpoint.pt"
#: config keys that name the component but are not constructor arguments
META_KEYS = ("name", "tag")


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` minus the naming keys; constructor errors become user errors. A method
    class kept outside qexp learns its ``name`` from the node (its YAML's ``method.name``)."""
    conf = OmegaConf.to_container(node, resolve=True)
    name = conf.get("name")
    for k in META_KEYS:
        conf.pop(k, None)
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


def resolve_device(name: Any) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch device; a GPU that is not there is a user error.

    ``cuda:N`` also becomes the current CUDA device, so that kernels, generators and compiled code that
    use "the" GPU (``device="cuda"``) land on the same one.
    """
    name = str(getattr(name, "value", name)).strip()
    if name == "auto":
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
        "bits_tag": method.tag(),
        "seed": cfg.seed,
        "epochs": cfg.epochs * method.epoch_scale,
        "overrides": overrides or "",
        "optim": cfg.optim.name,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size * method.batch_scale,
        **extra,
    }


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


def prepare(cfg: DictConfig, device: torch.device) -> Prepared:
    """Method (validates bits first), data, model (prepared by the method on ``device``)."""
    method: Method = instantiate(cfg.method)
    data = instantiate(cfg.dataset, root=cfg.data_root, batch_size=cfg.batch_size * method.batch_scale,
                       eval_batch_size=cfg.eval_batch_size, seed=cfg.seed, device=str(device))
    c, h, _ = data.in_shape
    model = instantiate(cfg.model, in_channels=c, num_classes=data.num_classes, image_size=h)
    ctx = RunContext(device=device, data=data, seed=int(cfg.seed))
    model = method.prepare(model.to(device), ctx).to(device)
    return Prepared(method, data, model)


def build(cfg: DictConfig, device: torch.device) -> Built:
    """:func:`prepare`, then the optimizer (over the method's parameter groups) and the schedule."""
    p = prepare(cfg, device)
    if cfg.get("init_from"):  # a new run that starts from another run's weights (not a resume)
        init_weights(p.model, Path(str(cfg.init_from)), device)
    groups = resolve_param_groups(p.method.param_groups(p.model), cfg.lr)
    optim_cfg = OmegaConf.masked_copy(cfg.optim, [k for k in cfg.optim if k != "lr"])
    optimizer = instantiate(optim_cfg, params=groups, lr=cfg.lr)
    scheduler = instantiate(cfg.sched, optimizer=optimizer, epochs=cfg.epochs * p.method.epoch_scale)
    return Built(p.method, p.data, p.model, optimizer, scheduler)


def init_weights(model: torch.nn.Module, run_dir: Path, device: torch.device) -> None:
    """``init_from=RUN_DIR``: start from that run's model weights (its checkpoint), nothing else of it."""
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise QexpError(f"init_from={run_dir}: no {CHECKPOINT} there (a qexp run folder that trained)")
    state = checkpoint.load(ckpt, map_location=device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise QexpError(f"init_from={run_dir}: its weights do not fit this model/method "
                        f"({str(e).splitlines()[0][:200]})") from None


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
    run's result nor replaced (``resume=false`` retrains only a run of the same configuration)."""
    previous = record.read(run_dir)
    if not previous or previous.get("status") not in record.FINISHED:
        return None
    stored = stored_fingerprint(run_dir, previous)
    if stored is not None:
        files = (previous.get("data") or {}).get("files") if isinstance(previous.get("data"), dict) else None
        if data is None and files:
            from qexp.data.common import same_files_under

            data = same_files_under(str(cfg.data_root), files) or "missing"
        diff = identity.differences(stored, comparable_config(cfg, ignored, data), ignored)
        if diff:
            raise QexpError(f"{run_dir} holds the finished run of another configuration ({'; '.join(diff[:8])}); "
                            "it is kept: give this run its own place with name=NAME or out_root=DIR")
    if not cfg.resume:
        return None
    if not quiet:
        print(f"{run_dir}: already {previous['status']}, not retrained (resume=false retrains).\n"
              f"  {record.summary_line(previous)}")
    return previous


def train(cfg: DictConfig, run_dir: Path, ctx: distributed.Context = distributed.SINGLE,
          overrides: str | None = None, built: Built | None = None) -> dict[str, Any] | None:
    """Train (or resume, or skip) the run whose folder is ``run_dir``; return its metrics record.

    With several processes (``ctx``) each trains on its share of every batch and only the main one
    writes the run folder. None when a stop signal arrived before this run started (a sweep winding down).
    ``built``: the run's objects when the caller already built them (after ``torch.manual_seed``).
    """
    main = ctx.is_main
    previous = finished_run(cfg, run_dir, ignored_knobs(instantiate(cfg.method), cfg), quiet=not main)
    if previous is not None:
        return previous
    if preempt.requested():
        if main:
            print(f"{run_dir}: not started, this process was asked to stop")
        return None

    device = resolve_device(cfg.device)
    device = distributed.rank_device(device, ctx.local_rank) if ctx.enabled else device
    resources.log_threads()
    precision.check(cfg.precision, device)
    if cfg.compile:
        compiled.check_compiler(device)
    kernels.use_fused(bool(cfg.compile), device, probe=False)  # per run: a sweep's runs may differ
    if built is None:
        torch.manual_seed(cfg.seed)
    b = build(cfg, device) if built is None else built
    ckpt = run_dir / CHECKPOINT
    ignored = ignored_knobs(b.method, cfg)
    data = data_record(cfg, b.data.sources)
    fingerprint = comparable_config(cfg, ignored, data["digest"])
    meta = run_meta(cfg, b.method, overrides, fingerprint, data)
    if b.data.val is None:
        tune.check_patience(cfg)  # also refused before launch (tune.InputCheck); here for DDP workers
    tb = cfg.tensorboard
    callbacks = [RunRecord(run_dir, meta), BestCheckpoint(run_dir),
                 TensorBoard(run_dir, meta, tb.step_every, tb.histograms)] if main else []
    parallel = (distributed.DataParallel(ctx, device, cfg.trainer.find_unused_parameters)
                if ctx.enabled else None)
    with stop_on_signals() as stop:
        trainer = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, device,
                          cfg.epochs * b.method.epoch_scale, ckpt_path=ckpt if main else None,
                          should_stop=stop.is_set, progress_bar=cfg.progress if main else False,
                          callbacks=callbacks, parallel=parallel, extra_state={"config": fingerprint},
                          patience=cfg.patience, compile=bool(cfg.compile),
                          precision=str(cfg.precision))
        if cfg.resume and ckpt.exists():
            state = checkpoint.load(ckpt, map_location=device)
            if not identity.same_run(str(state.get("config")), fingerprint, ignored):
                diff = "; ".join(identity.differences(str(state.get("config")), fingerprint, ignored)[:8])
                raise QexpError(f"{run_dir} holds an unfinished run with a different configuration ({diff}); "
                                "it is kept: give this run its own place with name=NAME or out_root=DIR "
                                "(resume=false would discard that run)")
            trainer.load_state_dict(state)
            log.info("resuming %s at epoch %d, batch %d", run_dir, trainer.progress.epoch,
                     trainer.progress.batch)
        outcome = trainer.fit()
    rec = final_record(meta, outcome)
    if main:
        print(f"{run_dir}\n  {record.summary_line(rec)}")
    return rec


#: exit status of a launch refused because another live process holds the run folder (EX_TEMPFAIL)
EXIT_BUSY = 75
#: exit status after Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_INTERRUPTED = 130
#: write errors that are the environment's, not a bug: one line instead of a traceback
_ENV_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
               errno.ENAMETOOLONG)


#: torch.manual_seed takes a 64-bit signed seed
MAX_SEED = 2**63 - 1


def check_inputs(cfg: DictConfig) -> Method:
    """Reject impossible top-level values and bits the method cannot use, before any folder exists."""
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if int(cfg[key]) < 1:
            raise QexpError(f"{key} must be at least 1, got {key}={cfg[key]}")
    lr = float(cfg.lr)
    if not math.isfinite(lr) or lr <= 0:
        raise QexpError(f"lr must be a positive number, got lr={cfg.lr}")
    if not 0 <= int(cfg.seed) <= MAX_SEED:
        raise QexpError(f"seed must be in 0..{MAX_SEED} (torch's generator seed), got seed={cfg.seed}")
    if str(cfg.lock) not in ("auto", "fail", "wait"):
        raise QexpError(f"lock must be auto, fail or wait, got lock={cfg.lock}")
    if int(cfg.tensorboard.step_every) < 0:
        raise QexpError(f"tensorboard.step_every must be 0 (off) or a step count, got {cfg.tensorboard.step_every}")
    if int(cfg.trainer.devices) < 1:
        raise QexpError(f"trainer.devices must be at least 1, got {cfg.trainer.devices}")
    device = resolve_device(cfg.device)  # device=cuda:N that is not there
    precision.check(cfg.precision, device)  # 16-mixed off CUDA
    if cfg.compile:
        compiled.check_compiler(device)  # compile=true without a working compiler
    return instantiate(cfg.method)  # the method checks its own bits and options


def ignored_knobs(method: Method, cfg: DictConfig | None = None) -> tuple[str, ...]:
    """Config knobs the method does not use (its class declares them: ``Float.ignored_knobs = ("bits",)``):
    not part of the run's identity (folder, resume check). The top-level ``bits``/``abits`` never are
    (:data:`qexp.run.config.SOURCE_KEYS`): the method's own keys carry them."""
    return tuple(getattr(method, "ignored_knobs", ()))


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra task: one configuration. In a sweep a failing job is reported and the sweep goes on.

    Order: check the input, compute the run folder from the effective config, skip a finished run,
    build (data, model), and only then create the folder, take its lock, write .hydra/ and train.
    """
    register()  # jobs launched in fresh processes (joblib, submitit) need the schema too
    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    job = int(hc.job.num) if sweeping and hc.job.get("num") is not None else 0
    label = " ".join(identity.task_overrides(hc))
    ranks = distributed.env_ranks()  # launched by torchrun
    main = ranks is None or ranks[0] == 0
    run_dir: Path | None = None
    opened = False

    def done(outcome: str, error: str | None = None) -> None:
        if sweeping and main:
            sweep.report(hc.sweep.dir, job, outcome, str(run_dir) if opened or outcome == "skipped" else None,
                         label, error)

    try:
        if sweeping:
            sweep.worker_signals()
        resources.apply_threads(cfg.threads, hc.launcher if sweeping else None)
        defaults = identity.compose_defaults()
        identity.check_types(cfg, defaults.baseline)  # method.stochastic=off: refused, not read as true
        identity.check_place(cfg)
        method = check_inputs(cfg)
        ignored = ignored_knobs(method, cfg)
        run_dir, level = identity.locate(cfg, defaults, ignored)
        if finished_run(cfg, run_dir, ignored, quiet=not main) is not None:
            done("skipped")
            return record.read(run_dir)
        if preempt.requested():
            if main:
                print(f"{run_dir}: not started, this process was asked to stop")
            done("not started")
            return None
        with ExitStack() as stack:
            if ranks is not None:
                rank, world, local_rank = ranks
                if main:
                    opened = _open_run(stack, cfg, run_dir, level, sweeping)
                rec = _train_ranked(cfg, run_dir, ranks, level)
            elif cfg.trainer.devices > 1:
                opened = _open_run(stack, cfg, run_dir, level, sweeping)
                rec = _spawn_ranks(cfg, run_dir, level)
            else:
                torch.manual_seed(cfg.seed)
                built = build(cfg, resolve_device(cfg.device))  # bad data options fail here: no folder
                opened = _open_run(stack, cfg, run_dir, level, sweeping)
                digest = data_record(cfg, built.data.sources)["digest"]
                if finished_run(cfg, run_dir, ignored, quiet=not main, data=digest) is not None:
                    done("skipped")
                    return record.read(run_dir)
                rec = train(cfg, run_dir, overrides=level, built=built)
            if rec is None:
                done("not started")
                return None
            done(rec["status"], rec.get("error"))
            if main and rec["status"] == "interrupted" and preempt.interrupted_by_user() and not sweeping:
                print(f"interrupted (Ctrl-C): checkpoint saved in {run_dir}; the same command resumes it",
                      file=sys.stderr)
                sys.exit(EXIT_INTERRUPTED)
            return rec
    except lock.LockBusy as e:  # not this run's failure: its folder belongs to the live holder
        print(f"error: {e}", file=sys.stderr)
        done("failed", str(e))
        if not sweeping:
            sys.exit(EXIT_BUSY)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (while building, loading data)
        preempt.note_user_interrupt()
        print("interrupted (Ctrl-C) before training started", file=sys.stderr)
        done("interrupted", "Ctrl-C before training started")
        if not sweeping:
            sys.exit(EXIT_INTERRUPTED)
    except (QexpError, OSError, OmegaConfBaseException) as e:
        if isinstance(e, OSError) and e.errno not in _ENV_ERRNOS:
            return _bug(cfg, run_dir if opened and main else None, e, sweeping, done)
        msg = (str(e) if isinstance(e, QexpError) else config_error_line(e)
               if isinstance(e, OmegaConfBaseException) else f"cannot write {e.filename}: {e.strerror}")
        if opened and main:
            _record_failure(cfg, run_dir, msg)
        print(f"error: {msg}", file=sys.stderr)
        done("failed", msg)
        if not sweeping:
            sys.exit(2)
    except Exception as e:  # a genuine bug: keep the traceback, but never lose the rest of a sweep
        return _bug(cfg, run_dir if opened and main else None, e, sweeping, done)
    return None


def _bug(cfg: DictConfig, run_dir: Path | None, e: BaseException, sweeping: bool, done: Any) -> None:
    """An unexpected exception: recorded in the run folder (if it is ours), traceback kept."""
    if run_dir is not None:
        _record_failure(cfg, run_dir, f"{type(e).__name__}: {e}")
    done("failed", f"{type(e).__name__}: {e}")
    if not sweeping:
        raise e
    log.error("run failed:\n%s", traceback.format_exc())
    return None


def _open_run(stack: ExitStack, cfg: DictConfig, run_dir: Path, level: str, sweeping: bool) -> bool:
    """Create the run folder, take its lock (released by ``stack``), write .hydra/ and start train.log."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QexpError(f"cannot create the run folder {run_dir}: {e.strerror}") from None
    held = lock.RunLock(run_dir)
    wait = cfg.lock == "wait" or (cfg.lock == "auto" and sweeping)
    try:
        held.acquire(wait=wait, on_wait=lambda h: print(f"{run_dir}: waiting for {h.describe()} to finish",
                                                        flush=True))
    except PermissionError as e:
        raise QexpError(f"cannot write into the run folder {run_dir}: {e.strerror}") from None
    stack.callback(held.release)
    for tmp in run_dir.glob(".*.tmp"):  # left by a writer killed mid-write (we hold the lock: none is live)
        tmp.unlink(missing_ok=True)
    _write_hydra(cfg, run_dir, level)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)

    def detach() -> None:
        logging.getLogger().removeHandler(handler)
        handler.close()

    stack.callback(detach)
    return True


def _write_hydra(cfg: DictConfig, run_dir: Path, level: str) -> None:
    """What Hydra writes into a job's folder (config.yaml, hydra.yaml, overrides.yaml), atomically."""
    hydra_dir = run_dir / ".hydra"
    atomic_write_bytes(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    if HydraConfig.initialized():
        hc = OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get(), resolve=False)})
        OmegaConf.set_struct(hc, False)
        hc.hydra.job.override_dirname = level  # the identity level, as qexp report reads it
        hc.hydra.runtime.output_dir = str(run_dir.resolve())
        atomic_write_bytes(hydra_dir / "hydra.yaml", OmegaConf.to_yaml(hc).encode())
        overrides = OmegaConf.create(identity.task_overrides(HydraConfig.get()))
        atomic_write_bytes(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(overrides).encode())


def _ddp_backend(cfg: DictConfig) -> tuple[torch.device, str]:
    device = resolve_device(cfg.device)
    return device, distributed.pick_backend(cfg.trainer.backend, device)


def _train_ranked(cfg: DictConfig, run_dir: Path, ranks: tuple[int, int, int],
                  level: str = "") -> dict[str, Any] | None:
    """One of torchrun's processes: join the group it set up, then train our share."""
    rank, world, local_rank = ranks
    if cfg.trainer.devices not in (1, world):
        log.warning("trainer.devices=%d ignored: torchrun started %d processes", cfg.trainer.devices, world)
    device, backend = _ddp_backend(cfg)
    ctx = distributed.init(rank, world, local_rank, backend)
    return train(cfg, run_dir, ctx, level)


def _spawn_ranks(cfg: DictConfig, run_dir: Path, level: str = "") -> dict[str, Any] | None:
    """``trainer.devices=N``: start N training processes and wait for them (this one holds the lock)."""
    world = cfg.trainer.devices
    device, backend = _ddp_backend(cfg)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        raise QexpError(f"trainer.devices={world} but only {torch.cuda.device_count()} GPUs are visible")
    payload = (OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), str(run_dir), level, backend)
    threads = max(1, torch.get_num_threads() // world) if device.type == "cpu" else None
    log.info("training on %d processes (%s)", world, backend)
    worker = importlib.import_module("qexp.run.train")._ddp_worker  # by module name: picklable under -m too
    distributed.spawn(world, worker, payload, threads)
    return record.read(run_dir)


def _ddp_worker(rank: int, world: int, init_method: str, payload: tuple, errors: Any) -> None:
    """Body of one process started by :func:`_spawn_ranks` (a fresh interpreter, no Hydra)."""
    conf, run_dir, overrides, backend = payload
    cfg, run_dir = OmegaConf.create(conf), Path(run_dir)
    distributed.worker_logging(run_dir, rank == 0)
    try:
        ctx = distributed.init(rank, world, rank, backend, init_method)
        train(cfg, run_dir, ctx, overrides)
        distributed.barrier()  # leave together: a peer closing its connections mid-teardown aborted the other
    except QexpError as e:
        errors.put(str(e))
        raise SystemExit(2) from None
    finally:
        distributed.shutdown()


def _record_failure(cfg: DictConfig, run_dir: Path, message: str) -> None:
    if not run_dir.is_dir():  # removed while training: nothing to record into
        return
    meta = {"name": cfg.get("name"), "dataset": cfg.dataset.get("name"), "model": cfg.model.get("name"),
            "method": cfg.method.get("name"), "bits": cfg.get("bits"), "seed": cfg.get("seed")}
    prev = record.read(run_dir) or {}
    record.write(run_dir, record.build(meta, "failed", prev.get("history", []), prev.get("wall_s", 0.0),
                                       error=message))


@hydra.main(config_path="pkg://qexp.configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    rec = run(cfg)
    hc = HydraConfig.get()
    if tune.is_optuna(hc):  # the sweeper minimises what the task returns: a validation error
        return tune.objective(rec, cfg.objective)
    return None


def config_error_line(e: BaseException) -> str:
    """A Hydra/OmegaConf error as one line: what was asked, what is wrong, the options there are."""
    parts: list[str] = []
    options: list[str] = []
    for ex in (e, e.__cause__):
        for line in str(ex or "").splitlines():
            text = line.strip()
            if text.startswith("Config search path"):  # Hydra's own plumbing follows
                break
            if not text or text.startswith(("full_key:", "object_type=", "reference_type=", "Set the environment")):
                continue
            if line.startswith("\t"):  # Hydra lists a group's options one per tab-indented line
                options.append(text)
            elif text.rstrip(".:") not in parts:
                parts.append(text.rstrip(".:"))
    return "; ".join(parts) + (f" ({', '.join(options)})" if options else "")


#: Hydra's flags that take a value (``--config-dir DIR``), and the values ``--info`` may take
_VALUE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c",
                "--package", "-p", "--experimental-rerun")
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
#: Hydra settings qexp decides itself: the run folder is a function of the configuration below out_root
_PLACED = re.compile(r"[+~]*hydra\.(run\.dir|sweep\.dir|sweep\.subdir|output_subdir|job\.chdir)=")


def arrange_argv(args: list[str]) -> list[str]:
    """Hydra's flags first, then the overrides, as typed: ``qexp train method=sr --multirun`` and
    ``... --config-dir DIR`` work like the same flags typed first (argparse refused them after overrides).
    Refuses (QexpError) the Hydra settings that would place runs elsewhere than qexp's folder layout."""
    flags: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            flags.append(a)
            takes = a in _VALUE_FLAGS or (a in ("--info", "-i") and i + 1 < len(args)
                                          and args[i + 1] in _INFO_VALUES)
            if takes and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            m = _PLACED.match(a)
            if m:
                raise QexpError(f"{a.split('=', 1)[0].lstrip('+~')}: qexp places every run in "
                                "<out_root>/<name>/<dataset>/<model>/<method>/.../seed<k>; set out_root=DIR "
                                "(and name=NAME) instead")
            rest.append(a)
        i += 1
    for j, f in enumerate(flags):
        d = f.split("=", 1)[1] if f.startswith(("--config-dir=", "-cd=")) else \
            flags[j + 1] if f in ("--config-dir", "-cd") and j + 1 < len(flags) else None
        if d is not None:
            check_config_dir(Path(d))
    return flags + rest


def check_config_dir(folder: Path) -> None:
    """``--config-dir DIR``: a file there with the name of a shipped one (``DIR/method/bc.yaml``) would be
    silently shadowed by the shipped file; refuse it, naming the fix. Then register the folder's method
    options (their classes read ``name`` and default ``bits`` from these YAML files)."""
    import qexp.configs

    shipped = Path(qexp.configs.__file__).parent
    if not folder.is_dir():
        raise QexpError(f"--config-dir {folder}: no such folder")
    for f in sorted(folder.rglob("*.yaml")):
        rel = f.relative_to(folder)
        if (shipped / rel).is_file():
            group = str(rel.parent) if str(rel.parent) != "." else None
            what = f"{group}={rel.stem}" if group else rel.name
            raise QexpError(f"--config-dir {folder}: {rel} has the name of the shipped {what}, which would "
                            f"be used instead of yours; rename it (e.g. {rel.parent / ('my_' + rel.name)})")
    register_config_dir(folder)  # its method options' name and default bits, read from their YAML


def main() -> None:
    """Entry for ``qexp train`` and ``python -m qexp.run.train``: Hydra parses ``sys.argv``.

    A ``--multirun`` sweep exits 1 when a job failed (130 after Ctrl-C), after its summary.
    """
    try:
        sys.argv = sys.argv[:1] + arrange_argv(sys.argv[1:])
    except QexpError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    register()
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: only rank 0 writes .hydra/ and train.log
        sys.argv += ["hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    # Hydra prints a composition error (a mistyped key, a wrong type, an unknown group option) over
    # several lines and exits 1; let it raise instead, and say it in one line with exit 2
    os.environ["HYDRA_FULL_ERROR"] = "1"
    started = time.time()
    try:
        _hydra_main()
    except KeyboardInterrupt:  # Ctrl-C while Hydra composes or a launcher waits
        preempt.note_user_interrupt()
        sweep.finish()
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:
        if preempt.interrupted_by_user():  # a parallel launcher broken by the Ctrl-C its workers got
            sweep.finish()
            print(f"interrupted (Ctrl-C): {type(e).__name__}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        if not isinstance(e, (HydraException, OmegaConfBaseException, OSError)):
            raise
        _main_error(e, started)
    if sweep.exit_code():
        sys.exit(sweep.exit_code())


def _main_error(e: BaseException, started: float) -> None:
    """A composition error or an unwritable sweep folder, as one line (exit 2)."""
    if isinstance(e, (HydraException, OmegaConfBaseException)):
        sweep.remove_stub(started)
        print(f"error: {config_error_line(e)}", file=sys.stderr)
        sys.exit(2)
    if isinstance(e, OSError):  # Hydra could not create a sweep's folder (an unwritable out_root)
        if e.errno not in _ENV_ERRNOS:
            raise e
        print(f"error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
