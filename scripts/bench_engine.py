"""Benchmark: one qexp training epoch (Trainer + float method) versus a minimal hand-written PyTorch
loop over the same in-memory tensors, model and batch size. Interleaved repetitions in one process, so
both sides see the same machine noise (the order alternates, ABBA); the figures are the ratio of the
medians and the ratio of the fastest epochs, qexp / bare.

    QEXP_DATA=/path/to/data python scripts/bench_engine.py [--subset 10000] [--reps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from qexp.data.mnist import build as build_mnist
from qexp.methods.float import Float
from qexp.models.lenet import LeNet5
from qexp.run.engine import drive
from qexp.run.sched import constant
from qexp.run.session import Trainer


def bare_epoch(model, opt, x_all, y_all, batch_size, mean, std, seed, epoch) -> float:
    """The minimal loop: permute, slice, normalise, forward, backward, step."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)
    order = torch.randperm(len(y_all), generator=g)
    t0 = time.perf_counter()
    model.train()
    for lo in range(0, len(y_all), batch_size):
        idx = order[lo : lo + batch_size]
        x = (x_all[idx].float().div_(255) - mean) / std
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def qexp_epoch(data, seed, epoch) -> float:
    torch.manual_seed(seed)
    model = LeNet5()
    method = Float()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    trainer = Trainer(model, method, opt, constant(opt, 1), data, torch.device("cpu"), epochs=1,
                      progress_bar=False)
    trainer.progress.epoch = 0
    t0 = time.perf_counter()
    status = drive(trainer._train_epoch(), trainer._train_step)
    assert status == "ok"
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    root = os.environ.get("QEXP_DATA", "./data")
    data = build_mnist("mnist", root, batch_size=args.batch_size, train_subset=args.subset, download=False)
    x_all, y_all = data.train.images, data.train.labels
    mean, std = 0.1307, 0.3081
    bare, ours = [], []
    def run_bare(rep: int) -> float:
        torch.manual_seed(rep)
        model = LeNet5()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        return bare_epoch(model, opt, x_all, y_all, args.batch_size, mean, std, rep, 0)

    for rep in range(args.reps):
        if rep % 2:
            ours.append(qexp_epoch(data, rep, 0))
            bare.append(run_bare(rep))
        else:
            bare.append(run_bare(rep))
            ours.append(qexp_epoch(data, rep, 0))
        print(f"rep {rep}: bare {bare[-1]:.2f} s, qexp {ours[-1]:.2f} s")
    med = statistics.median(ours) / statistics.median(bare)
    best = min(ours) / min(bare)
    print(f"LeNet-5/MNIST, {args.subset} images, batch {args.batch_size}, {torch.get_num_threads()} threads: "
          f"median bare {statistics.median(bare):.2f} s, qexp {statistics.median(ours):.2f} s; "
          f"ratio of medians {med:.3f}, ratio of fastest {best:.3f}")


if __name__ == "__main__":
    main()
