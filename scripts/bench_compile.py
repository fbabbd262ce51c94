"""Benchmark ``compile=true``: training-step time eager vs torch.compile'd, per method and model.

    OMP_NUM_THREADS=1 python scripts/bench_compile.py --methods float,bc,sr,ste,wage --models lenet5,resnet20

Each (model, method) is built twice through ``qexp.run.session.build`` from the real config (same seed):
one steps eagerly, the other through :class:`qexp.run.compiled.Compiled` (what ``compile=true`` does).
The step is :func:`qexp.run.engine.train_step` (every method hook, forward, loss, backward, optimizer
step) on a fixed synthetic batch of the real shape (LeNet-5: 1x28x28, batch 64; ResNet-20: 3x32x32,
batch 128). The compiled side is warmed up first (its compile time is printed apart); then the two
alternate in ABBA rounds and the ratio of median step times is the speed-up (target >= 1.3).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable

import torch
from bench_weight import side_by_side  # scripts/ is on the path when run as a script

from qexp.run.compiled import CompileClock, Compiled
from qexp.run.config import register
from qexp.run.precision import MixedPrecision
from qexp.run.session import build, train_step

SHAPES = {"lenet5": (["dataset.channels=1", "dataset.image_size=28"], 64),
          "resnet20": (["dataset.channels=3", "dataset.image_size=32"], 128)}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register()
    with initialize_config_module(config_module="qexp.configs", version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def make_step(model_name: str, method: str, compiled: bool, precision: str = "32") -> Callable[[], None]:
    extra, batch = SHAPES[model_name]
    cfg = compose([f"model={model_name}", f"method={method}", "dataset=synthetic", *extra,
                   f"batch_size={batch}", "dataset.train_samples=256", "dataset.test_samples=64"])
    torch.manual_seed(0)
    b = build(cfg, torch.device("cpu"))
    x, y = next(iter(b.data.train))
    b.model.train()
    amp = MixedPrecision(precision, torch.device("cpu"))
    amp.attach(b.model)
    fwd = Compiled(b.model, ready=functools.partial(b.method.compile_ready, b.model)) if compiled else b.model
    state = {"step": 0}

    def step() -> None:
        train_step(b.model, b.method, b.optimizer, x, y, state["step"], fwd, amp if amp.enabled else None)
        state["step"] += 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="float,bc,sr,ste,wage")
    ap.add_argument("--models", default="lenet5,resnet20")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=0, help="steps per round (0: 10 for LeNet-5, 2 for ResNet-20)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("\n| model | method | eager ms/step | compiled ms/step | speed-up | compile s |")
    print("|---|---|---:|---:|---:|---:|")
    for model_name in args.models.split(","):
        per_round = args.steps or (10 if model_name == "lenet5" else 2)
        for method in args.methods.split(","):
            eager, comp = make_step(model_name, method, False), make_step(model_name, method, True)
            clock = CompileClock().start()
            t0 = time.perf_counter()
            for _ in range(12):  # past a diagnostics step (every 10th: a second graph variant)
                comp()
            warm = time.perf_counter() - t0
            clock.stop()
            med = side_by_side({"eager": eager, "compiled": comp}, torch.device("cpu"), args.rounds, per_round,
                               warmup=2)
            e, c = med["eager"], med["compiled"]
            print(f"| {model_name} | {method} | {1e3 * e:.1f} | {1e3 * c:.1f} | {e / c:.2f}x | "
                  f"{clock.seconds:.1f} (warm-up {warm:.1f}) |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
