"""``precision=bf16-mixed | 16-mixed``: the float arithmetic of conv/linear layers in 16 bits, everything
that defines the quantization in float32.

Why not plain ``torch.autocast`` around the forward: autocast leaves a conv's output in 16 bits, so the
activation quantizer after it, WAGE's error quantizers and any rounding would then operate on bf16
values (8 significant bits) and change the method. Here autocast is entered *inside* each
``nn.Conv*`` / ``nn.Linear`` forward only and the output is cast back to float32: the layer's matmul runs
in 16 bits on its (already quantized, float32) weight and input, and everything else (quantizers,
straight-through and WAGE's custom autograd, BatchNorm, the loss, the optimizer update, SR rounding
after the step) stays float32. The k-bit grid values a quantized layer feeds in (at most 8 bits) are
exact in bf16 and fp16, so a quantized layer multiplies exactly the quantized values; only the sums are
rounded to 16 bits. Outside :meth:`MixedPrecision.active` (WAGE's integer check, ``finalize``) the model
computes in float32 as before.

``16-mixed`` (float16) needs CUDA and a gradient scaler (:class:`torch.amp.GradScaler`); bf16 has
float32's range and needs none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError

CHOICES = ("32", "bf16-mixed", "16-mixed")
MIXED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check(precision: Any, device: torch.device) -> str:
    """The precision name, or a one-line :class:`QexpError` for an unknown one or 16-mixed off CUDA."""
    name = str(precision)
    if name in ("32", "32-true"):
        return "32"
    if name not in CHOICES:
        raise QexpError(f"precision must be one of 32, bf16-mixed, 16-mixed; got {name!r}")
    if name == "16-mixed" and device.type != "cuda":
        raise QexpError("precision=16-mixed (float16 with a gradient scaler) needs a CUDA device; "
                        "on CPU use precision=bf16-mixed or 32")
    return name


class MixedPrecision:
    """Conv/linear layers of a model in 16 bits while :meth:`active`; a gradient scaler for float16."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.name = check(precision, device)
        self.device_type = device.type
        self.dtype = torch.float16 if self.name == "16-mixed" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.name == "16-mixed" else None
        self._on = False

    @property
    def enabled(self) -> bool:
        return self.name != "32"

    def attach(self, model: nn.Module) -> nn.Module:
        """Wrap the forward of every conv/linear layer of ``model`` (in place; idempotent)."""
        if not self.enabled:
            return model
        for m in model.modules():
            if isinstance(m, MIXED_LAYERS) and not getattr(m, "_qexp_mixed", False):
                m.forward = self._wrap(m.forward)
                m._qexp_mixed = True
        return model

    def _wrap(self, forward: Any) -> Any:
        def mixed_forward(*args: Any, **kwargs: Any) -> Any:
            if not self._on:
                return forward(*args, **kwargs)
            with torch.autocast(self.device_type, dtype=self.dtype):
                out = forward(*args, **kwargs)
            return out.float()

        return mixed_forward

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Conv/linear layers compute in 16 bits inside this block (training and evaluation forwards)."""
        before, self._on = self._on, self.enabled
        try:
            yield
        finally:
            self._on = before

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
