"""``qexp export``: integer codes + per-layer scales + quant.json, loaded back with plain PyTorch in a
process that never imports qexp, reproducing the run's recorded test error exactly."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import find_runs, read_metrics, run_qexp

ENV = {"OMP_NUM_THREADS": "1"}

# Runs in a fresh interpreter with qexp off the path: LeNet-5 rebuilt in plain torch, the export's own
# load_export.py, MNIST's test files read and normalised by hand as quant.json describes.
STANDALONE = r'''
import gzip, json, os, sys
import torch
from torch import nn

export, raw = sys.argv[1], sys.argv[2]
sys.path.insert(0, export)
from load_export import load_state_dict, read_manifest

def idx(name):
    path = os.path.join(raw, name)
    data = gzip.open(path + ".gz").read() if os.path.exists(path + ".gz") else open(path, "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)

manifest = read_manifest(export)
kw = manifest["model"]["kwargs"]
assert manifest["model"]["name"] == "lenet5" and not kw["bn"]
side = ((kw["image_size"] - 4) // 2 - 4) // 2
model = nn.Module()
model.features = nn.Sequential(nn.Conv2d(kw["in_channels"], 32, 5), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2))
model.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 512), nn.ReLU(),
                                 nn.Linear(512, kw["num_classes"]))
model.forward = lambda x: model.classifier(model.features(x))
model.load_state_dict(load_state_dict(export))
model.eval()

x, y = idx("t10k-images-idx3-ubyte").unsqueeze(1), idx("t10k-labels-idx1-ubyte").long()
norm = manifest["input"]["normalize"]
mean = torch.tensor(norm["mean"]).view(1, -1, 1, 1)
std = torch.tensor(norm["std"]).view(1, -1, 1, 1)
wrong = 0
with torch.no_grad():
    for i in range(0, len(y), 1000):
        xb = x[i:i + 1000].float().div_(255.0).sub_(mean).div_(std)
        wrong += int((model(xb).argmax(1) != y[i:i + 1000]).sum())
assert not any(m == "qexp" or m.startswith("qexp.") for m in sys.modules), "qexp was imported"
codes = {l["codes"]: l["dtype"] for l in manifest["layers"]}
print(json.dumps({"error": 100.0 * wrong / len(y), "codes": codes}))
'''


@pytest.mark.slow
def test_export_reloads_in_plain_pytorch_and_reproduces_the_test_error(tmp_path: Path, data_root: Path) -> None:
    run_qexp(["train", "method=bc", "dataset.train_subset=3000", "dataset.val_size=1000", "epochs=2",
              "progress=false", "device=cpu", f"out_root={tmp_path}"], env=ENV)
    (run,) = find_runs(tmp_path)
    rec = read_metrics(run)
    expected = rec["test_error_at_best"]
    out = run_qexp(["export", str(run), "--best"], env=ENV).stdout
    folder = run / "export-best"
    assert f"gives test error {expected:.2f}%" in out
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    proc = subprocess.run([sys.executable, "-I", str(script), str(folder), str(data_root / "MNIST" / "raw")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["error"] == expected  # exactly the recorded number, not approximately
    assert set(got["codes"].values()) == {"int8"} and len(got["codes"]) == 4  # 1-bit codes, 4 layers
    manifest = json.loads((folder / "quant.json").read_text())
    assert (manifest["checkpoint"], manifest["epoch"]) == ("best.pt", rec["best_epoch"])
    # the last checkpoint: export_run itself reloads through load_export.py and must match exactly
    from qexp.run.export import export_run

    doc = export_run(run)
    assert (doc["checkpoint"], doc["epoch"]) == ("checkpoint.pt", rec["epochs_done"])
    assert doc["export_test_error"] == doc["test_error"] == rec["test_error"]


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch of sr (1 bit), ptq (8 bits), float and ste on synthetic data: one sweep, one process."""
    root = tmp_path_factory.mktemp("export")
    run_qexp(["train", "--multirun", "dataset=synthetic", "method=sr,ptq,float,ste", "epochs=1", "progress=false",
              "device=cpu", f"out_root={root}"], env=ENV)
    return {read_metrics(r)["method"]: r for r in find_runs(root)}


@pytest.mark.parametrize("method,bits,dtype", [("sr", 1, "int8"), ("ptq", 8, "uint8"), ("float", 32, None)])
def test_export_codes_are_integers_on_the_layer_grid(synthetic_runs: dict[str, Path], method: str, bits: int,
                                                     dtype: str | None) -> None:
    from qexp.run import export_loader
    from qexp.run.export import export_run

    run = synthetic_runs[method]
    doc = export_run(run)
    assert doc["export_test_error"] == read_metrics(run)["test_error"]  # PTQ: its quantized copy's error
    folder = run / "export"
    tensors = export_loader.read_tensors(str(folder))
    if dtype is None:  # a float network: every tensor stored as is
        assert doc["layers"] == [] and all(t.is_floating_point() for t in tensors.values())
        return
    assert len(doc["layers"]) == 4
    for layer in doc["layers"]:
        codes = tensors[layer["codes"]]
        assert str(codes.dtype) == f"torch.{dtype}" == f"torch.{layer['dtype']}"
        levels = codes.unique().tolist()
        if method == "ptq":  # affine: codes 0..2^k-1, weight = lo + code * scale
            assert 0 <= levels[0] and levels[-1] <= 2**bits - 1 and layer["offset"] != 0
        else:  # 1-bit symmetric: codes -1/+1, weight = code * H
            assert set(levels) <= {-1, 1} and layer["offset"] == 0
        assert layer["bits"] == bits and layer["tensor"] not in doc["float_tensors"]


def test_export_refuses_activation_quantization_with_one_line(synthetic_runs: dict[str, Path],
                                                              capsys: pytest.CaptureFixture) -> None:
    from qexp.cli import main as qexp

    run = synthetic_runs["ste"]
    assert qexp(["export", str(run)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: method=ste quantizes activations: qexp export writes float "
        "networks with quantized weights only (float, bc, sr, r, big_sr, learned and ptq without activation bits); "
        "--format onnx exports them"]
    assert not (run / "export").exists() and not list(run.glob(".export*"))


def test_export_writes_safetensors_and_falls_back_to_a_torch_file(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With the safetensors package the tensors go to model.safetensors (read back by safetensors itself);
    without it, to model.pt; both load through the standalone loader to the same state_dict."""
    from safetensors.torch import load_file

    from qexp.run import export_loader
    from qexp.run.export import export_run

    run = synthetic_runs["sr"]
    doc = export_run(run, tmp_path / "st")
    assert doc["tensors"] == "model.safetensors" and not (tmp_path / "st" / "model.pt").exists()
    stored = load_file(str(tmp_path / "st" / "model.safetensors"))
    assert {layer["codes"] for layer in doc["layers"]} <= set(stored)
    assert all(stored[layer["codes"]].dtype == torch.int8 for layer in doc["layers"])
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # "not installed"
    doc_pt = export_run(run, tmp_path / "pt")
    assert doc_pt["tensors"] == "model.pt" and not (tmp_path / "pt" / "model.safetensors").exists()
    monkeypatch.undo()
    a, b = export_loader.load_state_dict(str(tmp_path / "st")), export_loader.load_state_dict(str(tmp_path / "pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert doc_pt["export_test_error"] == doc["export_test_error"] == read_metrics(run)["test_error"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(args: list[str], capsys: pytest.CaptureFixture) -> str:
    from qexp.cli import main as qexp

    assert qexp(["export", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_export_never_deletes_what_it_did_not_write(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """--out is the run folder, the current folder, a folder of the user's files, a file, or a previous
    export plus a user's file: one line, exit 2, every byte still there, no hidden folder left beside it."""
    from qexp.cli import main as qexp

    run = synthetic_runs["sr"]
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    (work / "notes" / "paper.tex").write_text("mine")
    (work / "data.csv").write_text("1,2\n")
    monkeypatch.chdir(work)
    before_run, before_work = _tree(run), _tree(work)
    assert "run folder" in _refused([str(run), "--out", str(run)], capsys)
    assert "current folder" in _refused([str(run), "--out", "."], capsys)
    assert "current folder" in _refused([str(run), "--out", str(tmp_path)], capsys)  # holds the current one
    assert "did not write" in _refused([str(run), "--out", "notes"], capsys)
    assert "is a file" in _refused([str(run), "--out", "data.csv"], capsys)
    assert "is a file" in _refused([str(run), "--out", str(run / "checkpoint.pt")], capsys)
    assert _tree(run) == before_run and _tree(work) == before_work
    # a previous export is replaced whole; once the user has added a file to it, it is refused
    assert qexp(["export", str(run), "--out", "exp"]) == 0
    first = _tree(work / "exp")
    assert ".qexp-export" in first and "quant.json" in first
    assert qexp(["export", str(run), "--out", "exp"]) == 0
    assert _tree(work / "exp").keys() == first.keys()
    # importing load_export.py from the folder, as the docs show, makes Python write __pycache__/ there:
    # that is the export's, replaced with it (it refused every later export); anything else in it is not
    subprocess.run([sys.executable, "-c", "import load_export"], cwd=work / "exp", check=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
    assert any((work / "exp" / "__pycache__").glob("load_export.*.pyc"))
    assert qexp(["export", str(run), "--out", "exp"]) == 0
    assert _tree(work / "exp").keys() == first.keys() and not (work / "exp" / "__pycache__").exists()
    (work / "exp" / "__pycache__").mkdir()
    (work / "exp" / "__pycache__" / "mine.pyc").write_text("x")
    assert "plus other files (__pycache__)" in _refused([str(run), "--out", "exp"], capsys)
    (work / "exp" / "__pycache__" / "mine.pyc").unlink()
    (work / "exp" / "__pycache__").rmdir()
    (work / "exp" / "README.txt").write_text("my notes on this export")
    kept = _tree(work / "exp")
    assert "plus other files (README.txt)" in _refused([str(run), "--out", "exp"], capsys)
    assert _tree(work / "exp") == kept
    (work / "empty").mkdir()  # an empty folder loses nothing
    assert qexp(["export", str(run), "--out", "empty"]) == 0 and (work / "empty" / "quant.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["data.csv", "empty", "exp", "notes"]
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".export")) == []


@pytest.mark.parametrize("target", ["chmod", "proc"])
def test_export_to_an_unwritable_folder_is_one_line_and_writes_nothing(synthetic_runs: dict[str, Path],
                                                                       tmp_path: Path, target: str,
                                                                       capsys: pytest.CaptureFixture) -> None:
    if target == "chmod" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders (the /proc case covers root)")
    ro = tmp_path / "ro" if target == "chmod" else Path("/proc")
    out = ro / "deep" / "exp" if target == "chmod" else ro / "qexp-export"
    before = None
    if target == "chmod":
        ro.mkdir()
        before = []
        ro.chmod(0o555)
    try:
        line = _refused([str(synthetic_runs["sr"]), "--out", str(out)], capsys)
        assert line.startswith(f"error: cannot write the export to {out}: ") and line.endswith("nothing written")
        assert not out.exists() and not list(ro.glob(".qexp-export*")) and not list(ro.glob(".exp*"))
        if before is not None:
            assert sorted(ro.iterdir()) == before
    finally:
        if target == "chmod":
            ro.chmod(0o755)


def test_a_write_protected_empty_folder_is_refused_not_replaced(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The swap needs only the parent writable: an empty read-only --out was deleted and made again with
    the umask's mode. Refused like a write-protected table file (root: as for everyone else)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", lambda p, mode: not mode & os.W_OK or bool(os.stat(p).st_mode & 0o200))
    try:
        assert "is write-protected" in _refused([str(synthetic_runs["sr"]), "--out", str(ro)], capsys)
        assert ro.stat().st_mode & 0o777 == 0o555 and not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_export_folder_and_files_follow_the_umask(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                  umask: int) -> None:
    from qexp.run.export import export_run

    old = os.umask(umask)
    try:
        export_run(synthetic_runs["ptq"], tmp_path / "new" / "exp")
    finally:
        os.umask(old)
    for path in [tmp_path / "new", tmp_path / "new" / "exp"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask, path
    files = list((tmp_path / "new" / "exp").iterdir())
    assert len(files) == 4  # marker, quant.json, model.safetensors, load_export.py
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# A child that stops inside an export at the worst moment: model.safetensors written, the proof not run.
STOPPED = r'''
import os, signal, sys, time
from pathlib import Path
from qexp.cli import main
from qexp.run import export

save = export.save_tensors
def stop_after_save(folder, tensors):
    name = save(folder, tensors)
    Path(sys.argv[3]).write_text(str(folder))
    if sys.argv[4] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
    return name
export.save_tensors = stop_after_save
sys.exit(main(["export", sys.argv[1], "--out", sys.argv[2]]))
'''


def _stopped_export(run: Path, out: Path, ready: Path, how: str) -> subprocess.Popen:
    """A ``qexp export`` child paused (or SIGKILLed) once its temporary folder holds the model."""
    script = ready.parent / "stopped.py"
    script.write_text(STOPPED)
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(out), str(ready), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).parents[1])})
    for _ in range(600):
        if ready.exists() or proc.poll() is not None:
            break
        import time

        time.sleep(0.1)
    assert ready.exists(), proc.communicate()
    return proc


def test_sigterm_cleans_up_and_a_later_export_removes_what_a_killed_one_left(
        synthetic_runs: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM unwinds like Ctrl-C: exit 143, one line, no hidden folder. A SIGKILLed export's hidden
    folder (model.safetensors inside) is removed by the next export to the same place; a folder of the
    same pattern without the marker, holding a user's file, or in use by a live export is kept."""
    import signal

    run = synthetic_runs["sr"]
    out = tmp_path / "exp"
    proc = _stopped_export(run, out, tmp_path / "ready-term", "term")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines() == ["error: terminated (SIGTERM); nothing written"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # SIGKILL: nothing can clean up at once ...
    proc = _stopped_export(run, out, tmp_path / "ready-kill", "kill")
    proc.communicate(timeout=60)
    stale = Path((tmp_path / "ready-kill").read_text())
    assert (stale / "model.safetensors").is_file() and (stale / ".qexp-export").is_file()
    # ... a live export's folder, one without the marker and one holding a user's file are not qexp's to remove
    live = _stopped_export(run, out, tmp_path / "ready-live", "sleep")
    in_use = Path((tmp_path / "ready-live").read_text())
    foreign = tmp_path / ".exp.abcd1234"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("mine")
    mixed = tmp_path / ".exp.old.0123abcd"
    mixed.mkdir()
    (mixed / ".qexp-export").write_text("x")
    (mixed / "notes.txt").write_text("mine")
    try:
        from qexp.cli import main as qexp

        assert qexp(["export", str(run), "--out", str(out)]) == 0
        assert not stale.exists() and in_use.is_dir() and (in_use / "model.safetensors").is_file()
        assert (foreign / "model.safetensors").read_text() == "mine" and (mixed / "notes.txt").read_text() == "mine"
    finally:
        live.kill()
        live.communicate()
    assert qexp(["export", str(run), "--out", str(out)]) == 0  # its export was killed: now it is stale
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [foreign.name, mixed.name]


def test_a_signal_while_the_temporary_folder_is_made_leaves_nothing(
        synthetic_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM right after ``mkdtemp`` (before the marker existed) left an empty unmarked hidden folder
    that no later export may remove: the signal now waits until the folder holds its marker."""
    import signal
    import tempfile

    from qexp.run import export

    real = tempfile.mkdtemp

    def mkdtemp_then_signal(*args: object, **kwargs: object) -> str:
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs its handler at the next bytecode
        return made

    monkeypatch.setattr(export.tempfile, "mkdtemp", mkdtemp_then_signal)
    import threading

    done = threading.Event()  # another thread, as torch's: a blocked signal would be delivered to it
    other = threading.Thread(target=done.wait)
    other.start()
    try:
        with pytest.raises(export.Terminated):
            export.export_run(synthetic_runs["sr"], tmp_path / "out" / "exp")
    finally:
        done.set()
        other.join()
    assert not (tmp_path / "out").exists()


def test_export_to_a_non_utf8_path_is_one_line(synthetic_runs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    """A target whose name is not UTF-8 (bytes 0xff) was a 26-line SafetensorError traceback."""
    out = Path(os.fsdecode(bytes(tmp_path / "nu") + b"/y\xff"))
    line = _refused([str(synthetic_runs["sr"]), "--out", str(out)], capsys)
    assert "is not a valid UTF-8 path" in line and "y\\xff" in line
    assert not (tmp_path / "nu").exists()


def _copy_run(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, ignore=shutil.ignore_patterns("export*", ".export*"))
    return to


def _edit_checkpoint(run: Path, edit) -> None:  # type: ignore[no-untyped-def]
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    edit(state)
    torch.save(state, run / "checkpoint.pt")


def test_without_metrics_json_the_checks_read_the_checkpoint(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """metrics.json missing (or not an object): export still proves itself against the test error the
    checkpoint's own history recorded, and refuses when there is none; eval's other-data check uses the
    digest in the checkpoint's fingerprint (both were silently skipped)."""
    from qexp.errors import QexpError
    from qexp.run import evaluate
    from qexp.run.export import export_run

    run = _copy_run(synthetic_runs["sr"], tmp_path / "run")
    (run / "metrics.json").unlink()
    doc = export_run(run, tmp_path / "ok")
    assert doc["export_test_error"] == doc["test_error"] == read_metrics(synthetic_runs["sr"])["test_error"]
    (run / "metrics.json").write_text("[1, 2]")  # valid JSON, not a record: the same

    def history(rows):  # type: ignore[no-untyped-def]
        return lambda s: s["progress"].__setitem__("history", rows)

    _edit_checkpoint(run, history([{"epoch": 1, "test_error": 0.125}]))
    assert "but the run recorded 0.125%" in _refused([str(run), "--out", str(tmp_path / "bad")], capsys)
    _edit_checkpoint(run, history([]))
    assert "no test error is recorded" in _refused([str(run), "--out", str(tmp_path / "bad")], capsys)
    assert not (tmp_path / "bad").exists()

    def digest(s):  # type: ignore[no-untyped-def]
        s["config"] = json.dumps({**json.loads(s["config"]), "data.digest": "0" * 40})

    _edit_checkpoint(run, digest)
    other = tmp_path / "other.bin"
    other.write_bytes(b"other images")
    with pytest.raises(QexpError, match="trained on other data .* --other-data"):
        evaluate.check_same_data(run, str(tmp_path), (other,), False)
    evaluate.check_same_data(run, str(tmp_path), (other,), True)


def test_a_damaged_config_is_one_line_naming_it(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """.hydra/config.yaml that YAML cannot parse (or that is no mapping) was a 48-line ParserError."""
    from qexp.cli import main as qexp

    run = _copy_run(synthetic_runs["sr"], tmp_path / "run")
    for text in (": : [", "[1, 2]\n"):
        (run / ".hydra" / "config.yaml").write_text(text)
        assert "config.yaml" in _refused([str(run), "--out", str(tmp_path / "exp")], capsys)
        assert qexp(["eval", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "config.yaml" in err[0] and "damaged" in err[0], err


def test_an_unfinished_run_is_exported_with_a_note(synthetic_runs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """An interrupted (or failed, running) run's latest checkpoint is exported as it stands, but the command
    says so (it did so silently, though its help says 'a finished run folder'); a completed run has no note."""
    from qexp.run import export

    run = _copy_run(synthetic_runs["float"], tmp_path / "run")
    assert export.main([str(run), "--out", str(tmp_path / "done")]) == 0
    assert "status" not in capsys.readouterr().out
    rec = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**rec, "status": "interrupted"}))
    assert export.main([str(run), "--out", str(tmp_path / "part")]) == 0
    assert "note: the run's status is interrupted: this is its checkpoint.pt of epoch 1" in capsys.readouterr().out
    notes = json.loads((tmp_path / "part" / "quant.json").read_text())["notes"]  # kept with the export too
    assert notes[0].startswith("the run's status is interrupted")
    assert not any("status" in n for n in json.loads((tmp_path / "done" / "quant.json").read_text())["notes"])
