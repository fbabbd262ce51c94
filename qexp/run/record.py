"""metrics.json: the run's status and results, rewritten atomically after every epoch.

Keys may grow; none may silently change meaning (see README, "metrics.json").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qexp.jsonio import read_json, write_json

METRICS = "metrics.json"
#: a run's latest state (resume, init_from, eval and export read it)
CHECKPOINT = "checkpoint.pt"
#: the checkpoint of the epoch with the lowest validation error (runs with a validation split)
BEST = "best.pt"
#: the folder below out_root where runs keep their caches (decoded data, compiled kernels): never a run
CACHE_FOLDER = ".cache"
FINISHED = ("completed", "diverged")


def read(run_dir: Path) -> dict[str, Any] | None:
    """A run's metrics.json, or None when absent or unreadable (not JSON, or JSON that is not an object:
    a hand-edited ``[1, 2]`` is no record, not a traceback in whoever reads it)."""
    try:
        rec = read_json(run_dir / METRICS)
    except (FileNotFoundError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def best_epoch(history: list[dict[str, float]]) -> tuple[int, str]:
    """(1-based epoch, criterion) of the best checkpoint: the lowest validation error (earliest on ties),
    or the last epoch when the run has no validation split (criterion ``last``: the test set never
    picks a checkpoint)."""
    vals = [(h["val_error"], i) for i, h in enumerate(history) if "val_error" in h]
    if not vals:
        return int(history[-1].get("epoch", len(history))), "last"
    _, i = min(vals)
    return int(history[i].get("epoch", i + 1)), "val_error"


def build(meta: dict[str, Any], status: str, history: list[dict[str, float]], wall_s: float,
          extra: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
    """``meta`` holds the identifying fields (dataset, model, method, bits, seed, ...)."""
    rec: dict[str, Any] = {"status": status, **meta, "epochs_done": len(history)}
    if history:
        last = history[-1]
        rec.update(
            test_error=last["test_error"],
            test_acc=100.0 - last["test_error"],
            best_test_error=min(h["test_error"] for h in history),
            train_loss=last["train_loss"],
            images_per_s=sum(h["images_per_s"] for h in history) / len(history),
        )
        epoch, by = best_epoch(history)
        at_best = next(h for h in history if int(h.get("epoch", 0)) == epoch) if by != "last" else last
        rec.update(best_epoch=epoch, best_by=by, test_error_at_best=at_best["test_error"])
        if "val_error" in last:
            rec.update(val_error=last["val_error"], best_val_error=at_best["val_error"])
        flips = [h["method/flip_frac"] for h in history if "method/flip_frac" in h]
        if flips:  # weight methods: how much the quantized weights moved (Li et al.'s diagnostic)
            rec.update(flip_frac=flips[-1], mean_flip_frac=sum(flips) / len(flips))
    rec["wall_s"] = wall_s
    rec.update(extra or {})
    if error is not None:
        rec["error"] = error
    rec["history"] = history
    return rec


def write(run_dir: Path, rec: dict[str, Any]) -> None:
    write_json(Path(run_dir) / METRICS, rec)


def summary_line(rec: dict[str, Any]) -> str:
    if "test_error" not in rec:
        return f"status {rec['status']}: {rec.get('error', 'no epoch finished')}"
    line = (f"{rec['status']}: test error {rec['test_error']:.2f}% (accuracy {rec['test_acc']:.2f}%) "
            f"after {rec['epochs_done']} epoch(s), {rec['wall_s']:.0f} s")
    if isinstance(rec.get("early_stop"), dict):
        line += f"; stopped early (patience {rec['early_stop'].get('patience')})"
    if rec.get("best_by") == "val_error" and "best_val_error" in rec:
        line += (f"; best.pt: epoch {rec['best_epoch']} (val error {rec['best_val_error']:.2f}%, "
                 f"test error {rec['test_error_at_best']:.2f}%)")
    return line


# ---- ptq.json: post-training quantization curves (written by ``qexp eval RUN --ptq-bits``) ------------
PTQ_FILE = "ptq.json"


def read_ptq(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ptq.json (schema: :mod:`qexp.methods.ptq.curve`), or None when absent or malformed (not a
    JSON object with a ``results`` list)."""
    try:
        doc = read_json(Path(run_dir) / PTQ_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        return None
    return doc


def fmt_duration(seconds: float | None, missing: str = "?") -> str:
    """``42s``, ``3m05s``, ``2h07m``; ``missing`` when unknown (None, NaN, infinite)."""
    if seconds is None or not math.isfinite(seconds):
        return missing
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
