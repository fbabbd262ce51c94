"""``trainer.seeds_per_process=K``: K seeds trained in one process as one vectorised model
(:mod:`qexp.run.seeds`). The stacked model computes what each model computes alone; a group writes the
folders and records K separate runs write, close to their numbers (not bit for bit: see the module);
a killed group resumes bit-identically to an uninterrupted group, a seed ahead of the others included;
a seed of a group resumes alone; bad input is one line."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qexp.errors import QexpError
from qexp.methods.base import RunContext
from qexp.methods.bc import BinaryConnect
from qexp.models.lenet import LeNet5
from qexp.models.resnet import CifarResNet
from qexp.run import checkpoint, seeds
from qexp.run.session import build_method, check_seeds
from tests.conftest import REPO, compose_train, find_runs, read_metrics, run_drivers, run_qexp
from tests.test_kill_matrix import TINY

K = 3


def _models(kind: str) -> tuple[list[torch.nn.Module], tuple[int, ...]]:
    models = []
    for s in range(K):
        torch.manual_seed(s)
        if kind == "resnet20":
            models.append(CifarResNet(20, 3, 10, 32))
            continue
        m = LeNet5(1, 10, 28)
        if kind == "lenet5-bc":
            m = BinaryConnect(bits=1).prepare(m, RunContext())
        models.append(m)
    return models, ((3, 32, 32) if kind == "resnet20" else (1, 28, 28))


@pytest.mark.parametrize("kind", ["lenet5", "lenet5-bc", "resnet20"])
def test_stack_runs_each_model_as_itself(kind: str) -> None:
    """One stacked forward and backward give each model its own logits, gradients and BatchNorm
    statistics (to float rounding: grouped convolutions sum in another order); the models' tensors stay
    views of the stack, so an optimizer stepping one model moves its slice."""
    models, shape = _models(kind)
    alone = [copy.deepcopy(m) for m in models]
    stack = seeds.Stack(models)
    xs, ys = torch.randn(K, 8, *shape), torch.randint(0, 10, (K, 8))
    out = stack.forward(xs)
    torch.stack([F.cross_entropy(out[i], ys[i]) for i in range(K)]).sum().backward()
    stack.hand_out_grads()
    for i, (m, ref) in enumerate(zip(models, alone)):
        ref.train()
        o = ref(xs[i])
        F.cross_entropy(o, ys[i]).backward()
        assert torch.allclose(out[i], o, atol=1e-5), (kind, i)
        for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), (kind, n)
        for (n, b), (_, c) in zip(m.named_buffers(), ref.named_buffers()):
            assert torch.allclose(b.float(), c.float(), atol=1e-6), (kind, n)
    assert stack.aliased()
    before = next(iter(stack.params.values()))[1].detach().clone()
    opt = torch.optim.SGD(models[1].parameters(), lr=0.1)
    opt.step()
    after = next(iter(stack.params.values()))
    assert not torch.equal(after[1], before) and torch.equal(after[1], next(models[1].parameters()))


def test_agree_rewinds_a_seed_one_save_ahead(tmp_path: Path) -> None:
    """Killed between the K checkpoint writes of one save point: the seed ahead is read from the
    checkpoint it kept; checkpoints that cannot meet are refused in one line."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()

    def save(d: Path, step: int) -> None:
        seeds.keep_previous(d / "checkpoint.pt")
        checkpoint.save(d / "checkpoint.pt", {"model": {}, "progress": {"step": step}})

    save(a, 8), save(b, 8), save(a, 16)  # b's write of step 16 never happened
    states = seeds.agree([a, b], "checkpoint.pt", torch.device("cpu"))
    assert [s["progress"]["step"] for s in states] == [8, 8]
    assert (a / seeds.PREVIOUS).exists()
    save(a, 24)  # a resumed alone meanwhile: 24 and its kept 16 cannot meet b's 8
    with pytest.raises(Exception, match="stopped at different points"):
        seeds.agree([a, b], "checkpoint.pt", torch.device("cpu"))
    c = tmp_path / "c"
    c.mkdir()
    save(c, 8)  # killed during the first save point: the seed without a checkpoint starts afresh
    assert [s is None for s in seeds.agree([c, tmp_path / "none"], "checkpoint.pt", torch.device("cpu"))] == \
        [True, True]


def _numbers(run: Path) -> dict:
    m = read_metrics(run)
    return {k: v for k, v in m.items() if k not in ("wall_s", "images_per_s", "history", "seeds_per_process")}


@pytest.mark.parametrize("method", [["method=sr", "bits=4"], ["method=bc"]], ids=["sr", "bc"])
def test_group_writes_what_separate_runs_write(tmp_path: Path, method: list[str]) -> None:
    """Seeds 0 and 1 as a group and as two runs: the same folders and files, the same identity
    (fingerprint, data, overrides with each seed's own ``seed=``), records that differ only by
    ``seeds_per_process`` and float rounding."""
    args = [*TINY, *method]
    proc = run_qexp(["train", *args, "trainer.seeds_per_process=2", f"out_root={tmp_path / 'group'}"])
    assert "lr_scheduler.step()" not in proc.stderr  # each seed's optimizer stepped (in the shared one)
    for s in (0, 1):
        run_qexp(["train", *args, f"seed={s}", f"out_root={tmp_path / 'alone'}"])
    group, alone = find_runs(tmp_path / "group"), find_runs(tmp_path / "alone")
    assert [p.relative_to(tmp_path / "group") for p in group] == [p.relative_to(tmp_path / "alone") for p in alone]
    assert [p.name for p in group] == ["seed0", "seed1"]
    for g, a in zip(group, alone):
        def files(run: Path) -> set[str]:
            return {str(p.relative_to(run)) for p in run.rglob("*") if "tfevents" not in p.name}

        assert files(g) == files(a)
        mg, ma = read_metrics(g), read_metrics(a)
        assert mg["seeds_per_process"] == 2 and "seeds_per_process" not in ma
        ng, na = _numbers(g), _numbers(a)
        assert set(ng) == set(na)
        assert {k: v for k, v in ng.items() if not isinstance(v, float)} == \
            {k: v for k, v in na.items() if not isinstance(v, float)}  # seed, fingerprint, data, status...
        for row_g, row_a in zip(mg["history"], ma["history"]):
            assert abs(row_g["test_error"] - row_a["test_error"]) <= 2.0  # 256 test images: 2 points = 5 images
            assert row_g["train_loss"] == pytest.approx(row_a["train_loss"], rel=0.05)
        sg, sa = checkpoint.load(g / "checkpoint.pt"), checkpoint.load(a / "checkpoint.pt")
        assert set(sg) == set(sa) and sg["config"] == sa["config"]
        for k, v in sa["model"].items():
            assert sg["model"][k].shape == v.shape
            assert torch.allclose(sg["model"][k].float(), v.float(), atol=5e-3), k
        assert len(sg["optimizer"]["state"]) == len(sa["optimizer"]["state"])
        assert (g / "checkpoint.pt").stat().st_size == pytest.approx((a / "checkpoint.pt").stat().st_size, rel=0.01)
        assert (g / "train.log").read_text().count(" - epoch ") == 3  # its own epochs, not the other seed's
        overrides = (g / ".hydra" / "overrides.yaml").read_text()
        assert ("- seed=1" in overrides) == (g.name == "seed1")


def test_a_killed_group_resumes_bit_identically(tmp_path: Path) -> None:
    """The kill matrix's driver on a group of 2: killed inside seed 1's second checkpoint write (seed 0
    is then one save point ahead and is rewound), mid-epoch, and stopped by SIGTERM; the same command
    again ends with exactly the uninterrupted group's records and checkpoints, with nothing left behind.
    Optimizer steps count per seed (2 a group step)."""
    spec = {"out": str(tmp_path), "cases": {
        "sr": {"overrides": [*TINY, "method=sr", "bits=4", "trainer.seeds_per_process=2"],
               "scenarios": ["ckpt:4", "step:21", "sigterm:21"]}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    report = run_drivers([tmp_path / "spec.json"], timeout=600)["sr"]
    assert report["ref"] == ["exit", 0]
    for sc in ("ckpt:4", "step:21", "sigterm:21"):
        r = report[sc]
        assert r["diffs"] == [] and r["leftovers"] == [], (sc, r)
        assert r["second"] == ["exit", 0], (sc, r)
    assert report["control"], "the comparison must see a one-ulp change"


def test_a_seed_of_a_group_resumes_alone(tmp_path: Path) -> None:
    """A group stopped by SIGTERM: seed 1 resumed by a plain run (its checkpoint is a separate run's),
    then the group command again finishes seed 0 alone."""
    args = [*TINY, "dataset.train_subset=512", "batch_size=2", "epochs=2", "method=sr", "bits=4",
            f"out_root={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "qexp.cli", "train", *args, "trainer.seeds_per_process=2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        runs = find_runs(tmp_path)
        if len(runs) == 2 and all(read_metrics(r).get("history") for r in runs):  # epoch 1 done
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    seed0, seed1 = find_runs(tmp_path)
    assert proc.returncode == 0 and read_metrics(seed1)["status"] == "interrupted", out[-2000:]
    run_qexp(["train", *args, "seed=1"])
    assert read_metrics(seed1)["status"] == "completed" and "resuming" in (seed1 / "train.log").read_text()
    assert "seeds_per_process" not in read_metrics(seed1)
    run_qexp(["train", *args, "trainer.seeds_per_process=2"])
    assert read_metrics(seed0)["status"] == "completed"
    assert not any(p.name == seeds.PREVIOUS for r in (seed0, seed1) for p in r.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["trainer.seeds_per_process=0"], "at least 1"),
    (["trainer.seeds_per_process=2", "method=bc", "method.stochastic=true"], "method=bc"),
    (["trainer.seeds_per_process=2", "trainer.devices=2"], "trainer.devices"),
    (["trainer.seeds_per_process=2", "compile=true"], "compile=true"),
    (["trainer.seeds_per_process=2", "precision=bf16-mixed"], "precision=bf16-mixed"),
    (["trainer.seeds_per_process=2", "seed=9223372036854775807"], "goes past seed"),
])
def test_what_cannot_be_stacked_is_refused(extra: list[str], message: str) -> None:
    cfg = compose_train([*TINY, *extra])
    with pytest.raises(QexpError, match=message):
        check_seeds(cfg, build_method(cfg))


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    """Through the command: one line, exit 2, no folder."""
    proc = run_qexp(["train", *TINY, "trainer.seeds_per_process=2", "method=ste", f"out_root={tmp_path / 'out'}"],
                    check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "method=ste" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_dropout_is_refused_before_any_folder(tmp_path: Path) -> None:
    """vmap draws dropout masks from another stream than separate runs: a seed's result would not answer
    for its ``seed=k`` run (measured: 9.4 points apart on a tiny MLP), so the group is refused."""
    proc = run_qexp(["train", *TINY, "model.dropout=0.5", "trainer.seeds_per_process=2",
                     f"out_root={tmp_path / 'out'}"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Dropout" in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_all_seeds_already_finished_is_a_skip(tmp_path: Path) -> None:
    """A group whose seeds all finished trains nothing (each seed's folder is reported)."""
    args = [*TINY, "epochs=1", "trainer.seeds_per_process=2", f"out_root={tmp_path}"]
    run_qexp(["train", *args])
    again = run_qexp(["train", *args])
    assert again.stdout.count("not retrained") == 2


def test_a_typed_method_seed_is_a_difference_of_the_later_seeds(tmp_path: Path) -> None:
    """``method.seed=0`` with seeds 0 and 1 stacked: seed 1 trained with method.seed 0, which is not its
    default (``${seed}``), so its folder is the one ``seed=1 method.seed=0`` alone uses (that run is then
    reported finished), not plain ``seed=1``'s."""
    args = [*TINY, "epochs=1", "method=sr", "bits=4", "method.seed=0", f"out_root={tmp_path}"]
    run_qexp(["train", *args, "trainer.seeds_per_process=2"])
    runs = {p.name: p for p in find_runs(tmp_path)}
    assert "method.seed=0" not in runs["seed0"].parent.name and "method.seed=0" in runs["seed1"].parent.name
    assert "not retrained" in run_qexp(["train", *args, "seed=1"]).stdout
