"""The b-bit quantized ReLU of Yin et al. (ICLR 2019) and its three straight-through estimators.

Forward (the same for every estimator), with resolution ``alpha`` and ``N = 2^b - 1`` levels above 0:
the paper's staircase steps *up*, ``sigma(x) = k alpha`` for ``(k-1) alpha < x <= k alpha``, i.e.
``alpha * clip(ceil(x / alpha), 0, N)`` (``staircase="ceil"``, the default); ``staircase="round"`` is
``alpha * clip(round(x / alpha), 0, N)`` (shifted by alpha/2; an option). 1 bit: ``alpha * 1{x > 0}``.

Backward replaces ``sigma'(x)`` by the chosen estimator:
``identity`` -> 1, ``relu`` -> ``1{x > 0}``, ``clipped_relu`` -> ``1{0 < x < N alpha}``.
An autograd function (not ``x + (q - x).detach()``) keeps it to one saved boolean mask and one multiply
in the backward, which is what keeps the step time near float's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError, check_choice
from qexp.quant.format import LayerFormat, uniform
from qexp.quant.inject import replace_modules
from qexp.quant.kernels import host_scalars

ESTIMATORS = ("identity", "relu", "clipped_relu")
STAIRCASES = ("ceil", "round")
#: the calibration rule looks at most this many (evenly strided) activations of the first batch
CALIB_SAMPLES = 1 << 14
#: candidate clip levels tried by the calibration, as fractions of the batch maximum
CALIB_GRID = 100


def max_index(bits: int) -> int:
    """The largest index of the unsigned grid ``{0, alpha, ..., N alpha}``: ``N = 2^b - 1`` (the top level
    is ``N * alpha``; ``N`` non-zero levels)."""
    return (1 << bits) - 1


def check_estimator(name: str) -> str:
    return check_choice("method.ste", name, ESTIMATORS)


def check_staircase(name: str) -> str:
    return check_choice("method.staircase", name, STAIRCASES)


def quantized_relu(x: torch.Tensor, alpha: torch.Tensor | float, bits: int,
                   staircase: str = "ceil") -> torch.Tensor:
    """The forward map ``sigma``: values in ``alpha * {0, 1, ..., 2^b - 1}`` (``ceil``: the paper's step up)."""
    if bits == 1:
        return (x > 0).to(x.dtype) * alpha
    v = x.div(alpha)  # true division: x = k*alpha lands exactly on k, so ceil keeps the paper's closed interval
    v = v.ceil_() if staircase == "ceil" else v.round_()
    return v.clamp_(0, max_index(bits)).mul_(alpha)


def relu_gaussian_mse(alpha: float, bits: int, staircase: str = "ceil", points: int = 200_001) -> float:
    """``E[(sigma_alpha(x) - relu(x))^2]`` for ``x ~ N(0, 1)``, by quadrature on [0, 12] (x <= 0 costs 0)."""
    import math

    x = torch.linspace(0.0, 12.0, points, dtype=torch.float64)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    q = quantized_relu(x, alpha, bits, staircase)
    f = (q - x).pow(2) * pdf
    h = 12.0 / (points - 1)
    return float(h * (f.sum() - 0.5 * (f[0] + f[-1])))  # trapezoid rule


def lloyd_max_alpha(bits: int, staircase: str = "ceil") -> float:
    """Yin et al.'s fixed resolution: the alpha of the MSE-optimal b-bit quantizer of ReLU(N(0, 1)) with
    this staircase, found by golden-section search on :func:`relu_gaussian_mse` (computed, no table).

    1 bit: E[x | x > 0] = sqrt(2/pi) (the closed form, pinned by a test)."""
    lo, hi = 1e-3, 4.0 / max(max_index(bits), 1) + 1.0
    g = (5 ** 0.5 - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = relu_gaussian_mse(a, bits, staircase), relu_gaussian_mse(b, bits, staircase)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = relu_gaussian_mse(a, bits, staircase)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = relu_gaussian_mse(b, bits, staircase)
    return (lo + hi) / 2


def estimator_mask(x: torch.Tensor, alpha: torch.Tensor | float, bits: int,
                   estimator: str) -> torch.Tensor | None:
    """Where the estimator passes the gradient (``None``: everywhere, the identity STE)."""
    if estimator == "identity":
        return None
    if estimator == "relu":
        return x > 0
    return (x > 0) & (x < alpha * max_index(bits))


def alpha_grad_factor(x: torch.Tensor, alpha: torch.Tensor, bits: int, staircase: str = "ceil") -> torch.Tensor:
    """``d sigma / d alpha`` with the step's derivative taken as 1 (LSQ-style), used when alpha is learned.

    0 for x <= 0; ``ceil(x/alpha) - x/alpha`` (or round) inside the range; ``N`` above it (``1`` for 1 bit).
    """
    if bits == 1:
        return (x > 0).to(x.dtype)
    n = max_index(bits)
    v = x / alpha
    inside = (torch.ceil(v) if staircase == "ceil" else torch.round(v)) - v
    return torch.where(v <= 0, torch.zeros_like(v), torch.where(v >= n, torch.full_like(v, n), inside))


def estimator_grad(grad: torch.Tensor, x: torch.Tensor, alpha: float, bits: int,
                   estimator: str) -> torch.Tensor:
    """The estimator's backward ``grad * sigma'_STE(x)`` in one fused kernel (fixed, host-side alpha):
    ReLU's own backward for ``relu``, hardtanh's (zero outside the open interval) for ``clipped_relu``."""
    if estimator == "identity":
        return grad
    if estimator == "relu":
        return torch.ops.aten.threshold_backward(grad, x, 0.0)
    return torch.ops.aten.hardtanh_backward(grad, x, 0.0, alpha * max_index(bits))


class QuantReLUFunction(torch.autograd.Function):
    """Fixed alpha (a Python float): ``sigma`` forward, the chosen estimator backward. Saves ``x`` only
    (nothing for the identity), so the backward is a single pass like ReLU's own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, bits: int,  # type: ignore[override]
                estimator: str, staircase: str = "ceil") -> torch.Tensor:
        ctx.alpha, ctx.bits, ctx.estimator = alpha, bits, estimator
        if estimator != "identity":
            ctx.save_for_backward(x)
        return quantized_relu(x, alpha, bits, staircase)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x = ctx.saved_tensors[0] if ctx.estimator != "identity" else grad
        return estimator_grad(grad, x, ctx.alpha, ctx.bits, ctx.estimator), None, None, None, None


class LearnedQuantReLUFunction(torch.autograd.Function):
    """Learned alpha (a tensor): as :class:`QuantReLUFunction`, plus the alpha gradient
    ``sum(grad * alpha_grad_factor)`` computed without materialising the factor: with ``q = sigma(x)``
    and ``inside = 1{0 < x < N alpha}`` it equals ``(<grad, q> - <grad * inside, x>) / alpha``
    (1 bit: ``<grad, q> / alpha``). Saves ``x`` and the output ``q`` (which the next layer keeps anyway).
    No host sync: alpha never leaves the device."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, bits: int,  # type: ignore[override]
                estimator: str, staircase: str = "ceil") -> torch.Tensor:
        ctx.bits, ctx.estimator = bits, estimator
        q = quantized_relu(x, alpha, bits, staircase)
        ctx.save_for_backward(x, alpha, q)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, alpha, q = ctx.saved_tensors
        bits, estimator = ctx.bits, ctx.estimator
        g_inside = None
        if bits > 1 and (ctx.needs_input_grad[1] or estimator == "clipped_relu"):
            hi = alpha * max_index(bits)
            if host_scalars(x):  # a host scalar costs nothing here and allows the one-pass kernel
                g_inside = torch.ops.aten.hardtanh_backward(grad, x, 0.0, float(hi))
            else:  # on a GPU, keep alpha on the device (no sync): mask and multiply
                g_inside = grad * ((x > 0) & (x < hi))
        if estimator == "identity":
            grad_x = grad
        elif estimator == "relu":
            grad_x = torch.ops.aten.threshold_backward(grad, x, 0.0)
        else:
            grad_x = g_inside if g_inside is not None else grad * ((x > 0) & (x < alpha))
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            ga = torch.dot(grad.reshape(-1), q.reshape(-1))
            if g_inside is not None:
                ga = ga - torch.dot(g_inside.reshape(-1), x.reshape(-1))
            grad_alpha = (ga / alpha).reshape(alpha.shape)
        return grad_x, grad_alpha, None, None, None


def calibrate_alpha(x: torch.Tensor, bits: int, staircase: str = "ceil") -> float:
    """Alpha minimising the mean squared error between ``relu(x)`` and ``sigma(x)`` on this batch.

    Looks at up to :data:`CALIB_SAMPLES` activations (a fixed-seed random subset; the global RNG is
    untouched). 1 bit: the mean of the positive inputs (the closed-form minimiser of
    ``sum_{x>0} (x - alpha)^2``). More bits: the best of :data:`CALIB_GRID` clip levels ``N * alpha``
    between 1% and 100% of the batch maximum. A layer with no positive input keeps ``alpha = 1``.
    """
    v = x.detach().flatten().float()
    if v.numel() > CALIB_SAMPLES:  # a fixed random subset: a stride would alias with the W/HW layout
        g = torch.Generator(device=v.device).manual_seed(0)
        v = v[torch.randint(v.numel(), (CALIB_SAMPLES,), generator=g, device=v.device)]
    pos = v[v > 0]
    if pos.numel() == 0:
        return 1.0
    if bits == 1:
        return float(pos.mean())
    target = v.clamp(min=0)
    n = max_index(bits)
    alphas = pos.max() * torch.linspace(0.01, 1.0, CALIB_GRID, device=v.device) / n
    a = alphas[:, None]  # all candidates at once: [CALIB_GRID, samples]
    r = (v / a).ceil_() if staircase == "ceil" else (v / a).round_()
    errs = (r.clamp_(0, n).mul_(a) - target).pow_(2).mean(1)
    return float(alphas[int(errs.argmin())])


class QuantReLU(nn.Module):
    """Drop-in for ``nn.ReLU``: a b-bit quantized ReLU with its own resolution ``alpha``.

    ``alpha`` is calibrated by :func:`calibrate_alpha` on the module's first input(s) unless given.
    Calibration stays open until :meth:`finish_calibration` (the STE method calls it after the first
    forward pass of the whole model), so a module called at several places in one forward pass
    (torchvision's ResNet blocks reuse one ReLU twice) gets one shared alpha, the largest of its call
    sites' calibrated values; ``sites`` records how many call sites it has.
    """

    def __init__(self, bits: int = 2, estimator: str = "clipped_relu", alpha: float | None = None,
                 learn_alpha: bool = False, staircase: str = "ceil") -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise QexpError(f"a quantized ReLU takes 1..8 bits, got {bits}")
        self.bits, self.estimator, self.learn_alpha = bits, check_estimator(estimator), learn_alpha
        self.staircase = check_staircase(staircase)
        a = torch.tensor(1.0 if alpha is None else float(alpha))
        if learn_alpha:
            self.alpha = nn.Parameter(a)
        else:
            self.register_buffer("alpha", a)
        self.register_buffer("calibrated", torch.tensor(alpha is not None))
        self.register_buffer("sites", torch.tensor(0 if alpha is None else 1))
        self._calibrated = alpha is not None  # host mirrors of the buffers: no device sync per call
        self._alpha = float(a)  # used by the fixed-alpha forward (a learned alpha lives in the tensor)
        self._calls = 0
        #: when true (training mode), forward counts outputs at zero and at the top level
        self.track = False
        # [at zero, at top, total]: a buffer (follows .to(device)), not saved with the model (the STE
        # method saves it for a mid-epoch resume); allocated up front so compile=true traces the counting
        self.register_buffer("_stats", torch.zeros(3, dtype=torch.int64), persistent=False)

    # ---- calibration ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        a = calibrate_alpha(x, self.bits, self.staircase)
        self.set_alpha(a if self._calls == 0 else max(a, self._alpha))
        self._calls += 1

    @torch.no_grad()
    def set_alpha(self, value: float) -> None:
        """Set alpha (keep the host-side copy the fixed-alpha forward uses in step)."""
        self.alpha.fill_(value)
        self._alpha = float(value)

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Freeze the calibrated alpha (learned alpha keeps training from there)."""
        if self._calibrated:
            return
        self._calibrated = True
        self.calibrated.fill_(True)
        self.sites.fill_(max(self._calls, 1))

    @property
    def is_calibrated(self) -> bool:
        """``compile=true`` runs the model eagerly until this holds (the methods' ``compile_ready``): the
        calibration is a one-off search with host-side results that Dynamo cannot trace, and compiling it
        would guard on every intermediate alpha (a recompile per layer and step)."""
        return self._calibrated

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._calibrated = bool(self.calibrated)
        self._alpha = float(self.alpha.detach())

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._calibrated:
            self._calibrate(x)
        grad = torch.is_grad_enabled()
        if self.learn_alpha:
            alpha: torch.Tensor | float = self.alpha.to(x.dtype)
            q = (LearnedQuantReLUFunction.apply(x, alpha, self.bits, self.estimator, self.staircase) if grad
                 else quantized_relu(x, alpha, self.bits, self.staircase))
        else:
            alpha = self._alpha
            q = (QuantReLUFunction.apply(x, alpha, self.bits, self.estimator, self.staircase)
                 if grad and x.requires_grad else quantized_relu(x, alpha, self.bits, self.staircase))
        if self.track and self.training:
            self._count(q.detach(), self.alpha.detach().to(q.dtype))
        return q

    @torch.no_grad()
    def _count(self, q: torch.Tensor, alpha: torch.Tensor | float) -> None:
        half = 0.5 * alpha
        top = (max_index(self.bits) - 0.5) * alpha
        counts = torch.stack([(q < half).sum(), (q > top).sum()])
        self._stats[:2] += counts
        self._stats[2] += q.numel()

    def pop_stats(self) -> tuple[float, float] | None:
        """(fraction at zero, fraction at the top level) since the last call; None if nothing counted."""
        zero, top, total = (int(v) for v in self._stats.tolist())
        if total == 0:
            return None
        self._stats.zero_()
        return zero / total, top / total

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, estimator={self.estimator}, alpha={float(self.alpha):.4g}, "
                f"learn_alpha={self.learn_alpha}, staircase={self.staircase}")


class _CloseCalibration:
    """Forward hook on the whole model: closes the calibration of every quantized ReLU after the first
    forward pass, so a ReLU module reused at several call sites calibrates on all of them."""

    def __init__(self, quantizers: list[QuantReLU]) -> None:
        self.quantizers = quantizers

    def __call__(self, model: nn.Module, args: Any, output: Any) -> None:
        for q in self.quantizers:
            if not q.is_calibrated:
                q.finish_calibration()


def quantize_relus(model: nn.Module, make: Callable[[str, nn.Module], QuantReLU],
                   who: str) -> list[tuple[str, QuantReLU]]:
    """Replace every ``nn.ReLU`` of ``model`` (in place) by ``make(name, relu)``; the quantized ReLUs
    calibrate alpha on the first forward pass (see :class:`QuantReLU`). Returns (name, module) pairs;
    a model without ReLUs is a :class:`QexpError` naming ``who`` (e.g. ``method=ste``)."""
    names = replace_modules(model, lambda n, m: isinstance(m, nn.ReLU), make)
    if not names:
        raise QexpError(f"{who} quantizes nn.ReLU modules, and {type(model).__name__} has none")
    quantizers = [(n, model.get_submodule(n)) for n in names]
    model.register_forward_hook(_CloseCalibration([q for _, q in quantizers]))
    return quantizers


def relu_format(name: str, q: QuantReLU) -> LayerFormat:
    """The format record of a quantized ReLU's output: codes ``0..2^b - 1`` times alpha (1 bit and the
    paper's staircase round up: ``ceil``)."""
    rounding = "ceil" if q.bits == 1 or q.staircase == "ceil" else "nearest"
    return uniform(name, q.bits, float(q.alpha.detach()), 0, max_index(q.bits), rounding=rounding,
                   tensor="activation")
