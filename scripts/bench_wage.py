"""Step time of WAGE (2-8-8-8) versus float training, side by side, on LeNet-5 and VGG-7.

A step is forward + SSE loss + backward + update (float: SGD; WAGE: its quantized update, with the
SGD step neutralised). Float and WAGE steps alternate, so both see the same machine load; the figure
is the median over the timed steps. Synthetic data of the real shapes (MNIST 1x28x28, CIFAR 3x32x32).

    python scripts/bench_wage.py                       # LeNet-5 and VGG-7, batch 128, auto device
    python scripts/bench_wage.py --models lenet5 --steps 30 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qexp.methods.base import Method, RunContext, resolve_param_groups
from qexp.methods.float import Float
from qexp.methods.wage import Wage
from qexp.models.lenet import LeNet5
from qexp.models.vgg import VGG
from qexp.run.engine import train_step

SHAPES = {"lenet5": (1, 28), "vgg7": (3, 32)}


def make_model(name: str) -> torch.nn.Module:
    c, side = SHAPES[name]
    if name == "lenet5":
        return LeNet5(c, 10, side, bn=False, bias=False)
    return VGG("vgg7", c, 10, side, bn=False, bias=False)


class Runner:
    """One model under one method, with a ``step()`` that does what the engine does per batch."""

    def __init__(self, method: Method, name: str, batch: int, device: torch.device, lr: float) -> None:
        self.method = method
        self.model = method.prepare(make_model(name).to(device), RunContext(device)).to(device)
        self.opt = torch.optim.SGD(resolve_param_groups(method.param_groups(self.model), lr), lr=lr)
        c, side = SHAPES[name]
        self.x = torch.rand(batch, c, side, side, device=device) * 2 - 1
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.device = device

    def step(self) -> float:
        sync(self.device)
        t = time.perf_counter()
        train_step(self.model, self.method, self.opt, self.x, self.y, 0)
        sync(self.device)
        return time.perf_counter() - t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, batch: int, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    flt = Runner(Float(loss="sse"), name, batch, device, lr=1e-3)
    wg = Runner(Wage(), name, batch, device, lr=8.0)
    for _ in range(warmup):
        flt.step()
        wg.step()
    tf, tw = [], []
    for _ in range(steps):
        tf.append(flt.step())
        tw.append(wg.step())
    return statistics.median(tf), statistics.median(tw)


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
