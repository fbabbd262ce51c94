"""qexp's execution options on a GPU (marked ``cuda``: skipped where no CUDA device is visible; apart
from tests/test_cuda.py so that ``pytest -n`` runs the two files in different workers):

- ``precision=16-mixed`` / ``bf16-mixed`` and ``compile=true`` train;
- ``cuda_graphs=true`` trains float and the methods of the GPU step goal with every compiled graph
  recorded as a CUDA graph.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import find_runs, read_metrics, run_qexp
from tests.test_as_typed import ABOVE_CONSTANT, COMMAND

pytestmark = pytest.mark.cuda


def test_precisions_and_compile_train_on_cuda(tmp_path: Path, data_root: Path) -> None:
    """16-bit math (float16 with a loss scaler, bfloat16) and torch.compile (Triton) on the GPU: each run
    completes and learns (above what a constant answer scores; no floor was measured on a GPU)."""
    common = [*COMMAND, "device=cuda", f"data_root={data_root}"]
    run_qexp([*common, "method=float,bc,sr", "precision=16-mixed,bf16-mixed", f"out_root={tmp_path / 'amp'}"],
             timeout=900)
    run_qexp([*common, "method=float,bc,sr", "compile=true", f"out_root={tmp_path / 'compiled'}"], timeout=900)
    for name, expected in (("amp", 6), ("compiled", 3)):
        runs = [read_metrics(d) for d in find_runs(tmp_path / name)]
        assert len(runs) == expected
        for m in runs:
            assert m["status"] == "completed" and m["device"] == "cuda:0", m.get("error")
            assert m["test_acc"] >= ABOVE_CONSTANT, (name, m["method"], m["test_acc"])


def test_cuda_graphs_train_every_weight_and_activation_method(tmp_path: Path, data_root: Path) -> None:
    """``compile=true cuda_graphs=true``: LeNet-5 steps replayed as CUDA graphs for float and the methods
    of the GPU step goal (bc, sr, r, ste, lsq): every run completes and learns, and no compiled graph
    (training forward and backward, evaluation) ran without CUDA graphs."""
    run_qexp([*COMMAND, "device=cuda", f"data_root={data_root}", "method=float,bc,sr,r,ste,lsq", "compile=true",
              "cuda_graphs=true", "hydra/launcher=local_parallel", f"out_root={tmp_path}"], timeout=900)
    runs = [read_metrics(d) for d in find_runs(tmp_path)]
    assert len(runs) == 6
    for m in runs:
        assert m["status"] == "completed" and m["device"] == "cuda:0", m.get("error")
        assert m["cuda_graph_skips"] == 0, (m["method"], m["cuda_graph_skips"])
        if m["method"] != "r":  # R as typed does not learn on 2000 images (test_as_typed's FROZEN)
            assert m["test_acc"] >= ABOVE_CONSTANT, (m["method"], m["test_acc"])
