"""WAGE: number formats against hand-computed values, the method's invariants, integer inference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qexp.errors import QexpError
from qexp.methods.base import RunContext
from qexp.methods.wage import Wage
from qexp.methods.wage import formats as wage
from qexp.methods.wage.integer import export, rshift_round, weight_codes
from qexp.methods.wage.layers import WageActivation
from qexp.models.lenet import LeNet5
from qexp.models.mlp import MLP
from qexp.models.resnet import CifarResNet
from qexp.models.vgg import VGG
from qexp.quant.inject import shadow_weight
from qexp.run.session import train_step
from tests.conftest import find_runs, read_metrics, run_qexp


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# ---- number formats ------------------------------------------------------------------------------
def test_q_c_shift_hand_values() -> None:
    assert wage.S(8) == 128 and wage.sigma(2) == 0.5
    # 2 bits: grid {-0.5, 0, 0.5}; ties to even (0.25 -> 0, 0.75 -> 1.0 before clipping)
    assert torch.equal(wage.Q(t(0.3, 0.25, 0.75, -0.26), 2), t(0.5, 0.0, 1.0, -0.5))
    assert torch.equal(wage.C(t(0.7, -0.9, 0.1), 2), t(0.5, -0.5, 0.1))
    assert torch.equal(wage.C(t(1.0, -2.0), 8), t(127 / 128, -127 / 128))
    assert torch.equal(wage.Q(wage.C(t(0.75), 2), 2), t(0.5))
    assert torch.equal(wage.Q(t(3 / 256, 5 / 256), 8), t(2 / 128, 2 / 128))  # 1.5 -> 2, 2.5 -> 2
    # Shift = 2^round(log2 x): 0.3 -> 0.25 (log2 = -1.74), 0.36 -> 0.5 (-1.47), 3 -> 4 (1.58), 0 -> no NaN
    assert torch.equal(wage.Shift(t(0.3, 0.36, 3.0, 1.0)), t(0.25, 0.5, 4.0, 1.0))
    assert torch.isfinite(wage.Shift(t(0.0))).all()


def test_an_all_zero_error_or_gradient_stays_zero() -> None:
    """``e / Shift(max|e|)`` of a zero tensor is 0/0 in the paper; one fused multiplier overflowed float32
    and turned the zeros into NaN (a layer whose units all died or saturated poisoned the network:
    ``method=wage bits=8`` diverged at step 8)."""
    z = torch.zeros(4, 3)
    q, _ = wage.quantize_error(z, 8)
    assert torch.equal(q, z)
    steps, _ = wage.round_update_steps(z, 8.0, 16, wage.randomizer(z.shape, 16, None, "cpu"))
    assert torch.equal(steps, z)
    # the normalisation is unchanged above the floor: the largest entry still maps to ~1
    tiny = t(2.0**-90, -(2.0**-91))
    q, p = wage.quantize_error(tiny, 8)
    assert p.item() == -90 and torch.equal(q, t(127 / 128, -0.5))


def test_eta_scale_keeps_the_papers_update_to_weight_step_ratio() -> None:
    """eta = lr 2^(2 - k_W): k_W = 2 (the paper's 2-8-8-8) unchanged; the largest update, eta sigma(k_G),
    stays 1/8 of a k_W grid step at every k_W; ``eta_per_bits=false`` gives eta = lr."""
    assert Wage(bits=2).eta_scale == 1.0
    for k in range(2, 9):
        assert 8.0 * Wage(bits=k).eta_scale * wage.sigma(8) == wage.sigma(k) / 8
    assert Wage(bits=8, eta_per_bits=False).eta_scale == 1.0


def test_fast_quantize_equals_pure_composition() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * 0.7
    x[:1000] = torch.randint(-300, 300, (1000,), generator=g) / 256  # exact ties on the 8-bit grid
    for k in (2, 3, 4, 8):
        assert torch.equal(wage.quantize(x, k), wage.Q(wage.C(x, k), k))
        assert torch.equal(wage.quantize_weight(x, k, 16.0), wage.Q(wage.C(x, k), k) / 16)


def test_clip_grad_passes_inside_and_at_the_bounds() -> None:
    m = 127 / 128
    above = torch.nextafter(t(m), t(2.0)).item()  # one float32 ulp outside
    x = t(-1.0, -m, 0.0, 0.5, m, above, 1.0)
    assert torch.equal(wage.clip_grad(torch.ones(7), x, 8), t(0, 1, 1, 1, 1, 0, 0))


def test_quantize_error_hand_values() -> None:
    # max|e| = 0.3 -> Shift 0.25 -> e/0.25 = (1.2, -0.4, 0.01, 0.002) -> clip 127/128, round to 1/128
    q, p = wage.quantize_error(t(0.3, -0.1, 0.0025, 0.0005), 8)
    assert p.item() == -2
    assert torch.equal(q, t(127 / 128, -51 / 128, 1 / 128, 0.0))  # -0.4*128 = -51.2; 0.01*128 = 1.28


def test_round_update_hand_values() -> None:
    # max|g| = 0.3 -> Shift 0.25; x = (1.2, -0.4, 0.2, 0); lr = 1; Q(x, 16) in units of 2^-15:
    # c = (39322, -13107, 6554, 0) [39321.6, -13107.2, 6553.6 rounded]; floor((c + r) / 2^15):
    g = t(0.3, -0.1, 0.05, 0.0)
    r = t(32767, 0, 26214, 32767)  # 39322+32767 -> 2 ; -13107+0 -> -1 ; 6554+26214 = 32768 -> 1 ; 0 -> 0
    steps, p = wage.round_update_steps(g, 1.0, 16, r)
    assert p.item() == -2 and torch.equal(steps, t(2, -1, 1, 0))
    dw, _ = wage.round_update(g, 1.0, 8, 16, t(0, 32767, 26213, 0))  # 1.2 -> 1 ; -0.4 -> 0 ; 0.2 -> 0
    assert torch.equal(dw, t(1 / 128, 0, 0, 0))
    dw, _ = wage.round_update(g, 8.0, 8, 16, torch.zeros(4))  # lr 8: 9.6 -> 9, -3.2 -> -4, 1.6 -> 1
    assert torch.equal(dw, t(9, -4, 1, 0) / 128)


def test_round_update_is_unbiased() -> None:
    """E[n] = Q(lr x, k_R): the stochastic rounding neither gains nor loses update on average."""
    gen = torch.Generator().manual_seed(1)
    g = t(0.3, -0.1, 0.05, -0.2).repeat(50_000, 1)
    r = wage.randomizer(g.shape, 16, gen, "cpu")
    steps, _ = wage.round_update_steps(g, 1.0, 16, r)
    assert torch.allclose(steps.mean(0), t(1.2, -0.4, 0.2, -0.8), atol=0.01)


def test_layer_scales_vgg7_cifar_and_lenet5_match_official_logs() -> None:
    m = Wage()
    m.prepare(VGG("vgg7", 3, 10, 32, bn=False, bias=False), RunContext())
    assert [x["alpha"] for x in m.manifest(None)["layers"]] == [2, 16, 16, 16, 16, 32, 32, 16]
    m = Wage()
    m.prepare(LeNet5(1, 10, 28, bias=False), RunContext())
    assert [x["alpha"] for x in m.manifest(None)["layers"]] == [2, 16, 16, 8]
    assert wage.init_limit(25, 2) == 0.75 and wage.init_limit(3, 2) == 1.0


# ---- the method ----------------------------------------------------------------------------------
def _steps(method: Wage, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           n: int) -> None:
    for step in range(n):
        train_step(model, method, opt, x, y, step)


def _setup(make: type | object, shape: tuple[int, ...], seed: int = 0, batch: int = 16, lr: float = 8.0,
           **kw: object) -> tuple[Wage, nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    m = Wage(**kw)
    model = m.prepare(make(), RunContext())
    opt = torch.optim.SGD(m.param_groups(model), lr=lr, momentum=0.9, weight_decay=1e-3)
    x = torch.rand(batch, *shape) * 2 - 1
    y = torch.randint(0, 10, (batch,))
    return m, model, opt, x, y


MODELS = {
    "lenet5": (lambda: LeNet5(1, 10, 28, bias=False), (1, 28, 28)),
    # 8x8 inputs keep VGG-7 cheap on CPU (the CIFAR shape is covered by the alpha test)
    "vgg7": (lambda: VGG("vgg7", 3, 10, 8, bn=False, bias=False), (3, 8, 8)),
    "mlp": (lambda: MLP(1, 10, 28, width=64, depth=2, bn=False, bias=False), (1, 28, 28)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_family_trains_and_weights_stay_on_the_kg_grid(name: str) -> None:
    make, shape = MODELS[name]
    # 2-bit weights start on the grid and cross to another level only after several k_G steps (the loss
    # is flat for the first 3); VGG-7, the costly one on CPU, gets a larger eta and fewer steps
    vgg = name == "vgg7"
    m, model, opt, x, y = _setup(make, shape, batch=16, lr=16.0 if vgg else 8.0)
    with torch.no_grad():
        loss0 = m.criterion(model(x), y).item()
    _steps(m, model, opt, x, y, 5 if vgg else 12)
    with torch.no_grad():
        loss1 = m.criterion(model(x), y).item()
    assert math.isfinite(loss1) and loss1 < loss0
    assert opt.state_dict()["state"] == {}, "the optimizer must never step WAGE's weights"
    lim = 1 - wage.sigma(m.bits)
    for _, layer in m.layers:
        w = shadow_weight(layer)
        codes = w * wage.S(m.bits_g)
        assert torch.equal(codes, codes.round()), "stored weights left the k_G grid"
        assert w.abs().max() <= lim
    metrics = m.metrics()
    assert {"g_zero", f"e_shift/{m.layers[0][0]}", f"w_levels/{m.layers[-1][0]}"} <= set(metrics)
    assert metrics["g_zero"] < 1, "every quantized gradient was zero, yet the loss fell"


def test_errors_reaching_a_layer_are_on_the_ke_grid() -> None:
    m, model, opt, x, y = _setup(*MODELS["lenet5"], bits_e=6)
    seen: list[torch.Tensor] = []
    act = next(mod for mod in model.modules() if isinstance(mod, WageActivation) and mod.bits_e)

    def grab(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inp[0].retain_grad()
        seen.append(inp[0])

    act.register_forward_hook(grab)
    m.criterion(model(x), y).backward()
    e = seen[0].grad
    assert e.abs().max() <= 1 - wage.sigma(6) and e.abs().max() > 0
    assert torch.equal(e * 32, (e * 32).round())


def test_activation_placement_equals_paper_order() -> None:
    """conv -> ReLU -> pool -> QE -> QA (ours) == conv -> pool -> ReLU -> QE -> QA (paper), fwd and bwd."""
    torch.manual_seed(3)
    m = Wage()
    net = m.prepare(nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(4 * 25, 10, bias=False)), RunContext())
    conv, fc = net.net[0], net.net[4]
    x = torch.rand(6, 1, 12, 12) * 2 - 1
    y = torch.randint(0, 10, (6,))
    out = net(x)
    m.criterion(out, y).backward()
    ours = shadow_weight(conv).grad.clone()
    for p in net.parameters():
        p.grad = None
    from qexp.methods.wage.layers import _ActErrorFn, _ErrorFn

    h = F.max_pool2d(F.conv2d(_ActErrorFn.apply(x, 8, None, None), conv.weight), 2).relu()
    h = _ActErrorFn.apply(h, 8, 8, None).flatten(1)
    ref = _ErrorFn.apply(F.linear(h, fc.weight), 8, None)
    m.criterion(ref, y).backward()
    assert torch.equal(out, ref)
    assert torch.equal(ours, shadow_weight(conv).grad)


def test_a_non_positive_beta_is_one_clear_error() -> None:
    """method.beta=0 was a math domain error (log2 of the init limit) from inside prepare."""
    for beta in (0, -1, float("inf"), float("nan")):
        with pytest.raises(QexpError, match="method.beta"):
            Wage(beta=beta)


def test_unsupported_models_get_one_clear_error() -> None:
    with pytest.raises(QexpError, match="model.bn=false model.bias=false"):
        Wage().prepare(VGG("vgg7", bn=True, bias=False), RunContext())
    with pytest.raises(QexpError, match="without biases.*model.bias=false"):
        Wage().prepare(LeNet5(bias=True), RunContext())
    with pytest.raises(QexpError, match="chain networks"):
        Wage().prepare(CifarResNet(20), RunContext())
    with pytest.raises(QexpError, match="dropout"):
        Wage().prepare(MLP(bn=False, bias=False, dropout=0.5), RunContext())
    with pytest.raises(QexpError, match="bits=1"):
        Wage(bits=1)
    with pytest.raises(QexpError, match="bits_g"):
        Wage(bits=4, bits_g=3)
    assert Wage().bits_label() == "2-8-8-8" and Wage(bits=4, bits_e=6).bits_label() == "4-8-8-6"


@pytest.mark.parametrize("model", ["resnet20", "wrn", "resnet18"])
def test_wage_on_a_residual_net_is_refused_naming_batchnorm(model: str) -> None:
    """method=wage sets model.bn=false model.bias=false: a residual net took neither keyword, and the
    refusal named an unexpected keyword argument 'bias'; now it says the net always has BatchNorm."""
    from conftest import compose_train

    from qexp.run.session import instantiate

    cfg = compose_train(["method=wage", f"model={model}", "dataset=synthetic"])
    with pytest.raises(QexpError, match="always has BatchNorm .*such as wage.*lenet5, vgg\\* or mlp"):
        instantiate(cfg.model, in_channels=3, num_classes=10, image_size=32)


def test_state_dict_round_trip_resumes_exactly() -> None:
    make, shape = MODELS["lenet5"]
    m, model, opt, x, y = _setup(make, shape)
    _steps(m, model, opt, x, y, 2)
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, m.state_dict())
    _steps(m, model, opt, x, y, 3)
    m2, model2, opt2, _, _ = _setup(make, shape, seed=5)
    model2.load_state_dict(saved[0])
    m2.load_state_dict(saved[1])
    _steps(m2, model2, opt2, x, y, 3)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


# ---- integer inference ---------------------------------------------------------------------------
def test_rshift_round_half_even_and_weight_codes() -> None:
    a = torch.tensor([5, 7, -5, -7, 6, -6, 9, 3])
    assert torch.equal(rshift_round(a, 1), torch.tensor([2, 4, -2, -4, 3, -3, 4, 2]))
    assert torch.equal(rshift_round(a, 2), torch.tensor([1, 2, -1, -2, 2, -2, 2, 1]))
    assert torch.equal(rshift_round(a, -2), a * 4)
    codes, e = weight_codes(t(0.0625, -0.03125, 0.0))
    assert e == -5 and codes.tolist() == [2, -1, 0] and codes.dtype == torch.int8
    with pytest.raises(QexpError, match="not int8 codes with a power-of-two scale"):
        weight_codes(t(0.1, 0.3))  # float32 values are dyadic, but need ~2^25 levels


def test_integer_export_refuses_unquantized_and_non_chain_networks() -> None:
    with pytest.raises(QexpError, match="quantized input"):
        export(LeNet5(bias=False), torch.zeros(1, 1, 28, 28))
    with pytest.raises(QexpError, match="chain"):
        export(CifarResNet(8), torch.zeros(1, 3, 32, 32))


def _mnist_test(data_root, normalize: str = "signed"):
    from qexp.data.mnist import build

    return build(root=str(data_root), batch_size=64, eval_batch_size=500, seed=0, device="cpu",
                 normalize=normalize, train_subset=2048, download=False)


@pytest.mark.parametrize("normalize,qa_logits", [("signed", False), ("byte256", True)])
def test_integer_forward_equals_fake_quantized_on_real_mnist(data_root, normalize, qa_logits) -> None:
    """Fresh and briefly trained WAGE LeNet-5: every logit of 1000 real test images is identical, with
    the CIFAR code's inputs and the official MNIST code's (X/256, QA on the logits)."""
    from qexp.methods.wage.integer_eval import compare

    data = _mnist_test(data_root, normalize)
    torch.manual_seed(0)
    m = Wage(qa_logits=qa_logits)
    model = m.prepare(LeNet5(bias=False), RunContext())
    opt = torch.optim.SGD(m.param_groups(model), lr=8)
    res, _ = compare(model, data.test, limit=1000)
    assert res["images"] == 1000 and res["differing_predictions"] == 0 and res["differing_logit_rows"] == 0
    data.train.set_epoch(0)
    for x, y in data.train:
        _steps(m, model, opt, x, y, 1)
    res, net = compare(model, data.test, limit=1000)
    assert res["differing_predictions"] == 0 and res["differing_logit_rows"] == 0
    assert res["accuracy"] > 25, res  # 32 steps of batch 64: measured 44.7% (chance: 10%)
    assert all(op["weight"].dtype == torch.int8 for op in net.ops if "weight" in op)
    assert {layer["accumulator"] for layer in res["layers"]} == {"int32"}


@pytest.mark.slow
def test_e2e_wage_mnist_and_integer_eval(tmp_path, data_root) -> None:
    """``qexp train method=wage`` LeNet-5 on real MNIST, 2 epochs of 30k images at eta = 8, batch 64
    (938 steps): measured 97.86% test accuracy (batch 128, 470 steps: 97.37%, as the official log's
    97.35% after its first 468 steps); then ``qexp eval --integer`` gives 0 differing predictions."""
    env = {"QEXP_DATA": str(data_root)}
    run_qexp(["train", f"out_root={tmp_path}", "method=wage", "model.bias=false", "epochs=2",
              "batch_size=64", "dataset.train_subset=30000"], env=env, timeout=1800)
    (run,) = find_runs(tmp_path)
    rec = read_metrics(run)
    assert rec["status"] == "completed" and rec["bits_tag"] == "2-8-8-8"
    assert rec["test_acc"] >= 97.0, rec["test_acc"]
    assert "method/g_zero" in rec["history"][-1]
    proc = run_qexp(["eval", str(run), "--integer"], env=env, timeout=1800)
    assert "0 differing predictions" in proc.stdout
    res = __import__("json").loads((run / "integer_eval.json").read_text())
    assert res["differing_predictions"] == 0 and res["images"] == 10000
    assert abs(res["accuracy"] - rec["test_acc"]) < 1e-9
