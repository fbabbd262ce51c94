"""Benchmark: one VGG-BC CIFAR-10 training epoch through qexp (the ``bc2015_cifar10`` preset: BinaryConnect's
VGG-9 with its binary weights, squared hinge loss, Adam, batch 50) versus a bare PyTorch loop of the same
network in float (plain forward, loss, backward, Adam step) over the same batches, and qexp's float
method on the same network; images per second and ratios, interleaved rounds (bench_weight.side_by_side) in one process.

    QEXP_DATA=/path/to/data python scripts/bench_vgg.py --device cuda            # real CIFAR-10 (JPEG copy)
    python scripts/bench_vgg.py --data synthetic --images 500 --rounds 2         # random CIFAR-shaped images

The loaders are qexp's in-memory ones (the dataset on the device, normalised per batch) on both sides, so
the ratio is the engine's and the method's cost, not data loading. Goal (issue 25): qexp bc at least 0.9x
the bare loop's images per second on a GPU.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from bench_weight import side_by_side  # scripts/ is on the path when run as a script
from hydra import compose, initialize_config_module

from qexp.methods.float import Float
from qexp.run.config import register
from qexp.run.engine import drive
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


def qexp_epoch(cfg: object, device: torch.device, float_method: bool = False) -> Callable[[], None]:
    """One training epoch of the preset's run (built once, untimed; each call trains one more epoch);
    ``float_method``: the same run with ``method=float`` (same loss)."""
    torch.manual_seed(0)
    b = build(cfg, device, Float(loss=cfg.method.loss) if float_method else None)

    def run() -> None:
        trainer = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, device, 1, progress_bar=False)
        assert drive(trainer._train_epoch(), trainer._train_step) == "ok"
    return run


def bare_epoch(cfg: object, device: torch.device) -> Callable[[], None]:
    """The same network in float (built once, untimed), a hand-written loop over the same loader: forward,
    loss, backward, step."""
    torch.manual_seed(0)
    b = build(cfg, device, Float())  # the plain network (float: no quantizer) and its loader
    model = b.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.functional.cross_entropy

    def run() -> None:
        for x, y in b.data.train:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


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
    # a warm-up epoch each (allocator, cuDNN algorithm choice, the Triton kernel's check), then ABBA rounds
    med = side_by_side(fns, device, args.rounds, per_round=1, warmup=1)
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
