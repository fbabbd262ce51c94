"""Datasets: each builder returns a :class:`DataBundle` of loaders plus the shape facts models need."""

from __future__ import annotations

from dataclasses import dataclass, field
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
