"""Learned layer-wise precision (Lacey et al. 2018): the method and its per-layer bit-width logits."""

from qexp.methods.learned.method import LearnedPrecision

__all__ = ["LearnedPrecision"]
