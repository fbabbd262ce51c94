"""``qexp table DIR...``: the paper-style comparison table of every run below DIR.

One row per method and bits (or any keys in --rows), one column per dataset/model (--cols), each cell
``mean ± std (n)`` over seeds of the completed runs (--ci: ``mean ± 95% CI``). Runs that failed,
diverged or are still running are shown in their cell ("failed (1)", "running 3/10 ep"), never
dropped. A column's best cell is marked (bold) only when Welch's t-test over seeds finds it better
than the runner-up at p < --alpha (0.05); a note says when it is not. --baseline adds to each cell
its difference to the baseline row's cell in its column: ``Δ +0.31 [-0.12, +0.74] p=0.12`` (95% CI,
Welch's t-test). --ref puts a paper's published numbers and our difference beside each column;
reference files live in configs/reference/ (li2017, bc2015, wage2018) or any path.

examples:
  qexp table outputs/li2017_mnist
  qexp table outputs --rows method,bits,overrides --metric best_test_error --format md
  qexp table outputs/li2017_mnist --baseline method=float --ci
  qexp table outputs/wage_mnist --ref wage2018 --metric best_test_error --format latex --out wage.tex
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qexp.errors import ArgumentParser, QexpError, path_arg
from qexp.report import reference as refs
from qexp.report import results, stats, trials
from qexp.run import record

FORMATS = ("term", "md", "latex", "csv")
#: what makes a folder a run folder: a report written into one could replace what the run wrote
RUN_MARKS = (record.METRICS, record.CHECKPOINT, ".hydra")
SUFFIX_FORMAT = {".md": "md", ".tex": "latex", ".csv": "csv", ".txt": "term"}


@dataclass
class Shown:
    """One rendered cell: its text and whether it is the column's best."""

    text: str
    best: bool = False


@dataclass
class View:
    """The table as text, shared by every format (CSV reads the grid directly for numbers)."""

    header: list[str]
    body: list[list[Shown]]
    n_keys: int  # leading key columns
    title: str
    notes: list[str]


def _ref_rows(grid: results.Grid, ref: refs.Reference) -> list[tuple[str, ...]]:
    """Rows published in the reference for our columns that no run of ours fills (shown as missing)."""
    extra = []
    for e in ref.entries:
        if not all(k in e.keys for k in grid.row_keys):
            continue
        row = tuple(e.keys[k] for k in grid.row_keys)
        for col in grid.cols:
            colkeys = refs.paper_keys(dict(zip(grid.col_keys, col)))
            if all(colkeys[k] == v for k, v in e.keys.items() if k in colkeys):
                extra.append(row)
                break
    return extra


@dataclass(frozen=True)
class Options:
    """How cells are shown: decimals, the spread after ``±``, the baseline row, the best-mark's level."""

    digits: int = 2
    spread: str = "std"  # std | ci (half-width of the 95% CI of the mean)
    baseline: tuple[str, ...] | None = None  # a row of the grid: cells add their difference to it
    alpha: float = results.DEFAULT_ALPHA


def resolve_baseline(grid: results.Grid, clauses: list[str]) -> tuple[str, ...]:
    """The one table row that ``--baseline KEY=VAL[,KEY=VAL]`` names (keys must be row keys)."""
    wanted: dict[str, str] = {}
    for clause in clauses:
        for part in clause.split(","):
            key, value = results.parse_clause(part, "--baseline")
            if key not in grid.row_keys:
                raise QexpError(f"--baseline key {key!r} is not a row key; the rows are "
                                f"{','.join(grid.row_keys)} (add it to --rows)")
            wanted[key] = value
    index = {k: i for i, k in enumerate(grid.row_keys)}
    rows = [r for r in grid.rows if all(r[index[k]] == v for k, v in wanted.items())]
    shown = ", ".join("/".join(r) for r in grid.rows)
    what = ",".join(f"{k}={v}" for k, v in wanted.items())
    if not rows:
        raise QexpError(f"--baseline {what} matches no row; the rows are {shown}")
    if len(rows) > 1:
        free = [k for k in grid.row_keys if k not in wanted]
        raise QexpError(f"--baseline {what} matches {len(rows)} rows ({', '.join('/'.join(r) for r in rows)}); "
                        f"add {' or '.join(free)}=VALUE to pick one")
    return rows[0]


def fmt_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def versus(cell: results.Cell | None, base: results.Cell | None, digits: int) -> str:
    """``Δ +0.31 [-0.12, +0.74] p=0.12``: the cell minus the baseline cell, 95% CI, Welch p (seeds)."""
    if cell is None or base is None or cell.mean is None or base.mean is None:
        return ""
    w = stats.welch(cell.values, base.values)
    if w is None:
        return f"Δ {cell.mean - base.mean:+.{digits}f} (untested: n<2)"
    return f"Δ {w.diff:+.{digits}f} [{w.lo:+.{digits}f}, {w.hi:+.{digits}f}] {fmt_p(w.p)}"


def _best_notes(grid: results.Grid, alpha: float) -> list[str]:
    """Why a column has no mark: its best mean is not significantly better than the runner-up."""
    notes = []
    for col, v in grid.verdicts(alpha).items():
        if v.marked or v.runner_up is None:
            continue
        label, best = "/".join(col), "/".join(v.rows[0])
        why = ("fewer than 2 seeds on one side" if v.test is None
               else f"{fmt_p(v.test.p)} ≥ {alpha:g}")
        notes.append(f"{label}: best mean {best} not marked, not significantly better than "
                     f"{'/'.join(v.runner_up)} ({why})")
    return notes


def build_view(grid: results.Grid, ref: refs.Reference | None = None, opts: Options | None = None) -> View:
    opts = opts or Options()
    digits = opts.digits
    rows = grid.rows
    if ref is not None:
        rows = results.ordered(grid.row_keys, [*rows, *_ref_rows(grid, ref)])
    best = grid.best(opts.alpha)
    header = list(grid.row_keys)
    for col in grid.cols:
        label = "/".join(col)
        header.append(label)
        if ref is not None:
            header += [f"{label} paper", f"{label} Δ"]
    body, matched = [], 0
    for row in rows:
        line = [Shown(v) for v in row]
        for col in grid.cols:
            cell = grid.cell(row, col)
            text = cell.text(digits, opts.spread) if cell else results.MISSING
            if opts.baseline is not None and cell is not None and cell.mean is not None:
                vs = "baseline" if row == opts.baseline else versus(cell, grid.cell(opts.baseline, col), digits)
                text = "; ".join(p for p in (text, vs) if p)
            line.append(Shown(text, (row, col) in best))
            if ref is not None:
                entry = ref.lookup({**dict(zip(grid.row_keys, row)), **dict(zip(grid.col_keys, col))})
                if entry is None:
                    line += [Shown(results.MISSING), Shown(results.MISSING)]
                    continue
                matched += 1
                value = ref.value_as(entry, grid.metric)
                std = f" ± {entry.std:.{digits}f}" if entry.std else ""
                line.append(Shown(f"{value:.{digits}f}{std}"))
                mean = cell.mean if cell else None
                line.append(Shown(f"{mean - value:+.{digits}f}" if mean is not None else results.MISSING))
        body.append(line)
    label = results.metric_label(grid.metric)
    # run folders; the PTQ results read from their ptq.json files are counted apart
    records = [r for c in grid.cells.values() for r in c.runs]
    from_ptq = [r.get("ptq_json") is True for r in records]
    ptq_results = sum(from_ptq)
    counts = Counter(r.get("status") or "failed" for r, p in zip(records, from_ptq) if not p)
    tally = ", ".join(f"{n} {st}" for st, n in sorted(counts.items(),
                                                      key=lambda kv: results.sort_key("status", kv[0])))
    if ptq_results:
        tally += f"; {ptq_results} PTQ result{'s' if ptq_results != 1 else ''} from their ptq.json"
    spread = "95% CI of the mean" if opts.spread == "ci" else "std"
    mark = ("best mean per column in bold" if opts.alpha >= 1 else
            f"best per column in bold only where Welch's t-test over seeds finds it better than the "
            f"runner-up at p < {opts.alpha:g}")
    title = (f"{label}: mean ± {spread} (n) over seeds of completed runs; {mark} "
             f"[{sum(counts.values())} run{'s' if sum(counts.values()) != 1 else ''}: {tally}]")
    notes = []
    if opts.baseline is not None:
        base = "/".join(f"{k}={v}" for k, v in zip(grid.row_keys, opts.baseline))
        notes.append(f"Δ = cell - baseline ({base}) of its column, [95% CI] and Welch's t-test p over seeds")
        notes += [f"{'/'.join(col)}: no baseline cell, no Δ" for col in grid.cols
                  if not (grid.cell(opts.baseline, col) and grid.cell(opts.baseline, col).mean is not None)]
    if opts.alpha < 1:
        notes += _best_notes(grid, opts.alpha)
    if ref is not None:
        what = results.metric_label(ref.metric)
        converted = ", shown as 100 - x" if refs.is_acc(ref.metric) != refs.is_acc(grid.metric) else ""
        notes.append(f"paper: {ref.title}; published as {what}{converted}; Δ = ours - paper")
        notes += refs.stand_in_notes(str(r.get("dataset")) for c in grid.cells.values() for r in c.runs)
        if not matched:
            have = sorted({"/".join(e.keys.get(k, "*") for k in grid.col_keys) for e in ref.entries})
            notes.append(f"no published number matches these columns; {ref.name} has {', '.join(have)}")
    notes += grid.warnings()
    return View(header, body, len(grid.row_keys), title, notes)


# ---- formats ------------------------------------------------------------------------------------
def render_term(view: View, color: bool = False) -> str:
    """Rich's table; never wrapped (a table is read whole). In a terminal the best cells are bold
    green; in plain text (a file, a pipe) they carry a trailing ``*`` instead."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAVY)
    for i, h in enumerate(view.header):
        t.add_column(Text(h), justify="left" if i < view.n_keys else "right", no_wrap=True)
    pad = "" if color else "  "  # keeps right-aligned numbers aligned beside the " *" marks
    for line in view.body:
        t.add_row(*[Text(c.text + ("" if color else " *"), style="bold green") if c.best else
                    Text(c.text + (pad if i >= view.n_keys else "")) for i, c in enumerate(line)])
    buf = io.StringIO()
    console = Console(file=buf, width=10_000, force_terminal=color, color_system="auto" if color else None,
                      highlight=False)
    title = view.title if color else view.title.replace("in bold", "marked *")
    console.print(Text(title))
    console.print(t)
    for n in view.notes:
        console.print(Text(f"note: {n}"))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def render_md(view: View) -> str:
    out = [f"*{view.title}*", ""]
    out.append("| " + " | ".join(_md_escape(h) for h in view.header) + " |")
    out.append("|" + "|".join(":---" if i < view.n_keys else "---:" for i in range(len(view.header))) + "|")
    for line in view.body:
        out.append("| " + " | ".join(f"**{_md_escape(c.text)}**" if c.best else _md_escape(c.text)
                                     for c in line) + " |")
    if view.notes:
        out += [""] + [f"- {n}" for n in view.notes]
    return "\n".join(out) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(s: str) -> str:
    s = "".join(_TEX.get(ch, ch) for ch in s)
    return s.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("—", "---")


def render_latex(view: View) -> str:
    spec = "l" * view.n_keys + "r" * (len(view.header) - view.n_keys)
    out = ["% generated by qexp table; needs \\usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
           f"\\caption{{{tex_escape(view.title)}}}", f"\\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(tex_escape(h) for h in view.header) + r" \\", r"\midrule"]
    for line in view.body:
        out.append(" & ".join(f"\\textbf{{{tex_escape(c.text)}}}" if c.best else tex_escape(c.text)
                              for c in line) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += [f"% {n}" for n in view.notes]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def render_csv(grid: results.Grid, ref: refs.Reference | None = None, opts: Options | None = None) -> str:
    """Numbers for spreadsheets: per column its mean, std, n and a note (status, 'best'); with --ci the
    CI half-width, with --baseline the difference to the baseline, its CI and Welch's p."""
    opts = opts or Options()
    view = build_view(grid, ref, opts)  # for the row set (reference rows included)
    rows = [tuple(c.text for c in line[:view.n_keys]) for line in view.body]
    best = grid.best(opts.alpha)
    header = list(grid.row_keys)
    for col in grid.cols:
        label = "/".join(col)
        header += [f"{label} mean", f"{label} std", f"{label} n", f"{label} note"]
        if opts.spread == "ci":
            header.append(f"{label} ci95")
        if opts.baseline is not None:
            header += [f"{label} vs baseline", f"{label} vs baseline lo", f"{label} vs baseline hi",
                       f"{label} vs baseline p"]
        if ref is not None:
            header += [f"{label} paper", f"{label} diff"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        line: list[object] = list(row)
        for col in grid.cols:
            cell = grid.cell(row, col)
            mean = cell.mean if cell else None
            note = "; ".join(p for p in (cell.note() if cell else "missing",
                                         "best" if (row, col) in best else "") if p)
            line += [_num(mean), _num(cell.std if cell else None), cell.n if cell else 0, note]
            if opts.spread == "ci":
                line.append(_num(cell.ci if cell else None))
            if opts.baseline is not None:
                base = grid.cell(opts.baseline, col) if row != opts.baseline else None  # not against itself
                test = stats.welch(cell.values, base.values) if cell and base else None
                diff = mean - base.mean if mean is not None and base and base.mean is not None else None
                line += [_num(diff), *(_num(getattr(test, k)) if test else "" for k in ("lo", "hi", "p"))]
            if ref is not None:
                entry = ref.lookup({**dict(zip(grid.row_keys, row)), **dict(zip(grid.col_keys, col))})
                value = ref.value_as(entry, grid.metric) if entry else None
                line += [_num(value), _num(mean - value if mean is not None and value is not None else None)]
        w.writerow(line)
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def render(grid: results.Grid, fmt: str, ref: refs.Reference | None = None, opts: Options | None = None,
           color: bool = False) -> str:
    if fmt == "csv":
        return render_csv(grid, ref, opts)
    view = build_view(grid, ref, opts)
    return {"term": lambda: render_term(view, color), "md": lambda: render_md(view),
            "latex": lambda: render_latex(view)}[fmt]()


def trials_view(df, study: trials.Study) -> View:  # type: ignore[no-untyped-def]
    """The Optuna study's trials (best objective first, the study's best in bold) as a table view."""
    header, rows, best, objective = trials.trial_rows(df, study)
    n_keys = len(study.best_params)
    body = [[Shown(c, b and i == n_keys) for i, c in enumerate(row)] for row, b in zip(rows, best)]
    title = (f"Optuna search in {study.folder}: {len(rows)} trial run(s) by {objective} (%), the "
             f"validation error the search minimised; the study's best configuration in bold")
    return View(header, body, n_keys, title, [trials.describe_best(study, objective)])


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="qexp table", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=path_arg, metavar="DIR", help="folders holding run folders")
    ap.add_argument("--rows", default=None,
                    help="comma-separated run keys, one table row per value (default method,bits); "
                         "e.g. method,bits,overrides or method,optim,lr")
    ap.add_argument("--cols", default="dataset,model",
                    help="comma-separated column keys (default dataset,model)")
    ap.add_argument("--metric", default=None,
                    help="test_error (default; best_test_error with a --ref that publishes it) | best_test_error | "
                         "test_acc | train_loss | images_per_s | wall_s | any numeric field of metrics.json")
    ap.add_argument("--format", default=None,
                    help="term (rich, default), md, latex (booktabs) or csv; default from --out's suffix")
    ap.add_argument("--out", type=path_arg, default=None, help="write to this file instead of stdout")
    ap.add_argument("--ref", default=None,
                    help=f"published numbers to show beside ours: a YAML path or a shipped name "
                         f"({', '.join(refs.available())})")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=V[,V...]",
                    help="keep only runs whose KEY is one of the values (repeatable)")
    ap.add_argument("--ptq-json", action=argparse.BooleanOptionalAction, default=True,
                    help="add rows 'ptq' (PTQ of float runs) / 'ptq(<method>)' from the ptq.json files "
                         "`qexp eval RUN --ptq-bits` writes (bits k: weights only, k-a: with a-bit "
                         "activations); default on")
    ap.add_argument("--digits", type=int, default=2, help="decimals shown (default 2)")
    ap.add_argument("--trials", action=argparse.BooleanOptionalAction, default=True,
                    help="for a folder holding an Optuna search (optimization_results.yaml): list its trials "
                         "by objective and the best configuration instead of the grid (default on; "
                         "giving --rows also shows the grid)")
    ap.add_argument("--ci", action="store_true",
                    help="show mean ± half-width of the 95%% confidence interval of the mean (t over seeds) "
                         "instead of mean ± std")
    ap.add_argument("--baseline", action="append", default=[], metavar="KEY=VAL[,KEY=VAL]",
                    help="a row (e.g. method=float, or method=bc,bits=1): every cell adds its difference to "
                         "its column's baseline cell, with a 95%% CI and Welch's t-test p-value over seeds")
    ap.add_argument("--alpha", type=float, default=results.DEFAULT_ALPHA,
                    help="significance level of the best-mark: a column's best cell is marked only when "
                         "Welch's t-test finds it better than the runner-up at p < ALPHA (default "
                         f"{results.DEFAULT_ALPHA:g}; 1 marks the best mean unconditionally)")
    args = ap.parse_args(argv)
    if not 0 <= args.digits <= 12:
        raise QexpError(f"--digits must be in 0..12, not {args.digits}")
    if not 0.0 < args.alpha <= 1.0:
        raise QexpError(f"--alpha must be in (0, 1], not {args.alpha:g}")

    if args.out is not None:
        check_report_target(args.out)
    if args.out is not None and args.format is None and args.out.suffix.lower() not in SUFFIX_FORMAT:
        raise QexpError(f"--out {args.out}: a table is written as {', '.join(SUFFIX_FORMAT)} (by the suffix), "
                        "or as --format FORMAT")
    fmt = args.format or (SUFFIX_FORMAT[args.out.suffix.lower()] if args.out else "term")
    if fmt not in FORMATS:
        raise QexpError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    ref = refs.load(args.ref) if args.ref else None
    if args.metric is None:
        args.metric = refs.default_metric(ref)
    if ref is not None:
        refs.comparable(ref, args.metric)
    df = results.collect(args.dirs)
    if args.ptq_json:
        df = results.with_ptq(df)
    df = results.where(df, args.where)
    studies = trials.find_studies(args.dirs) if args.trials else []
    if studies and args.rows is None:  # a search folder: its trials and best configuration
        if fmt == "csv":
            raise QexpError("an Optuna search's trials print as term, md or latex; "
                            "--no-trials tabulates its runs as a grid")
        views = [trials_view(df, s) for s in studies]
        color = fmt == "term" and args.out is None and sys.stdout.isatty()
        render_one = {"term": lambda v: render_term(v, color), "md": render_md, "latex": render_latex}[fmt]
        return _emit("\n".join(render_one(v) for v in views), args.out, fmt,
                     f"{sum(len(v.body) for v in views)} trials")
    args.rows = args.rows or "method,bits"
    grid = results.aggregate(df, results.parse_keys(args.rows), results.parse_keys(args.cols), args.metric)
    opts = Options(args.digits, "ci" if args.ci else "std",
                   resolve_baseline(grid, args.baseline) if args.baseline else None, args.alpha)
    color = fmt == "term" and args.out is None and sys.stdout.isatty()
    text = render(grid, fmt, ref, opts, color)
    ptq_results = int((df["ptq_json"] == True).sum()) if "ptq_json" in df else 0  # noqa: E712 (NaN elsewhere)
    return _emit(text, args.out, fmt, f"{len(grid.rows)} rows x {len(grid.cols)} columns, {len(df) - ptq_results} runs"
                 + (f" and {ptq_results} PTQ results" if ptq_results else ""))


def run_folder_of(target: Path) -> Path | None:
    """The run folder ``target`` would be written into (its folder or one above it holds metrics.json,
    checkpoint.pt or .hydra/), or None: links are followed, so a link to a run folder is one too."""
    folder = Path(os.path.abspath(target)).parent.resolve()
    for f in (folder, *folder.parents):
        if any((f / mark).exists() for mark in RUN_MARKS):
            return f
    return None


def check_report_target(target: Path, option: str = "--out") -> None:
    """Refuse (one line) a report file that would land in a run folder or replace one of qexp's run files
    (metrics.json, a checkpoint, ptq.json, quant.json, train.log): a table or figure there would silently
    overwrite what a run wrote and leave it corrupt. Any other existing file is the user's to replace,
    unless they write-protected it (the atomic rename would replace it anyway, where ``>`` would refuse)."""
    if target.is_symlink():  # the atomic rename would replace the link, not write the file it names
        raise QexpError(f"{option} {target} is a link: name the file it points to, or another name")
    if target.exists() and not target.is_file():  # a folder, a FIFO, a device (/dev/full was replaced)
        raise QexpError(f"{option} {target} exists and is not a regular file: choose a file name")
    run = run_folder_of(target)
    if run is not None:
        raise QexpError(f"{option} {target} is inside the run folder {run}: a report never writes among a "
                        "run's files; choose a file outside it")
    if target.name in {record.METRICS, record.CHECKPOINT, record.BEST, record.PTQ_FILE, "quant.json", "train.log"} \
            and target.exists():
        raise QexpError(f"{option} {target} is an existing {target.name}, a file qexp runs write: "
                        "choose another name")
    if target.is_file() and not os.access(target, os.W_OK):
        raise QexpError(f"{option} {target} is write-protected: make it writable or choose another name")


def _emit(text: str, out: Path | None, fmt: str, what: str) -> int:
    if out is None:
        sys.stdout.write(text)
    else:
        from qexp.jsonio import atomic_write_bytes, without_new_folders

        try:  # a write that fails leaves none of the folders it made
            without_new_folders([out.parent], lambda: atomic_write_bytes(out, text.encode()))
        except OSError as e:
            raise QexpError(f"cannot write {out}: {e.strerror or e}") from None
        print(f"wrote {out} ({fmt}, {what})")
    return 0
