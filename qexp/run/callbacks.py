"""What the run writes while it trains, as :class:`qexp.run.engine.Callback` objects given to the engine:
metrics.json and quant.json (:class:`RunRecord`), best.pt (:class:`BestCheckpoint`), TensorBoard event
files (:class:`TensorBoard`). They never call the method: the run session hands them its manifest and
pictures as plain callables."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qexp.errors import QexpError
from qexp.jsonio import atomic_write_bytes, write_json
from qexp.quant.inject import weight_layers
from qexp.run import checkpoint, record
from qexp.run.engine import Callback, Engine, Outcome

MANIFEST = "quant.json"
BEST = record.BEST

log = logging.getLogger("qexp")


def final_record(meta: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    """The metrics.json record of a finished ``fit`` (the method's finalize results merged in)."""
    p = outcome.progress
    return record.build(meta, outcome.status, p.history, p.wall_s, extra=outcome.extra,
                        error="loss became NaN or infinite" if outcome.status == "diverged" else None)


class RunRecord(Callback):
    """metrics.json (status ``running`` at the start and after every epoch, the final record at the end)
    and quant.json, what ``manifest()`` returns (the method's manifest), at the start and at the end."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], manifest: Callable[[], dict[str, Any]]) -> None:
        self.run_dir, self.meta, self.manifest = Path(run_dir), meta, manifest

    def _manifest(self, trainer: Engine) -> None:
        write_json(self.run_dir / MANIFEST, self.manifest())

    def on_start(self, trainer: Engine) -> None:
        self._manifest(trainer)
        p = trainer.progress
        record.write(self.run_dir, record.build(self.meta, "running", p.history, p.wall_s))

    def _still_there(self) -> None:
        """A run folder removed while the run trained is not recreated (without its .hydra/ it would be
        listed as a finished run of an unknown configuration)."""
        if not self.run_dir.is_dir():
            raise QexpError(f"the run folder {self.run_dir} was removed while the run trained; stopped")

    def on_epoch(self, trainer: Engine, row: dict[str, float]) -> None:
        self._still_there()
        p = trainer.progress
        record.write(self.run_dir, record.build(self.meta, "running", p.history, p.wall_s))

    def on_end(self, trainer: Engine, outcome: Outcome) -> None:
        self._still_there()
        record.write(self.run_dir, final_record(self.meta, outcome))
        self._manifest(trainer)


class BestCheckpoint(Callback):
    """best.pt: the checkpoint of the epoch with the lowest validation error (the earliest on ties), or of
    the last epoch when the run has no validation split (said once in the log; metrics.json's ``best_by``
    is then ``last``). The test set never picks it. Same format as checkpoint.pt."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / BEST

    def on_start(self, trainer: Engine) -> None:
        if trainer.data.val is None:
            log.info("no validation split (dataset.val_size=0): %s holds the last epoch", BEST)

    def on_epoch(self, trainer: Engine, row: dict[str, float]) -> None:
        epoch, _ = record.best_epoch(trainer.progress.history)
        if epoch != int(row["epoch"]):
            return
        ckpt = trainer.ckpt_path
        if ckpt is not None and Path(ckpt).exists():  # just written for this epoch: the same bytes
            atomic_write_bytes(self.path, Path(ckpt).read_bytes())
        else:
            checkpoint.save(self.path, trainer.state_dict())


class TensorBoard(Callback):
    """Every history key as a scalar (train and test share a chart), the method's pictures, and the run's
    hyper-parameters with its final test error when it completes. ``images()`` gives the pictures of the
    epoch just finished (name -> HWC array or figure). ``step_every`` > 0 adds the training
    loss and learning rate every that many optimizer steps (``loss/train_step``, ``lr_step``);
    ``histograms`` adds, per epoch, the weight histogram of every conv/linear layer as the forward uses
    it (``weights/<layer>``: the quantized values) and, where a float copy is kept, of that copy
    (``shadow/<layer>``)."""

    def __init__(self, run_dir: Path, meta: dict[str, Any], step_every: int = 0, histograms: bool = False,
                 images: Callable[[], dict[str, Any]] = dict) -> None:
        self.run_dir, self.meta, self.images = Path(run_dir), meta, images
        self.step_every, self.histograms = int(step_every or 0), bool(histograms)
        self.writer: Any = None

    def on_step(self, trainer: Engine, loss: torch.Tensor) -> None:
        step = trainer.progress.step + 1  # this step's number, counted from 1
        if self.step_every > 0 and step % self.step_every == 0:
            self.writer.add_scalar("loss/train_step", float(loss), step)
            self.writer.add_scalar("lr_step", trainer.optimizer.param_groups[0]["lr"], step)

    def _histograms(self, trainer: Engine, step: int) -> None:
        from torch.nn.utils import parametrize

        model = trainer.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for name, layer in weight_layers(model):
                self.writer.add_histogram(f"weights/{name}", layer.weight.detach().float().cpu(), step)
                if parametrize.is_parametrized(layer, "weight"):
                    shadow = layer.parametrizations.weight.original
                    self.writer.add_histogram(f"shadow/{name}", shadow.detach().float().cpu(), step)
        model.train(was_training)

    def on_start(self, trainer: Engine) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # a resumed run drops the events of epochs after its checkpoint
        self.writer = SummaryWriter(str(self.run_dir), purge_step=trainer.progress.epoch + 1)

    def on_epoch(self, trainer: Engine, row: dict[str, float]) -> None:
        step = trainer.progress.epoch
        for k, v in row.items():
            if k != "epoch":
                self.writer.add_scalar(_tb_name(k), v, step)
        for k, img in self.images().items():
            _tb_image(self.writer, f"method/{k}", img, step)
        if self.histograms:
            self._histograms(trainer, step)
        self.writer.flush()

    def on_end(self, trainer: Engine, outcome: Outcome) -> None:
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

    hp = {k: v for k, v in meta.items() if isinstance(v, (int, float, str, bool)) and k != "fingerprint"}
    metrics = {"hparam/test_error": rec["test_error"], "hparam/best_test_error": rec["best_test_error"]}
    for summary in hparams(hp, metrics):
        writer.file_writer.add_summary(summary)
    for k, v in metrics.items():
        writer.add_scalar(k, v)
