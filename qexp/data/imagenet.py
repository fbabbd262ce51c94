"""ImageNet (or any ImageFolder tree with ``train/`` and ``val/``) through torchvision and a DataLoader.

Too big for memory, so this path uses worker processes and the standard transforms. The loader keeps
the same interface as :class:`~qexp.data.loader.TensorLoader` (``set_epoch``, ``iter_from``) so the
trainer and mid-epoch resume do not care which kind they hold.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from qexp.data import DataBundle
from qexp.data.common import missing_data_error
from qexp.errors import QexpError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class EpochSampler(Sampler[int]):
    """Random order that is a pure function of (seed, epoch): resumable without sampler state."""

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ShardSampler(Sampler[int]):
    """This process's share (positions rank::world) of every global batch of an :class:`EpochSampler`.

    With ``equal`` each global batch is first trimmed to a multiple of ``world`` (DDP training needs
    the same number of samples on every process); evaluation keeps every sample.
    """

    def __init__(self, base: EpochSampler, batch_size: int, rank: int, world: int, equal: bool) -> None:
        self.base, self.batch_size, self.rank, self.world, self.equal = base, batch_size, rank, world, equal

    def __iter__(self) -> Iterator[int]:
        order = list(iter(self.base))
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo : lo + self.batch_size]
            keep = len(chunk) - len(chunk) % self.world if self.equal else len(chunk)
            yield from chunk[self.rank : keep : self.world]

    def __len__(self) -> int:
        n, b, w = self.base.n, self.batch_size, self.world
        tail = n % b
        if self.equal:
            return n // b * (b // w) + tail // w
        return sum(len(range(self.rank, min(b, n - lo), w)) for lo in range(0, n, b))


class FolderLoader:
    """DataLoader over an ImageFolder with resumable epoch order."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int,
                 device: torch.device | str) -> None:
        self.sampler = EpochSampler(len(dataset), seed, shuffle)
        self.device = torch.device(device)
        self.dataset, self.workers = dataset, workers
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        self.batch_size = batch_size

    def shard(self, rank: int, world: int, equal: bool) -> FolderLoader:
        """A loader over this process's share of each global batch (see :class:`ShardSampler`).

        Only this share is decoded; the per-process batch is ``batch_size // world``.
        """
        view = copy.copy(self)
        sampler = ShardSampler(self.sampler, self.batch_size, rank, world, equal)
        view.loader = DataLoader(self.dataset, batch_size=max(1, self.batch_size // world), sampler=sampler,
                                 num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=self.workers > 0)
        return view

    @property
    def num_samples(self) -> int:
        return self.sampler.n

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Skipping whole batches still decodes them; acceptable for the rare mid-epoch resume.
        for x, y in itertools.islice(self.loader, start_batch, None):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def build(
    root: str = "./data",
    dirname: str = "imagenet",
    image_size: int = 224,
    batch_size: int = 256,
    eval_batch_size: int = 256,
    workers: int = 4,
    augment: bool = True,
    train_subset: int | None = None,
    val_size: int = 0,
    seed: int = 0,
    device: str = "cpu",
) -> DataBundle:
    from torchvision import datasets, transforms

    base = Path(root).expanduser() / dirname
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        raise missing_data_error("ImageNet", base, ["train/<wnid>/*.JPEG", "val/<wnid>/*.JPEG"],
                                 " (torchvision's ImageFolder layout; dataset.dirname=NAME reads another folder "
                                 "below the data root, e.g. imagenette-mini)", downloadable=False)
    if val_size:
        raise QexpError("dataset.val_size is not supported for ImageFolder datasets; use the val/ folder")
    if image_size < 1:
        raise QexpError(f"dataset.image_size must be a positive number of pixels, got {image_size}")
    if workers < 0:
        raise QexpError(f"dataset.workers must be 0 (load in the training process) or more, got {workers}")
    norm = transforms.Normalize(MEAN, STD)
    resize = int(round(image_size * 256 / 224))
    if augment:
        train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size),
                                       transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    else:
        train_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                       transforms.ToTensor(), norm])
    test_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size),
                                  transforms.ToTensor(), norm])
    train_set: Dataset = datasets.ImageFolder(str(base / "train"), transform=train_tf)
    test_set = datasets.ImageFolder(str(base / "val"), transform=test_tf)
    if train_set.classes != test_set.classes:
        raise QexpError(f"{base}: train/ and val/ hold different class folders")
    num_classes = len(train_set.classes)
    if train_subset is not None:
        if not 0 < train_subset <= len(train_set):
            raise QexpError(f"dataset.train_subset must be in 1..{len(train_set)}, got {train_subset}")
        train_set = torch.utils.data.Subset(train_set, range(train_subset))
    return DataBundle(
        name="imagenet",
        train=FolderLoader(train_set, batch_size, True, seed, workers, device),
        test=FolderLoader(test_set, eval_batch_size, False, seed, workers, device),
        num_classes=num_classes,
        in_shape=(3, image_size, image_size),
        info={"train_samples": len(train_set), "test_samples": len(test_set)},
        sources=(base / "train", base / "val"),  # the run's identity: each folder's listing (source_sha1)
    )
