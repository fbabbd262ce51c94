"""qexp table / plot / runs on run folders built here (synthetic metrics.json in the real schema), and
one real tiny sweep through ``qexp train --multirun``."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import stat
import struct
from pathlib import Path

import pytest
import yaml

from qexp.cli import main as qexp
from qexp.jsonio import write_json
from qexp.report import results
from qexp.run import record
from tests.conftest import run_qexp


def make_run(root: Path, method: str, bits: int | str, seed: int, errors: list[float] | None = None, *,
             dataset: str = "mnist", model: str = "lenet5", status: str = "completed",
             epochs: int | None = None, overrides: str = "", extra_hist: list[dict] | None = None,
             extra: dict | None = None, error: str | None = None, name: str = "exp") -> Path:
    """A run folder as qexp train writes it: the same path layout, record.build for metrics.json."""
    errors = errors or []
    tag = str(bits)
    run_dir = root / name / dataset / model / f"{method}-{tag}b" / (overrides or "") / f"seed{seed}"
    history = [{"epoch": i + 1, "train_loss": e / 10, "train_error": e * 1.1, "test_loss": e / 9,
                "test_error": e, "lr": 0.001, "images_per_s": 1000.0 + i, **((extra_hist or [{}] * 99)[i])}
               for i, e in enumerate(errors)]
    meta = {"name": name, "dataset": dataset, "model": model, "method": method,
            "bits": bits if isinstance(bits, int) else int(str(bits).split("-")[0]), "bits_tag": tag,
            "seed": seed, "epochs": epochs or len(errors) or 2, "overrides": overrides, "optim": "adam",
            "lr": 0.001, "batch_size": 64}
    record.write(run_dir, record.build(meta, status, history, wall_s=12.0 * len(errors), extra=extra,
                                       error=error))
    return run_dir


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """Two datasets; float x3 seeds, bc 1 bit x2 (+1 failed), bc 2 bits x1 + 1 diverged, sr running."""
    r = tmp_path / "out"
    for s, e in enumerate([1.0, 1.2, 1.4]):
        make_run(r, "float", 32, s, [5.0, e])
    make_run(r, "float", 32, 0, [20.0, 12.0], dataset="fashion_mnist")
    make_run(r, "bc", 1, 0, [6.0, 2.0])
    make_run(r, "bc", 1, 1, [6.0, 3.0])
    make_run(r, "bc", 1, 2, [], status="failed", error="CUDA out of memory")
    make_run(r, "bc", 2, 0, [4.0, 1.5])
    make_run(r, "bc", 2, 1, [4.0, float("nan")], status="diverged", error="loss became NaN or infinite")
    make_run(r, "sr", 1, 0, [9.0, 8.0, 7.0], status="running", epochs=10)
    return r


def grid_of(root: Path, metric: str = "test_error", rows: str = "method,bits",
            cols: str = "dataset,model") -> results.Grid:
    return results.aggregate(results.collect([root]), rows.split(","), cols.split(","), metric)


# ---- aggregation --------------------------------------------------------------------------------
def test_cells_hold_mean_std_n_of_completed_runs(sweep: Path) -> None:
    g = grid_of(sweep)
    mnist = ("mnist", "lenet5")
    c = g.cell(("float", "32"), mnist)
    assert c.n == 3 and c.mean == pytest.approx(1.2) and c.std == pytest.approx(0.2)
    assert c.text() == "1.20 ± 0.20 (3)"
    bc1 = g.cell(("bc", "1"), mnist)
    assert bc1.n == 2 and bc1.mean == pytest.approx(2.5) and bc1.std == pytest.approx(math.sqrt(0.5))
    assert bc1.text() == "2.50 ± 0.71 (2); failed (1)"  # the failed seed is shown, not dropped
    assert g.cell(("bc", "2"), mnist).text() == "1.50 (1); diverged (1)"
    assert g.cell(("sr", "1"), mnist).text() == "running 3/10 ep"
    assert g.cell(("float", "32"), ("fashion_mnist", "lenet5")).text() == "12.00 (1)"
    assert g.cell(("bc", "1"), ("fashion_mnist", "lenet5")) is None  # missing: rendered as "—"
    # best_test_error takes each run's minimum over epochs
    assert grid_of(sweep, "best_test_error").cell(("float", "32"), mnist).mean == pytest.approx(1.2)


def test_order_is_paper_order_then_alphabetical_and_bits_numeric(tmp_path: Path) -> None:
    for m, b in [("zeta", 4), ("wage", "2-8-8-8"), ("r", 1), ("ste", 2), ("alpha", 1), ("bc", 16),
                 ("bc", 2), ("bc", 8), ("learned", 4), ("big_sr", 1), ("sr", 1), ("float", 32), ("ptq", 8)]:
        make_run(tmp_path, m, b, 0, [1.0])
    for d in ("cifar10", "fashion_mnist", "aaa"):
        make_run(tmp_path, "float", 32, 0, [1.0], dataset=d)
    g = grid_of(tmp_path)
    assert g.rows == [("float", "32"), ("bc", "2"), ("bc", "8"), ("bc", "16"), ("big_sr", "1"), ("sr", "1"),
                      ("r", "1"), ("ste", "2"), ("wage", "2-8-8-8"), ("learned", "4"), ("ptq", "8"),
                      ("alpha", "1"), ("zeta", "4")]
    assert [c[0] for c in g.cols] == ["mnist", "fashion_mnist", "cifar10", "aaa"]
    # the order does not depend on the order folders are found in
    assert grid_of(tmp_path).rows == g.rows


def test_orders_name_exactly_the_shipped_options() -> None:
    """METHOD_ORDER / DATASET_ORDER list every shipped method option / dataset name once and nothing else: a new
    option without a place in the tables, or a stale name (an svhn with no config), fails here."""
    configs = Path(__file__).resolve().parents[1] / "configs"

    def names(group: str, key: tuple[str, ...]) -> set[str]:
        out = set()
        for f in (configs / group).glob("*.yaml"):
            node = yaml.safe_load(f.read_text())
            for k in key:
                node = node[k]
            out.add(node)
        return out

    assert len(set(results.METHOD_ORDER)) == len(results.METHOD_ORDER)
    assert set(results.METHOD_ORDER) == {f.stem for f in (configs / "method").glob("*.yaml")}
    assert len(set(results.DATASET_ORDER)) == len(results.DATASET_ORDER)
    assert set(results.DATASET_ORDER) == names("dataset", ("name",))


def test_best_value_per_column_is_marked(sweep: Path) -> None:
    """--alpha 1 marks the best mean unconditionally; the default asks for significance (test_stats.py)."""
    md = render(sweep, "md", "--alpha", "1")
    assert "**1.20 ± 0.20 (3)**" in md and "**2.50" not in md
    acc = render(sweep, "md", "--metric", "test_acc", "--alpha", "1")
    assert "**98.80 ± 0.20 (3)**" in acc  # higher is better for accuracy
    md = render(sweep, "md")  # the runner-up (bc 2 bits) has one seed: nothing can be called best
    assert "**" not in md.split("\n", 1)[1]
    assert "best mean float/32 not marked, not significantly better than bc/2 (fewer than 2 seeds" in md


def test_cell_mixing_configurations_is_flagged(tmp_path: Path) -> None:
    make_run(tmp_path, "float", 32, 0, [1.0], overrides="lr=0.1")
    make_run(tmp_path, "float", 32, 0, [2.0], overrides="lr=0.01")
    assert any("differ in lr:" in w for w in grid_of(tmp_path).warnings())  # the overridden key named
    g = grid_of(tmp_path, rows="method,overrides")
    assert g.rows == [("float", "lr=0.01"), ("float", "lr=0.1")] and not g.warnings()


def test_repeats_that_disagree_are_named_with_their_range_and_the_folder_kept(tmp_path: Path) -> None:
    """Reruns of one (configuration, seed) on other threads or compiled (not part of a run's identity) differ
    in the last digits: one sample is kept, and a note says how many repeats disagree, over what range,
    which folder was kept and why (the audit's k1/t2/k2: 8.45, 8.19, 8.43; 8.19 silently kept)."""
    repeats = [("k1", 8.45, {"threads": 1, "images_per_s": 900.0}),
               ("t2", 8.19, {"threads": 2, "images_per_s": 1500.0}),
               ("k2", 8.43, {"threads": 1, "compile_s": 78.8, "images_per_s": 1100.0})]
    dirs = [make_run(tmp_path / root, "bc", 1, 0, [e], extra=x) for root, e, x in repeats]
    for age, d in zip((300, 0, 200), dirs):  # t2 the newest
        os.utime(d / record.METRICS, (1.7e9 - age, 1.7e9 - age))
    g = results.aggregate(results.collect([tmp_path / r for r in ("k1", "t2", "k2")]), ["method", "bits"],
                          ["dataset", "model"], "test_error")
    assert g.cell(("bc", "1"), ("mnist", "lenet5")).values == [8.19]
    (note,) = [n for n in g.warnings() if "disagree" in n]
    assert note == (f"bc/1 x mnist/lenet5 seed 0: 3 run folders repeat one (configuration, seed) and disagree on "
                    f"test error (%): 8.19 to 8.45 (3 values); kept {dirs[1]} (8.19), the newest completed one; "
                    "they differ in threads (1, 2), compile (false, true), not part of a run's identity")
    g = results.aggregate(results.collect([tmp_path / r for r in ("k1", "t2", "k2")]), ["method", "bits"],
                          ["dataset", "model"], "images_per_s")  # a timing: every rerun differs, no note
    assert g.cell(("bc", "1"), ("mnist", "lenet5")).n == 1 and not [n for n in g.warnings() if "disagree" in n]
    shutil.copytree(tmp_path / "t2", tmp_path / "copy")  # a copy agrees: counted once, no disagreement
    g = results.aggregate(results.collect([tmp_path / "t2", tmp_path / "copy"]), ["method", "bits"], ["dataset"],
                          "test_error")
    assert g.cell(("bc", "1"), ("mnist",)).n == 1 and not [n for n in g.warnings() if "disagree" in n]


def test_one_seed_counts_once_in_a_cell_pooling_configurations(tmp_path: Path) -> None:
    """Two seed-0 runs whose configurations differ in keys that do not change the result (PTQ's act_bits
    without activations, bc's method.seed) are one sample, not n=2 with zero variance, which Welch's test
    called significant (the audit's p1: ptq/8 bold at 24.68 ± 0.00 (2)). Seeds a pooled cell shares with
    several configurations count once, as their mean."""
    make_run(tmp_path, "ptq", 8, 0, [24.68], overrides="method.act_bits=4")
    make_run(tmp_path, "ptq", 8, 0, [24.68])
    make_run(tmp_path, "bc", 1, 0, [31.47], overrides="method.seed=7")
    make_run(tmp_path, "bc", 1, 0, [31.47])
    g = grid_of(tmp_path)
    col = ("mnist", "lenet5")
    assert [g.cell(r, col).text() for r in g.rows] == ["31.47 (1)", "24.68 (1)"]
    assert not g.best() and "**" not in render(tmp_path, "md").split("\n", 1)[1]
    assert "cell ptq/8 x mnist/lenet5 mixes runs that differ in method.act_bits: add them to --rows or --cols " \
           "to separate them; seed 0 in 2 runs: each seed counts once (the mean of its runs), n counts seeds" \
           in g.warnings()
    for seed, (a, b) in enumerate([(1.0, 2.0), (3.0, 5.0)]):  # two configurations x seeds 0, 1
        make_run(tmp_path, "float", 32, seed, [a], overrides="lr=0.1")
        make_run(tmp_path, "float", 32, seed, [b], overrides="lr=0.01")
    c = grid_of(tmp_path).cell(("float", "32"), col)
    assert c.n == 2 and c.values == [1.5, 4.0] and c.mean == pytest.approx(2.75)


def test_any_config_key_groups_the_table(tmp_path: Path) -> None:
    """Keys come from the overrides (a sweep's `method.ste=relu`) or else the composed config (the
    default estimator of a run that did not override it); the pooled cell's note names the key."""
    for ste, errs in (("identity", [5.0, 7.0]), ("relu", [3.0, 3.2]), (None, [2.0, 2.2])):
        for seed, e in enumerate(errs):
            run = make_run(tmp_path, "ste", 2, seed, [e], overrides=f"method.ste={ste}" if ste else "")
            (run / ".hydra").mkdir()
            (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
                {"method": {"name": "ste", "ste": ste or "clipped_relu"}, "lr": "${optim.lr}"}))
    pooled = grid_of(tmp_path)
    cell = pooled.cell(("ste", "2"), ("mnist", "lenet5"))  # three estimators per seed: n counts the 2 seeds
    assert cell.n == 2 and cell.values == pytest.approx([10.0 / 3, 12.4 / 3])
    assert any("differ in method.ste" in w for w in pooled.warnings())
    g = grid_of(tmp_path, rows="method.ste,bits")
    assert g.rows == [("clipped_relu", "2"), ("identity", "2"), ("relu", "2")] and not g.warnings()
    assert g.cell(("relu", "2"), ("mnist", "lenet5")).mean == pytest.approx(3.1)
    csv_rows = list(csv.DictReader(io.StringIO(render(tmp_path, "csv", "--rows", "bits", "--cols", "method.ste",
                                                      "--where", "method.ste=relu,identity"))))
    assert list(csv_rows[0])[:4] == ["bits", "identity mean", "identity std", "identity n"]
    assert float(csv_rows[0]["identity mean"]) == pytest.approx(6.0)


def test_two_options_of_one_method_are_two_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """method=bc and method=bc_li record one method name (bc); the table once pooled them into one cell
    (with a note): each row is the option the run was launched with, as its folder says."""
    out = tmp_path / "out"
    r = run_qexp(["train", "--multirun", "method=bc,bc_li", "dataset=synthetic", "model=mlp", "model.width=16",
                  "model.depth=1", "dataset.train_subset=64", "epochs=1", "progress=false", "threads=1",
                  f"out_root={out}"])
    assert r.returncode == 0, r.stderr
    assert qexp(["table", str(out), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(row["method"], row["bits"]) for row in rows] == [("bc", "1"), ("bc_li", "1")]
    assert results.method_option(tmp_path) is None  # no .hydra/hydra.yaml: the record's method name stands


def test_a_knob_the_method_does_not_read_gives_its_own_row(tmp_path: Path) -> None:
    """``--multirun method=float,sr grid_scale=0.01,glorot``: float trains once per seed, and its composed
    config holds the grid_scale of whichever job started it; it belongs to no grid-scale row (it sat in
    the 0.01 row for two seeds and the glorot row for one in a real li2017_scale sweep)."""
    for seed, scale in enumerate(["0.01", "0.01", "glorot"]):
        run = make_run(tmp_path, "float", 32, seed, [2.0 + seed / 10])
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
            {"grid_scale": scale, "method": {"name": "float", "bits": "${bits}"}}))
    for scale, err in (("0.01", 3.0), ("glorot", 4.0)):
        run = make_run(tmp_path, "sr", 1, 0, [err], overrides=f"method.scale={scale}" if scale != "glorot" else "")
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
            {"grid_scale": scale, "method": {"name": "sr", "bits": "${bits}", "scale": "${grid_scale}"}}))
    g = grid_of(tmp_path, rows="grid_scale", cols="method")
    assert g.rows == [("0.01",), ("glorot",), (results.NOT_READ,)]
    assert g.cell((results.NOT_READ,), ("float",)).n == 3
    assert g.cell(("0.01",), ("sr",)).mean == 3.0 and g.cell(("glorot",), ("sr",)).mean == 4.0
    assert (("0.01",), ("float",)) not in g.cells
    assert any("does not read grid_scale (float)" in w for w in g.warnings())


def test_a_knob_is_labelled_by_the_value_the_run_used_however_it_was_typed(tmp_path: Path) -> None:
    """``grid_scale=X`` and ``method.scale=X`` are one run, as are ``lr=X`` and ``optim.lr=X``: the table
    reads the key that carries the value (runs typed ``method.scale=`` sat in the ``—`` row, "does not read
    grid_scale", and ``lr=0.1`` runs in the ``optim.lr=0.001`` row of Adam's default)."""
    out = tmp_path / "out"
    tiny = ["dataset=synthetic", "model=mlp", "model.width=16", "model.depth=1", "dataset.train_subset=64",
            "epochs=1", "progress=false", "threads=1", f"out_root={out}"]
    for typed in (["method=bc", "method.scale=0.5"], ["method=bc", "grid_scale=0.05"], ["lr=0.1"],
                  ["optim.lr=0.003"]):
        assert run_qexp(["train", *tiny, *typed]).returncode == 0
    g = grid_of(out, rows="method,grid_scale", cols="model")
    assert g.rows == [("float", results.NOT_READ), ("bc", "0.05"), ("bc", "0.5")]
    lr = grid_of(out, rows="method,optim.lr", cols="model")
    assert [r for r in lr.rows if r[0] == "float"] == [("float", "0.003"), ("float", "0.1")]
    kept = results.where(results.collect([out]), ["grid_scale=0.5"])
    assert len(kept) == 1 and "method.scale=0.5" in kept.iloc[0]["overrides"]


def test_runs_without_metrics_or_with_partial_records_are_kept(tmp_path: Path) -> None:
    """A job killed before its first record, and a failure record (train.py writes few keys), are read
    with their identifying keys recovered from .hydra/."""
    job = tmp_path / "exp" / "mnist" / "lenet5" / "bc-1b" / "lr=0.1" / "seed3"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"name": "exp", "seed": 3, "bits": 1, "epochs": 5, "lr": "${optim.lr}", "dataset": {"name": "mnist"},
         "model": {"name": "lenet5"}, "method": {"name": "bc"}, "optim": {"name": "adam", "lr": 0.1}}))
    hydra = {"hydra": {"job": {"override_dirname": "lr=0.1"}}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    df = results.collect([tmp_path])
    assert len(df) == 1
    r = df.iloc[0]
    got = (r["status"], r["method"], r["overrides"], r["lr"], r["epochs"])
    assert got == ("pending", "bc", "lr=0.1", 0.1, 5)
    write_json(job / "metrics.json", {"status": "failed", "method": "bc", "bits": 1, "seed": 3,
                                      "dataset": "mnist", "model": "lenet5", "error": "boom", "history": []})
    g = grid_of(tmp_path, rows="method,bits,overrides")
    assert g.cell(("bc", "1", "lr=0.1"), ("mnist", "lenet5")).text() == "failed (1)"


# ---- formats ------------------------------------------------------------------------------------
def render(root: Path, fmt: str, *extra: str, capsys: pytest.CaptureFixture | None = None) -> str:
    out = root.parent / f"table_{fmt}.{ {'md': 'md', 'latex': 'tex', 'csv': 'csv', 'term': 'txt'}[fmt]}"
    assert qexp(["table", str(root), "--format", fmt, "--out", str(out), *extra]) == 0
    return out.read_text()


def md_rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in md.splitlines()
            if line.startswith("|")]


def test_csv_parses_back_with_numbers(sweep: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(render(sweep, "csv", "--alpha", "1"))))
    assert [(r["method"], r["bits"]) for r in rows] == [("float", "32"), ("bc", "1"), ("bc", "2"),
                                                         ("sr", "1")]
    f = rows[0]
    assert float(f["mnist/lenet5 mean"]) == pytest.approx(1.2)
    assert float(f["mnist/lenet5 std"]) == pytest.approx(0.2)
    assert f["mnist/lenet5 n"] == "3" and f["mnist/lenet5 note"] == "best"
    assert rows[1]["mnist/lenet5 note"] == "failed (1)" and rows[1]["fashion_mnist/lenet5 note"] == "missing"
    assert rows[3]["mnist/lenet5 mean"] == "" and rows[3]["mnist/lenet5 note"] == "running 3/10 ep"


def test_markdown_has_equal_column_counts(sweep: Path) -> None:
    rows = md_rows(render(sweep, "md"))
    assert len(rows) == 2 + 4  # header, separator, four method/bits rows
    assert {len(r) for r in rows} == {4}
    assert rows[0] == ["method", "bits", "mnist/lenet5", "fashion_mnist/lenet5"]
    assert rows[3][2:] == ["2.50 ± 0.71 (2); failed (1)", "—"]


def test_latex_rows_are_balanced(sweep: Path) -> None:
    tex = render(sweep, "latex", "--ref", "li2017", "--alpha", "1")
    lines = tex.splitlines()
    body = lines[lines.index(r"\toprule") + 1:lines.index(r"\bottomrule")]
    body = [b for b in body if b != r"\midrule"]
    assert len(body) == 1 + 4  # header and our rows (li2017 has no MNIST column: no rows of its own)
    ncols = 2 + 2 * 3
    assert all(b.endswith(r"\\") and len(re.findall(r"(?<!\\)&", b)) == ncols - 1 for b in body)
    assert tex.count(r"\begin{") == tex.count(r"\end{") and r"\begin{tabular}{llrrrrrr}" in tex
    assert r"\textbf{1.20 $\pm$ 0.20 (3)}" in tex and "fashion\\_mnist" in tex


def test_terminal_table_lists_every_cell(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert qexp(["table", str(sweep), "--alpha", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("1.20 ± 0.20 (3)", "2.50 ± 0.71 (2); failed (1)", "running 3/10 ep", "diverged (1)", "—"):
        assert text in out
    assert out.index("float") < out.index("bc ") < out.index("sr ")
    assert "1.20 ± 0.20 (3) *" in out and "12.00 (1) *" in out  # best per column, plain-text mark
    assert out.count(") *") == 2
    assert "[10 runs: 7 completed, 1 running, 1 diverged, 1 failed]" in out


def test_ptq_json_results_become_rows(tmp_path: Path) -> None:
    """`qexp eval RUN --ptq-bits` results tabulate as method ptq (PTQ of float) / ptq(<method>) rows."""
    for seed in (0, 1):
        f = make_run(tmp_path, "float", 32, seed, [1.0 + seed])
        write_json(f / "ptq.json", {"float_test_error": 1.0 + seed, "results": [
            {"bits": b, "act_bits": a, "weights_only_error": w + seed, "with_activations_error": x + seed}
            for b, a, w, x in [(8, 8, 1.0, 1.1), (8, 4, 1.0, 3.0), (2, 8, 50.0, 60.0)]]})
    bc = make_run(tmp_path, "bc", 1, 0, [2.0])
    write_json(bc / "ptq.json", {"results": [{"bits": 4, "act_bits": 8, "weights_only_error": 2.5}]})
    make_run(tmp_path, "float", 32, 2, [3.0], status="running", epochs=5)  # no PTQ of unfinished runs
    rows = list(csv.DictReader(io.StringIO(render(tmp_path, "csv"))))
    got = [(r["method"], r["bits"], r["mnist/lenet5 mean"], r["mnist/lenet5 n"]) for r in rows]
    assert got == [("float", "32", "1.5", "2"), ("bc", "1", "2", "1"), ("ptq", "2", "50.5", "2"),
                   ("ptq", "2-8", "60.5", "2"), ("ptq", "8", "1.5", "2"), ("ptq", "8-4", "3.5", "2"),
                   ("ptq", "8-8", "1.6", "2"), ("ptq(bc)", "4", "2.5", "1")]
    rows = list(csv.DictReader(io.StringIO(render(tmp_path, "csv", "--no-ptq-json"))))
    assert [r["method"] for r in rows] == ["float", "bc"]


def test_ptq_json_results_of_other_schemes_are_other_rows(tmp_path: Path) -> None:
    """Two seeds evaluated with different PTQ schemes (``--ptq-per-channel --ptq-grid symmetric`` and the
    default) are not one cell: the scheme joins the bits tag unless it is the default (the audit's d3:
    "ptq | 4 | 9.89 ± 2.60 (2)"). A file without a scheme header predates it: the default."""
    per_channel = {"scheme": "symmetric-minmax-per-channel", "act_scheme": "symmetric-minmax-per-tensor"}
    default = {"scheme": "affine-minmax-per-layer", "act_scheme": "affine-minmax-per-tensor"}
    for seed, (header, w) in enumerate([(per_channel, 8.06), (default, 11.73), ({}, 10.0)]):
        f = make_run(tmp_path, "float", 32, seed, [w])
        write_json(f / "ptq.json", {**header, "results": [
            {"bits": 4, "act_bits": 8, "weights_only_error": w, "with_activations_error": w + 1}]})
    rows = list(csv.DictReader(io.StringIO(render(tmp_path, "csv"))))
    got = [(r["bits"], r["mnist/lenet5 mean"], r["mnist/lenet5 n"]) for r in rows if r["method"] == "ptq"]
    assert got == [("4", "10.865", "2"), ("4 symmetric-minmax-per-channel", "8.06", "1"),
                   ("4-8", "11.865", "2"),
                   ("4-8 symmetric-minmax-per-channel symmetric-minmax-per-tensor", "9.06", "1")]


def test_ptq_default_scheme_is_the_one_eval_writes() -> None:
    from qexp.methods.ptq.curve import DEFAULT_SCHEME_HEADER

    assert {**results.PTQ_DEFAULT_SCHEME, "calib_batches": results.PTQ_DEFAULT_CALIB} == DEFAULT_SCHEME_HEADER


def test_ptq_rows_carry_only_the_ptq_results_and_their_checkpoint(tmp_path: Path) -> None:
    """A PTQ row is the PTQ result: the source run's other numbers (validation error, error at the best
    epoch) were inherited, so ``--metric val_error`` showed float's number on every ptq row. A ptq.json
    made from a checkpoint.pt that changed since (the run trained on after ``qexp eval``) is left out,
    with a note; other calibration batches are rows of their own."""
    import hashlib

    runs = tmp_path / "runs"
    for seed in (0, 1):
        run = make_run(runs, "float", 32, seed, [1.0], extra={"val_error": 5.0, "test_error_at_best": 1.5})
        (run / "checkpoint.pt").write_bytes(b"weights")
        write_json(run / "ptq.json", {
            "calib_batches": 1 + 7 * seed, "checkpoint_sha1": hashlib.sha1(b"weights").hexdigest()[:16], "epoch": 1,
            "results": [{"bits": 4, "act_bits": 8, "weights_only_error": 2.0 + seed, "with_activations_error": 3.0,
                         "weights_only_drop": 1.0 + seed, "with_activations_drop": 2.0}]})
    df = results.with_ptq(results.collect([runs]))
    ptq = df[df["method"] == "ptq"]
    assert sorted(ptq["bits_tag"]) == ["4", "4", "4-8", "4-8 calib1"]  # calibration: rows of their own
    assert ptq["val_error"].isna().all() and ptq["test_error_at_best"].isna().all()
    assert sorted(ptq["ptq_drop"]) == [1.0, 2.0, 2.0, 2.0]
    g = results.aggregate(df, ["method", "bits"], ["dataset"], "val_error")
    assert g.cell(("ptq", "4"), ("mnist",)).n == 0 and g.cell(("float", "32"), ("mnist",)).n == 2
    (run,) = [Path(r) for r in results.find_run_dirs(runs) if Path(r).name == "seed1"]
    (run / "checkpoint.pt").write_bytes(b"trained on")  # the run went on after qexp eval
    g = results.aggregate(results.with_ptq(results.collect([runs])), ["method", "bits"], ["dataset"], "test_error")
    cell = g.cell(("ptq", "4"), ("mnist",))
    assert cell.values == [2.0] and cell.note() == "stale (1)"
    assert "[2 runs: 2 completed; 4 PTQ results from their ptq.json]" in render(runs, "md")  # not 6 runs
    from qexp.report import plot

    notes: list[str] = []  # the plot reads the same records: the stale file is left out there too
    points = plot.ptq_points(results.collect([runs]), ["method"], ["dataset"], notes)
    assert points[("mnist", "float")]["weights only"] == {4: [98.0]} and "which has changed since" in notes[0]
    assert any(f"{run / 'ptq.json'} analysed checkpoint.pt as it was after epoch 1, which has changed since" in w
               for w in g.warnings())


# ---- published numbers --------------------------------------------------------------------------
def test_ref_adds_published_columns_and_differences(tmp_path: Path) -> None:
    for s, e in enumerate([6.0, 7.0]):
        make_run(tmp_path, "float", 32, s, [e], dataset="cifar10", model="resnet56")
    make_run(tmp_path, "bc_li", 1, 0, [8.0], dataset="cifar10", model="resnet56")  # Li et al.'s BC
    rows = list(csv.DictReader(io.StringIO(render(tmp_path, "csv", "--ref", "li2017"))))
    by = {(r["method"], r["bits"]): r for r in rows}
    assert list(by) == [("float", "32"), ("bc_li", "1"), ("big_sr", "1"), ("sr", "1"), ("r", "1")]
    assert float(by["float", "32"]["cifar10/resnet56 paper"]) == pytest.approx(6.62)
    assert float(by["float", "32"]["cifar10/resnet56 diff"]) == pytest.approx(6.5 - 6.62)
    assert float(by["bc_li", "1"]["cifar10/resnet56 diff"]) == pytest.approx(8.0 - 7.17)
    assert by["r", "1"]["cifar10/resnet56 note"] == "missing" and by["r", "1"]["cifar10/resnet56 diff"] == ""
    md = md_rows(render(tmp_path, "md", "--ref", "li2017"))
    assert md[0] == ["method", "bits", "cifar10/resnet56", "cifar10/resnet56 paper", "cifar10/resnet56 Δ"]
    assert md[2][3:] == ["6.62", "-0.12"]


def test_ref_file_by_path_with_std_and_accuracy(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    make_run(runs, "bc", 1, 0, [1.5], model="mlp")
    ref = tmp_path / "mine.yaml"
    ref.write_text(yaml.safe_dump({"title": "mine", "metric": "test_acc",
                                   "columns": {"m": {"dataset": "mnist", "model": "mlp"}},
                                   "rows": [{"method": "bc", "bits": 1, "m": {"mean": 98.82, "std": 0.04}}]}))
    md = md_rows(render(runs, "md", "--ref", str(ref), "--alpha", "1"))
    assert md[2] == ["bc", "1", "**1.50 (1)**", "1.18 ± 0.04", "+0.32"]  # accuracy shown as error


@pytest.mark.parametrize("name", ["li2017", "bc2015", "wage2018"])
def test_shipped_reference_files_load(name: str) -> None:
    from qexp.report import reference

    ref = reference.load(name)
    assert ref.entries and all({"method", "bits", "dataset", "model"} <= set(e.keys) for e in ref.entries)
    assert reference.load(f"{name}.yaml").entries == ref.entries


def test_wage_reference_matches_its_tag(tmp_path: Path) -> None:
    make_run(tmp_path, "wage", "2-8-8-8", 0, [0.9, 0.6])
    rows = list(csv.DictReader(io.StringIO(render(tmp_path, "csv", "--ref", "wage2018", "--metric",
                                                  "best_test_error"))))
    assert rows[0]["bits"] == "2-8-8-8" and float(rows[0]["mnist/lenet5 paper"]) == pytest.approx(0.49)
    # without --metric the table shows what the paper published (the last epoch's error was set beside
    # the best epoch's: a Δ of +86.97 with only a note saying so)
    assert list(csv.DictReader(io.StringIO(render(tmp_path, "csv", "--ref", "wage2018")))) == rows


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--metric", "nope"], "unknown metric 'nope'"),
    (["--format", "xls"], "unknown format 'xls'"),
    (["--rows", "method,colour"], "unknown row/column key(s) colour"),
    (["--ref", "nosuchpaper"], "reference 'nosuchpaper' not found"),
    (["--ref", "li2017", "--metric", "wall_s"], "--ref needs --metric"),
    (["--ref", "wage2018", "--metric", "test_error"], "publishes best_test_error, another measure than --metric"),
    (["--ref", "li2017", "--metric", "best_test_error"], "use --metric test_error, or leave --metric out"),
])
def test_bad_table_input_is_one_clear_error(sweep: Path, capsys: pytest.CaptureFixture, args: list[str],
                                             message: str) -> None:
    assert qexp(["table", str(sweep), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_no_runs_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for cmd in ("table", "plot", "runs"):
        assert qexp([cmd, str(tmp_path)]) == 2
        assert "no runs found" in capsys.readouterr().err


def test_a_folder_that_cannot_be_read_is_named_not_left_out_silently(sweep: Path, capsys: pytest.CaptureFixture,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder the user may not list (another user's, on a shared disk) once vanished from tables and
    listings without a word ("no runs found" when it held them all): its runs are said to be left out.
    Refused through os.scandir, which os.walk lists with, so the test also holds for root."""
    hidden = sweep / "exp" / "mnist" / "lenet5" / "bc-1b"
    scandir = os.scandir

    def refuse(path: os.PathLike | str = ".") -> object:
        if Path(path) == hidden:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refuse)
    assert qexp(["runs", str(sweep)]) == 0
    out, err = capsys.readouterr()
    assert f"warning: cannot read {hidden} (Permission denied): the runs below it are left out" in err
    assert out.strip().splitlines()[-1].startswith("7 runs:")  # bc 1-bit's three seeds are not listed
    assert qexp(["table", str(hidden.parent)]) == 0  # its sibling folders still tabulate
    assert "warning: cannot read" in capsys.readouterr().err
    assert qexp(["table", str(hidden)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: no runs found below {hidden} (a run folder holds "
                                               f"metrics.json); cannot read {hidden} (Permission denied)")


# ---- runs ---------------------------------------------------------------------------------------
def test_runs_lists_every_run(sweep: Path, capsys: pytest.CaptureFixture) -> None:
    assert qexp(["runs", str(sweep)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 10 + 1  # header, ten runs, summary
    assert lines[-1] == "10 runs: 7 completed, 1 running, 1 diverged, 1 failed"
    failed = [ln for ln in lines if ln.startswith("failed")]
    assert len(failed) == 1 and "bc" in failed[0] and "CUDA out of memory" in failed[0]
    running = next(ln for ln in lines if ln.startswith("running"))
    assert "3/10" in running and "7.00%" in running and "updated" in running
    assert qexp(["runs", str(sweep), "--status", "failed,diverged"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 2 + 1


# ---- plots --------------------------------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png_of_requested_size(sweep: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fig" / "curves.png"
    assert qexp(["plot", str(sweep), "--out", str(out), "--size", "800x600"]) == 0
    assert png_size(out) == (800, 600) and out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "no allocation plot" in printed and "no accuracy-versus-bits plot" in printed
    assert qexp(["plot", str(sweep), "--metric", "train_loss"]) == 0  # default: DIR/plots/<metric>.png
    assert png_size(sweep / "plots" / "train_loss.png")[0] > 0
    assert qexp(["plot", str(sweep), "--metric", "nope"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err


def test_plot_learned_allocation_and_ptq_curves(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    layers = ["conv1", "conv2", "fc1", "fc2"]
    for seed, final in enumerate([[2, 3, 5, 6], [3, 3, 4, 6]]):
        hist = [{f"method/bits/{n}": float(b if e else 4) for n, b in zip(layers, final)}
                | {"method/tau": 1.0} for e in range(3)]
        make_run(runs, "learned", 4, seed, [3.0, 2.0, 1.5], extra_hist=hist,
                 extra={"allocation": "".join(map(str, final))})
    float_run = make_run(runs, "float", 32, 0, [1.0])
    write_json(float_run / "ptq.json", {"float_test_error": 1.0, "results": [
        {"bits": b, "act_bits": 8, "weights_only_error": 1.0 + d, "with_activations_error": 1.1 + d}
        for b, d in [(8, 0.0), (4, 0.3), (2, 40.0)]]})
    make_run(runs, "ptq", 8, 0, [1.0], extra={"ptq_bits": 8, "ptq_act_bits": None})
    out = tmp_path / "p.png"
    assert qexp(["plot", str(runs), "--out", str(out)]) == 0
    for p in (out, tmp_path / "p_alloc.png", tmp_path / "p_ptq.png"):
        assert p.stat().st_size > 10_000 and min(png_size(p)) >= 300
    assert "note" not in capsys.readouterr().out
    # the learned runs tabulate with their allocation as a row key
    g = grid_of(runs, rows="method,bits,allocation")
    assert ("learned", "4", "2356") in g.rows and ("learned", "4", "3346") in g.rows


def test_plot_legend_counts_seeds_and_runs_apart() -> None:
    """Two seeds under two learning rates were "float (4 seeds; diverged)"."""
    from qexp.report.plot import series_tag

    runs = [{"seed": s, "status": st}
            for s, st in ((0, "completed"), (1, "completed"), (0, "diverged"), (1, "completed"))]
    assert series_tag(runs) == " (2 seeds, 4 runs; diverged)"
    assert series_tag(runs[:2]) == " (2 seeds)" and series_tag(runs[:1]) == " (1 seed)"


def test_plot_ptq_series_keep_schemes_apart(tmp_path: Path) -> None:
    """Three seeds' ptq.json of different schemes and calibrations, and method=ptq runs of two schemes, in
    one panel: each scheme and calibration is its own series, never one mean (the table's rule, ptq_tag:
    the plot reads them through results.ptq_records)."""
    from qexp.report import plot

    runs = tmp_path / "runs"
    for seed, header in enumerate([{}, {"scheme": "symmetric-minmax-per-channel",
                                        "act_scheme": "symmetric-minmax-per-tensor"}, {"calib_batches": 1}]):
        write_json(make_run(runs, "float", 32, seed, [1.0]) / "ptq.json", {**header, "results": [
            {"bits": 4, "act_bits": 8, "weights_only_error": 2.0 + 10 * seed, "with_activations_error": 3.0 + seed}]})
    for seed, scheme in enumerate([None, "symmetric-minmax-per-channel"]):
        make_run(runs, "ptq", 4, seed, [5.0 + seed], extra={"ptq_bits": 4, "ptq_act_bits": None,
                                                              "ptq_scheme": scheme})
    points = plot.ptq_points(results.collect([runs]), ["method"], ["dataset"])
    assert points[("mnist", "float")] == {
        "weights only": {4: [98.0, 78.0]}, "+ 8-bit activations": {4: [97.0]},
        "weights only (symmetric-minmax-per-channel)": {4: [88.0]},
        "+ 8-bit activations (symmetric-minmax-per-channel symmetric-minmax-per-tensor)": {4: [96.0]},
        "+ 8-bit activations (calib1)": {4: [95.0]}}  # calibration does not touch the weights-only result
    assert points[("mnist", "method=ptq runs")] == {
        "weights only": {4: [95.0]}, "weights only (symmetric-minmax-per-channel)": {4: [94.0]}}


# ---- a real sweep -------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_sweep_becomes_a_table(tmp_path: Path, data_root: Path) -> None:
    """float and ste (2-bit activations) x seeds 0,1 on 2000 MNIST images, one epoch each, through
    ``qexp train --multirun``; then ``qexp table`` has 2 rows x 1 column with n=2 per cell. Measured:
    float 9.66 ± 2.03 % and ste 16.94 ± 3.27 % test error (ste with BatchNorm, its default; Welch
    p = 0.14) after one epoch on 2000 images; 64 s of CPU
    time in all (~35 s wall on 2 idle cores, several minutes when the machine is shared)."""
    run_qexp(["train", "--multirun", "method=float,ste", "seed=0,1", "epochs=1", "dataset.train_subset=2000",
              "eval_batch_size=2000", "name=sweep", f"out_root={tmp_path}", "progress=false"],
             env={"QEXP_DATA": str(data_root)})
    proc = run_qexp(["table", str(tmp_path / "sweep"), "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [(r["method"], r["bits"]) for r in rows] == [("float", "32"), ("ste", "2")]
    for r in rows:
        assert r["mnist/lenet5 n"] == "2" and "failed" not in r["mnist/lenet5 note"]
        assert 0 < float(r["mnist/lenet5 mean"]) < 40  # well below chance (90%) after one epoch
    listing = run_qexp(["runs", str(tmp_path)]).stdout.splitlines()
    assert listing[-1] == "4 runs: 4 completed"


# ---- paper presets ------------------------------------------------------------------------------
PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_records_its_grid(preset: str) -> None:
    """`qexp train +experiment=P --multirun` runs a whole grid into outputs/P: the preset sets `name`
    and a non-empty `hydra.sweeper.params`, and composes with the shipped config groups."""
    from hydra import compose, initialize_config_module

    from qexp.run.config import register

    register()
    with initialize_config_module("qexp.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={preset}"], return_hydra_config=True)
    assert cfg.name == preset
    params = cfg.hydra.sweeper.params
    assert params and all(str(v).strip() for v in params.values())


def test_a_cut_folder_level_is_not_parsed_for_key_values(tmp_path):
    """A level longer than the file system allows is cut and hashed (``..<digest>``); the cut text of a
    long ``init_from`` path once made ``--rows method.ste`` read ``cl..290aca9fbb``. Keys then come
    from the run's composed config; an uncut level is still read directly."""
    from omegaconf import OmegaConf

    from qexp.run.identity import differing

    long_name = "x" * 300  # (init_from is a checkpoint's sha1 prefix in a level now, no longer a path)
    cfg = OmegaConf.create({"dataset": {"dirname": long_name}, "method": {"ste": "clipped_relu"}, "epochs": 3})
    base = OmegaConf.create({"dataset": {"dirname": "imagenet"}, "method": {"ste": "identity"}, "epochs": 10})
    assert results.TRUNCATED.search(differing(cfg, base))
    # the real case: the cut fell inside an init_from path that itself named method.ste
    level = "epochs=3,init_from=%2Fruns%2Fdataset.train_subset=10000,epochs=3,method.ste=cl..290aca9fbb"
    rows = []
    for i, (text, ste) in enumerate([(level, "identity"), ("epochs=3,method.ste=relu", "relu")]):
        run = tmp_path / f"run{i}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"method": {"ste": ste}}))
        rows.append({"overrides": text, "run_dir": str(run)})
    import pandas as pd

    df = results.with_keys(pd.DataFrame(rows), ["method.ste"])
    assert list(df["method.ste"]) == ["identity", "relu"]


# ---- report targets never replace a run's files --------------------------------------------------
def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_table_out_refuses_a_run_folder_and_run_files(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--out inside a run folder (its metrics.json, checkpoint.pt, a new file there or below) or an
    existing run file outside one: one line, exit 2, the run's files byte for byte; another existing
    file of the user's is replaced, as asked, unless it is write-protected (table and plot alike)."""
    run = sweep / "exp" / "mnist" / "lenet5" / "bc-1b" / "seed0"
    (run / "checkpoint.pt").write_bytes(b"weights")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    for target, fmt in [(run / "metrics.json", "md"), (run / "checkpoint.pt", "csv"), (run / "t.md", "md"),
                        (run / "sub" / "t.csv", "csv")]:
        assert qexp(["table", str(sweep), "--format", fmt, "--out", str(target)]) == 2
        assert "is inside the run folder" in _one_error_line(capsys)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before and not (run / "sub").exists()
    stray = tmp_path / "elsewhere" / "ptq.json"
    stray.parent.mkdir()
    stray.write_text("{}")
    assert qexp(["table", str(sweep), "--format", "csv", "--out", str(stray)]) == 2
    assert "a file qexp runs write" in _one_error_line(capsys) and stray.read_text() == "{}"
    mine = tmp_path / "elsewhere" / "table.md"
    mine.write_text("old table")
    assert qexp(["table", str(sweep), "--out", str(mine)]) == 0 and mine.read_text().startswith("*")
    if os.geteuid() == 0:  # root may write any file (as its shell's `>` would): the rule for everyone else
        monkeypatch.setattr(os, "access", lambda p, mode: not mode & os.W_OK or bool(os.stat(p).st_mode & 0o200))
    for cmd, kept in (("table", tmp_path / "elsewhere" / "kept.md"), ("plot", tmp_path / "elsewhere" / "kept.png")):
        kept.write_text("keep me")
        kept.chmod(0o444)  # write-protected: kept
        assert qexp([cmd, str(sweep), "--out", str(kept)]) == 2
        assert "is write-protected" in _one_error_line(capsys) and kept.read_text() == "keep me"
    monkeypatch.undo()
    # a link, a FIFO, a folder: the atomic rename replaced them (as root, --out /dev/full became a file)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "target.md").write_text("linked")
    (odd / "link.md").symlink_to(odd / "target.md")
    (odd / "link.png").symlink_to(odd / "target.md")
    os.mkfifo(odd / "fifo.md")
    (odd / "dir.md").mkdir()
    for cmd, target, why in (("table", odd / "link.md", "is a link"), ("plot", odd / "link.png", "is a link"),
                             ("table", odd / "fifo.md", "not a regular file"),
                             ("table", odd / "dir.md", "not a regular file")):
        assert qexp([cmd, str(sweep), "--out", str(target)]) == 2
        assert why in _one_error_line(capsys), (cmd, target)
    assert (odd / "link.md").is_symlink() and (odd / "link.png").is_symlink()
    assert (odd / "target.md").read_text() == "linked"
    assert stat.S_ISFIFO((odd / "fifo.md").stat().st_mode)
    assert qexp(["table", str(sweep), "--out", str(tmp_path / "t.png")]) == 2  # once the terminal table
    assert "--format FORMAT" in _one_error_line(capsys) and not (tmp_path / "t.png").exists()
    assert qexp(["table", str(sweep), "--format", "md", "--out", str(tmp_path / "t.markdown")]) == 0
    long = tmp_path / "new" / f"{'a' * 250}.md"  # a valid name (253 bytes): its temporary file once was not
    assert qexp(["table", str(sweep), "--out", str(long)]) == 0 and long.is_file()
    too_long = tmp_path / "new2" / "deeper" / f"{'a' * 300}.md"
    assert qexp(["table", str(sweep), "--out", str(too_long)]) == 2
    assert "File name too long" in _one_error_line(capsys) and not (tmp_path / "new2").exists()  # no folder left


def test_plot_never_replaces_a_side_figure_it_did_not_write(sweep: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """--out X.png: X_ptq.png / X_alloc.png the user did not name are replaced only when qexp plot
    wrote them (its PNG Software chunk); a foreign one is one line, exit 2, nothing drawn. --out inside
    a run folder is refused like qexp table's."""
    from qexp.report.plot import written_by_qexp

    run_plot = tmp_path / "runs" / "exp" / "mnist" / "lenet5" / "float-32b" / "seed0" / "x.png"
    make_run(tmp_path / "runs", "float", 32, 0, [1.0])
    assert qexp(["plot", str(sweep), "--out", str(run_plot)]) == 2
    assert "is inside the run folder" in _one_error_line(capsys) and not run_plot.exists()
    out = tmp_path / "fig" / "X.png"
    out.parent.mkdir()
    side = out.parent / "X_ptq.png"
    side.write_bytes(b"my own figure")
    assert qexp(["plot", str(sweep), "--out", str(out)]) == 2
    assert "X_ptq.png exists and was not written by qexp plot" in _one_error_line(capsys)
    assert side.read_bytes() == b"my own figure" and not out.exists()
    side.unlink()
    assert qexp(["plot", str(sweep), "--out", str(out)]) == 0 and written_by_qexp(out)
    shutil.copyfile(out, side)  # a figure qexp plot wrote is qexp's to replace
    assert qexp(["plot", str(sweep), "--out", str(out)]) == 0
    # no --out: DIR/plots/<metric>.png is not named by the user either (it was replaced whatever it was)
    sweep_copy = tmp_path / "sweep_copy"
    shutil.copytree(sweep, sweep_copy)
    (sweep_copy / "plots").mkdir(exist_ok=True)
    default = sweep_copy / "plots" / "test_error.png"
    default.write_bytes(b"my own figure")
    assert qexp(["plot", str(sweep_copy)]) == 2
    assert "test_error.png exists and was not written by qexp plot" in _one_error_line(capsys)
    assert default.read_bytes() == b"my own figure"
    default.unlink()
    assert qexp(["plot", str(sweep_copy)]) == 0 and written_by_qexp(default)
    assert qexp(["plot", str(sweep_copy)]) == 0  # its own figure, replaced


@pytest.mark.parametrize("edit", [{"test_error": "abc"}, {"status": 5}, {"wall_s": "x"}, {"history": [1, 2]}],
                         ids=["error_text", "status_number", "wall_text", "history_numbers"])
def test_a_hand_edited_record_is_a_failed_run_not_a_traceback(tmp_path: Path, edit: dict, capsys) -> None:
    """A metrics.json object with a value of the wrong type was a ValueError/TypeError traceback in
    ``qexp table``, ``runs`` and ``plot``; the run is listed as failed with the reason, the others count."""
    import json

    from qexp.report import plot, runs, table

    good = make_run(tmp_path / "out", "bc", 1, 0, [6.0, 2.0])
    bad = make_run(tmp_path / "out", "bc", 1, 1, [6.0, 3.0])
    rec = json.loads((bad / "metrics.json").read_text())
    (bad / "metrics.json").write_text(json.dumps({**rec, **edit}))
    by_dir = {Path(r["run_dir"]): r for r in results.collect([tmp_path / "out"]).to_dict("records")}
    assert by_dir[bad]["status"] == "failed" and "not a" in by_dir[bad]["error"], by_dir[bad]
    assert by_dir[good]["status"] == "completed"
    table.main([str(tmp_path / "out")])
    runs.main([str(tmp_path / "out")])
    plot.main([str(tmp_path / "out"), "--out", str(tmp_path / "curves.png")])
    out = capsys.readouterr().out
    assert "2.00 (1)" in out or "2.00" in out


def test_a_reference_file_that_is_not_yaml_is_one_line(tmp_path: Path) -> None:
    """``--ref FILE`` with a YAML syntax error printed the parser's five-line message (text and caret)."""
    from qexp.errors import QexpError
    from qexp.report import reference

    bad = tmp_path / "ref.yaml"
    bad.write_text("a: [b\n")
    with pytest.raises(QexpError) as e:
        reference.load(str(bad))
    assert "\n" not in str(e.value) and "not valid YAML at line 2, column 1" in str(e.value), str(e.value)
