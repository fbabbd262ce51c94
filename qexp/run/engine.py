"""The training loop: epochs, evaluation, checkpoints, callbacks, data parallelism.

It knows nothing about Hydra nor about methods: what a method does inside a step or at an epoch's end
comes through the hook points of :class:`Engine` (``_train_step``, ``_criterion``, ``_before_evaluate``,
``_epoch_end``, ``_finalize``, ``_method_state``, ``_load_method_state``), which the run session
(:class:`qexp.run.session.Trainer`) fills by calling the Method hooks in their documented order."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from qexp.data import DataBundle
from qexp.run import checkpoint
from qexp.run.compiled import CompileClock, Compiled
from qexp.run.precision import MixedPrecision
from qexp.run.record import fmt_duration

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
    compile_s: float = 0.0  # time spent in torch.compile (compile=true), not in train_time
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


def batch_total(loss_is_sum: bool, loss: torch.Tensor, n: int) -> torch.Tensor:
    """A batch's loss summed over its examples (a sum loss already is one; the others are means)."""
    return loss if loss_is_sum else loss * n


Reduce = Callable[[torch.Tensor], torch.Tensor]


def totals(values: tuple[torch.Tensor | float, ...], device: torch.device, reduce: Reduce | None = None,
           ) -> list[float]:
    """Totals over all processes (one collective, in float64); plain values in one process."""
    if reduce is None:
        return [float(v) for v in values]
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    return reduce(t).tolist()


#: what a training step is given (a batch and the step number) and what it gives back (the detached loss
#: and logits, optionally followed by the batch's summed loss and its number of correct predictions,
#: when the step computed them for several runs at once): :meth:`Engine.steps` yields the first and is
#: sent the second
StepRequest = tuple[torch.Tensor, torch.Tensor, int]
StepResult = tuple[torch.Tensor, ...]


T = TypeVar("T")


def drive(steps: Generator[StepRequest, StepResult, T],
          take: Callable[[torch.Tensor, torch.Tensor, int], StepResult]) -> T:
    """Run ``steps`` (:meth:`Engine.steps`, or one epoch of it) to its end, each step taken by
    ``take(x, y, step)``; return what it returns."""
    try:
        request = next(steps)
        while True:
            request = steps.send(take(*request))
    except StopIteration as end:
        return end.value


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: test loss and error of any model (what a method's ``finalize`` is handed)
Evaluate = Callable[[nn.Module], dict[str, float]]


@torch.no_grad()
def measure(model: nn.Module, criterion: Criterion, loss_is_sum: bool, loader: Any, device: torch.device,
             reduce: Reduce | None = None) -> dict[str, float]:
    """Mean loss (``criterion``: a batch sum when ``loss_is_sum``, else a batch mean) and error in percent
    of ``model`` over ``loader``, in eval mode (the model's mode is restored). ``reduce`` sums over
    data-parallel processes."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device)
    n = 0
    for x, y in loader:
        out = model(x)
        loss += batch_total(loss_is_sum, criterion(out, y), len(y))
        wrong += (out.argmax(1) != y).sum()
        n += len(y)
    model.train(was_training)
    loss, wrong, n = totals((loss, wrong, n), device, reduce)
    return {"loss": loss / n, "error": 100.0 * wrong / n}


class Callback:
    """Something that watches a run (writes its files, logs); every hook is optional. Called on the
    processes that were given it (the main one for files)."""

    def on_start(self, trainer: Engine) -> None:
        """Before the first step of :meth:`Trainer.fit` (after a resume's state was loaded)."""

    def on_step(self, trainer: Engine, loss: torch.Tensor) -> None:
        """After every optimizer step (``loss``: the step's criterion value, on the device; reading it
        synchronises, so do it only every so many steps)."""

    def on_epoch(self, trainer: Engine, row: dict[str, float]) -> None:
        """After an epoch's row was added to the history and the checkpoint was saved."""

    def on_end(self, trainer: Engine, outcome: Outcome) -> None:
        """When :meth:`Trainer.fit` returns (completed, diverged or interrupted)."""


class Parallel(Protocol):
    """Data-parallel training as the trainer sees it (:class:`qexp.run.distributed.DataParallel`)."""

    def shard(self, data: DataBundle) -> DataBundle: ...

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_is_sum: bool) -> nn.Module: ...

    def reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def agree(self, local: Callable[[], bool]) -> Callable[[], bool]: ...

    def summary(self, model: nn.Module, method_state: dict[str, Any]) -> dict[str, Any]: ...


class Engine:
    """Runs epochs of training steps, evaluates, checkpoints, and tells its callbacks.

    The method's part is left to the hook points below (a subclass fills them: the run session's
    :class:`~qexp.run.session.Trainer`); ``loss_is_sum`` says whether the training criterion sums over
    the batch (totals and data-parallel gradients then add instead of averaging).

    ``parallel`` makes it one process of several: it trains on its shard of every batch through the
    wrapped model, sums counts over processes and stops when any process is asked to; the method and
    hooks see the plain model and the full data. ``extra_state`` is stored in every checkpoint (e.g. the
    configuration fingerprint a resume must match). ``patience`` stops training (status completed) once
    the validation error has not improved for that many epochs; every process decides alike from the
    shared history. ``precision``: ``32``, ``bf16-mixed`` or ``16-mixed`` (:mod:`qexp.run.precision`).
    ``compile``: the training and evaluation forward (and so the backward) through
    ``torch.compile`` (:mod:`qexp.run.compiled`); compile time is counted apart, in ``compile_s``.
    ``cuda_graphs`` (with ``compile``): compiled graphs replayed as CUDA graphs; ``cuda_graph_skips``
    counts those that could not be.
    ``before_save(path)`` runs before every checkpoint write (a seed of a stacked group keeps its previous
    checkpoint: :mod:`qexp.run.seeds`). ``train_clock`` times the training steps (``images_per_s``); a
    stacked group's counts only the time of its shared steps.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: DataBundle,
        device: torch.device,
        epochs: int,
        *,
        ckpt_path: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        progress_bar: bool | None = None,
        callbacks: Sequence[Callback] = (),
        parallel: Parallel | None = None,
        extra_state: dict[str, Any] | None = None,
        patience: int | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        precision: str = "32",
        loss_is_sum: bool = False,
        compile_ready: Callable[[], bool] | None = None,
        before_save: Callable[[Path], None] | None = None,
        train_clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss_is_sum = loss_is_sum
        self.device, self.epochs = device, epochs
        self.ckpt_path, self.progress_bar = ckpt_path, progress_bar
        self.callbacks = tuple(callbacks)
        self.parallel = parallel
        self.extra_state = dict(extra_state or {})
        self.patience = patience
        self.before_save, self.train_clock = before_save, train_clock
        self._step_callbacks = [cb for cb in self.callbacks if type(cb).on_step is not Callback.on_step]
        if parallel is None:
            self.data, self.forward_model, self.should_stop = data, model, should_stop
            self._reduce: Reduce | None = None
        else:
            self.data = parallel.shard(data)
            self.forward_model = parallel.wrap(model, optimizer, loss_is_sum)
            self._reduce = parallel.reduce
            self.should_stop = parallel.agree(should_stop)
        self.amp: MixedPrecision | None = MixedPrecision(precision, device)
        if self.amp.enabled:
            self.amp.attach(model)
        else:
            self.amp = None
        self.eval_model = model
        self.compile_clock: CompileClock | None = None
        if compile:
            # a run compiles its own graphs: what earlier runs of this process (a sequential sweep)
            # compiled would count towards Dynamo's recompile limit (8), past which it runs eagerly
            torch._dynamo.reset()
            self.forward_model = Compiled(self.forward_model, device, compile_ready, cuda_graphs)
            self.eval_model = (self.forward_model if parallel is None
                               else Compiled(model, device, compile_ready, cuda_graphs))
            self.compile_clock = CompileClock()
        self.progress = Progress()

    # ---- the method's part (filled by the run session) -------------------------------------------------
    def _train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on ``self.optimizer`` through ``self.forward_model`` (and ``self.amp``);
        returns the detached training-criterion value and the detached logits."""
        raise NotImplementedError

    def _criterion(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The evaluation loss of a batch (a sum when ``loss_is_sum``, else a mean)."""
        raise NotImplementedError

    def _before_evaluate(self) -> None:
        """At the end of every training epoch, before its validation and test evaluation."""

    def _epoch_end(self, epoch: int) -> dict[str, float]:
        """After an epoch's evaluation: the method's diagnostics for the history (``method/<key>``)."""
        return {}

    def _finalize(self, evaluate: Evaluate) -> dict[str, Any]:
        """After the last epoch of a completed run: keys merged into metrics.json."""
        return {}

    def _method_state(self) -> dict[str, Any]:
        """The method's part of a checkpoint."""
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`_method_state` on resume."""

    # ---- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = {
            "model": _own_storage(self.model.state_dict()),
            "optimizer": _own_storage(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "method": self._method_state(),
            "progress": self.progress.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            **self.extra_state,
        }
        if self.device.type == "cuda":  # the run's own device's generator: a CPU run never starts CUDA
            s["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.amp is not None and self.amp.scaler is not None:
            s["amp"] = self.amp.state_dict()
        return s

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """``s`` as :func:`qexp.run.checkpoint.load` gives it with ``map_location`` the run's device."""
        self.model.load_state_dict(s["model"])
        # from host copies: torch moves the moments to the parameters' device but leaves a non-capturable
        # Adam's ``step`` where it arrived, and a step count on the GPU is a host sync per tensor per step
        self.optimizer.load_state_dict(_on_host(s["optimizer"]))
        self.scheduler.load_state_dict(s["scheduler"])
        self._load_method_state(s["method"])
        self.progress.load_state_dict(s["progress"])
        torch.set_rng_state(s["rng_cpu"].cpu())  # RNG states are host tensors wherever the checkpoint was mapped
        rng_cuda = s.get("rng_cuda")
        if isinstance(rng_cuda, (list, tuple)):  # written by earlier versions: every visible device's
            index = self.device.index if self.device.index is not None else 0
            rng_cuda = rng_cuda[index] if self.device.type == "cuda" and index < len(rng_cuda) else None
        if torch.is_tensor(rng_cuda) and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng_cuda.cpu(), self.device)
        if self.amp is not None and "amp" in s:
            self.amp.load_state_dict(s["amp"])

    def save(self) -> None:
        if self.ckpt_path is not None:
            if self.before_save is not None:
                self.before_save(self.ckpt_path)
            checkpoint.save(self.ckpt_path, self.state_dict())

    # ---- evaluation --------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module | None = None, loader: Any = None) -> dict[str, float]:
        """:func:`measure` of the run's model (or ``model``) on its test loader (or ``loader``)."""
        if model is not None:  # another model (finalize, PTQ): plain float32
            return measure(model, self._criterion, self.loss_is_sum, self.data.test if loader is None else loader,
                            self.device, self._reduce)
        with self.amp.active() if self.amp is not None else contextlib.nullcontext():
            return measure(self.eval_model, self._criterion, self.loss_is_sum,
                            self.data.test if loader is None else loader, self.device, self._reduce)

    def _sum(self, *values: torch.Tensor | float) -> list[float]:
        return totals(values, self.device, self._reduce)

    # ---- training ----------------------------------------------------------------------------------
    def fit(self) -> Outcome:
        """Train to the end (or a stop): :meth:`steps`, each step taken by :meth:`_train_step`."""
        return drive(self.steps(), self._train_step)

    def steps(self) -> Generator[StepRequest, StepResult, Outcome]:
        """The whole of :meth:`fit` as a generator that hands out its training steps: it yields
        ``(x, y, step)`` for every batch and is sent back what :meth:`_train_step` returns for it; it
        returns the :class:`Outcome`. :func:`drive` takes the steps one by one; several engines driven
        in lockstep (seeds stacked in one model, :mod:`qexp.run.seeds`) take them together."""
        for cb in self.callbacks:
            cb.on_start(self)
        clock = self.compile_clock
        base = self.progress.compile_s  # a resumed run's earlier compile time
        if clock is not None:
            clock.start()
        try:
            outcome = yield from self._fit()
        finally:
            if clock is not None:
                clock.stop()
        if clock is not None:
            self.progress.compile_s = base + clock.seconds
            outcome.extra["compile_s"] = round(self.progress.compile_s, 3)
            log.info("compile=true: %.1f s compiling (not counted in images_per_s)%s", self.progress.compile_s,
                     "; fell back to eager" if self.forward_model.failed else "")
            if self.forward_model.cuda_graphs:
                skips = self.forward_model.graph_skips()
                outcome.extra["cuda_graph_skips"] = skips
                if skips:
                    log.warning("cuda_graphs=true: %d compiled graph(s) ran without CUDA graphs "
                                "(TORCH_LOGS=perf_hints says why)", skips)
        if self.parallel is not None:  # bit-identical weights (as used) and method state on every process?
            outcome.extra.update(self.parallel.summary(self.model, self._method_state()))
        for cb in self.callbacks:
            cb.on_end(self, outcome)
        return outcome

    def _fit(self) -> Generator[StepRequest, StepResult, Outcome]:
        p = self.progress
        start = time.perf_counter() - p.wall_s
        self._session = (time.perf_counter(), p.epoch, p.batch)  # where this process started: the ETA's base
        early: dict[str, Any] | None = None
        while p.epoch < self.epochs:
            status = yield from self._train_epoch()
            p.wall_s = time.perf_counter() - start
            if status != "ok":
                self.save()
                return Outcome(status, p)
            row = self._end_epoch()
            p.wall_s = time.perf_counter() - start
            self.save()
            for cb in self.callbacks:
                cb.on_epoch(self, row)
            early = self._early_stop()
            if early is not None:
                log.info("early stop after epoch %d: validation error not improved for %d epochs (best: epoch %d)",
                         p.epoch, self.patience, early["best_epoch"])
                break
            if self.should_stop() and p.epoch < self.epochs:
                return Outcome("interrupted", p)
        extra = self._finalize(lambda m: self.evaluate(m))
        if early is not None:
            extra = {**extra, "early_stop": early}
        return Outcome("completed", p, extra)

    def _early_stop(self) -> dict[str, Any] | None:
        """``patience`` epochs without a lower validation error than the best one's: where and why to stop."""
        history = self.progress.history
        if not self.patience or not history or "val_error" not in history[-1] or self.progress.epoch >= self.epochs:
            return None
        best = min(range(len(history)), key=lambda i: (history[i]["val_error"], i))
        stale = len(history) - 1 - best
        if stale < self.patience:
            return None
        return {"epoch": int(history[-1]["epoch"]), "best_epoch": int(history[best]["epoch"]),
                "patience": self.patience}

    def _train_epoch(self) -> Generator[StepRequest, StepResult, str]:
        p, model = self.progress, self.model
        loader = self.data.train
        loader.set_epoch(p.epoch)
        model.train()
        # Running sums of the epoch. p.* hold totals over all processes; with several processes each
        # one sums its own share from zero and `base` (the interrupted epoch's totals) is added once.
        base: tuple[float, float, int] = (0.0, 0.0, 0)
        if self._reduce is not None:
            base, p.loss_sum, p.correct, p.seen = (p.loss_sum, p.correct, p.seen), 0.0, 0.0, 0
        # float64: exact for float32 addends, so a sum split at a resume (each process's share restarts
        # from 0 under DDP and is added to the saved totals) ends where an uninterrupted one does
        loss_sum = torch.tensor(p.loss_sum, dtype=torch.float64, device=self.device)
        correct = torch.tensor(p.correct, device=self.device)
        seen = p.seen
        show = _isatty() if self.progress_bar is None else self.progress_bar
        bar = tqdm(total=len(loader), initial=p.batch, desc=f"epoch {p.epoch + 1}/{self.epochs}",
                   disable=not show, leave=False, dynamic_ncols=True)
        waiting = getattr(self.train_clock, "waiting", contextlib.nullcontext)
        t0 = self.train_clock()
        c0 = self._compile_seconds()
        status = "ok"
        for i, (x, y) in enumerate(loader.iter_from(p.batch), start=p.batch):
            loss, out, *tally = yield x, y, p.step
            for cb in self._step_callbacks:
                cb.on_step(self, loss)
            p.step += 1
            p.batch = i + 1
            seen += len(y)
            if tally:  # computed for a whole group of seeds in one go (qexp.run.seeds)
                loss_sum += tally[0]
                correct += tally[1]
            else:
                loss_sum += batch_total(self.loss_is_sum, loss, len(y))
                correct += (out.argmax(1) == y).sum()
            bar.update(1)
            if p.step % SYNC_EVERY == 0 or p.batch == len(loader):
                with waiting():  # a group's step clock (qexp.run.seeds) counts the wait for the queued steps
                    total_loss, total_seen = self._sum(loss_sum, seen)
                running = (base[0] + total_loss) / max(base[2] + total_seen, 1)
                if not math.isfinite(running):
                    status = "diverged"
                    break
                bar.set_postfix(loss=f"{running:.4f}", run_eta=fmt_duration(self.eta()))
            if self.should_stop() and p.batch < len(loader):
                status = "interrupted"
                break
        bar.close()
        p.train_time += self.train_clock() - t0 - (self._compile_seconds() - c0)
        totals_ = self._sum(loss_sum, correct, seen)
        p.loss_sum, p.correct, p.seen = (b + t for b, t in zip(base, totals_))
        p.seen = int(p.seen)
        if status == "ok" and not math.isfinite(p.loss_sum):
            status = "diverged"
        if status == "diverged":
            log.error("loss is not finite at step %d: the run diverged", p.step)
        return status

    def _compile_seconds(self) -> float:
        return 0.0 if self.compile_clock is None else self.compile_clock.seconds

    def _end_epoch(self) -> dict[str, float]:
        p = self.progress
        lr = self.optimizer.param_groups[0]["lr"]
        row: dict[str, float] = {
            "epoch": p.epoch + 1,
            "train_loss": p.loss_sum / max(p.seen, 1),
            "train_error": 100.0 - 100.0 * p.correct / max(p.seen, 1),
            "lr": lr,
            "images_per_s": p.seen / max(p.train_time, 1e-9),
        }
        self._before_evaluate()
        if self.data.val is not None:
            v = self.evaluate(loader=self.data.val)
            row.update(val_loss=v["loss"], val_error=v["error"])
        t = self.evaluate()
        row.update(test_loss=t["loss"], test_error=t["error"])
        row.update({f"method/{k}": float(v) for k, v in self._epoch_end(p.epoch).items()})
        p.history.append(row)
        self.scheduler.step()
        p.epoch += 1
        p.batch, p.loss_sum, p.correct, p.seen, p.train_time = 0, 0.0, 0.0, 0, 0.0
        val = f"  val_error {row['val_error']:.2f}%" if "val_error" in row else ""
        log.info("epoch %d/%d  train_loss %.4f  train_error %.2f%%%s  test_error %.2f%%  %.0f img/s  "
                 "run eta %s", p.epoch, self.epochs, row["train_loss"], row["train_error"], val,
                 row["test_error"], row["images_per_s"], fmt_duration(self.eta()))
        return row

    def eta(self) -> float | None:
        """Seconds until the whole run ends, from this process's own pace (batches, evaluations included):
        the time per batch so far times the batches left in this and the remaining epochs."""
        if not hasattr(self, "_session"):
            return None
        t0, epoch0, batch0 = self._session
        p, per_epoch = self.progress, max(len(self.data.train), 1)
        done = (p.epoch - epoch0) * per_epoch + p.batch - batch0
        if done <= 0:
            return None
        left = (self.epochs - p.epoch) * per_epoch - p.batch
        return (time.perf_counter() - t0) / done * max(left, 0)


def _on_host(obj: Any) -> Any:
    """Tensors (in dicts and lists) copied to the CPU; others as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_on_host(v) for v in obj]
    return obj


def _own_storage(obj: Any) -> Any:
    """Tensors (in dicts and lists) that are views into a larger storage (seeds stacked in one model)
    as copies of their own: ``torch.save`` writes a view's whole storage."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size() else obj
    if isinstance(obj, dict):
        return {k: _own_storage(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_own_storage(v) for v in obj]
    return obj


def _isatty() -> bool:
    import sys

    return sys.stderr.isatty()
