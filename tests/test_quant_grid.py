"""Invariants of the weight grid and its rounding: unbiased SR, values on the grid and in range, two-valued
binarization, straight-through gradients, seeded reproducibility."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qexp.quant import kernels
from qexp.quant.grid import SymmetricGrid, on_grid, quantize_nearest, quantize_stochastic
from qexp.quant.kernels import (
    COLS,
    Noise,
    nearest,
    nearest_all,
    nearest_round_,
    nearest_round_all_,
    stochastic_round,
    stochastic_round_,
    stochastic_round_all_,
    stochastic_round_with_,
    thresholds,
)
from qexp.quant.straight_through import straight_through
from qexp.quant.weight import WeightQuantizer

BITS = [1, 2, 3, 4, 8]
SCALE = 0.37
DRAWS = 100_000


def _sr_kernel(x: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    return stochastic_round(x, bits, SCALE, Noise(seed))


@pytest.fixture(scope="module")
def fused():
    """The fused (torch.compile'd) SR kernel switched on for a test, off afterwards; compiled once."""
    if not kernels.use_fused(True):
        pytest.skip("no working compiler for torch.compile here (the eager kernel is used)")
    kernels.use_fused(False)
    yield lambda on: setattr(kernels._FUSED, "on", on)
    kernels.use_fused(False)


def _sr_fused(x: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    assert x.numel() >= kernels.FUSED_MIN
    kernels._FUSED.on = True
    try:
        return stochastic_round(x, bits, SCALE, Noise(seed))
    finally:
        kernels._FUSED.on = False


def _sr_grid(x: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    return quantize_stochastic(x, bits, SCALE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sr", [_sr_kernel, _sr_fused, _sr_grid], ids=["kernel", "fused", "grid"])
@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(sr, bits, request):
    """Mean of 1e5 draws within 5 standard errors (each draw's std <= Δ/2; 1 bit: <= s), plus the
    kernel's 16-bit threshold resolution (bias < Δ·2^-16)."""
    m = SymmetricGrid(bits, SCALE).limit
    d = SymmetricGrid(bits, SCALE).step
    sd = SCALE if bits == 1 else d / 2
    tol = 5 * sd / DRAWS**0.5 + d * 2**-16
    if sr is _sr_fused:
        request.getfixturevalue("fused")
    for i, v in enumerate([-m, -0.61 * m, -0.013 * m, 0.0, 0.2 * d, 0.5 * m + 0.3 * d, 0.999 * m, m]):
        x = torch.full((DRAWS,), v)
        q = sr(x, bits, seed=i)
        assert abs(q.double().mean().item() - v) < tol, (bits, v)


def test_sr_is_unbiased_over_repeated_calls():
    """Fresh thresholds on every call: one weight rounded 2000 times in a row (the in-place kernel)."""
    noise = Noise(7)
    bits, v = 3, 0.123
    x = torch.full((50,), v)
    total = torch.zeros(50, dtype=torch.float64)
    for _ in range(2000):
        total += stochastic_round_(x.clone(), bits, SCALE, noise)
    d = SymmetricGrid(bits, SCALE).step
    assert abs(total.mean().item() / 2000 - v) < 5 * (d / 2) / (2000 * 50) ** 0.5


@pytest.mark.parametrize("bits", BITS)
def test_values_lie_on_the_grid_inside_the_range(bits):
    torch.manual_seed(bits)
    x = torch.randn(10_000) * SCALE * 3  # well outside the range too
    m = SymmetricGrid(bits, SCALE).limit
    outs = {
        "nearest": nearest(x, bits, SCALE),
        "grid_nearest": quantize_nearest(x, bits, SCALE),
        "stochastic": stochastic_round(x, bits, SCALE, Noise(0)),
        "grid_stochastic": quantize_stochastic(x.clamp(-m, m), bits, SCALE),
        "nearest_inplace": nearest_round_(x.clone(), bits, SCALE),
        "stochastic_inplace": stochastic_round_(x.clone(), bits, SCALE, Noise(1)),
    }
    for name, q in outs.items():
        assert on_grid(q, bits, SCALE), name
        assert q.abs().max().item() <= m * (1 + 1e-6), name
        assert q.unique().numel() <= 2**bits - 1 or bits == 1, name
    # the fused kernel is Q_d: it may differ from the reference only within float error of a midpoint
    differ = outs["nearest"] != outs["grid_nearest"]
    if bits > 1:
        frac = (x[differ].clamp(-m, m) / SymmetricGrid(bits, SCALE).step).frac().abs()
        assert ((frac - 0.5).abs() < 1e-4).all()
    else:
        assert not differ.any()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_stochastic_rounding_picks_a_neighbour(bits):
    m, d = SymmetricGrid(bits, SCALE).limit, SymmetricGrid(bits, SCALE).step
    x = (torch.rand(10_000) * 2 - 1) * m
    q = stochastic_round(x, bits, SCALE, Noise(3))
    lo, hi = torch.floor(x / d) * d, torch.ceil(x / d) * d
    assert ((q - lo).abs() < 1e-6 * SCALE).logical_or((q - hi).abs() < 1e-6 * SCALE).all()


def test_rounding_again_changes_nothing():
    """Idempotence: stored SR/R weights are exactly grid values (not merely close)."""
    for bits in BITS:
        q = stochastic_round(torch.randn(5000) * SCALE, bits, SCALE, Noise(0))
        assert torch.equal(nearest(q, bits, SCALE), q)


def test_binarized_weights_take_exactly_two_values():
    x = torch.randn(10_000) * SCALE
    for q in (nearest(x, 1, SCALE), quantize_nearest(x, 1, SCALE), stochastic_round(x, 1, SCALE, Noise(0)),
              quantize_stochastic(x, 1, SCALE)):
        assert sorted(q.unique().tolist()) == pytest.approx([-SCALE, SCALE])
    assert nearest(torch.zeros(3), 1, SCALE).tolist() == pytest.approx([SCALE] * 3)  # sign(0) = +1


def test_stochastic_binarization_probability():
    """P(+s) = (w/s + 1)/2 (BinaryConnect's hard sigmoid)."""
    for w in (-0.8, -0.1, 0.0, 0.5):
        q = stochastic_round(torch.full((DRAWS,), w * SCALE), 1, SCALE, Noise(11))
        p = (q > 0).double().mean().item()
        assert abs(p - (w + 1) / 2) < 5 * 0.5 / DRAWS**0.5


@pytest.mark.parametrize("bits", [1, 4])
@pytest.mark.parametrize("stochastic", [False, True])
def test_straight_through_gradient_equals_upstream(bits, stochastic):
    torch.manual_seed(0)
    w = (torch.randn(64, 32) * SCALE).requires_grad_()
    quant = WeightQuantizer(bits, SCALE, Noise(0) if stochastic else None).train()
    wb = quant(w)
    assert on_grid(wb.detach(), bits, SCALE)
    g = torch.randn_like(wb)
    wb.backward(g)
    assert torch.equal(w.grad, g)
    w.grad = None
    straight_through(w, quantize_nearest(w.detach(), bits, SCALE)).backward(g)
    assert torch.equal(w.grad, g)
    w.grad = None
    straight_through(w, torch.zeros_like(w)).backward(g)
    assert torch.equal(w.grad, g)


def test_same_seed_same_rounding():
    x = torch.randn(20_000) * SCALE
    for bits in (1, 4):
        a = stochastic_round(x, bits, SCALE, Noise(5))
        b = stochastic_round(x, bits, SCALE, Noise(5))
        c = stochastic_round(x, bits, SCALE, Noise(6))
        assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(quantize_stochastic(x, 4, SCALE, g1), quantize_stochastic(x, 4, SCALE, g2))


def test_noise_state_round_trip_resumes_the_sequence():
    n1 = Noise(9)
    n1.int16(1000)
    state = n1.state_dict()
    expected = n1.int16(5000).clone()
    n2 = Noise(0)
    n2.load_state_dict(state)
    assert torch.equal(n2.int16(5000), expected)


def test_noise_state_from_a_gpu_generator_seeds_a_cpu_one(caplog):
    """A CUDA generator's state (16 bytes: Philox seed and offset) cannot continue on a CPU generator (a
    GPU run evaluated or resumed on a CPU): the generator is seeded from those bytes, the same way every
    time, with one warning; a CPU state still resumes its exact sequence."""
    cuda_state = {"generator": torch.arange(16, dtype=torch.uint8)}
    draws = []
    for _ in range(2):
        n = Noise(0)
        caplog.clear()
        n.load_state_dict(cuda_state)
        draws.append(n.int16(100).clone())
        assert [r.getMessage() for r in caplog.records] == [
            "a random generator state saved on another device type (16 bytes) was loaded into a cpu generator: "
            "seeded from it instead; its draws differ from an uninterrupted run's"]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], Noise(0).int16(100))


def test_noise_is_uniform_and_pairwise_independent():
    """Thresholds: mean 1/2, variance 1/12; neighbours along rows and columns uncorrelated."""
    u = Noise(2).uniform(4096 * 64).double().view(64, 4096)
    assert abs(u.mean().item() - 0.5) < 0.002
    assert abs(u.var().item() - 1 / 12) < 0.001
    # along a row, down a column, and along the anti-diagonal (two thresholds sharing the same c)
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1]), (u[1:, :-1], u[:-1, 1:])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.01
    counts = torch.histc(u.float(), bins=16, min=0, max=1)
    assert (counts / counts.mean() - 1).abs().max() < 0.03


@pytest.mark.parametrize("n", [kernels.FUSED_MIN, 4096 * 17 + 1, 300_001])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fused_kernel_is_bit_identical_to_the_eager_one(fused, n, bits):
    """Same thresholds, same float operations: the one-pass kernel changes nothing but the speed (so the
    unbiasedness and independence tests of the eager kernel hold for it too)."""
    x = torch.randn(n) * SCALE
    fused(False)
    eager = stochastic_round_(x.clone(), bits, SCALE, Noise(4))
    fused(True)
    one_pass = stochastic_round_(x.clone(), bits, SCALE, Noise(4))
    fused(False)
    assert torch.equal(eager, one_pass)


def test_fused_kernel_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    def broken() -> tuple:
        def fail(*args: object) -> None:
            raise RuntimeError("InductorError: no C++ compiler\nsecond line")
        return fail, fail

    monkeypatch.setattr(kernels._FUSED, "compiled", broken)
    x = torch.randn(kernels.FUSED_MIN + 5) * SCALE
    expected = stochastic_round_(x.clone(), 4, SCALE, Noise(8))
    with caplog.at_level("WARNING", logger="qexp"):
        assert kernels.use_fused(True) is False
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()
    assert "eager kernel" in caplog.records[0].getMessage()
    kernels._FUSED.on = True  # switched on but failing at the first real call: same values, then off
    try:
        assert torch.equal(stochastic_round_(x.clone(), 4, SCALE, Noise(8)), expected)
        assert kernels._FUSED.on is False
    finally:
        kernels.use_fused(False)


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_grid_step_limit_and_max_index_agree(bits: int) -> None:
    g = SymmetricGrid(bits, SCALE)
    assert g.limit == pytest.approx(g.max_index * g.step)
    x = torch.linspace(-2 * SCALE, 2 * SCALE, 1001)
    idx = g.index(x)
    assert idx.min() == -g.max_index and idx.max() == g.max_index
    assert torch.equal(idx.float() * g.step, quantize_nearest(x, bits, SCALE))


def test_check_range_and_choice_are_one_line_errors() -> None:
    from qexp.errors import QexpError, check_choice, check_range

    assert check_range("k", 3, 1, 8) == 3 and check_choice("c", "a", ("a", "b")) == "a"
    with pytest.raises(QexpError, match=r"^k=9 is out of range; allowed: 1\.\.8$"):
        check_range("k", 9, 1, 8)
    with pytest.raises(QexpError, match=r"^a=0 is out of range; allowed: > 0 \(why\)$"):
        check_range("a", 0, 0, strict_lo=True, why="why")
    with pytest.raises(QexpError, match=r"^c='z' is not allowed; choose from: a, b$"):
        check_choice("c", "z", ("a", "b"))


# ---- many tensors at once (one multi-tensor call per pass) ----------------------------------------------
LAYER_SHAPES = [(6, 1, 5, 5), (16, 6, 5, 5), (120, 400), (84, 120), (10, 84), (3,), (COLS + 1,), (2 * COLS,)]
LAYER_SCALES = [0.1, 0.2, 0.3, 0.05, 1.0, 0.7, 0.4, 0.25]


def _layers(device: str = "cpu") -> list[torch.Tensor]:
    """A network's worth of weights (small, and larger than one noise row), with signed zeros and exact
    ties among them."""
    torch.manual_seed(5)
    xs = [torch.randn(s) * 0.3 for s in LAYER_SHAPES]
    xs[0].view(-1)[:6] = torch.tensor([0.0, -0.0, 0.05, -0.05, 0.1, -0.1])
    return [x.to(device) for x in xs]


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Equal as bit patterns (so -0.0 and +0.0 differ)."""
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("bits", BITS)
def test_rounding_many_tensors_at_once_is_rounding_each(bits, device):
    """The multi-tensor functions the methods call (one launch per pass for all layers on CUDA) give the
    bit patterns of the one-tensor functions with the same noise (one draw for all layers; three steps
    in a row: the generators stay in step); on CPU that noise is what rounding layer by layer draws."""
    xs = _layers(device)
    assert _same_bits(nearest_all(xs, bits, LAYER_SCALES), [nearest(x, bits, s) for x, s in zip(xs, LAYER_SCALES)])
    each, together = _layers(device), _layers(device)
    for x, s in zip(each, LAYER_SCALES):
        nearest_round_(x, bits, s)
    nearest_round_all_(together, bits, LAYER_SCALES)
    assert _same_bits(each, together)
    each, together, given = _layers(device), _layers(device), _layers(device)
    one, many, ref = Noise(3, device), Noise(3, device), Noise(3, device)
    sizes = [x.numel() for x in given]
    for _ in range(3):
        if device == "cpu":  # CPU's generator stream concatenates: one draw for all is one per layer
            for x, s in zip(each, LAYER_SCALES):
                stochastic_round_(x, bits, s, one)
        stochastic_round_all_(together, bits, LAYER_SCALES, many)
        for x, t, s in zip(given, thresholds(sizes, ref.vectors_each(sizes), given[0].device), LAYER_SCALES):
            stochastic_round_with_(x, t.view(x.shape), bits, s)  # each layer's eager passes, same noise
        assert _same_bits(given, together)
        if device == "cpu":
            assert _same_bits(each, together)
    assert not _same_bits(given, _layers(device))  # it did round


# ---- the Triton SR kernel (CUDA; here through Triton's CPU interpreter) -----------------------------------
TRITON_CHECK = r"""
import torch
from qexp.quant import kernels
from qexp.quant.kernels import COLS, Noise, stochastic_round_, stochastic_round_all_

def bits_of(ts):
    return [t.view(torch.int32) for t in ts]

for bits in (1, 2, 4, 8):
    for n in (COLS + 1, 3 * COLS + 5, 100_003):
        torch.manual_seed(n + bits)
        x = torch.randn(n) * 0.3
        x[:6] = torch.tensor([0.0, -0.0, 0.05, -0.05, 0.1, -0.1])  # signed zeros, ties at 2 bits
        kernels.use_triton(False)
        eager = stochastic_round_(x.clone(), bits, 0.4, Noise(9))
        kernels.use_triton(True, interpret=True)
        fast = stochastic_round_(x.clone(), bits, 0.4, Noise(9))
        assert kernels._TRITON.on, "the kernel switched itself off"
        assert torch.equal(eager.view(torch.int32), fast.view(torch.int32)), (bits, n)
    # a network: small layers stay eager (their own noise scheme), large ones take the kernel, same draws
    shapes, scales = [(6, 25), (120, 400), (84, 120), (10, 84)], [0.3, 0.1, 0.2, 0.4]
    torch.manual_seed(bits)
    layers = [torch.randn(s) * 0.2 for s in shapes]
    kernels.use_triton(False)
    eager = [t.clone() for t in layers]
    stochastic_round_all_(eager, bits, scales, Noise(3))
    kernels.use_triton(True, interpret=True)
    fast = [t.clone() for t in layers]
    stochastic_round_all_(fast, bits, scales, Noise(3))
    assert all(torch.equal(a, b) for a, b in zip(bits_of(eager), bits_of(fast))), bits
print("identical")
"""


def test_triton_sr_kernel_is_bit_identical_to_the_eager_passes():
    """The one-launch CUDA kernel forms the same thresholds in registers and rounds with the same float
    operations: bit for bit the eager result (run by Triton's interpreter on CPU tensors)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    p = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "identical", p.stdout + p.stderr[-3000:]


def test_triton_sr_kernel_that_fails_or_differs_is_switched_off(monkeypatch, caplog):
    """A kernel that does not compile, or rounds one probe value differently from the eager passes, is
    found on first use: one warning, the kernel off, and the tensor rounded by the eager passes."""
    pytest.importorskip("triton")
    from qexp.quant import triton_sr

    for attr in ("on", "interpret"):  # restored afterwards: later tests of this worker (on a GPU machine,
        monkeypatch.setattr(kernels._TRITON, attr, getattr(kernels._TRITON, attr))  # the kernel) keep the default

    def broken(x, *args):
        raise RuntimeError("no compiler\nmore lines")

    def off_by_one(x, bits, scale, a, b, c):
        """The eager grid rounding from the same thresholds, one value a grid step off."""
        g = SymmetricGrid(bits, scale)
        t = (a.view(-1, 1) ^ b.view(1, COLS) ^ c.unfold(0, COLS, 1)).view(-1)[: x.numel()]
        x.mul_(1.0 / g.step).add_(t, alpha=2.0**-16).round_().clamp_(-g.max_index, g.max_index).mul_(g.step)
        x[123] += g.step

    x = torch.randn(3 * COLS + 1) * 0.3
    expected = stochastic_round_(x.clone(), 2, 0.4, Noise(1))
    cases = ((broken, "RuntimeError: no compiler"),
             (off_by_one, "1 of 12365 probe values differ from the eager kernel"))
    for fake, why in cases:
        monkeypatch.setattr(triton_sr, "sr_", fake)
        kernels.use_triton(True, interpret=True)
        caplog.clear()
        try:
            got = stochastic_round_(x.clone(), 2, 0.4, Noise(1))
        finally:
            kernels.use_triton(False)
        assert torch.equal(got, expected)
        assert [r.getMessage() for r in caplog.records] == [
            f"Triton SR kernel unavailable ({why}); using the eager kernel"]
