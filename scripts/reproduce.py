"""Regenerate one entry of docs/reproductions.md: run its preset at a stated budget, then rewrite its
table (``qexp table --format md``) and figure (``qexp plot``) under docs/reproductions/.

    python scripts/reproduce.py li2017                  # the small budget (CPU, minutes to an hour)
    python scripts/reproduce.py li2017 --budget paper   # the paper's budget (hours; GPU for CIFAR)
    python scripts/reproduce.py li2017 --dataset cifar10_jpeg   # the CIFAR-10 entry (JPEG copy; ResNet-20)
    python scripts/reproduce.py li2017 --dataset cifar10_jpeg --budget medium   # CPU, hours; across sessions
    python scripts/reproduce.py --list

Resumable: runs go to ``<out-root>/<budget>/<preset>/...`` through qexp's own resume, so the same
command again skips finished runs and continues interrupted ones. ``--jobs N`` runs N configurations at
once (joblib, one process each); ``--report-only`` rewrites the table and figure from the runs on disk.
Never tunes anything: every setting is the preset's (or the stated small-budget reduction).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from qexp.report.results import config_value

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "reproductions"


@dataclass
class Sweep:
    """One ``qexp train --multirun`` call: overrides per budget (lists are comma-joined sweeps). ``medium``
    (None: the entry has no such budget) sits between the two: hours of CPU, resumed across sessions."""

    args: list[str]
    small: list[str] = field(default_factory=list)
    paper: list[str] = field(default_factory=list)
    medium: list[str] | None = None


@dataclass
class Entry:
    paper: str
    name: str  # the run folder under <out-root>/<budget>/ (the preset's name)
    sweeps: list[Sweep]
    tables: list[list[str]]  # extra `qexp table` arguments, one table each
    plots: list[list[str]]  # extra `qexp plot` arguments; the first gives <paper>-<budget>.png
    evals: list[str] = field(default_factory=list)  # `qexp eval RUN --...` on every finished run
    after: list[Sweep] = field(default_factory=list)  # sweeps that start from the first ones' runs
    tune: Tune | None = None  # a setting chosen on a validation split before the main sweeps


@dataclass
class Tune:
    """Pick ``key`` among ``values`` by the last epoch's validation error (held out of the TRAINING set;
    the test set is never looked at), then pass ``key=best`` to the main sweeps."""

    args: list[str]
    key: str
    values: list[str]


SEEDS = "seed=0,1,2"
SMALL_MNIST = ["dataset.train_subset=10000", "epochs=3"]
#: bc2015's preset holds out the last 10,000 training images for validation (the official code's split); its
#: small budget trains on the first 10,000 images as the others do and validates on the next 10,000
SMALL_BC2015 = ["dataset.train_subset=20000", "epochs=3"]
# li2017 and lacey2018 (issue 23's 3-seed regeneration): sized so both entries finish in about an hour on
# 2 cores shared with other jobs (~150 training images/s per run measured there, plus 10k test images
# per epoch): 5,000 training images, 2 epochs
SMALL_5K = ["dataset.train_subset=5000", "epochs=2"]

ENTRIES: dict[str, Entry] = {
    "li2017": Entry(
        "Li et al. 2017: float < BC < Big SR < SR < R at 1 bit (MNIST, Fashion-MNIST)", "li2017_mnist",
        [Sweep(["+experiment=li2017_mnist", SEEDS, "dataset=mnist,fashion_mnist",
                "method=float,bc_li,big_sr,sr,r"], small=SMALL_5K),
         # Big SR's second budget: as many updates as SR (8x the epochs; the small budget runs MNIST only)
         Sweep(["+experiment=li2017_mnist", SEEDS, "method=big_sr", "method.budget=updates"],
               small=[*SMALL_5K, "dataset=mnist"], paper=["dataset=mnist,fashion_mnist"])],
        # rows method,epochs: Big SR's two budgets (equal epochs; equal updates = 8x the epochs) stay apart
        tables=[["--rows", "method,epochs", "--ref", "li2017"], ["--rows", "method,epochs", "--baseline", "method=sr"],
                ["--rows", "method,epochs", "--metric", "mean_flip_frac", "--digits", "4"]],
        plots=[["--rows", "method,epochs"], ["--rows", "method,epochs", "--metric", "method/flip_frac"]]),
    "li2017_scale": Entry(
        "Li et al. 2017: R vs SR as a function of the grid scale s (lr/s), every method, validation split",
        "li2017_scale",
        # the preset trains on the first 55,000 images and validates on the last 5,000; the small budget
        # trains on the same 5,000 images as li2017's and validates on the next 5,000 (train_subset=10000)
        [Sweep(["+experiment=li2017_scale", SEEDS], small=["dataset.train_subset=10000", "epochs=2"])],
        tables=[["--rows", "grid_scale", "--cols", "method", "--metric", "val_error"],
                ["--rows", "grid_scale", "--cols", "method", "--metric", "mean_flip_frac", "--digits", "4"],
                ["--rows", "grid_scale", "--cols", "method"]],
        plots=[["--rows", "grid_scale,method"]]),
    "bc2015": Entry(
        "Courbariaux et al. 2015: BinaryConnect vs float, MNIST MLP", "bc2015_mnist",
        [Sweep(["+experiment=bc2015_mnist", SEEDS], small=SMALL_BC2015, paper=[]),
         Sweep(["name=bc2015_mnist", "dataset=mnist", "model=mlp", "model.width=2048", "model.bn_out=true",
                "dataset.val_size=10000", "method=float", "method.loss=sqhinge_mean", "optim=adam", "sched=exp",
                "sched.final_ratio=0.003", "batch_size=100", "lr=0.001", SEEDS],  # the preset's, float
               small=SMALL_BC2015, paper=["epochs=250"])],
        tables=[["--ref", "bc2015"], ["--metric", "test_error_at_best"]], plots=[[]]),
    "wage2018": Entry(
        "Wu et al. 2018: WAGE 2-8-8-8 LeNet-5 on MNIST, integer-exact inference", "wage_mnist",
        [Sweep(["+experiment=wage_mnist", SEEDS], small=SMALL_MNIST)],
        tables=[["--ref", "wage2018", "--metric", "best_test_error"], []], plots=[[]], evals=["--integer"]),
    "warden2015": Entry(
        "Warden 2015: post-training quantization from 8 down to 2 bits (LeNet-5, MNIST)", "warden2015_mnist",
        [Sweep(["name=warden2015_mnist", "dataset=mnist", "model=lenet5", "method=float", "optim=adam",
                "sched=constant", SEEDS], small=SMALL_MNIST, paper=["epochs=10"])],
        tables=[[]], plots=[[]], evals=["--ptq-bits 8,6,4,3,2"]),
    "lacey2018": Entry(
        "Lacey et al. 2018: learned layer-wise precision vs uniform at equal total bits (MNIST)",
        "lacey2018_mnist",
        [Sweep(["+experiment=lacey2018_mnist", SEEDS, "method=learned", "bits=2,4"], small=SMALL_5K),
         Sweep(["+experiment=lacey2018_mnist", SEEDS, "method=bc", "bits=2,4"], small=SMALL_5K)],
        tables=[["--rows", "method", "--cols", "bits", "--baseline", "method=bc"]], plots=[[]],
        tune=Tune(["+experiment=lacey2018_mnist", "method=learned", "bits=2", "seed=0", "name=lacey2018_tune",
                   "dataset.train_subset=10000", "dataset.val_size=5000", "epochs=2"],
                  "method.logit_lr", ["0.01", "0.1", "1.0"])),
    "yin2019": Entry(
        "Yin et al. 2019: identity / ReLU / clipped-ReLU STEs at 2 and 4 bits (LeNet-5, MNIST)",
        "yin2019_mnist",
        [Sweep(["+experiment=yin2019_mnist", SEEDS, "method.ste=identity,relu,clipped_relu", "bits=2,4"],
               small=SMALL_MNIST)],
        tables=[["--rows", "method.ste,bits"]], plots=[["--rows", "method.ste,bits"]],
        after=[Sweep(["+experiment=yin2019_instability"], small=SMALL_MNIST)]),
}


#: ResNet-20 (Li et al.'s nets are VGG-BC, WRN-56-2, ResNet-56) on 6,000 class-balanced training images
#: for 2 epochs, tested on 2,000 (balanced) test images: about 45 minutes for 15 runs on 2 busy cores
SMALL_CIFAR = ["model=resnet20", "dataset.train_subset=6000", "dataset.test_subset=2000", "epochs=2",
               "eval_batch_size=250"]
#: the same net with ~8x the updates (5 epochs of 20,000 images: 785 Adam steps against 94), tested on 5,000
#: test images (a 95% interval of about +-1.3 points per run): 8-12 minutes per run on one core (measured
#: 2026-12-07), the 15 equal-epoch runs 80 minutes as two queues; Big SR at equal updates (40 epochs) about
#: 70 minutes per seed more
MEDIUM_CIFAR = ["model=resnet20", "dataset.train_subset=20000", "dataset.test_subset=5000", "epochs=5",
                "eval_batch_size=250"]

#: --dataset: the entries for each dataset (the default's li2017 entry covers Fashion-MNIST too)
DATASET_ENTRIES: dict[str, dict[str, Entry]] = {
    "mnist": ENTRIES,
    "cifar10_jpeg": {
        "li2017": Entry(
            "Li et al. 2017: float < BC < Big SR < SR < R at 1 bit (CIFAR-10 as a JPEG copy)", "li2017_cifar10",
            [Sweep(["+experiment=li2017_cifar10", "dataset=cifar10_jpeg", "method=float,bc_li,big_sr,sr,r",
                    SEEDS], small=SMALL_CIFAR, paper=["model=vgg9"], medium=MEDIUM_CIFAR),
             # Big SR's second budget, as on MNIST: as many updates as SR (8x the epochs)
             Sweep(["+experiment=li2017_cifar10", "dataset=cifar10_jpeg", "method=big_sr", "method.budget=updates",
                    SEEDS], small=SMALL_CIFAR, paper=["model=vgg9"], medium=MEDIUM_CIFAR)],
            tables=[["--rows", "method,epochs", "--ref", "li2017"],
                    ["--rows", "method,epochs", "--baseline", "method=sr"],
                    ["--rows", "method,epochs", "--metric", "mean_flip_frac", "--digits", "4"]],
            plots=[["--rows", "method,epochs"], ["--rows", "method,epochs", "--metric", "method/flip_frac"]]),
    },
}


def tune(t: Tune, out: Path, jobs: int, run: bool = True) -> tuple[str, str]:
    """Run the validation sweep; return the chosen value and a Markdown table of what was compared."""
    if run:
        train([*t.args, f"{t.key}={','.join(t.values)}"], out, jobs)
    name = next(a.split("=", 1)[1] for a in t.args if a.startswith("name="))
    scores = {}
    for r in run_dirs(out / name):
        rec = json.loads((r / "metrics.json").read_text())
        v = config_value(str(r), t.key)  # the folder name omits a default value, the config has it
        if v is not None and str(v) in t.values and finished(r) and rec["history"]:
            scores[str(v)] = rec["history"][-1]["val_error"]
    if not scores:
        return "", f"`{t.key}`: tuning on the validation split not finished yet.\n"
    best = min(scores, key=lambda v: scores[v])
    rows = "\n".join(f"| {v} | {scores.get(v, 'not finished')} |" for v in t.values)
    return best, (f"`{t.key}` chosen on a validation split ({' '.join(t.args[1:])}): "
                  f"**{best}**\n\n| {t.key} | val error (%) |\n|---|---|\n{rows}\n")


def merge(args: list[str], sets: list[str]) -> list[str]:
    """``args`` with each ``KEY=V`` of ``sets`` replacing the same key (or appended)."""
    keys = {s.split("=", 1)[0] for s in sets}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(sets)


def budget_args(sweep: Sweep, budget: str, sets: list[str] = ()) -> list[str]:
    return merge([*sweep.args, *getattr(sweep, budget)], list(sets))


def qexp(*args: str, check: bool = True) -> int:
    cmd = [sys.executable, "-m", "qexp.cli", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, cwd=ROOT).returncode


def train(args: list[str], out: Path, jobs: int) -> None:
    """One sweep; a failed run is recorded in its folder and shown in the table, and the entry goes on. A
    sweep stopped by a signal (exit 128 + N: 130 after Ctrl-C, 143 after SIGTERM; its running jobs
    checkpointed) stops the entry with the same status: Ctrl-C once started the entry's next sweep."""
    launcher = ["hydra/launcher=local_parallel", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    status = qexp("train", "--multirun", *args, f"out_root={out}", *launcher, check=False)
    if status > 128:
        print("interrupted: the runs keep their checkpoints; the same command continues them", file=sys.stderr)
        raise SystemExit(status)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.json"))


def finished(run: Path) -> bool:
    try:
        return json.loads((run / "metrics.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def instability_sources(out: Path) -> dict[int, Path]:
    """yin2019_instability starts from the finished clipped-ReLU runs at 2 bits, seed by seed."""
    found = {}
    for r in run_dirs(out / "yin2019_mnist"):
        rec = json.loads((r / "metrics.json").read_text())
        if finished(r) and config_value(str(r), "method.ste") == "clipped_relu" and rec.get("bits") == 2:
            found[int(rec["seed"])] = r
    return found


def report(entry: Entry, key: str, budget: str, out: Path, note: str = "", docs: Path = DOCS,
           regen: str = "") -> Path:
    """Rewrite docs/reproductions/<key>-<budget>.md (tables) and .png (figures); left as it is while no run
    of the entry exists (a sweep that refused every job once replaced the entry's tables with nothing)."""
    root, md = out / entry.name, docs / f"{key}-{budget}.md"
    if not root.is_dir():
        print(f"no runs under {root}: {md} left as it is", file=sys.stderr)
        return md
    docs.mkdir(parents=True, exist_ok=True)
    regen = regen or f"python scripts/reproduce.py {key} --budget {budget}"
    parts = [f"# {entry.paper}\n", f"Budget: `{budget}`. Regenerate: `{regen}`.\n"]
    if note:
        parts.append(note)
    for i, extra in enumerate(entry.tables):
        tmp = docs / f".{key}-{budget}-{i}.md"
        if qexp("table", str(root), "--format", "md", "--out", str(tmp), *extra, check=False) == 0:
            parts.append(f"`qexp table {' '.join(extra)}`\n\n{tmp.read_text()}")
            tmp.unlink()
    for i, extra in enumerate(entry.plots):
        png = docs / (f"{key}-{budget}.png" if i == 0 else f"{key}-{budget}-{i}.png")
        if qexp("plot", str(root), "--out", str(png), *extra, check=False) == 0:
            parts.append(f"`qexp plot {' '.join(extra)}`\n\n![{key} {i}]({png.name})\n")
            for side in ("alloc", "ptq"):
                if png.with_name(f"{png.stem}_{side}.png").exists():
                    parts.append(f"![{key} {side}]({png.stem}_{side}.png)\n")
    for ev in dict.fromkeys(entry.evals):
        parts.append(eval_summary(root, ev))
    if key == "lacey2018":
        parts.append(allocation_summary(root))
    if key.startswith("li2017"):
        parts.append(flip_summary(root))
    if key == "yin2019":
        inst = out / "yin2019_instability"
        if inst.exists():
            png = docs / f"{key}-{budget}-instability.png"
            if qexp("plot", str(inst), "--rows", "method.ste", "--metric", "train_loss", "--out", str(png),
                    check=False) == 0:
                parts.append(f"Instability experiment (train loss):\n\n![instability]({png.name})\n")
            parts.append(loss_summary(inst))
    md.write_text("\n".join(parts))
    print(f"wrote {md}")
    return md


def _finished_records(root: Path) -> list[tuple[Path, dict]]:
    out = []
    for r in run_dirs(root) if root.exists() else []:
        if finished(r):
            out.append((r, json.loads((r / "metrics.json").read_text())))
    return out


def allocation_summary(root: Path) -> str:
    """The learned allocation each learned-precision run ended with, first layer to last."""
    lines = ["| bits | seed | allocation (first -> last layer) | uniform |", "|---|---|---|---|"]
    for _, rec in _finished_records(root):
        last = rec["history"][-1]
        layers = [v for k, v in last.items() if k.startswith("method/bits/")]
        if rec.get("method") == "learned" and layers:
            alloc = "".join(str(int(v)) for v in layers)
            lines.append(f"| {rec['bits']} | {rec['seed']} | {alloc} | {str(rec['bits']) * len(layers)} |")
    return "Learned allocations (most likely, at the end of training):\n\n" + "\n".join(lines) + "\n"


def flip_summary(root: Path) -> str:
    """The fraction of 1-bit weights that changed value in each epoch (mean over seeds), epoch by epoch:
    a single mean hides that most flips happen in epoch 1 (Li et al.'s SR stalls as the lr decays). One
    row per dataset, method, epochs and grid scale (Big SR's two budgets, li2017_scale's scales)."""
    per: dict[tuple[str, str, int, str], list[list[float]]] = {}
    for r, rec in _finished_records(root):
        flips = [h["method/flip_frac"] for h in rec["history"] if "method/flip_frac" in h]
        if flips:
            scale = str(config_value(str(r), "method.scale"))
            per.setdefault((rec["dataset"], rec["method"], int(rec["epochs"]), scale), []).append(flips)
    lines = ["| dataset | method | epochs | grid scale | seeds | flip fraction per epoch (first -> last) |",
             "|---|---|---|---|---|---|"]
    for (ds, m, epochs, scale), runs in sorted(per.items()):
        n = min(len(f) for f in runs)
        mean = [sum(f[i] for f in runs) / len(runs) for i in range(n)]
        lines.append(f"| {ds} | {m} | {epochs} | {scale} | {len(runs)} | {' '.join(f'{v:.4f}' for v in mean)} |")
    return "Flip fraction per epoch (share of quantized weights whose grid value changed):\n\n" + \
        "\n".join(lines) + "\n"


def loss_summary(root: Path) -> str:
    """Train loss at the start and the end of each continuation run (the instability experiment)."""
    lines = ["| STE | seed | train loss, first epoch | train loss, last epoch | test error (%) |",
             "|---|---|---|---|---|"]
    rows = sorted(((str(config_value(str(r), "method.ste")), rec["seed"], rec) for r, rec in _finished_records(root)),
                  key=lambda row: row[:2])
    for ste, _, rec in rows:
        h = rec["history"]
        lines.append(f"| {ste} | {rec['seed']} | {h[0]['train_loss']:.4f} | {h[-1]['train_loss']:.4f} | "
                     f"{rec['test_error']:.2f} |")
    return "\n".join(lines) + "\n"


def eval_summary(root: Path, ev: str) -> str:
    """One line per run of the integer check (WAGE) or a pointer to the PTQ rows of the table."""
    if ev != "--integer":
        return "PTQ rows come from each run's ptq.json (`qexp eval RUN --ptq-bits 8,6,4,3,2`).\n"
    lines = ["| run | test images | differing predictions | images with a differing logit | integer accuracy (%) |",
             "|---|---|---|---|---|"]
    for r in run_dirs(root):
        f = r / "integer_eval.json"
        if f.exists():
            d = json.loads(f.read_text())
            lines.append(f"| {r.relative_to(root)} | {d.get('images')} | {d.get('differing_predictions')} | "
                         f"{d.get('differing_logit_rows')} | {d.get('accuracy', float('nan')):.2f} |")
    return "Integer-only inference check (`qexp eval RUN --integer`):\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paper", nargs="?", choices=sorted({k for d in DATASET_ENTRIES.values() for k in d}))
    ap.add_argument("--dataset", choices=sorted(DATASET_ENTRIES), default="mnist",
                    help="which dataset's entry (mnist: the MNIST presets, with Fashion-MNIST where they have it)")
    ap.add_argument("--budget", choices=("small", "medium", "paper"), default="small",
                    help="small: minutes to an hour of CPU; medium (CIFAR-10 only): hours of CPU; paper: the paper's")
    ap.add_argument("--out-root", type=Path, default=ROOT / "outputs" / "reproductions")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--report-only", action="store_true", help="only rewrite the table and figure")
    ap.add_argument("--docs", type=Path, default=DOCS, help="where the table and figure go")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=V",
                    help="replace these overrides in every sweep (a smaller check: seed=0 epochs=1)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    entries = DATASET_ENTRIES[a.dataset]
    if a.list or a.paper is None:
        for k, e in entries.items():
            print(f"{k:12s} {e.paper}")
        return 0
    if a.paper not in entries:
        ap.error(f"no {a.paper} entry for --dataset {a.dataset}; it has {', '.join(sorted(entries))}")
    entry, out = entries[a.paper], a.out_root / a.budget
    if any(getattr(sw, a.budget) is None for sw in [*entry.sweeps, *entry.after]):
        ap.error(f"the {a.paper} entry of --dataset {a.dataset} has no {a.budget} budget")
    key = a.paper if a.dataset == "mnist" else f"{a.paper}-{a.dataset.replace('_', '-')}"
    regen = " ".join(["python scripts/reproduce.py", a.paper, *(["--dataset", a.dataset] if key != a.paper else []),
                      "--budget", a.budget])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    note, extra = "", []
    if entry.tune is not None:
        best, note = tune(entry.tune, out, a.jobs, run=not a.report_only)
        extra = [f"{entry.tune.key}={best}"] if best else []
    if not a.report_only and not (entry.tune is not None and not extra):
        for sw in entry.sweeps:
            tuned = extra if entry.tune is not None and entry.tune.args[1] in sw.args else []
            train([*budget_args(sw, a.budget, a.set), *tuned], out, a.jobs)
        for ev in entry.evals:
            for r in run_dirs(out / entry.name):
                done = (r / ("integer_eval.json" if ev == "--integer" else "ptq.json")).exists()
                if finished(r) and not done:
                    qexp("eval", str(r), *ev.split(), check=False)
        for sw in entry.after:
            for seed, src in sorted(instability_sources(out).items()):
                train([*budget_args(sw, a.budget, a.set), f"seed={seed}", f"init_from='{src}'"], out, a.jobs)
    report(entry, key, a.budget, out, note, a.docs, regen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
