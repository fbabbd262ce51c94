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
    for opt in (REPO / "configs" / "method").glob("*.yaml"):
        assert f"`{opt.stem}`" in readme, f"method {opt.stem} is not documented in the README"
    for group in ("dataset", "model", "optim", "sched"):
        for opt in (REPO / "configs" / group).glob("*.yaml"):
            assert f"`{opt.stem}`" in readme, f"{group}={opt.stem} is not documented in the README"


def test_wheel_ships_every_config(tmp_path):
    """A plain `pip install .` must carry configs/ as qexp.configs (Hydra reads them from the package)."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # a copy, so the build leaves nothing behind in the checkout
    for d in ("qexp", "configs"):
        shutil.copytree(REPO / d, src / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("qexp-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {f"qexp/{p.relative_to(REPO)}" for p in (REPO / "configs").rglob("*.yaml")}
    assert expected <= shipped, sorted(expected - shipped)
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in zipfile.ZipFile(wheel).namelist()
                if n.endswith("__init__.py")}
    in_tree = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "qexp").rglob("__init__.py")}
    assert in_tree <= packages, f"packages missing from pyproject.toml: {sorted(in_tree - packages)}"


def test_tab_completion_passes_through_to_hydra():
    proc = run_qexp(["-sc", "query=bash"], env={"COMP_LINE": "qexp train method=s", "COMP_POINT": "19"})
    assert "method=sr" in proc.stdout.split()
