"""The end of a ``--multirun`` sweep: a one-screen summary and an exit status scripts can trust.

Every job (whichever launcher ran it: in this process, joblib workers, submitit/SLURM jobs) reports its
outcome as a small JSON file under ``<sweep dir>/.qexp-sweep/<sweep id>/``; the Hydra callback
:class:`SweepSummary` (configured in train.yaml) collects them when the launcher returns, prints the
counts and the failed jobs with their one-line errors, and sets the process's exit status: 1 when a
job failed, 128 + N when the sweep was stopped by signal N (130 after Ctrl-C, 143 after SIGTERM, 138
after SIGUSR1: a script's ``qexp train --multirun ... && qexp table`` does not go on with jobs that never
ran), else 0 (a diverged run is a result, not an error).

A local parallel sweep (``hydra/launcher=local_parallel``, joblib) keeps the sequential sweep's contract on
Ctrl-C, SIGTERM and SIGUSR1: the parent does not raise or die (joblib would kill its workers
mid-checkpoint, or leave them running as orphans) but asks every worker to stop (:func:`parallel_stop`);
each running job checkpoints and reports ``interrupted``, no new job starts, and the parent prints the
summary and exits 128 + N.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qexp.errors import QexpError
from qexp.jsonio import missing_folders, read_json, write_json

ENV = "QEXP_SWEEP_ID"
#: the pid of the process that launched a local parallel sweep (its workers are the other processes)
PARENT_ENV = "QEXP_SWEEP_PARENT"
FOLDER = ".qexp-sweep"
#: order of the counts in the summary
ORDER = ("completed", "skipped", "failed", "diverged", "interrupted", "not started")
#: at most this many failed jobs are listed (the rest: `qexp runs DIR --status failed`)
SHOW = 15

_exit_code = 0
#: the folder of the sweep this process launched (set when it starts)
_sweep_dir: str | None = None
#: when this process's sweep started (its multirun.yaml is not older)
_started = 0.0
#: the folders of the sweep's folder chain that did not exist when it started, deepest first, and whether
#: its multirun.yaml did not: only these may be removed again (:func:`remove_stub`)
_new_folders: list[Path] = []
_new_stub = False
#: the signals a local parallel sweep's parent takes over (:func:`parallel_stop`)
PARENT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
#: the parent's handlers of those signals before a local parallel sweep took them over
_old_handlers: dict[int, Any] = {}


def _children() -> list[int]:
    """Pids of this process's child processes (Linux /proc; empty elsewhere)."""
    me, out = os.getpid(), []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            out.append(int(d.name))
    return out


def parallel_stop(signum: int, frame: Any) -> None:
    """The parent's Ctrl-C (or SIGTERM, SIGUSR1) under a local parallel sweep: stop (no new job), pass it
    on to the workers as a Ctrl-C (what they stop on inside and outside training)."""
    from qexp.run import preempt

    first = not preempt.requested()
    preempt.note_signal(signum)
    if first:
        what = "interrupted" if signum == signal.SIGINT else "stopped"
        print(f"{what} ({preempt.signal_name(signum)}): running jobs checkpoint and stop, no new job starts",
              file=sys.stderr, flush=True)
    for pid in _children():
        try:
            os.kill(pid, signal.SIGINT)
        except OSError:
            pass


def worker_signals() -> None:
    """In a local parallel sweep's worker: Ctrl-C means "stop" (checkpoint while training, start nothing
    new), never a KeyboardInterrupt that would break joblib's worker loop."""
    from qexp.run import preempt

    parent = os.environ.get(PARENT_ENV)
    if (parent and parent != str(os.getpid()) and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, lambda signum, frame: preempt.note_user_interrupt())


def _parallel(config: DictConfig) -> bool:
    return "joblib" in str(config.hydra.launcher.get("_target_", "")).lower()


def check_launcher(config: DictConfig) -> None:
    """Launcher settings no sweep can start with, refused (QexpError) before any job or folder exists:
    joblib's ``n_jobs=0`` (a traceback from joblib once the sweep started), and a SLURM launcher on a
    machine without SLURM (submitit's traceback: "Could not detect srun")."""
    launcher = config.hydra.get("launcher") or {}
    if _parallel(config) and launcher.get("n_jobs") == 0:
        raise QexpError("hydra.launcher.n_jobs=0 runs nothing: use a number of jobs at once, or -1 for one "
                        "job per core (joblib's negative counts: -2 all cores but one, ...)")
    if "slurm" in str(launcher.get("_target_", "")).lower() and shutil.which("srun") is None:
        raise QexpError("the SLURM launcher submits to a SLURM cluster, and this machine has no srun: "
                        "launch the sweep on the cluster, or here use hydra/launcher=local_parallel "
                        "(or submitit_local)")


def check_sweep_record(config: DictConfig) -> None:
    """Hydra writes every sweep's record to ``<out_root>/<name>/multirun.yaml``, replacing what is there: a
    file of that name that is not such a record (the user's own, a folder, a link) is refused before it
    would be lost."""
    import yaml

    path = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
    if not path.exists() and not path.is_symlink():
        return
    try:
        ours = (not path.is_symlink() and path.is_file() and path.stat().st_size < 10_000_000
                and "hydra" in (yaml.safe_load(path.read_text()) or {}))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError):
        ours = False
    if not ours:
        raise QexpError(f"{path} is not a sweep record Hydra wrote, and a --multirun writes its record there "
                        "(replacing it): move it, or give the sweep another name= or out_root=")


def check_values(config: DictConfig) -> None:
    """A grid (Hydra's basic sweeper) with a sweep of no value (``seed=range(0,0)``) would run no job and
    exit 0: refused (QexpError) before any folder exists. Sweeps whose values need the config loader
    (``glob(...)``) are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if "BasicSweeper" not in str((config.hydra.get("sweeper") or {}).get("_target_", "")):
        return
    for o in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        if not o.is_sweep_override():
            continue
        try:
            empty = not list(o.sweep_string_iterator())
        except HydraException:  # glob(): its values come from the config groups
            continue
        if empty:
            raise QexpError(f"{o.input_line} sweeps over no value: the sweep would run no job")


def exit_code() -> int:
    """What ``qexp train --multirun`` exits with (set by :meth:`SweepSummary.on_multirun_end`)."""
    return _exit_code


def remove_stub(started: float) -> None:
    """A sweep whose jobs could not be composed (a bad override), or whose every job was refused before
    its run folder (``epochs=-1,-2``), leaves only Hydra's multirun.yaml: remove it, and the folders the
    sweep made (``<name>``, ``out_root``) if that leaves them empty: no stray folder or file. What was
    there before (the user's ``out_root``, an earlier sweep's multirun.yaml, which Hydra rewrote) stays."""
    if _sweep_dir is None:
        return
    folder = Path(_sweep_dir).absolute()  # as _new_folders names it (out_root may be relative)
    stub = folder / "multirun.yaml"
    try:
        if not _new_stub or not stub.is_file() or stub.stat().st_mtime < started - 1:
            return
        if folder in _new_folders and any(p != stub for p in folder.iterdir()):
            return
        stub.unlink()
        for made in _new_folders:  # deepest first
            made.rmdir()
    except OSError:
        pass


def report(sweep_dir: str | Path, job: int, outcome: str, run_dir: str | None, label: str,
           error: str | None = None) -> None:
    """Called by each job of a sweep: ``outcome`` is one of :data:`ORDER`."""
    sweep_id = os.environ.get(ENV)
    if not sweep_id:
        return
    doc = {"job": job, "outcome": outcome, "run_dir": run_dir, "label": label, "error": error}
    try:
        write_json(Path(sweep_dir) / FOLDER / sweep_id / f"{job}.json", doc)
    except OSError:  # an unwritable sweep folder must not turn a finished run into a failure
        pass


def summarize(jobs: list[dict[str, Any]], stopped: int | None = None) -> tuple[list[str], int]:
    """Summary lines and the exit status for the collected job reports (``stopped``: the stop signal the
    sweep received, if any)."""
    counts = {k: 0 for k in ORDER}
    for j in jobs:
        counts[j.get("outcome", "failed")] = counts.get(j.get("outcome", "failed"), 0) + 1
    text = ", ".join(f"{n} {k}" for k, n in counts.items() if n or k in ORDER[:4])
    lines = [f"sweep finished: {len(jobs)} job{'s' if len(jobs) != 1 else ''}: {text}"]
    failed = sorted((j for j in jobs if j.get("outcome") == "failed"), key=lambda j: j.get("job", 0))
    for j in failed[:SHOW]:
        where = j.get("run_dir") or f"(no run folder) {j.get('label', '')}"
        lines.append(f"  failed  {where}: {(j.get('error') or '').splitlines()[0][:160] if j.get('error') else ''}")
    if len(failed) > SHOW:
        lines.append(f"  ... and {len(failed) - SHOW} more (qexp runs DIR --status failed)")
    code = 1 if failed else (128 + stopped if stopped else 0)
    return lines, code


class SweepSummary(Callback):
    """Hydra callback: give the sweep an id its jobs report under, then summarize their reports."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir, _started, _new_folders, _new_stub
        os.environ[ENV] = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        _sweep_dir, _started = str(config.hydra.sweep.dir), time.time()
        _new_folders = missing_folders(Path(_sweep_dir).absolute())
        _new_stub = not (Path(_sweep_dir) / "multirun.yaml").exists()
        if _parallel(config) and threading.current_thread() is threading.main_thread():
            os.environ[PARENT_ENV] = str(os.getpid())
            for s in PARENT_SIGNALS:
                _old_handlers[s] = signal.signal(s, parallel_stop)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        finish(str(config.hydra.sweep.dir))


def finish(sweep_dir: str | None = None) -> None:
    """Collect the jobs' reports, print the summary, set the exit status, remove the reports (also called
    when a launcher raised, so that no ``.qexp-sweep/`` is left behind)."""
    global _exit_code
    from qexp.run import preempt

    for s, handler in _old_handlers.items():
        signal.signal(s, handler)
    _old_handlers.clear()
    os.environ.pop(PARENT_ENV, None)
    sweep_id = os.environ.pop(ENV, None)
    sweep_dir = sweep_dir or _sweep_dir
    if not sweep_id or sweep_dir is None:
        return
    folder = Path(sweep_dir) / FOLDER / sweep_id
    jobs = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            jobs.append(read_json(f))
        except (OSError, ValueError):
            continue
    lines, _exit_code = summarize(jobs, stopped=preempt.stop_signal())
    print("\n".join(lines), flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # only when no other sweep is reporting there
    except OSError:
        pass
    if jobs and not any(j.get("run_dir") for j in jobs):  # every job refused before its folder
        remove_stub(_started)
