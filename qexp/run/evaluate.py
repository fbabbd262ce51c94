"""``qexp eval RUN_DIR [--best]``: reload a finished (or unfinished) run and evaluate it again: its last
checkpoint (checkpoint.pt), or with ``--best`` best.pt (the epoch with the lowest validation error; the
last epoch when the run had no validation split).

Options add post-hoc analyses that write their results into the run folder: every method's
``eval_analyses`` (:attr:`qexp.methods.base.Method.eval_analyses`), e.g. ``--ptq-bits``
(post-training quantization of any run) and ``--integer`` (WAGE's integer-only inference check).
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from qexp.data.common import run_cache, use_cache
from qexp.errors import ArgumentParser, QexpError, path_arg
from qexp.run import checkpoint, session
from qexp.run.config import register

if TYPE_CHECKING:
    from qexp.run.session import Prepared


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: DictConfig
    built: Prepared  # the run's method, data and model, as trained
    device: torch.device
    which: str = "last"  # last (checkpoint.pt) | best (best.pt)
    epoch: int = 0  # epochs the loaded checkpoint had finished
    history: list[dict[str, Any]] = field(default_factory=list)  # the loaded checkpoint's own epochs

    @property
    def checkpoint_name(self) -> str:
        from qexp.run.callbacks import BEST

        return BEST if self.which == "best" else session.CHECKPOINT

    def recorded_test_error(self) -> float | None:
        """The test error metrics.json recorded for the loaded checkpoint (what re-evaluating must give);
        when metrics.json is missing or unreadable, the one the checkpoint's own history recorded for its
        epoch, so export's proof is never skipped for want of the record."""
        from qexp.run import record

        rec = record.read(self.run_dir)
        if rec is None:
            rows = [h for h in self.history if isinstance(h, dict) and h.get("epoch") == self.epoch]
            return rows[-1].get("test_error") if rows else None
        if self.which == "last" and rec.get("status") == "completed" and rec.get("epochs_done") == self.epoch:
            return rec.get("test_error")
        rows = [h for h in rec.get("history", []) if int(h.get("epoch", 0)) == self.epoch]
        return rows[0]["test_error"] if rows else None

    def evaluate(self, model: torch.nn.Module | None = None, loader: Any = None) -> dict[str, float]:
        """Test loss and error of the run's model (or ``model``) on its test set (or ``loader``)."""
        b = self.built
        return session.evaluate(b.model if model is None else model, b.method,
                                b.data.test if loader is None else loader, self.device)


def run_data_root(run_dir: Path, cfg: DictConfig, data_root: str | None) -> str:
    """The data root a run is evaluated on: ``data_root`` when given, else the resolved root the run
    recorded (metrics.json ``data.root``), else (a run from before runs recorded it) its config's."""
    from qexp.run import record

    if data_root is not None:
        return data_root
    data = (record.read(run_dir) or {}).get("data")
    if isinstance(data, dict) and data.get("root"):
        return str(data["root"])
    return str(cfg.data_root)


def check_same_data(run_dir: Path, root: str, sources: tuple[Path, ...], other_data: bool) -> None:
    """The files just read must be the files the run was trained on (their digest), unless ``other_data``."""
    from qexp.data.common import digest
    from qexp.run import record

    rec = record.read(run_dir)
    stored = (rec or {}).get("data")
    if rec is None:  # metrics.json missing or unreadable: the checkpoint's fingerprint holds the digest
        stored = stored_data_digest(run_dir)
    if not isinstance(stored, dict) or other_data:
        return
    now = digest(root, sources)
    if now["digest"] != stored.get("digest"):
        raise QexpError(f"{run_dir} was trained on other data than the files under {now['root']} "
                        f"(trained on {stored.get('root')}); pass --other-data to evaluate on these anyway")


def stored_data_digest(run_dir: Path) -> dict[str, Any] | None:
    """``{"digest": ...}`` from the fingerprint checkpoint.pt stores (:func:`qexp.run.session.stored_fingerprint`),
    or None when it has none (a run from before runs recorded their data)."""
    from qexp.run.identity import DATA_KEY

    try:
        fp = json.loads(session.stored_fingerprint(run_dir, {}) or "null")
    except ValueError:
        return None
    if not isinstance(fp, dict) or DATA_KEY not in fp:
        return None
    return {"digest": fp[DATA_KEY], "root": "its recorded data root (metrics.json is missing)"}


def read_config(run_dir: Path) -> DictConfig:
    """The run's .hydra/config.yaml; a missing, unparsable or non-mapping file is one line naming it."""
    cfg_file = run_dir / ".hydra" / "config.yaml"
    if not cfg_file.exists():
        raise QexpError(f"{run_dir} is not a qexp run folder (no .hydra/config.yaml)")
    try:
        cfg = OmegaConf.load(cfg_file)
    except Exception as e:  # yaml's parser and scanner errors, OmegaConf's own: all mean a damaged file
        what = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QexpError(f"{cfg_file} cannot be read ({what}): the run's config is damaged") from None
    if not isinstance(cfg, DictConfig):
        raise QexpError(f"{cfg_file} is not a mapping of config keys: the run's config is damaged")
    return cfg


def load_run(run_dir: str | Path, device: str | None = None, data_root: str | None = None,
             which: str = "last", other_data: bool = False) -> LoadedRun:
    """Rebuild a run's data, model and method from its folder and load their state from its checkpoint
    (``which``: ``last``, checkpoint.pt, or ``best``, best.pt; no optimizer: evaluating needs none).

    The data are the run's own (:func:`run_data_root`), checked by their digest; other data only with
    ``other_data``. ``device``: default :func:`qexp.run.session.default_device`."""
    from qexp.run.callbacks import BEST

    CHECKPOINT = session.CHECKPOINT
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    ckpt = run_dir / (BEST if which == "best" else CHECKPOINT)
    if not ckpt.exists():
        more = " (it has no finished epoch, or was trained before qexp kept a best checkpoint)" \
            if which == "best" else ""
        raise QexpError(f"{run_dir} has no {ckpt.name}{more}: nothing to evaluate")
    register()
    cfg.data_root = run_data_root(run_dir, cfg, data_root)
    use_cache(run_cache(run_dir), writable=False)  # read what its training decoded; write nothing there
    dev = session.resolve_device(session.default_device() if device is None else device)
    torch.manual_seed(int(cfg.seed))
    built = session.assemble(cfg, dev)
    check_same_data(run_dir, str(cfg.data_root), built.data.sources, other_data)
    state = checkpoint.load(ckpt, map_location=dev)
    session.restore(built, state)
    progress = state.get("progress", {})
    return LoadedRun(run_dir, cfg, built, dev, which, int(progress.get("epoch", 0)), list(progress.get("history", [])))


def _method_name(run_dir: Path) -> str:
    """The method a run folder was trained with (read from .hydra/config.yaml without building anything)."""
    return str(read_config(run_dir).method.get("name"))


def analyses() -> list[ModuleType]:
    """The ``qexp eval`` analyses every registered method declares (``Method.eval_analyses``), once each,
    in the order of the method options."""
    from qexp.methods.base import registered_methods

    names = dict.fromkeys(n for cls in registered_methods() for n in cls.eval_analyses)
    return [importlib.import_module(n) for n in names]


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="qexp eval", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=path_arg, help="a run folder (holds .hydra/ and checkpoint.pt)")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: $QEXP_DEVICE, else auto)")
    ap.add_argument("--data-root", default=None,
                    help="read the data from this folder instead of the run's own data root (the files "
                         "must be the ones the run was trained on, unless --other-data)")
    ap.add_argument("--other-data", action="store_true",
                    help="evaluate on data that differ from the run's own (their digest differs)")
    extra = analyses()
    for a in extra:
        a.add_arguments(ap)
    ap.add_argument("--best", action="store_true",
                    help="evaluate best.pt (lowest validation error; the last epoch without a validation "
                         "split) instead of the last checkpoint")
    args = ap.parse_args(argv)
    for a in extra:
        a.check(_method_name(args.run_dir), args)
    run = load_run(args.run_dir, args.device, args.data_root, "best" if args.best else "last", args.other_data)
    res = run.evaluate()
    what = f" ({run.checkpoint_name}, epoch {run.epoch})" if args.best else ""
    print(f"{run.run_dir}{what}: test error {res['error']:.2f}% (accuracy {100 - res['error']:.2f}%), "
          f"test loss {res['loss']:.4f}")
    for a in extra:
        a.run(run, args, res)
    return 0
