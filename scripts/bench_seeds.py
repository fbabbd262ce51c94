"""Feasibility of ``seeds_per_process=K``: K seeds of LeNet-5 as one vectorised model vs K models stepped
one after another, in one process (what K separate processes would each do).

    OMP_NUM_THREADS=1 python scripts/bench_seeds.py --k 4 --rounds 6

Vectorised: ``torch.func.stack_module_state`` + ``vmap(functional_call)`` over the K parameter sets, each
seed with its own batch (its own data order), one backward for all, one Adam over the stacked
parameters (Adam is elementwise, so per-seed state is exact). Looped: K ordinary models and optimizers.
Both on fixed synthetic MNIST-shaped batches (batch 64 per seed), ABBA rounds, ratio of medians.
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.nn.functional as F
from bench_weight import side_by_side  # scripts/ is on the path when run as a script
from torch.func import functional_call, stack_module_state

from qexp.models.lenet import LeNet5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (a GPU is where this could pay off)")
    args = ap.parse_args()
    k, device = args.k, torch.device(args.device)
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(LeNet5(1, 10, 28).to(device))
    xs = torch.randn(k, 64, 1, 28, 28, device=device)
    ys = torch.randint(0, 10, (k, 64), device=device)

    loop_models = [copy.deepcopy(m) for m in models]
    loop_opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in loop_models]

    def looped() -> None:
        for m, o, x, y in zip(loop_models, loop_opts, xs, ys):
            loss = F.cross_entropy(m(x), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()

    params, buffers = stack_module_state(models)
    params = {n: p.detach().requires_grad_() for n, p in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    opt = torch.optim.Adam(params.values(), lr=1e-3)

    def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    fwd = torch.func.vmap(one)

    def vectorised() -> None:
        out = fwd(params, buffers, xs)  # (k, 64, 10)
        loss = F.cross_entropy(out.flatten(0, 1), ys.flatten(), reduction="sum") / 64  # sum of K means
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # exactness first: one step of each from the same start (copies), then the largest parameter difference
    start_loop = [copy.deepcopy(m.state_dict()) for m in loop_models]
    start_vec = {n: t.detach().clone() for n, t in params.items()}
    looped()
    vectorised()
    diff = max((params[n][i] - p.detach()).abs().max().item()
               for i, m in enumerate(loop_models) for n, p in m.named_parameters())
    with torch.no_grad():
        for m, sd in zip(loop_models, start_loop):
            m.load_state_dict(sd)
        for n, t in params.items():
            t.copy_(start_vec[n])
    print(f"after one Adam step from the same start: largest |vectorised - looped| parameter difference "
          f"{diff:.3g} ({'bit-identical' if diff == 0 else 'not bit-identical'})")
    med = side_by_side({"looped": looped, "vectorised": vectorised}, device, args.rounds, args.steps, warmup=1)
    a, b = med["looped"], med["vectorised"]
    print(f"{device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}: K={k} LeNet-5 steps: "
          f"looped {1e3 * a:.1f} ms, vectorised {1e3 * b:.1f} ms, speed-up {a / b:.2f}x")


if __name__ == "__main__":
    main()
