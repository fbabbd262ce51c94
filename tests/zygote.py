"""A fork server for the suite's ``qexp`` processes: ``python -m tests.zygote`` imports what every ``qexp train``
imports first (torch, torch._dynamo, Hydra, qexp's run modules: about 3.5 s of a 2-core machine's time),
then forks one child per request, which runs ``python -m qexp.cli ARGV`` as the interpreter would.

Each child is a real process of its own (its own pid, exit status, signals, files); it differs from a fresh
interpreter only in what was imported before it started, so the conftest's ``run_qexp`` sends a command here
only when its environment differs from this server's in variables nothing reads while importing
(:data:`RUNTIME_VARS`), never in ones read at import time (threads, allocator, caches, paths).

Protocol (one JSON object a line): request ``{"argv", "cwd", "env", "out", "err"}`` on stdin; answers on
stdout ``{"pid": n}`` when the child started, then ``{"status": "exit" | "signal", "code": n}``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

#: variables no import before the fork reads, so a request's environment may differ from the server's in these:
#: qexp's own (``QEXP_*``, read when a run starts), bash completion's, pytest's current test, cuBLAS's
#: workspace (read when cuBLAS starts; tests/test_cuda.py sets it), Intel OpenMP's fork flag (joblib sets it
#: when imported; torch's wheels use GNU OpenMP) and a pointer torch's inductor sets before it loads a
#: compiled module of its own
RUNTIME_VARS = ("COMP_LINE", "COMP_POINT", "PYTEST_CURRENT_TEST", "CUBLAS_WORKSPACE_CONFIG", "KMP_INIT_AT_FORK",
                "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR")


def runtime_var(name: str) -> bool:
    """Whether a request may set ``name`` otherwise than the server's environment (:data:`RUNTIME_VARS`)."""
    return name.startswith("QEXP_") or name in RUNTIME_VARS


def redirect(out: str, err: str) -> None:
    """In a forked child: stdout and stderr into these files (made or emptied), stdin empty."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, flags, 0o644)
        os.dup2(f, fd)
        os.close(f)


def _child(req: dict) -> None:
    """Become ``python -m qexp.cli ARGV`` started in ``cwd`` with ``env`` (:func:`redirect`): returns in the
    child only; SystemExit and uncaught exceptions end it as they end an interpreter."""
    redirect(req["out"], req["err"])
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    if "numpy" in sys.modules:  # drawn from the OS's entropy in a fresh interpreter (Python's random reseeds itself)
        sys.modules["numpy"].random.seed()
    sys.path[0] = os.getcwd()  # as `python -m` puts the working folder first
    sys.argv = ["-m", *req["argv"]]  # runpy replaces argv[0] with the module's file, as -m does
    runpy.run_module("qexp.cli", run_name="__main__", alter_sys=True)


def serve() -> None:
    import hydra  # noqa: F401
    import torch._dynamo  # noqa: F401  (the first optimizer imports it)
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    import qexp.run.train  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
            sys.exit(0)  # qexp.cli ended without sys.exit: status 0, as an interpreter's
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            print(json.dumps({"status": "signal", "code": os.WTERMSIG(status)}), flush=True)
        else:
            print(json.dumps({"status": "exit", "code": os.WEXITSTATUS(status)}), flush=True)


if __name__ == "__main__":
    serve()
