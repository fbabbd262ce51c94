"""Helpers shared by the dataset builders: device choice, the missing-data message, loaders."""

from __future__ import annotations

from pathlib import Path

import torch

from qexp.data import DataBundle
from qexp.data.loader import Normalize, TensorLoader
from qexp.data.split import subset_and_split
from qexp.errors import QexpError

# normalize="signed" maps pixels to [-1, 1] (WAGE's CIFAR input range); "byte256" to X/256 in [0, 1)
# (WAGE's official MNIST code); "standard" uses dataset statistics.
SIGNED = "signed"
BYTE256 = "byte256"


def missing_data_error(name: str, folder: Path, files: list[str], hint: str = "") -> QexpError:
    listing = "\n".join(f"  {folder / f}" for f in files)
    return QexpError(
        f"{name} was not found and could not be downloaded (offline?).\n"
        f"qexp looks for these files:\n{listing}\n"
        f"Put them there, or point the data root at a folder that holds them "
        f"(environment variable QEXP_DATA or data_root=...).{hint}"
    )


def make_normalize(kind: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Normalize:
    if kind == "standard":
        return Normalize(mean, std)
    if kind == SIGNED:
        c = len(mean)
        return Normalize((0.5,) * c, (0.5,) * c)
    if kind == "none":
        c = len(mean)
        return Normalize((0.0,) * c, (1.0,) * c)
    if kind == BYTE256:
        c = len(mean)
        return Normalize((0.0,) * c, (1.0,) * c, divisor=256.0)
    raise QexpError(f"dataset.normalize must be one of standard, signed, byte256, none; got {kind!r}")


def in_memory_bundle(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    norm: Normalize,
    batch_size: int,
    eval_batch_size: int,
    augment: bool,
    train_subset: int | None,
    val_size: int,
    seed: int,
    device: str | torch.device,
) -> DataBundle:
    """Wrap uint8 tensors into shuffled/augmented train and plain eval loaders."""
    (xtr, ytr), val = subset_and_split(*train, train_subset, val_size)
    train_loader = TensorLoader(xtr, ytr, batch_size, norm, shuffle=True, augment=augment, seed=seed,
                                device=device)
    test_loader = TensorLoader(*test, eval_batch_size, norm, device=device)
    val_loader = TensorLoader(*val, eval_batch_size, norm, device=device) if val else None
    c, h, w = xtr.shape[1:]
    return DataBundle(name=name, train=train_loader, test=test_loader, val=val_loader,
                      num_classes=num_classes, in_shape=(c, h, w),
                      info={"train_samples": len(ytr), "test_samples": len(test[1])})
