"""docs/extending.md's worked example is itself a test: its config, method and test files are taken from
the page's marked code blocks, its own test passes, and `qexp train --config-dir` trains with it."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import find_runs, read_metrics, run_qexp

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "extending.md"
BLOCK = re.compile(r"^```(\w+) file=(\S+)\n(.*?)^```$", re.M | re.S)


def example_files() -> dict[str, str]:
    return {name: body for _, name, body in BLOCK.findall(PAGE.read_text())}


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extending")
    for name, body in example_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    return root


def env_for(root: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def test_example_is_config_class_and_test_in_under_100_lines():
    files = example_files()
    assert set(files) == {"configs/method/pow2.yaml", "pow2_method.py", "test_pow2.py"}
    assert sum(len(body.splitlines()) for body in files.values()) < 100


def test_the_examples_own_test_passes(example: Path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_pow2.py"],
                          cwd=example, env={**os.environ, **env_for(example)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


def test_qexp_trains_the_example_from_a_config_dir(example: Path):
    out = example / "out"
    run_qexp(["train", "--config-dir", str(example / "configs"), "method=pow2", "bits=3", "dataset=synthetic",
              f"out_root={out}", "progress=false"], cwd=example, env=env_for(example))
    (run,) = find_runs(out)
    assert run.name == "seed0" and run.parent.name == "pow2-3b"
    m = read_metrics(run)
    assert m["status"] == "completed" and m["method"] == "pow2" and m["bits"] == 3
    assert 0.0 <= m["history"][-1]["method/zero_frac"] < 1.0
    q = json.loads((run / "quant.json").read_text())
    assert q["method"] == "pow2" and q["weight_bytes"] < q["float32_bytes"]
    assert [r["name"] for r in q["layers"]] == ["features.0", "features.3", "classifier.1", "classifier.3"]
    for r in q["layers"]:
        mags = [v for v in r["levels"] if v > 0]
        assert r["bits"] == 3 and 1 <= len(mags) <= 3
        assert all(v == 2.0 ** round(math.log2(v)) for v in mags), r["levels"]


def test_bits_outside_the_methods_range_is_one_line_before_training(example: Path):
    """The base class's range check reaches the user as one line (exit 2); nothing trains, no folder."""
    out = example / "bad"
    proc = run_qexp(["train", "--config-dir", str(example / "configs"), "method=pow2", "bits=1",
                     "dataset=synthetic", f"out_root={out}"], cwd=example, env=env_for(example), check=False)
    assert proc.returncode == 2
    assert "method=pow2 cannot use bits=1; allowed: 2..8" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # rejected before any run folder exists
