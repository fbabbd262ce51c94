"""Atomic checkpoint save and safe load (``weights_only=True``; a corrupt file is a clear error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qexp.errors import QexpError
from qexp.jsonio import write_torch


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise to memory, then write-and-rename: a crash mid-write leaves the old checkpoint intact. A run
    folder removed while the run trained is not recreated."""
    if not Path(path).parent.is_dir():
        raise QexpError(f"the run folder {Path(path).parent} was removed while the run trained; stopped")
    write_torch(path, state)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint's state dict; any unreadable file (empty, truncated, foreign) is one QexpError line."""
    fix = "delete it to retrain this run from scratch, or run again with resume=false"
    try:
        if Path(path).stat().st_size == 0:
            raise QexpError(f"checkpoint {path} is empty (0 bytes): {fix}")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, QexpError):
        raise
    except Exception as e:  # truncated file, wrong format, pickled code: never execute it
        lines = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
        if "Weights only load failed" in str(e):  # torch's advice (weights_only=False) would run its code
            why = ("it holds pickled objects besides tensors and plain values, which qexp never writes and "
                   "does not unpickle")
        raise QexpError(f"checkpoint {path} is unreadable or corrupt ({why}): {fix}") from e
    if not isinstance(state, dict) or "model" not in state:
        raise QexpError(f"checkpoint {path} is not a qexp checkpoint: {fix}")
    return state
