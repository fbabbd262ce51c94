"""Benchmark ``compile=true`` (and ``cuda_graphs=true``): training-step time eager vs torch.compile'd,
per method and model.

    OMP_NUM_THREADS=1 python scripts/bench_compile.py --methods float,bc,sr,ste,wage --models lenet5,resnet20
    python scripts/bench_compile.py --device cuda --modes eager,graphs --methods float,bc,sr,r,ste,lsq

Each (model, method) is built once per mode through ``qexp.run.session.build`` from the real config
(same seed) for each of ``--modes``: ``eager``; ``compiled``, through :class:`qexp.run.compiled.Compiled`
(what ``compile=true`` does); ``graphs``, through it in the ``reduce-overhead`` mode (``cuda_graphs=true``;
on a CPU that mode records no graph: a rehearsal only). The step is
:func:`qexp.run.session.train_step` (every method hook, forward, loss, backward, optimizer step) on a
fixed synthetic batch of the real shape (LeNet-5: 1x28x28, batch 64; ResNet-20: 3x32x32, batch 128). The
compiled sides are warmed up first (their compile time is printed apart); then every method and mode of
one model alternate in interleaved rounds, and each model's tables (printed as it finishes) give the
speed-up of each mode over the first and each method's step over float's in the same mode (issue 25's
goal on a GPU: at most 1.15x).
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


def make_step(model_name: str, method: str, compiled: bool, precision: str = "32",
              device: torch.device | str = "cpu", cuda_graphs: bool = False) -> Callable[[], None]:
    extra, batch = SHAPES[model_name]
    device = torch.device(device)
    cfg = compose([f"model={model_name}", f"method={method}", "dataset=synthetic", *extra,
                   f"batch_size={batch}", "dataset.train_samples=256", "dataset.test_samples=64"])
    torch.manual_seed(0)
    b = build(cfg, device)
    x, y = (t.to(device) for t in next(iter(b.data.train)))
    b.model.train()
    amp = MixedPrecision(precision, device)
    amp.attach(b.model)
    fwd = (Compiled(b.model, device, functools.partial(b.method.compile_ready, b.model), cuda_graphs)
           if compiled else b.model)
    state = {"step": 0}

    def step() -> None:
        train_step(b.model, b.method, b.optimizer, x, y, state["step"], fwd, amp if amp.enabled else None)
        state["step"] += 1

    return step


MODES = {"eager": (False, False), "compiled": (True, False), "graphs": (True, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="float,bc,sr,ste,wage")
    ap.add_argument("--models", default="lenet5,resnet20")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="eager,compiled", help="of eager, compiled, graphs (cuda_graphs=true)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=0,
                    help="steps per round (0: 10 for LeNet-5 or on a GPU, 2 for ResNet-20 on a CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    methods, modes = args.methods.split(","), args.modes.split(",")
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: of {', '.join(MODES)}")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for model_name in args.models.split(","):
        per_round = args.steps or (10 if model_name == "lenet5" or device.type == "cuda" else 2)
        fns, compile_s = {}, {}
        for method in methods:
            for mode in modes:
                compiled, graphs = MODES[mode]
                step = make_step(model_name, method, compiled, device=device, cuda_graphs=graphs)
                if compiled:
                    clock = CompileClock().start()
                    t0 = time.perf_counter()
                    for _ in range(12):  # past a diagnostics step (every 10th: a second graph variant)
                        step()
                    compile_s[method, mode] = (clock.seconds, time.perf_counter() - t0)
                    clock.stop()
                    print(f"  {model_name} {method} {mode}: compiled in {clock.seconds:.1f} s", flush=True)
                fns[method, mode] = step
        med = side_by_side(fns, device, args.rounds, per_round, warmup=2)
        compiled_modes = [m for m in modes if MODES[m][0]]
        print(f"\n{model_name}:\n\n| method | " + " | ".join(f"{m} ms/step" for m in modes) + " | "
              + " | ".join(f"{m} speed-up" for m in modes[1:]) + " | "
              + " | ".join(f"{m}: compile s (warm-up s)" for m in compiled_modes) + " |")
        print("|---|" + "---:|" * (2 * len(modes) - 1) + "---|" * len(compiled_modes))
        for method in methods:
            t = [med[method, m] for m in modes]
            print(f"| {method} | " + " | ".join(f"{1e3 * v:.2f}" for v in t) + " | "
                  + " | ".join(f"{t[0] / v:.2f}x" for v in t[1:]) + " | "
                  + " | ".join(f"{compile_s[method, m][0]:.1f} ({compile_s[method, m][1]:.1f})"
                               for m in compiled_modes) + " |")
        if "float" in methods and len(methods) > 1:
            print(f"\n{model_name}, step time over float's in the same mode:\n")
            print("| method | " + " | ".join(modes) + " |")
            print("|---|" + "---:|" * len(modes))
            for method in methods:
                if method != "float":
                    print(f"| {method} | " + " | ".join(f"{med[method, m] / med['float', m]:.2f}x" for m in modes)
                          + " |", flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
