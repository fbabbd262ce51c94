"""Nothing a run writes lands outside ``out_root``: decoded data and compiled kernels are cached in
``<out_root>/.cache`` (unless the user names a cache), DDP's rendezvous file lives in the run folder,
``qexp eval`` reads that cache without writing it, and ``qexp plot`` keeps matplotlib's font cache out of
``~``. The data folder is never written."""

from __future__ import annotations

import os
from pathlib import Path

from qexp.data import common
from qexp.run import resources
from qexp.run.record import CACHE_FOLDER
from tests.conftest import find_runs, run_qexp
from tests.test_config import write_cifar10_jpeg

#: the user's own cache choices, unset: the defaults are what is checked
NO_CACHES = {"QEXP_CACHE": None, "TORCHINDUCTOR_CACHE_DIR": None, "TRITON_CACHE_DIR": None,
             "XDG_CACHE_HOME": None, "MPLCONFIGDIR": None}


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_training_in_two_processes_evaluating_and_plotting_write_only_below_out_root(tmp_path: Path) -> None:
    data, home, tmp, out = (tmp_path / d for d in ("data", "home", "tmp", "out"))
    write_cifar10_jpeg(data)
    home.mkdir()
    tmp.mkdir()
    env = {**NO_CACHES, "HOME": str(home), "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    before = _files(data)
    # learned draws its TensorBoard figure with matplotlib (a font cache in ~/.cache by default)
    run_qexp(["train", "dataset=cifar10_jpeg", "model=mlp", "method=learned", "epochs=1", "batch_size=4",
              "eval_batch_size=8", "trainer.devices=2", "progress=false", f"data_root={data}", f"out_root={out}"],
             cwd=tmp_path, env=env)
    (run,) = find_runs(out)
    cached = _files(out / CACHE_FOLDER)
    assert any(name.startswith("cifar10_jpeg-v") for name in cached), cached
    assert not [p.name for p in run.iterdir() if p.name.startswith(".ddp")]  # the rendezvous file is gone
    proc = run_qexp(["eval", str(run)], cwd=tmp_path, env=env)
    assert "decoding" not in proc.stdout + proc.stderr  # eval read the run's cache
    assert _files(out / CACHE_FOLDER) == cached  # and wrote nothing there
    bad = run_qexp(["plot", str(out), "--metric", "nope"], cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 2 and not (out / "plots").exists()  # refused: no folder left
    run_qexp(["plot", str(out)], cwd=tmp_path, env=env)  # matplotlib's font cache: not in ~/.cache
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["test_error.png", "test_error_alloc.png"]
    assert _files(data) == before
    assert _files(home) == {} and _files(tmp) == {}


def test_compiled_kernels_are_cached_below_out_root_unless_the_user_says_where(tmp_path: Path,
                                                                               monkeypatch) -> None:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "QEXP_CACHE"):
        monkeypatch.setenv(var, "")  # so that the test's own settings are undone, even of one unset before
        monkeypatch.delenv(var)
    monkeypatch.setattr(resources, "_PLACED", {})
    monkeypatch.setattr(common, "_CACHE", None)
    monkeypatch.setattr(resources, "_WANTED", None)
    first = resources.keep_caches_under(tmp_path / "a")
    assert first == (tmp_path / "a" / CACHE_FOLDER).absolute() and common.cache_place() == (first, True)
    resources.place_kernel_caches()  # what a run does before it builds anything
    assert Path(cache_dir()).parent == first and Path(os.environ["TRITON_CACHE_DIR"]).parent == first
    second = resources.keep_caches_under(tmp_path / "b")  # a later run of this process: its own out_root
    resources.place_kernel_caches()
    assert Path(cache_dir()).parent == second and common.cache_place() == (second, True)
    from torch._inductor import codecache

    monkeypatch.setattr(codecache, "_HEADER_DIR", codecache._HEADER_DIR)  # restored after the test
    monkeypatch.setattr(codecache, "_HEADER_LOCK_DIR", codecache._HEADER_LOCK_DIR)
    resources.keep_compiled_headers_beside_kernels()  # torch puts them in /tmp whatever the variable says
    assert Path(codecache._HEADER_DIR).parent == Path(cache_dir())
    mine = str(tmp_path / "mine")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", mine)
    monkeypatch.setenv("QEXP_CACHE", mine)
    resources.keep_caches_under(tmp_path / "c")
    resources.place_kernel_caches()
    assert cache_dir() == mine and common.cache_place() == (Path(mine), True)
    before = codecache._HEADER_DIR
    resources.keep_compiled_headers_beside_kernels()
    assert codecache._HEADER_DIR == before  # the user's kernel folder: torch's own place for the headers


def test_runs_are_not_searched_for_in_the_cache(tmp_path: Path) -> None:
    from qexp.report.results import find_run_dirs

    for d in ("sweep/seed0", f"{CACHE_FOLDER}/torchinductor/x", "hydra-only/.hydra"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "sweep/seed0/metrics.json").write_text("{}")
    (tmp_path / CACHE_FOLDER / "torchinductor/x/metrics.json").write_text("{}")
    (tmp_path / "hydra-only/.hydra/config.yaml").write_text("{}")
    assert find_run_dirs(tmp_path) == [tmp_path / "hydra-only", tmp_path / "sweep/seed0"]
