"""Execution knobs that must not change what a run computes: threads per job in a local parallel sweep,
``device=cuda:N``, the fused SR kernel switch, ``compile``, ``precision``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import find_runs, read_metrics, run_qexp

from qexp.errors import QexpError
from qexp.run import resources
from qexp.run.train import resolve_device

TINY = ["dataset=synthetic", "model=mlp", "model.width=32", "model.depth=2", "dataset.train_samples=128",
        "dataset.test_samples=64", "eval_batch_size=64", "progress=false"]
JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


# ---- threads: jobs x threads = cores ----------------------------------------------------------------
def test_threads_fill_the_cores_without_oversubscribing():
    assert resources.parallel_jobs(None, 8) is None  # not a local parallel sweep
    assert resources.parallel_jobs({"_target_": "hydra._internal.BasicLauncher"}, 8) is None
    assert resources.parallel_jobs({"_target_": JOBLIB, "n_jobs": -1}, 8) == 8  # joblib: every core
    assert resources.parallel_jobs({"_target_": JOBLIB, "n_jobs": -2}, 8) == 7
    assert resources.parallel_jobs({"_target_": JOBLIB, "n_jobs": 3}, 8) == 3
    assert resources.job_threads(None, None, 8) is None  # one run at a time: torch's default (all cores)
    assert resources.job_threads(None, 8, 8) == 1
    assert resources.job_threads(None, 2, 8) == 4
    assert resources.job_threads(None, 3, 8) == 2  # 3 x 2 <= 8: never more threads than cores
    assert resources.job_threads(None, 16, 8) == 1
    assert resources.job_threads(3, 2, 8) == 3  # threads=N wins
    with pytest.raises(QexpError, match="threads must be >= 1"):
        resources.job_threads(0, None, 8)


def test_bad_threads_is_one_line_and_exit_2(tmp_path: Path):
    p = run_qexp(["train", f"out_root={tmp_path}", *TINY, "threads=0"], check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["error: threads must be >= 1 (or null for automatic), got 0"]


@pytest.mark.slow
def test_local_parallel_sweep_sets_threads_per_job(tmp_path: Path):
    """Two jobs at once: each sets cores // 2 threads (logged in its train.log) and both complete."""
    run_qexp(["train", "--multirun", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2",
              f"out_root={tmp_path}", *TINY, "seed=0,1"])
    runs = find_runs(tmp_path)
    assert len(runs) == 2 and all(read_metrics(r)["status"] == "completed" for r in runs)
    expected = max(1, resources.cores() // 2)
    for r in runs:
        assert f"torch threads: {expected} (" in (r / "train.log").read_text()


# ---- device=cuda:N ----------------------------------------------------------------------------------
def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cpu:0", "cuda:x", "cuda:-1", "cuda:"):
        with pytest.raises(QexpError, match="device must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)


def test_cuda_index_that_does_not_exist_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(QexpError, match=r"device=cuda:2: there is no GPU 2; 2 visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_cuda_index_without_any_gpu_is_exit_2(tmp_path: Path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present here")
    p = run_qexp(["train", f"out_root={tmp_path}", *TINY, "device=cuda:1"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: device=cuda:1 was asked for but no CUDA device is available; use device=auto or cpu"]


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a GPU")
def test_cuda_index_selects_that_gpu():
    last = torch.cuda.device_count() - 1
    assert resolve_device(f"cuda:{last}") == torch.device("cuda", last)
    assert torch.cuda.current_device() == last
