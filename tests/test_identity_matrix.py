"""The identity matrix (issue 21): for every pair of command lines, different effective configurations
never share a result, identical ones always do; every listed bad input is one line, exit 2, no folder.

All launches run as forked children of two driver processes (tests/kill_driver.py, one per core), a pair's
launches in one driver, in order: the second
launch of a SAME pair must answer "already completed, not retrained" from the first's folder; the second
of a DIFF pair must train into a folder of its own. Data: three fake MNIST roots (tiny IDX files), two
holding the same files, one other files under the same names.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qexp.errors import QexpError
from tests.conftest import REPO, find_runs, read_metrics, run_drivers

T = ["dataset=synthetic", "model=mlp", "model.width=16", "model.depth=1", "model.bn=false",
     "dataset.train_subset=64", "batch_size=32", "eval_batch_size=256", "progress=false", "threads=1",
     "device=cpu"]  # runs compared bit for bit: CPU (device=auto would pick a GPU)
#: lenet5 (a preset's own model) on the same tiny data
L = ["dataset=synthetic", "dataset.train_subset=64", "batch_size=32", "eval_batch_size=256", "progress=false",
     "threads=1", "epochs=1", "device=cpu"]

#: two spellings of one configuration: one run
SAME = {
    "bits": (["method=bc", "bits=4"], ["method=bc", "method.bits=4"]),
    "abits": (["method=lsq", "abits=8"], ["method=lsq", "method.abits=8"]),
    "scale": (["method=bc", "grid_scale=0.5"], ["method=bc", "method.scale=0.5"]),
    "lr": (["optim=sgd", "lr=0.01"], ["optim=sgd", "optim.lr=0.01"]),
    "float_scale": (["method=float"], ["method=float", "grid_scale=0.5"]),
    "float_bits": (["method=float"], ["method=float", "bits=4"]),
    "explicit": (["method=bc"], ["method=bc", "bits=1", "method.stochastic=false", "optim=adam"]),
    "number": (["method=bc", "sched=step", "grid_scale=2", "sched.gamma=1"],
               ["method=bc", "sched=step", "grid_scale=2.0", "sched.gamma=1.0"]),
}
#: two configurations: two runs
DIFF = {
    "bc_li": (["method=bc"], ["method=bc_li"]),
    "method_bits": (["method=bc"], ["method=bc", "method.bits=4"]),
    "lsq_abits": (["method=lsq"], ["method=lsq", "method.abits=8"]),
    "lsq_bits": (["method=lsq", "bits=4"], ["method=lsq", "method.bits=4"]),  # abits follows bits, not method.bits
    "method_seed": (["method=sr", "seed=1"], ["method=sr", "seed=1", "method.seed=0"]),
    "stochastic": (["method=bc"], ["method=bc", "method.stochastic=true"]),
    "scale": (["method=bc"], ["method=bc", "grid_scale=0.5"]),
}
#: the preset pair runs on lenet5 (the preset's model)
PRESET = (["+experiment=li2017_mnist", "name=runs", "method=bc", *L], ["method=bc", *L])
#: the preset's own name typed again is the preset's run (it once added an ``experiment=`` level and trained
#: the same run a second time)
PRESET_NAME = (["+experiment=li2017_mnist", "method=bc", *L], ["+experiment=li2017_mnist", "name=li2017_mnist",
                                                              "method=bc", *L])


def write_mnist(root: Path, seed: int) -> None:
    """A tiny MNIST in the torchvision layout (uncompressed IDX files): 64 training, 32 test images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for stem, n in (("train", 64), ("t10k", 32)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (raw / f"{stem}-images-idx3-ubyte").write_bytes(
            bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">u4").tobytes() + images.tobytes())
        (raw / f"{stem}-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes()
                                                         + labels.tobytes())


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("matrix")
    write_mnist(out / "dataA", 0)
    write_mnist(out / "dataB", 1)  # other files under the same names
    shutil.copytree(out / "dataA", out / "dataC")  # the same files under another root
    (out / "dataL").mkdir()  # a root whose dataset folder links to dataA's
    (out / "dataL" / "MNIST").symlink_to(out / "dataA" / "MNIST")
    for name, others in (("dataG", None), ("dataH", out / "dataB")):  # dataA's files gzipped; dataH: with
        raw = out / name / "MNIST" / "raw"  # dataB's uncompressed beside them, which the loader reads first
        raw.mkdir(parents=True)
        for f in (out / "dataA" / "MNIST" / "raw").iterdir():
            (raw / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes(), mtime=0))
            if others is not None:
                shutil.copy(others / "MNIST" / "raw" / f.name, raw / f.name)
    (out / "a_file").write_text("not a folder\n")
    shadow = out / "confdir" / "method"
    shadow.mkdir(parents=True)
    shutil.copy(REPO / "configs" / "method" / "bc.yaml", shadow / "bc.yaml")
    mine = out / "confdir2" / "method"
    mine.mkdir(parents=True)
    shutil.copy(REPO / "configs" / "method" / "bc.yaml", mine / "mybc.yaml")
    own = out / "confdir3"  # a user's preset that sets no name, and a user's primary config
    (own / "experiment").mkdir(parents=True)
    (own / "experiment" / "mine.yaml").write_text("# @package _global_\nepochs: 2\n")
    (own / "mytrain.yaml").write_text("defaults:\n  - train\n  - _self_\nepochs: 2\n")
    launches: dict[str, dict] = {}
    for kind, pairs in (("same", SAME), ("diff", DIFF)):
        for name, (a, b) in pairs.items():
            launches[f"{kind}_{name}_a"] = {"argv": [*T, *a, f"out_root={out}/{kind}_{name}"]}
            launches[f"{kind}_{name}_b"] = {"argv": [*T, *b, f"out_root={out}/{kind}_{name}"]}
    launches["diff_preset_a"] = {"argv": [*PRESET[0], f"out_root={out}/diff_preset"]}
    launches["diff_preset_b"] = {"argv": [*PRESET[1], f"out_root={out}/diff_preset"]}
    # each shared the plain run's folder (refused there): its defaults were the baseline, and hidden
    for label, extra in (("user_preset", ["+experiment=mine"]), ("config_name", ["--config-name", "mytrain"])):
        launches[f"diff_{label}_a"] = {"argv": [*T, "--config-dir", str(own), *extra, f"out_root={out}/diff_{label}"]}
        launches[f"diff_{label}_b"] = {"argv": [*T, f"out_root={out}/diff_{label}"]}
    launches["same_preset_name_a"] = {"argv": [*PRESET_NAME[0], f"out_root={out}/same_preset_name"]}
    launches["same_preset_name_b"] = {"argv": [*PRESET_NAME[1], f"out_root={out}/same_preset_name"]}
    M = [*T, "dataset=mnist", "dataset.download=false", f"out_root={out}/data"]
    launches["data_a"] = {"argv": M, "env": {"QEXP_DATA": str(out / "dataA")}}
    launches["data_other"] = {"argv": M, "env": {"QEXP_DATA": str(out / "dataB")}}
    # the same files under another root, and dataset.download left at its default (true): whether a
    # missing file would be fetched is not part of the result (the data digest is)
    launches["data_copy"] = {"argv": [a for a in M if a != "dataset.download=false"],
                             "env": {"QEXP_DATA": str(out / "dataC")}}
    # a pair in its own out_root: the first run's data, then other files the second would read
    for first, second, label in (("dataL", "dataB", "linked"), ("dataG", "dataH", "gz")):
        launches[f"data_{label}"] = {"argv": [*M[:-1], f"data_root={out / first}", f"out_root={out}/data_{label}"]}
        launches[f"data_{label}_other"] = {"argv": [*M[:-1], f"data_root={out / second}",
                                                    f"out_root={out}/data_{label}"]}
    launches["data_gz_other_retrain"] = {"argv": [*M[:-1], f"data_root={out / 'dataH'}", "resume=false",
                                                  f"out_root={out}/data_gz"]}
    bad = {
        "stochastic_off": ["method=bc", "method.stochastic=off"],
        "bn_flase": ["model.bn=flase"],
        "width_abc": ["model.width=abc"],
        "plus_foo": ["+foo=1"],
        "name_abs": [f"name={out}/escaped"],
        "name_up": ["name=../escaped"],
        "run_dir": [f"hydra.run.dir={out}/escaped"],
        "sweep_dir": ["--multirun", f"hydra.sweep.dir={out}/escaped", "seed=0,1"],
        "shadow": ["method=bc", "--config-dir", str(out / "confdir")],
        "seed_huge": ["seed=99999999999999999999"],
        "no_data": ["dataset=mnist", f"data_root={out}/nodata/x"],
        # labels, read by nothing else: the folder and the table would name an option that did not run
        "optim_name": ["optim.name=sgd"],
        "method_tag": ["method=sr", "method.tag=bc-1b"],
        "dataset_name": ["dataset.name=mnist"],
    }
    for name, argv in bad.items():
        launches[f"bad_{name}"] = {"argv": [*T, *argv, f"out_root={out}/bad"]}
    launches["huge_lr"] = {"argv": [*T, "lr=1e308", f"out_root={out}/huge_lr"]}
    # Adam's per-tensor path (bc) raised when its step size passed float32; a stacked group too
    launches["huge_lr_bc"] = {"argv": [*T, "lr=1e39", "method=bc", "trainer.seeds_per_process=2",
                                       f"out_root={out}/huge_lr_bc"]}
    launches["bad_out_root_file"] = {"argv": [*T, f"out_root={out}/a_file"]}
    launches["bad_out_root_file_sweep"] = {"argv": ["--multirun", *T, "seed=0,1", f"out_root={out}/a_file"]}
    launches["late_flags"] = {"argv": [*T, "method=mybc", "seed=0,1", f"out_root={out}/late", "--multirun",
                                       "--config-dir", str(out / "confdir2")]}
    # two drivers, one per core; a pair's launches (a, then b in the same out_root) stay in one driver, in order
    groups: dict[str, list[str]] = {}
    for key in launches:
        group = "data" if key.startswith("data_") else (key.rsplit("_", 1)[0] if key[:5] in ("same_", "diff_")
                                                          else key)
        groups.setdefault(group, []).append(key)
    specs = []
    for i in range(2):
        keys = [k for n, g in enumerate(groups.values()) if n % 2 == i for k in g]
        spec = {"out": str(out / f"logs{i}"), "launches": {k: launches[k] for k in keys}}
        (out / f"spec{i}.json").write_text(json.dumps(spec))
        specs.append(out / f"spec{i}.json")
    results = run_drivers(specs, timeout=900)
    assert set(results) >= set(launches), sorted(set(launches) - set(results))
    return out, results


def one_line_error(r: dict) -> str:
    assert r["how"] == ["exit", 2], r
    err = r["stderr"].strip()
    assert "Traceback" not in r["stderr"] + r["stdout"] and len(err.splitlines()) == 1, r
    return err


@pytest.mark.parametrize("name", sorted(SAME) + ["preset_name"])
def test_one_configuration_spelled_twice_is_one_run(matrix, name: str) -> None:
    out, r = matrix
    a, b = r[f"same_{name}_a"], r[f"same_{name}_b"]
    assert a["how"] == b["how"] == ["exit", 0], (a, b)
    assert "not retrained" not in a["stdout"] and "already completed, not retrained" in b["stdout"], b
    assert len(find_runs(out / f"same_{name}")) == 1


@pytest.mark.parametrize("name", sorted(DIFF) + ["preset", "user_preset", "config_name"])
def test_two_configurations_never_share_a_result(matrix, name: str) -> None:
    out, r = matrix
    a, b = r[f"diff_{name}_a"], r[f"diff_{name}_b"]
    assert a["how"] == b["how"] == ["exit", 0], (a, b)
    assert "not retrained" not in a["stdout"] + b["stdout"], b
    runs = find_runs(out / f"diff_{name}")
    assert len(runs) == 2, runs
    fps = {read_metrics(p)["fingerprint"] for p in runs}
    assert len(fps) == 2


def test_folder_names_the_method_option_and_the_bits_used(matrix) -> None:
    out, _ = matrix
    tags = {p.relative_to(out / "diff_bc_li").parts[3] for p in find_runs(out / "diff_bc_li")}
    assert tags == {"bc-1b", "bc_li-1b"}
    tags = {p.relative_to(out / "diff_lsq_bits").parts[3] for p in find_runs(out / "diff_lsq_bits")}
    assert tags == {"lsq-w4a4", "lsq-w4a2"}
    levels = {p.parent.name for p in find_runs(out / "diff_method_seed")}
    assert any("method.seed=0" in lv for lv in levels) and all(p.name == "seed1" for p in
                                                                find_runs(out / "diff_method_seed"))
    (scale,) = find_runs(out / "same_scale")
    assert "method.scale=0.5" in scale.parent.name and "grid_scale" not in scale.parent.name
    (lr,) = find_runs(out / "same_lr")
    assert "lr=0.01" in lr.parent.name.split(",") and "optim.lr" not in lr.parent.name
    (flt,) = find_runs(out / "same_float_scale")
    assert "scale" not in flt.parent.name


def test_the_record_says_where_and_on_how_many_threads_the_run_computed(matrix) -> None:
    """Not part of the identity, but a CPU result's last digits depend on the thread count."""
    import torch

    out, _ = matrix
    for run in find_runs(out / "diff_bc_li"):
        m = read_metrics(run)
        assert (m["device"], m["threads"], m["torch"]) == ("cpu", 1, torch.__version__), run


def test_other_data_under_the_same_names_is_never_reused(matrix) -> None:
    """Another QEXP_DATA with other files: refused in one line naming the data, the first run kept; the
    same files under a third root: the same data, reused."""
    out, r = matrix
    assert r["data_a"]["how"] == ["exit", 0], r["data_a"]
    err = one_line_error(r["data_other"])
    assert "another configuration (data: other files under data_root)" in err and "name=NAME" in err, err
    assert "resume=false" not in err
    assert "already completed, not retrained" in r["data_copy"]["stdout"], r["data_copy"]
    (run,) = find_runs(out / "data")
    m = read_metrics(run)
    assert m["data"]["root"] == str((out / "dataA").resolve()) and len(m["data"]["files"]) == 4


def test_other_data_behind_a_link_or_an_uncompressed_copy_is_never_reused(matrix) -> None:
    """The first run's dataset folder is a link (its files were once named by their absolute path, which
    then matched under any root); the second root holds dataA's ``.gz`` files beside other uncompressed
    ones, which the loader reads first (once only the ``.gz`` names were checked). Both refused in one
    line, ``resume=false`` too, and the first run's folder is left as it was."""
    out, r = matrix
    for label, first in (("linked", "dataL"), ("gz", "dataG")):
        assert r[f"data_{label}"]["how"] == ["exit", 0], r[f"data_{label}"]
        assert "data: other files under data_root" in one_line_error(r[f"data_{label}_other"]), label
        (run,) = find_runs(out / f"data_{label}")
        m = read_metrics(run)  # the first run's record and config, not the refused launch's
        assert m["status"] == "completed" and "fingerprint" in m, label
        assert all(not name.startswith("/") for name in m["data"]["files"]), label
        assert f"data_root: {out / first}\n" in (run / ".hydra" / "config.yaml").read_text(), label
    assert "data: other files under data_root" in one_line_error(r["data_gz_other_retrain"])


def test_eval_uses_the_runs_own_data_and_refuses_other_data(matrix, monkeypatch, capsys) -> None:
    from qexp.errors import QexpError
    from qexp.run import evaluate

    out, _ = matrix
    (run,) = find_runs(out / "data")
    monkeypatch.setenv("QEXP_DATA", str(out / "dataB"))  # the current QEXP_DATA is not the run's
    assert evaluate.main([str(run), "--device", "cpu"]) == 0
    recorded = read_metrics(run)["test_error"]
    assert f"test error {recorded:.2f}%" in capsys.readouterr().out
    with pytest.raises(QexpError, match="trained on other data .* --other-data"):
        evaluate.main([str(run), "--device", "cpu", "--data-root", str(out / "dataB")])
    assert evaluate.main([str(run), "--device", "cpu", "--data-root", str(out / "dataB"), "--other-data"]) == 0
    assert evaluate.main([str(run), "--device", "cpu", "--data-root", str(out / "dataC")]) == 0
    # PTQ on other data is printed, not saved: ptq.json holds results on the run's own data (qexp table
    # showed other data's numbers as the run's, merged with its own)
    capsys.readouterr()
    assert evaluate.main([str(run), "--device", "cpu", "--data-root", str(out / "dataB"), "--other-data",
                          "--ptq-bits", "4", "--calib-batches", "1"]) == 0
    assert "not written to" in capsys.readouterr().out and not (run / "ptq.json").exists()


BAD = ["stochastic_off", "bn_flase", "width_abc", "plus_foo", "name_abs", "name_up", "run_dir", "sweep_dir",
       "shadow", "seed_huge", "out_root_file", "out_root_file_sweep", "optim_name", "method_tag", "dataset_name"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_exit_2_nothing_written(matrix, name: str) -> None:
    out, r = matrix
    err = one_line_error(r[f"bad_{name}"])
    assert err.startswith("error: "), err
    assert not (out / "bad").exists() and not (out / "escaped").exists() and not (out / "nodata").exists()
    assert (out / "a_file").read_text() == "not a folder\n"
    expected = {"stochastic_off": "method.stochastic must be true or false", "bn_flase": "model.bn must be true",
                "width_abc": "model.width must be an integer", "plus_foo": "no setting 'foo'",
                "name_abs": "must be a relative folder name", "name_up": "must be a relative folder name",
                "run_dir": "hydra.run.dir: qexp places every run", "sweep_dir": "hydra.sweep.dir: qexp places",
                "shadow": "method/bc.yaml has the name of the shipped method=bc",
                "seed_huge": "seed must be in", "out_root_file": "is a file, not a folder",
                "out_root_file_sweep": "Not a directory",
                "optim_name": "optim.name labels the optim option (adam)",
                "method_tag": "method.tag labels the method option (sr-1b)",
                "dataset_name": "dataset.name labels the dataset option (synthetic)"}
    assert expected[name] in err, err


def test_a_huge_learning_rate_is_a_result_not_a_traceback(matrix) -> None:
    """lr=1e308 is finite and positive: the run trains (or diverges) and says so, no traceback."""
    out, r = matrix
    for name in ("huge_lr", "huge_lr_bc"):
        assert r[name]["how"] == ["exit", 0] and "Traceback" not in r[name]["stderr"], r[name]
    assert [read_metrics(p)["status"] for p in find_runs(out / "huge_lr_bc")] == ["diverged"] * 2


def test_missing_data_message_leaves_no_folder(matrix) -> None:
    out, r = matrix
    assert r["bad_no_data"]["how"] == ["exit", 2] and "MNIST was not found" in r["bad_no_data"]["stderr"]
    assert not (out / "nodata").exists()


def test_flags_typed_after_the_overrides_work(matrix) -> None:
    """`--multirun` and `--config-dir DIR` typed last, as users type them; DIR's own option is used."""
    out, r = matrix
    assert r["late_flags"]["how"] == ["exit", 0], r["late_flags"]
    runs = find_runs(out / "late")
    assert [p.name for p in runs] == ["seed0", "seed1"] and all("mybc-1b" in str(p) for p in runs)


def test_table_counts_a_copied_run_once_and_names_mixed_keys(matrix, tmp_path: Path, capsys) -> None:
    """`qexp table T T2` over a copy of T: each (configuration, seed) once, with a note; a cell pooling
    runs of two configurations (bc and stochastic bc, a run with no overrides included) is flagged, names
    the key that differs and counts their shared seed once; bc and bc_li are two rows."""
    from qexp.report import results, table

    out, _ = matrix
    shutil.copytree(out / "diff_stochastic", tmp_path / "copy")
    grid = results.aggregate(results.collect([out / "diff_stochastic", tmp_path / "copy"]),
                             ["method", "bits"], ["dataset"], "test_error")
    (cell,) = grid.cells.values()
    assert cell.n == 1  # one seed (of two configurations, four run folders): n counts seeds
    notes = grid.warnings()
    assert any("each counted once" in n and n.startswith("2 run folder(s)") for n in notes), notes
    assert any("mixes runs that differ in method.stochastic" in n for n in notes), notes
    # bc and bc_li record one method name (bc): each is its own row (the option it was launched with), not
    # one cell flagged as mixing method.clip
    li = results.aggregate(results.collect([out / "diff_bc_li"]), ["method", "bits"], ["dataset"], "test_error")
    assert sorted(li.rows) == [("bc", "1"), ("bc_li", "1")] and not any("mixes" in n for n in li.warnings())
    runs = results.collect([out / "diff_stochastic"])
    assert len(results.where(runs, ["method.stochastic=false"])) == 1  # the bool False, as typed
    assert len(results.where(runs, ["method.scale=glorot"])) == 2  # an interpolated key (${grid_scale})
    with pytest.raises(QexpError, match="--digits must be in 0..12"):
        table.main([str(out / "diff_stochastic"), "--digits", "-1"])
    with pytest.raises(QexpError, match="cannot write /proc/qexp-table.md"):
        table.main([str(out / "diff_stochastic"), "--out", "/proc/qexp-table.md"])


def test_plot_to_an_unwritable_place_is_one_line(matrix) -> None:
    from qexp.report import plot

    out, _ = matrix
    with pytest.raises(QexpError, match="cannot write /proc/x.png"):
        plot.main([str(out / "diff_stochastic"), "--out", "/proc/x.png"])
