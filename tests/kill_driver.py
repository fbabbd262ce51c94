"""Kill-matrix driver: ``python -m tests.kill_driver SPEC.json`` (used by tests/test_kill_matrix.py).

SPEC: ``{"out": folder, "cases": {name: {"overrides": [...], "scenarios": ["step:11", ...]}}}``; prints
one line ``KILL-MATRIX {name: {"ref": ..., scenario: {...}}}``.

Imports qexp once, then runs every ``qexp train`` in a forked child (a real process: SIGKILL kills it,
its lock is left behind, its pid disappears), so the matrix costs one interpreter start-up in all:

* ``ref``: an uninterrupted run;
* for each scenario, a first launch killed at a precise point, then the same command again, which must
  finish with exactly the reference's metrics.json numbers and checkpoint (weights and method state).

Kill points are installed in the child through global hooks that know nothing about the engine: after the
n-th optimizer step (torch's global step hook), at the first evaluation forward after n steps (a global
module forward hook in eval mode), inside the n-th checkpoint write (after the temporary file is
written, before the rename), right after the n-th metrics.json write. ``sigint`` sends Ctrl-C to itself
after the n-th step instead of SIGKILL, ``sigterm`` a scheduler's SIGTERM (a preemption).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # noqa: F401  (imported once here, not in every child: the first optimizer needs it)
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

from tests.zygote import redirect

#: metrics.json keys that measure time, not results
TIMING = ("wall_s", "images_per_s")


def _install(kind: str, n: int) -> None:
    me = os.getpid()
    steps = [0]
    sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}.get(kind, signal.SIGKILL)

    def on_step(opt: Any, args: Any, kwargs: Any) -> None:
        steps[0] += 1
        if kind in ("step", "sigint", "sigterm") and steps[0] == n:
            os.kill(me, sig)

    register_optimizer_step_post_hook(on_step)
    if kind == "eval":
        def on_forward(module: Any, args: Any) -> None:
            if not module.training and steps[0] >= n:
                os.kill(me, signal.SIGKILL)

        register_module_forward_pre_hook(on_forward)
    if kind in ("ckpt", "metrics"):
        real_replace = os.replace
        count = [0]
        target = "checkpoint.pt" if kind == "ckpt" else "metrics.json"

        def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if str(dst).endswith(target):
                count[0] += 1
                if kind == "ckpt" and count[0] == n:
                    os.kill(me, signal.SIGKILL)  # the temporary file is complete, the rename never happens
                real_replace(src, dst, *a, **k)
                if kind == "metrics" and count[0] == n:
                    os.kill(me, signal.SIGKILL)
                return
            real_replace(src, dst, *a, **k)

        os.replace = replace


def launch(argv: list[str], kill: tuple[str, int] | None = None, log: Path | None = None,
           umask: int | None = None, uid: int | None = None, env: dict[str, str] | None = None) -> tuple[str, int]:
    """``qexp train ARGV`` in a forked child; ("signal", n) or ("exit", code).

    ``log``: the child's stdout and stderr go to LOG.out / LOG.err (stdin empty); ``umask``/``uid``/``env``: set in the
    child."""
    from qexp.run import train

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if log is not None:
                redirect(f"{log}.out", f"{log}.err")
            os.environ.update(env or {})
            if umask is not None:
                os.umask(umask)
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            if kill is not None:
                _install(*kill)
            sys.argv = ["qexp train", *argv]
            train.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "signal", os.WTERMSIG(status)
    return "exit", os.WEXITSTATUS(status)


def run_folders(out: Path) -> list[Path]:
    """Every run folder below ``out`` (several: the seeds of a ``trainer.seeds_per_process`` group)."""
    return sorted({p.parent for p in out.rglob("metrics.json")})


def numbers(run_dir: Path) -> dict[str, Any]:
    """metrics.json without timings (per epoch too)."""
    m = json.loads((run_dir / "metrics.json").read_text())
    m = {k: v for k, v in m.items() if k not in TIMING}
    m["history"] = [{k: v for k, v in row.items() if k not in TIMING} for row in m.get("history", [])]
    return m


def state(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


def same_state(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two checkpoint trees differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys"]
        return [d for k in a for d in same_state(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} len"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same_state(x, y, f"{path}/{i}")]
    return [] if a == b else [path]


def compare(ref: Path, got: Path) -> list[str]:
    diffs = []
    a, b = numbers(ref), numbers(got)
    for k in sorted(set(a) | set(b)):
        if k == "history" and len(a.get(k, [])) == len(b.get(k, [])):
            for i, (ra, rb) in enumerate(zip(a[k], b[k])):
                diffs += [f"metrics.json history[{i}].{c}: {ra.get(c)!r} != {rb.get(c)!r}"
                          for c in sorted(set(ra) | set(rb)) if ra.get(c) != rb.get(c)]
        elif a.get(k) != b.get(k):
            diffs.append(f"metrics.json {k}: {a.get(k)!r} != {b.get(k)!r}"[:300])
    sa, sb = state(ref), state(got)
    skip = ("progress",)  # holds train_time/wall_s (timings); its counters are checked through metrics
    diffs += [f"checkpoint {d}" for k in set(sa) | set(sb) if k not in skip
              for d in same_state(sa.get(k), sb.get(k), k)]
    pa, pb = sa["progress"], sb["progress"]
    for k in ("epoch", "batch", "step"):
        if pa[k] != pb[k]:
            diffs.append(f"checkpoint progress/{k}: {pa[k]} != {pb[k]}")
    return diffs


def run_case(out: Path, overrides: list[str], scenarios: list[str]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    ref_out = out / "ref"
    report["ref"] = launch([*overrides, f"out_root={ref_out}"])
    refs = run_folders(ref_out)
    for sc in scenarios:
        kind, n = sc.split(":")
        where = out / sc.replace(":", "_")
        args = [*overrides, f"out_root={where}"]
        first = launch(args, (kind, int(n)))
        status_after_kill = json.loads((run_folders(where)[0] / "metrics.json").read_text())["status"]
        second = launch(args)
        runs = run_folders(where)
        diffs = [] if len(runs) == len(refs) else [f"{len(runs)} run folders, not {len(refs)}"]
        diffs += [d for ref, run in zip(refs, runs) for d in compare(ref, run)]
        leftovers = sorted(p.name for run in runs for p in run.iterdir()
                           if p.name.endswith(".tmp") or p.name in (".lock", "checkpoint.prev.pt"))
        report[sc] = {"first": first, "status_after_first": status_after_kill, "second": second,
                      "diffs": diffs, "leftovers": leftovers}
    ref = refs[0]
    report["control"] = control(ref, out / "control")
    return report


def control(ref: Path, where: Path) -> list[str]:
    """The comparison must see a one-ulp change of one weight (else the matrix could not fail)."""
    import shutil

    shutil.copytree(ref, where)
    s = state(where)
    name, w = next((k, v) for k, v in s["model"].items() if v.is_floating_point() and v.numel())
    w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf"), dtype=w.dtype))
    torch.save(s, where / "checkpoint.pt")
    return compare(ref, where)


def cli(spec: dict[str, Any]) -> dict[str, Any]:
    """``{"out": folder, "launches": {name: {"argv": [...], "umask": 0o22?, "uid": n?, "env": {}?}}}``: each
    launch in order, with its exit status and its stdout/stderr text."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for name, c in spec["launches"].items():
        for m in Path(c.get("set_status", [out, ""])[0]).rglob("metrics.json") if c.get("set_status") else []:
            rec = json.loads(m.read_text())  # pretend that run stopped early (an interrupted run)
            m.write_text(json.dumps({**rec, "status": c["set_status"][1]}))
        if c.get("set_config"):  # pretend the unfinished run there was made with another value of a key
            where, key, value = c["set_config"]
            for ck in Path(where).rglob("checkpoint.pt"):
                st = torch.load(ck, map_location="cpu", weights_only=True)
                st["config"] = json.dumps({**json.loads(st["config"]), key: value}, sort_keys=True)
                torch.save(st, ck)
                rec = json.loads((ck.parent / "metrics.json").read_text())  # which the record names too
                (ck.parent / "metrics.json").write_text(json.dumps({**rec, "fingerprint": st["config"]}))
        log = out / f"launch-{name}"
        how = launch(c["argv"], log=log, umask=c.get("umask"), uid=c.get("uid"), env=c.get("env"))
        report[name] = {"how": how, "stdout": Path(f"{log}.out").read_text(),
                        "stderr": Path(f"{log}.err").read_text()}
    return report


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if "launches" in spec:
        torch.set_num_threads(1)
        import qexp.run.train  # noqa: F401

        print("KILL-MATRIX " + json.dumps(cli(spec)))
        return
    torch.set_num_threads(1)
    import hydra  # noqa: F401  (imported once here, not in every child)
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    import qexp.run.train  # noqa: F401
    out = Path(spec["out"])
    report = {name: run_case(out / name, c["overrides"], c["scenarios"]) for name, c in spec["cases"].items()}
    print("KILL-MATRIX " + json.dumps(report))


if __name__ == "__main__":
    main()
