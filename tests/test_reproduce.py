"""scripts/reproduce.py end to end on a reduced budget: the Li et al. entry's verdict keeps its direction."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, find_runs


@pytest.mark.slow
def test_li2017_entry_end_to_end_keeps_its_direction(tmp_path, data_root, one_thread) -> None:
    """float, BC and R at 1 bit on 10,000 MNIST images, 1 epoch, seed 0 (about 1.5 min on one core):
    at the preset's grid scale (per layer, s >> lr) R's rounded updates barely move its weights (flip
    fraction below BC's) and R ends far behind float and BC, the direction of the docs' verdict; the
    entry's table, flip table (per epoch) and figure are written."""
    docs = tmp_path / "docs"
    cmd = [sys.executable, str(REPO / "scripts" / "reproduce.py"), "li2017", "--out-root", str(tmp_path / "out"),
           "--docs", str(docs), "--jobs", "2", "--set", "seed=0", "dataset=mnist", "method=float,bc_li,r",
           "dataset.train_subset=10000", "epochs=1"]
    subprocess.run(cmd, check=True, env={**__import__("os").environ, "QEXP_DATA": str(data_root)},
                   capture_output=True, timeout=900)
    runs = {}
    for d in find_runs(tmp_path / "out"):
        rec = json.loads((d / "metrics.json").read_text())
        assert rec["status"] == "completed"
        runs[rec["method"]] = rec
    assert set(runs) == {"float", "bc", "r"}
    assert runs["r"]["mean_flip_frac"] < runs["bc"]["mean_flip_frac"]  # R's updates round away
    assert runs["float"]["test_error"] < runs["r"]["test_error"]
    assert runs["bc"]["test_error"] < runs["r"]["test_error"]
    md = (docs / "li2017-small.md").read_text()
    assert "mean_flip_frac" in md and "flip fraction per epoch" in md and "| float |" in md.replace("**", "")
    assert (docs / "li2017-small.png").stat().st_size > 1000


@pytest.fixture
def reproduce(monkeypatch):
    """scripts/reproduce.py as a module (the scripts folder is not a package)."""
    monkeypatch.syspath_prepend(REPO / "scripts")
    import reproduce

    return reproduce


def test_medium_budget_only_where_an_entry_has_one(capsys, reproduce) -> None:
    """``--budget medium`` runs the CIFAR-10 entry's medium overrides; an entry without that budget is
    refused (one line, exit 2) before anything runs."""
    entry = reproduce.DATASET_ENTRIES["cifar10_jpeg"]["li2017"]
    args = reproduce.budget_args(entry.sweeps[0], "medium", ["seed=0"])
    assert set(reproduce.MEDIUM_CIFAR) <= set(args) and "seed=0" in args and "seed=0,1,2" not in args
    with pytest.raises(SystemExit) as e:
        reproduce.main(["li2017", "--budget", "medium"])
    assert e.value.code == 2
    assert "has no medium budget" in capsys.readouterr().err



#: training images of each dataset the entries run on (the split check below needs the full size)
TRAIN_IMAGES = {"mnist": 60000, "fashion_mnist": 60000, "cifar10_jpeg": 50000}


def test_every_entry_and_budget_composes_to_a_possible_split(reproduce) -> None:
    """Every job of every entry, at every budget it has (seed 0; each comma list expanded), composes and
    its training split is possible: bc2015's small budget once asked for 10,000 validation images out of
    a 10,000-image subset, so `reproduce.py bc2015` trained nothing."""
    import itertools

    from hydra import compose, initialize_config_module

    from qexp.run.config import register

    register()
    checked = 0
    with initialize_config_module(config_module="qexp.configs", version_base="1.3"):
        for entries in reproduce.DATASET_ENTRIES.values():
            for key, entry in entries.items():
                sweeps = [*entry.sweeps, *entry.after]
                jobs = [reproduce.budget_args(sw, budget, ["seed=0"]) for budget in ("small", "medium", "paper")
                        if all(getattr(sw, budget) is not None for sw in sweeps) for sw in sweeps]
                if entry.tune is not None:
                    jobs.append([*entry.tune.args, f"{entry.tune.key}={entry.tune.values[0]}"])
                for args in jobs:
                    lists = [[f"{a.split('=', 1)[0]}={v}" for v in a.split("=", 1)[1].split(",")] for a in args]
                    for job in itertools.product(*lists):
                        data = compose("train", overrides=list(job)).dataset
                        n = TRAIN_IMAGES[data.name]
                        subset = data.get("train_subset") or n
                        assert 0 < subset <= n and 0 <= (data.get("val_size") or 0) < subset, (key, job)
                        checked += 1
    assert checked > 50


def test_an_interrupted_sweep_stops_the_entry(tmp_path, monkeypatch, capsys, reproduce) -> None:
    """Ctrl-C in a sweep (qexp train exits 130; 128 + N after signal N) ends the entry there with that
    status: no next sweep, no report."""
    calls = []
    monkeypatch.setattr(reproduce, "qexp", lambda *args, check=True: calls.append(args) or 130)
    with pytest.raises(SystemExit) as e:
        reproduce.main(["li2017", "--out-root", str(tmp_path / "out"), "--docs", str(tmp_path / "docs")])
    assert e.value.code == 130 and len(calls) == 1 and calls[0][0] == "train"
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "docs").exists()
