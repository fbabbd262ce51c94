"""Fast rounding kernels for stored weights: stochastic (SR) and nearest (R) rounding onto the k-bit grid.

Why not ``torch.rand``: on CPU it draws one Mersenne-Twister number per element, serially, which alone
costs ~10x a memory copy of the tensor. SR needs a fresh uniform threshold per weight per step, so the
random source dominates. :class:`Noise` instead draws three short vectors of uniform 16-bit integers
from a seeded ``torch.Generator`` and forms, for the flat index ``n``,
``t[n] = a[n // C] XOR b[n % C] XOR c[n % P]`` (``C = 4096``, ``P = 4093`` prime): two broadcast
passes over an ``int16`` workspace. Every ``t[n]`` is exactly uniform on the 2^16 values and any two
are independent (pairwise independence: enough for SR to be unbiased per weight and for the variance
of any sum of rounding errors to be the independent one). The third vector (period ``P``, coprime to
``C``) keeps two rows of the ``C``-grid from differing by one fixed mask. Fresh vectors every call.

Resolution: the threshold has 16 bits, so ``E[Q_s(x)] = x`` up to a one-sided bias below ``Δ·2^-16``
(``torch.rand``'s float32 has 24 bits; both are far below float32 weight precision relative to Δ).

The rounding is in place: scale, add the noise, round, clamp, rescale: five cheap vectorised passes
over the weights and no temporary (``torch.fake_quantize_per_tensor_affine`` and ``torch.where`` with
scalars were measured several times slower on CPU).
"""

from __future__ import annotations

import torch

from qexp.quant.grid import step

#: the two periods of the noise (coprime); tensors of up to COLS elements get fully independent noise
COLS, PERIOD = 4096, 4093
#: the noise is int16: u = (t + 2^15) / 2^16 with t uniform on [-2^15, 2^15)
HALF = 1 << 15


class Noise:
    """Seeded source of uniform 16-bit thresholds (see the module docstring); owns its workspace.

    The generator's state is the only state; :meth:`state_dict` / :meth:`load_state_dict` make a
    resumed run draw the same thresholds as an uninterrupted one.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self._ws = torch.empty(0, dtype=torch.int16, device=self.device)

    def int16(self, n: int) -> torch.Tensor:
        """A flat view of ``n`` uniform int16 values (valid until the next call)."""
        if n <= COLS:  # one independent draw per element
            return torch.randint(-HALF, HALF, (n,), dtype=torch.int16, generator=self.generator,
                                 device=self.device)
        rows, rows2 = -(-n // COLS), -(-n // PERIOD)
        size = max(rows * COLS, rows2 * PERIOD)
        if self._ws.numel() < size:
            self._ws = torch.empty(size, dtype=torch.int16, device=self.device)
        a, b, c = (self._draw(k) for k in (rows, COLS, PERIOD))
        torch.bitwise_xor(a.view(rows, 1), b.view(1, COLS), out=self._ws[: rows * COLS].view(rows, COLS))
        self._ws[: rows2 * PERIOD].view(rows2, PERIOD).bitwise_xor_(c.view(1, PERIOD))
        return self._ws[:n]

    def _draw(self, k: int) -> torch.Tensor:
        return torch.randint(-HALF, HALF, (k,), dtype=torch.int16, generator=self.generator, device=self.device)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float32 values uniform on ``{0, 1, ..., 2^16 - 1} / 2^16`` (tests, diagnostics)."""
        return (self.int16(n).float() + HALF) / (2 * HALF)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"].cpu())


def nearest(x: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """``Q_d(x)`` as a new tensor (clamped to the grid's range); 1 bit: ``scale·sign(x)``, sign(0) = +1.
    Same values as :func:`qexp.quant.grid.quantize_nearest`, in cheap vectorised passes."""
    return nearest_round_(x.clone(), bits, scale)


def nearest_round_(x: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """``x <- Q_d(x)`` in place."""
    if bits == 1:
        return _binary_(x, scale)
    return _grid_(x.mul_(1.0 / step(bits, scale)), bits, scale)


def stochastic_round_(x: torch.Tensor, bits: int, scale: float, noise: Noise) -> torch.Tensor:
    """``x <- Q_s(x)`` in place: ``floor(x/Δ + u)·Δ`` with ``u`` uniform, clamped to the grid's range.

    With ``u = (t + 2^15)/2^16``: ``floor(x/Δ + u) = round(x/Δ + t/2^16)`` (ties to even: only on a
    2^-17 lattice), so the noise is one in-place add and rounding/clamping/rescaling are cheap passes.
    1 bit: ``+scale`` with probability ``(x/scale + 1)/2`` (BinaryConnect's stochastic binarization):
    ``u < p`` is ``x - scale·t/2^15 > 0``.
    """
    t = noise.int16(x.numel()).view(x.shape)
    if bits == 1:
        return _binary_(x.add_(t, alpha=-scale / HALF), scale, strict=True)
    return _grid_(x.mul_(1.0 / step(bits, scale)).add_(t, alpha=1.0 / (2 * HALF)), bits, scale)


def stochastic_round(x: torch.Tensor, bits: int, scale: float, noise: Noise) -> torch.Tensor:
    """``Q_s(x)`` as a new tensor."""
    return stochastic_round_(x.clone(), bits, scale, noise)


def _binary_(x: torch.Tensor, scale: float, strict: bool = False) -> torch.Tensor:
    """``x <- +scale`` where ``x >= 0`` (``x > 0`` when ``strict``), else ``-scale``; in place.
    (``torch.where`` with scalars is several times slower on CPU.)"""
    (x.gt_(0) if strict else x.ge_(0)).mul_(2 * scale)
    return x.sub_(scale)


def _grid_(k: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """``k`` holds ``x/Δ`` (plus noise): ``k <- clamp(round(k), -L, L)·Δ`` in place, ``L = 2^(k-1) - 1``."""
    levels = (1 << (bits - 1)) - 1
    return k.round_().clamp_(-levels, levels).mul_(step(bits, scale))
