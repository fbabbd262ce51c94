"""The kill matrix: every method option, killed (SIGKILL) mid-epoch, inside a checkpoint write, during
evaluation and between epochs, or stopped with Ctrl-C or a scheduler's SIGTERM; the same command again
must end with exactly the numbers of metrics.json and the checkpoint (weights, optimizer, method state) of
an uninterrupted run.

Small: a 2x32 MLP on 128 synthetic images, batch 16 (8 steps an epoch), 3 epochs, one thread; every
launch is a forked child of one driver process (tests/kill_driver.py), so a real SIGKILL ends it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_drivers

TINY = ["dataset=synthetic", "model=mlp", "model.width=32", "model.depth=2", "model.bn=false",
        "dataset.train_subset=128", "batch_size=16", "eval_batch_size=256", "epochs=3", "progress=false",
        "device=cpu"]  # bit-exact numbers: CPU (device=auto would pick a GPU)
#: per method: what it needs on the tiny MLP (8 optimizer steps an epoch everywhere)
METHODS = {
    "float": [],
    "bc": ["method=bc"],
    "sr": ["method=sr", "bits=4"],
    "r": ["method=r", "bits=4"],
    "big_sr": ["method=big_sr", "dataset.train_subset=512", "batch_size=8"],  # 8 x 8 images a step
    "ste": ["method=ste"],
    "wage": ["method=wage", "model.bias=false", "lr=1"],
    "learned": ["method=learned"],
    "ptq": ["method=ptq", "method.activations=true"],
}
#: kill points (see tests/kill_driver.py): inside epoch 2; Ctrl-C inside epoch 2; writing the 2nd
#: checkpoint; evaluating after epoch 2; right after epoch 1's metrics.json; SIGTERM inside epoch 2
KINDS = ["step:11", "sigint:11", "ckpt:2", "eval:16", "metrics:2", "sigterm:11"]
#: how the first launch ends: Ctrl-C exits 130 and SIGTERM 0 (both after a checkpoint: `interrupted`);
#: SIGKILL leaves the run `running`
FIRST = {"sigint": (["exit", 130], "interrupted"), "sigterm": (["exit", 0], "interrupted")}
#: the fast part: every method once, every kill point at least once (the diagonal of the matrix)
DIAGONAL = {m: [KINDS[i % len(KINDS)]] for i, m in enumerate(METHODS)}


def run_matrix(tmp_path: Path, plan: dict[str, list[str]]) -> dict:
    """Run the plan in one driver per CPU core (at most 2; methods split between them). The kill points
    are counted steps and writes, not times, so running side by side changes nothing but the wall time."""
    parts = max(1, min(2, os.cpu_count() or 1))
    groups = [dict(list(plan.items())[i::parts]) for i in range(parts)]
    specs = []
    for i, group in enumerate(g for g in groups if g):
        out = tmp_path / f"driver{i}"
        out.mkdir()
        spec = {"out": str(out), "cases": {m: {"overrides": [*TINY, *METHODS[m]], "scenarios": sc}
                                           for m, sc in group.items()}}
        (out / "spec.json").write_text(json.dumps(spec))
        specs.append(out / "spec.json")
    report = run_drivers(specs, timeout=1200)
    assert set(report) == set(plan)
    return report


def check(report: dict) -> None:
    """Every (method, scenario) checked; one assertion listing all that failed."""
    bad = []
    for method, cases in report.items():
        if cases["ref"] != ["exit", 0] or not cases["control"]:  # control: a one-ulp weight change is seen
            bad.append((method, "ref/control", cases["ref"], cases["control"]))
        for sc, r in cases.items():
            if sc in ("ref", "control"):
                continue
            first = FIRST.get(sc.split(":")[0], (["signal", 9], "running"))
            if (r["first"], r["status_after_first"]) != first or r["second"] != ["exit", 0] or r["diffs"] \
                    or r["leftovers"]:  # leftovers: a lock or temporary file left behind
                bad.append((method, sc, r))
    assert not bad, "\n".join(str(b)[:2000] for b in bad)


def test_kill_matrix_every_method_and_every_kill_point(tmp_path: Path) -> None:
    check(run_matrix(tmp_path, DIAGONAL))


@pytest.mark.slow
def test_kill_matrix_full(tmp_path: Path) -> None:
    """The rest of the matrix: every (method, kill point) pair not in the diagonal."""
    check(run_matrix(tmp_path, {m: [k for k in KINDS if k not in DIAGONAL[m]] for m in METHODS}))
