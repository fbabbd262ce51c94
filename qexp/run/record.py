"""metrics.json: the run's status and results, rewritten atomically after every epoch.

Keys may grow; none may silently change meaning (see README, "metrics.json").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qexp.jsonio import read_json, write_json

METRICS = "metrics.json"
FINISHED = ("completed", "diverged")


def read(run_dir: Path) -> dict[str, Any] | None:
    try:
        return read_json(run_dir / METRICS)
    except (FileNotFoundError, ValueError):
        return None


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
    return (f"{rec['status']}: test error {rec['test_error']:.2f}% (accuracy {rec['test_acc']:.2f}%) "
            f"after {rec['epochs_done']} epoch(s), {rec['wall_s']:.0f} s")
