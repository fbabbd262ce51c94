"""Per-epoch learning-rate schedules as LambdaLR factors (plain state, resumable)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def constant(optimizer: Optimizer, epochs: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda e: 1.0)


def step(optimizer: Optimizer, epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1) -> LambdaLR:
    """Multiply by ``gamma`` at each milestone epoch (WAGE: eta 8 -> 1 -> 1/8 at 200 and 250)."""
    if not gamma > 0:
        raise ValueError(f"sched.gamma must be positive (a learning-rate factor), got {gamma}")
    ms = []
    for m in milestones:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:  # m < 1 would scale the base LR itself
            raise ValueError(f"sched.milestones must be whole epoch counts of at least 1 (after that many "
                             f"epochs the LR is multiplied by gamma), got {list(milestones)}")
        ms.append(m)
    ms.sort()
    return LambdaLR(optimizer, lambda e: gamma ** sum(e >= m for m in ms))


def cosine(optimizer: Optimizer, epochs: int, final_ratio: float = 0.0) -> LambdaLR:
    """Cosine annealing from the base LR to ``final_ratio`` times it at the last epoch."""
    if not 0 <= final_ratio <= 1:  # a negative LR would train uphill in the last epochs
        raise ValueError(f"sched.final_ratio must be in [0, 1] (the last epoch's LR over the base LR), "
                         f"got {final_ratio}")

    def f(e: int) -> float:
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / max(epochs, 1)))

    return LambdaLR(optimizer, f)


def exp(optimizer: Optimizer, epochs: int, final_ratio: float = 2e-6 / 3e-3) -> LambdaLR:
    """BinaryConnect's decay: the same factor every epoch, reaching ``final_ratio`` at the last epoch."""
    if not 0 < final_ratio <= 1:  # 0 stops training after one epoch; a negative ratio has no real root
        raise ValueError(f"sched.final_ratio must be in (0, 1] (the last epoch's LR over the base LR), "
                         f"got {final_ratio}")
    gamma = final_ratio ** (1.0 / max(epochs - 1, 1))
    return LambdaLR(optimizer, lambda e: gamma**e)
