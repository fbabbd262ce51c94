"""Fault tolerance: preemption signals, exact mid-epoch resume, divergence, failure-tolerant and resumable
sweeps through the joblib (local_parallel) and submitit launchers."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_train, find_runs, read_metrics, run_qexp

from qexp.run import checkpoint, preempt
from qexp.run.session import Trainer, build, train

pytestmark = pytest.mark.usefixtures("one_thread")

#: per-epoch numbers that must not depend on being interrupted (timings may)
EXACT = ("epoch", "train_loss", "train_error", "test_loss", "test_error", "lr")
#: a small MLP (no BN: DDP and one process then compute the same function) on fake data
TINY = ["dataset=synthetic", "model=mlp", "model.width=64", "model.depth=2", "model.bn=false",
        "eval_batch_size=256", "progress=false", "device=cpu"]  # exact numbers: CPU
#: 128 steps an epoch and 6 epochs: a signal sent when epoch 1's metrics appear lands well before the end
SLOW_EPOCHS = [*TINY, "dataset.train_samples=2048", "batch_size=16", "epochs=6"]


def exact(history: list[dict]) -> list[dict]:
    return [{k: row[k] for k in EXACT} for row in history]


# ---- resume --------------------------------------------------------------------------------------------
class OneOfOne:
    """The data-parallel interface with one process: the engine keeps each process's running sums apart
    from the resumed epoch's totals, as under DDP (:class:`qexp.run.distributed.DataParallel`)."""

    def shard(self, data):  # type: ignore[no-untyped-def]
        return data

    def wrap(self, model, optimizer, loss_is_sum):  # type: ignore[no-untyped-def]
        return model

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def agree(self, local):  # type: ignore[no-untyped-def]
        return local

    def summary(self, model, method_state) -> dict:  # type: ignore[no-untyped-def]
        return {}


def _fit(cfg, ckpt: Path, stop_after: int | None = None, parallel: OneOfOne | None = None) -> tuple[str, Trainer]:
    torch.manual_seed(cfg.seed)
    b = build(cfg, torch.device("cpu"))
    calls = itertools.count(1)
    stop = (lambda: next(calls) >= stop_after) if stop_after else (lambda: False)
    t = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, torch.device("cpu"), cfg.epochs,
                ckpt_path=ckpt, should_stop=stop, progress_bar=False, parallel=parallel)
    if ckpt.exists():
        t.load_state_dict(checkpoint.load(ckpt))
    return t.fit().status, t


@pytest.mark.parametrize("method", ["method=float", "method=sr"])
def test_mid_epoch_interrupt_resumes_exactly(tmp_path: Path, method: str) -> None:
    """Stopped inside epoch 2 (8 batches an epoch; the stop flag is read after every step and after every
    epoch), resumed, stopped at the end of epoch 2, resumed: the same history, weights and method state
    as one uninterrupted run, bit for bit."""
    parallel = None
    bits = "bits=4" if method == "method=sr" else "bits=32"
    cfg = compose_train([*TINY, "dataset.train_subset=128", "batch_size=16", "epochs=3", method, bits])
    status, ref = _fit(cfg, tmp_path / "ref.pt", parallel=parallel)
    assert status == "completed"
    ckpt = tmp_path / "run.pt"
    status, _ = _fit(cfg, ckpt, stop_after=11, parallel=parallel)
    assert status == "interrupted"
    state = checkpoint.load(ckpt)
    assert (state["progress"]["epoch"], state["progress"]["batch"]) == (1, 2)  # mid-epoch
    status, _ = _fit(cfg, ckpt, stop_after=7, parallel=parallel)  # 6 steps finish epoch 2, the 7th read is at its end
    assert status == "interrupted"
    assert (checkpoint.load(ckpt)["progress"]["epoch"], checkpoint.load(ckpt)["progress"]["batch"]) == (2, 0)
    status, resumed = _fit(cfg, ckpt, parallel=parallel)
    assert status == "completed"
    assert exact(resumed.progress.history) == exact(ref.progress.history)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert str(resumed.method.state_dict()) == str(ref.method.state_dict())


def test_data_parallel_mid_epoch_resume_keeps_the_loss_sums_exact(tmp_path: Path) -> None:
    """Under DDP each process's loss sum restarts at a resume and is added to the saved totals: summed in
    float32, that split moved a resumed epoch's train_loss in its last digits (0.36130690 against
    0.36130691 in an audit's 2-process LeNet-5 run; 0.0016348822 against 0.0016348818 here). The engine's
    data-parallel path with one process shows it; the sums are float64 now, exact for float32 addends."""
    cfg = compose_train([*TINY, "dataset.train_subset=512", "batch_size=16", "epochs=2", "method=float"])
    status, ref = _fit(cfg, tmp_path / "ref.pt", parallel=OneOfOne())
    assert status == "completed"
    ckpt = tmp_path / "run.pt"
    status, _ = _fit(cfg, ckpt, stop_after=46, parallel=OneOfOne())  # 32 batches an epoch: inside epoch 2
    assert status == "interrupted" and checkpoint.load(ckpt)["progress"]["batch"] == 13
    status, resumed = _fit(cfg, ckpt, parallel=OneOfOne())
    assert status == "completed"
    assert exact(resumed.progress.history) == exact(ref.progress.history)


# ---- signals -------------------------------------------------------------------------------------------
def test_the_signal_handler_writes_no_log_line(caplog) -> None:
    """A handler that logs re-enters the log file when the signal lands mid-write (or a second signal
    mid-handler): a Ctrl-C under the parallel launcher once printed a "Logging error" traceback. The
    line is written when the block is left, after the checkpoint."""
    caplog.set_level("WARNING", logger="qexp")
    try:
        with preempt.stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            assert stop.is_set() and not caplog.records
        assert [r.getMessage() for r in caplog.records] == [f"received signal {int(signal.SIGUSR1)}: "
                                                           "checkpointed and stopped"]
    finally:
        preempt.reset()


def test_signals_stop_and_chain_to_a_previous_python_handler() -> None:
    """SIGUSR1/SIGTERM set the stop flag instead of killing; submitit's SIGUSR2 handler (here a stand-in)
    runs only after the block (the checkpoint) is done; a later job of the same process does not start."""
    calls: list[int] = []
    term_before = signal.getsignal(signal.SIGTERM)
    old = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        with preempt.stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert stop.is_set() and calls == []
        assert calls == [signal.SIGUSR2]
        assert preempt.requested()
        with preempt.stop_on_signals() as stop:
            assert stop.is_set()  # the request outlives the run that received it
        preempt.reset()
        with preempt.stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            assert stop.is_set()
        assert signal.getsignal(signal.SIGTERM) is term_before  # handlers restored on leaving
    finally:
        signal.signal(signal.SIGUSR2, old)
        preempt.reset()


def _train_then_sigterm(out: Path, extra: list[str]) -> subprocess.CompletedProcess:
    """Start `qexp train`, wait for epoch 1's metrics, send SIGTERM (inside epoch 2), wait for the exit."""
    cmd = [sys.executable, "-m", "qexp.cli", "train", f"out_root={out}", *SLOW_EPOCHS, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        runs = find_runs(out)
        if runs and read_metrics(runs[0]).get("epochs_done", 0) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses (module fixtures run before `one_thread`)
    try:
        rec = train(compose_train(SLOW_EPOCHS), tmp_path_factory.mktemp("reference"))
    finally:
        torch.set_num_threads(before)
    assert rec is not None and rec["status"] == "completed"
    return rec


@pytest.mark.slow
def test_sigterm_under_ddp_checkpoints_and_rerun_matches_uninterrupted(tmp_path: Path, uninterrupted: dict) -> None:
    """Two DDP processes (the parent forwards SIGTERM to both): SIGTERM once epoch 1's metrics.json is
    written (a known point, 5 epochs before the end): clean exit (0), status `interrupted`, a loadable
    checkpoint; the same command again finishes with the uninterrupted one-process run's per-epoch numbers
    to float rounding (the DDP gradient is a mean of two half-batch means). SIGTERM in one process, resumed
    bit for bit: the kill matrix's ``sigterm`` kill point (tests/test_kill_matrix.py)."""
    extra = ["trainer.devices=2"]
    ref = uninterrupted

    proc = _train_then_sigterm(tmp_path / "out", extra)
    assert proc.returncode == 0, proc.stdout
    (run,) = find_runs(tmp_path / "out")
    assert read_metrics(run)["status"] == "interrupted", proc.stdout
    state = checkpoint.load(run / "checkpoint.pt")  # weights_only: loadable and safe
    assert 1 <= state["progress"]["epoch"] < 6 and state["progress"]["step"] >= 128

    run_qexp(["train", f"out_root={tmp_path / 'out'}", *SLOW_EPOCHS, *extra])
    m = read_metrics(run)
    assert m["status"] == "completed" and m["epochs_done"] == 6
    assert m["ranks_consistent"] is True
    for got, want in zip(exact(m["history"]), exact(ref["history"])):
        assert got == pytest.approx(want, rel=1e-3, abs=0.5)


# ---- sweeps --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_joblib_sweep_tolerates_a_failure_and_rerun_skips_finished(tmp_path: Path) -> None:
    """hydra/launcher=local_parallel (joblib, 2 at once): two runs complete; the impossible one (a subset
    larger than the dataset) is rejected before any folder exists and named in the sweep's summary, and
    the sweep exits 1; the same command again retrains nothing (and still exits 1)."""
    args = ["train", "--multirun", "hydra/launcher=local_parallel", f"out_root={tmp_path}", *TINY,
            "dataset.train_subset=128,256,99999"]
    first = run_qexp(args, check=False)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "sweep finished: 3 jobs: 2 completed, 0 skipped, 1 failed, 0 diverged" in first.stdout
    failed = [ln for ln in first.stdout.splitlines() if ln.startswith("  failed  ")]
    assert len(failed) == 1 and "(no run folder)" in failed[0] and "train_subset=99999" in failed[0]
    assert "dataset.train_subset must be in 1..512" in failed[0]
    done = find_runs(tmp_path)
    assert len(done) == 2 and all(read_metrics(r)["status"] == "completed" for r in done)
    stamps = {r: (r / "checkpoint.pt").stat().st_mtime_ns for r in done}

    again = run_qexp(args, check=False)
    assert again.returncode == 1 and again.stdout.count("not retrained") == 2, again.stdout
    for r in done:
        assert (r / "checkpoint.pt").stat().st_mtime_ns == stamps[r]
        assert read_metrics(r)["status"] == "completed"


@pytest.mark.slow
def test_parallel_duplicate_jobs_train_once(tmp_path: Path) -> None:
    """`method=float bits=1,2` under the parallel launcher: two jobs, one run (float ignores bits). They
    start together; one trains, the other waits for the folder's lock and then skips the finished run:
    one folder, one TensorBoard file, exit 0."""
    proc = run_qexp(["train", "--multirun", "hydra/launcher=local_parallel", f"out_root={tmp_path}", *TINY,
                     "dataset.train_subset=128", "method=float", "bits=1,2"])
    assert "sweep finished: 2 jobs: 1 completed, 1 skipped, 0 failed, 0 diverged" in proc.stdout, proc.stdout
    (run,) = find_runs(tmp_path)
    assert read_metrics(run)["status"] == "completed" and len(list(run.glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_submitit_local_sweep_records_divergence_and_goes_on(tmp_path: Path) -> None:
    """hydra/launcher=submitit_local (the SLURM code path, run locally): lr=1e-3 completes; lr=1e30 makes
    the loss infinite, and that run is `diverged` (with its reason) while the sweep finishes."""
    run_qexp(["train", "--multirun", "hydra/launcher=submitit_local", f"out_root={tmp_path}", *TINY,
              "dataset.train_subset=256", "lr=1e-3,1e30"])
    runs = {read_metrics(r)["lr"]: read_metrics(r) for r in find_runs(tmp_path)}
    assert runs[1e-3]["status"] == "completed" and runs[1e-3]["epochs_done"] == 1
    assert runs[1e30]["status"] == "diverged"
    assert "NaN or infinite" in runs[1e30]["error"]
    assert list((tmp_path / "runs" / ".submitit").iterdir())  # submitit's own job folders
