"""The training loop: the only caller of the method hooks; knows nothing about Hydra or method names."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from qexp.data import DataBundle
from qexp.methods.base import Method
from qexp.run import checkpoint

log = logging.getLogger("qexp")

#: how often (in steps) the loss is pulled to the host to check for divergence and update the bar
SYNC_EVERY = 50


@dataclass
class Progress:
    """Where training stands; everything here goes into the checkpoint."""

    epoch: int = 0  # finished epochs
    batch: int = 0  # batches done inside the current epoch (non-zero only after an interruption)
    step: int = 0  # optimizer steps so far
    loss_sum: float = 0.0  # running sums of the current epoch (mid-epoch resume)
    correct: float = 0.0
    seen: int = 0
    train_time: float = 0.0
    wall_s: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.__dict__.update(s)


@dataclass
class Outcome:
    status: str  # completed | diverged | interrupted
    progress: Progress
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        method: Method,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: DataBundle,
        device: torch.device,
        epochs: int,
        ckpt_path: Path | None = None,
        writer: Any = None,
        on_epoch: Callable[[Progress], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        progress_bar: bool | None = None,
        forward_model: nn.Module | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model, self.method, self.optimizer, self.scheduler = model, method, optimizer, scheduler
        # Data-parallel training (qexp.run.distributed): the training forward goes through the DDP wrapper,
        # hooks and checkpoints see the plain model, and counts are summed over processes by `reduce`.
        self.forward_model = model if forward_model is None else forward_model
        self.reduce = reduce
        self.data, self.device, self.epochs = data, device, epochs
        self.ckpt_path, self.writer, self.on_epoch = ckpt_path, writer, on_epoch
        self.should_stop = should_stop
        self.progress_bar = progress_bar
        method.data = data  # finalize() may need training batches (PTQ calibrates activation ranges)
        self.progress = Progress()
        #: stored alongside the training state (e.g. the config fingerprint a resume must match)
        self.extra_state: dict[str, Any] = {}

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            "progress": self.progress.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            **self.extra_state,
        }
        if torch.cuda.is_available():
            s["rng_cuda"] = torch.cuda.get_rng_state_all()
        return s

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.method.load_state_dict(s["method"])
        self.progress.load_state_dict(s["progress"])
        torch.set_rng_state(s["rng_cpu"])
        if "rng_cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng_cuda"])

    def save(self) -> None:
        if self.ckpt_path is not None:
            checkpoint.save(self.ckpt_path, self.state_dict())

    # ---- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None, loader: Any = None) -> dict[str, float]:
        model = self.model if model is None else model
        loader = self.data.test if loader is None else loader
        was_training = model.training
        model.eval()
        loss = torch.zeros((), device=self.device)
        wrong = torch.zeros((), device=self.device)
        n = 0
        for x, y in loader:
            out = model(x)
            loss += self._batch_total(self.method.criterion(out, y), len(y))
            wrong += (out.argmax(1) != y).sum()
            n += len(y)
        model.train(was_training)
        loss, wrong, n = self._sum(loss, wrong, n)
        return {"loss": loss / n, "error": 100.0 * wrong / n}

    def _sum(self, *values: torch.Tensor | float) -> list[float]:
        """Totals over all processes (one collective, in float64); plain values in one process."""
        if self.reduce is None:
            return [float(v) for v in values]
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in values])
        return self.reduce(t).tolist()

    def _batch_total(self, loss: torch.Tensor, n: int) -> torch.Tensor:
        """Loss summed over the batch (WAGE's SSE is already a sum; the others are means)."""
        return loss if self.method.loss_name == "sse" else loss * n

    # ---- training ----------------------------------------------------------------------------------
    def fit(self) -> Outcome:
        p = self.progress
        start = time.perf_counter() - p.wall_s
        while p.epoch < self.epochs:
            status = self._train_epoch()
            p.wall_s = time.perf_counter() - start
            if status != "ok":
                self.save()
                return Outcome(status, p)
            self._end_epoch()
            p.wall_s = time.perf_counter() - start
            self.save()
            if self.on_epoch:
                self.on_epoch(p)
            if self.should_stop() and p.epoch < self.epochs:
                return Outcome("interrupted", p)
        extra = self.method.finalize(self.model, lambda m: self.evaluate(m))
        return Outcome("completed", p, extra)

    def _train_epoch(self) -> str:
        p, model, method, opt = self.progress, self.model, self.method, self.optimizer
        loader = self.data.train
        loader.set_epoch(p.epoch)
        model.train()
        # Running sums of the epoch. p.* hold totals over all processes; with several processes each
        # one sums its own share from zero and `base` (the interrupted epoch's totals) is added once.
        base: tuple[float, float, int] = (0.0, 0.0, 0)
        if self.reduce is not None:
            base, p.loss_sum, p.correct, p.seen = (p.loss_sum, p.correct, p.seen), 0.0, 0.0, 0
        loss_sum = torch.tensor(p.loss_sum, device=self.device)
        correct = torch.tensor(p.correct, device=self.device)
        seen = p.seen
        show = _isatty() if self.progress_bar is None else self.progress_bar
        bar = tqdm(total=len(loader), initial=p.batch, desc=f"epoch {p.epoch + 1}/{self.epochs}",
                   disable=not show, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        status = "ok"
        for i, (x, y) in enumerate(loader.iter_from(p.batch), start=p.batch):
            method.before_forward(model, p.step)
            out = self.forward_model(x)
            loss = method.criterion(out, y)
            extra = method.extra_loss(model)
            total = loss if extra is None else loss + extra
            opt.zero_grad(set_to_none=True)
            total.backward()
            method.after_backward(model)
            opt.step()
            method.after_step(model, opt)
            p.step += 1
            p.batch = i + 1
            seen += len(y)
            loss_sum += self._batch_total(loss.detach(), len(y))
            correct += (out.detach().argmax(1) == y).sum()
            bar.update(1)
            if p.step % SYNC_EVERY == 0 or p.batch == len(loader):
                total_loss, total_seen = self._sum(loss_sum, seen)
                running = (base[0] + total_loss) / max(base[2] + total_seen, 1)
                if not math.isfinite(running):
                    status = "diverged"
                    break
                bar.set_postfix(loss=f"{running:.4f}")
            if self.should_stop() and p.batch < len(loader):
                status = "interrupted"
                break
        bar.close()
        p.train_time += time.perf_counter() - t0
        totals = self._sum(loss_sum, correct, seen)
        p.loss_sum, p.correct, p.seen = (b + t for b, t in zip(base, totals))
        p.seen = int(p.seen)
        if status == "ok" and not math.isfinite(p.loss_sum):
            status = "diverged"
        if status == "diverged":
            log.error("loss is not finite at step %d: the run diverged", p.step)
        return status

    def _end_epoch(self) -> None:
        p = self.progress
        lr = self.optimizer.param_groups[0]["lr"]
        row: dict[str, float] = {
            "epoch": p.epoch + 1,
            "train_loss": p.loss_sum / max(p.seen, 1),
            "train_error": 100.0 - 100.0 * p.correct / max(p.seen, 1),
            "lr": lr,
            "images_per_s": p.seen / max(p.train_time, 1e-9),
        }
        if self.data.val is not None:
            v = self.evaluate(loader=self.data.val)
            row.update(val_loss=v["loss"], val_error=v["error"])
        t = self.evaluate()
        row.update(test_loss=t["loss"], test_error=t["error"])
        self.method.on_epoch_end(p.epoch)
        row.update({f"method/{k}": float(v) for k, v in self.method.metrics().items()})
        p.history.append(row)
        self.scheduler.step()
        p.epoch += 1
        p.batch, p.loss_sum, p.correct, p.seen, p.train_time = 0, 0.0, 0.0, 0, 0.0
        log.info("epoch %d/%d  train_loss %.4f  train_error %.2f%%  test_error %.2f%%  %.0f img/s",
                 p.epoch, self.epochs, row["train_loss"], row["train_error"], row["test_error"],
                 row["images_per_s"])
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(_tb_name(k), v, p.epoch)
            for k, img in self.method.images().items():
                _tb_image(self.writer, f"method/{k}", img, p.epoch)
            self.writer.flush()


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


def _isatty() -> bool:
    import sys

    return sys.stderr.isatty()
