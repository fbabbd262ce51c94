"""Float baseline: plain training, the reference row of every table."""

from qexp.methods.base import Method


class Float(Method):
    """Accepts any ``bits`` in 1..32 so a sweep ``method=float,bc bits=1,2`` composes; trains in float32
    and records ``bits = 32``."""

    bits_range = (1, 32)
    #: config knobs this method does not use: not part of the run's identity (folder, resume check), so a
    #: `method=float,bc bits=1,2` grid trains float once (qexp.run.identity)
    ignored_knobs = ("bits",)
    vectorizable = True

    def __init__(self, bits: int | None = None, loss: str = "ce") -> None:
        super().__init__(bits, loss)
        self.bits = 32
