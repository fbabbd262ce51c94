"""MNIST and Fashion-MNIST from the published IDX files (``.gz`` or uncompressed), torchvision layout."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from qexp.data import DataBundle
from qexp.data.common import in_memory_bundle, make_normalize, missing_data_error, readable_file
from qexp.errors import QexpError
from qexp.jsonio import without_new_folders

FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
STATS = {"mnist": ((0.1307,), (0.3081,)), "fashion_mnist": ((0.2860,), (0.3530,))}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST container format); ``path`` may end in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise QexpError(f"{path} is not a readable IDX file ({e}); delete it and fetch it again.") from e


def _try_download(variant: str, root: Path) -> None:
    import torchvision

    cls = torchvision.datasets.MNIST if variant == "mnist" else torchvision.datasets.FashionMNIST
    def attempt() -> None:
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
        except Exception:  # offline or unreachable: the caller explains where the files must go
            pass

    folder = root / FOLDERS[variant]
    without_new_folders([root, folder, folder / "raw"], attempt)


def load_arrays(variant: str, root: str | Path, download: bool = True) -> dict[str, tuple]:
    """Return {"train": (images uint8 N,1,28,28, labels), "test": (...)} as torch tensors."""
    if variant not in FOLDERS:
        raise QexpError(f"unknown MNIST variant {variant!r}; choose from {sorted(FOLDERS)}")
    raw = Path(root).expanduser() / FOLDERS[variant] / "raw"
    stems = [s for pair in FILES.values() for s in pair]
    if any(readable_file(raw, s) is None for s in stems) and download:
        _try_download(variant, Path(root).expanduser())
    found = {s: readable_file(raw, s) for s in stems}  # what is read: the sources, and the check before
    if None in found.values():
        raise missing_data_error(FOLDERS[variant], raw, [f"{s}.gz" for s in stems])
    out: dict[str, tuple] = {"sources": tuple(found.values())}
    for split, (img, lab) in FILES.items():
        x = torch.from_numpy(read_idx(found[img]).copy()).unsqueeze(1)
        y = torch.from_numpy(read_idx(found[lab]).astype(np.int64))
        if len(x) != len(y):
            raise QexpError(f"{raw}: {img} and {lab} hold different numbers of samples")
        out[split] = (x, y)
    return out


def build(
    variant: str = "mnist",
    root: str = "./data",
    batch_size: int = 64,
    eval_batch_size: int = 1000,
    normalize: str = "standard",
    augment: bool = False,
    train_subset: int | None = None,
    val_size: int = 0,
    download: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> DataBundle:
    arrays = load_arrays(variant, root, download)
    norm = make_normalize(normalize, *STATS[variant])
    return in_memory_bundle(variant, arrays["train"], arrays["test"], 10, norm, batch_size,
                            eval_batch_size, augment, train_subset, val_size, seed, device,
                            arrays["sources"])
