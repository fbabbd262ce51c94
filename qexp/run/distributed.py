"""Data-parallel training: process groups, DDP wrapping, sharded data, agreement between processes.

Two ways in, one code path: ``torchrun --nproc_per_node=N -m qexp.run.train ...`` (the environment names
the rank) or ``qexp train trainer.devices=N`` (:func:`spawn` starts the N processes itself). Every
process builds the same model from the same seed and every method draws from generators seeded by the
config, so the processes stay identical as long as they see identical gradients; DDP averages those.
Decisions that end a loop early (a stop signal, a diverged loss) are agreed by all processes, or one of
them would wait forever in the next collective.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qexp.data import DataBundle
from qexp.errors import QexpError

log = logging.getLogger("qexp")


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place in the job; the default is a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: a gloo group for small CPU-side agreements (stop flag, fingerprints) without GPU syncs
    control: Any = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Context()


def env_ranks() -> tuple[int, int, int] | None:
    """(rank, world, local_rank) when launched by torchrun with more than one process, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def check_backend(name: object) -> None:
    """``trainer.backend`` is one torch.distributed knows (checked on every run: a typo in a one-process run
    is caught before the sweep that uses it)."""
    if name not in ("auto", "gloo", "nccl"):
        raise QexpError(f"trainer.backend must be auto, gloo or nccl; got {name!r}")


def pick_backend(name: str, device: torch.device) -> str:
    check_backend(name)
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise QexpError("trainer.backend=nccl needs CUDA devices; use gloo (or auto) on CPU")
    return name


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per process (cuda:local_rank); CPU processes share the CPU."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise QexpError(f"process {local_rank} needs GPU {local_rank}, but only "
                        f"{torch.cuda.device_count()} are visible; lower trainer.devices")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(rank: int, world: int, local_rank: int, backend: str, init_method: str = "env://") -> Context:
    """Join (or reuse) the default process group; add a gloo control group beside nccl."""
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return Context(rank, world, local_rank, control)


@contextlib.contextmanager
def joined(rank: int, world: int, local_rank: int, backend: str, init_method: str = "env://") -> Iterator[Context]:
    """:func:`init` for the block; leaving it normally, every process waits for the others (a process exiting
    with its gloo group alive while a peer closed its own aborted, "terminate called without an active
    exception"); the group is destroyed however the block ends."""
    try:
        yield init(rank, world, local_rank, backend, init_method)
        barrier()
    finally:
        shutdown()


def barrier() -> None:
    """Wait for every process of the group (nothing outside one)."""
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- data and model ----------------------------------------------------------------------------------
def check_batch_share(batch_size: int, world: int) -> None:
    """Every process must get an equal share of each batch."""
    if batch_size % world:
        raise QexpError(f"batch_size={batch_size} is not divisible by the {world} processes; every process "
                        "must get an equal share of each batch (change batch_size or trainer.devices)")


def shard_data(data: DataBundle, ctx: Context) -> DataBundle:
    """Each process takes positions rank::world of every global batch (the batch size stays global)."""
    if not ctx.enabled:
        return data
    for loader in (data.train, data.test, data.val):
        if loader is not None and not hasattr(loader, "shard"):
            raise QexpError(f"dataset {data.name} has a loader without shard(); it cannot train with DDP")
    check_batch_share(data.train.batch_size, ctx.world)

    def shard(loader: Any, equal: bool) -> Any:
        return None if loader is None else loader.shard(ctx.rank, ctx.world, equal)

    return dataclasses.replace(data, train=shard(data.train, True), test=shard(data.test, False),
                               val=shard(data.val, False))


def _sum_hook(group, bucket):  # noqa: ANN001, ANN202
    """Sum (not average) gradients: for losses that are sums over the batch (WAGE's SSE).

    Not annotated: ``register_comm_hook`` compares the annotations with ``dist.GradBucket`` and
    ``torch.futures.Future[torch.Tensor]`` themselves, and this module's postponed annotations are
    strings, which it refused ("bucket annotation should be dist.GradBucket"): every summed-loss run
    under DDP failed."""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def wrap_model(model: nn.Module, ctx: Context, device: torch.device, loss_is_sum: bool,
               find_unused_parameters: bool) -> nn.Module:
    """The DDP wrapper used for the training forward; ``model`` itself stays what hooks see.

    DDP averages gradients, which equals the single-process gradient of a batch-mean loss over equal
    shards; a summed loss needs the sum instead.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
    if loss_is_sum:
        ddp.register_comm_hook(None, _sum_hook)
    return ddp


def sync_extra_params(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Context,
                      loss_is_sum: bool) -> int:
    """Average the gradients of optimized tensors that live outside the model (method-owned).

    DDP only sees the model's parameters; a method's own trainable tensors would otherwise drift
    apart between processes. Returns how many tensors got a hook.
    """
    inside = {id(p) for p in model.parameters()}
    extra = [p for g in optimizer.param_groups for p in g["params"]
             if id(p) not in inside and p.requires_grad]

    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        if not loss_is_sum:
            p.grad.div_(ctx.world)

    for p in extra:
        p.register_post_accumulate_grad_hook(hook)
    return len(extra)


def reducer(ctx: Context) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum a tensor over all processes (a copy; the input is left alone)."""

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    return reduce


def agreed(local: Callable[[], bool], ctx: Context) -> Callable[[], bool]:
    """A stop flag that is true on every process as soon as it is true on one.

    Every process calls it at the same points of the loop (once per step), so the collective lines up;
    it runs on the CPU control group, so it costs no GPU synchronisation.
    """

    def check() -> bool:
        flag = torch.tensor([1 if local() else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.control)
        return bool(flag.item())

    return check


# ---- consistency ---------------------------------------------------------------------------------------
def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def weights_digest(model: nn.Module, method_state: dict[str, Any]) -> str:
    """A hash of everything that must agree between processes: parameters and buffers, the weights as
    the forward sees them (quantized, through parametrizations), and the method's state (its
    ``state_dict()``, handed over by the run session). Not BatchNorm's running statistics: each process
    keeps its own share's, as in any DDP run (every run with BatchNorm was reported inconsistent). Not
    the configuration's fingerprint (:func:`qexp.run.identity.fingerprint`)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.utils import parametrize

    h = hashlib.sha256()

    def add(name: str, t: torch.Tensor) -> None:
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    per_process = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, _BatchNorm)
                   for b, _ in m.named_buffers(recurse=False)}
    with torch.no_grad():
        for name, t in _tensors({k: v for k, v in model.state_dict().items() if k not in per_process}, "model"):
            add(name, t)
        for mname, m in model.named_modules():
            if parametrize.is_parametrized(m):
                for pname in m.parametrizations:
                    add(f"effective.{mname}.{pname}", getattr(m, pname))
        for name, t in _tensors(method_state, "method"):
            add(name, t)
    return h.hexdigest()


def consistent(model: nn.Module, method_state: dict[str, Any], ctx: Context) -> bool:
    """True when every process holds bit-identical weights (as used) and method state."""
    if not ctx.enabled:
        return True
    mine = weights_digest(model, method_state)
    everyone: list[Any] = [None] * ctx.world
    dist.all_gather_object(everyone, mine, group=ctx.control)
    return all(f == mine for f in everyone)


# ---- trainer.devices=N: start the processes ourselves --------------------------------------------------
def spawn(world: int, worker: Callable[..., None], payload: Any, folder: Path,
          threads: int | None = None) -> None:
    """Run ``worker(rank, world, init_method, payload, errors)`` in ``world`` fresh processes.

    Rendezvous goes through a file store in ``folder`` (the run's: one machine, no port to pick, nothing
    written outside ``out_root``; a ``.*.tmp`` name, so a store left by a killed run is swept when the run
    folder is opened again). Stop signals that reach this
    process are passed on to the workers as SIGTERM, so they checkpoint at the same step; a worker's
    :class:`QexpError` comes back as one clear message.
    """
    import torch.multiprocessing as mp

    from qexp.run.preempt import stop_on_signals

    store = Path(folder) / f".ddp-store.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    errors = mp.get_context("spawn").SimpleQueue()
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the workers: no oversubscription
    pc = mp.start_processes(worker, args=(world, f"file://{store}", payload, errors), nprocs=world,
                            join=False, start_method="spawn")

    def forward(signum: int) -> None:
        for p in pc.processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    try:
        with stop_on_signals(forward=forward):
            while not pc.join():
                pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        if not errors.empty():
            raise QexpError(errors.get()) from None
        raise RuntimeError(f"a training process failed: {e}") from None
    finally:
        store.unlink(missing_ok=True)


def worker_logging(run_dir: Path, is_main: bool) -> None:
    """What Hydra does for the job process: console plus ``train.log``, on the main process only."""
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


class DataParallel:
    """One process of a data-parallel run, as :class:`qexp.run.session.Trainer` uses it: sharded batches,
    the DDP-wrapped training forward, sums over processes, an agreed stop, and a final consistency check.

    The method keeps the full data (its finalize must agree on every process); only the trainer's loaders
    are sharded.
    """

    def __init__(self, ctx: Context, device: torch.device, find_unused_parameters: bool = False) -> None:
        self.ctx, self.device, self.find_unused_parameters = ctx, device, find_unused_parameters
        self._reduce = reducer(ctx)

    def shard(self, data: DataBundle) -> DataBundle:
        return shard_data(data, self.ctx)

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_is_sum: bool) -> nn.Module:
        """The DDP wrapper for the forward, plus gradient averaging of method-owned optimized tensors."""
        ddp = wrap_model(model, self.ctx, self.device, loss_is_sum, self.find_unused_parameters)
        sync_extra_params(model, optimizer, self.ctx, loss_is_sum)
        return ddp

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t)

    def agree(self, local: Callable[[], bool]) -> Callable[[], bool]:
        return agreed(local, self.ctx)

    def summary(self, model: nn.Module, method_state: dict[str, Any]) -> dict[str, Any]:
        """For metrics.json: the world size and whether every process ended bit-identical."""
        return {"world_size": self.ctx.world, "ranks_consistent": consistent(model, method_state, self.ctx)}
