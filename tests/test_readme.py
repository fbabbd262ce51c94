"""The README's set-up commands, `.ci/run`, `qexp --help` and the config groups stay in sync."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_qexp

REPO = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("```bash")
    end = lines.index("```", start + 1)
    return lines[start + 1 : end]


def test_readme_opens_with_exactly_two_setup_commands():
    cmds = setup_commands()
    assert len(cmds) == 2
    assert "qexp train" in cmds[0] and "pip install" in cmds[0]
    assert "pytest" in cmds[1] and "pip install" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert setup_commands()[1] in ci.splitlines()
    assert "QEXP_DATA" in ci


def test_help_lists_subcommands_and_groups():
    top = run_qexp(["--help"]).stdout
    for cmd in ("train", "eval"):
        assert cmd in top
    train_help = run_qexp(["train", "--help"]).stdout
    for group in ("dataset", "model", "method", "optim", "sched"):
        assert f"{group}:" in train_help or f"{group}/" in train_help or group in train_help
    readme = (REPO / "README.md").read_text()
    for opt in (REPO / "qexp" / "configs" / "method").glob("*.yaml"):
        assert f"`{opt.stem}`" in readme, f"method {opt.stem} is not documented in the README"
    for group in ("dataset", "model", "optim", "sched"):
        for opt in (REPO / "qexp" / "configs" / group).glob("*.yaml"):
            assert f"`{opt.stem}`" in readme, f"{group}={opt.stem} is not documented in the README"
