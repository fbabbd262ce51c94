"""docs/extending.md's worked example, a ternary-weight method kept outside the package
(docs/examples/ternary/: ternary.py and method/ternary.yaml): the page shows excerpts of those files
(checked here), the method passes qexp.testing.check_method, and `qexp train --config-dir` trains it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from qexp.testing import check_method
from tests.conftest import find_runs, read_metrics, run_qexp

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "extending.md"
EXAMPLE = REPO / "docs" / "examples" / "ternary"
BLOCK = re.compile(r"^```(\w+) file=(\S+)\n(.*?)^```$", re.M | re.S)

pytestmark = pytest.mark.usefixtures("one_thread")


def env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(EXAMPLE), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}


def test_the_pages_code_is_excerpts_of_the_example_files():
    blocks = BLOCK.findall(PAGE.read_text())
    assert {name for _, name, _ in blocks} == {"docs/examples/ternary/method/ternary.yaml",
                                               "docs/examples/ternary/ternary.py"}
    for _, name, body in blocks:
        assert body in (REPO / name).read_text(), f"extending.md's excerpt of {name} is not in the file"


def test_the_example_passes_check_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))  # importable, as PYTHONPATH makes it for qexp train
    report = check_method(EXAMPLE / "method" / "ternary.yaml", workdir=tmp_path)
    assert report.passed == ["train", "resume", "manifest", "state_dict", "export"]
    assert (report.method, report.bits, report.quantized_layers) == ("ternary", 2, 4)
    assert report.export == "4 tensors as integer codes"


def test_qexp_trains_the_example_from_a_config_dir(tmp_path: Path):
    out = tmp_path / "out"
    run_qexp(["train", "--config-dir", str(EXAMPLE), "method=ternary", "dataset=synthetic", f"out_root={out}",
              "progress=false"], cwd=tmp_path, env=env())
    (run,) = find_runs(out)
    assert run.name == "seed0" and run.parent.name == "ternary"
    m = read_metrics(run)
    assert m["status"] == "completed" and m["method"] == "ternary" and m["bits"] == 2
    q = json.loads((run / "quant.json").read_text())
    assert q["method"] == "ternary" and q["weight_bytes"] < q["float32_bytes"]
    assert [r["name"] for r in q["layers"]] == ["features.0", "features.3", "classifier.1", "classifier.3"]
    assert all(r["kind"] == "ternary" and r["code_range"] == [-1, 1] and r["step"] > 0 for r in q["layers"])


def test_bits_outside_the_methods_range_is_one_line_before_training(tmp_path: Path):
    """The base class's range check reaches the user as one line (exit 2); nothing trains, no folder."""
    out = tmp_path / "bad"
    proc = run_qexp(["train", "--config-dir", str(EXAMPLE), "method=ternary", "bits=3", "dataset=synthetic",
                     f"out_root={out}"], cwd=tmp_path, env=env(), check=False)
    assert proc.returncode == 2
    assert "method=ternary cannot use bits=3; allowed: 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # rejected before any run folder exists
