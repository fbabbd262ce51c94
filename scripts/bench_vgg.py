"""Benchmark: one VGG-BC CIFAR-10 training epoch through qexp (the ``bc2015_cifar10`` preset: BinaryConnect's
VGG-9 with its binary weights, squared hinge loss, Adam, batch 50) versus a bare PyTorch loop of the same
network in float (plain forward, loss, backward, Adam step) over the same batches, and qexp's float
method on the same network; images per second and ratios, interleaved rounds (ABBA) in one process.

    QEXP_DATA=/path/to/data python scripts/bench_vgg.py --device cuda            # real CIFAR-10 (JPEG copy)
    python scripts/bench_vgg.py --data synthetic --images 500 --rounds 2         # random CIFAR-shaped images

The loaders are qexp's in-memory ones (the dataset on the device, normalised per batch) on both sides, so
the ratio is the engine's and the method's cost, not data loading. Goal (issue 25): qexp bc at least 0.9x
the bare loop's images per second on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from hydra import compose, initialize_config_module

from qexp.methods.float import Float
from qexp.run.config import register
from qexp.run.session import Trainer, build


def config(data: str, images: int) -> object:
    register()
    over = ["+experiment=bc2015_cifar10", "epochs=1", "progress=false"]
    if data == "synthetic":
        over += ["dataset=synthetic", "dataset.channels=3", "dataset.image_size=32",
                 f"dataset.train_samples={images}", "dataset.test_samples=10"]
    else:
        over += [f"dataset={data}", f"dataset.train_subset={images}"]
    with initialize_config_module(config_module="qexp.configs", version_base="1.3"):
        return compose("train", overrides=over)


def qexp_epoch(cfg: object, device: torch.device, float_method: bool = False) -> Callable[[], float]:
    """Seconds for one training epoch of the preset's run (build untimed); ``float_method``: the same run
    with ``method=float`` (same loss)."""
    def run() -> float:
        torch.manual_seed(0)
        b = build(cfg, device, Float(loss=cfg.method.loss) if float_method else None)
        trainer = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, device, 1, progress_bar=False)
        trainer.progress.epoch = 0
        sync(device)
        t0 = time.perf_counter()
        assert trainer._train_epoch() == "ok"
        sync(device)
        return time.perf_counter() - t0
    return run


def bare_epoch(cfg: object, device: torch.device) -> Callable[[], float]:
    """The same network in float, a hand-written loop over the same loader: forward, loss, backward, step."""
    b = build(cfg, device, Float())  # for its loader
    loss_fn = torch.nn.functional.cross_entropy

    def run() -> float:
        torch.manual_seed(0)
        model = build(cfg, device, Float()).model.train()  # the plain network (float: no quantizer)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sync(device)
        t0 = time.perf_counter()
        for x, y in b.data.train:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        return time.perf_counter() - t0
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--data", default="cifar10_jpeg", help="cifar10_jpeg | cifar10 | synthetic")
    ap.add_argument("--images", type=int, default=10000, help="training images per epoch")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    device = torch.device(args.device)
    bc = config(args.data, args.images)
    fns = {"bare float loop": bare_epoch(bc, device), "qexp float": qexp_epoch(bc, device, float_method=True),
           "qexp bc (VGG-BC preset)": qexp_epoch(bc, device)}
    for f in fns.values():  # warm-up: allocator, cuDNN algorithm choice, the Triton kernel's check
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(args.rounds):
        for k in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            times[k].append(fns[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    n = bc.dataset.get("train_subset") or bc.dataset.get("train_samples") or args.images
    base = med["bare float loop"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"VGG-BC (vgg9, conv-pool-BN-ReLU, BN after the output), {args.data}, {n} images, batch "
          f"{bc.batch_size}, {name}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}, "
          f"median of {args.rounds} rounds\n")
    print("| loop | s / epoch | images / s | images/s vs the bare loop |")
    print("|---|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.3f} | {n / v:.0f} | {base / v:.3f}x |")


if __name__ == "__main__":
    main()
