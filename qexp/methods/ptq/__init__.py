"""Post-training quantization (Warden 2015 style): the method, its affine grid and the accuracy-vs-bits curve."""

from qexp.methods.ptq.method import PTQ

__all__ = ["PTQ"]
