"""Benchmark: training step time of ``method=learned`` versus float and versus ``method=bc`` at the same
bits, side by side in one process (interleaved rounds, so every method sees the same machine noise).

A step is the whole hook sequence the engine runs: before_forward (learned: the Gumbel draw of the
allocation), forward, loss, backward, after_backward, optimizer step, after_step. ``learned`` is timed
in its soft phase (a fresh allocation every step, the forward-difference bit gradient) and frozen
(after the hard assignment: plain k-bit BinaryConnect at the frozen widths).

    python scripts/bench_learned.py [--model lenet5] [--bits 4] [--batch-size 64] [--steps 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_weight import make_step, side_by_side  # scripts/ is on the path when run as a script
from torch import nn

from qexp.methods.base import Method
from qexp.methods.bc import BinaryConnect
from qexp.methods.float import Float
from qexp.methods.learned import LearnedPrecision
from qexp.models.lenet import LeNet5
from qexp.models.resnet import CifarResNet
from qexp.models.vgg import VGG

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int]]] = {
    "lenet5": (lambda: LeNet5(1, 10, 28), (1, 28)),
    "resnet20": (lambda: CifarResNet(20, 3, 10, 32), (3, 32)),
    "vgg7": (lambda: VGG("vgg7", 3, 10, 32), (3, 32)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5", choices=sorted(MODELS))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(auto if args.device == "auto" else args.device)
    soft = LearnedPrecision(bits=args.bits, hard_after=10**6, epochs=10**6)  # never freezes
    methods: dict[str, Method] = {
        "float": Float(),
        f"bc {args.bits}b": BinaryConnect(bits=args.bits),
        f"learned {args.bits}b (soft)": soft,
        f"learned {args.bits}b (frozen)": LearnedPrecision(bits=args.bits, hard_after=0),
    }
    make, (c, size) = MODELS[args.model]
    fns = {k: make_step(m, make, (args.batch_size, c, size, size), dev) for k, m in methods.items()}
    # warm-up: allocator, lazy inits, first-batch calibrations
    med = side_by_side(fns, dev, args.rounds, args.steps, warmup=3)
    base, bc = med["float"], med[f"bc {args.bits}b"]
    layers = soft.num_layers
    where = dev.type if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model}, batch {args.batch_size}, {where}, {layers} quantized layers, "
          f"median of {args.rounds} interleaved rounds x {args.steps} steps")
    print(f"{'method':<24}{'ms/step':>10}{'vs float':>10}{'vs bc':>8}")
    for k, v in med.items():
        print(f"{k:<24}{1e3 * v:>10.2f}{v / base:>10.2f}{v / bc:>8.2f}")


if __name__ == "__main__":
    main()
