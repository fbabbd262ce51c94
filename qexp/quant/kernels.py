"""Fast rounding kernels for stored weights: stochastic (SR) and nearest (R) rounding onto the k-bit grid.

Why not ``torch.rand``: on CPU it draws one Mersenne-Twister number per element, serially, which alone
costs ~10x a memory copy of the tensor. SR needs a fresh uniform threshold per weight per step, so the
random source dominates. :class:`Noise` instead draws three short vectors of uniform 16-bit integers
from a seeded ``torch.Generator`` and forms, for the flat index ``n = r·C + k`` (row ``r``, column
``k < C = 4096``), ``t[n] = a[r] XOR b[k] XOR c[r + k]``. Every ``t[n]`` is exactly uniform on the 2^16
values and any two are independent (pairwise independence: enough for SR to be unbiased per weight and
for the variance of any sum of rounding errors to be the independent one): two thresholds in different
rows differ by the independent ``a``, two in one row by the independent ``b``. The diagonal vector ``c``
keeps two rows from differing by one fixed mask (``t[r, ·] XOR t[r', ·]`` varies along the row). Fresh
vectors every call. (``c[r + k]`` is a strided view, ``c.unfold(0, C, 1)``: an affine index that a
compiler can vectorise, unlike a modulo.)

Resolution: the threshold has 16 bits, so ``E[Q_s(x)] = x`` up to a one-sided bias below ``Δ·2^-16``
(``torch.rand``'s float32 has 24 bits; both are far below float32 weight precision relative to Δ).

Three implementations, bit-identical (same thresholds, same float operations):

* eager (default, portable, no compiler): the thresholds in an ``int16`` workspace (two broadcast XOR
  passes), then scale, add, round, clamp, rescale in place: five more cheap passes over the weights
  (``torch.fake_quantize_per_tensor_affine`` and ``torch.where`` with scalars were measured several times
  slower on CPU);
* fused (:func:`use_fused`, switched on by ``compile=true``): one ``torch.compile`` (Inductor) kernel that
  reads a weight, forms its threshold from the three short vectors, adds, rounds, clamps, rescales and
  writes it back: one pass over memory, like a copy. Inductor generates C++/OpenMP on CPU (needs a C++
  compiler at run time, only when switched on) and Triton on CUDA. Compiled once per process and shape
  family (dynamic shapes); if compiling fails, one warning and the eager kernel;
* Triton (:mod:`qexp.quant.triton_sr`, CUDA tensors of more than COLS elements, the default where Triton
  is installed): the same one pass as a hand-written kernel, called without Dynamo's guards; checked
  against the eager passes on first use.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable

import torch

from qexp.quant.grid import SymmetricGrid

log = logging.getLogger("qexp")

#: row length of the noise grid; tensors of up to COLS elements get one independent draw per element
COLS = 4096
#: the noise is int16: u = (t + 2^15) / 2^16 with t uniform on [-2^15, 2^15)
HALF = 1 << 15
#: the fused kernel pays a compiled-call overhead (guards, launch) that only large tensors repay
FUSED_MIN = 1 << 16


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

    def vectors(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fresh ``a`` (one per row), ``b`` (one per column), ``c`` (one per diagonal) for ``n > COLS``."""
        a, b, c = self.vectors_each([n])[0]
        return a, b, c

    def vectors_each(self, sizes: list[int]) -> list[tuple[torch.Tensor, ...]]:
        """The noise of several tensors in one draw from the generator: per size, ``(t,)`` (one value per
        element) up to COLS elements, else its ``(a, b, c)``; each a view of the one draw.

        One draw of the concatenated vectors: on CPU the same values as one draw per vector, one after
        another (the generator's stream concatenates), so a tensor rounds alike alone or with others; on
        CUDA (Philox offsets advance per call) it is its own stream, as seeded and resumable."""
        lengths = []
        for n in sizes:
            rows = -(-n // COLS)
            lengths.append([n] if n <= COLS else [rows, COLS, rows + COLS - 1])
        flat = self._draw(sum(sum(parts) for parts in lengths))
        pieces = iter(flat.split([k for parts in lengths for k in parts]))
        return [tuple(next(pieces) for _ in parts) for parts in lengths]

    def int16(self, n: int) -> torch.Tensor:
        """A flat view of ``n`` uniform int16 values (valid until the next call)."""
        if n <= COLS:  # one independent draw per element
            return self._draw(n)
        rows = -(-n // COLS)
        if self._ws.numel() < rows * COLS:
            self._ws = torch.empty(rows * COLS, dtype=torch.int16, device=self.device)
        return xor_rows(n, self.vectors(n), self._ws)

    def int16_each(self, sizes: list[int]) -> list[torch.Tensor]:
        """Flat int16 noise for several tensors, from one draw (:meth:`vectors_each`), each in its own
        memory (one workspace)."""
        return thresholds(sizes, self.vectors_each(sizes), self.device)

    def _draw(self, k: int) -> torch.Tensor:
        return torch.randint(-HALF, HALF, (k,), dtype=torch.int16, generator=self.generator, device=self.device)

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float32 values uniform on ``{0, 1, ..., 2^16 - 1} / 2^16`` (tests, diagnostics)."""
        return (self.int16(n).float() + HALF) / (2 * HALF)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        restore_generator(self.generator, state["generator"])


def xor_rows(n: int, vectors: tuple[torch.Tensor, ...], ws: torch.Tensor) -> torch.Tensor:
    """A tensor's ``(a, b, c)`` (``n > COLS``) XORed into the start of ``ws`` (flat, rows x COLS long):
    ``t[r, k] = a[r] ^ b[k] ^ c[r + k]``; the first ``n`` values."""
    a, b, c = vectors
    rows = len(a)
    block = ws[: rows * COLS].view(rows, COLS)
    torch.bitwise_xor(a.view(rows, 1), b.view(1, COLS), out=block)
    block.bitwise_xor_(c.unfold(0, COLS, 1))
    return ws[:n]


def thresholds(sizes: list[int], vectors: list[tuple[torch.Tensor, ...]], device: torch.device) -> list[torch.Tensor]:
    """Each tensor's flat int16 thresholds from its :meth:`Noise.vectors_each` entry (one workspace for all
    that need XOR)."""
    ws = torch.empty(sum(-(-n // COLS) * COLS for n in sizes if n > COLS), dtype=torch.int16, device=device)
    out, at = [], 0
    for n, v in zip(sizes, vectors):
        if n <= COLS:
            out.append(v[0])
            continue
        out.append(xor_rows(n, v, ws[at:]))
        at += -(-n // COLS) * COLS
    return out


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    """``generator.set_state(state)``; a state saved by another kind of generator (a run trained on a GPU,
    resumed or evaluated on a CPU, or back) cannot continue that stream: the generator is then seeded from
    the saved bytes, with one warning (draws from here on differ from the saved stream's)."""
    state = state.detach().cpu()
    try:
        generator.set_state(state)
    except RuntimeError:
        seed = int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:8], "little")
        generator.manual_seed(seed)
        log.warning("a random generator state saved on another device type (%d bytes) was loaded into a %s "
                    "generator: seeded from it instead; its draws differ from an uninterrupted run's",
                    state.numel(), generator.device.type)


def nearest(x: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """``Q_d(x)`` as a new tensor (clamped to the grid's range); 1 bit: ``scale·sign(x)``, sign(0) = +1.
    Same values as :func:`qexp.quant.grid.quantize_nearest`, in cheap vectorised passes."""
    return nearest_round_(x.clone(), bits, scale)


def nearest_round_(x: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """``x <- Q_d(x)`` in place."""
    if bits == 1:
        return _binary_(x, scale)
    return _grid_(x.mul_(1.0 / SymmetricGrid(bits, scale).step), bits, scale)


def stochastic_round_(x: torch.Tensor, bits: int, scale: float, noise: Noise) -> torch.Tensor:
    """``x <- Q_s(x)`` in place: ``floor(x/Δ + u)·Δ`` with ``u`` uniform, clamped to the grid's range.

    With ``u = (t + 2^15)/2^16``: ``floor(x/Δ + u) = round(x/Δ + t/2^16)`` (ties to even: only on a
    2^-17 lattice), so the noise is one in-place add and rounding/clamping/rescaling are cheap passes.
    1 bit: ``+scale`` with probability ``(x/scale + 1)/2`` (BinaryConnect's stochastic binarization):
    ``u < p`` is ``x - scale·t/2^15 > 0``.
    """
    n = x.numel()
    if n > COLS and _triton_ready(x, bits) and _triton_kernel_(x, bits, scale, noise.vectors(n)):
        return x
    if _FUSED.on and n >= FUSED_MIN and x.is_contiguous() and x.dtype == torch.float32:
        _fused_sr_(x, bits, scale, noise)
        return x
    return stochastic_round_with_(x, noise.int16(n).view(x.shape), bits, scale)


def stochastic_round_with_(x: torch.Tensor, t: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """``x <- Q_s(x)`` in place with the given int16 thresholds ``t`` (shaped like ``x``): the eager passes."""
    if bits == 1:
        return _binary_(x.add_(t, alpha=-scale / HALF), scale, strict=True)
    d = SymmetricGrid(bits, scale).step
    return _grid_(x.mul_(1.0 / d).add_(t, alpha=1.0 / (2 * HALF)), bits, scale)


def stochastic_round(x: torch.Tensor, bits: int, scale: float, noise: Noise) -> torch.Tensor:
    """``Q_s(x)`` as a new tensor."""
    return stochastic_round_(x.clone(), bits, scale, noise)


def _binary_(x: torch.Tensor, scale: float, strict: bool = False) -> torch.Tensor:
    """``x <- +scale`` where ``x >= 0`` (``x > 0`` when ``strict``), else ``-scale``; in place.
    (``torch.where`` with scalars is several times slower on CPU.)"""
    (x.gt_(0) if strict else x.ge_(0)).mul_(2 * scale)
    return x.sub_(scale)


def _grid_(k: torch.Tensor, bits: int, scale: float) -> torch.Tensor:
    """``k`` holds ``x/Δ`` (plus noise): ``k <- clamp(round(k), -L, L)·Δ`` in place, ``L`` the grid's
    ``max_index`` (``2^(k-1) - 1``)."""
    g = SymmetricGrid(bits, scale)
    return k.round_().clamp_(-g.max_index, g.max_index).mul_(g.step)


# ---- many tensors at once -------------------------------------------------------------------------------
# A network's layers are rounded together: each pass over the weights is one multi-tensor call
# (``torch._foreach_*``) over every layer instead of one small kernel per layer and pass. On CUDA that
# is a few launches per step instead of a few per layer (small networks on a GPU are bound by launches);
# on CPU a foreach call loops over the tensors with the same per-tensor kernels. Same float operations
# in the same order as the one-tensor functions above, so the same values (tests/test_quant_grid.py).

def nearest_all(xs: list[torch.Tensor], bits: int, scales: list[float]) -> list[torch.Tensor]:
    """``[Q_d(x) for x in xs]`` as new tensors, ``x`` on the grid of its own scale; see :func:`nearest`."""
    if bits == 1:
        return _binary_all_(torch._foreach_sign(xs), scales, presigned=True)
    return _grid_all_(torch._foreach_mul(xs, [1.0 / SymmetricGrid(bits, s).step for s in scales]), bits, scales)


def nearest_round_all_(xs: list[torch.Tensor], bits: int, scales: list[float]) -> None:
    """``x <- Q_d(x)`` in place for every ``x`` of ``xs``; see :func:`nearest_round_`."""
    if bits == 1:
        _binary_all_(xs, scales)
        return
    torch._foreach_mul_(xs, [1.0 / SymmetricGrid(bits, s).step for s in scales])
    _grid_all_(xs, bits, scales)


def stochastic_round_all_(xs: list[torch.Tensor], bits: int, scales: list[float], noise: Noise) -> None:
    """``x <- Q_s(x)`` in place for every ``x`` of ``xs``, with the noise of all of them in one draw
    (:meth:`Noise.vectors_each`; on CPU the values :func:`stochastic_round_` would draw for them one after
    another, so a run rounds the same whichever path it takes). With the fused kernel on
    (``compile=true``) each CPU tensor goes through it (one pass each); CUDA tensors keep this
    multi-tensor path (the Triton kernel takes the large ones: the fused kernel would draw and launch
    per layer)."""
    if not xs:
        return
    if _FUSED.on and not xs[0].is_cuda:
        for x, s in zip(xs, scales):
            stochastic_round_(x, bits, s, noise)
        return
    vectors = noise.vectors_each([x.numel() for x in xs])  # the noise of all tensors: one launch
    if _TRITON.wanted(xs[0]):  # CUDA: a large tensor in one kernel with its vectors; the rest below
        rest = [(x, s, v) for x, s, v in zip(xs, scales, vectors)
                if not (x.numel() > COLS and _triton_ready(x, bits) and _triton_kernel_(x, bits, s, v))]
        xs, scales, vectors = [x for x, _, _ in rest], [s for _, s, _ in rest], [v for _, _, v in rest]
        if not xs:
            return
    ts = [t.view(x.shape) for x, t in zip(xs, thresholds([x.numel() for x in xs], vectors, xs[0].device))]
    if bits == 1:  # the threshold's scale differs per tensor: one add each (alpha is per call)
        for x, t, s in zip(xs, ts, scales):
            x.add_(t, alpha=-s / HALF)
        _binary_all_(xs, scales, strict=True)
        return
    torch._foreach_mul_(xs, [1.0 / SymmetricGrid(bits, s).step for s in scales])
    torch._foreach_add_(xs, ts, alpha=1.0 / (2 * HALF))
    _grid_all_(xs, bits, scales)


def _binary_all_(xs: list[torch.Tensor], scales: list[float], strict: bool = False,
                 presigned: bool = False) -> list[torch.Tensor]:
    """:func:`_binary_` for many tensors: ``sign(sign(x) ± 1/2)·s`` is ``+s`` for ``x >= 0`` (``x > 0``
    when ``strict``) and ``-s`` otherwise, exactly (``sign`` gives -1, 0 or 1; ``±1·s`` is exact)."""
    if not presigned:
        torch._foreach_sign_(xs)
    torch._foreach_add_(xs, -0.5 if strict else 0.5)
    torch._foreach_sign_(xs)
    torch._foreach_mul_(xs, scales)
    return xs


def _grid_all_(ks: list[torch.Tensor], bits: int, scales: list[float]) -> list[torch.Tensor]:
    """:func:`_grid_` for many tensors (``clamp(k, -L, L)`` is ``min(max(k, -L), L)``, two calls)."""
    top = SymmetricGrid(bits, 1.0).max_index
    torch._foreach_round_(ks)
    torch._foreach_clamp_min_(ks, -top)
    torch._foreach_clamp_max_(ks, top)
    torch._foreach_mul_(ks, [SymmetricGrid(bits, s).step for s in scales])
    return ks


# ---- one Triton kernel (CUDA) ------------------------------------------------------------------------

class _Triton:
    """Whether CUDA tensors go through :mod:`qexp.quant.triton_sr` (default: where Triton is there);
    ``interpret``: also CPU tensors, through Triton's interpreter (tests)."""

    def __init__(self) -> None:
        self.on: bool | None = None  # None: decided on first use
        self.interpret = False
        self.checked: set[tuple[int, str]] = set()  # (bits, device type) checked against the eager passes

    def wanted(self, x: torch.Tensor) -> bool:
        if not (x.is_cuda or self.interpret) or x.dtype != torch.float32 or not x.is_contiguous():
            return False
        if self.on is None:
            self.on = _triton_available()
        return self.on


def _triton_available() -> bool:
    """Triton importable (CUDA builds of torch ship it), or its CPU interpreter switched on."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


_TRITON = _Triton()


def host_scalars(t: torch.Tensor) -> bool:
    """Whether a learned 0-dim parameter used with ``t`` (LSQ's step, PACT's and STE's alpha) may be read
    as a host number, for the one-pass kernels that take scalar bounds: on a CPU in eager mode only. On
    a GPU a read is a device synchronisation; under ``torch.compile`` it is a graph break (every
    quantizer its own frame, recompiled per shape until Dynamo's limit, then eager)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def use_triton(on: bool = True, interpret: bool = False) -> None:
    """Switch the Triton SR kernel on or off for this process (``interpret``: CPU tensors too, through
    ``TRITON_INTERPRET=1``, set before Triton is imported). Off, CUDA tensors take the eager passes."""
    _TRITON.on, _TRITON.interpret = bool(on), bool(interpret)
    _TRITON.checked.clear()


def _triton_ready(x: torch.Tensor, bits: int) -> bool:
    """Whether ``x`` goes through the Triton kernel: wanted for it and, on first use of its family in this
    process, checked against the eager passes (else switched off: the caller rounds eagerly)."""
    return _TRITON.wanted(x) and ((bits, x.device.type) in _TRITON.checked or _triton_matches_eager(bits, x.device))


def _triton_kernel_(x: torch.Tensor, bits: int, scale: float, vectors: tuple[torch.Tensor, ...]) -> bool:
    """``stochastic_round_`` of a tensor of more than COLS elements in one Triton kernel, with its noise."""
    from qexp.quant import triton_sr

    triton_sr.sr_(x.view(-1), bits, scale, *vectors)
    return True


def _triton_matches_eager(bits: int, device: torch.device) -> bool:
    """First use of a family in this process: the kernel and the eager passes round one probe tensor
    (three noise rows and a partial one, ties and signed zeros among its values) to the same bits; else
    one warning and the kernel is switched off."""
    probe = torch.linspace(-1.3, 1.3, 3 * COLS + 77, device=device)
    probe[:4] = torch.tensor([0.0, -0.0, 0.5, -0.5], device=device)
    why = ""
    try:
        from qexp.quant import triton_sr

        fast = probe.clone()
        triton_sr.sr_(fast, bits, 1.0, *Noise(7, device).vectors(fast.numel()))
        on, _TRITON.on = _TRITON.on, False
        try:
            eager = stochastic_round_(probe.clone(), bits, 1.0, Noise(7, device))
        finally:
            _TRITON.on = on
        differ = int((fast.view(torch.int32) != eager.view(torch.int32)).sum())
        if differ:
            why = f"{differ} of {fast.numel()} probe values differ from the eager kernel"
    except Exception as e:  # no Triton, or no working compiler for this device
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        why = f"{type(e).__name__}: {first}"
    if why:
        _TRITON.on = False
        log.warning("Triton SR kernel unavailable (%s); using the eager kernel", why)
        return False
    _TRITON.checked.add((bits, device.type))
    return True


# ---- the fused kernel ----------------------------------------------------------------------------------

def _sr_grid_body(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> None:
    """One pass over ``x`` (rows x cols): the eager kernel's arithmetic, in the same order.
    ``p = (1/Δ, L, Δ)`` as a float32 tensor: values, not constants, so one compiled kernel serves every
    bit-width and scale."""
    rows, cols = x.shape
    t = a.view(rows, 1) ^ b.view(1, cols) ^ c.unfold(0, cols, 1)
    k = x * p[0] + t.float() * (1.0 / (2 * HALF))
    x.copy_(torch.minimum(torch.maximum(torch.round(k), -p[1]), p[1]) * p[2])


def _sr_binary_body(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> None:
    """1 bit, ``p = (-scale/2^15, 2·scale, scale)``."""
    rows, cols = x.shape
    t = a.view(rows, 1) ^ b.view(1, cols) ^ c.unfold(0, cols, 1)
    k = x + t.float() * p[0]
    x.copy_((k > 0).float() * p[1] - p[2])


class _Fused:
    """Process-wide switch and the compiled kernels (built on first use)."""

    def __init__(self) -> None:
        self.on = False
        self.grid: Callable[..., None] | None = None
        self.binary: Callable[..., None] | None = None
        #: :func:`stochastic_round` kept out of compiled graphs (:func:`eager_in_graphs`); made when
        #: compiling is switched on, since ``torch.compiler.disable`` creates torch's kernel cache folder
        self.eager_sr: Callable[..., torch.Tensor] | None = None

    def compiled(self) -> tuple[Callable[..., None], Callable[..., None]]:
        if self.grid is None or self.binary is None:
            self.grid = torch.compile(_sr_grid_body, dynamic=True, fullgraph=True)
            self.binary = torch.compile(_sr_binary_body, dynamic=True, fullgraph=True)
        return self.grid, self.binary


_FUSED = _Fused()


@functools.lru_cache(maxsize=1024)
def _kernel_scalars(p: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The fused kernel's scalars as one float32 tensor on ``device``, made once per (grid, device): a
    tensor made from host numbers on a GPU is a copy that waits for the queued work."""
    return torch.tensor(p, dtype=torch.float32, device=device)


def _fused_sr_(x: torch.Tensor, bits: int, scale: float, noise: Noise) -> None:
    """``stochastic_round_`` through the compiled kernel. If compiling fails (no working C++ compiler or
    Triton), one warning, the kernel is switched off and this call finishes uncompiled (same thresholds)."""
    n = x.numel()
    a, b, c = (v.int() for v in noise.vectors(n))  # int32: Inductor vectorises int32 XOR, not int16
    full, tail = divmod(n, COLS)
    flat = x.view(-1)
    parts = [(flat[: full * COLS].view(full, COLS), a[:full], b, c[: full + COLS - 1])] if full else []
    if tail:
        parts.append((flat[full * COLS:].view(1, tail), a[full:], b[:tail], c[full: full + tail]))
    for xs, av, bv, cv in parts:
        grid, binary = _FUSED.compiled() if _FUSED.on else (_sr_grid_body, _sr_binary_body)
        g = SymmetricGrid(bits, scale)
        p = [-scale / HALF, 2 * scale, scale] if bits == 1 else [1.0 / g.step, float(g.max_index), g.step]
        args = (_kernel_scalars(tuple(p), x.device),)
        try:
            (binary if bits == 1 else grid)(xs, av, bv, cv, *args)
        except Exception as e:  # compiling failed: nothing of this part was written
            if not _FUSED.on:
                raise
            _FUSED.on = False
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            log.warning("fused SR kernel unavailable (%s: %s); using the eager kernel", type(e).__name__, first)
            (_sr_binary_body if bits == 1 else _sr_grid_body)(xs, av, bv, cv, *args)


def eager_in_graphs() -> Callable[..., torch.Tensor]:
    """:func:`stochastic_round` as a compiled forward calls it: eagerly (``torch.compiler.disable``, one
    explicit graph break): its noise comes from a seeded generator (``torch.randint(generator=...)``
    breaks the graph anyway) and, on CUDA, goes through the hand-launched Triton kernel, which Dynamo
    should not trace. Plain :func:`stochastic_round` before :func:`use_fused` switched compiling on."""
    return _FUSED.eager_sr if _FUSED.eager_sr is not None else stochastic_round


def use_fused(on: bool = True, device: torch.device | str = "cpu", probe: bool = True) -> bool:
    """Switch the fused SR kernel on (or off) for this process; returns whether it is on.

    ``probe``: compile the kernel's shape families now, on a small tensor of ``device``, so that a
    missing compiler is found here, with one warning, rather than in the middle of training (without it,
    compiling happens at first use, with the same fallback).
    """
    _FUSED.on = bool(on)
    if _FUSED.on and _FUSED.eager_sr is None:
        _FUSED.eager_sr = torch.compiler.disable(stochastic_round)
    for bits in (4, 1):
        if _FUSED.on and probe:
            _fused_sr_(torch.zeros(2 * COLS + 3, device=device), bits, 1.0, Noise(0, device))
    return _FUSED.on
