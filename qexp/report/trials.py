"""The trials of an Optuna search (``hydra/sweeper=optuna``) as a table: ``qexp table`` shows this view
for a folder holding a study (its sweep folder has ``optimization_results.yaml``).

One row per trial run: its tuned parameters, the objective it reported (a validation error), the
validation error of its last epoch, the test error of its best checkpoint (for reporting only: the
search never saw it), its status. Sorted by the objective; the best configuration is the study's own
(``optimization_results.yaml``) and is marked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from qexp.report import results

RESULTS_FILE = "optimization_results.yaml"


@dataclass
class Study:
    folder: Path
    best_params: dict[str, Any]
    best_value: float | None


def find_studies(dirs: list[Path]) -> list[Study]:
    """Every Optuna study (sweep folder with optimization_results.yaml) at or below ``dirs``."""
    import yaml

    found: dict[Path, Study] = {}
    for d in dirs:
        for f in sorted(Path(d).rglob(RESULTS_FILE)):
            try:
                doc = yaml.safe_load(f.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            if doc.get("name") != "optuna" or not isinstance(doc.get("best_params"), dict):
                continue
            found.setdefault(f.parent.resolve(), Study(f.parent, doc["best_params"], doc.get("best_value")))
    return list(found.values())


def _in(folder: Path, run_dir: str) -> bool:
    try:
        Path(run_dir.split("#")[0]).resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _same(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    except (TypeError, ValueError):
        return str(a) == str(b)


def trial_rows(df: pd.DataFrame, study: Study) -> tuple[list[str], list[list[str]], list[bool], str]:
    """Header, rows (best objective first), which row is the study's best, and the objective's name."""
    params = list(study.best_params)
    recs = [r for r in df.to_dict("records") if _in(study.folder, r["run_dir"])]
    objective = next((o for r in recs if (o := results.config_value(r["run_dir"], "objective"))), "best_val_error")
    keyed = []
    for r in recs:
        given = results.split_overrides(r.get("overrides") or "")
        values = [given.get(p, results.config_value(r["run_dir"], p)) for p in params]
        is_best = all(_same(v, study.best_params[p]) for v, p in zip(values, params))
        keyed.append((values, r, is_best))
    # best objective first; among equal objectives the study's best first
    keyed.sort(key=lambda t: (v if (v := _num(t[1].get(objective))) is not None else math.inf, not t[2]))
    header = [*params, objective, "val_error (last epoch)", "test error at best", "status", "seed"]
    rows, best = [], []
    marked = False
    for values, r, is_best in keyed:
        best.append(is_best and not marked)
        marked |= is_best
        rows.append([*(results.MISSING if v is None else str(v) for v in values),
                     *(_pct(r.get(k)) for k in (objective, "val_error", "test_error_at_best")),
                     str(r.get("status") or "failed"), results.key_label("seed", r)])
    return header, rows, best, objective


def _pct(v: Any) -> str:
    n = _num(v)
    return results.MISSING if n is None else f"{n:.2f}"


def describe_best(study: Study, objective: str) -> str:
    params = ", ".join(f"{k}={v}" for k, v in study.best_params.items())
    value = f"{study.best_value:.2f}%" if _num(study.best_value) is not None else "?"
    return (f"best configuration: {params} ({objective} {value}); chosen on validation data only, the test "
            "column is for reporting: confirm it with fresh seeds")
