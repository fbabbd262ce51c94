"""best.pt by validation error, early stopping (patience), ``qexp eval --best``, the whole-run ETA in the
per-epoch log line, and the optional TensorBoard step scalars and weight histograms. Synthetic data, MLP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qexp.cli import main as qexp
from qexp.run import record
from qexp.run.session import Trainer
from tests.conftest import find_runs, read_metrics, run_qexp

ENV = {"OMP_NUM_THREADS": "1"}
BASE = ["dataset=synthetic", "model=mlp", "progress=false", "device=cpu"]


def train(out: Path, *overrides: str, check: bool = True):  # type: ignore[no-untyped-def]
    return run_qexp(["train", *BASE, f"out_root={out}", *overrides], env=ENV, check=check)


def test_best_epoch_is_the_lowest_validation_error_or_the_last() -> None:
    hist = [{"epoch": 1, "val_error": 5.0, "test_error": 9.0}, {"epoch": 2, "val_error": 3.0, "test_error": 1.0},
            {"epoch": 3, "val_error": 3.0, "test_error": 0.5}, {"epoch": 4, "val_error": 4.0, "test_error": 0.1}]
    assert record.best_epoch(hist) == (2, "val_error")  # earliest on ties; never the test error's choice
    assert record.best_epoch([{k: v for k, v in h.items() if k != "val_error"} for h in hist]) == (4, "last")
    rec = record.build({}, "completed", [{**h, "train_loss": 0.1, "images_per_s": 1.0} for h in hist], 1.0)
    assert (rec["best_epoch"], rec["best_val_error"], rec["test_error_at_best"], rec["val_error"]) == (2, 3.0, 1.0, 4.0)


@pytest.mark.parametrize("patience,stop", [(1, {"epoch": 3, "best_epoch": 2, "patience": 1}), (2, {"epoch": 4,
                                            "best_epoch": 2, "patience": 2}), (3, None)])
def test_patience_counts_epochs_without_improvement(patience: int, stop: dict | None) -> None:
    t = Trainer.__new__(Trainer)  # only the stopping rule: no model needed
    t.patience, t.epochs = patience, 10
    vals = [5.0, 3.0, 3.0, 4.0]
    decisions = []
    for n in range(1, len(vals) + 1):
        t.progress = type("P", (), {"history": [{"epoch": i + 1, "val_error": v} for i, v in enumerate(vals[:n])],
                                    "epoch": n})()
        decisions.append(t._early_stop())
    first = next((d for d in decisions if d is not None), None)
    assert first == stop


def test_early_stopping_best_checkpoint_and_eval_best(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    proc = train(tmp_path, "dataset.val_size=128", "epochs=6", "patience=1", "lr=0.05")
    (run,) = find_runs(tmp_path)
    rec = read_metrics(run)
    hist = rec["history"]
    best = min(range(len(hist)), key=lambda i: (hist[i]["val_error"], i))
    assert rec["best_by"] == "val_error" and rec["best_epoch"] == best + 1
    assert rec["test_error_at_best"] == hist[best]["test_error"] and rec["best_val_error"] == hist[best]["val_error"]
    # patience=1: training ran until one epoch failed to improve on the best, then stopped (completed)
    assert rec["status"] == "completed" and rec["early_stop"] == {"epoch": len(hist), "best_epoch": best + 1,
                                                                   "patience": 1}
    assert rec["epochs_done"] == best + 2 < 6
    assert "stopped early (patience 1)" in proc.stdout
    assert torch.load(run / "best.pt", weights_only=True)["progress"]["epoch"] == best + 1
    assert qexp(["eval", str(run), "--best", "--device", "cpu"]) == 0
    got = capsys.readouterr().out
    assert f"(best.pt, epoch {best + 1}): test error {hist[best]['test_error']:.2f}%" in got
    assert qexp(["eval", str(run), "--device", "cpu"]) == 0
    assert f"test error {rec['test_error']:.2f}%" in capsys.readouterr().out
    # the per-epoch log line (stderr is not a terminal here) carries the validation error and the run's ETA
    lines = [ln for ln in (run / "train.log").read_text().splitlines() if " - epoch " in ln]
    assert len(lines) == rec["epochs_done"] and all("val_error" in ln and "run eta" in ln for ln in lines)


def test_patience_without_validation_is_refused(tmp_path: Path) -> None:
    bad = train(tmp_path, "epochs=2", "patience=2", check=False)
    assert bad.returncode == 2
    assert "patience=2 stops on the validation error, but the run has no validation split" in bad.stderr
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # refused before any run folder


def test_no_validation_best_is_last_and_tensorboard_extras(tmp_path: Path) -> None:
    """Without a validation split best.pt is the last epoch (and the log says so); TensorBoard gets the
    per-step scalars and the per-epoch histograms of the quantized (and shadow) weights."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, "method=bc", "epochs=1", "tensorboard.step_every=3", "tensorboard.histograms=true")
    (run,) = find_runs(tmp_path)
    rec = read_metrics(run)
    assert (rec["best_by"], rec["best_epoch"], rec["test_error_at_best"]) == ("last", 1, rec["test_error"])
    assert "val_error" not in rec and "best_val_error" not in rec
    assert "no validation split (dataset.val_size=0): best.pt holds the last epoch" in (run / "train.log").read_text()
    assert torch.load(run / "best.pt", weights_only=True)["progress"]["epoch"] == 1

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/train_step")]
    assert steps == list(range(3, 8 + 1, 3))  # 512 images / 64 per batch = 8 steps
    hists = acc.Tags()["histograms"]
    layers = ("net.1", "net.4", "net.7", "net.10")  # the MLP's linear layers; bc keeps a float shadow of each
    assert set(hists) == {f"{kind}/{n}" for kind in ("weights", "shadow") for n in layers}
    w = acc.Histograms("weights/net.4")[0].histogram_value  # the 1024x1024 hidden layer, after epoch 1
    assert acc.Histograms("weights/net.4")[0].step == 1 and w.num == 1024 * 1024
    assert w.min == -w.max and w.sum_squares == pytest.approx(w.num * w.max**2)  # 1 bit: only +-H
    s = acc.Histograms("shadow/net.4")[0].histogram_value
    assert s.sum_squares < w.sum_squares  # the float shadow lies inside [-H, H]
