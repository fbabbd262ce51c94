"""``qexp export``: integer codes + per-layer scales + quant.json, loaded back with plain PyTorch in a
process that never imports qexp, reproducing the run's recorded test error exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import find_runs, read_metrics, run_qexp

ENV = {"OMP_NUM_THREADS": "1"}

# Runs in a fresh interpreter with qexp off the path: LeNet-5 rebuilt in plain torch, the export's own
# load_export.py, MNIST's test files read and normalised by hand as quant.json describes.
STANDALONE = r'''
import gzip, json, os, sys
import torch
from torch import nn

export, raw = sys.argv[1], sys.argv[2]
sys.path.insert(0, export)
from load_export import load_state_dict, read_manifest

def idx(name):
    path = os.path.join(raw, name)
    data = gzip.open(path + ".gz").read() if os.path.exists(path + ".gz") else open(path, "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)

manifest = read_manifest(export)
kw = manifest["model"]["kwargs"]
assert manifest["model"]["name"] == "lenet5" and not kw["bn"]
side = ((kw["image_size"] - 4) // 2 - 4) // 2
model = nn.Module()
model.features = nn.Sequential(nn.Conv2d(kw["in_channels"], 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2))
model.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 512), nn.ReLU(),
                                 nn.Linear(512, kw["num_classes"]))
model.forward = lambda x: model.classifier(model.features(x))
model.load_state_dict(load_state_dict(export))
model.eval()

x, y = idx("t10k-images-idx3-ubyte").unsqueeze(1), idx("t10k-labels-idx1-ubyte").long()
norm = manifest["input"]["normalize"]
mean = torch.tensor(norm["mean"]).view(1, -1, 1, 1)
std = torch.tensor(norm["std"]).view(1, -1, 1, 1)
wrong = 0
with torch.no_grad():
    for i in range(0, len(y), 1000):
        xb = x[i:i + 1000].float().div_(255.0).sub_(mean).div_(std)
        wrong += int((model(xb).argmax(1) != y[i:i + 1000]).sum())
assert not any(m == "qexp" or m.startswith("qexp.") for m in sys.modules), "qexp was imported"
codes = {l["codes"]: l["dtype"] for l in manifest["layers"]}
print(json.dumps({"error": 100.0 * wrong / len(y), "codes": codes}))
'''


@pytest.mark.slow
def test_export_reloads_in_plain_pytorch_and_reproduces_the_test_error(tmp_path: Path, data_root: Path) -> None:
    run_qexp(["train", "method=bc", "dataset.train_subset=3000", "dataset.val_size=1000", "epochs=2",
              "progress=false", "device=cpu", f"out_root={tmp_path}"], env=ENV)
    (run,) = find_runs(tmp_path)
    rec = read_metrics(run)
    expected = rec["test_error_at_best"]
    out = run_qexp(["export", str(run), "--best"], env=ENV).stdout
    folder = run / "export-best"
    assert f"gives test error {expected:.2f}%" in out
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    proc = subprocess.run([sys.executable, "-I", str(script), str(folder), str(data_root / "MNIST" / "raw")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["error"] == expected  # exactly the recorded number, not approximately
    assert set(got["codes"].values()) == {"int8"} and len(got["codes"]) == 4  # 1-bit codes, 4 layers
    manifest = json.loads((folder / "quant.json").read_text())
    assert (manifest["checkpoint"], manifest["epoch"]) == ("best.pt", rec["best_epoch"])
    # the last checkpoint: export_run itself reloads through load_export.py and must match exactly
    from qexp.run.export import export_run

    doc = export_run(run)
    assert (doc["checkpoint"], doc["epoch"]) == ("checkpoint.pt", rec["epochs_done"])
    assert doc["export_test_error"] == doc["test_error"] == rec["test_error"]


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch of sr (1 bit), ptq (8 bits), float and ste on synthetic data: one sweep, one process."""
    root = tmp_path_factory.mktemp("export")
    run_qexp(["train", "--multirun", "dataset=synthetic", "method=sr,ptq,float,ste", "epochs=1", "progress=false",
              "device=cpu", f"out_root={root}"], env=ENV)
    return {read_metrics(r)["method"]: r for r in find_runs(root)}


@pytest.mark.parametrize("method,bits,dtype", [("sr", 1, "int8"), ("ptq", 8, "uint8"), ("float", 32, None)])
def test_export_codes_are_integers_on_the_layer_grid(synthetic_runs: dict[str, Path], method: str, bits: int,
                                                     dtype: str | None) -> None:
    from qexp.run.export import export_run

    run = synthetic_runs[method]
    doc = export_run(run)
    assert doc["export_test_error"] == read_metrics(run)["test_error"]  # PTQ: its quantized copy's error
    folder = run / "export"
    tensors = torch.load(folder / doc["tensors"], weights_only=True)
    if dtype is None:  # a float network: every tensor stored as is
        assert doc["layers"] == [] and all(t.is_floating_point() for t in tensors.values())
        return
    assert len(doc["layers"]) == 4
    for layer in doc["layers"]:
        codes = tensors[layer["codes"]]
        assert str(codes.dtype) == f"torch.{dtype}" == f"torch.{layer['dtype']}"
        levels = codes.unique().tolist()
        if method == "ptq":  # affine: codes 0..2^k-1, weight = lo + code * scale
            assert 0 <= levels[0] and levels[-1] <= 2**bits - 1 and layer["offset"] != 0
        else:  # 1-bit symmetric: codes -1/+1, weight = code * H
            assert set(levels) <= {-1, 1} and layer["offset"] == 0
        assert layer["bits"] == bits and layer["tensor"] not in doc["float_tensors"]


def test_export_refuses_activation_quantization_with_one_line(synthetic_runs: dict[str, Path],
                                                              capsys: pytest.CaptureFixture) -> None:
    from qexp.cli import main as qexp

    run = synthetic_runs["ste"]
    assert qexp(["export", str(run)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: method=ste quantizes activations (activation_bits, activations): qexp export writes float "
        "networks with quantized weights only (float, bc, sr, r, big_sr, learned and ptq without activation bits)"]
    assert not (run / "export").exists() and not list(run.glob(".export*"))
