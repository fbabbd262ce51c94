"""Hyper-parameter search with the Optuna sweeper: validation objective only, refusals, the parallel
launcher, reruns that skip finished trials, and the trials table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qexp.run import tune
from tests.conftest import find_runs, read_metrics, run_qexp

# the tune_bc_mnist preset on synthetic data and an MLP: seconds per trial
SMALL = ["dataset=synthetic", "dataset.val_size=128", "model=mlp", "epochs=1", "progress=false"]


def search(out: Path, *extra: str, check: bool = True):  # type: ignore[no-untyped-def]
    return run_qexp(["train", "--multirun", "+experiment=tune_bc_mnist", *SMALL, f"out_root={out}", *extra],
                    env={"OMP_NUM_THREADS": "1"}, check=check)


@pytest.mark.parametrize("override,message", [
    ("objective=test_error", "objective=test_error is a test metric: hyper-parameters are tuned on validation"),
    ("objective=best_test_error", "objective=best_test_error is a test metric"),
    ("dataset.val_size=0", "an Optuna search needs a validation split: set dataset.val_size=N"),
    ("hydra.sweeper.n_trials=0", "hydra.sweeper.n_trials=0: a search needs at least one trial"),
    ("hydra/launcher=local_parallel hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs=0 runs nothing"),
])
def test_search_refuses_test_metrics_and_missing_validation(tmp_path: Path, override: str, message: str) -> None:
    proc = search(tmp_path / "out", *override.split(), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"] and message in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any job or run folder


def test_objective_is_the_recorded_validation_error() -> None:
    rec = {"status": "completed", "best_val_error": 1.5, "val_error": 2.0, "test_error": 0.1}
    assert tune.objective(rec, "best_val_error") == 1.5 and tune.objective(rec, "val_error") == 2.0
    assert tune.objective({**rec, "status": "diverged"}, "val_error") == tune.DIVERGED_OBJECTIVE
    assert tune.objective({"status": "failed"}, "val_error") is None and tune.objective(None, "val_error") is None


@pytest.mark.slow
def test_parallel_search_reruns_skip_finished_trials_and_table_shows_them(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="an Optuna study (a dependency of qexp; the GPU machine lacks it)")
    out = tmp_path / "out"
    first = search(out, "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=2")
    study = out / "tune_bc_mnist"
    runs = find_runs(study)
    assert len(runs) == 2, first.stdout + first.stderr
    recs = [read_metrics(r) for r in runs]
    assert all(r["status"] == "completed" and "best_val_error" in r and r["best_by"] == "val_error" for r in recs)
    best = yaml.safe_load((study / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(r["best_val_error"] for r in recs)  # the objective is validation error
    assert set(best["best_params"]) == {"lr", "method.lr_scale"}
    stamps = {r: (r / "metrics.json").stat().st_mtime_ns for r in runs}

    again = search(out, "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_trials=2")
    assert find_runs(study) == runs  # the same proposals ...
    assert {r: (r / "metrics.json").stat().st_mtime_ns for r in runs} == stamps  # ... none retrained
    assert again.stdout.count("not retrained") == 2

    table = run_qexp(["table", str(study), "--format", "md"]).stdout
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| lr | method.lr_scale | best_val_error |")
    assert len(lines) == 1 + 2 and "**" in lines[1]  # the best trial first, in bold
    assert f"best configuration: lr={best['best_params']['lr']}" in table


@pytest.mark.slow
def test_an_unseeded_search_reruns_the_same_trials(tmp_path: Path) -> None:
    """A search of one's own (no preset) with the plugin's unseeded sampler: the sampler takes the run's
    seed, so a rerun proposes the same trials and retrains none (it used to draw new ones)."""
    pytest.importorskip("optuna", reason="an Optuna study (a dependency of qexp; the GPU machine lacks it)")
    out = tmp_path / "out"
    args = ["train", "--multirun", "hydra/sweeper=optuna", "lr=interval(0.0001, 0.03)",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", *SMALL, f"out_root={out}", "seed=3"]
    first = run_qexp(args, env={"OMP_NUM_THREADS": "1"})
    runs = find_runs(out)
    assert len(runs) == 2, first.stdout + first.stderr
    again = run_qexp(args, env={"OMP_NUM_THREADS": "1"})
    assert find_runs(out) == runs and again.stdout.count("not retrained") == 2, again.stdout + again.stderr
    assert "Optuna sampler seed 3 (the run's seed" in first.stdout + first.stderr


def test_a_slurm_launcher_without_slurm_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's "Could not detect srun" traceback came after the sweep started; the launcher is now
    refused before, in the launching process (InputCheck), where srun is not on the PATH."""
    from omegaconf import OmegaConf

    from qexp.errors import QexpError
    from qexp.run import sweep

    cfg = OmegaConf.create({"hydra": {"launcher": {
        "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}}})
    monkeypatch.setattr(sweep.shutil, "which", lambda name: None)
    with pytest.raises(QexpError, match="the SLURM launcher submits to a SLURM cluster, and this machine has no srun"):
        sweep.check_launcher(cfg)
    monkeypatch.setattr(sweep.shutil, "which", lambda name: f"/usr/bin/{name}")
    sweep.check_launcher(cfg)  # on a cluster: launched
