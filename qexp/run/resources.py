"""What a run's process uses: how many math threads (so that a local sweep fills the cores without
oversubscribing them: jobs x threads = cores), and where its caches go (below ``out_root``).

Why explicit: torch takes every core by default. Run one after another that is right; in a local
parallel sweep (Hydra's joblib launcher, one process per job) n jobs x all cores each would make every
job fight for the caches and the scheduler. joblib's loky workers happen to export ``OMP_NUM_THREADS =
cores // n_jobs``; qexp does not rely on that, sets torch's thread count itself, and lets ``threads=N``
choose it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from qexp.data.common import use_cache
from qexp.errors import QexpError
from qexp.run.record import CACHE_FOLDER

log = logging.getLogger("qexp")


def cores() -> int:
    """Usable cores: the CPU affinity mask and cgroup quota as joblib reads them (its ``n_jobs=-1``)."""
    try:
        from joblib import cpu_count

        return max(1, int(cpu_count()))
    except Exception:  # joblib missing or unable to read the quota
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def parallel_jobs(launcher: Any, n_cores: int) -> int | None:
    """Jobs running at once under a local parallel (joblib) launcher config, else None.
    ``n_jobs`` follows joblib: -1 is every core, -2 all but one, ..."""
    if launcher is None or "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    n = int(launcher.get("n_jobs", -1) or -1)
    return max(1, n if n > 0 else n_cores + 1 + n)


#: how far ``threads`` may oversubscribe the cores: more only slows a run down (5000 threads on 2 cores
#: were 17x slower than 64), and far more crashes the process
MAX_THREADS_PER_CORE = 16


def job_threads(requested: int | None, jobs: int | None, n_cores: int) -> int | None:
    """Threads for this process: ``threads=N`` if given, ``cores // jobs`` inside a local parallel sweep,
    else None (torch's default, every core)."""
    if requested is not None:
        if not 1 <= int(requested) <= MAX_THREADS_PER_CORE * n_cores:  # threads=100000 crashed (SIGSEGV)
            raise QexpError(f"threads must be 1..{MAX_THREADS_PER_CORE * n_cores} on these {n_cores} cores "
                            f"(or null for automatic), got {requested}")
        return int(requested)
    if jobs is None:
        return None
    if jobs > n_cores:
        log.warning("hydra.launcher.n_jobs=%d is more than the %d cores: jobs will share cores", jobs, n_cores)
    return max(1, n_cores // jobs)


def apply_threads(requested: int | None, launcher: Any = None) -> int:
    """Set torch's thread count for this run's process; returns the count in use."""
    n_cores = cores()
    threads = job_threads(requested, parallel_jobs(launcher, n_cores), n_cores)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


#: glibc's ``mallopt`` parameters (malloc.h): the heap-top size above which free() gives memory back, and the
#: block size above which malloc() maps fresh pages from the kernel instead of reusing the heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: what a process keeps: freed blocks up to this size stay in the heap for the next step's tensors
KEEP_FREED_BYTES = 1 << 30
_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Let glibc keep the memory a step frees for the next step (both thresholds at :data:`KEEP_FREED_BYTES`).

    Why: CPU tensors come from malloc. By default glibc maps every block above a threshold (128 KiB,
    adapting upward) fresh from the kernel and unmaps it on free; a loop that frees and re-allocates the
    same activation-sized blocks every batch then pays a page fault per 4 KiB each time. Measured on one
    thread (BENCHMARKS.md, ``scripts/bench_malloc.py``): LeNet-5 evaluation at batch 1000 1.69x faster,
    LeNet-5 training steps (batch 64) 1.23x, ResNet-20 steps (batch 128) 1.12x, (batch 1024) 1.93x; results
    are unchanged (the allocator decides where a tensor lives, not what it holds). The cost: a process may
    keep up to 1 GiB of freed memory instead of returning it, and the kept blocks fragment the heap (peak
    resident memory +0-6% at those batches of 64-128, +38% at 1024). Once per process; only on
    glibc, and not where the user set any of glibc's ``MALLOC_*`` variables or ``GLIBC_TUNABLES``, or
    preloaded another allocator. Returns whether the setting is in force."""
    global _kept
    if _kept is None:
        _kept = False
        preloaded = os.environ.get("LD_PRELOAD", "")
        if (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
                # a user who tuned the allocator (glibc's MALLOC_* or tunables, another malloc preloaded) keeps it
                and not any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ)
                and "malloc" not in preloaded):  # tcmalloc, jemalloc, mimalloc
            try:
                libc = ctypes.CDLL(None)
                # a glibc that refuses so high an mmap threshold gets 32 MiB, its documented default maximum
                mapped = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
                _kept = bool(mapped and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
            except (OSError, AttributeError):  # no mallopt to call: _kept stays False
                pass
    return _kept


#: the cache folders this process placed in the environment (a later run with another out_root moves them)
_PLACED: dict[str, str] = {}
#: ``<out_root>/.cache`` of this process's current run (:func:`keep_caches_under`)
_WANTED: Path | None = None


def keep_caches_under(out_root: str | Path) -> Path:
    """Keep what a run caches in ``<out_root>/.cache``: decoded datasets and matplotlib's font cache now,
    torch.compile's and Triton's kernels once :func:`place_kernel_caches` runs (before anything is built).
    Their defaults (``~/.cache``, ``/tmp/torchinductor_<user>``, ``~/.triton``) are outside ``out_root``,
    where qexp writes nothing. A user's own ``QEXP_CACHE``, ``MPLCONFIGDIR``, ``TORCHINDUCTOR_CACHE_DIR``
    or ``TRITON_CACHE_DIR`` is kept. Cheap: a run reported as finished, or refused, imports nothing more."""
    global _WANTED
    _WANTED = Path(out_root).expanduser().absolute() / CACHE_FOLDER
    use_cache(_WANTED)
    # matplotlib (a method's TensorBoard figure) keeps its font cache in ~/.cache/matplotlib; it reads the
    # variable when first imported and makes the folder then
    _place("MPLCONFIGDIR", _WANTED / "matplotlib")
    return _WANTED


def _place(var: str, folder: Path, default: str | None = None) -> None:
    """Name ``folder`` in ``var`` unless the user named another (unset, an earlier run's of ours, or the
    library's own ``default`` count as not named)."""
    if os.environ.get(var) in (None, _PLACED.get(var), default):
        os.environ[var] = _PLACED[var] = str(folder)


def place_kernel_caches() -> None:
    """Before a model is built or compiled: import ``torch._dynamo`` quietly (:func:`import_dynamo_quietly`),
    then name the run's kernel folders in the environment (DDP's processes inherit them). Each folder is
    made by its first writer: a run that compiles nothing makes none."""
    import_dynamo_quietly()
    if _WANTED is None:  # not a training run (qexp eval): torch's own defaults, made only by a compile
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch names its default in the variable when it first asks for the folder
    _place("TORCHINDUCTOR_CACHE_DIR", _WANTED / "torchinductor", os.path.abspath(default_cache_dir()))
    _place("TRITON_CACHE_DIR", _WANTED / "triton")


def keep_compiled_headers_beside_kernels() -> None:
    """torch.compile on CPU precompiles C++ headers into ``/tmp/torchinductor_<user>`` whatever
    ``TORCHINDUCTOR_CACHE_DIR`` says (torch reads its default folder there); when the kernel cache is the
    one :func:`keep_caches_under` placed, the headers go into it too (a torch without that module
    variable keeps its own place)."""
    var = "TORCHINDUCTOR_CACHE_DIR"
    placed = _PLACED.get(var)
    if placed is None or os.environ.get(var) != placed:
        return
    from torch._inductor import codecache

    if hasattr(codecache, "_HEADER_DIR") and hasattr(codecache, "_HEADER_LOCK_DIR"):
        codecache._HEADER_DIR = os.path.join(placed, "precompiled_headers")
        codecache._HEADER_LOCK_DIR = os.path.join(codecache._HEADER_DIR, "locks")


def import_dynamo_quietly() -> None:
    """Import ``torch._dynamo`` (torchvision does) while its cache folder is an existing one: the import
    makes that folder, by default ``/tmp/torchinductor_<user>``, and sets the variable naming it; both are
    undone here unless the user set it. What compiles later uses the folder the variable then names."""
    var = "TORCHINDUCTOR_CACHE_DIR"
    if "torch._dynamo" in sys.modules:
        return
    before = os.environ.get(var)
    if before is None:
        os.environ[var] = tempfile.gettempdir()
    try:
        import torch._dynamo  # noqa: F401
    finally:
        if before is None:
            os.environ.pop(var, None)


def log_threads() -> None:
    """One line in the run's train.log: how many threads this run computed with."""
    log.info("torch threads: %d (%d cores)", torch.get_num_threads(), cores())
