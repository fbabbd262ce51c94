"""What the run writes while it trains, as :class:`qexp.run.engine.Callback` objects given to the Trainer:
metrics.json and quant.json (:class:`RunRecord`), TensorBoard event files (:class:`TensorBoard`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qexp.jsonio import write_json
from qexp.run import record
from qexp.run.engine import Callback, Outcome, Trainer

MANIFEST = "quant.json"


def final_record(meta: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    """The metrics.json record of a finished ``fit`` (the method's finalize results merged in)."""
    p = outcome.progress
    return record.build(meta, outcome.status, p.history, p.wall_s, extra=outcome.extra,
                        error="loss became NaN or infinite" if outcome.status == "diverged" else None)


class RunRecord(Callback):
    """metrics.json (status ``running`` at the start and after every epoch, the final record at the end)
    and the method's quant.json manifest (at the start and at the end)."""

    def __init__(self, run_dir: Path, meta: dict[str, Any]) -> None:
        self.run_dir, self.meta = Path(run_dir), meta

    def _manifest(self, trainer: Trainer) -> None:
        write_json(self.run_dir / MANIFEST, trainer.method.manifest(trainer.model))

    def on_start(self, trainer: Trainer) -> None:
        self._manifest(trainer)
        p = trainer.progress
        record.write(self.run_dir, record.build(self.meta, "running", p.history, p.wall_s))

    def on_epoch(self, trainer: Trainer, row: dict[str, float]) -> None:
        p = trainer.progress
        record.write(self.run_dir, record.build(self.meta, "running", p.history, p.wall_s))

    def on_end(self, trainer: Trainer, outcome: Outcome) -> None:
        record.write(self.run_dir, final_record(self.meta, outcome))
        self._manifest(trainer)


class TensorBoard(Callback):
    """Every history key as a scalar (train and test share a chart), the method's pictures, and the run's
    hyper-parameters with its final test error when it completes."""

    def __init__(self, run_dir: Path, meta: dict[str, Any]) -> None:
        self.run_dir, self.meta = Path(run_dir), meta
        self.writer: Any = None

    def on_start(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events of epochs after its checkpoint
        self.writer = SummaryWriter(str(self.run_dir), purge_step=trainer.progress.epoch + 1)

    def on_epoch(self, trainer: Trainer, row: dict[str, float]) -> None:
        step = trainer.progress.epoch
        for k, v in row.items():
            if k != "epoch":
                self.writer.add_scalar(_tb_name(k), v, step)
        for k, img in trainer.method.images().items():
            _tb_image(self.writer, f"method/{k}", img, step)
        self.writer.flush()

    def on_end(self, trainer: Trainer, outcome: Outcome) -> None:
        if outcome.status == "completed":
            _log_hparams(self.writer, self.meta, final_record(self.meta, outcome))
        self.writer.close()


def _tb_name(key: str) -> str:
    if key.startswith("method/") or key in ("lr", "images_per_s"):
        return key
    split, _, what = key.partition("_")
    return f"{what}/{split}"  # loss/train, error/test, ...: train and test share a chart


def _tb_image(writer: Any, tag: str, img: Any, step: int) -> None:
    """An HWC array (uint8, or float in [0, 1]) or a matplotlib figure."""
    if hasattr(img, "savefig"):
        writer.add_figure(tag, img, step)
    else:
        writer.add_image(tag, img, step, dataformats="HWC")


def _log_hparams(writer: Any, meta: dict[str, Any], rec: dict[str, Any]) -> None:
    from torch.utils.tensorboard.summary import hparams

    hp = {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool))}
    metrics = {"hparam/test_error": rec["test_error"], "hparam/best_test_error": rec["best_test_error"]}
    for summary in hparams(hp, metrics):
        writer.file_writer.add_summary(summary)
    for k, v in metrics.items():
        writer.add_scalar(k, v)
