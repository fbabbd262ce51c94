"""Train subset and validation split, shared by the in-memory datasets."""

from __future__ import annotations

import torch

from qexp.errors import QexpError


def subset_and_split(
    x: torch.Tensor, y: torch.Tensor, train_subset: int | None, val_size: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """Take the first ``train_subset`` samples, then hold out the last ``val_size`` as validation.

    Deterministic (no shuffle) so that a subset means the same images on every machine.
    """
    n = len(y)
    if train_subset is not None:
        if not 0 < train_subset <= n:
            raise QexpError(f"dataset.train_subset must be in 1..{n}, got {train_subset}")
        x, y = x[:train_subset], y[:train_subset]
        n = train_subset
    if val_size:
        if not 0 < val_size < n:
            raise QexpError(f"dataset.val_size must be in 0..{n - 1}, got {val_size}")
        return (x[: n - val_size], y[: n - val_size]), (x[n - val_size :], y[n - val_size :])
    return (x, y), None
