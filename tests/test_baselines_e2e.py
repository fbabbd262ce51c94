"""End to end on real MNIST: `qexp train +experiment=baselines_mnist method=M bits=2 seed=0` (LeNet-5 with
BN, the first 4000 training images, 2 epochs, W/A 2/2), one run per method, about a minute of one core
each on a quiet machine.

Thresholds: derived from the three seeds measured for docs/reproductions.md ("Modern baselines") by
:func:`tests.conftest.seed_floor` (the lowest, minus three standard deviations and half a point, rounded
down to a tenth): lsq 96.1, pact 95.1, dorefa 94.8."""

from __future__ import annotations

import json

import pytest

from tests.conftest import find_runs, read_metrics, run_qexp, seed_floor

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

#: method -> measured test accuracies in % of seeds 0, 1, 2
MEASURED = {
    "lsq": (97.11, 97.08, 96.93),
    "pact": (97.00, 96.45, 96.65),
    "dorefa": (96.42, 96.01, 96.22),
}


@pytest.mark.parametrize("method", sorted(MEASURED))
def test_mnist_w2a2_accuracy(tmp_path, data_root, method):
    run_qexp(["train", "+experiment=baselines_mnist", f"method={method}", "bits=2", "seed=0",
              f"out_root={tmp_path}", f"data_root={data_root}"])
    (run_dir,) = find_runs(tmp_path)
    assert run_dir.parts[-2] == f"{method}-w2a2"
    m = read_metrics(run_dir)
    threshold = seed_floor(MEASURED[method])
    assert m["status"] == "completed" and m["test_acc"] >= threshold, m["test_acc"]
    man = json.loads((run_dir / "quant.json").read_text())
    assert man["method"] == method and man["bits"] == 2 and man["activation_bits"] == 2

