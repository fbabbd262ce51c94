"""``qexp plot DIR...``: PNG figures of the runs below DIR.

- OUT (default DIR/plots/<metric>.png): a per-epoch curve of --metric (test_error unless told), one
  panel per dataset/model (--cols), one line per method/bits (--rows) with the mean over seeds and a
  band of ±1 std where several seeds reached that epoch.
- OUT_alloc.png, when learned-precision runs are present: bits per layer over the epochs and the
  final allocation per layer (mean over seeds; the allocation strings in the panel title).
- OUT_ptq.png, when run folders hold ptq.json (``qexp eval RUN --ptq-bits ...``) or method=ptq runs
  exist: test accuracy versus bits, weights only and with quantized activations.
A figure whose data is missing is skipped with a note, never an error.

examples:
  qexp plot outputs/li2017_mnist
  qexp plot outputs --metric train_loss --out loss.png --size 1600x900
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qexp.errors import ArgumentParser, QexpError, path_arg
from qexp.jsonio import without_new_folders
from qexp.report import results
from qexp.report.table import check_report_target
from qexp.run import record

T = TypeVar("T")
PTQ_FILE = record.PTQ_FILE
#: per-layer bit widths in a learned-precision run's history (``method/bits/<layer>``)
LAYER_BITS = re.compile(r"^method/(?:bits|alloc(?:ation)?)/(.+)$")
#: the PNG text chunk every figure qexp plot writes carries: an existing side figure (OUT_alloc.png,
#: OUT_ptq.png, which the user did not name) is replaced only when it holds it
SOFTWARE = "qexp plot"
PNG_MARK = b"tEXtSoftware\x00" + SOFTWARE.encode()
#: the mean bits a layer drew over an epoch while the allocation was still sampled (soft phase)
EXPECTED_BITS = re.compile(r"^method/expected_bits/(.+)$")


def with_private_matplotlib(figure: Path, draw: Callable[[], T]) -> T:
    """``draw()`` with matplotlib's config and font cache in a temporary folder beside ``figure`` (where
    the figures go), removed after: its default, ``~/.cache/matplotlib``, is outside the folders qexp was
    given. A user's ``MPLCONFIGDIR`` is kept; a folder made here and left empty (no figure) is removed."""
    if os.environ.get("MPLCONFIGDIR") or "matplotlib" in sys.modules:
        return draw()
    drawn: list[T] = []

    def attempt() -> None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".matplotlib-", dir=figure.parent) as home:
            os.environ["MPLCONFIGDIR"] = home
            try:
                drawn.append(draw())
            finally:
                del os.environ["MPLCONFIGDIR"]

    try:
        without_new_folders([figure.parent], attempt)
    except OSError as e:
        raise QexpError(f"cannot write {figure}: {e.strerror or e}") from None
    return drawn[0]


def _figure(size: tuple[int, int], dpi: int, nrows: int, ncols: int):  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, squeeze=False,
                             layout="constrained")
    return fig, axes


def _save(fig: Any, path: Path, dpi: int) -> Path:
    """The PNG, written atomically; a place that cannot be written is one QexpError line."""
    import io

    import matplotlib.pyplot as plt

    from qexp.jsonio import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png", metadata={"Software": SOFTWARE})
    plt.close(fig)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise QexpError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def written_by_qexp(path: Path) -> bool:
    """Whether the PNG at ``path`` is one qexp plot wrote (its Software text chunk, :data:`PNG_MARK`)."""
    try:
        with open(path, "rb") as f:
            return PNG_MARK in f.read(1 << 16)  # text chunks come before the image data
    except OSError:
        return False


def check_targets(out: Path, named: bool) -> list[Path]:
    """OUT and its side figures, checked before anything is drawn: a named ``--out`` must not be in a run
    folder (:func:`qexp.report.table.check_report_target`); a figure the user did not name (the side
    figures; OUT itself when it is the default ``DIR/plots/<metric>.png``) is replaced only when it is
    missing or qexp plot wrote it, never a file of the user's that happens to have its name."""
    if named:
        check_report_target(out)
    sides = [out.with_name(f"{out.stem}_{kind}.png") for kind in ("alloc", "ptq")]
    for figure in ([] if named else [out]) + sides:
        if (figure.exists() or figure.is_symlink()) and (figure.is_symlink() or not written_by_qexp(figure)):
            why = "as the figure beside " + out.name if figure != out else "by the figure"
            raise QexpError(f"{figure} exists and was not written by qexp plot (it would be replaced {why}): "
                            "move it or choose another --out")
    return sides


def _grid_shape(n: int) -> tuple[int, int]:
    ncols = min(n, 3)
    return math.ceil(n / ncols), ncols


def _default_size(nrows: int, ncols: int) -> tuple[int, int]:
    return 560 * ncols + 240, 440 * nrows + 60


def history_keys(df: Any) -> list[str]:
    keys: set[str] = set()
    for hist in df["history"]:
        for h in hist or []:
            keys |= {k for k, v in h.items() if isinstance(v, (int, float)) and k != "epoch"}
    return sorted(keys)


def mean_curve(histories: Sequence[list[dict[str, Any]]], key: str) -> tuple[list[float], list[float],
                                                                              list[float], list[int]]:
    """Epochs, mean, std (0 for one run) and n over the runs that reached each epoch (NaNs skipped)."""
    by_epoch: dict[int, list[float]] = {}
    for hist in histories:
        for i, h in enumerate(hist):
            v = h.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_epoch.setdefault(int(h.get("epoch", i + 1)), []).append(float(v))
    epochs = sorted(by_epoch)
    vals = [by_epoch[e] for e in epochs]
    return (epochs, [statistics.fmean(v) for v in vals],
            [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals], [len(v) for v in vals])


def _groups(df: Any, keys: Sequence[str]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for r in df.to_dict("records"):
        out.setdefault(tuple(results.key_label(k, r) for k in keys), []).append(r)
    return {k: out[k] for k in results.ordered(keys, out)}


def _label(keys: Sequence[str], values: tuple[str, ...]) -> str:
    parts = []
    for k, v in zip(keys, values):
        if k == "bits":
            parts.append("" if v in (results.MISSING, "32") else f"{v} bits")
        else:
            parts.append(v if k in ("method", "dataset", "model") else f"{k}={v}")
    return " ".join(p for p in parts if p) or "all"


def plot_curves(df: Any, rows: Sequence[str], cols: Sequence[str], metric: str, out: Path,
                size: tuple[int, int] | None, dpi: int, logy: bool | None) -> Path:
    available = history_keys(df)
    if metric not in available:
        raise QexpError(f"unknown metric {metric!r} for curves; the runs' histories have: "
                        f"{', '.join(available) or '(no epoch finished yet)'}")
    panels = _groups(df, cols)
    nrows, ncols = _grid_shape(len(panels))
    fig, axes = _figure(size or _default_size(nrows, ncols), dpi, nrows, ncols)
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    colors = plt.get_cmap("tab10").colors
    line_groups = list(_groups(df, rows))  # one color per line group, the same in every panel
    for ax, (col, runs) in zip(axes.flat, panels.items()):
        sub = pd.DataFrame(runs)
        finite, seen_epochs = [], set()
        for row, members in _groups(sub, rows).items():
            epochs, mean, std, n = mean_curve([r["history"] for r in members], metric)
            if not epochs:
                continue
            color = colors[line_groups.index(row) % len(colors)]
            ax.plot(epochs, mean, color=color, lw=1.8, marker="o" if len(epochs) < 15 else None, ms=3,
                    label=_label(rows, row) + series_tag(members))
            lo = [m - s for m, s, k in zip(mean, std, n)]
            hi = [m + s for m, s, k in zip(mean, std, n)]
            if max(n) > 1 and len(epochs) > 1:
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, lw=0)
            elif max(n) > 1:  # a single epoch: a band has no width, show the spread as an error bar
                ax.errorbar(epochs, mean, yerr=std, color=color, capsize=4, lw=1.2)
            finite += [v for v in mean if v > 0]
            seen_epochs |= set(epochs)
        ax.set_title("/".join(col))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(seen_epochs) == 1:  # one point per line: keep the axis about it readable
            e = next(iter(seen_epochs))
            ax.set_xlim(e - 1, e + 1)
            ax.set_xticks([e])
        ax.set_ylabel(results.metric_label(metric))
        use_log = logy if logy is not None else (
            ("error" in metric or "loss" in metric) and finite and max(finite) / min(finite) > 10)
        if use_log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a panel of failed runs only has no line (matplotlib warns)
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{results.metric_label(metric)} per epoch: mean ± std over seeds")
    return _save(fig, out, dpi)


# ---- learned precision --------------------------------------------------------------------------
def layer_bits(hist: list[dict[str, Any]], pattern: re.Pattern = LAYER_BITS) -> dict[str, list[tuple[int,
                                                                                                    float]]]:
    """``{layer: [(epoch, bits), ...]}`` from history keys like ``method/bits/<layer>``."""
    out: dict[str, list[tuple[int, float]]] = {}
    for i, h in enumerate(hist or []):
        for k, v in h.items():
            m = pattern.match(k)
            if m and isinstance(v, (int, float)):
                out.setdefault(m.group(1), []).append((int(h.get("epoch", i + 1)), float(v)))
    return out


def plot_allocation(df: Any, rows: Sequence[str], cols: Sequence[str], out: Path,
                    size: tuple[int, int] | None, dpi: int) -> Path | None:
    groups = {k: v for k, v in _groups(df, [*cols, *rows]).items()
              if any(layer_bits(r["history"]) for r in v)}
    if not groups:
        return None
    fig, axes = _figure(size or (1300, 420 * len(groups) + 60), dpi, len(groups), 2)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cmap = plt.get_cmap("viridis")
    for (ax_t, ax_b), (key, runs) in zip(axes, groups.items()):
        per_run = [layer_bits(r["history"]) for r in runs]
        per_run = [p for p in per_run if p]
        layers = list(per_run[0])
        for p in per_run[1:]:
            layers += [name for name in p if name not in layers]
        title = "/".join(key[:len(cols)]) + " " + _label(rows, key[len(cols):])
        expected = [layer_bits(r["history"], EXPECTED_BITS) for r in runs]
        top = 1.0
        for i, name in enumerate(layers):
            color = cmap(i / max(len(layers) - 1, 1))
            for series, style in ((per_run, "-"), (expected, ":")):
                hists = [[{"epoch": e, "b": b} for e, b in p.get(name, [])] for p in series]
                epochs, mean, _, _ = mean_curve(hists, "b")
                if epochs:
                    ax_t.plot(epochs, mean, style, marker="o" if style == "-" else None, ms=3, color=color,
                              label=name if style == "-" else None)
                    top = max(top, *mean)
        ax_t.set_title(f"{title}: bits per layer (mean over {len(per_run)} seed(s); "
                       f"dotted: mean bits drawn)" if any(expected) else
                       f"{title}: bits per layer (mean over {len(per_run)} seed(s))", fontsize="medium")
        ax_t.set_xlabel("epoch")
        ax_t.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_t.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax_t.set_ylim(0, top + 1)
        ax_t.set_ylabel("bits")
        ax_t.grid(True, alpha=0.3)
        ax_t.legend(fontsize="x-small", ncol=2)
        finals = [[p[name][-1][1] if p.get(name) else math.nan for name in layers] for p in per_run]
        means = [statistics.fmean([f[i] for f in finals if not math.isnan(f[i])] or [math.nan])
                 for i in range(len(layers))]
        shades = [cmap(i / max(len(layers) - 1, 1)) for i in range(len(layers))]
        ax_b.bar(range(len(layers)), means, color=shades)
        for f in finals:
            ax_b.plot(range(len(layers)), f, "k.", ms=6, alpha=0.6)
        ax_b.set_xticks(range(len(layers)), layers, rotation=30, ha="right", fontsize="small")
        ax_b.set_ylabel("bits")
        ax_b.yaxis.set_major_locator(MaxNLocator(integer=True))
        allocs = sorted({str(r.get("allocation")) for r in runs if r.get("allocation")})
        ax_b.set_title(f"final allocation {', '.join(allocs)}" if allocs else "final allocation")
        ax_b.grid(True, axis="y", alpha=0.3)
    fig.suptitle("learned precision: bit allocation per layer")
    return _save(fig, out, dpi)


# ---- post-training quantization -----------------------------------------------------------------
def ptq_points(df: Any, rows: Sequence[str], cols: Sequence[str], notes: list[str] | None = None,
               ) -> dict[tuple[str, ...], dict[str, dict[int, list[float]]]]:
    """(col..., row...) -> series name -> bits -> test accuracies over seeds. The results of ptq.json
    files are read as the table reads them (:func:`qexp.report.results.ptq_records`): a scheme or
    calibration other than the default names its own series (``weights only
    (symmetric-minmax-per-channel)``), never one mean with another; a stale file (its checkpoint changed
    since) is left out, its reason added to ``notes``."""
    out: dict[tuple[str, ...], dict[str, dict[int, list[float]]]] = {}
    for r in df.to_dict("records"):
        key = tuple(results.key_label(k, r) for k in [*cols, *rows])
        fresh = []
        for p in results.ptq_records(r):
            if p["status"] != "completed":
                if notes is not None and p.get("error") and p["error"] not in notes:
                    notes.append(p["error"])
                continue
            act, text = p.get("ptq_act_bits"), str(p["bits_tag"]).partition(" ")[2]
            name = "weights only" if act is None else f"+ {act}-bit activations"
            name = f"{name} ({text})" if text else name
            out.setdefault(key, {}).setdefault(name, {}).setdefault(int(p["bits"]), []).append(p["test_acc"])
            fresh.append(p)
        if fresh and _number(fresh[0].get("float_test_error")):  # the network as trained: the dashed line
            out[key].setdefault("float", {}).setdefault(32, []).append(100 - fresh[0]["float_test_error"])
        bits = r.get("ptq_bits") if _number(r.get("ptq_bits")) else r.get("bits")
        if r.get("method") == "ptq" and r.get("status") == "completed" and _number(r.get("test_acc")) \
                and _number(bits):
            pkey = tuple(results.key_label(k, r) for k in cols) + ("method=ptq runs",)
            act = r.get("ptq_act_bits")
            scheme = {"scheme": r.get("ptq_scheme"), "act_scheme": r.get("ptq_act_scheme")}
            name = _series(f"+ {int(act)}-bit activations", scheme, True) if _number(act) \
                else _series("weights only", scheme, False)
            out.setdefault(pkey, {}).setdefault(name, {}).setdefault(int(bits), []).append(r["test_acc"])
            if _number(r.get("float_test_error")):  # the same network before PTQ: the dashed line
                out[pkey].setdefault("float", {}).setdefault(32, []).append(100 - r["float_test_error"])
    return out


def _series(name: str, scheme: dict[str, Any], activations: bool) -> str:
    """A PTQ series' name, with its scheme when not the default."""
    text = results.ptq_scheme_text({k: v if isinstance(v, str) else None for k, v in scheme.items()},
                                   activations)
    return f"{name} ({text})" if text else name


def series_tag(members: list[dict[str, Any]]) -> str:
    """`` (2 seeds)``, `` (2 seeds, 4 runs; diverged)``: what a curve averages (runs of one seed in other
    configurations are counted apart from the seeds) and how its runs that did not complete ended."""
    statuses = sorted({str(r.get("status")) for r in members} - {"completed", "None"})
    seeds = len({results.key_label("seed", r) for r in members})
    count = f"{seeds} seed{'s' if seeds != 1 else ''}" + (f", {len(members)} runs" if len(members) != seeds else "")
    return f" ({count}" + (f"; {', '.join(statuses)}" if statuses else "") + ")"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_ptq(df: Any, rows: Sequence[str], cols: Sequence[str], out: Path, size: tuple[int, int] | None,
             dpi: int) -> Path | None:
    notes: list[str] = []
    points = ptq_points(df, rows, cols, notes)
    for note in notes:
        print(f"note: {note}")
    if not points:
        return None
    nrows, ncols = _grid_shape(len(points))
    fig, axes = _figure(size or _default_size(nrows, ncols), dpi, nrows, ncols)
    from matplotlib.ticker import MaxNLocator

    for ax, (key, series) in zip(axes.flat, points.items()):
        float_acc = series.pop("float", {}).get(32)
        for name, by_bits in series.items():
            bits = sorted(by_bits)
            mean = [statistics.fmean(by_bits[b]) for b in bits]
            std = [statistics.stdev(by_bits[b]) if len(by_bits[b]) > 1 else 0.0 for b in bits]
            ax.errorbar(bits, mean, yerr=std, marker="o", capsize=3, label=name)
        if float_acc:
            ax.axhline(statistics.fmean(float_acc), color="k", ls="--", lw=1, label="as trained (before PTQ)")
        source = key[len(cols):]
        what = source[0] if source == ("method=ptq runs",) else f"PTQ of {_label(rows, source)} runs"
        ax.set_title(f"{'/'.join(key[:len(cols)])}: {what}")
        ax.set_xlabel("bits")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test accuracy (%)")
        ax.invert_xaxis()  # 8 bits on the left: accuracy falls as bits are taken away
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(points):]:
        ax.set_visible(False)
    fig.suptitle("post-training quantization: accuracy versus bits (mean ± std over seeds)")
    return _save(fig, out, dpi)


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not m or not (100 <= int(m.group(1)) <= 10_000 and 100 <= int(m.group(2)) <= 10_000):
        raise QexpError(f"--size takes WIDTHxHEIGHT in pixels (100..10000), e.g. 1200x800; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="qexp plot", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=path_arg, metavar="DIR", help="folders holding run folders")
    ap.add_argument("--metric", default="test_error",
                    help="per-epoch history key to plot: test_error (default), train_error, train_loss, "
                         "test_loss, lr, images_per_s, method/<diagnostic>")
    ap.add_argument("--rows", default="method,bits", help="keys giving one line each (default method,bits)")
    ap.add_argument("--cols", default="dataset,model",
                    help="keys giving one panel each (default dataset,model)")
    ap.add_argument("--out", type=path_arg, default=None,
                    help="PNG for the curves (default DIR/plots/<metric>.png); the allocation and PTQ "
                         "figures go beside it as <name>_alloc.png and <name>_ptq.png")
    ap.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                    help="figure size in pixels (default: from the number of panels)")
    ap.add_argument("--dpi", type=int, default=100, help="dots per inch: the size of the text (10..1000, default 100)")
    ap.add_argument("--logy", action=argparse.BooleanOptionalAction, default=None,
                    help="log-scale y axis (default: on for errors/losses spanning more than 10x)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=V[,V...]",
                    help="keep only runs whose KEY is one of the values (repeatable)")
    args = ap.parse_args(argv)
    if args.out is not None and args.out.suffix.lower() != ".png":
        raise QexpError(f"--out must name a .png file, not {args.out}")
    if not 10 <= args.dpi <= 1000:  # the size is in pixels: the dpi scales the text (100000: out of memory)
        raise QexpError(f"--dpi must be 10..1000, got {args.dpi}")

    df, notes = results.dedupe(results.collect(args.dirs))
    df = results.where(df, args.where)
    for note in notes:
        print(f"note: {note}")
    rows, cols = results.parse_keys(args.rows), results.parse_keys(args.cols)
    df = results.with_keys(df, [*rows, *cols])
    results.check_keys(df, [*rows, *cols], "--rows/--cols")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.metric)
    out = args.out or args.dirs[0] / "plots" / f"{safe}.png"
    alloc_png, ptq_png = check_targets(out, named=args.out is not None)

    def draw() -> tuple[list[Path], Path | None, Path | None]:
        curves = plot_curves(df, rows, cols, args.metric, out, args.size, args.dpi, args.logy)
        alloc = plot_allocation(df, rows, cols, alloc_png, args.size, args.dpi)
        ptq = plot_ptq(df, rows, cols, ptq_png, args.size, args.dpi)
        return [curves, *(p for p in (alloc, ptq) if p)], alloc, ptq

    written, alloc, ptq = with_private_matplotlib(out, draw)
    for p in written:
        print(f"wrote {p}")
    if alloc is None:
        print("note: no learned-precision runs (history method/bits/<layer>): no allocation plot")
    if ptq is None:
        print(f"note: no {PTQ_FILE} and no method=ptq runs: no accuracy-versus-bits plot")
    return 0
