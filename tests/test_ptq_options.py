"""PTQ options: per-channel weights, symmetric grids, percentile / MSE activation calibration, per-layer
SQNR in quant.json and ptq.json, and the same options on ``qexp eval --ptq-bits``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from qexp.errors import QexpError
from qexp.jsonio import file_sha1
from qexp.methods.ptq import affine
from qexp.methods.ptq.method import PTQ, Scheme, affine_weight_copy, quantize_activations, weight_sqnr
from qexp.models.lenet import LeNet5
from tests.conftest import find_runs, run_qexp

pytestmark = pytest.mark.usefixtures("one_thread")


def unequal_channels() -> torch.Tensor:
    """A conv weight whose 4 output channels span ranges 1000x apart."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 8, 3, 3, generator=g) * torch.tensor([0.01, 0.1, 1.0, 10.0]).view(4, 1, 1, 1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_per_channel_beats_per_layer_on_unequal_channel_ranges(symmetric):
    w = unequal_channels()
    layer = affine.quantize(w, 4, per_channel=False, symmetric=symmetric)
    chan = affine.quantize(w, 4, per_channel=True, symmetric=symmetric)
    assert chan.channels == 4 and chan.nbytes == w.numel() + 8 * 4 and layer.nbytes == w.numel() + 8
    assert affine.sqnr_db(w, chan.dequantize()) >= affine.sqnr_db(w, layer.dequantize()) - 1e-6
    for c in range(3):  # the channels smaller than the largest gain a lot (each on its own range)
        assert affine.sqnr_db(w[c], chan.dequantize()[c]) > affine.sqnr_db(w[c], layer.dequantize()[c]) + 10
    for c in range(4):  # every channel is within half of its own step; per layer the small ones collapse
        err = (w[c] - chan.dequantize()[c]).abs().max()
        assert err <= chan.scale[c] / 2 * (1 + 1e-4) + 1e-7
        assert (w[c] - chan.dequantize()[c]).pow(2).sum() <= (w[c] - layer.dequantize()[c]).pow(2).sum() * (1 + 1e-4)
    assert layer.dequantize()[0].unique().numel() <= 2  # the 0.01 channel gets at most two levels per layer


def test_symmetric_grid_has_zero_and_odd_levels_asymmetric_fits_one_sided_data():
    x = torch.rand(10000, generator=torch.Generator().manual_seed(1))  # one-sided: [0, 1)
    sym = affine.quantize(x, 3, symmetric=True)
    asym = affine.quantize(x, 3)
    assert int(sym.q.max()) <= 2**3 - 2 and int(asym.q.max()) == 2**3 - 1
    assert sym.lo == pytest.approx(-float(x.max()))
    zero = affine.quantize(torch.tensor([-1.0, 0.0, 0.4, 1.0]), 2, symmetric=True).dequantize()
    assert zero[1] == 0.0 and torch.equal(zero, torch.tensor([-1.0, 0.0, 0.0, 1.0]))
    # one-sided data: symmetric wastes the negative half of its levels
    assert affine.sqnr_db(x, asym.dequantize()) > affine.sqnr_db(x, sym.dequantize()) + 6
    # symmetric data: both grids are close, and the symmetric one represents 0 exactly
    y = torch.randn(10000, generator=torch.Generator().manual_seed(2))
    assert abs(affine.sqnr_db(y, affine.quantize(y, 4, symmetric=True).dequantize())
               - affine.sqnr_db(y, affine.quantize(y, 4).dequantize())) < 3


def observed(x: torch.Tensor) -> affine.RangeObserver:
    obs = affine.RangeObserver()
    for part in x.chunk(4):
        obs.update(part)
    return obs


def test_percentile_and_mse_calibration_clip_outliers():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16000, generator=g).clamp(min=0)  # post-ReLU values with one outlier
    x[0] = 30.0
    obs = observed(x)
    lo, hi = affine.calibrate(obs, 4, "minmax")
    assert (lo, hi) == (0.0, 30.0)
    p_lo, p_hi = affine.calibrate(obs, 4, "percentile", percentile=99.9)
    assert p_lo == 0.0 and 2.5 < p_hi < 5.0  # the 99.9th percentile of max(N(0,1), 0) is ~3.1
    m_lo, m_hi = affine.calibrate(obs, 4, "mse")
    assert m_lo == 0.0 and m_hi < 10

    def mse(lo: float, hi: float) -> float:
        lo_t, s = affine.grid(torch.tensor(lo), torch.tensor(hi), 4, False)
        return float((affine.fake_quantize_grid(x, float(lo_t), float(s), 15) - x).pow(2).mean())

    assert mse(m_lo, m_hi) < mse(lo, hi) / 2  # the MSE-optimal clip beats min/max by far ...
    for c in (0.5, 0.9, 1.1, 1.5):  # ... and its neighbours on the full data
        assert mse(m_lo, m_hi) <= mse(m_lo, m_hi * c) * 1.05
    with pytest.raises(ValueError):
        affine.calibrate(obs, 4, "entropy")


def test_scheme_rejects_bad_options():
    for bad in (dict(grid="log"), dict(calibration="kl"), dict(percentile=40)):
        with pytest.raises(QexpError):
            Scheme(**bad)
    with pytest.raises(QexpError):
        PTQ(bits=4, grid="log")
    assert Scheme().name == "affine-minmax-per-layer"
    assert Scheme(True, "symmetric", "percentile", 99.9).act_name == "symmetric-percentile99.9-per-tensor"


def test_quantized_copy_per_channel_and_sqnr_per_layer():
    torch.manual_seed(0)
    model = LeNet5(in_channels=1, num_classes=10, image_size=28)
    batches = [(torch.randn(16, 1, 28, 28), None) for _ in range(2)]
    sq = {}
    for pc in (False, True):
        qm, codes = affine_weight_copy(model, 4, scheme=Scheme(per_channel=pc))
        for name, layer in qm.named_modules():
            if name in codes:
                assert torch.equal(layer.weight, codes[name].dequantize())
        sq[pc] = weight_sqnr(model, codes)
        assert set(sq[pc]) == {"features.0", "features.3", "classifier.1", "classifier.3"} or len(sq[pc]) == 4
    assert all(sq[True][n] >= sq[False][n] - 1e-6 for n in sq[True])  # per channel is never worse
    qm, _ = affine_weight_copy(model, 4)
    acts = quantize_activations(qm, 4, batches, Scheme(calibration="mse"))
    assert all(isinstance(q.sqnr_db, float) and q.sqnr_db > 0 for q in acts.values())
    # about 6 dB per bit
    s8 = weight_sqnr(model, affine_weight_copy(model, 8)[1])
    s4 = weight_sqnr(model, affine_weight_copy(model, 4)[1])
    assert all(18 < s8[n] - s4[n] < 30 for n in s8)


def test_method_ptq_options_reach_quant_json(tmp_path: Path):
    run_qexp(["train", "method=ptq", "bits=4", "method.per_channel=true", "method.grid=symmetric",
              "method.activations=true", "method.calibration=percentile", "method.calib_batches=2",
              "dataset=synthetic", "dataset.train_samples=256", "dataset.test_samples=128", f"out_root={tmp_path}"])
    (run,) = find_runs(tmp_path)
    man = json.loads((run / "quant.json").read_text())
    weights = [r for r in man["layers"] if r["tensor"] == "weight"]
    inputs = [r for r in man["layers"] if r["tensor"] == "input"]
    assert all(r["scheme"] == "symmetric-minmax-per-channel" and len(r["scale"]) == r["shape"][0] for r in weights)
    assert all(r["sqnr_db"] > 0 for r in weights + inputs)
    assert all(r["scheme"] == "symmetric-percentile99.99-per-tensor" and r["lo"] == pytest.approx(-r["hi"], rel=1e-5)
               for r in inputs)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ptq_scheme"] == "symmetric-minmax-per-channel"
    assert metrics["ptq_act_scheme"] == "symmetric-percentile99.99-per-tensor"

    # the same options on `qexp eval --ptq-bits`; other options start ptq.json afresh
    run_qexp(["eval", str(run), "--ptq-bits", "4,2", "--ptq-per-channel", "--ptq-grid", "symmetric",
              "--ptq-calib", "mse", "--calib-batches", "2"])
    doc = json.loads((run / "ptq.json").read_text())
    assert doc["scheme"] == "symmetric-minmax-per-channel" and doc["act_scheme"] == "symmetric-mse-per-tensor"
    assert [r["bits"] for r in doc["results"]] == [4, 2]
    for r in doc["results"]:
        assert len(r["layers"]) == 4 and all(la["weight_sqnr_db"] > 0 and la["input_sqnr_db"] > 0
                                             for la in r["layers"])
    run_qexp(["eval", str(run), "--ptq-bits", "3", "--calib-batches", "2"])
    doc = json.loads((run / "ptq.json").read_text())
    assert doc["scheme"] == "affine-minmax-per-layer" and [r["bits"] for r in doc["results"]] == [3]
    # the header names the checkpoint analysed; other calibration batches start the file afresh too
    assert doc["checkpoint_sha1"] == file_sha1(run / "checkpoint.pt")[:16] and doc["epoch"] == metrics["epochs_done"]
    run_qexp(["eval", str(run), "--ptq-bits", "2", "--calib-batches", "1"])
    doc = json.loads((run / "ptq.json").read_text())
    assert doc["calib_batches"] == 1 and [r["bits"] for r in doc["results"]] == [2]
    bad = run_qexp(["eval", str(run), "--ptq-bits", "3", "--ptq-calib", "kl"], check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_per_channel_on_a_linear_layer_keeps_the_layer_shape():
    lin = nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight.mul_(torch.tensor([[0.01], [1.0], [100.0]]))
    c = affine.quantize(lin.weight, 3, per_channel=True)
    assert c.dequantize().shape == lin.weight.shape and c.q.dtype == torch.uint8


@pytest.mark.parametrize("bad", [["--calib-batches", "0"], ["--ptq-calib", "percentile", "--ptq-percentile", "200"]])
@pytest.mark.parametrize("ptq", [["--ptq-bits", "4"], []], ids=["ptq", "plain"])
def test_eval_options_are_checked_before_anything_is_loaded(tmp_path: Path, bad: list[str], ptq: list[str]):
    """A bad PTQ option was refused only after a whole test-set evaluation (with ``--ptq-bits``) or ignored
    (without): now one line, exit 2, before the run is loaded (this folder has a config and no checkpoint)."""
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("method:\n  name: float\n")
    proc = run_qexp(["eval", str(tmp_path / "run"), *ptq, *bad], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert ("calib-batches" in lines[0]) or ("percentile" in lines[0]), lines[0]
