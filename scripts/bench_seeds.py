"""Benchmark ``trainer.seeds_per_process=K``: one training epoch of K seeds of LeNet-5 on MNIST through
qexp, as K separate runs (K engines one after another: what K runs queued on one device cost) and as one
stacked group (:mod:`qexp.run.seeds`: one vectorised forward and backward, each seed's hooks and
optimizer on its slice); the group's images per second over the separate runs'. Interleaved rounds
(bench_weight.side_by_side) in one process; each call trains one more epoch of the same models.

    QEXP_DATA=/path/to/data python scripts/bench_seeds.py --device cuda --k 8       # real MNIST
    python scripts/bench_seeds.py --data synthetic --k 2 --images 512 --rounds 2    # random MNIST-shaped images

Goal (issue 25): at least 2.5x at K=8 on a GPU. On a CPU the group is slower (the batched convolutions
cost more than the launches they save); ``seeds_per_process`` is not the default anywhere.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from bench_weight import side_by_side  # scripts/ is on the path when run as a script
from hydra import compose, initialize_config_module

from qexp.run import seeds
from qexp.run.config import register
from qexp.run.engine import drive
from qexp.run.session import Built, Trainer, build, group_step, stack_seeds


def configs(data: str, images: int, method: list[str], k: int) -> list[object]:
    register()
    over = ["model=lenet5", "epochs=1", "progress=false", *method]
    if data == "synthetic":
        over += ["dataset=synthetic", f"dataset.train_subset={min(images, 512)}"]
    else:
        over += [f"dataset={data}", f"dataset.train_subset={images}"]
    with initialize_config_module(config_module="qexp.configs", version_base="1.3"):
        return [compose("train", overrides=[*over, f"seed={s}"]) for s in range(k)]


def built(cfgs: list[object], device: torch.device) -> list[Built]:
    out = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        out.append(build(c, device))
    return out


def trainers(bs: list[Built], device: torch.device, clock: Callable[[], float] = time.perf_counter) -> list[Trainer]:
    return [Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, device, 1, progress_bar=False,
                    train_clock=clock) for b in bs]


def separate(cfgs: list[object], device: torch.device) -> Callable[[], None]:
    ts = trainers(built(cfgs, device), device)

    def run() -> None:
        for t in ts:
            t.progress.batch = 0  # one more epoch (the epoch's end, evaluation included, is not run)
            assert drive(t._train_epoch(), t._train_step) == "ok"
    return run


def group(cfgs: list[object], device: torch.device) -> Callable[[], None]:
    bs = built(cfgs, device)
    stack = stack_seeds(bs)
    ts = trainers(bs, device, seeds.StepClock())
    take = group_step(stack, bs)

    def run() -> None:
        for t in ts:
            t.progress.batch = 0
        assert seeds.drive([t._train_epoch() for t in ts], take) == ["ok"] * len(ts)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default="mnist", help="mnist | synthetic")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--images", type=int, default=10000, help="training images per seed and epoch")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--methods", default="float,sr", help="comma-separated: float, sr, r, bc, big_sr")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"K={args.k} seeds of LeNet-5, {args.data}, {args.images} images per seed, batch 64, {name}, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.1f}, median of {args.rounds} rounds\n")
    print("| method | K separate runs, s / epoch | stacked group, s / epoch | group images/s | "
          "group vs separate |")
    print("|---|---:|---:|---:|---:|")
    for m in args.methods.split(","):
        cfgs = configs(args.data, args.images, [f"method={m}"], args.k)
        med = side_by_side({"separate": separate(cfgs, device), "group": group(cfgs, device)}, device,
                           args.rounds, per_round=1, warmup=1)
        n = args.k * int(cfgs[0].dataset.train_subset)
        print(f"| {m} | {med['separate']:.3f} | {med['group']:.3f} | {n / med['group']:.0f} | "
              f"{med['separate'] / med['group']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
