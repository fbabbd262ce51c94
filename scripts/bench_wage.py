"""Step time of WAGE (2-8-8-8) versus float training, side by side, on LeNet-5 and VGG-7.

A step is forward + SSE loss + backward + update (float: SGD; WAGE: its quantized update, with the
SGD step neutralised). Float and WAGE steps alternate, so both see the same machine load; the figure
is the median over the timed steps. Synthetic data of the real shapes (MNIST 1x28x28, CIFAR 3x32x32).

    python scripts/bench_wage.py                       # LeNet-5 and VGG-7, batch 128, auto device
    python scripts/bench_wage.py --models lenet5 --steps 30 --threads 2
"""

from __future__ import annotations

import argparse

import torch
from bench_weight import make_step, side_by_side  # scripts/ is on the path when run as a script

from qexp.methods.float import Float
from qexp.methods.wage import Wage
from qexp.models.lenet import LeNet5
from qexp.models.vgg import VGG

SHAPES = {"lenet5": (1, 28), "vgg7": (3, 32)}


def make_model(name: str) -> torch.nn.Module:
    c, side = SHAPES[name]
    if name == "lenet5":
        return LeNet5(c, 10, side, bn=False, bias=False)
    return VGG("vgg7", c, 10, side, bn=False, bias=False)


def bench(name: str, batch: int, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per step of float (SSE loss, SGD 1e-3) and WAGE (SGD lr 8, its paper value)."""
    c, side = SHAPES[name]
    shape = (batch, c, side, side)
    fns = {"float": make_step(Float(loss="sse"), lambda: make_model(name), shape, device, lr=1e-3, sgd=True,
                              uniform_input=True),
           "wage": make_step(Wage(), lambda: make_model(name), shape, device, lr=8.0, sgd=True, uniform_input=True)}
    t = side_by_side(fns, device, steps, per_round=1, warmup=warmup)
    return t["float"], t["wage"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lenet5", "vgg7"], choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    print(f"device {dev}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"median of {args.steps} alternating steps")
    print(f"{'model':8} {'float ms':>9} {'wage ms':>9} {'ratio':>6}")
    for name in args.models:
        tf, tw = bench(name, args.batch, args.steps, args.warmup, dev)
        print(f"{name:8} {tf * 1e3:9.1f} {tw * 1e3:9.1f} {tw / tf:6.2f}")


if __name__ == "__main__":
    main()
