"""Benchmark ``precision=bf16-mixed`` on CPU: training-step time vs float32, and the accuracy change.

    OMP_NUM_THREADS=1 python scripts/bench_precision.py --part steps --methods float,bc,sr,ste,wage
    QEXP_DATA=... python scripts/bench_precision.py --part accuracy --seeds 0,1 --subset 10000

Steps: the same (model, method) built twice from the real config (same seed), one step in float32, one
with conv/linear layers in bf16 (:mod:`qexp.run.precision`), :func:`qexp.run.engine.train_step` on a
fixed synthetic batch of the real shape, ABBA rounds, ratio of median step times.
Accuracy: ``qexp train`` LeNet-5 on the first N MNIST images, 1 epoch, float32 vs bf16-mixed, per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compile import make_step  # noqa: E402
from bench_weight import side_by_side  # noqa: E402


def steps(args: argparse.Namespace) -> None:
    print("\n| model | method | float32 ms/step | bf16-mixed ms/step | speed-up |")
    print("|---|---|---:|---:|---:|")
    for model_name in args.models.split(","):
        per_round = 10 if model_name == "lenet5" else 2
        for method in args.methods.split(","):
            fns = {"32": make_step(model_name, method, False), "bf16": make_step(model_name, method, False,
                                                                               "bf16-mixed")}
            med = side_by_side(fns, torch.device("cpu"), args.rounds, per_round, warmup=2)
            a, b = med["32"], med["bf16"]
            print(f"| {model_name} | {method} | {1e3 * a:.1f} | {1e3 * b:.1f} | {a / b:.2f}x |", flush=True)


def accuracy(args: argparse.Namespace) -> None:
    print("\n| method | seed | float32 test error % | bf16-mixed test error % |")
    print("|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for seed in args.seeds.split(","):
                errs = []
                for prec in ("32", "bf16-mixed"):
                    out = Path(tmp) / f"{method}{seed}{prec}"
                    subprocess.run([sys.executable, "-m", "qexp.run.train", f"out_root={out}", f"method={method}",
                                    f"seed={seed}", f"precision={prec}", f"dataset.train_subset={args.subset}",
                                    "progress=false"], check=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                    (m,) = [json.loads(p.read_text()) for p in out.rglob("metrics.json")]
                    errs.append(m["test_error"])
                print(f"| {method} | {seed} | {errs[0]:.2f} | {errs[1]:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["steps", "accuracy"], default="steps")
    ap.add_argument("--methods", default="float,bc,sr,ste,wage")
    ap.add_argument("--models", default="lenet5,resnet20")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--subset", type=int, default=10000)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    steps(args) if args.part == "steps" else accuracy(args)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
