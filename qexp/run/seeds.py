"""``trainer.seeds_per_process=K``: K seeds of one configuration trained in one process as one vectorised
model, each with its own run folder and records, written as K separate runs would write them.

* :class:`Stack` keeps the K models' parameters and buffers in stacked ``(K, ...)`` tensors; each model's
  own tensors become views of its slice. Its method's hooks, its optimizer, its checkpoint and its
  evaluation then work on it as on a model of its own, while one forward and one backward
  (``torch.func.vmap`` over ``functional_call``) serve all K: on a GPU, where small networks are bound by
  kernel launches, that is K times fewer launches for the forward and backward.
* :class:`SharedOptimizer` takes the K seeds' optimizer steps as one step over the stacked parameters;
  each seed's own optimizer keeps its hyper-parameters and views of its slice of the state.
* :func:`drive` steps K engines (:meth:`qexp.run.engine.Engine.steps`) in lockstep: they ask for their
  steps together and each is sent its own slice of the stacked step.
* :func:`keep_previous` and :func:`agree` make a killed group resumable: a kill between the K
  checkpoint writes of one save point leaves some seeds one save point ahead; they are rewound to the
  checkpoint they kept.

Not bit-identical to separate runs: under ``vmap`` a convolution runs as one grouped convolution and a
linear layer as a batched matrix product, whose sums round differently (about 1e-6 relative after one
step); everything elementwise (the optimizers, the methods' rounding) is the same. Each seed's
checkpoint is a separate run's checkpoint: a seed can be resumed on its own.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.utils import parametrize

from qexp.errors import QexpError
from qexp.run import checkpoint
from qexp.run.engine import StepRequest, StepResult

#: the checkpoint a seed of a group kept from its previous save point (see :func:`agree`)
PREVIOUS = "checkpoint.prev.pt"


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def _plain(module: nn.Module) -> nn.Module:
    """A parametrized layer as a layer of its own class whose tensors are the originals (the
    parametrizations are applied to the stacked originals instead). ``remove_parametrizations`` would
    change the class that every copy of the model shares."""
    plain = object.__new__(type(module).__bases__[0])  # parametrize made a subclass of the layer's class
    plain.__dict__ = dict(module.__dict__)
    plain._parameters = dict(module._parameters)
    plain._modules = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    for tensor_name, plist in module.parametrizations.items():
        plain._parameters[tensor_name] = plist.original
    return plain


class Stack:
    """K models of one structure as one vectorised model (see the module docstring).

    A parametrized tensor (a weight quantizer attached by the method) is stacked as its float original;
    the forward applies the parametrization to the stacked original, outside ``vmap``, so it must be
    elementwise with settings shared by the K seeds (the methods that say :attr:`Method.vectorizable`).
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.models = list(models)
        first = self.models[0]
        self.base = copy.deepcopy(first)  # the structure the stacked tensors are run through
        #: original name -> (name in ``base``, the parametrizations to apply), for parametrized tensors
        self.parametrized: dict[str, tuple[str, list[nn.Module]]] = {}
        for prefix, module in list(self.base.named_modules()):
            if not parametrize.is_parametrized(module):
                continue
            for tensor_name, plist in module.parametrizations.items():
                original = f"{prefix}.parametrizations.{tensor_name}.original".lstrip(".")
                self.parametrized[original] = (f"{prefix}.{tensor_name}".lstrip("."), list(plist))
            parent, _, child = prefix.rpartition(".")
            setattr(self.base.get_submodule(parent) if parent else self.base, child, _plain(module))
        self.params = {name: nn.Parameter(self._stack(name), requires_grad=p.requires_grad)
                       for name, p in first.named_parameters()}
        self.buffers = {name: self._stack(name) for name, _ in first.named_buffers()}
        #: every model's parameters in the order of ``params``: where each one's gradient slice goes
        self.model_params = [[_tensor(m, name) for name in self.params] for m in self.models]
        self._forward = vmap(self._one, randomness="different")

    def _stack(self, name: str) -> torch.Tensor:
        """The models' tensor ``name`` stacked; each model's tensor becomes a view of its slice."""
        stacked = torch.stack([_tensor(m, name).detach() for m in self.models])
        for m, view in zip(self.models, stacked):
            _tensor(m, name).data = view
        return stacked

    def _one(self, tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
             x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (tensors, buffers), (x,))

    def _tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            if name in self.parametrized:
                plain, fns = self.parametrized[name]
                t: torch.Tensor = p
                for fn in fns:
                    t = fn(t)
                out[plain] = t
            else:
                out[name] = p
        return out

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """``xs`` of shape ``(K, batch, ...)``, one batch per seed -> logits ``(K, batch, classes)``,
        in training mode (BatchNorm statistics of each seed updated in its own slice)."""
        self.base.train()
        for _, fns in self.parametrized.values():
            for fn in fns:
                fn.train()
        return self._forward(self._tensors(), self.buffers, xs)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def hand_out_grads(self) -> None:
        """Each model's parameters get their slice of the stacked gradients (views: what a method's
        ``after_backward`` changes in place, the optimizer sees)."""
        grads = [p.grad for p in self.params.values()]
        for i, own in enumerate(self.model_params):
            for p, g in zip(own, grads):
                p.grad = None if g is None else g[i]

    def aliased(self) -> bool:
        """Whether every model's parameters and buffers are still views of the stacked tensors (a hook
        that replaced ``p.data`` would have cut its model loose)."""
        for name, stacked in [*self.params.items(), *self.buffers.items()]:
            for i, m in enumerate(self.models):
                if _tensor(m, name).data_ptr() != stacked[i].data_ptr():
                    return False
        return True

    @torch.no_grad()
    def check(self, xs: torch.Tensor) -> None:
        """One forward on ``xs`` with copies of the buffers (the models' state is not changed): a model
        with an operation ``vmap`` cannot batch is refused here, before any run folder is made."""
        saved = {n: b.clone() for n, b in self.buffers.items()}
        try:
            self.forward(xs)
        except Exception as e:  # an operation without a batching rule, a data-dependent shape, ...
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise QexpError(f"trainer.seeds_per_process: this model cannot be stacked into one vectorised "
                            f"model ({type(e).__name__}: {line}); train its seeds separately") from None
        finally:
            for n, b in self.buffers.items():
                b.copy_(saved[n])


class SharedOptimizer:
    """One optimizer over the stacked parameters that takes the K seeds' optimizer steps in one go.

    Each seed keeps its own optimizer: its schedule sets the hyper-parameters (copied here before every
    step; a group's seeds share them) and, once the state exists, its state holds views of the seed's
    slices of the stacked state, so its ``state_dict`` is what a separate run's would be and a resume
    loads into it (stacked here before the next step). The optimizer's update is elementwise, so each
    slice gets its seed's own update (foreach kernels may round a last bit differently from the
    per-seed lists; the group's resume is exact either way)."""

    def __init__(self, stack: Stack, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.stack, self.optimizers = stack, list(optimizers)
        names = list(stack.params)
        #: per seed: its parameter object -> the stacked parameter's name
        self._names = [{id(p): n for n, p in zip(names, own)} for own in stack.model_params]
        groups = []
        for g in self.optimizers[0].param_groups:
            if any(id(p) not in self._names[0] for p in g["params"]):
                raise QexpError("trainer.seeds_per_process: the optimizer holds tensors outside the model")
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [stack.params[self._names[0][id(p)]] for p in g["params"]]})
        self.shared = type(self.optimizers[0])(groups)
        self._linked = False

    def _seed_params(self, i: int) -> dict[str, torch.Tensor]:
        return {self._names[i][id(p)]: p for g in self.optimizers[i].param_groups for p in g["params"]}

    def _adopt(self) -> None:
        """The seeds' optimizer states (loaded by a resume) stacked into the shared optimizer's."""
        seeds = [self._seed_params(i) for i in range(len(self.optimizers))]
        for name, stacked in self.stack.params.items():
            states = [opt.state.get(params[name]) for opt, params in zip(self.optimizers, seeds)]
            if not states[0]:
                continue
            own = seeds[0][name]
            self.shared.state[stacked] = {
                k: torch.stack([s[k] for s in states]) if torch.is_tensor(v) and v.shape == own.shape else
                (v.clone() if torch.is_tensor(v) else v) for k, v in states[0].items()}

    def _link(self) -> None:
        """Each seed's optimizer state as views of its slices of the shared state."""
        for i, opt in enumerate(self.optimizers):
            for name, p in self._seed_params(i).items():
                state = self.shared.state.get(self.stack.params[name])
                if state:
                    opt.state[p] = {k: v[i] if torch.is_tensor(v) and v.dim() == p.dim() + 1 else v
                                    for k, v in state.items()}
        self._linked = True

    def step(self, active: Sequence[int]) -> None:
        """The optimizer step of every seed (those in ``active`` own the hyper-parameters)."""
        if not self._linked:
            self._adopt()
        for shared, own in zip(self.shared.param_groups, self.optimizers[active[0]].param_groups):
            for k, v in own.items():
                if k != "params":
                    shared[k] = v
        self.shared.step()
        for i in active:  # each seed's optimizer took its step here: what torch's step wrapper marks, so
            self.optimizers[i]._opt_called = True  # type: ignore[attr-defined]  # its scheduler does not warn
        if not self._linked:
            self._link()


T = TypeVar("T")

#: the vectorised step of a group: the K requests (None for a seed that has finished) and the indices of
#: the seeds still training -> each active seed's step result
GroupStep = Callable[[list[StepRequest | None], list[int]], dict[int, StepResult]]


class StepClock:
    """Seconds spent in a group's shared steps: each seed's ``train_clock``, so that its epoch's
    ``images_per_s`` counts the group's training time and not the other seeds' evaluations. On a GPU
    the steps only queue work: the waits for it, at the engines' sync points (:meth:`waiting`), count
    too."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Time spent inside (an engine reading its running sums: the wait for the queued steps) counts."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


#: the run folder of the seed whose engine is running now (None: no seed's, or not a group)
_TURN: ContextVar[Path | None] = ContextVar("qexp_seed_turn", default=None)


@contextlib.contextmanager
def turn(run_dir: Path | None) -> Iterator[None]:
    """While a seed's engine runs: log records go to that seed's train.log only (:func:`log_filter`)."""
    token = _TURN.set(run_dir)
    try:
        yield
    finally:
        _TURN.reset(token)


def log_filter(run_dir: Path) -> Callable[[logging.LogRecord], bool]:
    """For a run folder's train.log handler: records made while another seed's engine runs stay out."""
    return lambda record: _TURN.get() in (None, run_dir)


def drive(gens: Sequence[Generator[StepRequest, StepResult, T]], take: GroupStep,
          clock: StepClock | None = None, run_dirs: Sequence[Path] | None = None) -> list[T]:
    """Run step generators (the engines' :meth:`~qexp.run.engine.Engine.steps`, or one epoch of them) in
    lockstep to their ends and return what each returns; each round's steps are taken together by
    ``take`` (timed on ``clock``). A seed that ends early (diverged, stopped early by ``patience``)
    drops out; the others go on. ``run_dirs``: each generator's run folder, whose log gets what it logs."""
    requests: list[StepRequest | None] = [None] * len(gens)
    outcomes: list[T | None] = [None] * len(gens)

    def advance(i: int, result: StepResult | None) -> None:
        try:
            with turn(None if run_dirs is None else run_dirs[i]):
                requests[i] = next(gens[i]) if result is None else gens[i].send(result)
        except StopIteration as end:
            requests[i], outcomes[i] = None, end.value

    for i in range(len(gens)):
        advance(i, None)
    while True:
        active = [i for i, r in enumerate(requests) if r is not None]
        if not active:
            break
        if len({requests[i][2] for i in active}) != 1:  # type: ignore[index]
            raise RuntimeError("seeds of one group asked for different steps")  # a bug, not an input
        t0 = time.perf_counter()
        results = take(requests, active)
        if clock is not None:
            clock.seconds += time.perf_counter() - t0
        for i in active:
            advance(i, results[i])
    return outcomes  # type: ignore[return-value]


def forget_previous(run_dir: Path, status: str) -> None:
    """A seed that has finished (by the group or alone) no longer needs the checkpoint it kept."""
    if status != "interrupted":
        (run_dir / PREVIOUS).unlink(missing_ok=True)


def keep_previous(path: Path) -> None:
    """Before a seed of a group overwrites its checkpoint: keep the current one as :data:`PREVIOUS`
    (a hard link, a copy where links are not supported)."""
    if not path.exists():
        return
    prev = path.with_name(PREVIOUS)
    tmp = path.with_name(f".{PREVIOUS}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, prev)


def agree(run_dirs: Sequence[Path], name: str, device: torch.device) -> list[dict[str, Any] | None]:
    """The checkpoints the seeds of a group resume from (None: starts fresh), all at one step.

    A seed one save point ahead of the others (killed between the K writes) is rewound to the
    checkpoint it kept (:data:`PREVIOUS`); seeds whose checkpoints cannot be brought to one step (one
    was resumed alone meanwhile) are refused in one line."""
    states = [checkpoint.load(d / name, map_location=device) if (d / name).exists() else None for d in run_dirs]
    steps = [int(s["progress"]["step"]) if s is not None else 0 for s in states]
    target = min(steps)
    for i, d in enumerate(run_dirs):
        if steps[i] == target:
            continue
        prev = d / PREVIOUS
        if target == 0 and not prev.exists():  # killed during the first save point: start afresh
            states[i] = None
            continue
        state = checkpoint.load(prev, map_location=device) if prev.exists() else None
        if state is None or int(state["progress"]["step"]) != target:
            where = ", ".join(f"{d}: step {s}" for d, s in zip(run_dirs, steps))
            raise QexpError(f"trainer.seeds_per_process: the seeds of this group stopped at different points "
                            f"({where}); resume them separately (without trainer.seeds_per_process)")
        states[i] = state
    return states
