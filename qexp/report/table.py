"""``qexp table DIR...``: the paper-style comparison table of every run below DIR.

One row per method and bits (or any keys in --rows), one column per dataset/model (--cols), each cell
``mean ± std (n)`` over seeds of the completed runs. Runs that failed, diverged or are still running
are shown in their cell ("failed (1)", "running 3/10 ep"), never dropped. The best mean of each
column is marked (bold). --ref puts a paper's published numbers and our difference beside each
column; reference files live in configs/reference/ (li2017, bc2015, wage2018) or any path.

examples:
  qexp table outputs/li2017_mnist
  qexp table outputs --rows method,bits,overrides --metric best_test_error --format md
  qexp table outputs/wage_mnist --ref wage2018 --metric best_test_error --format latex --out wage.tex
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qexp.errors import QexpError
from qexp.report import reference as refs
from qexp.report import results

FORMATS = ("term", "md", "latex", "csv")
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
            colkeys = dict(zip(grid.col_keys, col))
            if all(colkeys[k] == v for k, v in e.keys.items() if k in colkeys):
                extra.append(row)
                break
    return extra


def build_view(grid: results.Grid, ref: refs.Reference | None = None, digits: int = 2) -> View:
    rows = grid.rows
    if ref is not None:
        rows = results.ordered(grid.row_keys, [*rows, *_ref_rows(grid, ref)])
    best = grid.best()
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
            line.append(Shown(cell.text(digits) if cell else results.MISSING, (row, col) in best))
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
    counts = Counter(r.get("status") or "failed" for c in grid.cells.values() for r in c.runs)
    tally = ", ".join(f"{n} {st}" for st, n in sorted(counts.items(),
                                                      key=lambda kv: results.sort_key("status", kv[0])))
    title = (f"{label}: mean ± std (n) over seeds of completed runs; best per column in bold "
             f"[{sum(counts.values())} run{'s' if sum(counts.values()) != 1 else ''}: {tally}]")
    notes = []
    if ref is not None:
        what = results.metric_label(ref.metric)
        converted = ", shown as 100 - x" if refs.is_acc(ref.metric) != refs.is_acc(grid.metric) else ""
        notes.append(f"paper: {ref.title}; published as {what}{converted}; Δ = ours - paper")
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


def render_csv(grid: results.Grid, ref: refs.Reference | None = None) -> str:
    """Numbers for spreadsheets: per column its mean, std, n and a note (status, 'best')."""
    view = build_view(grid, ref)  # for the row set (reference rows included)
    rows = [tuple(c.text for c in line[:view.n_keys]) for line in view.body]
    best = grid.best()
    header = list(grid.row_keys)
    for col in grid.cols:
        label = "/".join(col)
        header += [f"{label} mean", f"{label} std", f"{label} n", f"{label} note"]
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
            if ref is not None:
                entry = ref.lookup({**dict(zip(grid.row_keys, row)), **dict(zip(grid.col_keys, col))})
                value = ref.value_as(entry, grid.metric) if entry else None
                line += [_num(value), _num(mean - value if mean is not None and value is not None else None)]
        w.writerow(line)
    return buf.getvalue()


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def render(grid: results.Grid, fmt: str, ref: refs.Reference | None = None, digits: int = 2,
           color: bool = False) -> str:
    if fmt == "csv":
        return render_csv(grid, ref)
    view = build_view(grid, ref, digits)
    return {"term": lambda: render_term(view, color), "md": lambda: render_md(view),
            "latex": lambda: render_latex(view)}[fmt]()


def apply_where(df, clauses: list[str]):  # type: ignore[no-untyped-def]
    """Keep runs whose KEY shows one of the comma-separated VALUES (``--where method=float,bc``)."""
    for clause in clauses:
        key, sep, values = clause.partition("=")
        if not sep or not key:
            raise QexpError(f"--where takes KEY=VALUE[,VALUE...], not {clause!r}")
        df = results.with_keys(df, [key])
        results.check_keys(df, [key], "--where")
        wanted = set(values.split(","))
        df = df[[results.key_label(key, r) in wanted for r in df.to_dict("records")]]
        if df.empty:
            raise QexpError(f"no runs left after --where {clause}")
    return df


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="qexp table", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="folders holding run folders")
    ap.add_argument("--rows", default="method,bits",
                    help="comma-separated run keys, one table row per value (default method,bits); "
                         "e.g. method,bits,overrides or method,optim,lr")
    ap.add_argument("--cols", default="dataset,model",
                    help="comma-separated column keys (default dataset,model)")
    ap.add_argument("--metric", default="test_error",
                    help="test_error (default) | best_test_error | test_acc | train_loss | images_per_s | "
                         "wall_s | any numeric field of metrics.json")
    ap.add_argument("--format", default=None,
                    help="term (rich, default), md, latex (booktabs) or csv; default from --out's suffix")
    ap.add_argument("--out", type=Path, default=None, help="write to this file instead of stdout")
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
    args = ap.parse_args(argv)

    fmt = args.format or (SUFFIX_FORMAT.get(args.out.suffix.lower(), "term") if args.out else "term")
    if fmt not in FORMATS:
        raise QexpError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    ref = refs.load(args.ref) if args.ref else None
    if ref is not None:
        refs.comparable(ref, args.metric)
    df = results.collect(args.dirs)
    if args.ptq_json:
        df = results.with_ptq(df)
    df = apply_where(df, args.where)
    grid = results.aggregate(df, results.parse_keys(args.rows), results.parse_keys(args.cols), args.metric)
    color = fmt == "term" and args.out is None and sys.stdout.isatty()
    text = render(grid, fmt, ref, args.digits, color)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out} ({fmt}, {len(grid.rows)} rows x {len(grid.cols)} columns, "
              f"{len(df)} runs)")
    return 0
