"""Benchmark a local sweep: the same runs one after another vs the local parallel launcher.

    QEXP_DATA=/path/to/data python scripts/bench_sweep.py --seeds 4 --subset 10000 --repeats 2

Sequential: ``qexp train --multirun seed=0,..`` (Hydra's basic launcher; every run takes all cores).
Parallel: the same with ``hydra/launcher=local_parallel`` (one job per core, cores // jobs threads
each). The two alternate ABBA (seq, par, par, seq, ...), each sweep in a fresh output folder, timed
end to end as a user would (process start, imports, data, training, evaluation). Prints the wall times,
the ratio of medians (target <= 0.6) and whether every seed's metrics are identical across all sweeps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def sweep(kind: str, out: Path, args: argparse.Namespace) -> float:
    cmd = [sys.executable, "-m", "qexp.run.train", "--multirun", f"out_root={out}", "name=bench",
           f"dataset={args.dataset}", f"model={args.model}", f"method={args.method}", f"epochs={args.epochs}",
           f"dataset.train_subset={args.subset}", "progress=false",
           "seed=" + ",".join(str(s) for s in range(args.seeds))]
    if kind == "parallel":
        cmd.append("hydra/launcher=local_parallel")
        if args.n_jobs:
            cmd.append(f"hydra.launcher.n_jobs={args.n_jobs}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def results(out: Path) -> dict[int, tuple]:
    rows = {}
    for f in out.rglob("metrics.json"):
        m = json.loads(f.read_text())
        rows[m["seed"]] = (m["status"], m["test_error"], m["train_loss"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--subset", type=int, default=10000, help="first N MNIST training images")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--method", default="float")
    ap.add_argument("--n-jobs", type=int, default=0, help="hydra.launcher.n_jobs (0: the config's default)")
    ap.add_argument("--repeats", type=int, default=2, help="ABBA pairs")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.1f}; {args.seeds} runs of {args.model}/{args.dataset} "
          f"({args.subset} images, {args.epochs} epoch(s), method {args.method})")
    times: dict[str, list[float]] = {"sequential": [], "parallel": []}
    outcomes: dict[str, list[dict]] = {"sequential": [], "parallel": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, kind in enumerate(["sequential", "parallel", "parallel", "sequential"]):
                out = Path(tmp) / f"{kind}{r}_{i}"
                t = sweep(kind, out, args)
                times[kind].append(t)
                outcomes[kind].append(results(out))
                print(f"  {kind:10s} {t:7.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nsequential median {med['sequential']:.1f} s, parallel median {med['parallel']:.1f} s, "
          f"ratio {med['parallel'] / med['sequential']:.2f} (load average now {os.getloadavg()[0]:.1f})")
    ref = outcomes["sequential"][0]
    same = all(o == ref for v in outcomes.values() for o in v)
    print(f"every seed completed: {all(r[0] == 'completed' for r in ref.values()) and len(ref) == args.seeds}; "
          f"metrics identical across all sweeps: {same}")
    for seed, row in sorted(ref.items()):
        par = outcomes["parallel"][0].get(seed)
        print(f"  seed {seed}: sequential test_error {row[1]:.2f} train_loss {row[2]:.6f} | "
              f"parallel {par[1]:.2f} {par[2]:.6f}" if par else f"  seed {seed}: missing in the parallel sweep")


if __name__ == "__main__":
    main()
