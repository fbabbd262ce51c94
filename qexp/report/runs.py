"""``qexp runs DIR...``: one line per run below DIR, to see what a sweep is doing.

Columns: status, method, bits, dataset/model, overrides, seed, epochs done/total, final test error,
wall time, folder. A running run shows how long ago it last wrote metrics.json; one whose process is
gone shows as ``dead`` (its lock's holder no longer runs, see qexp.run.lock; rerunning the same command
resumes it). Failed and dead runs show their error message. A summary line counts the runs by status.

--where KEY=V[,V...] keeps runs as `qexp table` and `qexp plot` do (any record, override or config
key); --sort METRIC lists the best value first (lowest error, highest accuracy; runs without the value
last) and shows that metric in its own column when it is not the test error.

examples:
  qexp runs outputs --status failed,diverged
  qexp runs outputs --where method=bc,sr --sort best_test_error
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from qexp.errors import ArgumentParser, QexpError, path_arg
from qexp.report import results
from qexp.run import record

COLORS = {"completed": "green", "running": "cyan", "interrupted": "yellow", "pending": "yellow",
          "dead": "red", "diverged": "magenta", "failed": "red"}


def fmt_duration(s: float | None) -> str:
    return record.fmt_duration(s, missing=results.MISSING)


def _rel(path: str, roots: list[Path]) -> str:
    p = Path(path)
    for r in roots:
        try:
            rel = p.resolve().relative_to(r.resolve())
            return str(r / rel)
        except ValueError:
            continue
    return path


def _value(r: dict[str, Any], metric: str) -> float | None:
    v = r.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def run_lines(df: Any, roots: list[Path], now: float | None = None,
              sort: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and one row of strings per run, in table order (method, bits, dataset, ..., seed), or best
    ``sort`` value first (missing values last, in table order)."""
    now = time.time() if now is None else now
    order = ("method", "bits", "dataset", "model", "overrides", "seed")
    recs = sorted(df.to_dict("records"),
                  key=lambda r: tuple(results.sort_key(k, results.key_label(k, r)) for k in order))
    if sort is not None:
        sign = -1.0 if results.higher_is_better(sort) else 1.0
        recs.sort(key=lambda r: (0, sign * v) if (v := _value(r, sort)) is not None else (1, 0.0))
    shown = sort if sort not in (None, "test_error") else None
    header = ["status", "method", "bits", "dataset/model", "overrides", "seed", "epochs", "test error",
              *([results.metric_label(shown)] if shown else []), "time", "folder"]
    rows = []
    for r in recs:
        status = r.get("status") or "failed"
        if status in ("running", "pending"):
            status += f" (updated {fmt_duration(now - r['mtime'])} ago)"
        err = r.get("test_error")
        done = r.get("epochs_done")
        total = results.key_label("epochs", r)
        rows.append([
            status, results.key_label("method", r), results.key_label("bits", r),
            f"{results.key_label('dataset', r)}/{results.key_label('model', r)}",
            results.key_label("overrides", r), results.key_label("seed", r),
            f"{int(done) if done == done and done is not None else 0}/{total}",
            f"{err:.2f}%" if isinstance(err, (int, float)) and err == err else results.MISSING,
            *([_fmt_value(_value(r, shown), shown)] if shown else []),
            fmt_duration(r.get("wall_s")), _rel(r["run_dir"], roots),
        ])
        if r.get("error") and isinstance(r["error"], str) and r.get("status") != "completed":
            rows[-1][-1] += f"  error: {r['error'].splitlines()[0][:200]}"
    return header, rows


def _fmt_value(v: float | None, metric: str) -> str:
    if v is None:
        return results.MISSING
    return f"{v:.2f}%" if results.metric_label(metric).endswith("(%)") else f"{v:.4g}"


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="qexp runs", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=path_arg, metavar="DIR", help="folders holding run folders")
    ap.add_argument("--status", default=None,
                    help="show only runs with these statuses (comma-separated, e.g. failed,diverged)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=V[,V...]",
                    help="keep only runs whose KEY is one of the values (repeatable; as in qexp table/plot)")
    ap.add_argument("--sort", default=None, metavar="METRIC",
                    help="best first by METRIC (test_error, best_test_error, val_error, test_acc, wall_s, "
                         "any numeric field of metrics.json); runs without it last")
    args = ap.parse_args(argv)
    wanted = set(args.status.split(",")) if args.status else set()
    unknown = sorted(wanted - set(results.STATUS_ORDER))
    if unknown:
        raise QexpError(f"--status: unknown status {', '.join(unknown)} (valid: {','.join(results.STATUS_ORDER)})")
    df = results.where(results.collect(args.dirs), args.where)
    if args.sort is not None:
        results.check_metric(df, args.sort)
    counts = Counter(df["status"].fillna("failed"))
    if wanted:
        df = df[df["status"].isin(wanted)]
    if df.empty:  # nothing to list: say so, no empty header
        print(f"no runs with status {args.status} (found: "
              + ", ".join(f"{n} {st}" for st, n in sorted(counts.items())) + ")")
        return 0
    header, rows = run_lines(df, args.dirs, sort=args.sort)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    color = sys.stdout.isatty()
    from rich.console import Console

    console = Console(width=10_000, force_terminal=color, color_system="auto" if color else None,
                      highlight=False, soft_wrap=True)

    def line(cells: list[str], style: str | None = None) -> None:
        text = "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]
        console.print(text.rstrip(), style=style, markup=False)

    line(header, "bold")
    for r in rows:
        line(r, COLORS.get(r[0].split()[0]))
    summary = ", ".join(f"{n} {st}" for st, n in sorted(counts.items(),
                                                         key=lambda kv: results.sort_key("status", kv[0])))
    total = sum(counts.values())
    console.print(f"{total} run{'s' if total != 1 else ''}: {summary}", markup=False)
    return 0
