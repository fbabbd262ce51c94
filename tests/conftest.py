"""Shared fixtures: the real-data root, running ``qexp`` as a user does (a subprocess), the markers
(``slow``, ``real_data``, ``cuda``) and the split of the suite over pytest-xdist workers."""

from __future__ import annotations

import functools
import getpass
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from qexp.run.resources import keep_freed_memory

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO / "data"  # qexp's own default (./data) when QEXP_DATA is unset

# Every run a test starts computes on the CPU unless the test asks for a device (``device=cuda`` in the
# tests marked ``cuda``): the suite's exact numbers and accuracy floors were measured there, and on a GPU
# machine ``device=auto`` would pick the GPU (``device``'s default is ``$QEXP_DEVICE``, else auto).
os.environ["QEXP_DEVICE"] = "cpu"

# torch.compile's kernels are cached in one folder for the whole suite (beside torch's default; qexp takes
# the default itself for "unset"), not in every test's out_root (qexp's default): each compiling test
# would otherwise start cold. tests/test_footprint.py checks qexp's default with the variable unset.
# (computed by hand: importing torch._inductor makes torch's default folder and names it in the variable)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}-qexp-tests"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (``-n 2`` in pyproject's addopts) every worker computes with one thread, and so do
    # the `qexp` processes it starts (they inherit OMP_NUM_THREADS): workers x threads = cores, as a local
    # parallel sweep does (qexp/run/resources.py); oversubscribed threads are many times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# the tests that train in the worker's own process reuse freed activations as every qexp process does
keep_freed_memory()
#: the environment the suite's ``qexp`` processes start from (the fork server's: tests/zygote.py)
BASE_ENV = dict(os.environ)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Each test starts from the suite's environment: what a test's in-process qexp run sets in
    ``os.environ`` (``HYDRA_FULL_ERROR``, the run's ``MPLCONFIGDIR``/``TRITON_CACHE_DIR`` below its
    out_root, DDP's ``OMP_NUM_THREADS``) is undone after it, so the next test's ``qexp`` processes never
    inherit it (a user's shell would not have it either)."""
    saved = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    try:
        return (yield)
    finally:
        for k in [k for k in os.environ if k not in saved and k != "PYTEST_CURRENT_TEST"]:
            del os.environ[k]
        os.environ.update(saved)


def data_root_path() -> Path:
    """Absolute: a relative ``QEXP_DATA`` (as the README's test command sets it) is relative to where
    pytest was started, and tests link to it from (or run subprocesses in) other folders."""
    return Path(os.environ.get("QEXP_DATA", DEFAULT_DATA)).resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets ($QEXP_DATA, else ./data). Missing data FAILS the test, never skips it."""
    root = data_root_path()
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"real data not found at {root}: set QEXP_DATA to the folder holding MNIST/raw")
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers that say what a test needs:

    * ``real_data``: every test that reads the real datasets (through the ``data_root`` fixture, directly
      or not), so ``-m "not real_data"`` is the suite without ``$QEXP_DATA``;
    * ``cuda``: skipped where no CUDA device is visible.

    and the order in which the files run.
    """
    no_cuda = pytest.mark.skip(reason="needs a CUDA device") if not torch.cuda.is_available() else None
    # the longest files first (tests/durations.json: seconds per file, measured on 2 cores): pytest-xdist
    # hands out files in this order (pyproject's --no-loadscope-reorder), so no long file starts last while
    # the other worker has nothing left to do; a file not listed counts as short
    cost = json.loads((REPO / "tests" / "durations.json").read_text())
    items.sort(key=lambda item: -cost.get(item.path.name, 0))
    for item in items:
        if "data_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_data)
        if no_cuda is not None and item.get_closest_marker("cuda"):
            item.add_marker(no_cuda)


def run_qexp(args: list[str], cwd: Path | None = None, env: dict[str, str | None] | None = None,
             check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``qexp ARGS`` in a process of its own, as ``python -m qexp.cli ARGS`` (so the venv's qexp is used);
    ``env`` adds to this environment (a None value removes the variable). The process is forked from the
    worker's fork server (tests/zygote.py: torch and Hydra imported once) when its environment allows,
    else started fresh."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    cmd = [sys.executable, "-m", "qexp.cli", *args]
    server = _fork_server(full_env)
    if server is not None:
        proc = server.run(cmd, os.path.abspath(cwd or os.getcwd()), full_env, timeout)
    else:
        proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"qexp {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class _ForkServer:
    """``python -m tests.zygote`` (see there) and the pipes to it."""

    def __init__(self) -> None:
        self.buf = b""
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], cwd=REPO, env=BASE_ENV,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        assert json.loads(self._answer(300)) == {"ready": True}

    def _answer(self, timeout: float) -> str:
        """The server's next line (read from the pipe unbuffered, so select() sees every line not read yet)."""
        import select
        import time

        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise subprocess.TimeoutExpired("tests.zygote", timeout)
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the fork server (tests/zygote.py) ended ({self.proc.wait()})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def run(self, cmd: list[str], cwd: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "out"), Path(tmp, "err")  # made by the child (tests/zygote.py's redirect)
            request = json.dumps({"argv": cmd[3:], "cwd": cwd, "env": env, "out": str(out), "err": str(err)})
            data = request.encode() + b"\n"
            while data:  # an unbuffered pipe may take part of it
                data = data[os.write(self.proc.stdin.fileno(), data):]
            pid = json.loads(self._answer(60))["pid"]
            try:
                done = json.loads(self._answer(timeout))
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self._answer(60)
                raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text()) from None
            code = done["code"] if done["status"] == "exit" else -done["code"]
            return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())


@functools.cache
def _server() -> _ForkServer:
    """This test process's fork server, started on first use."""
    return _ForkServer()


def _fork_server(env: dict[str, str]) -> _ForkServer | None:
    """The fork server, if a process forked from it would see what a fresh one sees: its environment differs
    from the server's only in variables read at run time (tests/zygote.py's ``runtime_var``). ``QEXP_TESTS_FORK=0``
    in the environment (the suite's, or one command's) starts every process (that one) fresh."""
    from tests.zygote import runtime_var

    if env.get("QEXP_TESTS_FORK", "1") == "0":  # every qexp process a fresh interpreter
        return None
    if torch.cuda.is_available():  # a child forked after the CUDA driver was touched may not use CUDA:
        return None  # on a GPU machine every qexp process starts fresh (as it always did there)
    differ = {k for k in set(env) | set(BASE_ENV) if env.get(k) != BASE_ENV.get(k)}
    return _server() if all(runtime_var(k) for k in differ) else None


def run_drivers(specs: list[Path], timeout: float) -> dict:
    """Run ``python -m tests.kill_driver SPEC`` for every spec side by side (one per core, one thread each)
    and merge their ``KILL-MATRIX`` reports."""
    procs = [subprocess.Popen([sys.executable, "-m", "tests.kill_driver", str(spec)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for spec in specs]
    report: dict = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("KILL-MATRIX ")]
        assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
        report.update(json.loads(lines[0][len("KILL-MATRIX "):]))
    return report


def seed_floor(accs: tuple[float, ...]) -> float:
    """An accuracy floor from measured seeds: the lowest minus three standard deviations and half a point
    (the spread of single runs across library versions and thread counts is of that order), rounded down
    to a tenth."""
    import math
    import statistics

    return math.floor(10 * (min(accs) - 3 * statistics.stdev(accs) - 0.5)) / 10


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def find_runs(root: Path) -> list[Path]:
    """Every run folder (one holding metrics.json) below ``root``, sorted."""
    return sorted(p.parent for p in root.rglob("metrics.json"))


def compose_train(overrides: list[str]):
    """Compose ``train.yaml`` with overrides, as ``qexp train`` would (without running anything)."""
    from hydra import compose, initialize_config_module

    from qexp.run.config import register

    register()
    with initialize_config_module(config_module="qexp.configs", version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One math thread, here and in `qexp` subprocesses: on a busy 2-core machine oversubscribed OpenMP
    threads are many times slower, and one thread keeps in-process and subprocess runs bit-equal."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
