"""Atomic JSON/torch writes: a reader never sees a half-written file, a killed writer loses nothing; and
no empty folder is left by a write that did not happen (:func:`without_new_folders`). And the sha1 of a
file's bytes, which identifies the data a run read and the weights it started from.

The temporary file is created with ``os.open(..., 0o666)`` so the kernel applies the umask (and a
default ACL) exactly as for a plain ``open(path, "w")``: results written by one user stay readable by
the colleagues the umask allows (``tempfile.mkstemp`` would force mode 0600).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a fresh temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the name cut short: a name near the file system's limit (255 bytes) leaves no room for the suffix
    tmp = path.parent / f".{path.name[:200]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_default) + "\n").encode())


def write_torch(path: str | Path, obj: Any) -> None:
    """``torch.save`` to memory, then the atomic write: a crash mid-write leaves the old file intact."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: the folders a
    ``mkdir(parents=True)`` would make, which a failed attempt then removes again."""
    return list(itertools.takewhile(lambda p: not p.exists(), (path, *path.parents)))


def without_new_folders(folders: Iterable[Path], attempt: Callable[[], None]) -> None:
    """Run ``attempt`` (a download), then remove those of ``folders`` it created and left empty: a failed
    download leaves no empty ``<root>/MNIST/raw`` behind, a refused plot no ``plots/`` (folders that
    existed before are never touched)."""
    # with every missing parent (torchvision creates the whole chain)
    new = list(dict.fromkeys(p for f in folders for p in missing_folders(Path(f))))
    try:
        attempt()
    finally:
        for f in sorted(new, key=lambda p: len(p.parts), reverse=True):
            try:
                os.rmdir(f)
            except OSError:  # not empty (the download wrote files) or already gone
                pass


#: sha1 of a file's bytes by (resolved path, size, mtime_ns): a sweep hashes each data file once
_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha1(path: Path) -> str:
    """sha1 of the file's bytes, cached in memory while its size and mtime stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]
