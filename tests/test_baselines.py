"""LSQ, PACT and DoReFa: each paper's forward and gradient rules, their options, run labels, the build +
Trainer path with exact resume (synthetic data), and MNIST accuracies: tests/test_baselines_e2e.py."""

from __future__ import annotations

import math

import pytest
import torch

from qexp.errors import QexpError
from qexp.methods.base import RunContext
from qexp.methods.dorefa import DoReFa, dorefa_weight, quantize_gradient
from qexp.methods.lsq import LSQ, lsq_quantize, qrange
from qexp.methods.pact import PACT, PACTReLU
from qexp.models.lenet import LeNet5
from qexp.quant.inject import shadow_weight, weight_layers, weight_quantizer
from qexp.quant.kernels import Noise
from tests.conftest import compose_train
from tests.test_weight_methods import make, roundtrip

pytestmark = pytest.mark.usefixtures("one_thread")


def lenet(method, seed: int = 0):
    torch.manual_seed(seed)
    return method.prepare(LeNet5(in_channels=1, num_classes=10, image_size=28, bn=True), RunContext(seed=seed))


# ---- LSQ ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "signed"), [(2, True), (3, False), (4, True), (8, False)])
def test_lsq_gradients_are_the_papers(bits, signed):
    """dv: straight-through inside [-Q_N s, Q_P s], 0 outside; ds: g * sum(grad * (round(v/s) - v/s))
    inside, -Q_N below, Q_P above (eqs. 3-5); the forward is on the grid s * {-Q_N..Q_P}."""
    torch.manual_seed(bits)
    q_n, q_p = qrange(bits, signed)
    v = (torch.randn(4000, dtype=torch.float64) * 2 * q_p * 0.3).requires_grad_()
    s = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    g = 1 / math.sqrt(v.numel() * q_p)
    up = torch.randn_like(v)
    out = lsq_quantize(v, s, q_n, q_p, g)
    (out * up).sum().backward()
    r = v.detach() / s.detach()
    k = out.detach() / s.detach()
    assert torch.allclose(k, k.round()) and k.min() >= -q_n and k.max() <= q_p
    assert torch.allclose(k, r.clamp(-q_n, q_p).round())
    inside = (r > -q_n) & (r < q_p)
    assert 0 < inside.float().mean() < 1  # both regimes are exercised
    assert torch.equal(v.grad, torch.where(inside, up, 0))
    dsdv = torch.where(r <= -q_n, float(-q_n), torch.where(r >= q_p, float(q_p), r.round() - r))
    assert torch.allclose(s.grad, g * (up * dsdv).sum())


def test_lsq_step_init_and_gradient_scale():
    """Weight steps start at 2 mean|w| / sqrt(Q_P) with g = 1/sqrt(N_W Q_P); input steps at 2 mean|x| /
    sqrt(Q_P) of the first batch with g = 1/sqrt(N_F Q_P), N_F the features per example; first and last
    layer at 8 bits (the paper), signed input for the normalised image, unsigned after ReLU."""
    method = LSQ(bits=3)
    model = lenet(method)
    layers = weight_layers(model)
    for i, (_, layer) in enumerate(layers):
        wq = weight_quantizer(layer)
        bits = 8 if i in (0, len(layers) - 1) else 3
        q_p = 2 ** (bits - 1) - 1
        w = shadow_weight(layer).detach()
        assert wq.bits == bits and wq.q_p == q_p and wq.q_n == q_p + 1
        assert math.isclose(float(wq.step.detach()), 2 * float(w.abs().mean()) / math.sqrt(q_p), rel_tol=1e-6)
        assert math.isclose(wq.g, 1 / math.sqrt(w.numel() * q_p))
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, layer in layers]
    x = torch.randn(16, 1, 28, 28)
    model.train()
    model(x)  # the quantizer's hook was registered first: the recorded inputs are already quantized...
    for h in hooks:
        h.remove()
    rows = {r["name"]: r for r in method.manifest(model)["layers"]}
    assert rows["features.0"]["input_signed"] and rows["features.0"]["input_bits"] == 8
    assert not rows["features.4"]["input_signed"] and rows["features.4"]["input_q_p"] == 7
    assert math.isclose(rows["features.0"]["input_step"], 2 * float(x.abs().mean()) / math.sqrt(127), rel_tol=1e-5)
    step = rows["features.4"]["input_step"]
    k = inputs["features.4"] / step  # ... so they lie on the layer's unsigned 3-bit grid
    assert torch.allclose(k, k.round(), atol=1e-4) and k.min() >= 0 and k.max() <= 7
    # the gradient scale of the inputs: N_F = features per example
    iq = layers[1][1].input_quantizer
    a = torch.rand(5, 32, 12, 12, requires_grad=True)
    iq.step.grad = None
    iq(a).sum().backward()
    g = iq.step.grad.clone()
    iq.grad_scale = False
    iq.step.grad = None
    iq(a).sum().backward()
    assert torch.allclose(g, iq.step.grad / math.sqrt(32 * 12 * 12 * 7))


def test_lsq_input_steps_start_in_prepare_from_the_first_training_batch():
    """With the run's data, prepare initialises every input step from the first training batch (so
    data-parallel processes agree) and leaves BatchNorm's running statistics as they were."""
    b, _ = make(["method=lsq"], ["model=lenet5", "model.bn=true"], bits=2, samples=16)
    quantizers = [m for m in b.model.modules() if type(m).__name__ == "LSQInput"]
    assert len(quantizers) == 4 and all(bool(q.initialized) and q._init for q in quantizers)
    x, _ = next(iter(b.data.train))
    first = quantizers[0]
    assert bool(first.signed) and math.isclose(float(first.step.detach()),
                                               2 * float(x.abs().mean()) / math.sqrt(127), rel_tol=1e-5)
    for m in b.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            assert int(m.num_batches_tracked) == 0 and torch.equal(m.running_mean, torch.zeros_like(m.running_mean))


def test_lsq_options_and_label():
    cfg = compose_train(["method=lsq", "bits=4"])
    assert cfg.method.tag == "lsq-w4a4" and cfg.abits == 4
    cfg = compose_train(["method=lsq", "bits=3", "abits=2"])
    assert cfg.method.tag == "lsq-w3a2" and LSQ(bits=3, abits=2).bits_label() == "w3a2"
    method = LSQ(bits=2, abits=32, first_last_bits=32)
    model = lenet(method)
    layers = weight_layers(model)
    assert weight_quantizer(layers[0][1]) is None and weight_quantizer(layers[-1][1]) is None
    assert weight_quantizer(layers[1][1]).bits == 2
    assert not any(hasattr(m, "input_quantizer") for _, m in layers)
    for bad in (dict(bits=1), dict(abits=1), dict(abits=9), dict(first_last_bits=12), dict(step_lr_scale=0)):
        with pytest.raises(QexpError):
            LSQ(**{"bits": 2, **bad})


@pytest.mark.parametrize("module", ["lsq", "pact"])
def test_device_code_path_matches_the_cpu_one(module, monkeypatch):
    """On a GPU the step / alpha stays on the device (no host sync): that branch, run here on CPU,
    gives the same values and gradients as the one-pass CPU kernels."""
    import qexp.methods.lsq as lsq_mod
    import qexp.methods.pact as pact_mod

    mod = lsq_mod if module == "lsq" else pact_mod
    torch.manual_seed(5)
    x0 = torch.randn(3000) * 3
    results = []
    for host in (True, False):
        monkeypatch.setattr(mod, "host_scalars", lambda t, host=host: host)
        x = x0.clone().requires_grad_()
        if module == "lsq":
            s = torch.tensor(0.4, requires_grad=True)
            y = lsq_quantize(x, s, 2, 1, 0.1)
            a = s
        else:
            act = PACTReLU(bits=3, alpha=2.0)
            y = act(x)
            a = act.alpha
        (y * torch.linspace(-1, 1, 3000)).sum().backward()
        results.append((y.detach(), x.grad, a.grad))
    for cpu, dev in zip(*results):
        assert torch.allclose(cpu, dev, atol=1e-5), module


# ---- PACT --------------------------------------------------------------------------------------------
def test_pact_alpha_gradient_is_the_clipped_fraction_plus_l2():
    """d/dalpha of mean(y_q) + lambda alpha^2 = (fraction of inputs >= alpha) + 2 lambda alpha; dx is the
    upstream gradient on [0, alpha), 0 elsewhere; outputs lie on alpha * {0, 1/n, ..., 1}."""
    method = PACT(bits=2, abits=3, alpha_init=2.0, alpha_l2=0.01)
    model = lenet(method)
    name, act = method.activations[0]
    others = [m for _, m in method.activations[1:]]
    torch.manual_seed(1)
    x = (torch.randn(64, 32, 12, 12) * 2).requires_grad_()
    y = act(x)
    loss = y.mean() + method.extra_loss(model)
    loss.backward()
    frac = float((x.detach() >= 2.0).float().mean())
    assert 0.1 < frac < 0.5
    assert math.isclose(float(act.alpha.grad), frac + 2 * 0.01 * 2.0, rel_tol=1e-5)
    assert all(math.isclose(float(m.alpha.grad), 2 * 0.01 * 2.0, rel_tol=1e-6) for m in others)
    inside = (x.detach() > 0) & (x.detach() < 2.0)
    assert torch.equal(x.grad, torch.where(inside, 1.0 / x.numel(), 0.0))
    k = y.detach() / 2.0 * 7
    assert torch.allclose(k, k.round(), atol=1e-5) and k.min() == 0 and k.max() == 7


def test_pact_upstream_gradient_weights_the_alpha_gradient():
    act = PACTReLU(bits=2, alpha=1.5)
    x = torch.linspace(-2, 4, 601, requires_grad=True)
    up = torch.rand(601)
    (act(x) * up).sum().backward()
    assert math.isclose(float(act.alpha.grad), float(up[x.detach() >= 1.5].sum()), rel_tol=1e-6)


def test_pact_groups_weights_and_label():
    method = PACT(bits=2, alpha_lr_scale=3.0)
    model = lenet(method)
    groups = method.param_groups(model)
    assert groups[-1]["name"] == "alpha" and groups[-1]["lr_scale"] == 3.0 and groups[-1]["weight_decay"] == 0
    assert len(groups[-1]["params"]) == 3 and method.bits_label() == "w2a2"
    layers = weight_layers(model)  # DoReFa weights, first and last layer float (the paper)
    assert weight_quantizer(layers[0][1]) is None and weight_quantizer(layers[-1][1]) is None
    assert weight_quantizer(layers[1][1]).bits == 2
    assert compose_train(["method=pact", "bits=4"]).method.tag == "pact-w4a4"
    for bad in (dict(alpha_init=0), dict(alpha_l2=-1), dict(abits=9)):
        with pytest.raises(QexpError):
            PACT(**{"bits": 2, **bad})


# ---- DoReFa ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_dorefa_weights_on_the_k_bit_grid_after_tanh(bits):
    torch.manual_seed(bits)
    w = (torch.randn(64, 32) * 0.3).requires_grad_()
    q = dorefa_weight(w, bits)
    if bits == 1:
        e = float(w.detach().abs().mean())
        assert torch.allclose(q.detach().abs(), torch.full_like(q, e))
        assert torch.equal(torch.sign(q.detach()), torch.where(w.detach() >= 0, 1.0, -1.0))
    else:
        n = 2**bits - 1
        t = torch.tanh(w.detach())
        expect = 2 * torch.round((t / (2 * t.abs().max()) + 0.5) * n) / n - 1
        assert torch.allclose(q.detach(), expect)
        k = (q.detach() + 1) / 2 * n
        assert torch.allclose(k, k.round(), atol=1e-5) and q.detach().abs().max() == 1.0
    q.sum().backward()  # straight-through on the rounding: the gradient is the tanh map's
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("abits", [2, 4])
def test_dorefa_activations_on_the_k_bit_grid(abits):
    method = DoReFa(bits=2, abits=abits)
    lenet(method)
    _, act = method.activations[0]
    x = (torch.randn(1000) * 2).requires_grad_()
    y = act(x)
    n = 2**abits - 1
    assert torch.allclose(y.detach(), torch.round(x.detach().clamp(0, 1) * n) / n, atol=1e-6)
    y.sum().backward()
    assert torch.equal(x.grad, ((x.detach() > 0) & (x.detach() < 1)).float())


def test_dorefa_gradient_quantization():
    """k-bit gradients: per example at most 2^k values 2 m (i/n - 1/2), m = max|dr| of the example;
    unbiased over the noise; seeded; off by default."""
    torch.manual_seed(0)
    dr = torch.randn(3, 50) * torch.tensor([[1.0], [0.01], [100.0]])
    n = 2**4 - 1
    noise = Noise(7)
    q = quantize_gradient(dr, 4, noise)
    for row, qrow in zip(dr, q):
        m = row.abs().max()
        k = (qrow / (2 * m) + 0.5) * n
        assert torch.allclose(k, k.round(), atol=1e-4) and k.min() >= 0 and k.max() <= n
    mean = torch.stack([quantize_gradient(dr, 4, noise) for _ in range(2000)]).mean(0)
    assert torch.allclose(mean / dr.abs().amax(1, keepdim=True), dr / dr.abs().amax(1, keepdim=True), atol=0.02)
    assert torch.equal(quantize_gradient(dr, 4, Noise(7)), q)
    # wired into a model: the gradient reaching a quantized layer's output is quantized
    method = DoReFa(bits=2, gbits=2)
    model = lenet(method, seed=3)
    layer = weight_layers(model)[1][1]
    out = {}

    def keep(m, a, o) -> None:  # runs before the method's hook: o is the layer's own output
        o.register_hook(lambda g: out.__setitem__("g", g))

    layer.register_forward_hook(keep, prepend=True)
    model(torch.randn(4, 1, 28, 28)).pow(2).sum().backward()
    g = out["g"]  # the gradient the layer receives, after quantization: at most 4 levels per example
    for ex in g:
        assert len(torch.unique(ex)) <= 4
    assert DoReFa(bits=2).noise is None and method.bits_label() == "w2a2g2"
    assert compose_train(["method=dorefa", "bits=3"]).method.tag == "dorefa-w3a3"


# ---- build + Trainer: train, manifest, exact resume ---------------------------------------------------
NEW = {"lsq": ["method=lsq"], "pact": ["method=pact"], "dorefa": ["method=dorefa", "method.gbits=4"]}


@pytest.mark.parametrize("method", sorted(NEW))
@pytest.mark.parametrize("family", ["lenet5", "resnet"])
def test_trains_and_resumes_exactly(method, family):
    model = (["model=lenet5", "model.bn=true"], 1, 28) if family == "lenet5" else \
        (["model=resnet20", "model.depth=8"], 3, 16)
    args = dict(model=model[0], channels=model[1], size=model[2], bits=2, samples=16, extra=("epochs=2",))
    b, t = make(NEW[method], **args)
    out = t.fit()
    assert out.status == "completed" and math.isfinite(out.progress.history[-1]["train_loss"])
    b1, t1 = make(NEW[method], **args)
    t1.epochs = 1
    t1.fit()
    state = roundtrip(t1.state_dict())
    b2, t2 = make(NEW[method], **args)
    t2.load_state_dict(state)
    t2.fit()
    for (n, p), p2 in zip(b.model.state_dict().items(), b2.model.state_dict().values()):
        assert torch.equal(p, p2), n
    man = b.method.manifest(b.model)
    assert man["method"] == method and len(man["layers"]) == len(weight_layers(b.model))
    assert 0 < man["weight_bytes"] < man["float32_bytes"]


def test_baselines_cifar10_preset_labels_its_runs():
    """The CIFAR-10 preset records the dataset, model and W/A label its table rows key on."""
    cfg = compose_train(["+experiment=baselines_cifar10", "method=pact", "bits=3"])
    assert (cfg.dataset.name, cfg.model.name, cfg.method.tag) == ("cifar10", "resnet20", "pact-w3a3")


def test_dorefa_abits_followed_from_bits_says_so() -> None:
    """``method=dorefa bits=1``: abits follows bits (``abits: ${bits}``), which the user never typed."""
    with pytest.raises(QexpError, match=r"abits must be in 2..8 or 32 \(float\), got 1 \(abits follows bits "
                                        r"unless set: pass abits=2..8 or 32\)"):
        DoReFa(bits=1, abits=1)
    with pytest.raises(QexpError, match=r"got 9$"):  # abits typed: the plain message
        DoReFa(bits=2, abits=9)
    assert DoReFa(bits=1, abits=2).abits == 2


def test_pact_initial_alpha_follows_the_activation_bits() -> None:
    """The paper's alpha = 10 at 2+ activation bits; 10/3 at 1 bit (at 10 W1A1 did not learn); a typed
    alpha_init is kept at any bits."""
    assert PACT(bits=2).alpha_init == 10.0 and PACT(bits=1, abits=2).alpha_init == 10.0
    assert PACT(bits=1).alpha_init == pytest.approx(10 / 3)
    assert PACT(bits=2, abits=1).alpha_init == pytest.approx(10 / 3)
    assert PACT(bits=4, abits=32).alpha_init == 10.0 and PACT(bits=1, alpha_init=10.0).alpha_init == 10.0

