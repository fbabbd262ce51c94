"""Training step time of the modern baselines (lsq, pact, dorefa) versus float, side by side.

One step = the engine's ``train_step`` (method hooks, forward, loss, backward, optimizer step) on a fixed
synthetic batch of the real shape. All variants live in one process and are timed in interleaved rounds
whose order alternates (ABBA: float, lsq, ..., then ..., lsq, float), so drift on a busy machine hits
every variant alike; the median per variant is kept and divided by float's. Prints a Markdown table
for BENCHMARKS.md.

    OMP_NUM_THREADS=1 python scripts/bench_baselines.py --threads 1
    python scripts/bench_baselines.py --models resnet20 --batch 32 --steps 3 --rounds 4 --threads 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_weight import make_step, side_by_side  # scripts/ is on the path when run as a script
from torch import nn

from qexp.methods.base import Method
from qexp.methods.dorefa import DoReFa
from qexp.methods.float import Float
from qexp.methods.lsq import LSQ
from qexp.methods.pact import PACT
from qexp.methods.ste import STE
from qexp.models.lenet import LeNet5
from qexp.models.resnet import CifarResNet

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], int]] = {
    "lenet5": (lambda: LeNet5(1, 10, 28, bn=True), (1, 28, 28), 64),
    "resnet20": (lambda: CifarResNet(20, 3, 10, 32), (3, 32, 32), 128),
}


def variants(bits: int) -> dict[str, Callable[[], Method]]:
    return {
        "float": lambda: Float(),
        f"lsq w{bits}a{bits}": lambda: LSQ(bits=bits),
        f"lsq w{bits}a{bits}, first/last float": lambda: LSQ(bits=bits, first_last_bits=32),
        f"pact w{bits}a{bits}": lambda: PACT(bits=bits),
        f"dorefa w{bits}a{bits}": lambda: DoReFa(bits=bits),
        f"dorefa w{bits}a{bits}g8": lambda: DoReFa(bits=bits, gbits=8),
        f"ste a{bits} + bc w{bits}": lambda: STE(bits=bits, wbits=bits),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lenet5", help="comma-separated: lenet5, resnet20 (default lenet5)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (0: 64 for lenet5, 128 for resnet20)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timing (default 10)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds, ABBA order (default 6)")
    ap.add_argument("--bits", type=int, default=2, help="weight and activation bits (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {where}; W/A {args.bits}/{args.bits}; {args.steps} steps x {args.rounds} rounds (ABBA), "
          "median ms/step\n")
    print("| model | batch | method | ms/step | x float |")
    print("|---|---:|---|---:|---:|")
    for model_name in args.models.split(","):
        make_model, shape, batch = MODELS[model_name]
        batch = args.batch or batch
        fns = {name: make_step(make(), make_model, (batch, *shape), dev) for name, make in variants(args.bits).items()}
        # warm-up: the lazy initialisations (LSQ input steps, STE calibration)
        med = side_by_side(fns, dev, args.rounds, args.steps, warmup=2)
        for name, t in med.items():
            print(f"| {model_name} | {batch} | {name} | {1e3 * t:.2f} | {t / med['float']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
