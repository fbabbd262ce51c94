"""Paper presets: each fidelity fix of issues 14 and 23 pinned by a test (configs compose to what the papers do)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from torch import nn

from qexp.methods.base import squared_hinge, squared_hinge_mean
from qexp.quant.activation import lloyd_max_alpha, quantized_relu, relu_gaussian_mse
from qexp.run.session import build
from tests.conftest import REPO, compose_train

TINY_MNIST = ["dataset.train_subset=256", "eval_batch_size=500", "device=cpu"]
LI_METHODS = ("float", "bc_li", "big_sr", "sr", "r")


def _build(overrides: list[str], data_root):
    cfg = compose_train([*overrides, f"data_root={data_root}"])
    torch.manual_seed(0)
    return cfg, build(cfg, torch.device("cpu"))


# ---- 1. Li et al.: one base learning rate and schedule for every method -----------------------------
@pytest.mark.parametrize("preset", ["li2017_mnist", "li2017_cifar10"])
def test_li2017_every_method_gets_the_same_lr_and_schedule(preset) -> None:
    seen = set()
    for m in LI_METHODS:
        cfg = compose_train([f"+experiment={preset}", f"method={m}"])
        assert cfg.method.get("lr_scale", "none") == "none"  # no BinaryConnect W_LR_scale in this paper
        seen.add((cfg.lr, cfg.sched.name, cfg.batch_size, cfg.optim.name))
    assert len(seen) == 1, seen


def test_li2017_bc_param_groups_all_at_the_base_lr(data_root) -> None:
    cfg, b = _build(["+experiment=li2017_mnist", "method=bc_li", *TINY_MNIST], data_root)
    assert {g["lr"] for g in b.optimizer.param_groups} == {cfg.lr}
    assert b.method.name == "bc" and b.method.clip is False  # Li et al.'s w_r is not clipped
    # BinaryConnect's own presets keep its per-layer scale (> 1 for every layer)
    cfg2 = compose_train(["+experiment=bc2015_mnist"])
    assert cfg2.method.lr_scale == "glorot"


# ---- 2. Li et al.: the grid scale is the number format's, not the learning rate's -----------------
def _r_flips(overrides: list[str], data_root) -> float:
    from qexp.run.session import Trainer

    cfg, b = _build(["+experiment=li2017_mnist", "method=r", "dataset.train_subset=640", *overrides,
                     "eval_batch_size=1000", "device=cpu"], data_root)
    t = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, torch.device("cpu"), 1,
                progress_bar=False)
    t.fit()
    return t.progress.history[-1]["method/flip_frac"]


def test_li2017_r_rounds_its_updates_away_at_the_default_scale(data_root, one_thread) -> None:
    """s >> lr (the preset): R's 1-bit weight flips only when lr*|u| > s, so (almost) nothing moves, the
    paper's reason R is worst; at s = lr (one point of the li2017_scale sweep) R's weights do flip."""
    assert _r_flips([], data_root) < 1e-3
    assert _r_flips(["grid_scale=0.001"], data_root) > 0.001


def test_li2017_grid_scale_is_per_layer_and_independent_of_lr(data_root) -> None:
    """Li et al.'s Delta is a property of the number format: the presets' grid scale does not follow the
    learning rate, is each layer's own (Glorot) scale, and is far above the step (s >= 10 lr)."""
    for preset in ("li2017_mnist", "li2017_cifar10"):
        assert compose_train([f"+experiment={preset}"]).grid_scale == "glorot"
    for m in ("bc_li", "sr", "r", "big_sr"):
        cfg, b = _build(["+experiment=li2017_mnist", f"method={m}", *TINY_MNIST], data_root)
        scales = [q.scale for q in b.method.layers]
        assert len(scales) == 4 and len(set(scales)) > 1 and min(scales) >= 10 * cfg.lr
        _, b2 = _build(["+experiment=li2017_mnist", f"method={m}", "lr=0.01", *TINY_MNIST], data_root)
        assert [q.scale for q in b2.method.layers] == scales


def test_li2017_scale_sweep_selects_on_validation_at_the_end_with_every_method() -> None:
    text = (REPO / "configs" / "experiment" / "li2017_scale.yaml").read_text()
    params = yaml.safe_load(text)["hydra"]["sweeper"]["params"]
    assert set(params["method"].split(",")) == set(LI_METHODS)
    assert "glorot" in params["grid_scale"] and "0.001" in params["grid_scale"].split(",")
    cfg = compose_train(["+experiment=li2017_scale", "method=sr", "grid_scale=0.001"])
    assert cfg.objective == "val_error" and cfg.dataset.val_size > 0  # the last epoch, never the test set
    assert cfg.method.scale == 0.001 and cfg.model.bn_out is True


def test_bc_li_keeps_its_initial_weights_when_unclipped(data_root) -> None:
    """clip=false: prepare does not clamp w_r to [-s, s] (at s = lr that clamp alone let epoch 1 flip ~46%
    of BC's signs); BinaryConnect's own clip=true still starts inside [-s, s]."""
    over = ["+experiment=li2017_mnist", "grid_scale=0.001", *TINY_MNIST]
    _, ref = _build([*over, "method=float"], data_root)
    _, li = _build([*over, "method=bc_li"], data_root)
    _, clipped = _build([*over, "method=bc_li", "method.clip=true"], data_root)
    ref_w = {n: p for n, p in ref.model.named_parameters() if p.dim() > 1}
    for q, c in zip(li.method.layers, clipped.method.layers, strict=True):
        w = ref_w[f"{q.name}.weight"]
        assert torch.equal(q.weight, w) and w.abs().max() > 0.001  # the float init, untouched
        assert torch.equal(c.weight, w.clamp(-0.001, 0.001))


@pytest.mark.parametrize("model", ["vgg9", "wrn56_2", "resnet56"])
def test_li2017_cifar10_nets_normalise_the_output_layer(model) -> None:
    """li2017_cifar10: BN after the output layer (the BinaryConnect VGG has one) and warm-started BN
    statistics, as li2017_mnist; without bn_out 1-bit output weights set the logits' scale."""
    from qexp.run.session import instantiate

    cfg = compose_train(["+experiment=li2017_cifar10", f"model={model}"])
    assert cfg.model.bn_out is True and cfg.model.bn_warm_start is True
    net = instantiate(cfg.model, in_channels=3, num_classes=10, image_size=32)
    last = [m for m in net.modules() if not isinstance(m, nn.Sequential)][-1]
    assert isinstance(last, nn.BatchNorm1d) and last.num_features == 10
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    assert linear.bias is None  # the BN's shift replaces it
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(getattr(m, "_warm_pending", False) for m in bns)
    plain = instantiate(compose_train([f"model={model}"]).model, in_channels=3, num_classes=10, image_size=32)
    assert isinstance([m for m in plain.modules() if not isinstance(m, nn.Sequential)][-1], nn.Linear)


def test_bn_warm_start_takes_the_first_batch_statistics() -> None:
    from qexp.models.lenet import LeNet5

    torch.manual_seed(0)
    m = LeNet5(bn=True, bn_out=True, bn_warm_start=True)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(1e-3)  # weights at the li2017 grid scale
    x = torch.randn(64, 1, 28, 28)
    m.train()
    m(x)
    bn = m.features[1]
    assert bn.momentum == 0.1 and bn.running_var.max() < 1e-3  # the batch's variance, not 0.9 * 1 + ...
    var = bn.running_var.clone()
    m(x * 2)
    assert torch.allclose(bn.running_var, 0.9 * var + 0.1 * 4 * var * 64 / 63 * 63 / 64, rtol=0.05)
    assert compose_train(["+experiment=li2017_mnist"]).model.bn_warm_start is True


def test_flip_fraction_is_a_table_metric() -> None:
    from qexp.run import record

    hist = [{"test_error": 5.0, "train_loss": 1.0, "images_per_s": 1.0, "method/flip_frac": f}
            for f in (0.2, 0.1)]
    rec = record.build({}, "completed", hist, 1.0)
    assert rec["flip_frac"] == 0.1 and rec["mean_flip_frac"] == pytest.approx(0.15)


# ---- 3. WAGE on MNIST as the official code -------------------------------------------------------
def test_wage_mnist_inputs_x_over_256_and_qa_on_logits(data_root) -> None:
    from qexp.data.mnist import build as mnist

    data = mnist(root=str(data_root), normalize="byte256", train_subset=64, batch_size=64, download=False)
    x, _ = next(iter(data.test))
    raw = data.test.images[: len(x)].float()
    assert torch.equal(x, raw / 256) and x.min() >= 0 and x.max() < 1
    cfg = compose_train(["+experiment=wage_mnist"])
    assert cfg.dataset.normalize == "byte256" and cfg.method.qa_logits is True
    cfg, b = _build(["+experiment=wage_mnist", *TINY_MNIST], data_root)
    out = b.model(x[:8])
    assert out.abs().max() <= 1 - 2**-7 and torch.equal(out * 128, (out * 128).round())


def test_method_wage_works_as_typed(data_root) -> None:
    """`qexp train method=wage`: the method's config turns BN and biases off itself."""
    cfg, b = _build(["method=wage", *TINY_MNIST], data_root)
    assert cfg.model.bn is False and cfg.model.bias is False
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in b.model.modules())


# ---- 4. Yin et al. ---------------------------------------------------------------------------------
def test_yin_staircase_steps_up_and_round_is_an_option() -> None:
    x = torch.tensor([-1.0, 0.0, 0.1, 0.5, 0.99, 1.0, 1.01, 2.5, 3.0, 9.0])
    ceil = quantized_relu(x, 1.0, 2)
    assert ceil.tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3, 3]  # k alpha for (k-1) alpha < x <= k alpha
    rnd = quantized_relu(x, 1.0, 2, "round")
    assert rnd.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 3, 3]
    cfg = compose_train(["method=ste"])
    assert cfg.method.staircase == "ceil"


def test_lloyd_max_alpha_is_computed_and_optimal() -> None:
    assert lloyd_max_alpha(1) == pytest.approx(math.sqrt(2 / math.pi), abs=1e-4)  # E[x | x > 0]
    for bits in (2, 4):
        a = lloyd_max_alpha(bits)
        f = relu_gaussian_mse(a, bits)
        assert f < relu_gaussian_mse(a * 1.05, bits) and f < relu_gaussian_mse(a * 0.95, bits)
    # Monte Carlo agrees with the quadrature
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g, dtype=torch.float64)
    a = lloyd_max_alpha(2)
    mc = float((quantized_relu(x, a, 2) - x.clamp(min=0)).pow(2).mean())
    assert mc == pytest.approx(relu_gaussian_mse(a, 2), rel=0.02)


def test_yin2019_mnist_has_affine_free_bn_before_every_quantized_relu(data_root) -> None:
    from qexp.quant.activation import QuantReLU

    cfg, b = _build(["+experiment=yin2019_mnist", "method.ste=relu", "bits=2", *TINY_MNIST], data_root)
    mods = [m for m in b.model.modules() if not isinstance(m, nn.Sequential) and m is not b.model]
    quants = [i for i, m in enumerate(mods) if isinstance(m, QuantReLU)]
    assert len(quants) == 3
    for i in quants:
        bn = mods[i - 1]
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.affine
        assert float(mods[i].alpha) == pytest.approx(lloyd_max_alpha(2), rel=1e-6)


def test_init_from_starts_from_another_runs_weights(tmp_path, data_root, one_thread) -> None:
    from qexp.errors import QexpError
    from qexp.run import checkpoint
    from qexp.run.session import CHECKPOINT

    over = ["+experiment=yin2019_mnist", "method.ste=clipped_relu", "bits=2", *TINY_MNIST]
    _, src = _build(over, data_root)
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(1.0)
    checkpoint.save(tmp_path / CHECKPOINT, {"model": src.model.state_dict()})
    _, dst = _build(["+experiment=yin2019_instability", f"init_from={tmp_path}", *TINY_MNIST], data_root)
    for a, c in zip(src.model.state_dict().values(), dst.model.state_dict().values()):
        assert torch.equal(a, c)
    assert dst.method.estimator == "identity"
    with pytest.raises(QexpError, match="no checkpoint.pt"):
        _build(["+experiment=yin2019_instability", f"init_from={tmp_path / 'nope'}", *TINY_MNIST], data_root)


# ---- 5. Lacey et al.: six quantized layers ---------------------------------------------------------
def test_lacey2018_model_has_six_quantized_layers(data_root) -> None:
    _, b = _build(["+experiment=lacey2018_mnist", "method=learned", "bits=4", *TINY_MNIST], data_root)
    assert len(b.method.layers) == 6


# ---- 6. BinaryConnect's CIFAR-10 net and loss -----------------------------------------------------
def test_bc2015_cifar10_block_order_and_output_bn() -> None:
    from qexp.models.vgg import VGG

    cfg = compose_train(["+experiment=bc2015_cifar10"])
    assert cfg.model.order == "conv_pool_bn_relu" and cfg.model.bn_out is True
    assert cfg.method.loss == "sqhinge_mean"
    net = VGG("vgg9", order="conv_pool_bn_relu", bn_out=True)
    kinds = [type(m).__name__ for m in net.features][:9]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU",
                     "Conv2d", "BatchNorm2d"]
    assert isinstance(net.classifier[-1], nn.BatchNorm1d)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_squared_hinge_mean_is_the_codes_average() -> None:
    y = torch.randn(5, 10)
    t = torch.tensor([0, 3, 9, 1, 1])
    assert squared_hinge_mean(y, t) == pytest.approx(float(squared_hinge(y, t)) / 10)


# ---- 7. every preset's model matches a reference column, or the preset says it has none ----------
def test_li2017_cifar10_models_match_reference_columns() -> None:
    ref = yaml.safe_load((REPO / "configs" / "reference" / "li2017.yaml").read_text())
    cols = {c["model"] for c in ref["columns"].values() if c["dataset"] == "cifar10"}
    text = (REPO / "configs" / "experiment" / "li2017_cifar10.yaml").read_text()
    models = yaml.safe_load(text)["hydra"]["sweeper"]["params"]["model"].split(",")
    assert set(models) <= cols
    for missing in cols - set(models):
        assert missing in (REPO / "configs" / "reference" / "li2017.yaml").read_text()
        assert "no qexp" in text and "c10_vgg9" in text  # the preset says which column it cannot fill


# ---- 8. DoReFa and PACT as typed: BN before every quantized activation, a float last layer's input ----
@pytest.mark.parametrize("method", ["dorefa", "pact"])
def test_dorefa_pact_turn_bn_on_and_leave_the_last_layers_input_unquantized(method, data_root) -> None:
    """`qexp train method=dorefa|pact`: the method's config turns BN on (its clip at a fixed or learned
    level assumes normalised inputs), and with the last layer float (first_last_bits=32) its input is
    the clip without rounding, as the official DoReFa code's `nonlin` before `fct`."""
    from qexp.methods.pact import PACTReLU
    from qexp.quant.activation import QuantReLU

    cfg, b = _build([f"method={method}", *TINY_MNIST], data_root)
    assert cfg.model.bn is True
    leaves = [m for m in b.model.modules() if not any(True for _ in m.children())]
    acts = [m for m in leaves if isinstance(m, (QuantReLU, PACTReLU, nn.Hardtanh))]
    assert len(acts) == 3 and not any(isinstance(m, nn.ReLU) for m in leaves)
    last_in = acts[-1]
    assert leaves.index(last_in) + 1 == leaves.index([m for m in leaves if isinstance(m, nn.Linear)][-1])
    x = torch.linspace(-1, 3, 101)
    with torch.no_grad():
        if method == "dorefa":
            assert isinstance(last_in, nn.Hardtanh) and torch.equal(last_in(x), x.clamp(0, 1))
            assert all(isinstance(m, QuantReLU) for m in acts[:-1])
        else:
            assert last_in.bits == 32 and torch.equal(last_in(x), x.clamp(0, 10.0))
            assert all(m.bits == 2 for m in acts[:-1])
            assert len(torch.unique(acts[0](x * 5))) <= 4  # the hidden ones stay 2-bit
    rows = b.method.manifest(b.model)["activations"]
    assert [r["bits"] for r in rows] == [2, 2, 32] and rows[-1]["kind"] == "float"
    # first_last_bits quantizes the last layer: then its input is quantized too
    _, q = _build([f"method={method}", "method.first_last_bits=4", *TINY_MNIST], data_root)
    assert [r["bits"] for r in q.method.manifest(q.model)["activations"]] == [2, 2, 2]


@pytest.mark.parametrize("method", ["dorefa", "pact"])
def test_dorefa_pact_refuse_a_quantized_activation_without_bn(method, data_root) -> None:
    from qexp.errors import QexpError

    with pytest.raises(QexpError, match=r"needs a BatchNorm before each quantized one; LeNet5's features.1 "
                                        r"has none \(use model.bn=true"):
        _build([f"method={method}", "model.bn=false", *TINY_MNIST], data_root)
    _, b = _build([f"method={method}", "model.bn=false", "abits=32", *TINY_MNIST], data_root)  # float acts
    assert b.method.activations == []


def test_residual_nets_take_model_bn_but_cannot_drop_it() -> None:
    from qexp.errors import QexpError
    from qexp.methods.dorefa import unnormalised_activations
    from qexp.run.session import instantiate

    for model in ("resnet20", "wrn"):
        cfg = compose_train(["method=dorefa", f"model={model}"])
        assert cfg.model.bn is True
        net = instantiate(cfg.model, in_channels=3, num_classes=10, image_size=32)
        relus = {n for n, m in net.named_modules() if isinstance(m, nn.ReLU)}
        assert relus and unnormalised_activations(net, relus) == []
        with pytest.raises(QexpError, match="always has BatchNorm"):
            instantiate(compose_train([f"model={model}", "+model.bn=false"]).model, in_channels=3,
                        num_classes=10, image_size=32)


# ---- 9. BinaryConnect MNIST follows one source: the official code's mnist.py --------------------------
def test_bc2015_mnist_is_the_official_mnist_script() -> None:
    """3x2048 + BN (output too), batch 100, Adam 1e-3 -> 3e-6 exponential over the epochs, 50k/10k split,
    stochastic BC with H = 1 and Glorot W_LR_scale, the mean squared hinge (mnist.py, commit 58c9c1b);
    not the CIFAR-10 script's 3e-3 -> 2e-6 rule and not the paper's batch 200."""
    from qexp.run.sched import exp

    cfg = compose_train(["+experiment=bc2015_mnist"])
    assert (cfg.model.name, cfg.model.width, cfg.model.depth, cfg.model.bn, cfg.model.bn_out) == \
        ("mlp", 2048, 3, True, True)
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.optim.name, cfg.dataset.val_size) == \
        (100, 0.001, 250, "adam", 10000)
    assert cfg.method.stochastic and cfg.method.scale == 1 and cfg.method.lr_scale == "glorot"
    assert cfg.method.init_uniform and cfg.method.loss == "sqhinge_mean"
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = exp(opt, epochs=cfg.epochs, final_ratio=cfg.sched.final_ratio)
    for _ in range(cfg.epochs - 1):
        opt.step()  # no gradient: nothing moves; the order torch expects (no warning)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-6, rel=1e-6)  # LR_fin at the last epoch
