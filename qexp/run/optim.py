"""Adam with one set of multi-tensor calls for all parameter groups (:class:`GroupedAdam`).

Why: methods give layers their own learning rate (BinaryConnect's per-layer Glorot scale: one group per
quantized layer; LSQ/PACT/learned-alpha STE: a group for the steps or clipping levels). ``torch.optim.Adam``
runs its multi-tensor (``foreach``) update once per group, eight calls each, so a 20-layer BinaryConnect
ResNet launched ~170 optimizer kernels per step where float launched 8: on a GPU, where small networks
are bound by launches, that alone made bc steps cost ~1.5x float. Adam's update is elementwise and its
multi-tensor step size is already a per-tensor list, so groups that differ only in ``lr`` can share
every call. The values are torch's own: each tensor gets the same float operations, in the same order,
with its group's ``lr``, as ``torch.optim.Adam(foreach=True)`` would give it (tests/test_optim.py).

Used where torch would take the multi-tensor path itself (every tensor on a GPU, or ``foreach=True``),
so CPU runs, whose default is torch's per-tensor loop, keep their exact numbers. Any option outside the
plain update (``amsgrad``, ``maximize``, ``capturable``, ``fused``, ``differentiable``, a tensor ``lr``,
complex tensors, a GradScaler's ``grad_scale``) takes torch's own ``step``. The state and ``state_dict``
are Adam's, so checkpoints load either way. The session swaps a configured ``torch.optim.Adam`` for it
(:func:`grouped`): the config (and so the run's identity) still names ``torch.optim.Adam``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer

from qexp.errors import QexpError

#: torch's private group initialiser, whose signature this class relies on (checked once at import)
_INIT_GROUP_ARGS = ["self", "group", "params_with_grad", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                    "state_steps"]
_SUPPORTED = list(inspect.signature(torch.optim.Adam._init_group).parameters) == _INIT_GROUP_ARGS


def check_options(options: dict[str, Any]) -> None:
    """Refuse optimizer values torch accepts but that cannot train: ``momentum`` of 1 or more (the velocity
    never forgets: SGD's steps grow without bound; torch only refuses negative momentum), and ``betas`` that
    are not a pair (torch would fail on an index, not say which setting). Torch's own checks (negative
    ``weight_decay`` or ``eps``, a beta outside [0, 1), Nesterov without momentum) stay torch's."""
    momentum = options.get("momentum")
    if isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and momentum >= 1:
        raise QexpError(f"optim.momentum must be in [0, 1) (the fraction of the last update kept; at 1 or more "
                        f"SGD's steps grow without bound), got optim.momentum={momentum}")
    betas = options.get("betas")
    if betas is not None and (not isinstance(betas, (list, tuple)) or len(betas) != 2):
        raise QexpError(f"optim.betas must be a pair [beta1, beta2] (Adam's decay rates of its two moments, "
                        f"each in [0, 1)), got optim.betas={betas}")


def _foreach_default(params: list[torch.Tensor]) -> bool:
    """Whether ``torch.optim.Adam(foreach=None)`` would take its multi-tensor path for ``params``."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        return bool(_default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1])
    except Exception:
        return all(p.is_cuda for p in params)


class GroupedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose multi-tensor step covers all groups in one set of calls (module doc)."""

    def _plain(self) -> bool:
        """Whether every group takes the plain multi-tensor update this class reproduces."""
        if not _SUPPORTED or any(getattr(self, k, None) is not None for k in ("grad_scale", "found_inf")):
            return False
        params = [p for g in self.param_groups for p in g["params"]]
        for g in self.param_groups:
            if (g["amsgrad"] or g["maximize"] or g["capturable"] or g["differentiable"] or g["fused"]
                    or g.get("decoupled_weight_decay", False) or g["foreach"] is False
                    or torch.is_tensor(g["lr"]) or any(torch.is_tensor(b) for b in g["betas"])):
                return False
        return all(g["foreach"] for g in self.param_groups) or _foreach_default(params)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if not self._plain():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # groups that share every hyper-parameter but lr share the calls
        merged: dict[tuple[float, float, float, float], list[list[Any]]] = {}
        for g in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            exp_avgs: list[torch.Tensor] = []
            exp_avg_sqs: list[torch.Tensor] = []
            steps: list[torch.Tensor] = []
            if self._init_group(g, params, grads, exp_avgs, exp_avg_sqs, [], steps):
                super().step(None)  # complex tensors: torch's own step (nothing was updated yet)
                return loss
            beta1, beta2 = g["betas"]
            lists = merged.setdefault((beta1, beta2, g["eps"], g["weight_decay"]), [[], [], [], [], [], []])
            for target, values in zip(lists, (params, grads, exp_avgs, exp_avg_sqs, steps)):
                target.extend(values)
            lists[5].extend([g["lr"]] * len(params))
        for (beta1, beta2, eps, weight_decay), lists in merged.items():
            if lists[0]:
                _multi_tensor_adam(*lists, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        return loss


def _multi_tensor_adam(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                       exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], lrs: list[float], *,
                       beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """torch's ``_multi_tensor_adam`` (non-capturable, plain update) with a learning rate per tensor."""
    grouped = Optimizer._group_tensors_by_device_and_dtype([params, grads, exp_avgs, exp_avg_sqs, steps],
                                                           with_indices=True)
    for (p, g, m, v, s), indices in grouped.values():
        lr = [lrs[i] for i in indices]
        if s[0].is_cpu:
            torch._foreach_add_(s, torch.tensor(1.0, device="cpu"), alpha=1.0)
        else:
            torch._foreach_add_(s, 1)
        if weight_decay != 0:
            g = torch._foreach_add(g, p, alpha=weight_decay)
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, 1 - beta2)
        del g
        counts = [float(t) for t in s]  # host tensors (non-capturable state): no device sync
        step_size = [(rate / (1 - beta1 ** n)) * -1 for rate, n in zip(lr, counts)]
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, [(1 - beta2 ** n) ** 0.5 for n in counts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, m, denom, step_size)


def grouped(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A ``torch.optim.Adam`` (exactly that class) rebuilt as :class:`GroupedAdam` over the same groups
    (before its first step); any other optimizer as it is."""
    if type(optimizer) is not torch.optim.Adam or optimizer.state or not _SUPPORTED:
        return optimizer
    try:
        return GroupedAdam(optimizer.param_groups, **optimizer.defaults)
    except TypeError:  # a torch whose Adam defaults are not all constructor arguments
        return optimizer
