"""CIFAR-10 as JPEG files (a public lossy re-encoding of the 60,000 images in the published split).

The images are *not* CIFAR-10 itself (JPEG error: mean 5.8/255 per pixel), so the dataset has its own
name, ``cifar10_jpeg``, in run folders, tables and plots. It is read from
``<data_root>/cifar10-jpeg/cifar10-jpeg.tar.gz`` (or the same tree unpacked beside it:
``<data_root>/cifar10-jpeg/{train,test}/<class>/NNNN.jpg``), decoded once with PIL into a uint8 cache
keyed by the source's md5 (``<out_root>/.cache``, or ``$QEXP_CACHE``: never the data folder, which may
be read-only), and served from memory like CIFAR-10.

Order: the tree keeps each class's images in the order of the published batches, but not the order
across classes, so the images are interleaved class by class (image i of class c at position
10 i + c). ``dataset.train_subset`` and ``dataset.val_size`` (first N / last N) are then class-balanced,
and so is ``dataset.test_subset`` (the first N test images: a cheaper, noisier test error for CPU budgets).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import secrets
import tarfile
from pathlib import Path

import numpy as np
import torch

from qexp.data import DataBundle
from qexp.data.cifar import STATS
from qexp.data.common import cache_place, in_memory_bundle, make_normalize
from qexp.errors import QexpError

log = logging.getLogger("qexp")

FOLDER = "cifar10-jpeg"
ARCHIVE = "cifar10-jpeg.tar.gz"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
#: bump when the cache's content or layout changes, so old caches are not read
CACHE_VERSION = 1
_MEMBER = re.compile(r"(?:.*/)?(train|test)/([a-z]+)/(\d+)\.jpe?g", re.IGNORECASE)


def locate(root: str | Path) -> Path:
    """The archive, else the unpacked tree; one line naming the expected layout when neither is there."""
    base = Path(root).expanduser() / FOLDER
    if (base / ARCHIVE).is_file():
        return base / ARCHIVE
    if all((base / s).is_dir() for s in SPLITS):
        return base
    raise QexpError(f"cifar10_jpeg: neither {base / ARCHIVE} nor the unpacked {base}/{{train,test}}/<class>/NNNN.jpg "
                    f"was found; put the archive there or point QEXP_DATA (data_root=...) at the folder "
                    f"holding {FOLDER}/")


def source_digest(source: Path) -> str:
    """md5 of the archive, or of the unpacked tree's (path, bytes) pairs: the cache key."""
    h = hashlib.md5()
    if source.is_file():
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    for p in sorted(source.glob("*/*/*")):
        if p.is_file() and _MEMBER.fullmatch(p.relative_to(source).as_posix()):
            h.update(p.relative_to(source).as_posix().encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def _members(source: Path):
    """(name, bytes) of every image file in the archive or tree."""
    if source.is_file():
        with tarfile.open(source, "r:*") as tar:
            for m in tar:
                if m.isfile():
                    yield m.name, tar.extractfile(m).read()
    else:
        for p in sorted(source.glob("*/*/*")):
            if p.is_file():
                yield p.relative_to(source).as_posix(), p.read_bytes()


def decode(source: Path) -> dict[str, torch.Tensor]:
    """Decode every image (PIL) into {split}_x uint8 (N, 3, 32, 32) and {split}_y, class-interleaved."""
    from PIL import Image

    found: dict[str, list[tuple[int, int, np.ndarray]]] = {s: [] for s in SPLITS}
    try:
        for name, data in _members(source):
            m = _MEMBER.fullmatch(name)
            if m is None:
                continue
            split, cls, idx = m[1].lower(), m[2].lower(), int(m[3])
            if cls not in CLASSES:
                raise QexpError(f"cifar10_jpeg: {source}: {name} is in an unknown class folder {cls!r} "
                                f"(expected {', '.join(CLASSES)})")
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            if arr.shape != (32, 32, 3):
                raise QexpError(f"cifar10_jpeg: {source}: {name} is {arr.shape[1]}x{arr.shape[0]}, not 32x32")
            found[split].append((idx, CLASSES.index(cls), arr))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise QexpError(f"cifar10_jpeg: {source} is not a readable archive/tree of JPEG files ({e})") from None
    out = {}
    for split, items in found.items():
        if not items:
            raise QexpError(f"cifar10_jpeg: {source} holds no {split}/<class>/NNNN.jpg images")
        items.sort(key=lambda t: (t[0], t[1]))  # image i of class c at 10 i + c
        out[f"{split}_x"] = torch.from_numpy(np.stack([a for _, _, a in items]).transpose(0, 3, 1, 2).copy())
        out[f"{split}_y"] = torch.tensor([c for _, c, _ in items], dtype=torch.long)
    return out


def _save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_arrays(root: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    """{"train": (x, y), "test": (x, y)} and the source's md5; decodes once, then reads the cache
    (:func:`qexp.data.common.cache_place`: ``$QEXP_CACHE``, else ``<out_root>/.cache`` in a run; with
    none, every call decodes)."""
    source = locate(root)
    digest = source_digest(source)
    folder, writable = cache_place()
    path = None if folder is None else folder / f"cifar10_jpeg-v{CACHE_VERSION}-{digest}.pt"
    arrays = None
    if path is not None and path.is_file():
        try:
            arrays = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged cache is rebuilt, never trusted
            log.warning("cifar10_jpeg: the cache %s is unreadable (%s); decoding again", path, e)
    if arrays is None:
        if path is None or not writable:
            log.info("cifar10_jpeg: decoding %s (no cache to keep it in: set QEXP_CACHE to keep one)", source)
            return _split(decode(source)), digest
        log.info("cifar10_jpeg: decoding %s once into %s", source, path)
        arrays = decode(source)
        try:
            _save_atomic(arrays, path)
        except OSError as e:  # an unwritable cache only costs the decode next time
            log.warning("cifar10_jpeg: cannot write the cache %s (%s); set QEXP_CACHE to a writable folder",
                        path, e)
    return _split(arrays), digest


def _split(arrays: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {s: (arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in SPLITS}


def build(
    root: str = "./data",
    batch_size: int = 128,
    eval_batch_size: int = 1000,
    normalize: str = "standard",
    augment: bool = True,
    train_subset: int | None = None,
    val_size: int = 0,
    test_subset: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> DataBundle:
    arrays, digest = load_arrays(root)
    test = arrays["test"]
    if test_subset is not None:
        if not 0 < test_subset <= len(test[1]):
            raise QexpError(f"dataset.test_subset must be in 1..{len(test[1])}, got {test_subset}")
        test = (test[0][:test_subset], test[1][:test_subset])
    norm = make_normalize(normalize, *STATS["cifar10"])
    bundle = in_memory_bundle("cifar10_jpeg", arrays["train"], test, len(CLASSES), norm,
                              batch_size, eval_batch_size, augment, train_subset, val_size, seed, device,
                              sources=(locate(root),))
    bundle.info["source_md5"] = digest
    return bundle
