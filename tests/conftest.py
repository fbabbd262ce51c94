"""Shared fixtures: the real-data root, and running ``qexp`` as a user does (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data"  # qexp's own default (./data) when QEXP_DATA is unset


def data_root_path() -> Path:
    """Absolute: a relative ``QEXP_DATA`` (as the README's test command sets it) is relative to where
    pytest was started, and tests link to it from (or run subprocesses in) other folders."""
    return Path(os.environ.get("QEXP_DATA", DEFAULT_DATA)).resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets ($QEXP_DATA, else ./data). Missing data FAILS the test, never skips it."""
    root = data_root_path()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"real data not found at {root}: set QEXP_DATA to the folder holding MNIST/raw")
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that reads the real datasets (through the ``data_root`` fixture, directly or not)
    carries the ``real_data`` marker, so ``-m "not real_data"`` is the suite without ``$QEXP_DATA``."""
    for item in items:
        if "data_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)


def run_qexp(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
             check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``qexp ARGS`` in a subprocess (the console script's module, so the venv's qexp is used)."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "qexp.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_drivers(specs: list[Path], timeout: float) -> dict:
    """Run ``python -m tests.kill_driver SPEC`` for every spec side by side (one per core, one thread each)
    and merge their ``KILL-MATRIX`` reports."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests.kill_driver", str(spec)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for spec in specs]
    report: dict = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("KILL-MATRIX ")]
        assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
        report.update(json.loads(lines[0][len("KILL-MATRIX "):]))
    return report


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def find_runs(root: Path) -> list[Path]:
    """Every run folder (one holding metrics.json) below ``root``, sorted."""
    return sorted(p.parent for p in root.rglob("metrics.json"))


def compose_train(overrides: list[str]):
    """Compose ``train.yaml`` with overrides, as ``qexp train`` would (without running anything)."""
    from hydra import compose, initialize_config_module

    from qexp.run.config import register

    register()
    with initialize_config_module(config_module="qexp.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One math thread, here and in `qexp` subprocesses: on a busy 2-core machine oversubscribed OpenMP
    threads are many times slower, and one thread keeps in-process and subprocess runs bit-equal."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
