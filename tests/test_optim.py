"""GroupedAdam: torch's multi-tensor Adam, every group in one set of calls, the same bits; the optimizer and
schedule values torch accepts but no run can use are refused."""

from __future__ import annotations

import pytest
import torch

from qexp.errors import QexpError
from qexp.run.launches import count_launches
from qexp.run.optim import GroupedAdam, check_options, grouped
from qexp.run.sched import step


def _net_and_groups(seed: int = 0) -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Linear(9, 5), torch.nn.Linear(5, 3),
                              torch.nn.Linear(3, 2, bias=False))
    layers = list(net)
    groups = [{"params": list(layers[0].parameters())},
              {"params": list(layers[1].parameters()), "lr": 3e-3},
              {"params": list(layers[2].parameters()), "lr": 7e-4, "weight_decay": 0.01},
              {"params": list(layers[3].parameters()), "lr": 0.05, "betas": (0.8, 0.99)}]
    return net, groups


def _train(make: type[torch.optim.Adam], steps: int = 6, **kwargs) -> tuple[list[torch.Tensor], dict]:
    net, groups = _net_and_groups()
    opt = make(groups, lr=1e-3, **kwargs)
    x = torch.randn(16, 7, generator=torch.Generator().manual_seed(1))
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        net[1].bias.requires_grad_(i % 3 != 1)  # a tensor without a gradient is skipped, as torch does
        net(x).square().mean().backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] *= 0.9  # a schedule changes every group's lr
    return [p.detach().clone() for p in net.parameters()], opt.state_dict()


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_grouped_adam_gives_torchs_foreach_bits(weight_decay: float) -> None:
    ref, ref_state = _train(torch.optim.Adam, foreach=True, weight_decay=weight_decay)
    got, got_state = _train(GroupedAdam, foreach=True, weight_decay=weight_decay)
    assert _same(ref, got)
    assert ref_state["param_groups"] == got_state["param_groups"]
    for k, s in ref_state["state"].items():
        assert set(s) == set(got_state["state"][k])
        assert all(torch.equal(s[n], got_state["state"][k][n]) for n in s)


def test_grouped_adam_keeps_torchs_own_step_on_cpu_and_for_other_options() -> None:
    """On CPU torch's default is its per-tensor loop: the same bits as before, not the foreach ones."""
    for kwargs in ({}, {"foreach": True, "amsgrad": True}, {"foreach": True, "maximize": True}):
        ref, _ = _train(torch.optim.Adam, **kwargs)
        got, _ = _train(GroupedAdam, **kwargs)
        assert _same(ref, got), kwargs


def test_grouped_adam_takes_one_set_of_calls_for_all_groups() -> None:
    """Four groups, two hyper-parameter sets (betas differ in one): two sets of multi-tensor calls."""
    def launches(make: type[torch.optim.Adam]) -> int:
        net, groups = _net_and_groups()
        for g in groups[:3]:
            g.pop("weight_decay", None)
        opt = make(groups, lr=1e-3, foreach=True)
        net(torch.randn(4, 7)).sum().backward()
        opt.step()  # the state is created on the first step
        net(torch.randn(4, 7)).sum().backward()
        return sum(count_launches(opt.step).values())

    assert launches(torch.optim.Adam) == 4 * launches(GroupedAdam) // 2


def test_grouped_swaps_only_a_fresh_plain_adam() -> None:
    net, groups = _net_and_groups()
    adam = torch.optim.Adam(groups, lr=1e-3)
    swapped = grouped(adam)
    assert type(swapped) is GroupedAdam and swapped.param_groups == adam.param_groups
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    assert grouped(sgd) is sgd


@pytest.mark.parametrize("options", [{"momentum": 1}, {"momentum": 1.5}, {"betas": [0.9]},
                                     {"betas": [0.9, 0.99, 0.5]}])
def test_options_torch_accepts_but_cannot_train_are_refused(options: dict) -> None:
    with pytest.raises(QexpError, match=f"optim.{next(iter(options))}"):
        check_options(options)


def test_the_shipped_optimizer_options_pass() -> None:
    for options in ({"momentum": 0.9, "nesterov": False}, {"momentum": 0.0}, {"betas": [0.9, 0.999]}, {}):
        check_options(options)


def test_step_milestones_are_whole_epoch_counts_of_at_least_one() -> None:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = step(opt, 10, milestones=[3, 1], gamma=0.5)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 0.5, 0.5, 0.25]  # unsorted milestones sort; after 1 epoch, after 3
    for bad in ([0], [-1], [1.5], ["a"], [True]):
        with pytest.raises(ValueError, match="sched.milestones"):
            step(opt, 10, milestones=bad)
