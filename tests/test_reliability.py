"""Trustworthy run folders: file modes follow the umask, one writer per folder (the lock), dead runs are
shown as dead, unreadable checkpoints and bad report options are one line (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qexp.cli import main as qexp
from qexp.errors import QexpError
from qexp.jsonio import write_json, write_torch
from qexp.report import results
from qexp.run import checkpoint, lock
from tests.test_results import make_run


# ---- file modes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """metrics.json-style JSON and checkpoints get 0666 & ~umask, as a plain open() would give; a
    rewrite of an existing file too (the temporary file, not the old file, sets the mode)."""
    old = os.umask(umask)
    try:
        write_json(tmp_path / "metrics.json", {"a": 1})
        write_json(tmp_path / "metrics.json", {"a": 2})
        checkpoint.save(tmp_path / "checkpoint.pt", {"model": {"w": torch.zeros(2)}})
        write_torch(tmp_path / "x.pt", {"w": torch.ones(1)})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("metrics.json", "checkpoint.pt", "x.pt", "plain"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# ---- checkpoints ---------------------------------------------------------------------------------
def test_empty_or_garbage_checkpoint_is_one_line(tmp_path: Path) -> None:
    for content in (b"", b"\x00garbage", b"PK\x03\x04"):
        path = tmp_path / "checkpoint.pt"
        path.write_bytes(content)
        with pytest.raises(QexpError) as e:
            checkpoint.load(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "resume=false" in msg
        if not content:
            assert "empty (0 bytes)" in msg


def test_a_checkpoint_holding_pickled_objects_is_not_unpickled_nor_advised_to_be(tmp_path: Path) -> None:
    """torch's own message advised reloading with weights_only=False, which would run the file's code."""
    import fractions

    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(QexpError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert "\n" not in msg and "weights_only" not in msg and "does not unpickle" in msg, msg


# ---- the lock ------------------------------------------------------------------------------------
HOLD = ("import sys, time; from qexp.run import lock; l = lock.RunLock(sys.argv[1]); l.acquire(); "
        "print('held', flush=True); time.sleep(600)")


def _holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_is_exclusive_names_its_holder_and_is_reclaimed_after_kill9(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(lock.LockBusy) as e:
            lock.RunLock(tmp_path).acquire()
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(e.value) and "\n" not in str(e.value)
        assert lock.run_alive(tmp_path) is True
    finally:
        holder.kill()
        holder.wait()
    assert lock.run_alive(tmp_path) is False  # same host: the pid is gone
    mine = lock.RunLock(tmp_path)
    mine.acquire()  # reclaimed at once, without waiting for the heartbeat to age
    assert json.loads((tmp_path / lock.LOCK).read_text())["pid"] == os.getpid()
    mine.release()
    assert not (tmp_path / lock.LOCK).exists()


def test_lock_of_another_host_is_reclaimed_only_when_its_heartbeat_is_stale(tmp_path: Path) -> None:
    path = tmp_path / lock.LOCK
    path.write_text(json.dumps({"pid": 1, "host": "node-that-died", "started": time.time(), "token": "t"}))
    with pytest.raises(lock.LockBusy, match="node-that-died"):
        lock.RunLock(tmp_path).acquire()
    old = time.time() - lock.STALE_S - 5
    os.utime(path, (old, old))
    assert lock.run_alive(tmp_path) is False
    mine = lock.RunLock(tmp_path)
    mine.acquire()
    mine.release()


def test_lock_wait_waits_for_the_holder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock, "POLL_S", 0.05)
    holder = _holder(tmp_path)
    seen: list[lock.Holder] = []
    t0 = time.time()
    try:
        import threading

        threading.Timer(0.5, holder.kill).start()
        mine = lock.RunLock(tmp_path)
        mine.acquire(wait=True, on_wait=seen.append)
    finally:
        holder.kill()
        holder.wait()
    assert time.time() - t0 >= 0.4 and [h.pid for h in seen] == [holder.pid]
    mine.release()


def test_heartbeat_refreshes_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
    mine = lock.RunLock(tmp_path)
    mine.acquire()
    try:
        old = time.time() - 1000
        os.utime(tmp_path / lock.LOCK, (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / lock.LOCK).stat().st_mtime < 5
    finally:
        mine.release()


# ---- dead runs in qexp runs / table --------------------------------------------------------------
def test_running_run_whose_process_died_is_dead(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A `running` record whose lock holder is gone (kill -9), or whose folder has no lock and has not
    been written for longer than lock.STALE_S, reads back as `dead`; a live holder keeps `running`."""
    live = make_run(tmp_path, "float", 32, 0, [5.0], status="running", epochs=3)
    killed = make_run(tmp_path, "float", 32, 1, [5.0], status="running", epochs=3)
    orphan = make_run(tmp_path, "float", 32, 2, [5.0], status="running", epochs=3)
    holders = [_holder(live), _holder(killed)]
    try:
        holders[1].kill()
        holders[1].wait()
        old = time.time() - lock.STALE_S - 5
        os.utime(orphan / "metrics.json", (old, old))
        status = {Path(r["run_dir"]).name: r["status"] for r in results.collect([tmp_path]).to_dict("records")}
        assert status == {"seed0": "running", "seed1": "dead", "seed2": "dead"}
        assert qexp(["runs", str(tmp_path), "--status", "dead"]) == 0
        out = capsys.readouterr().out
        assert out.count("\ndead ") == 2 and "is gone" in out and "3 runs: 1 running, 2 dead" in out
        assert qexp(["table", str(tmp_path)]) == 0
        assert "dead (2)" in capsys.readouterr().out
    finally:
        holders[0].kill()
        holders[0].wait()


def test_runs_rejects_an_unknown_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_run(tmp_path, "float", 32, 0, [5.0])
    assert qexp(["runs", str(tmp_path), "--status", "bogus,failed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus" in err and "completed" in err


def test_eval_integer_refuses_a_non_wage_run_before_evaluating(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("method:\n  name: float\n")  # no checkpoint: never loaded
    assert qexp(["eval", str(run), "--integer"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method=wage" in err and "method=float" in err


# ---- the lock and Ctrl-C through `qexp train` ------------------------------------------------------
def _wait_for(cond, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_second_launch_is_refused_killed_holder_is_reclaimed_and_ctrl_c_exits_130(
        tmp_path: Path, one_thread: None) -> None:
    """Two launches of one config: the second exits 75 naming the holder's pid and host, and trains
    nothing. After the holder is SIGKILLed (mid-run, its lock left behind), a new launch takes the lock
    over and resumes from the checkpoint; Ctrl-C stops it: one line, exit 130, status `interrupted`,
    no traceback, lock released (that a resumed run ends bit-identical is the kill matrix's job).
    200 epochs: the holder must still be training when the second launch arrives; it never finishes."""
    from tests.conftest import find_runs, read_metrics, run_qexp

    args = ["train", f"out_root={tmp_path}", "dataset=synthetic", "model=mlp", "model.width=32",
            "model.depth=2", "model.bn=false", "dataset.train_samples=2048", "batch_size=16", "epochs=200",
            "progress=false"]
    cmd = [sys.executable, "-m", "qexp.cli", *args]

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = start()
    _wait_for(lambda: find_runs(tmp_path) and read_metrics(find_runs(tmp_path)[0]).get("epochs_done", 0) >= 1)
    (run,) = find_runs(tmp_path)
    second = run_qexp(args, check=False)
    assert second.returncode == 75, second.stderr
    err = second.stderr.strip()
    assert len(err.splitlines()) == 1 and f"pid {first.pid} on {socket.gethostname()}" in err
    assert len(list(run.glob("events.out.tfevents.*"))) == 1  # the refused launch wrote nothing

    first.kill()
    first.wait()
    third = start()
    _wait_for(lambda: "resuming" in (run / "train.log").read_text())
    assert json.loads((run / lock.LOCK).read_text())["pid"] == third.pid
    third.send_signal(signal.SIGINT)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 130, out + err
    assert "Traceback" not in out + err and err.strip().splitlines()[-1].startswith("interrupted (Ctrl-C)")
    assert read_metrics(run)["status"] == "interrupted" and not (run / lock.LOCK).exists()
    assert checkpoint.load(run / "checkpoint.pt")["progress"]["step"] >= 128  # epoch 1 kept


def test_ptq_eval_prints_its_results_before_failing_to_write(tmp_path: Path, one_thread: None,
                                                             capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`qexp eval --ptq-bits` on a run folder it cannot write into (root ignores file modes, so the write
    itself is made to fail as on a read-only folder): the curve is printed first, then one error line."""
    from qexp.methods.ptq import curve
    from tests.conftest import find_runs, run_qexp

    run_qexp(["train", f"out_root={tmp_path}", "dataset=synthetic", "model=mlp", "model.width=32",
              "model.depth=1", "dataset.train_subset=64", "progress=false"])
    (run,) = find_runs(tmp_path)

    def read_only(*a: object, **k: object) -> None:
        raise PermissionError(13, "Permission denied", str(run / "ptq.json"))

    monkeypatch.setattr(curve, "write", read_only)
    assert qexp(["eval", str(run), "--ptq-bits", "8,4", "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert "post-training quantization of" in out and len([ln for ln in out.splitlines()
                                                           if ln.strip().startswith(("8 ", "4 "))]) == 2
    assert err.count("\n") == 1 and "results above were not saved" in err and "Permission denied" in err
    assert not (run / "ptq.json").exists()


def test_a_sweep_stopped_by_a_signal_exits_128_plus_it() -> None:
    """A sequential sweep stopped by SIGTERM (its running job checkpointed, the rest not started) exited 0,
    so ``qexp train --multirun ... && qexp table`` went on with jobs that never ran."""
    from qexp.run import sweep

    jobs = [{"outcome": "completed"}, {"outcome": "interrupted"}, {"outcome": "not started"}]
    assert sweep.summarize(jobs, stopped=signal.SIGTERM)[1] == 143
    assert sweep.summarize(jobs, stopped=signal.SIGINT)[1] == 130
    assert sweep.summarize(jobs[:1])[1] == 0
    assert sweep.summarize([*jobs, {"outcome": "failed"}], stopped=signal.SIGTERM)[1] == 1


@pytest.mark.parametrize("how", ["ctrl_c", "sigterm", "sequential_sigterm"])
def test_a_stop_under_the_parallel_launcher_checkpoints_and_summarises(tmp_path: Path, how: str) -> None:
    """hydra/launcher=local_parallel, 2 jobs at once, stopped once both train, by Ctrl-C from the terminal
    (SIGINT to the whole process group) or by SIGTERM to the parent alone (a scheduler, ``kill``): the
    sequential sweep's contract. Each running job checkpoints and is `interrupted`, the queued ones never
    start, the parent prints the summary (no traceback) and exits 128 + the signal (130, 143), and no
    .qexp-sweep/ is left behind. SIGTERM killed the parent and left its workers training as orphans.
    The sequential sweep itself, stopped by SIGTERM, exits 143 too (it exited 0 with 3 jobs never run)."""
    from tests.conftest import find_runs, read_metrics

    parallel = how != "sequential_sigterm"
    launcher = ["hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"] if parallel else []
    args = ["train", "--multirun", *launcher,
            f"out_root={tmp_path}", "dataset=synthetic", "model=mlp", "model.width=32", "model.depth=2",
            "model.bn=false", "dataset.train_samples=2048", "batch_size=16", "epochs=200", "progress=false",
            "threads=1", "seed=0,1,2,3"]
    proc = subprocess.Popen([sys.executable, "-m", "qexp.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def training() -> list[Path]:
        out = []
        for r in find_runs(tmp_path):
            try:
                if read_metrics(r).get("epochs_done", 0) >= 1:
                    out.append(r)
            except ValueError:
                pass
        return out

    try:
        _wait_for(lambda: len(training()) == (2 if parallel else 1), timeout=300)
    finally:
        if how == "ctrl_c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        else:
            proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == (130 if how == "ctrl_c" else 143), out + err
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err
    stopped = "2 interrupted, 2 not started" if parallel else "1 interrupted, 3 not started"
    assert f"sweep finished: 4 jobs: 0 completed, 0 skipped, 0 failed, 0 diverged, {stopped}" in out, out
    runs = find_runs(tmp_path)
    assert len(runs) == (2 if parallel else 1)
    for r in runs:
        assert read_metrics(r)["status"] == "interrupted" and (r / "checkpoint.pt").is_file()
        assert checkpoint.load(r / "checkpoint.pt")["progress"]["step"] >= 128
        assert not (r / lock.LOCK).exists()
    assert not list(tmp_path.rglob(".qexp-sweep"))
