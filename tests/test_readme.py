"""The README, docs/, `.ci/run`, `qexp --help` and the config groups stay in sync."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

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


GROUPS = ("dataset", "model", "method", "optim", "sched")


def options(group: str) -> set[str]:
    return {p.stem for p in (REPO / "configs" / group).glob("*.yaml")}


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def test_help_lists_subcommands_and_every_group_option():
    top = run_qexp(["--help"]).stdout
    for cmd in ("train", "eval", "table", "plot", "runs"):
        assert cmd in top
    train_help = run_qexp(["train", "--help"]).stdout
    listed = dict(line.split(": ", 1) for line in train_help.splitlines()
                  if ": " in line and line.split(": ", 1)[0] in (*GROUPS, "experiment"))
    for group in (*GROUPS, "experiment"):
        assert group in listed, f"`qexp train --help` lists no group {group}"
        assert set(listed[group].split(", ")) == options(group), group


def readme_table_row(text: str, first_cell: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"{len(rows)} table rows start with {first_cell}"
    return rows[0]


def test_group_tables_list_every_option():
    """The README's group table and docs/configuration.md's list every option of every group."""
    for page in (REPO / "README.md", REPO / "docs" / "configuration.md"):
        text = page.read_text()
        for group in GROUPS:
            row = readme_table_row(text, f"`{group}`")
            for opt in options(group):
                assert f"`{opt}`" in row, f"{group}={opt} is missing from {page.name}'s group table"


def test_readme_lists_every_preset():
    readme = (REPO / "README.md").read_text()
    for preset in options("experiment"):
        readme_table_row(readme, f"`{preset}`")


def test_every_method_option_is_documented():
    """Each method has a row in the README's method table, and each of its config keys (``method.KEY``)
    is explained somewhere in the README or docs/."""
    readme = (REPO / "README.md").read_text()
    text = "\n".join(p.read_text() for p in doc_pages())
    method_rows = [line for line in readme.splitlines() if line.startswith("| `") and "docs/methods/" in line]
    for f in sorted((REPO / "configs" / "method").glob("*.yaml")):
        assert any(f"`{f.stem}`" in row for row in method_rows), f"method {f.stem} has no README row"
        keys = yaml.safe_load(f.read_text())["method"]
        undocumented = [k for k in keys if k not in ("_target_", "name", "tag", "bits")
                        and f"method.{k}" not in text]
        assert not undocumented, f"method={f.stem}: options not documented in docs/: {undocumented}"


def test_every_top_level_knob_is_documented():
    """Each key of the typed schema (``qexp.run.config.TrainConfig``, nested ones as ``parent.key``) has a
    row in docs/configuration.md's knob table."""
    import dataclasses

    from qexp.run.config import TrainConfig

    text = (REPO / "docs" / "configuration.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]

    def keys(cls: type, prefix: str = "") -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            if f.name in GROUPS:
                continue
            nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            out += keys(nested, f"{prefix}{f.name}.") if dataclasses.is_dataclass(nested) else [prefix + f.name]
        return out

    undocumented = [k for k in keys(TrainConfig) if not any(f"`{k}`" in row.split(" | ")[0] for row in rows)]
    assert not undocumented, f"knobs missing from docs/configuration.md: {undocumented}"


def test_readme_is_short():
    assert len((REPO / "README.md").read_bytes()) <= 10_240, "README.md over 10 KB: move detail into docs/"


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_point_at_existing_files_and_headings():
    link = re.compile(r"\]\(([^)\s]+)\)")
    checked = 0
    for page in doc_pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in link.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.relative_to(REPO)} links to missing {target}"
            assert REPO in dest.parents or dest == REPO, f"{page.relative_to(REPO)} links outside the repo: {target}"
            if anchor and dest.suffix == ".md":
                heads = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)}
                assert anchor in heads, f"{page.relative_to(REPO)}: no heading #{anchor} in {path or page.name}"
            checked += 1
    assert checked > 20


def test_docs_name_files_and_modules_that_exist():
    """Paths (`qexp/run/engine.py`, `configs/...`) and dotted names (`qexp.quant.inject.replace_modules`)
    in the README and docs/ prose resolve, so the pages follow the code when files move."""
    import importlib

    paths = re.compile(r"(?<![\w/.$-])((?:qexp|configs|scripts|tests|docs)/[\w./-]*)")
    names = re.compile(r"(?<![\w/.])(qexp(?:\.\w+)+)")
    missing, seen = [], 0
    for page in doc_pages():
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for p in paths.findall(text):
            p = p.rstrip(".").split("::")[0]
            seen += 1
            if not re.search(r"[A-Z]{3,}", p) and not (REPO / p).exists():  # NAME, PAPER: placeholders
                missing.append(f"{page.relative_to(REPO)}: {p}")
        for n in set(names.findall(text)):
            seen += 1
            mod, attrs = n, []
            while mod:
                try:
                    obj = importlib.import_module(mod)
                    break
                except ModuleNotFoundError:
                    mod, _, attr = mod.rpartition(".")
                    attrs.insert(0, attr)
            try:
                for a in attrs:
                    obj = getattr(obj, a)
            except AttributeError:
                missing.append(f"{page.relative_to(REPO)}: {n}")
    assert seen > 30
    assert not missing, "\n".join(missing)


def repo_text_files() -> list[Path]:
    """The files git tracks or would track; a copy without git's folder (the GPU machine's) skips."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the repository's file list comes from git")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    return [REPO / f for f in out if (REPO / f).is_file()]


def test_nothing_points_at_the_development_folders():
    """Users have only the repository: no file may send them to ../shared or its design notes (the README's
    two set-up commands and .ci/run fall back to a data folder beside the checkout: the one exception)."""
    pattern = re.compile(r"\.\./shared|shared/data|METHODS\.md|DESIGN\.md")
    allowed = set(setup_commands())
    hits = []
    files = repo_text_files()
    assert REPO / "README.md" in files
    for f in files:
        if f == REPO / ".ci" / "run" or f == Path(__file__).resolve():
            continue
        try:
            lines = f.read_text().splitlines()
        except UnicodeDecodeError:
            continue
        hits += [f"{f.relative_to(REPO)}:{i}: {line.strip()}" for i, line in enumerate(lines, 1)
                 if pattern.search(line) and line not in allowed]
    assert not hits, "\n".join(hits)


def test_wheel_ships_every_config(tmp_path):
    """A plain `pip install .` must carry configs/ as qexp.configs (Hydra reads them from the package)."""
    import importlib.util
    import shutil
    import sys
    import zipfile

    def ignore(folder: str, names: list[str]) -> list[str]:  # and a qexp/configs link to ../configs (what
        return [n for n in names if n == "__pycache__"  # scripts/device/gpu_check.sh makes on the GPU machine)
                or (n == "configs" and (Path(folder) / n).is_symlink())]

    src = tmp_path / "src"  # a copy, so the build leaves nothing behind in the checkout
    for d in ("qexp", "configs"):
        shutil.copytree(REPO / d, src / d, ignore=ignore)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    # the environment's setuptools when it has one (a venv of Python 3.12+ has none: pip's isolated build
    # fetches it from the package registry)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("qexp-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml")}
    expected = {f"qexp/{p.relative_to(REPO)}" for p in (REPO / "configs").rglob("*.yaml")}
    assert expected <= shipped, sorted(expected - shipped)
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in zipfile.ZipFile(wheel).namelist()
                if n.endswith("__init__.py")}
    in_tree = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "qexp").rglob("__init__.py")}
    assert in_tree <= packages, f"packages missing from pyproject.toml: {sorted(in_tree - packages)}"


def test_tab_completion_passes_through_to_hydra(tmp_path):
    def complete(line: str) -> list[str]:
        return run_qexp(["-sc", "query=bash"], env={"COMP_LINE": line, "COMP_POINT": str(len(line))}).stdout.split()

    assert {"method=sr", "method=ste"} <= set(complete("qexp train method=s"))
    # the first word is a command (it offered train's overrides); train hides reference/ (data for
    # `qexp table --ref`, not a choice of a run); the other commands complete paths (their run folders)
    assert complete("qexp ") == ["train", "eval", "table", "plot", "export", "runs"]
    assert complete("qexp ta") == ["table"]
    assert complete("qexp train re") == ["resume="] and complete("qexp train +ref") == []
    (tmp_path / "outputs").mkdir()
    assert complete(f"qexp table {tmp_path}/out") == [f"{tmp_path}/outputs/"]
