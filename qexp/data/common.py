"""Helpers shared by the dataset builders: device choice, the missing-data message, loaders."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from qexp.data import DataBundle
from qexp.data.loader import Normalize, TensorLoader
from qexp.data.split import subset_and_split
from qexp.errors import QexpError
from qexp.jsonio import file_sha1
from qexp.run.record import CACHE_FOLDER

# normalize="signed" maps pixels to [-1, 1] (WAGE's CIFAR input range); "byte256" to X/256 in [0, 1)
# (WAGE's official MNIST code); "standard" uses dataset statistics.
SIGNED = "signed"
BYTE256 = "byte256"


def missing_data_error(name: str, folder: Path, files: list[str], hint: str = "",
                       downloadable: bool = True) -> QexpError:
    """One line: what is missing, the files qexp reads and where, and how to point it elsewhere."""
    why = "could not be downloaded (offline?)" if downloadable else "cannot be downloaded"
    return QexpError(
        f"{name} was not found and {why}: qexp reads {', '.join(files)} in {folder}; put them there"
        f"{hint}, or point the data root at a folder that holds them (environment variable QEXP_DATA or "
        f"data_root=...)"
    )


def source_sha1(path: Path) -> str:
    """A data source's sha1: a file's bytes; a folder's listing, every file below it (links followed, as
    ImageFolder does) by relative path and size: an ImageFolder or an unpacked archive is identified
    without reading each image (hashing an ImageNet would take longer than a small run's training), and a
    file added, removed, renamed or rewritten at another size gives another digest."""
    if path.is_file():
        return file_sha1(path)
    entries = []
    for top, _, names in os.walk(path, followlinks=True):
        for n in names:
            f = Path(top, n)
            entries.append(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\n")
    h = hashlib.sha1(b"folder\n")
    for e in sorted(entries):
        h.update(e.encode())
    return h.hexdigest()


def digest(root: str | Path, sources: Iterable[Path]) -> dict[str, object]:
    """What a run stores about its data: the resolved root, each source read (a file or a folder, relative
    to the root, with its :func:`source_sha1`) and one ``digest`` over them. Other files under the same
    names give another digest; the same files under another root give the same one. None of it for
    generated data (no files). Names are relative as the loader spelled them (``root / ...``), links not
    followed: a dataset folder that links elsewhere is still named under the root."""
    base = os.path.abspath(Path(root).expanduser())
    files: dict[str, str] = {}
    for s in sources:
        p = os.path.abspath(Path(s).expanduser())
        name = os.path.relpath(p, base)
        outside = name == os.pardir or name.startswith(os.pardir + os.sep)  # not below the root: kept whole
        files[p if outside else name] = source_sha1(Path(p))
    text = "\n".join(f"{k} {v}" for k, v in sorted(files.items()))
    return {"root": str(Path(base).resolve()), "files": dict(sorted(files.items())),
            "digest": hashlib.sha1(text.encode()).hexdigest() if files else None}


def readable_file(folder: Path, stem: str) -> Path | None:
    """The file a loader reads for ``stem``: the uncompressed one, else ``stem.gz`` (None: neither)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def same_files_under(root: str | Path, files: dict[str, str], stored_root: str | None = None) -> str | None:
    """The digest the files named in ``files`` (as :func:`digest` stores them: relative to the root, or
    absolute for a source outside it, such as ``dataset.dirname=/abs/folder``) have under ``root``, or None
    when one is missing or is a ``.gz`` that a loader would not read (:func:`readable_file` prefers its
    uncompressed copy): how a finished run is checked before any data is loaded. An absolute name counts
    only under the run's own root (``stored_root``): under another, a ``dirname=../x`` would be read
    elsewhere, so which files it names is not known before loading."""
    root = Path(root).expanduser()
    if any(Path(name).is_absolute() for name in files) and (
            stored_root is None or Path(stored_root) != Path(os.path.abspath(root)).resolve()):
        return None
    paths = [root / name for name in files]  # an absolute name stays itself
    if not all(p.exists() for p in paths):
        return None
    if any(p.suffix == ".gz" and readable_file(p.parent, p.stem) != p for p in paths):
        return None
    return digest(root, paths)["digest"]  # type: ignore[return-value]


#: the folder of decoded datasets when ``$QEXP_CACHE`` is unset, and whether it may be written: set by the
#: entry points (``<out_root>/.cache`` for a training run, read only for a run being evaluated), so that
#: nothing is written outside ``out_root``; None (library use): decode in memory, write nothing
_CACHE: tuple[Path, bool] | None = None


def use_cache(folder: Path | None, writable: bool = True) -> None:
    """Where decoded datasets are read (and, if ``writable``, written) when ``$QEXP_CACHE`` is unset."""
    global _CACHE
    _CACHE = None if folder is None else (Path(folder), writable)


def cache_place() -> tuple[Path | None, bool]:
    """(folder, writable): ``$QEXP_CACHE`` (the user's own choice, written), else :func:`use_cache`'s."""
    env = os.environ.get("QEXP_CACHE")
    if env:
        return Path(env).expanduser(), True
    return _CACHE if _CACHE is not None else (None, False)


def run_cache(run_dir: Path) -> Path | None:
    """The nearest ``.cache`` folder above a run folder (its ``out_root``'s), if there is one."""
    for parent in Path(run_dir).resolve().parents:
        if (parent / CACHE_FOLDER).is_dir():
            return parent / CACHE_FOLDER
    return None


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
    sources: tuple[Path, ...] = (),
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
                      info={"train_samples": len(ytr), "test_samples": len(test[1])}, sources=tuple(sources))
