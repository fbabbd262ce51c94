"""Benchmark weight quantization: training-step time of bc / sr / r versus float, and the SR kernel.

    python scripts/bench_weight.py                 # both parts, Markdown tables on stdout
    python scripts/bench_weight.py --part kernel   # only the 4M-element SR kernel
    python scripts/bench_weight.py --part launches # kernels launched per step (exact counts, any machine)

Step time: LeNet-5 on MNIST-shaped data (batch 64) and ResNet-20 on CIFAR-shaped data (batch 128),
random tensors, Adam, the engine's own ``train_step`` (every hook in its order). Methods run side by side: every round
times a few steps of each in turn, and the median over rounds is reported, so machine load (shared
CPU) hits all of them alike. Targets: bc <= 1.10x, sr and r <= 1.15x float (issue 25: bc, sr, r, ste and
lsq at most 1.15x float on a GPU). ``ste`` and ``lsq`` are the activation quantizers as typed (2-bit
ReLUs; LSQ W2/A2), beside the weight-only methods.

Launches (``--part launches``): the kernels one regular training step launches (no diagnostics step),
counted from the ATen operators it dispatches (:mod:`qexp.run.launches`) with Adam's multi-tensor path,
which torch takes on a GPU: a small network on a GPU is bound by its launches, so the ratio to float is
the step-time ratio to expect there. ``bc, Adam per group`` is bc with ``torch.optim.Adam`` as it is
(one set of multi-tensor calls per parameter group) instead of qexp's :class:`~qexp.run.optim.GroupedAdam`.

``bc per layer`` / ``sr per layer`` / ``r per layer``: the same methods quantizing one layer at a time
(qexp before the multi-tensor path, same values), side by side with it.

SR kernel: ``qexp.quant.kernels.stochastic_round_`` (in place, 8 bits, Δ = 2^-7) on 4M float32 values,
eager, Triton (CUDA only: ``qexp.quant.triton_sr``, the default there) and fused
(``kernels.use_fused()``: one torch.compile'd pass; its compile time is printed apart),
versus QPyTorch ``fixed_point_quantize(x, wl=8, fl=7, rounding="stochastic")`` (the same grid; CPU;
``pip install qtorch ninja``, its C++ extension is compiled on first import) and a plain
``y.copy_(x)``. Targets (issue 15): fused <= 2x the copy and >= 30x faster than QPyTorch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from qexp.methods.base import Method, RunContext, resolve_param_groups
from qexp.methods.bc import BinaryConnect
from qexp.methods.float import Float
from qexp.methods.lsq import LSQ
from qexp.methods.rounding import Rounding, StochasticRounding
from qexp.methods.ste import STE
from qexp.models.lenet import LeNet5
from qexp.models.resnet import CifarResNet
from qexp.quant import kernels
from qexp.quant.grid import quantize_stochastic
from qexp.quant.kernels import Noise, nearest_round_, stochastic_round_
from qexp.run.launches import LaunchCounter
from qexp.run.optim import grouped
from qexp.run.session import train_step


class LayerByLayerBC(BinaryConnect):
    """BinaryConnect quantizing in the forward one layer at a time and clipping layer by layer (qexp
    before the multi-tensor path): the side-by-side reference for it."""

    def before_forward(self, model: torch.nn.Module, step: int) -> None:
        pass

    @torch.no_grad()
    def after_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for q in self.layers:
            q.weight.clamp_(-q.scale, q.scale)


def layer_by_layer(cls: type[Rounding]) -> type[Rounding]:
    """SR / R rounding one layer at a time (same values: tests/test_quant_grid.py)."""

    class LayerByLayer(cls):  # type: ignore[misc, valid-type]
        def _round(self) -> None:
            for q in self.layers:
                if self.stochastic:
                    stochastic_round_(q.weight.data, q.bits, q.scale, self.noise)
                else:
                    nearest_round_(q.weight.data, q.bits, q.scale)

    return LayerByLayer


METHODS: dict[str, Callable[[], Method]] = {
    "float": Float,
    "bc": lambda: BinaryConnect(bits=1),
    "sr": lambda: StochasticRounding(bits=1),
    "r": lambda: Rounding(bits=1),
    "bc per layer": lambda: LayerByLayerBC(bits=1),
    "sr per layer": lambda: layer_by_layer(StochasticRounding)(bits=1),
    "r per layer": lambda: layer_by_layer(Rounding)(bits=1),
    "ste": lambda: STE(bits=2),
    "lsq": lambda: LSQ(bits=2, abits=2),
}
SETUPS = {
    "LeNet-5 / MNIST (batch 64)": (lambda: LeNet5(1, 10, 28), (64, 1, 28, 28)),
    "ResNet-20 / CIFAR-10 (batch 128)": (lambda: CifarResNet(20, 3, 10, 32), (128, 3, 32, 32)),
}


def make_step(method: Method, make_model: Callable[[], torch.nn.Module], shape: tuple[int, ...],
              device: torch.device, lr: float = 1e-3, sgd: bool = False,
              uniform_input: bool = False, foreach: bool | None = None,
              group_adam: bool = True) -> Callable[[], None]:
    """One training step of ``method`` on its own model copy and optimizer (Adam as qexp builds it, or
    SGD), with every hook in the engine's order (``engine.train_step``), on a fixed random batch of
    ``shape``. ``foreach``: the optimizer's multi-tensor switch (None: torch's default for the device)."""
    torch.manual_seed(0)
    model = method.prepare(make_model().to(device), RunContext(device)).to(device).train()
    groups = resolve_param_groups(method.param_groups(model), lr)
    if sgd:
        opt = torch.optim.SGD(groups, lr=lr, foreach=foreach)
    else:
        adam = torch.optim.Adam(groups, lr=lr, foreach=foreach)
        opt = grouped(adam) if group_adam else adam
    x = torch.rand(shape, device=device) * 2 - 1 if uniform_input else torch.randn(shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    state = {"step": 0}

    def step() -> None:
        train_step(model, method, opt, x, y, state["step"])
        state["step"] += 1

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_by_side(fns: dict[str, Callable[[], None]], device: torch.device, rounds: int, per_round: int,
                 warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # no fixed position in the round
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                fns[k]()
            sync(device)
            times[k].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_steps(device: torch.device, rounds: int) -> None:
    print("\n### Training step time (median over interleaved rounds)\n")
    print("| model / data | " + " | ".join(f"{m} ms" for m in METHODS) + " | "
          + " | ".join(f"{m}/float" for m in METHODS if m != "float") + " |")
    print("|---" * (2 * len(METHODS)) + "|")
    for label, (make_model, shape) in SETUPS.items():
        fns = {m: make_step(factory(), make_model, shape, device) for m, factory in METHODS.items()}
        per_round = 10 if "LeNet" in label else 3
        t = side_by_side(fns, device, rounds, per_round)
        ms = " | ".join(f"{1e3 * t[m]:.2f}" for m in METHODS)
        ratios = " | ".join(f"{t[m] / t['float']:.3f}x" for m in METHODS if m != "float")
        print(f"| {label} | {ms} | {ratios} |", flush=True)


def bench_launches() -> None:
    print("\n### Kernels launched per training step (Adam's multi-tensor path, as on a GPU)\n")
    from unittest import mock

    from qexp.methods import lsq

    with mock.patch.object(lsq, "host_scalars", lambda t: False):  # LSQ's device code, as on a GPU
        _count_launches()


def _count_launches() -> None:
    variants = {**METHODS, "bc, Adam per group": METHODS["bc"]}
    print("| model / data | " + " | ".join(variants) + " |")
    print("|---" * (len(variants) + 1) + "|")
    for label, (make_model, shape) in SETUPS.items():
        counts = {}
        for m, factory in variants.items():
            step = make_step(factory(), make_model, shape, torch.device("cpu"), foreach=True,
                             group_adam=m != "bc, Adam per group")
            for _ in range(2):  # state and one-off calibrations
                step()
            with LaunchCounter() as c:
                step()  # step 2: not a diagnostics step (every 10th)
            counts[m] = sum(c.ops.values())
        cells = [str(counts["float"])] + [f"{counts[m]} ({counts[m] / counts['float']:.2f}x)"
                                          for m in variants if m != "float"]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def qtorch_sr() -> Callable[[torch.Tensor], torch.Tensor] | str:
    """QPyTorch's fixed-point SR, or the reason it is unavailable."""
    try:
        from qtorch.quant import fixed_point_quantize
    except Exception as e:  # not installed, or its C++ extension failed to build
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return lambda x: fixed_point_quantize(x, wl=8, fl=7, clamp=True, rounding="stochastic")


def bench_kernel(device: torch.device, rounds: int, n: int = 4 * 1024 * 1024) -> None:
    print(f"\n### SR kernel on {n / 2**20:.0f}M float32 elements (8 bits, Δ = 2^-7; median over rounds)\n")
    torch.manual_seed(0)
    src = (torch.rand(n, device=device) * 2 - 1) * 0.99
    x, xf, y = src.clone(), src.clone(), torch.empty_like(src)
    noise, noise_f = Noise(0, device), Noise(0, device)
    gen = torch.Generator(device=device).manual_seed(0)
    # the fused path alone: with the Triton kernel on (CUDA's default) stochastic_round_ would take it
    triton_on, kernels._TRITON.on = kernels._TRITON.on, False
    t0 = time.perf_counter()
    fused_ok = kernels.use_fused(True, device)
    stochastic_round_(xf, 8, 1.0, noise_f)  # the 4M shape family
    sync(device)
    compile_s = time.perf_counter() - t0
    kernels.use_fused(False)
    kernels._TRITON.on = triton_on

    def fused() -> None:
        on, kernels._TRITON.on = kernels._TRITON.on, False
        kernels._FUSED.on = fused_ok
        stochastic_round_(xf, 8, 1.0, noise_f)
        kernels._FUSED.on = False
        kernels._TRITON.on = on

    def eager() -> None:  # the eager passes even on CUDA, where the Triton kernel is the default
        on, kernels._TRITON.on = kernels._TRITON.on, False
        stochastic_round_(x, 8, 1.0, noise)
        kernels._TRITON.on = on

    fns: dict[str, Callable[[], object]] = {
        "copy (y.copy_(x))": lambda: y.copy_(src),
        "qexp stochastic_round_ eager (in place)": eager,
        "qexp stochastic_round_ fused (in place)": fused,
        "torch.rand reference (grid.quantize_stochastic)": lambda: quantize_stochastic(src, 8, 1.0, gen),
    }
    kinds = ["eager", "fused"]
    if device.type == "cuda":  # the Triton kernel (CUDA's default for tensors over 4096 elements)
        xt, noise_t = src.clone(), Noise(0, device)
        kernels.use_triton(True)
        stochastic_round_(xt, 8, 1.0, noise_t)  # compile and check against the eager passes, untimed
        if kernels._TRITON.on:
            fns["qexp stochastic_round_ triton (in place)"] = lambda: stochastic_round_(xt, 8, 1.0, noise_t)
            kinds.append("triton")
    q = qtorch_sr() if device.type == "cpu" else "QPyTorch compared on CPU only"
    if callable(q):
        fns["QPyTorch fixed_point_quantize (stochastic)"] = lambda: q(src)
    t = side_by_side(fns, device, rounds, per_round=5, warmup=2)
    base = t["copy (y.copy_(x))"]
    print("| kernel | ms | x copy | GB/s (4 B read + 4 B written per element) |")
    print("|---|---|---|---|")
    for k, v in t.items():
        print(f"| {k} | {1e3 * v:.2f} | {v / base:.2f} | {8 * n / v / 1e9:.1f} |")
    print(f"\nfused kernel {'compiled' if fused_ok else 'UNAVAILABLE (eager timed)'} in {compile_s:.1f} s "
          "(all shape families, once per process; not in the timings)")
    for kind in kinds:
        ours = t[f"qexp stochastic_round_ {kind} (in place)"]
        vs = (f"{t['QPyTorch fixed_point_quantize (stochastic)'] / ours:.1f}x faster than QPyTorch, "
              if callable(q) else f"QPyTorch unavailable ({q}), ")
        print(f"qexp SR {kind}: {vs}{ours / base:.2f}x the copy's time.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "steps", "kernel", "launches"], default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    if args.part in ("all", "launches"):
        bench_launches()
    if args.part in ("all", "steps"):
        bench_steps(device, args.rounds)
    if args.part in ("all", "kernel"):
        bench_kernel(device, args.rounds)


if __name__ == "__main__":
    main()
