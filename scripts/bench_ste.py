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
from collections.abc import Callable

import torch
from bench_weight import make_step, side_by_side  # scripts/ is on the path when run as a script
from torch import nn

from qexp.methods.base import Method
from qexp.methods.float import Float
from qexp.methods.ste import STE
from qexp.models.lenet import LeNet5
from qexp.models.resnet import CifarResNet

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
        fns = {name: make_step(make(), make_model, (batch, *shape), dev) for name, make in variants(args.bits).items()}
        med = side_by_side(fns, dev, args.rounds, args.steps, warmup=3)  # warm-up includes the STE calibration
        for name, t in med.items():
            print(f"| {model_name} | {name} | {1e3 * t:.2f} | {t / med['float']:.3f} |")


if __name__ == "__main__":
    main()
