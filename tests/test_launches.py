"""Kernel launches per training step (qexp.run.launches): what a small network pays on a GPU, held here.

A step of a small network on a GPU costs about its number of kernel launches, so a quantizer must add a
fixed handful per step, not a few per layer. The counts are exact and machine-independent (the ATen
operators a step dispatches; Adam on its multi-tensor path, as torch runs it on a GPU), so these tests
compare them exactly: LeNet-5 (5 quantized layers) against ResNet-20 (20).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import torch

from qexp.run.launches import LaunchCounter, count_launches
from tests.conftest import compose_train

MODELS = {"lenet5": ["model=lenet5"],
          "resnet20": ["model=resnet20", "dataset.channels=3", "dataset.image_size=32"]}


def step_launches(model: str, method: list[str], step: int = 2) -> tuple[Counter[str], int]:
    """Launches of training step ``step`` (after two warm-up steps: state, calibrations) and the host reads
    in the method's per-step hooks."""
    from qexp.run.session import build, train_step

    cfg = compose_train(["dataset=synthetic", "dataset.train_samples=32", "dataset.test_samples=8",
                         "batch_size=16", "+optim.foreach=true", *MODELS[model], *method])
    torch.manual_seed(0)
    b = build(cfg, torch.device("cpu"))
    x, y = next(iter(b.data.train))
    reads = [0]

    def watched(fn):
        def call(*args, **kwargs):
            with LaunchCounter() as c:
                out = fn(*args, **kwargs)
            reads[0] += c.host_reads
            return out
        return call

    for hook in ("before_forward", "after_backward", "after_step"):
        setattr(b.method, hook, watched(getattr(b.method, hook)))
    for i in range(step):
        train_step(b.model.train(), b.method, b.optimizer, x, y, i)
    reads[0] = 0
    ops = count_launches(train_step, b.model, b.method, b.optimizer, x, y, step)
    return ops, reads[0]


def extra(model: str, method: list[str]) -> int:
    return sum(step_launches(model, method)[0].values()) - sum(step_launches(model, ["method=float"])[0].values())


@pytest.mark.parametrize("method", [["method=bc"], ["method=r", "bits=4"], ["method=r", "bits=1"]],
                         ids=["bc", "r4", "r1"])
def test_weight_quantization_adds_the_same_launches_whatever_the_depth(method: list[str]) -> None:
    """Every layer's weights in one multi-tensor call per pass, and BinaryConnect's per-layer learning
    rates in Adam's one set of calls (qexp.run.optim): as many launches for 20 layers as for 5."""
    assert extra("lenet5", method) == extra("resnet20", method) <= 8


def test_adam_groups_share_their_launches() -> None:
    """bc gives each quantized layer its own Adam group (its Glorot learning-rate scale): the optimizer
    still launches what float's one group does."""
    def adam(method: str) -> int:
        ops = step_launches("resnet20", [f"method={method}"])[0]
        return sum(v for k, v in ops.items() if k.startswith("_foreach_") and k not in
                   ("_foreach_sign", "_foreach_sign_", "_foreach_clamp_min_", "_foreach_clamp_max_"))

    assert adam("bc") - adam("float") <= 3  # bc's own multi-tensor passes (add, mul), not Adam's


def test_stochastic_rounding_draws_all_its_noise_in_one_launch() -> None:
    for model in MODELS:
        ops, _ = step_launches(model, ["method=sr", "bits=4"])
        assert ops["randint"] == 1, (model, ops["randint"])


@pytest.mark.parametrize("method", [["method=bc"], ["method=sr", "bits=4"], ["method=r", "bits=4"],
                                    ["method=ste"], ["method=lsq"]], ids=lambda m: m[0].split("=")[1])
def test_step_hooks_read_no_device_value(method: list[str]) -> None:
    """The per-step hooks queue work and read nothing back (on a GPU, a read is a synchronisation;
    tests/test_cuda.py checks the same there with CUDA's own sync detector)."""
    assert step_launches("lenet5", method)[1] == 0


def stacked_group(k: int) -> tuple[Any, list[Any], Any]:
    """``k`` float LeNet-5 seeds stacked in one group (synthetic data, 4 batches an epoch): the group's
    step, the seeds' trainers and their shared step clock, as `qexp train` builds them."""
    from qexp.run import seeds
    from qexp.run.session import Trainer, build, group_step, stack_seeds

    cpu = torch.device("cpu")
    builts = []
    for s in range(k):
        cfg = compose_train(["dataset=synthetic", "dataset.train_samples=64", "dataset.test_samples=8",
                             "batch_size=16", "+optim.foreach=true", "model=lenet5", "method=float", f"seed={s}"])
        torch.manual_seed(s)
        builts.append(build(cfg, cpu))
    clock = seeds.StepClock()
    trainers = [Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, cpu, 1, progress_bar=False,
                        train_clock=clock) for b in builts]
    return group_step(stack_seeds(builts), builts), trainers, clock


def group_launches_per_batch(k: int) -> float:
    """Launches per batch of one epoch of ``k`` stacked seeds (:func:`stacked_group`): the group's shared
    forward, backward and optimizer step, and each seed's own bookkeeping."""
    from qexp.run import seeds

    take, trainers, clock = stacked_group(k)

    def epoch() -> None:
        for t in trainers:
            t.progress.batch = 0
        assert seeds.drive([t._train_epoch() for t in trainers], take, clock) == ["ok"] * k

    epoch()
    with LaunchCounter() as c:
        epoch()
    return sum(c.ops.values()) / 4


def test_a_stacked_seed_costs_a_few_launches_more() -> None:
    """``trainer.seeds_per_process``: the seeds' batches are gathered, normalised and tallied together, so
    that each seed adds its two running sums to the group's step and its shuffle once an epoch (2.25 per
    batch here; each seed cost ~12 before)."""
    assert group_launches_per_batch(4) - group_launches_per_batch(2) <= 2 * 3


def test_a_groups_step_clock_counts_the_waits_at_the_sync_points(monkeypatch) -> None:
    """On a GPU a group's steps only queue work, and each engine's read of its running sums (every
    SYNC_EVERY steps and at an epoch's last batch) waits for it: that wait is training time
    (``images_per_s``). It was outside the group's clock, which timed only the steps' host side. Here a
    wait is a sleep in the read."""
    from qexp.run import engine, seeds

    take, trainers, clock = stacked_group(2)
    real = engine.totals
    waits = []

    def slow_totals(*args: Any, **kwargs: Any) -> list[float]:
        waits.append(clock())
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "totals", slow_totals)
    assert seeds.drive([t._train_epoch() for t in trainers], take, clock) == ["ok"] * 2
    # each seed reads at its last batch (its wait counted) and for the epoch's totals (after its clock
    # was read: not counted); the clock as each read began:
    assert len(waits) == 4
    assert waits[1] - waits[0] >= 0.2 and waits[2] == waits[1] and clock() - waits[0] >= 0.4


def test_lsq_quantizer_on_a_device_is_nine_launches_and_reads_nothing(monkeypatch) -> None:
    """LSQ's fake quantizer as it runs on a GPU (its step kept on the device): 4 launches forward, 5
    backward (the inside test one kernel on the kept v/s, the step gradient two dot products and two
    scalar ops), no host read of the step. It was 16 when the backward rebuilt the inside test from v."""
    import qexp.methods.lsq as lsq

    monkeypatch.setattr(lsq, "host_scalars", lambda t: False)
    torch.manual_seed(0)
    v, s = torch.randn(64, 16, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    grad = torch.randn(64, 16)
    with LaunchCounter() as c:
        lsq.lsq_quantize(v, s, 2, 1, 0.1).backward(grad)
    assert sum(c.ops.values()) == 9 and c.host_reads == 0, c.ops
