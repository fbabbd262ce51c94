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


def test_medium_budget_only_where_an_entry_has_one(capsys, monkeypatch) -> None:
    """``--budget medium`` runs the CIFAR-10 entry's medium overrides; an entry without that budget is
    refused (one line, exit 2) before anything runs."""
    monkeypatch.syspath_prepend(REPO / "scripts")
    import reproduce

    entry = reproduce.DATASET_ENTRIES["cifar10_jpeg"]["li2017"]
    args = reproduce.budget_args(entry.sweeps[0], "medium", ["seed=0"])
    assert set(reproduce.MEDIUM_CIFAR) <= set(args) and "seed=0" in args and "seed=0,1,2" not in args
    with pytest.raises(SystemExit) as e:
        reproduce.main(["li2017", "--budget", "medium"])
    assert e.value.code == 2
    assert "has no medium budget" in capsys.readouterr().err
