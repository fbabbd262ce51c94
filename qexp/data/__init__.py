"""Datasets: each builder returns a :class:`DataBundle` of loaders plus the shape facts models need."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataBundle:
    """What the trainer needs from a dataset: loaders and the input/output shape."""

    name: str
    train: Any
    test: Any
    num_classes: int
    in_shape: tuple[int, int, int]
    val: Any | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: the files the builder read (empty for generated data): their bytes are part of the run's identity
    #: (:func:`qexp.data.common.digest`), so a run is never reused for, or evaluated on, other data
    sources: tuple[Path, ...] = ()
