"""How long `qexp table` / `qexp plot` / `qexp runs` take on a large sweep (synthetic run folders).

    python scripts/bench_results.py --runs 2000 --epochs 100

Writes RUNS run folders (metrics.json in the real schema, EPOCHS history entries each) into a temporary
folder, then times the three commands in-process. Prints one line per command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import tempfile
import time
from pathlib import Path

from qexp.cli import main as qexp
from qexp.run import record

METHODS = [("float", 32), ("bc", 1), ("bc", 2), ("sr", 1), ("r", 1), ("big_sr", 1), ("ste", 2), ("wage", 2)]
COLS = [("mnist", "lenet5"), ("fashion_mnist", "lenet5"), ("cifar10", "vgg9"), ("cifar10", "resnet56")]


def make(root: Path, n: int, epochs: int) -> None:
    rng = random.Random(0)
    for i in range(n):
        method, bits = METHODS[i % len(METHODS)]
        dataset, model = COLS[(i // len(METHODS)) % len(COLS)]
        seed = i // (len(METHODS) * len(COLS))
        hist = [{"epoch": e + 1, "train_loss": 1 / (e + 1), "train_error": 50 / (e + 1), "test_loss": 1 / (e + 1),
                 "test_error": 50 / (e + 1) + rng.random(), "lr": 1e-3, "images_per_s": 1000.0,
                 "method/flip_frac": rng.random()} for e in range(epochs)]
        meta = {"name": "bench", "dataset": dataset, "model": model, "method": method, "bits": bits,
                "bits_tag": str(bits), "seed": seed, "epochs": epochs, "overrides": "", "optim": "adam",
                "lr": 1e-3, "batch_size": 64}
        run = root / dataset / model / f"{method}-{bits}b" / f"seed{seed}"
        record.write(run, record.build(meta, "completed", hist, wall_s=100.0))


def timed(argv: list[str]) -> float:
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert qexp(argv) == 0
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "bench"
        t = time.perf_counter()
        make(root, args.runs, args.epochs)
        print(f"wrote {args.runs} runs x {args.epochs} epochs in {time.perf_counter() - t:.1f} s")
        print(f"qexp table (md):  {timed(['table', str(root), '--format', 'md']):.2f} s")
        print(f"qexp runs:        {timed(['runs', str(root)]):.2f} s")
        print(f"qexp plot:        {timed(['plot', str(root), '--out', str(Path(d) / 'p.png')]):.2f} s")


if __name__ == "__main__":
    main()
