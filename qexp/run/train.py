"""``qexp train``: the single Hydra entry point: arranges argv, composes the config, places the run
folder, takes its lock, turns errors into one line and an exit status, and spawns data-parallel workers.

This is the only module that reads the Hydra config; the run itself (build the method once, train,
write results) is :mod:`qexp.run.session`'s, which takes the composed config. Nothing imports this
module (``qexp train`` and ``python -m qexp.run.train`` start it).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import re
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qexp.errors import ForeignRun, QexpError, argument_error
from qexp.jsonio import atomic_write_bytes, missing_folders
from qexp.methods.base import Method, register_config_dir
from qexp.run import distributed, identity, lock, preempt, record, resources, seeds, sweep, tune
from qexp.run.config import register
from qexp.run.session import (
    build,
    build_method,
    check_inputs,
    check_seeds,
    data_record,
    finished_run,
    ignored_knobs,
    resolve_device,
    stack_seeds,
    train,
    train_group,
)

log = logging.getLogger("qexp")


#: exit status of a launch refused because another live process holds the run folder (EX_TEMPFAIL)
EXIT_BUSY = 75
#: exit status after Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_INTERRUPTED = 130
#: write errors that are the environment's, not a bug: one line instead of a traceback
_ENV_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
               errno.ENAMETOOLONG)


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Hydra task: one configuration. In a sweep a failing job is reported and the sweep goes on.

    Order: check the input, compute the run folder from the effective config, skip a finished run,
    build (data, model), and only then create the folder, take its lock, write .hydra/ and train.
    """
    register()  # jobs launched in fresh processes (joblib, submitit) need the schema too
    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    job = int(hc.job.num) if sweeping and hc.job.get("num") is not None else 0
    typed = identity.task_overrides(hc)
    label = " ".join(typed)
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
        if ranks is not None:  # torchrun's world size is the run's number of processes (part of its identity)
            if cfg.trainer.devices not in (1, ranks[1]):
                log.warning("trainer.devices=%d ignored: torchrun started %d processes", cfg.trainer.devices,
                            ranks[1])
            cfg.trainer.devices = ranks[1]
        defaults = identity.compose_defaults()
        identity.check_types(cfg, defaults.baseline)  # method.stochastic=off: refused, not read as true
        identity.check_labels(cfg, defaults.baseline)  # optim.name=sgd on Adam: refused
        identity.check_place(cfg)
        resources.keep_caches_under(cfg.out_root)
        method = check_inputs(cfg)  # the run's method, built once in this process
        seeds_per_process = check_seeds(cfg, method)  # checked before any folder
        check_processes(cfg)
        ignored = ignored_knobs(method)
        run_dir, level = identity.locate(cfg, defaults, ignored)
        unread = identity.unread_knobs(cfg, typed, ignored)
        if unread and main:
            log.warning("%s not read by method=%s: the run is the same as without %s", " ".join(unread),
                        defaults.option, "it" if len(unread) == 1 else "them")
        unread_lr = identity.unread_optim_lr(cfg, typed)
        if unread_lr and main:
            log.warning(unread_lr)
        if seeds_per_process == 1 and finished_run(cfg, run_dir, ignored, quiet=not main) is not None:
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
                rec = _train_ranked(cfg, run_dir, ranks, level, method)
            elif cfg.trainer.devices > 1:
                opened = _open_run(stack, cfg, run_dir, level, sweeping)
                rec = _spawn_ranks(cfg, run_dir, level)
            elif seeds_per_process > 1:
                rec, run_dir, opened = _train_seeds(stack, cfg, defaults, seeds_per_process, sweeping, main)
            else:
                torch.manual_seed(cfg.seed)
                built = build(cfg, resolve_device(cfg.device), method)  # bad data options fail here: no folder
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
        if opened and main and not isinstance(e, ForeignRun):  # another run's folder: left as it is
            _record_failure(cfg, run_dir, msg)
        print(f"error: {msg}", file=sys.stderr)
        done("failed", msg)
        if not sweeping:
            sys.exit(2)
    except Exception as e:  # a genuine bug: keep the traceback, but never lose the rest of a sweep
        return _bug(cfg, run_dir if opened and main else None, e, sweeping, done)
    return None


def _train_seeds(stack: ExitStack, cfg: DictConfig, defaults: Any, k: int, sweeping: bool, main: bool,
                 ) -> tuple[dict[str, Any] | None, Path, bool]:
    """``trainer.seeds_per_process=K``: seeds ``seed .. seed+K-1`` of this configuration, each in the
    folder its own ``seed=`` run would use, the unfinished ones trained together as one stacked model
    (:func:`qexp.run.session.train_group`; a last one left alone as a plain run). Returns the worst
    record (the first seed's when all are finished), the first seed's folder and whether folders were
    opened."""
    device = resolve_device(cfg.device)
    first_dir: Path | None = None
    todo: list[tuple[DictConfig, Path, str, Method]] = []
    for j in range(k):
        c = cfg.copy()
        c.seed = int(cfg.seed) + j
        method = build_method(c)  # each seed its own method (its generators follow its seed)
        d, level = identity.locate(c, defaults, ignored_knobs(method))
        first_dir = first_dir or d
        if finished_run(c, d, ignored_knobs(method), quiet=not main) is None:
            todo.append((c, d, level, method))
    assert first_dir is not None
    if not todo:
        return record.read(first_dir), first_dir, False
    builts = []
    for c, _, _, method in todo:
        torch.manual_seed(c.seed)
        builts.append(build(c, device, method))  # bad data options fail here: no folder
    group = stack_seeds(builts) if len(builts) > 1 else None  # a model vmap cannot batch: no folder
    for c, d, level, _ in todo:
        _open_run(stack, c, d, level, sweeping, other_seed=c.seed != cfg.seed)
    cfgs, dirs, levels = ([t[i] for t in todo] for i in range(3))
    if group is None:  # one seed left: a plain run
        return train(cfgs[0], dirs[0], overrides=levels[0], built=builts[0]), first_dir, True
    recs = train_group(cfgs, dirs, builts, group, levels)
    order = ("failed", "diverged", "interrupted", "completed")
    worst = min(recs, key=lambda r: order.index(r["status"]) if r["status"] in order else 0)
    return worst, first_dir, True


def _bug(cfg: DictConfig, run_dir: Path | None, e: BaseException, sweeping: bool, done: Any) -> None:
    """An unexpected exception: recorded in the run folder (if it is ours), traceback kept."""
    if run_dir is not None:
        _record_failure(cfg, run_dir, f"{type(e).__name__}: {e}")
    done("failed", f"{type(e).__name__}: {e}")
    if not sweeping:
        raise e
    log.error("run failed:\n%s", traceback.format_exc())
    return None


def _open_run(stack: ExitStack, cfg: DictConfig, run_dir: Path, level: str, sweeping: bool,
              other_seed: bool = False) -> bool:
    """Create the run folder, take its lock (released by ``stack``), write .hydra/ and start train.log
    (``other_seed``: :func:`_write_hydra`)."""
    made = missing_folders(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a level too long for the file system: the levels made before it go again
        for p in made:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
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
    _write_hydra(cfg, run_dir, level, other_seed)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.addFilter(seeds.log_filter(run_dir))  # a seed of a group: its own engine's lines
    logging.getLogger().addHandler(handler)

    def detach() -> None:
        logging.getLogger().removeHandler(handler)
        handler.close()

    stack.callback(detach)
    return True


def _write_hydra(cfg: DictConfig, run_dir: Path, level: str, other_seed: bool = False) -> None:
    """What Hydra writes into a job's folder (config.yaml, hydra.yaml, overrides.yaml), atomically;
    ``other_seed``: the folder of a group's later seed, whose overrides name its own seed."""
    hydra_dir = run_dir / ".hydra"
    atomic_write_bytes(hydra_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    if HydraConfig.initialized():
        hc = OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get(), resolve=False)})
        OmegaConf.set_struct(hc, False)
        hc.hydra.job.override_dirname = level  # the identity level, as qexp report reads it
        hc.hydra.runtime.output_dir = str(run_dir.resolve())
        atomic_write_bytes(hydra_dir / "hydra.yaml", OmegaConf.to_yaml(hc).encode())
        typed = identity.task_overrides(HydraConfig.get())
        if other_seed:  # a later seed of a group (trainer.seeds_per_process): its seed, as typed alone
            seed = f"seed={cfg.seed}"
            typed = ([seed if o.startswith("seed=") else o for o in typed] if any(o.startswith("seed=") for o in typed)
                     else [*typed, seed])
        overrides = OmegaConf.create(typed)
        atomic_write_bytes(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(overrides).encode())


def check_processes(cfg: DictConfig) -> None:
    """Data parallelism's inputs, before any folder: the backend fits the device, the GPUs are there
    (``trainer.devices`` started here), and each process gets an equal share of every batch."""
    world = int(cfg.trainer.devices)
    if world <= 1:
        return
    device, _ = _ddp_backend(cfg)
    if device.type == "cuda" and distributed.env_ranks() is None and torch.cuda.device_count() < world:
        raise QexpError(f"trainer.devices={world} but only {torch.cuda.device_count()} GPUs are visible")
    distributed.check_batch_share(int(cfg.batch_size), world)


def _ddp_backend(cfg: DictConfig) -> tuple[torch.device, str]:
    device = resolve_device(cfg.device)
    return device, distributed.pick_backend(cfg.trainer.backend, device)


def _train_ranked(cfg: DictConfig, run_dir: Path, ranks: tuple[int, int, int],
                  level: str = "", method: Method | None = None) -> dict[str, Any] | None:
    """One of torchrun's processes: join the group it set up, then train our share."""
    rank, world, local_rank = ranks
    device, backend = _ddp_backend(cfg)
    with distributed.joined(rank, world, local_rank, backend) as ctx:
        return train(cfg, run_dir, ctx, level, method=method)


def _spawn_ranks(cfg: DictConfig, run_dir: Path, level: str = "") -> dict[str, Any] | None:
    """``trainer.devices=N``: start N training processes and wait for them (this one holds the lock)."""
    world = cfg.trainer.devices
    device, backend = _ddp_backend(cfg)  # the GPU count was checked before the folder (check_processes)
    payload = (OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), str(run_dir), level, backend)
    threads = max(1, torch.get_num_threads() // world) if device.type == "cpu" else None
    log.info("training on %d processes (%s)", world, backend)
    worker = importlib.import_module("qexp.run.train")._ddp_worker  # by module name: picklable under -m too
    distributed.spawn(world, worker, payload, run_dir, threads)
    return record.read(run_dir)


def _ddp_worker(rank: int, world: int, init_method: str, payload: tuple, errors: Any) -> None:
    """Body of one process started by :func:`_spawn_ranks` (a fresh interpreter, no Hydra)."""
    conf, run_dir, overrides, backend = payload
    cfg, run_dir = OmegaConf.create(conf), Path(run_dir)
    distributed.worker_logging(run_dir, rank == 0)
    resources.keep_caches_under(cfg.out_root)  # a fresh interpreter: the data cache's place is not inherited
    try:
        with distributed.joined(rank, world, rank, backend, init_method) as ctx:
            train(cfg, run_dir, ctx, overrides)
    except QexpError as e:
        errors.put(str(e))
        raise SystemExit(2) from None


def _record_failure(cfg: DictConfig, run_dir: Path, message: str) -> None:
    if not run_dir.is_dir():  # removed while training: nothing to record into
        return
    meta = {"name": cfg.get("name"), "dataset": cfg.dataset.get("name"), "model": cfg.model.get("name"),
            "method": cfg.method.get("name"), "bits": cfg.get("bits"), "seed": cfg.get("seed")}
    prev = record.read(run_dir) or {}
    # what the run recorded before (its fingerprint, data digest, settings) stays: a refused resume (a
    # corrupt checkpoint) once left a record that no longer said which configuration the folder holds
    kept = {k: v for k, v in prev.items() if k not in ("status", "error", "history", "epochs_done")}
    rec = record.build({**meta, **kept}, "failed", prev.get("history", []), prev.get("wall_s", 0.0),
                       error=message)
    record.write(run_dir, rec)


@hydra.main(config_path="pkg://qexp.configs", config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    rec = run(cfg)
    hc = HydraConfig.get()
    if tune.is_optuna(hc):  # the sweeper minimises what the task returns: a validation error
        return tune.objective(rec, cfg.objective)
    return None


#: OmegaConf's words for a key the composed config does not have (``dataset.test_subset`` on mnist)
_NOT_IN_STRUCT = re.compile(r"Key '([^']+)' is not in struct")


def config_error_line(e: BaseException) -> str:
    """A Hydra/OmegaConf error as one line: what was asked, what is wrong, the options there are."""
    parts: list[str] = []
    options: list[str] = []
    for ex in (e, e.__cause__):
        for line in str(ex or "").splitlines():
            text = line.strip()
            if text.startswith("Config search path"):  # Hydra's own plumbing follows
                break
            if not text or text.startswith(("full_key:", "object_type=", "reference_type=", "Set the environment",
                                            "To append to your config use")):  # qexp refuses +key=...
                continue
            text = _NOT_IN_STRUCT.sub(r"this configuration has no setting '\1' (`qexp train --cfg job` with the "
                                      "same groups lists them)", text)
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
#: Hydra's job logging that writes a file (``<job>.log`` in the folder Hydra would run in, the current one),
#: or a logging handler of the user's (a FileHandler writes wherever its filename says)
_LOG_FILE = re.compile(r"[+~]*hydra(/job_logging=default$|\.(job_logging|hydra_logging)\.handlers)")


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
            elif a in ("--info", "-i"):  # bare: Hydra's default, spelled out so no override is taken as its value
                flags.append("all")
        else:
            m = _PLACED.match(a)
            if m:
                raise QexpError(f"{a.split('=', 1)[0].lstrip('+~')}: qexp places every run in "
                                "<out_root>/<name>/<dataset>/<model>/<method>/.../seed<k>; set out_root=DIR "
                                "(and name=NAME) instead")
            if _LOG_FILE.match(a):
                raise QexpError(f"{a.lstrip('+~').split('=', 1)[0]}: Hydra's log files would be written outside "
                                "out_root; qexp writes train.log into each run folder itself (hydra/job_logging=qexp, "
                                "the default; stdout, none or disabled are accepted)")
            rest.append(a)
        i += 1
    for j, f in enumerate(flags):
        d = f.split("=", 1)[1] if f.startswith(("--config-dir=", "-cd=")) else \
            flags[j + 1] if f in ("--config-dir", "-cd") and j + 1 < len(flags) else None
        if d is not None:
            check_config_dir(Path(d))
    check_flags(flags)
    return flags + rest


def check_flags(flags: list[str]) -> None:
    """Hydra's own flags parsed ahead of Hydra, so that a bad one (``--bogus``, ``--cfg nonsense``) is one
    line (QexpError) instead of argparse's usage block; ``--version`` is left to Hydra (it prints, exits)."""
    if "--version" in flags:
        return
    if "--experimental-rerun" in flags:  # unpickles a file Hydra wrote for a job; qexp resumes its own way
        raise QexpError("--experimental-rerun: rerun a run by typing its command again (an unfinished run "
                        "resumes, a finished one is reported; resume=false retrains)")
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str) -> NoReturn:
        raise QexpError(argument_error("qexp train", message))

    parser.error = refuse  # type: ignore[method-assign]
    parser.parse_args(flags)


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

    A ``--multirun`` sweep exits 1 when a job failed (128 + N after stop signal N: 130 after Ctrl-C), after
    its summary.
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
        stopped = preempt.stop_signal()
        if stopped is not None:  # a parallel launcher broken by the stop (Ctrl-C, SIGTERM) its workers got
            sweep.finish()
            print(f"interrupted ({preempt.signal_name(stopped)}): {type(e).__name__}", file=sys.stderr)
            sys.exit(128 + stopped)
        if not isinstance(e, (HydraException, OmegaConfBaseException, OSError)) and not _composing_error(e):
            raise
        _main_error(e, started)
    if sweep.exit_code():
        sys.exit(sweep.exit_code())


def _composing_error(e: BaseException) -> bool:
    """An error OmegaConf raised (as a Python type) while merging an override into the config: it names
    the key (``full_key: hydra.sweeper.params``), e.g. a dict merged into a node that is null."""
    return "full_key:" in str(e)


def _main_error(e: BaseException, started: float) -> None:
    """A composition error or an unwritable sweep folder, as one line (exit 2)."""
    if _composing_error(e) and not isinstance(e, (HydraException, OmegaConfBaseException)):
        sweep.remove_stub(started)
        key = re.search(r"full_key: (\S+)", str(e))
        hint = ("; give a search space as an override of its own (lr='tag(log, interval(1e-4, 0.1))') or "
                "set hydra.sweeper.params in a preset" if key and key[1].startswith("hydra.sweeper.params") else "")
        print(f"error: cannot set {key[1] if key else 'an override'} as given ({config_error_line(e)}){hint}",
              file=sys.stderr)
        sys.exit(2)
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
