"""The suite's fork server (tests/zygote.py) stands in for a fresh interpreter: a run forked from it writes
bit for bit what ``python -m qexp.cli`` started fresh writes, and a refused command answers alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import conftest
from tests.kill_driver import compare, run_folders

TINY = ["train", "dataset=synthetic", "model=mlp", "model.width=16", "model.depth=1", "dataset.train_subset=64",
        "batch_size=16", "epochs=2", "method=sr", "progress=false", "device=cpu"]


def _run(args: list[str], fork: bool, check: bool = True):
    return conftest.run_qexp(args, env={"QEXP_TESTS_FORK": "1" if fork else "0"}, check=check)


def _files(run: Path) -> list[str]:
    """A run folder's file names (TensorBoard's is named by its time and pid)."""
    return sorted("events" if p.name.startswith("events.out.tfevents.") else p.name for p in run.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="where CUDA is, every qexp process starts fresh")
def test_a_forked_run_writes_what_a_fresh_interpreter_writes(tmp_path: Path) -> None:
    forked = _run([*TINY, f"out_root={tmp_path}/fork"], fork=True)
    fresh = _run([*TINY, f"out_root={tmp_path}/fresh"], fork=False)
    assert forked.args[:3] == fresh.args[:3]
    (a,), (b,) = run_folders(tmp_path / "fork"), run_folders(tmp_path / "fresh")
    assert compare(a, b) == []
    assert _files(a) == _files(b)
    bad = [_run(["train", "method=bc", "bits=99", f"out_root={tmp_path}/bad"], fork, check=False)
           for fork in (True, False)]
    assert [(p.returncode, p.stdout, p.stderr) for p in bad] == [(2, "", bad[1].stderr)] * 2
    assert bad[1].stderr.count("\n") == 1 and not (tmp_path / "bad").exists()
