"""qexp on a GPU. Every test here is marked ``cuda`` (skipped where no CUDA device is visible); the rest
of the suite computes on the CPU whatever the machine (tests/conftest.py sets ``QEXP_DEVICE=cpu``: its
exact numbers and floors were measured there), so these tests ask for ``device=cuda`` themselves.

- every method option as typed learns on ``device=cuda`` (above a constant answer: no GPU spread measured);
- ``device=cuda:N`` runs on GPU N (the precisions, ``compile=true`` and ``cuda_graphs=true``:
  tests/test_cuda_compile.py, a file of its own so that the GPU suite's workers run the two at once);
- the method contract (train, stop + resume bit-identical, manifest, state round trip, export) holds on
  the GPU for bc and sr, with deterministic kernels; a checkpoint mapped onto the GPU resumes with host
  RNG states and host step counts;
- the Triton SR kernel gives the eager kernel's bits on CUDA tensors (the multi-tensor rounding is
  checked on CUDA by tests/test_quant_grid.py's cuda case);
- no per-step hook of bc, sr, r, ste or lsq synchronises with the host;
- seeds stacked in one model (``trainer.seeds_per_process``) learn on the GPU.

``scripts/device/gpu_check.sh suite`` runs the whole suite, this file included, on the GPU machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qexp.quant import kernels
from qexp.quant.kernels import Noise, stochastic_round_, stochastic_round_all_
from qexp.testing import check_method
from tests.conftest import compose_train, find_runs, read_metrics, run_qexp
from tests.test_as_typed import ABOVE_CONSTANT, COMMAND, check_learned, sweep_as_typed
from tests.test_quant_grid import LAYER_SCALES, _layers, _same_bits

pytestmark = pytest.mark.cuda

# cuBLAS reads this when its first handle is made (after collection): deterministic matrix products
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def test_every_method_as_typed_learns_on_cuda(tmp_path: Path, data_root: Path) -> None:
    """Every method option as typed learns on the GPU: above what a constant answer scores. The CPU floors
    (test_as_typed) come from 3 CPU seeds; on the GPU the noise streams and kernels differ, so each run
    is in effect another seed, and no GPU spread was measured to set a floor from."""
    runs = sweep_as_typed(tmp_path / "all", data_root, ("device=cuda",))
    assert {m["device"] for m in runs.values()} == {"cuda:0"}
    check_learned(runs, floor_of=lambda method: ABOVE_CONSTANT)


def test_stacked_seeds_learn_on_cuda(tmp_path: Path, data_root: Path) -> None:
    """``trainer.seeds_per_process=4`` on the GPU: four seed folders, each completed and learning."""
    run_qexp([*COMMAND, "device=cuda", f"data_root={data_root}", "method=float,sr,bc",
              "trainer.seeds_per_process=4", f"out_root={tmp_path}"], timeout=900)
    runs = [read_metrics(d) for d in find_runs(tmp_path)]
    assert len(runs) == 12
    for m in runs:
        assert m["status"] == "completed" and m["device"] == "cuda:0" and m["seeds_per_process"] == 4
        assert m["test_acc"] >= ABOVE_CONSTANT, (m["method"], m["seed"], m["test_acc"])


def test_cuda_index_runs_on_that_gpu(tmp_path: Path) -> None:
    last = torch.cuda.device_count() - 1
    run_qexp(["train", "dataset=synthetic", "dataset.train_samples=64", "dataset.test_samples=32", "epochs=1",
              "progress=false", "method=sr", f"device=cuda:{last}", f"out_root={tmp_path}"])
    (run,) = find_runs(tmp_path)
    assert read_metrics(run)["device"] == f"cuda:{last}"


@pytest.fixture
def deterministic():
    """Deterministic GPU kernels (a stopped and resumed run can only equal an uninterrupted one with
    them); ops without such a kernel warn (LeNet-5's pooling windows do not overlap)."""
    was = torch.are_deterministic_algorithms_enabled()
    bench, det = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    yield
    torch.use_deterministic_algorithms(was)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = bench, det


@pytest.mark.parametrize("option", ["bc", "sr"])
def test_method_contract_holds_on_cuda(option: str, tmp_path: Path, deterministic) -> None:
    report = check_method(option, workdir=tmp_path, device="cuda")
    assert report.passed == ["train", "resume", "manifest", "state_dict", "export"]


def test_a_checkpoint_mapped_to_the_gpu_resumes_with_host_states(tmp_path: Path) -> None:
    """A resume loads the checkpoint onto the run's device (``map_location``): the RNG states are set
    from host copies (torch takes only CPU ByteTensors: every GPU resume raised TypeError), the state
    holds only the run's own GPU's generator, and Adam's step counts stay on the host, so an optimizer
    step after the resume reads no device value on the host (it synchronised once per tensor)."""
    from qexp.run import checkpoint
    from qexp.run.session import Trainer, build, train_step

    cuda = torch.device("cuda")
    cfg = compose_train(["dataset=synthetic", "dataset.train_samples=64", "dataset.test_samples=8", "device=cuda",
                         "method=bc", "optim=adam"])
    torch.manual_seed(0)
    b = build(cfg, cuda)
    t = Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, cuda, 1, progress_bar=False)
    x, y = next(iter(b.data.train))
    x, y = x.to(cuda), y.to(cuda)
    train_step(b.model.train(), b.method, t.optimizer, x, y, 0)
    state = t.state_dict()
    assert torch.is_tensor(state["rng_cuda"]) and not state["rng_cuda"].is_cuda
    checkpoint.save(tmp_path / "c.pt", state)
    t.load_state_dict(checkpoint.load(tmp_path / "c.pt", map_location=cuda))
    steps = [s["step"] for s in t.optimizer.state.values()]
    assert steps and not any(s.is_cuda for s in steps)
    assert all(s["exp_avg"].is_cuda for s in t.optimizer.state.values())
    torch.cuda.set_sync_debug_mode("error")
    try:
        t.optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_triton_sr_kernel_gives_the_eager_bits_on_cuda(bits: int) -> None:
    """The Triton SR kernel vs the eager passes on CUDA tensors, for one large tensor and for a network's
    layers (the multi-tensor path): the same bits (CPU: Triton's interpreter, tests/test_quant_grid.py,
    which also compares the multi-tensor path with the eager passes on the same noise on CUDA)."""
    cuda = torch.device("cuda")
    xs, big = _layers("cuda"), torch.randn(300_001, device=cuda) * 0.3
    results = []
    try:
        for on in (False, True):
            kernels.use_triton(on)
            layers = [x.clone() for x in xs]
            stochastic_round_all_(layers, bits, LAYER_SCALES, Noise(3, cuda))
            results.append([*layers, stochastic_round_(big.clone(), bits, 0.4, Noise(5, cuda))])
        assert kernels._TRITON.on, "the Triton kernel switched itself off (see the warning)"
    finally:
        kernels.use_triton(True)
        kernels._TRITON.on = None  # back to the default: decided on first use
    assert _same_bits(results[0], results[1])


@pytest.mark.parametrize("method", [["method=bc"], ["method=sr"], ["method=r"], ["method=ste", "method.wbits=2"],
                                    ["method=lsq"]], ids=lambda m: m[0].split("=")[1])
def test_step_hooks_do_not_synchronise(method: list[str]) -> None:
    """``before_forward``, ``after_backward`` and ``after_step`` queue GPU work and read no device value
    on the host (``torch.cuda.set_sync_debug_mode('error')`` raises on any synchronising call). The
    first step, a warm-up (one-off calibration and the Triton kernel's check), is not watched."""
    from qexp.run.session import build, train_step

    cuda = torch.device("cuda")
    cfg = compose_train(["dataset=synthetic", "dataset.train_samples=64", "dataset.test_samples=8", "device=cuda",
                         *method])
    torch.manual_seed(0)
    b = build(cfg, cuda)
    model, m = b.model.train(), b.method
    x, y = next(iter(b.data.train))
    x, y = x.to(cuda), y.to(cuda)

    def watched(fn):
        def call(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return call

    train_step(model, m, b.optimizer, x, y, 0)
    for hook in ("before_forward", "after_backward", "after_step"):
        setattr(m, hook, watched(getattr(m, hook)))
    for step in range(1, 12):  # sr/r sample their diagnostics every 10th step: one such step included
        train_step(model, m, b.optimizer, x, y, step)
    torch.cuda.synchronize()
