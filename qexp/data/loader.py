"""In-memory batch loader: uint8 tensors on the training device, normalised and augmented per batch.

MNIST and CIFAR fit in memory, so the hot loop has no per-sample Python and no worker processes.
Shuffling is a pure function of (seed, epoch) so that a run resumed mid-epoch replays exactly the
same batches; augmentation draws from a generator seeded by (seed, epoch, batch).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _seeded(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    h = seed
    for k in keys:
        h = (h * 1_000_003 + k + 1) % (2**62)
    g.manual_seed(h)
    return g


@dataclass
class Normalize:
    """Per-channel affine normalisation of uint8 images: (x/divisor - mean) / std (divisor 255, or 256
    for WAGE's MNIST inputs X/256 in [0, 1), exact in float)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    divisor: float = 255.0
    # (mean, std) as (1, C, 1, 1) tensors per device, built once instead of on every batch
    _stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        stats = self._stats.get(x.device)
        if stats is None:
            c = len(self.mean)
            stats = (torch.tensor(self.mean, device=x.device).view(1, c, 1, 1),
                     torch.tensor(self.std, device=x.device).view(1, c, 1, 1))
            self._stats[x.device] = stats
        mean, std = stats
        return x.float().div_(self.divisor).sub_(mean).div_(std)


class TensorLoader:
    """Iterates (images, labels) batches over in-memory uint8 images of shape (N, C, H, W)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        normalize: Normalize,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = batch_size
        self.normalize = normalize
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        # data-parallel share (see shard()): this process takes positions rank::world of every batch
        self.rank, self.world, self.equal = 0, 1, False
        #: yield shuffled batches as :class:`Rows` (their indices), gathered later by :func:`stack_batches`
        #: together with other runs' batches of the same images (seeds stacked in one process)
        self.defer = False

    def __len__(self) -> int:
        n, b = len(self.labels), self.batch_size
        if self.world > 1 and self.equal:  # a tail too small to give every process a sample is dropped
            return n // b + int(n % b >= self.world)
        return (n + b - 1) // b

    def shard(self, rank: int, world: int, equal: bool) -> TensorLoader:
        """A view yielding only this process's share of each global batch (``batch_size`` stays global).

        The order and augmentation are still drawn for the whole batch, so the union over processes is
        exactly the single-process batch. ``equal`` (training) trims each batch to a multiple of
        ``world`` so every process gets the same number of samples (DDP averages per-process means);
        evaluation keeps every sample.
        """
        view = copy.copy(self)
        view.rank, view.world, view.equal = rank, world, equal
        return view

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches from ``start_batch`` on (resume mid-epoch)."""
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=_seeded(self.seed, self.epoch)).to(self.device)
        else:
            order = None
        for b in range(start_batch, len(self)):
            lo, hi = b * self.batch_size, min(n, (b + 1) * self.batch_size)
            idx = order[lo:hi] if order is not None else slice(lo, hi)
            if self.defer and order is not None and not self.augment and self.world == 1:
                rows = Rows(self, idx)
                yield rows, rows
                continue
            x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = crop_flip(x, _seeded(self.seed, self.epoch, b))
            if self.world > 1:
                keep = len(y) - len(y) % self.world if self.equal else len(y)
                x, y = x[self.rank : keep : self.world], y[self.rank : keep : self.world]
                if len(y) == 0:
                    continue
            yield self.normalize(x), y


class Rows:
    """A batch not yet gathered: its loader and row indices (a deferred loader's batch, both its images
    and its labels); ``len`` is its number of examples."""

    def __init__(self, loader: TensorLoader, idx: torch.Tensor) -> None:
        self.loader, self.idx = loader, idx

    def __len__(self) -> int:
        return len(self.idx)

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loader.normalize(self.loader.images[self.idx]), self.loader.labels[self.idx]


def same_data(a: TensorLoader, b: TensorLoader) -> bool:
    """Whether two loaders hold the same images, labels and normalisation (one gather may serve both)."""
    def same(u: torch.Tensor, v: torch.Tensor) -> bool:
        return u is v or (u.shape == v.shape and u.device == v.device and bool(torch.equal(u, v)))

    return same(a.images, b.images) and same(a.labels, b.labels) and a.normalize == b.normalize


def stack_batches(batches: list[tuple[object, object]]) -> tuple[torch.Tensor, torch.Tensor]:
    """K batches of one size as ``(K, B, ...)`` images and ``(K, B)`` labels. Deferred batches
    (:class:`Rows`) of one loader's data are gathered and normalised in one go (a few kernels for all
    K instead of a few each: the same values, the operations being per element)."""
    rows = [x for x, _ in batches]
    if all(isinstance(r, Rows) for r in rows):
        first = rows[0].loader  # type: ignore[union-attr]
        k, n = len(rows), len(rows[0])  # type: ignore[arg-type]
        idx = torch.cat([r.idx for r in rows])  # type: ignore[union-attr]
        x, y = first.normalize(first.images[idx]), first.labels[idx]
        return x.view(k, n, *x.shape[1:]), y.view(k, n)
    pairs = [x.gather() if isinstance(x, Rows) else (x, y) for x, y in batches]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])  # type: ignore[misc]


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Pad-``pad`` random crop and horizontal flip for a whole uint8 batch at once. The offsets and flips
    are drawn on the host generator ``gen`` (the same numbers on every device) and reach a GPU in one
    asynchronous copy from pinned memory: a plain copy from the host waits for the queued GPU work."""
    n, _, h, w = x.shape
    draws = torch.stack([torch.randint(0, 2 * pad + 1, (n,), generator=gen),
                         torch.randint(0, 2 * pad + 1, (n,), generator=gen),
                         (torch.rand(n, generator=gen) < 0.5).long()])
    if x.is_cuda:
        draws = draws.pin_memory().to(x.device, non_blocking=True)
    dx, dy, flip = draws[0], draws[1], draws[2].bool()
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h)).view(n, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, w)
    cols = torch.where(flip.view(n, 1), w - 1 - cols, cols) + dx.view(n, 1)
    cols = cols.view(n, 1, 1, w)
    c = x.shape[1]
    bi = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows, cols]
