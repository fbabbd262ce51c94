"""Atomic checkpoint save and safe load (``weights_only=True``; a corrupt file is a clear error)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from qexp.errors import QexpError
from qexp.jsonio import atomic_write_bytes


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise to memory, then write-and-rename: a crash mid-write leaves the old checkpoint intact."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated file, wrong format, pickled code: never execute it
        raise QexpError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:200]}).\n"
            "Delete it to retrain this run from scratch, or run again with resume=false."
        ) from e
    if not isinstance(state, dict) or "model" not in state:
        raise QexpError(f"checkpoint {path} is not a qexp checkpoint; delete it or run with resume=false")
    return state
