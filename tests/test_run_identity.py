"""Run identity, bad input and sweep exits through ``qexp train`` (each launch a forked child of one
driver process, tests/kill_driver.py): a folder is a function of the effective config; rejected input is
one line, exit 2, no folder; a sweep with a failed job exits 1 with a summary; files follow the umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qexp.errors import QexpError
from tests.conftest import REPO

T = ["dataset=synthetic", "model=mlp", "model.width=16", "model.depth=1", "model.bn=false",
     "dataset.train_subset=64", "batch_size=32", "eval_batch_size=256", "progress=false",
     "device=cpu"]  # runs compared bit for bit: CPU (device=auto would pick a GPU)
BAD = {"epochs": "epochs=0", "batch_size": "batch_size=0", "eval_batch_size": "eval_batch_size=0",
       "bits": "bits=0", "lr": "lr=-1", "subset": "dataset.train_subset=99999", "bc_bits": "bits=9",
       "lock": "lock=sometimes", "type": "epochs=abc", "key": "methd=sr", "option": "method=nonexist",
       "interpolation": "lr=${foo}", "cosine_ratio": "sched=cosine sched.final_ratio=-1",
       "exp_ratio": "sched=exp sched.final_ratio=0", "width": "model.width=0", "test_samples": "dataset.test_samples=0",
       "method_seed": "method=r method.seed=-4", "hydra_flag": "--bogus", "cfg_choice": "--cfg nonsense",
       "progress": "progress=maybe", "short_betas": "optim=adam optim.betas=[0.9]",
       "momentum": "optim=sgd optim.momentum=1", "milestones": "sched=step sched.milestones=[0,5]",
       "job_log_file": "hydra/job_logging=default",
       "log_handler": "+hydra.job_logging.handlers.f={class:logging.FileHandler,filename:/tmp/qexp-escaped.log}",
       "rerun": "--experimental-rerun x.pickle",
       "bn_batch_of_one": "model.bn=true dataset.train_subset=33",  # a last batch of 1 through BatchNorm1d
       "group_seed": "+dataset.seed=5", "group_epochs": "+sched.epochs=5"}  # passed by the run itself: unread


def runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("metrics.json"))


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("identity")
    (out / "mine" / "runs").mkdir(parents=True)  # the user's own folders, made before the sweeps below
    (out / "mine2").mkdir()
    (out / "mine3" / "runs").mkdir(parents=True)
    (out / "mine3" / "runs" / "multirun.yaml").write_text("my notes\n")  # not Hydra's: Hydra replaced it
    L = {
        "implicit": {"argv": [*T, f"out_root={out}/id"]},
        "explicit": {"argv": [*T, "epochs=1", "optim=adam", "lr=0.001", "sched=constant", f"out_root={out}/id"]},
        "differs": {"argv": [*T, "epochs=2", f"out_root={out}/id"]},
        "grid": {"argv": ["--multirun", *T, "method=float,bc", "bits=1,2", f"out_root={out}/grid"]},
        **{f"bad_{k}": {"argv": [*T, *(["method=bc"] if k == "bc_bits" else []), *v.split(), f"out_root={out}/bad"]}
           for k, v in BAD.items()},
        "failed_sweep": {"argv": ["--multirun", *T, "dataset.train_subset=32,99999", f"out_root={out}/sweep"]},
        "umask": {"argv": [*T, f"out_root={out}/modes"], "umask": 0o027},
        "unwritable_root": {"argv": [*T, "out_root=/sys/qexp-cannot-write-here"]},
        "unwritable_sweep_root": {"argv": ["--multirun", *T, "out_root=/sys/qexp-cannot-write-here"]},
        "interpolated": {"argv": [*T, "seed=${epochs}", f"out_root={out}/interp"]},
        "unread": {"argv": [*T, "method=ste", "abits=4", f"out_root={out}/unread"]},
        "unread_lr": {"argv": [*T, "lr=0.01", "optim.lr=0.02", f"out_root={out}/unread_lr"]},
        "bad_sweep_option": {"argv": ["--multirun", *T, "method=float,nonexist", f"out_root={out}/badsweep"]},
        "bad_search_space": {"argv": ["--multirun", *T, "hydra/sweeper=optuna", "dataset.val_size=16",
                                      'hydra.sweeper.params={lr:"tag(log, interval(0.001, 0.1))"}',
                                      f"out_root={out}/badspace"]},
        "bad_empty_sweep": {"argv": ["--multirun", *T, "seed=range(0,0)", f"out_root={out}/emptysweep"]},
        "all_refused_sweep": {"argv": ["--multirun", *T, "epochs=-1,-2", f"out_root={out}/refusedsweep"]},
        "refused_sweep_in_mine": {"argv": ["--multirun", *T, "epochs=-1,-2", f"out_root={out}/mine"]},
        "bad_key_sweep_in_mine": {"argv": ["--multirun", *T, "methd=1,2", f"out_root={out}/mine2"]},
        "sweep_over_my_file": {"argv": ["--multirun", *T, "seed=0,1", f"out_root={out}/mine3"]},
        "long_name": {"argv": [*T, f"out_root={out}/long/deep", "name=" + "a" * 300]},
        "chg_setup": {"argv": [*T, f"out_root={out}/chg"]},
        "chg": {"argv": [*T, f"out_root={out}/chg"], "set_status": [str(out / "chg"), "interrupted"],
                "set_config": [str(out / "chg"), "model.dropout", 0.25]},
    }
    spec = {"out": str(out / "logs"), "launches": L}
    (out / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "tests.kill_driver", str(out / "spec.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KILL-MATRIX ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads(lines[0][len("KILL-MATRIX "):])


def one_line_error(r: dict, code: int = 2) -> str:
    assert r["how"] == ["exit", code], r
    err = r["stderr"].strip()
    assert "Traceback" not in r["stderr"] + r["stdout"] and len(err.splitlines()) == 1, r
    return err


def test_explicit_default_is_the_implicit_default(launched) -> None:
    """`epochs=1 optim=adam lr=0.001 sched=constant` spell the defaults: one folder, skipped the second
    time; `epochs=2` differs: its own folder, named by the key that differs."""
    out, r = launched
    assert r["implicit"]["how"] == r["explicit"]["how"] == ["exit", 0]
    assert "not retrained" in r["explicit"]["stdout"]
    names = [str(p.relative_to(out / "id" / "runs" / "synthetic" / "mlp" / "float")) for p in runs(out / "id")]
    assert sorted(names) == sorted([
        "batch_size=32,dataset.train_subset=64,eval_batch_size=256,model.bn=false,model.depth=1,model.width=16/seed0",
        "batch_size=32,dataset.train_subset=64,epochs=2,eval_batch_size=256,model.bn=false,model.depth=1,"
        "model.width=16/seed0"])


def test_float_times_bits_grid_trains_float_once(launched) -> None:
    out, r = launched
    g = r["grid"]
    assert g["how"] == ["exit", 0], g
    assert "different configuration" not in g["stdout"] + g["stderr"]
    assert "sweep finished: 4 jobs: 3 completed, 1 skipped, 0 failed, 0 diverged" in g["stdout"]
    tags = sorted(p.parent.parent.name for p in runs(out / "grid"))
    assert tags == ["bc-1b", "bc-2b", "float"]


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_no_folder(launched, key: str) -> None:
    out, r = launched
    err = one_line_error(r[f"bad_{key}"])
    assert err.startswith("error: ")
    assert not (out / "bad").exists()


def test_sweep_with_a_failed_job_exits_1_with_a_summary(launched) -> None:
    out, r = launched
    s = r["failed_sweep"]
    assert s["how"] == ["exit", 1], s
    summary = s["stdout"][s["stdout"].index("sweep finished"):].splitlines()
    assert summary[0] == "sweep finished: 2 jobs: 1 completed, 0 skipped, 1 failed, 0 diverged"
    assert summary[1].startswith("  failed  (no run folder)") and "train_subset must be in 1..512" in summary[1]
    assert len(runs(out / "sweep")) == 1


def test_run_files_follow_the_umask(launched) -> None:
    out, r = launched
    assert r["umask"]["how"] == ["exit", 0]
    (run,) = runs(out / "modes")
    files = [p for p in run.rglob("*") if p.is_file()]
    assert {"metrics.json", "quant.json", "checkpoint.pt", "train.log", "config.yaml"} <= {p.name for p in files}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    for d in [run, *(p for p in run.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d


def test_sweep_with_an_unknown_option_is_one_line_and_leaves_no_folder(launched) -> None:
    """Hydra writes the sweep's multirun.yaml before composing its jobs; a job that cannot be composed
    (an unknown group option) is one line, exit 2, and the stub is removed with its folders."""
    out, r = launched
    err = one_line_error(r["bad_sweep_option"])
    assert "method/nonexist" in err and "sr" in err, err
    assert not (out / "badsweep").exists()


def test_a_search_space_omegaconf_cannot_merge_is_one_line_and_leaves_no_folder(launched) -> None:
    """``hydra.sweeper.params={...}`` on the command line: OmegaConf fails merging a dict into the
    sweeper's null node with a plain AttributeError (once a traceback wall); one line names the key."""
    out, r = launched
    err = one_line_error(r["bad_search_space"])
    assert "hydra.sweeper.params" in err and "lr='tag(log" in err, err
    assert not (out / "badspace").exists()


def test_a_sweep_of_no_value_is_one_line_and_leaves_no_folder(launched) -> None:
    """``seed=range(0,0)`` launched no job, exited 0 and left the sweep's multirun.yaml behind."""
    out, r = launched
    err = one_line_error(r["bad_empty_sweep"])
    assert "seed=range(0,0) sweeps over no value" in err, err
    assert not (out / "emptysweep").exists()


def test_a_sweep_whose_every_job_is_refused_leaves_no_folder(launched) -> None:
    """``epochs=-1,-2``: each job is one line and no run folder; the sweep's multirun.yaml (and the folders
    above it that it made) once stayed behind."""
    out, r = launched
    s = r["all_refused_sweep"]
    assert s["how"] == ["exit", 1] and s["stderr"].count("error: ") == 2, s
    assert "0 completed, 0 skipped, 2 failed" in s["stdout"], s
    assert not (out / "refusedsweep").exists()


def test_a_refused_sweep_keeps_the_users_own_out_root(launched) -> None:
    """The same refused sweeps into folders the user made: Hydra's multirun.yaml goes, the folders stay
    (they were once removed with it, being empty)."""
    out, r = launched
    assert r["refused_sweep_in_mine"]["how"] == ["exit", 1] and r["bad_key_sweep_in_mine"]["how"] == ["exit", 2]
    assert [p.name for p in (out / "mine").iterdir()] == ["runs"] and not any((out / "mine" / "runs").iterdir())
    assert (out / "mine2").is_dir() and not any((out / "mine2").iterdir())


def test_a_sweep_never_replaces_a_multirun_yaml_hydra_did_not_write(launched) -> None:
    out, r = launched
    err = one_line_error(r["sweep_over_my_file"])
    assert "multirun.yaml is not a sweep record Hydra wrote" in err, err
    assert sorted(p.name for p in (out / "mine3" / "runs").iterdir()) == ["multirun.yaml"]
    assert (out / "mine3" / "runs" / "multirun.yaml").read_text() == "my notes\n"


def test_a_run_folder_the_file_system_refuses_leaves_no_folder(launched) -> None:
    """A 300-character name is one line; the levels made below out_root before it failed are removed
    (``<out_root>/long/deep`` once stayed behind, empty)."""
    out, r = launched
    err = one_line_error(r["long_name"])
    assert "cannot create the run folder" in err and "File name too long" in err, err
    assert not (out / "long" / "deep").exists()


def test_an_interpolated_override_is_used_as_typed(launched) -> None:
    """``seed=${epochs}`` is Hydra's interpolation; qexp once resolved the override strings themselves
    against Hydra's own config, and every such command failed."""
    out, r = launched
    assert r["interpolated"]["how"] == ["exit", 0], r["interpolated"]
    (run,) = runs(out / "interp")
    assert run.name == "seed1" and "seed=${epochs}" in (run / ".hydra" / "overrides.yaml").read_text()


def test_a_method_knob_the_method_does_not_read_is_named(launched) -> None:
    """``method=ste abits=4``: STE's activation bits are ``bits``; the run says abits is not read and is
    the run without it (``ste-2b``), not a 4-bit one."""
    out, r = launched
    assert r["unread"]["how"] == ["exit", 0], r["unread"]
    assert "abits=4 not read by method=ste: the run is the same as without it" in r["unread"]["stdout"]
    (run,) = runs(out / "unread")
    assert "ste-2b" in run.parts and not any("abits" in part for part in run.parts), run


def test_optim_lr_under_a_set_lr_is_named(launched) -> None:
    """``optim.lr`` is read only through ``lr``'s default (``${optim.lr}``): where ``lr`` is set (typed here;
    a preset's, WAGE's) the run says optim.lr is not read (it said nothing) and trains at ``lr``."""
    out, r = launched
    assert "optim.lr=0.02 not read: this configuration sets lr=0.01 itself" in r["unread_lr"]["stdout"]
    (run,) = runs(out / "unread_lr")
    assert json.loads((run / "metrics.json").read_text())["lr"] == 0.01


#: method option -> the typed knobs (of bits=3 abits=4 grid_scale=0.5) it does not read
UNREAD = {"float": ["bits=3", "abits=4", "grid_scale=0.5"], "ste": ["abits=4", "grid_scale=0.5"],
          "wage": ["abits=4", "grid_scale=0.5"], "ptq": ["abits=4", "grid_scale=0.5"],
          **{m: ["grid_scale=0.5"] for m in ("lsq", "pact", "dorefa")},
          **{m: ["abits=4"] for m in ("bc", "bc_li", "big_sr", "sr", "r", "learned")}}


def test_every_method_option_has_its_unread_knobs_listed() -> None:
    assert set(UNREAD) == {p.stem for p in (REPO / "configs" / "method").glob("*.yaml")}


@pytest.mark.parametrize("option", sorted(UNREAD))
def test_unread_knobs_are_those_the_method_does_not_use(option: str) -> None:
    from qexp.run.identity import unread_knobs
    from qexp.run.session import build_method, ignored_knobs
    from tests.conftest import compose_train

    cfg = compose_train([f"method={option}"])
    typed = ["bits=3", "+abits=4", "grid_scale=0.5", "lr=0.01", "seed=2", "method.loss=ce"]
    got = unread_knobs(cfg, typed, ignored_knobs(build_method(cfg)))
    assert got == UNREAD[option]


def test_unwritable_sweep_root_is_one_line(launched) -> None:
    _, r = launched
    assert one_line_error(r["unwritable_sweep_root"]).startswith("error: cannot write /sys/qexp-cannot-write-here")


def test_unwritable_out_root_is_one_line(launched) -> None:
    out, r = launched
    assert "cannot create the run folder /sys/qexp-cannot-write-here" in one_line_error(r["unwritable_root"])


def test_unwritable_run_folder_is_refused_before_training() -> None:
    """A run folder that exists but cannot be written (here /sys/kernel: even root cannot create files
    there): one QexpError line from taking the lock, before .hydra/ or anything else is written."""
    from contextlib import ExitStack

    from qexp.errors import QexpError
    from qexp.run import train
    from tests.conftest import compose_train

    cfg = compose_train(T)
    with ExitStack() as stack, pytest.raises(QexpError, match="cannot write into the run folder /sys/kernel"):
        train._open_run(stack, cfg, Path("/sys/kernel"), "", sweeping=False)


def test_changed_configuration_names_each_differing_key(launched) -> None:
    """The folder's unfinished run was made with another value of a key (as when a config file's default
    changed between two launches): the refusal names the key and both values."""
    out, r = launched
    err = one_line_error(r["chg"])
    assert "holds an unfinished run with a different configuration (model.dropout: 0.25 -> 0.0)" in err
    (run,) = runs(out / "chg")  # refused before the folder was written: no failure recorded over that run
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "interrupted" and "error" not in m and "fingerprint" in m, m


def test_hydra_flags_go_first_and_a_bare_info_takes_no_override() -> None:
    """Flags typed after the overrides move first; a bare ``--info`` is Hydra's default (``all``) spelled
    out, so the override after it is not read as its value (it was: "invalid choice: 'seed=1'")."""
    from qexp.run.train import arrange_argv

    assert arrange_argv(["seed=1", "--multirun", "--cfg", "job"]) == ["--multirun", "--cfg", "job", "seed=1"]
    assert arrange_argv(["--info", "seed=1"]) == ["--info", "all", "seed=1"]
    assert arrange_argv(["--info", "defaults", "seed=1"]) == ["--info", "defaults", "seed=1"]
    with pytest.raises(QexpError, match=r"qexp train: unrecognized arguments: --bogus \(qexp train --help\)"):
        arrange_argv(["--bogus", "seed=1"])


@pytest.mark.parametrize(("name", "root", "why"), [("runs", "", "out_root= must name a folder"),
                                                    ("runs", "  ", "out_root= must name a folder"),
                                                    (".cache/x", "out", "holds the runs' caches")])
def test_an_empty_out_root_or_the_cache_as_name_is_refused(name: str, root: str, why: str) -> None:
    """``out_root=`` used to write the run below the current folder; ``name=.cache`` would hide the runs
    from qexp table (the cache is not searched)."""
    from omegaconf import OmegaConf

    from qexp.run import identity

    with pytest.raises(QexpError, match=why):
        identity.check_place(OmegaConf.create({"name": name, "out_root": root}))


def test_init_from_is_identified_by_the_weights_it_loads(tmp_path: Path, monkeypatch) -> None:
    """``init_from`` answers for its checkpoint's content: one run folder spelled absolute, relative or with a
    trailing '/' is one start; the same folder after its run trained further is another start (a finished
    run started from the earlier weights is not reported for it); a folder without a checkpoint is one line."""
    from omegaconf import OmegaConf

    from qexp.run.identity import effective

    src = tmp_path / "runs" / "seed0"
    src.mkdir(parents=True)
    (src / "checkpoint.pt").write_bytes(b"epoch 1 weights")
    monkeypatch.chdir(tmp_path)

    def ident(path: str) -> dict:
        return effective(OmegaConf.create({"init_from": path, "epochs": 1}))

    spellings = [ident(p) for p in (str(src), "runs/seed0", f"{src}/", "./runs/../runs/seed0")]
    assert all(s == spellings[0] for s in spellings) and str(src) not in json.dumps(spellings[0])
    (src / "checkpoint.pt").write_bytes(b"epoch 2 weights")
    assert ident(str(src)) != spellings[0]
    assert effective(OmegaConf.create({"init_from": None}))["init_from"] is None
    with pytest.raises(QexpError, match="no checkpoint.pt there"):
        ident(str(tmp_path / "nope"))


def test_the_number_of_processes_is_part_of_the_identity() -> None:
    """Data parallelism with BatchNorm normalises each process's share (an MLP with BN: 10.15% test error
    on one process, 10.60% on two), so a 2-process run never answers for one process; the other trainer
    knobs (how a run executes) stay out, and one process adds nothing (runs before this keep their place)."""
    from omegaconf import OmegaConf

    from qexp.run.identity import effective

    def ident(**trainer) -> dict:
        return effective(OmegaConf.create({"epochs": 1, "trainer": {"devices": 1, "backend": "auto", **trainer}}))

    assert ident() == ident(backend="gloo") == ident(seeds_per_process=2) == {"epochs": 1}
    assert ident(devices=2) == {"epochs": 1, "processes": 2} != ident(devices=4)


def test_a_metrics_file_that_is_not_an_object_is_no_record(tmp_path: Path) -> None:
    """A hand-edited metrics.json holding ``[1, 2]`` was an AttributeError traceback in ``qexp train``
    (and eval/export); it now reads as no record, as an unparsable one does (the checkpoint then speaks)."""
    from qexp.run import record

    (tmp_path / "metrics.json").write_text("[1, 2]")
    assert record.read(tmp_path) is None
    (tmp_path / "metrics.json").write_text('{"status": "completed"}')
    assert record.read(tmp_path) == {"status": "completed"}


def test_one_folder_name_spelled_two_ways_is_one_name() -> None:
    """``name=x/./y`` then ``name=x//y`` reach one folder; the second was refused as another configuration
    ('name: "x/./y" -> "x//y"')."""
    from omegaconf import OmegaConf

    from qexp.run.identity import effective

    names = [effective(OmegaConf.create({"name": n}))["name"] for n in ("x/./y", "x//y", "x/y/", "x/y")]
    assert names == ["x/y"] * 4 and effective(OmegaConf.create({"name": "runs"}))["name"] == "runs"
