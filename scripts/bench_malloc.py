"""Benchmark: what ``qexp.run.resources.keep_freed_memory`` (glibc keeps freed blocks for the next step)
buys on a CPU. The setting lasts a process's life, so each measurement is a child process, with the
setting (kept) or without it (glibc's defaults), alternating ABBA so both sides see the same machine
noise. Workloads, one thread, inputs drawn at random (the timing does not depend on the pixels):

- ``lenet5-eval``: LeNet-5 forward over 10,000 MNIST-sized images at qexp's ``eval_batch_size`` (1000);
- ``resnet20-train``: 8 training steps (Adam) of ResNet-20 on CIFAR-sized batches of 128;
- ``resnet20-train-1024``: 3 training steps of ResNet-20 on batches of 1024 (Big SR's batch: activations
  of 67 MB, where keeping freed blocks costs the most memory);
- ``lenet5-train``: 160 training steps (Adam) of LeNet-5 on MNIST-sized batches of 64 (small blocks:
  expected unchanged).

Reported: seconds per repetition (median over ``--reps``), minor page faults, the child's peak resident
memory (the setting's cost), and the ratio default / kept (above 1: the setting is faster).

    python scripts/bench_malloc.py [--reps 6] [--workloads lenet5-eval,resnet20-train,lenet5-train,resnet20-train-1024]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from qexp.run.resources import keep_freed_memory
kept = keep_freed_memory() if sys.argv[2] == "kept" else False
work = sys.argv[1]
torch.manual_seed(0)
if work == "lenet5-eval":
    from qexp.models.lenet import LeNet5
    model, x = LeNet5().eval(), torch.randn(10000, 1, 28, 28)
    def once():
        with torch.no_grad():
            for i in range(0, len(x), 1000):
                model(x[i:i + 1000])
else:
    if work.startswith("resnet20-train"):
        from qexp.models.resnet import CifarResNet
        big = work.endswith("-1024")
        model, shape, steps = CifarResNet(), (1024 if big else 128, 3, 32, 32), 3 if big else 8
    else:
        from qexp.models.lenet import LeNet5
        model, shape, steps = LeNet5(), (64, 1, 28, 28), 160
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    def once():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
once()  # warm-up: first-touch of the weights, the kernels' one-time set-up
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
once()
seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"kept": kept, "seconds": seconds, "faults": r1.ru_minflt - r0.ru_minflt,
                  "peak_mib": r1.ru_maxrss / 1024}))
"""


def measure(work: str, side: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", CHILD, work, side], env=env, capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if (side == "kept") != result["kept"]:
        raise SystemExit(f"{work}: keep_freed_memory() did not take effect in the {side!r} child")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--workloads", default="lenet5-eval,resnet20-train,lenet5-train,resnet20-train-1024")
    args = ap.parse_args()
    print("| workload | default (median s) | kept (median s) | page faults default / kept "
          "| peak RSS MiB default / kept | default / kept |")
    print("|---|---:|---:|---:|---:|---:|")
    for work in args.workloads.split(","):
        runs: dict[str, list[dict]] = {"default": [], "kept": []}
        for rep in range(args.reps):
            order = ("default", "kept") if rep % 2 == 0 else ("kept", "default")
            for side in order:
                runs[side].append(measure(work, side))
        med = {s: statistics.median(r["seconds"] for r in runs[s]) for s in runs}
        faults = {s: int(statistics.median(r["faults"] for r in runs[s])) for s in runs}
        peak = {s: max(r["peak_mib"] for r in runs[s]) for s in runs}
        print(f"| {work} | {med['default']:.3f} | {med['kept']:.3f} | {faults['default']} / {faults['kept']} "
              f"| {peak['default']:.0f} / {peak['kept']:.0f} | **{med['default'] / med['kept']:.2f}x** |", flush=True)


if __name__ == "__main__":
    main()
