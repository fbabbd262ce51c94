"""bc / sr / r / big_sr through the real build + Trainer on synthetic data (CPU): every method on every
model family, state round trips, grid / clip invariants after training, options and bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch

from qexp.errors import QexpError
from qexp.methods.bc import BinaryConnect
from qexp.methods.rounding import BigSR, Rounding, StochasticRounding
from qexp.quant.grid import SymmetricGrid
from qexp.quant.inject import weight_layers
from qexp.quant.kernels import nearest
from qexp.run.session import Trainer, build
from tests.conftest import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "bc": ["method=bc"],
    "bc_stochastic": ["method=bc", "method.stochastic=true"],
    "sr": ["method=sr"],
    "r": ["method=r"],
    "big_sr": ["method=big_sr", "method.batch_scale=2"],
}
# one small member of every model family, on its data shape (channels, pixels)
FAMILIES = {
    "lenet5": (["model=lenet5"], 1, 28),
    "mlp": (["model=mlp", "model.width=64"], 1, 28),
    "vgg": (["model=vgg7"], 3, 8),
    "resnet": (["model=resnet20", "model.depth=8"], 3, 16),
    "wrn": (["model=wrn56_2", "model.depth=8"], 3, 16),
    "resnet18": (["model=resnet18"], 1, 32),
}
#: VGG and ResNet-18 hold millions of weights: there the two code paths (a parametrized float shadow:
#: bc; weights rounded in place: sr) run, the variants of each path (bc stochastic; r, big_sr) run on
#: the light families. Keeps this file inside the suite's CPU budget.
HEAVY = {"vgg", "resnet18"}
PAIRS = [(m, f) for f in sorted(FAMILIES) for m in sorted(METHODS) if f not in HEAVY or m in ("bc", "sr")]
SMALL = ["model=mlp", "model.width=64"]


def make(method: list[str], model: list[str] | None = None, channels: int = 1, size: int = 28,
         bits: int | None = None, samples: int = 8, extra: tuple[str, ...] = ()):
    over = ["dataset=synthetic", f"dataset.channels={channels}", f"dataset.image_size={size}",
            f"dataset.train_samples={samples}", "dataset.test_samples=4", "batch_size=4",
            "eval_batch_size=4", "device=cpu", *method, *(model or ["model=lenet5"]), *extra]
    if bits is not None:
        over.append(f"bits={bits}")
    cfg = compose_train(over)
    torch.manual_seed(0)
    b = build(cfg, torch.device("cpu"))
    trainer = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, torch.device("cpu"),
                      cfg.epochs * b.method.epoch_scale, progress_bar=False)
    return b, trainer


def roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_invariants(method) -> None:
    for q in method.layers:
        w = q.weight.detach()
        if q.float_copy:  # BinaryConnect: shadows inside the clip range [-H, H]
            assert w.abs().max().item() <= q.scale * (1 + 1e-6), q.name
        else:  # SR / R: stored weights exactly on the grid
            assert torch.equal(nearest(w, q.bits, q.scale), w), q.name
            assert w.abs().max().item() <= SymmetricGrid(q.bits, q.scale).limit * (1 + 1e-6)


@pytest.mark.parametrize(("method", "family"), PAIRS)
def test_every_method_trains_every_family(method, family):
    model, c, size = FAMILIES[family]
    b, trainer = make(METHODS[method], model, c, size, samples=8 * (2 if method == "big_sr" else 1))
    out = trainer.fit()
    assert out.status == "completed"
    row = out.progress.history[-1]
    assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])
    assert out.progress.step == 2
    assert {"method/flip_frac", "method/rel_quant_error"} <= set(row)
    check_invariants(b.method)
    state = roundtrip(trainer.state_dict())
    b2, t2 = make(METHODS[method], model, c, size)
    t2.load_state_dict(state)
    for (n, p), p2 in zip(b.model.state_dict().items(), b2.model.state_dict().values()):
        assert torch.equal(p, p2), n
    manifest = b.method.manifest(b.model)
    assert len(manifest["layers"]) == len(weight_layers(b.model)) > 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_is_exact(method):
    """Train 2 epochs; versus 1 epoch, checkpoint through bytes, a fresh build, 1 more epoch: identical."""
    bits = 1 if method == "bc_stochastic" else 2
    args = dict(model=SMALL, bits=bits, samples=16, extra=("epochs=2",))
    b, t = make(METHODS[method], **args)
    t.fit()
    b1, t1 = make(METHODS[method], **args)
    t1.epochs = 1
    t1.fit()
    state = roundtrip(t1.state_dict())
    b2, t2 = make(METHODS[method], **args)
    t2.load_state_dict(state)
    t2.fit()
    for (n, p), p2 in zip(b.model.state_dict().items(), b2.model.state_dict().values()):
        assert torch.equal(p, p2), n
    assert t.progress.history[-1]["method/flip_frac"] == t2.progress.history[-1]["method/flip_frac"]
    check_invariants(b2.method)


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_sr_and_r_weights_on_grid_after_training(bits):
    for m in ("sr", "r"):
        b, t = make(METHODS[m], SMALL, bits=bits, samples=24)
        t.fit()
        check_invariants(b.method)
        assert t.progress.history[-1]["method/rel_quant_error"] > 0


def test_bc_lr_scale_and_unscaled_float_params():
    b, _ = make(METHODS["bc"], extra=("method.lr_scale=glorot",))
    groups = b.optimizer.param_groups
    assert groups[0]["name"] == "float" and groups[0]["lr"] == pytest.approx(1e-3)  # biases: unscaled
    for g, q in zip(groups[1:], b.method.layers):
        fan_in, fan_out = q.fans
        assert g["lr"] == pytest.approx(1e-3 * q.scale / math.sqrt(1.5 / (fan_in + fan_out)))
    # scale=1 (the paper's H) gives the paper's W_LR_scale verbatim; conv fans count k^2 on both sides
    b1, _ = make(METHODS["bc"], extra=("method.scale=1", "method.lr_scale=glorot"))
    conv1 = b1.optimizer.param_groups[1]
    assert conv1["lr"] == pytest.approx(1e-3 / math.sqrt(1.5 / (25 * 1 + 25 * 32)))
    b2, _ = make(METHODS["bc"])  # the default: no W_LR_scale (it belongs to the bc2015_* presets)
    assert all(g["lr"] == pytest.approx(1e-3) for g in b2.optimizer.param_groups)


def test_bc_biases_and_bn_are_neither_clipped_nor_quantized():
    b, t = make(METHODS["bc"], ["model=mlp", "model.width=16"], samples=8)
    with torch.no_grad():
        for m in b.model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.weight.fill_(5.0)
    t.fit()
    bn = [m for m in b.model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bn and all(m.weight.abs().max() > 4 for m in bn)


def test_bc_test_time_rule():
    """Deterministic BC tests with Q_d(W); stochastic BC with the real W (the paper's rule)."""
    for stochastic in (False, True):
        extra = ("method.stochastic=true",) if stochastic else ()
        b, _ = make(METHODS["bc"], extra=extra)
        q = b.method.layers[0]
        b.model.eval()
        w = q.module.weight.detach()
        if stochastic:
            assert torch.equal(w, q.weight.detach())
        else:
            assert w.unique().numel() == 2
        b.model.train()
        assert q.module.weight.detach().unique().numel() == 2


def test_bc_stochastic_binarization_is_seeded():
    a, _ = make(METHODS["bc_stochastic"])
    c, _ = make(METHODS["bc_stochastic"])
    d, _ = make(METHODS["bc_stochastic"], extra=("seed=1",))
    wa, wc, wd = (x.method.layers[1].module.weight.detach() for x in (a, c, d))
    assert torch.equal(wa, wc) and not torch.equal(wa, wd)


def test_skip_first_and_last_stay_float():
    for m in ("bc", "sr"):
        b, t = make(METHODS[m], extra=("method.skip_first=true", "method.skip_last=true"))
        names = [q.name for q in b.method.layers]
        all_layers = [n for n, _ in weight_layers(b.model)]
        assert names == all_layers[1:-1]
        manifest = b.method.manifest(b.model)
        n_float = sum(p.numel() for p in b.model.parameters()) - sum(q.weight.numel() for q in b.method.layers)
        assert manifest["float_params"] == n_float


def test_manifest_memory():
    b, _ = make(METHODS["sr"], bits=4)
    m = b.method.manifest(b.model)
    q_params = sum(row["params"] for row in m["layers"])
    total = sum(p.numel() for p in b.model.parameters())
    assert m["weight_bytes"] == math.ceil(q_params * 4 / 8) + 4 * (total - q_params)
    assert m["float32_bytes"] == 4 * total
    row = m["layers"][0]
    assert row.keys() >= {"name", "shape", "params", "bits", "scale", "step", "rounding", "float_copy"}
    assert row["rounding"] == "stochastic" and row["float_copy"] is False
    bc, _ = make(METHODS["bc"])
    assert bc.method.manifest(bc.model)["layers"][0]["float_copy"] is True


def test_big_sr_batch_and_budget():
    b, t = make(["method=big_sr"], samples=64, extra=("batch_size=2",))
    assert b.method.batch_scale == 8 and len(b.data.train) == 4  # 64 samples / (2 x 8)
    b, t = make(["method=big_sr", "method.budget=updates", "method.batch_scale=2"], samples=8)
    assert t.epochs == 2
    t.fit()
    assert t.progress.step == 2  # 2 epochs x 1 batch of 8 = the updates SR makes in 1 epoch of 4-batches


@pytest.mark.parametrize("bits", [0, 9, 32])
@pytest.mark.parametrize("cls", [BinaryConnect, Rounding, StochasticRounding, BigSR])
def test_bits_out_of_range(cls, bits):
    with pytest.raises(QexpError, match="1..8"):
        cls(bits=bits)


def test_bad_options_are_user_errors():
    with pytest.raises(QexpError, match="stochastic"):
        BinaryConnect(bits=2, stochastic=True)
    with pytest.raises(QexpError, match="lr_scale"):
        BinaryConnect(lr_scale="huge")
    with pytest.raises(QexpError, match="budget"):
        BigSR(budget="forever")
    with pytest.raises(QexpError, match="scale"):
        make(METHODS["sr"], extra=("method.scale=-1",))


@pytest.mark.parametrize("bits", [1, 2])
def test_bc_quantized_ahead_trains_as_layer_by_layer(bits, monkeypatch):
    """BinaryConnect computes every layer's Q_d(W) before the forward in a few multi-tensor calls; the
    forward takes those values and the run is bit-identical to one quantizing layer by layer."""
    args = dict(model=["model=lenet5"], bits=bits, samples=16, extra=("method.scale=0.05",))
    b, t = make(METHODS["bc"], **args)
    taken = []
    real_forward = type(b.method.quantizers[0]).forward

    def forward(self, w):
        taken.append(self.ahead is not None)
        return real_forward(self, w)

    monkeypatch.setattr(type(b.method.quantizers[0]), "forward", forward)
    t.fit()
    assert sum(taken) == 4 * len(b.method.layers)  # 4 steps: every layer took its value computed ahead
    assert all(q.ahead is None and q.ahead_misses == 0 for q in b.method.quantizers)
    monkeypatch.setattr("qexp.methods.bc.quantize_ahead", lambda *a: None)
    b2, t2 = make(METHODS["bc"], **args)
    t2.fit()
    for (n, p), p2 in zip(b.model.state_dict().items(), b2.model.state_dict().values()):
        assert torch.equal(p, p2), n
    assert t.progress.history[-1]["train_loss"] == t2.progress.history[-1]["train_loss"]


def test_bc_value_computed_ahead_is_not_used_for_a_changed_shadow():
    """An in-place change to a shadow after the values were computed (it bumps the tensor's version):
    the forward quantizes the new shadow; a forward that never takes them (a compiled one) stops them."""
    b, _ = make(METHODS["bc"], bits=2)
    m, layer = b.method, b.method.layers[0]
    b.model.train()
    m.before_forward(b.model, 0)
    with torch.no_grad():
        layer.weight.mul_(-1)
    assert torch.equal(layer.module.weight, nearest(layer.weight.detach(), 2, layer.scale))
    for _ in range(3):  # no forward takes them
        m.after_backward(b.model)
        m.before_forward(b.model, 0)
    m.after_backward(b.model)
    m.before_forward(b.model, 0)
    assert all(q.ahead is None and q.ahead_misses == 3 for q in m.quantizers[1:])


def test_a_frozen_epoch_is_named_in_the_log(caplog) -> None:
    """R at 1 bit as typed rounds every update away (59% test error on MNIST, loss ln 10): the run says so
    instead of only reporting the error; an epoch in which weights changed says nothing."""
    from qexp.methods.base import RunContext

    torch.manual_seed(0)
    m = Rounding(bits=1)
    model = m.prepare(torch.nn.Sequential(torch.nn.Linear(8, 4)), RunContext())
    with caplog.at_level("WARNING", logger="qexp"):
        m.on_epoch_end(0)
    assert "method=r: no quantized weight changed in epoch 1" in caplog.text
    caplog.clear()
    with torch.no_grad():
        model[0].weight.neg_()  # every weight moves to the other grid point
    with caplog.at_level("WARNING", logger="qexp"):
        m.on_epoch_end(1)
    assert m.metrics()["flip_frac"] == 1.0 and "no quantized weight changed" not in caplog.text
