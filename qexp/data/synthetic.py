"""A learnable fake dataset for smoke tests: class-dependent mean images plus noise, made in memory."""

from __future__ import annotations

import torch

from qexp.data import DataBundle
from qexp.data.common import in_memory_bundle, make_normalize
from qexp.errors import check_range


def make(n: int, shape: tuple[int, int, int], num_classes: int,
         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand((num_classes, *shape), generator=g) * 255
    y = torch.randint(0, num_classes, (n,), generator=g)
    noise = torch.randn((n, *shape), generator=g) * 40
    x = (protos[y] + noise).clamp(0, 255).to(torch.uint8)
    return x, y


def build(
    channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    train_samples: int = 512,
    test_samples: int = 256,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    augment: bool = False,
    train_subset: int | None = None,
    val_size: int = 0,
    seed: int = 0,
    device: str = "cpu",
    normalize: str = "standard",
    root: str = "",  # accepted for a uniform builder signature; nothing is read from disk
) -> DataBundle:
    for key, value, lo in (("channels", channels, 1), ("image_size", image_size, 1), ("num_classes", num_classes, 2),
                           ("train_samples", train_samples, 1), ("test_samples", test_samples, 1)):
        check_range(f"dataset.{key}", int(value), lo)
    shape = (channels, image_size, image_size)
    x, y = make(train_samples + test_samples, shape, num_classes, seed=1234)
    train = (x[:train_samples], y[:train_samples])
    test = (x[train_samples:], y[train_samples:])
    norm = make_normalize(normalize, (0.5,) * channels, (0.25,) * channels)
    return in_memory_bundle("synthetic", train, test, num_classes, norm, batch_size, eval_batch_size,
                            augment, train_subset, val_size, seed, device)
