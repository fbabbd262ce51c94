"""Training step time of method=ste (quantized ReLUs) versus float, side by side.

LeNet-5 at MNIST shape and ResNet-20 at CIFAR shape; one step = the Trainer's work per batch (method
hooks, forward, loss, backward, optimizer step) on a fixed synthetic batch. Methods are measured in
interleaved rounds (float, ste/identity, ste/relu, ... then again) and the median per method is kept,
so a busy machine slows all of them alike. Prints a Markdown table for BENCHMARKS.md.

    python scripts/bench_ste.py                       # defaults below
    python scripts/bench_ste.py --steps 20 --rounds 7 --bits 2 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from qexp.methods.base import Method, RunContext, resolve_param_groups
from qexp.methods.float import Float
from qexp.methods.ste import STE
from qexp.models.lenet import LeNet5
from qexp.models.resnet import CifarResNet
from qexp.run.engine import train_step

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], int]] = {
    "lenet5 (MNIST 1x28x28, batch 64)": (lambda: LeNet5(1, 10, 28), (1, 28, 28), 64),
    "resnet20 (CIFAR 3x32x32, batch 128)": (lambda: CifarResNet(20, 3, 10, 32), (3, 32, 32), 128),
}


def variants(bits: int) -> dict[str, Callable[[], Method]]:
    return {
        "float": lambda: Float(),
        "ste identity": lambda: STE(bits=bits, ste="identity"),
        "ste relu": lambda: STE(bits=bits, ste="relu"),
        "ste clipped_relu": lambda: STE(bits=bits, ste="clipped_relu"),
        "ste clipped_relu, learned alpha": lambda: STE(bits=bits, ste="clipped_relu", learn_alpha=True),
    }


class Runner:
    """One model + method + optimizer, ready to time ``steps`` training steps."""

    def __init__(self, make_model: Callable[[], nn.Module], make_method: Callable[[], Method],
                 shape: tuple[int, int, int], batch: int, device: torch.device) -> None:
        torch.manual_seed(0)
        self.method = make_method()
        self.model = self.method.prepare(make_model().to(device), RunContext(device)).to(device)
        groups = resolve_param_groups(self.method.param_groups(self.model), 1e-3)
        self.opt = torch.optim.Adam(groups, lr=1e-3)
        self.x = torch.randn(batch, *shape, device=device)
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.device, self.step_no = device, 0
        self.model.train()
        self.run(3)  # warm-up (and the STE calibration pass)

    def run(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps."""
        m, model = self.method, self.model
        self._sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(model, m, self.opt, self.x, self.y, self.step_no)
            self.step_no += 1
        self._sync()
        return (time.perf_counter() - t0) / steps

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="steps per timing (default 10)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is kept (default 5)")
    ap.add_argument("--bits", type=int, default=2, help="activation bits (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {where}; bits={args.bits}; {args.steps} steps x {args.rounds} interleaved rounds, "
          "median ms/step\n")
    print("| model | method | ms/step | x float |")
    print("|---|---|---:|---:|")
    for model_name, (make_model, shape, batch) in MODELS.items():
        runners = {name: Runner(make_model, make, shape, batch, dev) for name, make in variants(args.bits).items()}
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, r in runners.items():
                times[name].append(r.run(args.steps))
        med = {name: statistics.median(t) for name, t in times.items()}
        for name, t in med.items():
            print(f"| {model_name} | {name} | {1e3 * t:.2f} | {t / med['float']:.3f} |")


if __name__ == "__main__":
    main()
