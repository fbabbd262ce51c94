"""Hyper-parameter search with Hydra's Optuna sweeper, on validation data only.

``hydra/sweeper=optuna`` (the ``hydra-optuna-sweeper`` plugin) asks each job for one number: the task
returns :func:`objective` of the run's record, the validation error named by ``objective``
(``best_val_error``: the lowest over epochs, the epoch ``best.pt`` holds; ``val_error``: the last
epoch). Test metrics are never an objective, and a search without a validation split
(``dataset.val_size=0``) is refused before any job starts (:class:`InputCheck`, a Hydra callback run in
the launching process), with one line and exit status 2.

A rerun of the same command skips the finished trials: the sampler is seeded (an unseeded one takes
the run's ``seed``: :func:`seed_sampler`), so it proposes the same configurations, whose run folders are
complete and are not retrained (their recorded objective is returned again).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from qexp.errors import QexpError
from qexp.run import sweep

log = logging.getLogger(__name__)

#: what an Optuna search may minimise: validation errors, never a test metric
OBJECTIVES = ("best_val_error", "val_error")
#: the objective a diverged trial reports: no better than chance, so the sampler moves away from it
DIVERGED_OBJECTIVE = 100.0


def is_optuna(hydra_cfg: Any) -> bool:
    """Whether the config's sweeper is the Optuna plugin's."""
    try:
        target = hydra_cfg.sweeper._target_
    except Exception:  # noqa: BLE001 (no hydra node: a plain job)
        return False
    return isinstance(target, str) and "optuna" in target.lower()


def check_objective(name: object) -> None:
    """``objective`` names a validation error (checked on every run, so a typo is caught before a search)."""
    if name not in OBJECTIVES:
        what = "a test metric" if isinstance(name, str) and "test" in name else "not a validation error"
        raise QexpError(f"objective={name} is {what}: hyper-parameters are tuned on validation data, never on "
                        f"the test set; use objective={' or objective='.join(OBJECTIVES)}")


def check(cfg: DictConfig) -> None:
    """A search must minimise a validation error of a run that has a validation split."""
    check_objective(cfg.get("objective"))
    trials = cfg.hydra.sweeper.get("n_trials") if cfg.get("hydra") is not None else None
    if trials is not None and int(trials) < 1:
        raise QexpError(f"hydra.sweeper.n_trials={trials}: a search needs at least one trial")
    val = cfg.dataset.get("val_size", 0) if cfg.get("dataset") is not None else 0
    if not val:
        raise QexpError("an Optuna search needs a validation split: set dataset.val_size=N (training images "
                        "held out; the test set is never used to choose hyper-parameters)")


def objective(rec: dict[str, Any] | None, name: str) -> float | None:
    """The number handed to the sweeper: the record's validation error; 100 for a diverged run; None (a
    failed trial, counted by the sweeper's max_failure_rate) when the run gave nothing."""
    if rec is None:
        return None
    if rec.get("status") == "diverged":
        return DIVERGED_OBJECTIVE
    v = rec.get(name)
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def check_patience(cfg: DictConfig) -> None:
    """Early stopping watches the validation error: ``patience`` needs ``dataset.val_size``."""
    val = cfg.dataset.get("val_size", 0) if cfg.get("dataset") is not None else 0
    if cfg.get("patience") is not None and int(cfg.patience) < 1:
        raise QexpError(f"patience must be at least 1 epoch (or null: no early stopping), got patience={cfg.patience}")
    if cfg.get("patience") is not None and not val:
        raise QexpError(f"patience={cfg.patience} stops on the validation error, but the run has no validation "
                        "split: set dataset.val_size=N (the test set never decides when to stop)")


class InputCheck(Callback):
    """Refuses, in the launching process and before any job or run folder exists, a search of a test
    metric, without a validation split or without trials, early stopping without a validation split, a
    launcher that cannot start (:func:`qexp.run.sweep.check_launcher`) and a grid of no job
    (:func:`qexp.run.sweep.check_values`)."""

    @staticmethod
    def _refuse(config: DictConfig, search: bool) -> None:
        try:
            if search:
                sweep.check_sweep_record(config)
                sweep.check_launcher(config)
                sweep.check_values(config)
            if search and is_optuna(config.hydra):
                check(config)
            check_patience(config)
        except QexpError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(config, search=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._refuse(config, search=True)
        if is_optuna(config.hydra):
            seed_sampler(config)


def seed_sampler(config: DictConfig) -> None:
    """An Optuna sampler left unseeded (the plugin's default) takes the run's ``seed``, so that a rerun of
    the same command proposes the same trials and skips the finished ones instead of drawing new ones.
    Called before Hydra instantiates the sweeper from this config; a seed given (presets give 0) is kept."""
    sampler = config.hydra.sweeper.get("sampler")
    if sampler is None or "seed" not in sampler or sampler.seed is not None:
        return
    try:
        seed = int(config.get("seed") or 0)
    except (TypeError, ValueError):  # a seed the search itself varies: the default
        seed = 0
    with read_write(config), open_dict(config):
        sampler.seed = seed
    log.info("Optuna sampler seed %d (the run's seed; hydra.sweeper.sampler.seed=N sets another)", sampler.seed)
