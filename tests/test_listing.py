"""``qexp runs --where/--sort`` (the same filter as table and plot), ``qexp --version``, and
``qexp train --help`` listing only the groups a run chooses from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qexp.cli import main as qexp
from tests.conftest import run_qexp
from tests.test_results import make_run, render


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "out"
    make_run(root, "float", 32, 0, [3.0, 1.0])
    make_run(root, "float", 32, 1, [1.5])
    make_run(root, "bc", 1, 0, [5.0, 2.5])
    make_run(root, "sr", 1, 0, [9.0, 4.0])
    make_run(root, "sr", 1, 1, [8.0], status="running", epochs=5)
    make_run(root, "r", 1, 0, [], status="failed", error="boom")
    return root


def listed(capsys: pytest.CaptureFixture, *args: str) -> list[dict[str, str]]:
    """The listing's rows as {column: text}, cut at the header's column starts (cells are padded)."""
    capsys.readouterr()
    assert qexp(["runs", *args]) == 0
    header, *lines, _summary = capsys.readouterr().out.rstrip().splitlines()
    names = [n for n in re.split(r"\s{2,}", header) if n]
    starts = [header.index(n) for n in names] + [None]
    return [{n: ln[a:b].strip() for n, a, b in zip(names, starts, starts[1:])} for ln in lines]


def test_runs_where_matches_table_where(runs: Path, capsys: pytest.CaptureFixture) -> None:
    lines = listed(capsys, str(runs), "--where", "method=float,sr")
    assert [ln["method"] for ln in lines] == ["float", "float", "sr", "sr"]
    csv_text = render(runs, "csv", "--where", "method=float,sr")  # the same runs in the table
    assert [r.split(",")[0] for r in csv_text.splitlines()[1:]] == ["float", "sr"]
    lines = listed(capsys, str(runs), "--where", "bits=1", "--where", "seed=0")
    assert [ln["method"] for ln in lines] == ["bc", "sr", "r"]


def test_runs_sort_puts_the_best_first_and_missing_last(runs: Path, capsys: pytest.CaptureFixture) -> None:
    lines = listed(capsys, str(runs), "--sort", "test_error")
    assert [ln["test error"] for ln in lines] == ["1.00%", "1.50%", "2.50%", "4.00%", "8.00%", "—"]
    lines = listed(capsys, str(runs), "--sort", "test_acc")  # higher is better: the same order
    assert [ln["test accuracy (%)"] for ln in lines][:2] == ["99.00%", "98.50%"]  # shown in its own column
    best = listed(capsys, str(runs), "--sort", "best_test_error", "--where", "method=sr")
    assert [ln["best test error (%)"] for ln in best] == ["4.00%", "8.00%"]


@pytest.mark.parametrize("args,message", [
    (["--sort", "nosuch"], "unknown metric 'nosuch'"),
    (["--where", "method"], "--where takes KEY=VALUE"),
    (["--where", "method=lsq"], "no runs left after --where method=lsq"),
])
def test_runs_bad_options_are_one_line(runs: Path, args: list[str], message: str,
                                       capsys: pytest.CaptureFixture) -> None:
    assert qexp(["runs", str(runs), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_version(capsys: pytest.CaptureFixture) -> None:
    import qexp as pkg

    assert qexp(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qexp {pkg.__version__}"


def test_train_help_hides_internal_groups() -> None:
    out = run_qexp(["train", "--help"]).stdout
    listing = out.split("== Config groups (pick one with group=option) ==")[1].split("==")[0]
    groups = [ln.split(":")[0] for ln in listing.splitlines() if ln.strip()]
    assert {"dataset", "model", "method", "optim", "sched"} <= set(groups)
    assert "reference" not in groups and not any(g.startswith("hydra") for g in groups)
    methods = next(ln for ln in listing.splitlines() if ln.startswith("method: "))[len("method: "):].split(", ")
    assert {"bc", "float", "sr"} <= set(methods) and methods == sorted(methods)


@pytest.mark.parametrize("args,message", [
    (["frobnicate"], "error: qexp: unknown command 'frobnicate'; the commands are train, eval, table"),
    (["table", "DIR", "--bogus"], "error: qexp table: unrecognized arguments: --bogus (qexp table --help)"),
    (["export", "DIR", "--format", "xyz"], "error: qexp export: argument --format: invalid choice: 'xyz'"),
    (["eval"], "error: qexp eval: the following arguments are required: run_dir"),
    (["runs", "DIR", "--digits"], "error: qexp runs: unrecognized arguments: --digits"),
    (["plot", "DIR", "--dpi", "x"], "error: qexp plot: argument --dpi: invalid int value: 'x'"),
    (["plot", "DIR", "--dpi", "100000"], "error: --dpi must be 10..1000, got 100000"),  # was out of memory
    # an empty path was the current folder: `qexp plot ""` wrote ./plots
    *[([cmd, ""], f"error: qexp {cmd}: argument {arg}: an empty path names nothing")
      for cmd, arg in (("plot", "DIR"), ("runs", "DIR"), ("table", "DIR"), ("eval", "run_dir"),
                       ("export", "run_dir"))],
    (["table", "DIR", "--out", ""], "error: qexp table: argument --out: an empty path names nothing"),
])
def test_bad_arguments_of_every_command_are_one_line(runs: Path, args: list[str], message: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    """argparse's usage block plus error is one line (exit 2) in every subcommand, as qexp's own errors."""
    args = [str(runs) if a == "DIR" else a for a in args]
    try:
        code = qexp(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_file_the_user_may_not_read_is_one_line(tmp_path: Path, command: str, monkeypatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    """An unreadable metrics.json (``chmod 000``, for a user who is not root) was a PermissionError
    traceback in eval and export: the file and why, in one line, exit 2, nothing written."""
    from qexp.run import record

    run_qexp(["train", "dataset=synthetic", "dataset.train_subset=64", "batch_size=32", "model=mlp",
              "model.width=16", "model.depth=1", "progress=false", "device=cpu", f"out_root={tmp_path}"])
    (run,) = (p.parent for p in tmp_path.rglob("metrics.json"))
    before = sorted(p.name for p in run.iterdir())

    def denied(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(record, "read_json", denied)
    code = qexp([command, str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {run / 'metrics.json'}: Permission denied\n", err
    assert sorted(p.name for p in run.iterdir()) == before
