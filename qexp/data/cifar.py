"""CIFAR-10/100 from the published python pickle batches (``cifar-10-batches-py``, ``cifar-100-python``)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from qexp.data import DataBundle
from qexp.data.common import in_memory_bundle, make_normalize, missing_data_error
from qexp.errors import QexpError
from qexp.jsonio import without_new_folders

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def read_batches(files: list[Path], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        try:
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise QexpError(f"{f} is not a readable CIFAR batch ({e}); delete it and fetch it again.") from e
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _try_download(variant: str, root: Path) -> None:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100
    def attempt() -> None:
        try:
            cls(str(root), train=True, download=True)
        except Exception:  # offline: the caller explains where the files must go
            pass

    without_new_folders([root, root / LAYOUT[variant][0]], attempt)


def load_arrays(variant: str, root: str | Path, download: bool = True) -> dict[str, tuple]:
    folder, train_files, test_files, label_key, _ = LAYOUT[variant]
    base = Path(root).expanduser() / folder
    names = train_files + test_files
    if download and not all((base / n).exists() for n in names):
        _try_download(variant, Path(root).expanduser())
    if not all((base / n).exists() for n in names):
        raise missing_data_error(variant.upper().replace("CIFAR", "CIFAR-"), base, names,
                                 " (the python version of the archive, unpacked)")
    return {
        "train": read_batches([base / n for n in train_files], label_key),
        "test": read_batches([base / n for n in test_files], label_key),
        "sources": tuple(base / n for n in names),
    }


def build(
    variant: str = "cifar10",
    root: str = "./data",
    batch_size: int = 128,
    eval_batch_size: int = 1000,
    normalize: str = "standard",
    augment: bool = True,
    train_subset: int | None = None,
    val_size: int = 0,
    download: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> DataBundle:
    if variant not in LAYOUT:
        raise QexpError(f"unknown CIFAR variant {variant!r}; choose from {sorted(LAYOUT)}")
    arrays = load_arrays(variant, root, download)
    norm = make_normalize(normalize, *STATS[variant])
    return in_memory_bundle(variant, arrays["train"], arrays["test"], LAYOUT[variant][4], norm,
                            batch_size, eval_batch_size, augment, train_subset, val_size, seed, device,
                            arrays["sources"])
