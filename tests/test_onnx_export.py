"""``qexp export RUN --format onnx``: every exportable method, trained briefly on real MNIST, round-trips
through onnxruntime (CPU) and gives the run's recorded test error on the whole MNIST test set: the same
number of wrong images for weight-only integer grids, within 0.05 points when activations are quantized.
The ONNX graph stores integer codes through DequantizeLinear and activations through
QuantizeLinear/DequantizeLinear, and passes onnx.checker; WAGE is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, find_runs, read_metrics, run_qexp

onnx = pytest.importorskip("onnx", reason="the [export] extra (onnx, onnxruntime) is part of [test]")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow  # trains on real MNIST (tiny subset) and evaluates its whole test set

ENV = {"OMP_NUM_THREADS": "1"}
#: a few dozen steps: 1280 training images in batches of 64
TRAIN = ["dataset.train_subset=1280", "dataset.val_size=0", "epochs=1", "progress=false", "device=cpu",
         "threads=1"]
WEIGHT_ONLY = ["float", "bc", "sr", "r", "big_sr", "learned", "ptq"]
WITH_ACTIVATIONS = ["ste", "lsq", "pact", "dorefa", "ptq_act"]


def _label(run: Path) -> str:
    rec = read_metrics(run)
    cfg = (run / ".hydra" / "overrides.yaml").read_text()
    if rec["method"] == "ptq" and "method.activations=true" in cfg:
        return "ptq_act"
    return "lsq_bn" if "model.bn=true" in cfg else rec["method"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict[str, Path]:
    """Each method trained once: one sweep of the methods at their defaults (and WAGE, to be refused),
    PTQ with 8-bit activations and per-channel weights, and LSQ on LeNet-5 with BatchNorm (folding)."""
    root = tmp_path_factory.mktemp("onnx")
    methods = ",".join(m for m in WEIGHT_ONLY + WITH_ACTIVATIONS + ["wage"] if m != "ptq_act")
    run_qexp(["train", "--multirun", f"method={methods}", "hydra/launcher=local_parallel", *TRAIN,
              f"out_root={root}"], env=ENV)  # two runs at a time, one thread each
    run_qexp(["train", "method=ptq", "method.activations=true", "method.per_channel=true", *TRAIN,
              f"out_root={root}"], env=ENV)
    run_qexp(["train", "method=lsq", "model.bn=true", *TRAIN, f"out_root={root}"], env=ENV)
    out = {_label(r): r for r in find_runs(root)}
    assert set(out) >= set(WEIGHT_ONLY + WITH_ACTIVATIONS + ["wage", "lsq_bn"]), sorted(out)
    return out


def _first_batch_agreement(path: Path, run: Path) -> tuple[float, float]:
    """A session of the test's own on the first 1000 test images, against the run's model in torch:
    (fraction of equal answers, largest logit difference)."""
    from qexp.run.evaluate import load_run

    loaded = load_run(run, "cpu")
    model, method = loaded.built.model, loaded.built.method
    model.eval()
    copy = method.deployable_copy(model)  # PTQ's deployed network
    model = model if copy is None else copy
    x, _ = next(iter(loaded.built.data.test))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        want = model(x)
    return float((got.argmax(1) == want.argmax(1)).float().mean()), float((got - want).abs().max())


def _initializers(model) -> dict[str, int]:
    return {i.name: i.data_type for i in model.graph.initializer}


@pytest.mark.parametrize("label", WEIGHT_ONLY + WITH_ACTIVATIONS)
def test_onnx_round_trip_reproduces_the_test_error(runs: dict[str, Path], label: str, tmp_path: Path) -> None:
    from qexp.run.export import export_run

    run = runs[label]
    expected = read_metrics(run)["test_error"]
    doc = export_run(run, tmp_path / "exp", fmt="onnx")
    path = tmp_path / "exp" / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    check = doc["onnx"]["model.onnx"]
    wrong, total, got = check["wrong"], check["total"], check["onnxruntime_test_error"]
    assert total == 10000 and check["bytes"] == path.stat().st_size  # the whole real MNIST test set
    same, diff = _first_batch_agreement(path, run)
    ops = {n.op_type for n in model.graph.node}
    meta = {p.key: p.value for p in model.metadata_props}
    quant = json.loads(meta["qexp_quantization"])
    assert json.loads(meta["qexp_preprocess"])["normalize"] == {"mean": [0.1307], "std": [0.3081]}
    if label in WEIGHT_ONLY:
        assert wrong == round(expected * total / 100)  # exactly the run's count of wrong test images
        assert same == 1.0 and diff < 1e-3
        assert "QuantizeLinear" not in ops and quant["activations"] == []
    else:
        assert abs(got - expected) <= 0.05 and same >= 0.99
        assert "QuantizeLinear" in ops and quant["activations"]
        for a in quant["activations"]:  # PACT's and DoReFa's float last-layer input is a clip alone
            if a["rounding"] == "clip":
                assert label in ("pact", "dorefa") and a["bits"] == 32 and a["storage"] == "float32"
            else:
                assert a["storage"] in ("uint8", "int8") and 1 <= a["bits"] <= 8
    if label in ("float", "ste"):  # float weights (ste quantizes activations only, by default)
        assert "DequantizeLinear" not in ops or label == "ste"
        assert quant["weights"] == []
        return
    # quantized weights: integer initializers through DequantizeLinear, the true width in the metadata
    assert "DequantizeLinear" in ops and quant["weights"]
    inits = _initializers(model)
    for w in quant["weights"]:
        codes = f"{w['name']}.weight.codes"
        assert inits[codes] == {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}[w["storage"]]
        assert f"{w['name']}.weight" not in inits  # no float copy of a quantized weight
        assert 1 <= w["bits"] <= 8
        if label in WEIGHT_ONLY:
            assert w["exact"] and w["max_abs_error"] == 0.0
    if label == "ptq_act":  # per-channel weights: DequantizeLinear along the output channels
        assert all(w["scale"] == "per-channel" for w in quant["weights"])
        assert any(a.name == "axis" and a.i == 0 for n in model.graph.node if n.op_type == "DequantizeLinear"
                   for a in n.attribute)
    if label in ("bc", "sr", "r", "big_sr"):
        assert {w["bits"] for w in quant["weights"]} == {1}


def test_onnx_folds_batchnorm_before_quantizing(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    """--fold-bn: model-folded.onnx has no BatchNormalization, per-channel scales on the same codes, and
    its test error is printed beside the unfolded model's (here within 0.05 points of the run's)."""
    from qexp.cli import main as qexp

    run = runs["lsq_bn"]
    assert qexp(["export", str(run), "--format", "onnx", "--fold-bn", "--out", str(tmp_path / "exp")]) == 0
    out = capsys.readouterr().out
    assert "model.onnx" in out and "model-folded.onnx" in out and "bytes" in out
    doc = json.loads((tmp_path / "exp" / "quant.json").read_text())
    expected = read_metrics(run)["test_error"]
    plain, folded = (onnx.load(str(tmp_path / "exp" / f)) for f in ("model.onnx", "model-folded.onnx"))
    assert "BatchNormalization" in {n.op_type for n in plain.graph.node}
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    onnx.checker.check_model(folded, full_check=True)
    assert len(doc["batchnorm_folded"]) == 3  # LeNet-5: conv, conv, fc1 each followed by BatchNorm
    fmeta = {p.key: p.value for p in folded.metadata_props}
    layers = {pair.split(" -> ")[1] for pair in doc["batchnorm_folded"]}
    scales = {w["name"]: w["scale"] for w in json.loads(fmeta["qexp_quantization"])["weights"]}
    assert all(scales[name] == "per-channel" for name in layers)
    rest = [v for name, v in scales.items() if name not in layers]  # the output layer: no BatchNorm after it
    assert rest and set(rest) == {"per-tensor"}
    assert "then quantized" in fmeta["qexp_folding"]
    for name in ("model.onnx", "model-folded.onnx"):
        assert abs(doc["onnx"][name]["onnxruntime_test_error"] - expected) <= 0.05, doc["onnx"][name]


def test_onnx_refuses_wage_in_one_line(runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    from qexp.cli import main as qexp

    assert qexp(["export", str(runs["wage"]), "--format", "onnx", "--out", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: method=wage cannot be exported to ONNX faithfully")
    assert list(tmp_path.iterdir()) == []


def test_export_help_lists_the_formats() -> None:
    out = run_qexp(["export", "--help"]).stdout
    assert "--format {qexp,onnx}" in out and "--fold-bn" in out


def test_a_module_swap_the_plan_does_not_write_is_refused() -> None:
    """The deployed network is the plain architecture plus the plan: a module the method swapped in that
    the plan does not cover (DoReFa's clip once went out as the architecture's ReLU) is refused."""
    from torch import nn

    from qexp.errors import QexpError
    from qexp.run.onnx_export import ActGrid, Plan, check_module_swaps

    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    run_model = nn.Sequential(nn.Linear(4, 4), nn.Hardtanh(0.0, 1.0), nn.Linear(4, 2))
    with pytest.raises(QexpError, match="module 1 is a Hardtanh in the run but a ReLU"):
        check_module_swaps(run_model, fresh, Plan())
    plan = Plan()
    plan.relus["1"] = ActGrid(1.0, 0, 1, 32, "clip")
    check_module_swaps(run_model, fresh, plan)
    check_module_swaps(fresh, fresh, Plan())


def test_importing_onnxruntime_writes_nothing_outside(tmp_path: Path) -> None:
    """onnxruntime 1.32's telemetry wrote ~/.cache/Microsoft/DeveloperTools/... and $TMPDIR/.ses at import,
    even for an export then refused; qexp imports it with both pointed at a scratch folder it removes."""
    pytest.importorskip("onnxruntime")
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    code = "from qexp.run.onnx_export import import_runtime; import_runtime(); import onnxruntime; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(home), "TMPDIR": str(tmp)})
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert list(home.iterdir()) == [] and list(tmp.iterdir()) == []
