"""Learned layer-wise precision (``method=learned``): budget invariants, the bit-width gradient, the
logits learning where bits matter, exact resume, every model family, real-MNIST end to end."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qexp.data.synthetic import build as synthetic
from qexp.errors import QexpError
from qexp.methods.base import RunContext, resolve_param_groups
from qexp.methods.learned import LearnedPrecision
from qexp.methods.learned.allocation import (
    BitSource,
    LearnedBitsQuantizer,
    allocation_string,
    most_likely_counts,
    sample_counts,
)
from qexp.models.lenet import LeNet5
from qexp.models.mlp import MLP
from qexp.models.resnet import CifarResNet
from qexp.models.vgg import VGG
from qexp.models.wrn import WideResNet
from qexp.quant.activation import QuantReLU
from qexp.quant.grid import on_grid, quantize_nearest
from qexp.quant.inject import shadow_weight, weight_quantizer
from qexp.run import checkpoint
from qexp.run.sched import constant
from qexp.run.session import Trainer, train_step
from tests.conftest import find_runs, read_metrics, run_qexp

# ---- the allocation sampler ------------------------------------------------------------------------


def _sequential_reference(logits: torch.Tensor, free: int, cap: int, tau: float, seed: int):
    """The definition, one draw at a time: masked argmax forward, masked softmax summed for the gradient."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((free, logits.numel()), generator=g).clamp_(min=torch.finfo(torch.float32).tiny)
    noise = -torch.log(-torch.log(u))
    counts = [0] * logits.numel()
    soft_sum = torch.zeros_like(logits)
    for row in noise:
        full = torch.tensor([c >= cap for c in counts])
        z = (logits + row).masked_fill(full, -math.inf)
        counts[int(z.detach().argmax())] += 1
        soft_sum = soft_sum + F.softmax(z / tau, 0)
    return counts, soft_sum


@pytest.mark.parametrize("layers,bits,lo,hi", [(4, 4, 1, 8), (6, 2, 1, 3), (5, 3, 2, 4), (3, 8, 1, 8),
                                               (7, 1, 1, 8), (4, 5, 1, 6)])
def test_every_draw_spends_exactly_the_budget_within_min_max(layers, bits, lo, hi):
    free, cap = layers * (bits - lo), hi - lo
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        scale = [0.0, 1.0, 10.0][trial % 3]  # extreme logits force layers to saturate
        logits = (torch.randn(layers, generator=gen) * scale).requires_grad_()
        draw = sample_counts(logits, free, cap, tau=0.5, generator=gen)
        alloc = [lo + c for c in draw.counts]
        assert sum(alloc) == bits * layers
        assert all(lo <= b <= hi for b in alloc), alloc
        if draw.soft is not None:
            assert torch.equal(draw.soft, torch.zeros(layers))  # value-free: only carries the gradient


@pytest.mark.parametrize("cap", [8, 4, 3])
def test_vectorised_draws_equal_the_sequential_definition(cap):
    """Same noise, same counts and same logits gradient as drawing bit by bit with masking."""
    free, n = 12, 5
    for seed in range(30):
        logits = (torch.randn(n, generator=torch.Generator().manual_seed(100 + seed)) * 3).requires_grad_()
        weights = torch.arange(1.0, n + 1)  # any downstream use of the soft sum
        draw = sample_counts(logits, free, cap, tau=0.7, generator=torch.Generator().manual_seed(seed))
        (got,) = torch.autograd.grad((draw.soft * weights).sum(), logits)
        ref_counts, ref_soft = _sequential_reference(logits, free, cap, 0.7, seed)
        (want,) = torch.autograd.grad((ref_soft * weights).sum(), logits)
        assert draw.counts == ref_counts
        torch.testing.assert_close(got, want)


def test_most_likely_counts_is_the_capped_multinomial_mode():
    """Greedy by marginal gain equals brute force over every capped allocation."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        n, free = 3, int(torch.randint(0, 9, (1,), generator=gen))
        cap = int(torch.randint(3, 7, (1,), generator=gen))
        logits = torch.randn(n, generator=gen) * 2
        logp = torch.log_softmax(logits.double(), 0).tolist()

        def loglik(c, logp=logp):
            return sum(k * lp - math.lgamma(k + 1) for k, lp in zip(c, logp))

        feasible = [c for c in itertools.product(range(cap + 1), repeat=n) if sum(c) == free]
        best = max(loglik(c) for c in feasible)
        got = most_likely_counts(logits, free, cap)
        assert sum(got) == free and max(got) <= cap
        assert loglik(got) == pytest.approx(best, abs=1e-9)
    assert most_likely_counts(torch.zeros(6), 18, 7) == [3] * 6  # uniform logits: uniform allocation


def test_allocation_string_is_the_papers_notation():
    assert allocation_string([2, 3, 5, 4, 6, 6]) == "235466"
    assert allocation_string([2, 10, 4]) == "2-10-4"


# ---- the per-layer quantizer -----------------------------------------------------------------------


def test_quantizer_forward_is_on_grid_and_bit_gradient_is_the_forward_difference():
    torch.manual_seed(0)
    w = (torch.randn(20, 30) * 0.2).requires_grad_()
    logits = torch.zeros(2, requires_grad=True)
    src = BitSource([3, 5])
    scale = 0.3
    q = LearnedBitsQuantizer(scale, 1, src)
    src.soft = logits * 0  # zero valued, differentiable: stands in for the Gumbel surrogate
    out = q(w)
    assert on_grid(out.detach(), 5, scale)
    torch.testing.assert_close(out.detach(), quantize_nearest(w.detach(), 5, scale))
    upstream = torch.randn_like(w)
    out.backward(upstream)
    torch.testing.assert_close(w.grad, upstream)  # straight through to the shadow
    diff = quantize_nearest(w.detach(), 6, scale) - quantize_nearest(w.detach(), 5, scale)
    # d out / d soft[1] = forward difference, and soft = 0 * logits gives d/dlogits[1] = 0 * that, so
    # check through a surrogate whose derivative is 1:
    src.soft = logits - logits.detach()
    w.grad = None
    q(w).backward(upstream)
    assert logits.grad[0] == 0
    torch.testing.assert_close(logits.grad[1], (upstream * diff).sum())
    q.eval()  # evaluation reads eval_bits and adds no surrogate
    src.eval_bits[1] = 2
    torch.testing.assert_close(q(w).detach(), quantize_nearest(w.detach(), 2, scale))


# ---- the method through its hooks ------------------------------------------------------------------


def _trainer(model: nn.Module, method: LearnedPrecision, epochs: int, lr: float = 1e-3, samples: int = 256,
             ckpt: Path | None = None, **kw) -> Trainer:
    torch.manual_seed(0)
    data = synthetic(train_samples=samples, test_samples=64, batch_size=64, eval_batch_size=64, seed=0)
    model = method.prepare(model, RunContext())
    groups = resolve_param_groups(method.param_groups(model), lr)
    opt = torch.optim.Adam(groups, lr=lr)
    return Trainer(model, method, opt, constant(opt, epochs), data, torch.device("cpu"), epochs,
                   ckpt_path=ckpt, progress_bar=False, **kw)


def test_budget_holds_at_every_step_and_after_the_hard_assignment():
    """LeNet-5 (4 layers), bits=2 with max_bits=3: layers saturate often; then the allocation freezes."""
    m = LearnedPrecision(bits=2, min_bits=1, max_bits=3, hard_after=2, epochs=3, logit_lr=0.05)
    torch.manual_seed(0)
    t = _trainer(LeNet5(), m, epochs=3, samples=256)
    seen: list[tuple[bool, list[int]]] = []
    orig = m.before_forward

    def spy(model, step):
        orig(model, step)
        seen.append((m.frozen, list(m.source.train_bits)))

    m.before_forward = spy
    out = t.fit()
    assert out.status == "completed" and len(seen) == 12
    for _, bits in seen:
        assert sum(bits) == 2 * 4 and all(1 <= b <= 3 for b in bits), bits
    assert [f for f, _ in seen] == [False] * 8 + [True] * 4  # hard assignment after epoch 2
    frozen_bits = {tuple(b) for f, b in seen if f}
    assert frozen_bits == {tuple(m.frozen_bits)} and sum(m.frozen_bits) == 8
    assert len({tuple(b) for f, b in seen if not f}) > 1  # the soft phase really samples
    rec = m.finalize(t.model, t.evaluate)
    assert rec["allocation"] == allocation_string(m.frozen_bits) and rec["budget_bits"] == 8
    assert len(rec["allocation_history"]) == 3
    h = out.progress.history[-1]
    assert h["method/total_bits"] == 8 and h["method/frozen"] == 1 and h["method/tau"] == pytest.approx(0.1)
    assert out.progress.history[0]["method/tau"] == pytest.approx(1.0)
    for name in m.layer_names:
        assert 1 <= out.progress.history[0][f"method/expected_bits/{name}"] <= 3
    manifest = m.manifest(t.model)
    assert [layer["bits"] for layer in manifest["layers"]] == m.frozen_bits
    img = m.images()["allocation"]
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8"
    # evaluation uses the frozen allocation; every quantized weight lies on its layer's grid
    t.model.eval()
    for name, b in zip(m.layer_names, m.frozen_bits):
        layer = t.model.get_submodule(name)
        assert on_grid(layer.weight.detach(), b, weight_quantizer(layer).scale)


class _TwoLayers(nn.Module):
    """Input = identity, so the output is the two (quantized) weight matrices side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.b = nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], 1)


def test_logits_learn_to_give_bits_to_the_layer_that_needs_them():
    """Layer a must match fine-grained weights (every bit helps); layer b must be 0 (exact from 2 bits on,
    min_bits=2). Budget 6 bits over 2 layers: the logits should move from 33 to 42."""
    torch.manual_seed(0)
    model = _TwoLayers()
    m = LearnedPrecision(bits=3, min_bits=2, max_bits=6, hard_after=100, epochs=100, logit_lr=0.05)
    model = m.prepare(model, RunContext())
    s = m.quantizers[0].scale
    target_a = (torch.rand(16, 16) * 2 - 1) * 0.9 * s
    with torch.no_grad():
        shadow_weight(model.a).copy_(target_a)
        shadow_weight(model.b).zero_()
    target = torch.cat([target_a.T, torch.zeros(16, 16)], 1)
    opt = torch.optim.Adam(m.param_groups(model), lr=1e-3)
    before = m.logits.detach().clone()
    assert m.most_likely() == [3, 3]
    x = torch.eye(16)
    for step in range(200):
        m.before_forward(model, step)
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        assert m.logits.grad is not None and torch.isfinite(m.logits.grad).all()
        m.after_backward(model)
        opt.step()
        m.after_step(model, opt)
    moved = m.logits.detach() - before
    assert moved[0] - moved[1] > 1.0, moved
    assert m.most_likely() == [4, 2]


def test_frozen_uniform_allocation_trains_exactly_like_bc():
    """hard_after=0 freezes the uniform allocation 3333 at once: the run is then method=bc bits=3, step
    for step (same grid, LR scales, clipping), which is what makes bc the fair uniform baseline."""
    from qexp.methods.bc import BinaryConnect

    runs = []
    for method in (LearnedPrecision(bits=3, hard_after=0, epochs=1), BinaryConnect(bits=3)):
        torch.manual_seed(0)
        t = _trainer(LeNet5(), method, epochs=1, samples=128)
        assert t.fit().status == "completed"
        runs.append(t)
    assert runs[0].method.allocation() == "3333"
    for (k, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b), k
    bc_rows = runs[1].method.manifest(runs[1].model)["layers"]
    lp_rows = runs[0].method.manifest(runs[0].model)["layers"]
    assert [(r["bits"], r["lr_scale"], r["scale"]) for r in lp_rows] == \
        [(r["bits"], r["lr_scale"], r["scale"]) for r in bc_rows]


def test_activations_option_quantizes_relus_and_trains():
    m = LearnedPrecision(bits=3, activations=True, act_bits=4, hard_after=1, epochs=1)
    t = _trainer(LeNet5(), m, epochs=1, samples=128)
    assert t.fit().status == "completed"
    acts = [mod for mod in t.model.modules() if isinstance(mod, QuantReLU)]
    assert len(acts) == 3 and all(a.bits == 4 and a.is_calibrated for a in acts)
    assert m.manifest(t.model)["activation_bits"] == 4


# ---- resume ------------------------------------------------------------------------------------------


def _weights_only_round_trip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_restores_logits_temperature_allocation_and_noise():
    m = LearnedPrecision(bits=3, max_bits=5, hard_after=2, epochs=4, logit_lr=0.05)
    t = _trainer(LeNet5(), m, epochs=4, samples=128)
    t.epochs = 1
    t.fit()  # one soft epoch: logits moved, temperature annealed
    other = LearnedPrecision(bits=3, max_bits=5, hard_after=2, epochs=4, logit_lr=0.05)
    other.prepare(LeNet5(), RunContext())
    other.load_state_dict(_weights_only_round_trip(m.state_dict()))
    assert torch.equal(other.logits.detach(), m.logits.detach()) and not torch.equal(m.logits, torch.zeros(4))
    assert other.tau == m.tau < 1.0 and other.history == m.history
    a = sample_counts(m.logits, m.free, m.cap, m.tau, m.generator).counts
    b = sample_counts(other.logits, other.free, other.cap, other.tau, other.generator).counts
    assert a == b  # the Gumbel noise stream continues where it was
    # after the hard assignment the frozen allocation comes back too, and the lazy eval bits follow it
    m.on_epoch_end(1)
    assert m.frozen
    again = LearnedPrecision(bits=3, max_bits=5, hard_after=2, epochs=4)
    again.prepare(LeNet5(), RunContext())
    again.load_state_dict(_weights_only_round_trip(m.state_dict()))
    assert again.frozen and again.frozen_bits == m.frozen_bits and again.source.eval_bits == m.frozen_bits
    again.before_forward(None, 0)
    assert again.source.train_bits == m.frozen_bits and again.source.soft is None


def test_checkpoint_resume_mid_soft_phase_matches_an_uninterrupted_run(tmp_path):
    """Interrupt in epoch 1 (soft phase), resume from checkpoint.pt: logits, temperature, frozen allocation
    and weights end identical to a run that never stopped."""

    def make(ckpt: Path | None, stop_at: int | None) -> tuple[Trainer, LearnedPrecision]:
        m = LearnedPrecision(bits=3, max_bits=6, hard_after=2, epochs=3, logit_lr=0.05, seed=7)
        steps = iter(range(10**6))
        stop = (lambda: next(steps) >= stop_at) if stop_at is not None else (lambda: False)
        torch.manual_seed(0)
        return _trainer(LeNet5(), m, epochs=3, samples=192, ckpt=ckpt, should_stop=stop), m

    straight, ms = make(None, None)
    assert straight.fit().status == "completed"

    ckpt = tmp_path / "checkpoint.pt"
    first, _ = make(ckpt, stop_at=4)  # 3 batches per epoch: stops in the middle of epoch 2
    assert first.fit().status == "interrupted" and first.progress.epoch == 1
    resumed, mr = make(ckpt, None)
    resumed.load_state_dict(checkpoint.load(ckpt))
    assert mr.tau < 1.0 and not mr.frozen
    assert resumed.fit().status == "completed"

    assert torch.equal(mr.logits.detach(), ms.logits.detach())
    assert mr.tau == ms.tau and mr.frozen and mr.frozen_bits == ms.frozen_bits and mr.history == ms.history
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    errors = [[h["test_error"] for h in t.progress.history] for t in (straight, resumed)]
    assert errors[0] == errors[1]


def test_soft_phase_evaluation_reestimates_batchnorm_at_the_evaluated_allocation():
    """Before a soft-phase evaluation, BatchNorm's running statistics are the average over the first
    BN_BATCHES training batches of the network at the evaluated (most likely) allocation; weights,
    gradients, the global random state and the model's mode are left as they were."""
    from qexp.methods.learned import method as learned_method

    torch.manual_seed(0)
    data = synthetic(train_samples=320, test_samples=64, batch_size=64, eval_batch_size=64, seed=0)
    m = LearnedPrecision(bits=2, max_bits=4, hard_after=5, epochs=5, logit_lr=0.5, seed=3)
    model = m.prepare(LeNet5(bn=True), RunContext(data=data))
    opt = torch.optim.Adam(resolve_param_groups(m.param_groups(model), 1e-3), lr=1e-3)
    for i, (x, y) in enumerate(data.train):
        train_step(model, m, opt, x, y, i)
    bn = next(mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d))
    params = {k: v.clone() for k, v in model.named_parameters()}
    grads = {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None}
    rng = torch.get_rng_state()
    train_bits = list(m.source.train_bits)

    # the reference: BN's input at the evaluated allocation, averaged over the same batches
    inputs = []
    handle = bn.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach().clone()))
    model.eval()
    m.source.invalidate()
    with torch.no_grad():
        for i, (x, _) in enumerate(data.train):
            if i < learned_method.BN_BATCHES:
                model(x)
    handle.remove()
    model.train()
    want = torch.stack([t.mean((0, 2, 3)) for t in inputs]).mean(0)
    assert not torch.allclose(bn.running_mean, want, atol=1e-4)  # the drawn allocations' average differs

    m.before_evaluate(model)
    assert torch.allclose(bn.running_mean, want, atol=1e-5)
    assert int(bn.num_batches_tracked) == len(inputs) and bn.momentum == 0.1
    assert model.training and m.source.train_bits == train_bits
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
        if k in grads:
            assert torch.equal(v.grad, grads[k]), k


@pytest.mark.slow
def test_soft_phase_evaluation_on_mnist_is_far_from_chance(tmp_path, data_root):
    """cnn6 (BatchNorm) on 3000 MNIST images, one epoch, allocation still soft: the test error of the most
    likely allocation. Measured 10.6% (88.7% before BatchNorm was re-estimated: chance)."""
    run_qexp(["train", f"out_root={tmp_path}", f"data_root={data_root}", "+experiment=lacey2018_mnist",
              "bits=2", "epochs=1", "dataset.train_subset=3000", "method.hard_after=5"])
    (run_dir,) = find_runs(tmp_path)
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and not m["allocation_frozen"]
    assert m["test_error"] < 40.0, m["test_error"]


# ---- every model family ------------------------------------------------------------------------------

FAMILIES = {
    "lenet5": (lambda: LeNet5(1, 10, 28), (1, 28)),
    "mlp": (lambda: MLP(1, 10, 28), (1, 28)),
    "vgg7": (lambda: VGG("vgg7", 3, 10, 32), (3, 32)),
    "resnet20": (lambda: CifarResNet(20, 3, 10, 32), (3, 32)),
    "wrn8_1": (lambda: WideResNet(8, 1, 3, 10, 32), (3, 32)),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_model_family_trains_a_few_steps(family):
    make, (c, size) = FAMILIES[family]
    torch.manual_seed(0)
    m = LearnedPrecision(bits=3, hard_after=5, epochs=10, logit_lr=0.05)
    model = m.prepare(make(), RunContext())
    opt = torch.optim.Adam(m.param_groups(model), lr=1e-3)
    x, y = torch.randn(4, c, size, size), torch.randint(0, 10, (4,))
    for step in range(2):
        loss, _ = train_step(model, m, opt, x, y, step)
        assert m.logits.grad is not None and m.logits.grad.abs().sum() > 0
        assert sum(m.source.train_bits) == 3 * m.num_layers and torch.isfinite(loss)
    assert len(m.most_likely()) == m.num_layers > 0


# ---- bad input -----------------------------------------------------------------------------------------


def test_bad_options_are_one_clear_error():
    with pytest.raises(QexpError, match=r"\[min_bits, max_bits\] = \[1, 3\]"):
        LearnedPrecision(bits=4, max_bits=3)
    with pytest.raises(QexpError, match="tau_min"):
        LearnedPrecision(bits=4, tau0=0.1, tau_min=1.0)
    with pytest.raises(QexpError, match="method.tau0=0 is out of range"):  # once blamed on tau_min
        LearnedPrecision(bits=4, tau0=0)
    with pytest.raises(QexpError, match="hard_after"):
        LearnedPrecision(bits=4, hard_after=-1)
    with pytest.raises(QexpError, match="allowed: 1..8"):
        LearnedPrecision(bits=0)


def test_cli_rejects_an_unreachable_budget(tmp_path):
    proc = run_qexp(["train", f"out_root={tmp_path}", "dataset=synthetic", "method=learned", "bits=5",
                     "method.max_bits=4"], check=False)
    assert proc.returncode != 0
    assert "min_bits, max_bits" in proc.stderr and "Traceback" not in proc.stderr


# ---- end to end on real MNIST --------------------------------------------------------------------------


@pytest.mark.slow
def test_qexp_train_learned_on_mnist(tmp_path, data_root):
    """`qexp train method=learned bits=4`, 2 epochs on 4000 MNIST images (hard assignment after 1), then
    `qexp eval` of the run. Measured: test accuracy 95.48%, allocation 5434 (CPU: 28 s of CPU time)."""
    run_qexp(["train", f"out_root={tmp_path}", f"data_root={data_root}", "method=learned", "bits=4",
              "epochs=2", "dataset.train_subset=4000", "method.hard_after=1"])
    (run_dir,) = find_runs(tmp_path)
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and m["test_acc"] >= 93.0, m["test_acc"]
    alloc = m["allocation"]
    assert len(alloc) == 4 and sum(int(c) for c in alloc) == 16 and all(1 <= int(c) <= 8 for c in alloc)
    assert m["allocation_frozen"] and m["allocation_history"][-1] == alloc and m["budget_bits"] == 16
    assert [h["method/total_bits"] for h in m["history"]] == [16.0, 16.0]
    assert {f"method/bits/{n}" for n in m["quantized_layers"]} <= set(m["history"][-1])
    quant = (run_dir / "quant.json").read_text()
    assert f'"allocation": "{alloc}"' in quant
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run_dir), size_guidance={"images": 0}).Reload()
    assert "method/allocation" in ev.Tags()["images"] and "method/tau" in ev.Tags()["scalars"]
    # the checkpoint carries the frozen allocation: `qexp eval` reproduces the recorded test error
    out = run_qexp(["eval", str(run_dir), f"--data-root={data_root}"]).stdout
    assert f"test error {m['test_error']:.2f}%" in out, out


def test_manifest_reports_the_allocation_without_changing_the_layers():
    """quant.json shows each layer at its allocated width; the layers' own bits stay the budget's."""
    m = LearnedPrecision(bits=3, min_bits=2, max_bits=6, hard_after=0, epochs=2)
    model = m.prepare(LeNet5(), RunContext())
    with torch.no_grad():
        m.logits.copy_(torch.tensor([3.0, 0.0, 0.0, -3.0]))
    m.frozen = False
    m._freeze()
    alloc = m.most_likely()
    assert len(set(alloc)) > 1
    rows = m.manifest(model)["layers"]
    assert [r["bits"] for r in rows] == alloc
    assert [q.bits for q in m.layers] == [3] * 4
