"""``qexp export RUN_DIR [--best]``: the run's quantized network as integer codes + per-layer scales.

Writes a folder (default RUN_DIR/export, or export-best) loadable with plain PyTorch, no qexp:

- ``model.safetensors`` (when the safetensors package is installed) or ``model.pt`` (a plain dict of
  tensors): per quantized layer ``<layer>.weight.codes`` (int8, or uint8 for affine grids), every other
  tensor (biases, BatchNorm, float layers) as float;
- ``quant.json``: per quantized layer its tensor name, bits, ``scale`` and ``offset`` (weight = codes *
  scale + offset, float32), the float architecture (``model``: its class and arguments), the run's
  identity and the test error this export reproduces;
- ``load_export.py``: the standalone loader (qexp/run/export_loader.py).

Scope: methods whose evaluated network is the float architecture with quantized weights (float, bc, sr,
r, big_sr, learned without activation bits, ptq without activations: PTQ exports its deployed k-bit
copy). Methods that quantize activations (ste, lsq, pact, dorefa, wage, learned with activation bits,
ptq with activations) are refused with one line: their forward needs qexp's activation quantizers
(``--format onnx`` exports them all but wage).
``--out DIR`` must be a new folder, an empty one, or a previous export (it holds the ``.qexp-export``
marker and nothing else than an export's files): the export replaces it whole, so the run folder, the
current folder or any folder holding other files is refused. Files and folders follow the umask.
Before anything is written the export is loaded back through the standalone loader into a fresh float
model and evaluated on the test set; it must give the run's checkpointed test error exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.utils import parametrize

from qexp.errors import ArgumentParser, QexpError, path_arg
from qexp.jsonio import atomic_write_bytes, missing_folders, write_json, write_torch
from qexp.quant.format import LayerFormat, parse_manifest, weight_formats
from qexp.run import export_loader, record


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as a plain float model names them: a parametrized weight becomes the value
    it evaluates to (the quantized weight, in the current mode), without the ``parametrizations.`` keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." not in f".{key}":
            out[key] = value.detach().clone()
    for prefix, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor_name in module.parametrizations:
                key = f"{prefix}.{tensor_name}" if prefix else tensor_name
                with torch.no_grad():
                    out[key] = getattr(module, tensor_name).detach().clone()
    return out


def refuse_activation_quantization(method_name: str, manifest: dict[str, Any]) -> None:
    """One line when the manifest's format records quantize any tensor besides weights."""
    acts = sorted({f"{f.tensor}s" for f in parse_manifest(manifest) if f.tensor != "weight" and f.quantized})
    if acts:
        onnx = "" if method_name == "wage" else "; --format onnx exports them"  # WAGE: refused there too
        raise QexpError(f"method={method_name} quantizes {' and '.join(acts)}: qexp export writes float networks "
                        "with quantized weights only (float, bc, sr, r, big_sr, learned and ptq without activation "
                        f"bits){onnx}")


def grid_of(fmt: LayerFormat) -> tuple[float, float] | None:
    """(scale, offset) of a weight's format record: None for a float weight; a format the export cannot
    store as ``codes * scale + offset`` (a level set, per-channel grids) is one clear error."""
    if not fmt.quantized:
        return None
    if not fmt.integer_codes or fmt.per_channel or isinstance(fmt.offset, tuple):
        what = "a level set" if not fmt.integer_codes else "a per-channel grid"
        raise QexpError(f"layer {fmt.name}: its {fmt.kind} {fmt.bits}-bit format is {what}, which qexp export "
                        "cannot store as codes * scale + offset; nothing written")
    return float(fmt.step), float(fmt.offset)  # type: ignore[arg-type]


def to_codes(w: torch.Tensor, scale: float, offset: float) -> torch.Tensor | None:
    """Integer codes reproducing ``w`` exactly through :func:`export_loader.dequantize`, or None."""
    if scale <= 0:
        return None
    k = torch.round((w.float() - offset) / scale)
    lo, hi = int(k.min()), int(k.max())
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            codes = k.to(dtype)
            break
    if not torch.equal(export_loader.dequantize(codes, scale, offset), w.float()):
        return None
    return codes


Exported = tuple[dict[str, torch.Tensor], list[dict[str, Any]], list[str], list[str]]


def build_export(model: nn.Module, manifest: dict[str, Any], float_keys: set[str],
                 eval_float_weights: bool) -> Exported:
    """Tensors to store, quantized-layer rows, float tensor names and notes."""
    state = plain_state_dict(model)
    if set(state) != float_keys:
        extra = sorted(set(state) - float_keys)[:3]
        raise QexpError(f"method={manifest.get('method')} changes the network's modules ({', '.join(extra)} ...): "
                        "qexp export writes float networks with quantized weights only")
    tensors: dict[str, torch.Tensor] = {}
    layers, notes = [], []
    for name, fmt in weight_formats(manifest).items():
        key = f"{name}.weight"
        grid = grid_of(fmt)
        if grid is None:
            continue
        if key not in state:
            raise QexpError(f"quant.json describes a quantized weight {key} that the network does not have; "
                            "nothing written")
        if eval_float_weights:
            notes.append(f"{name}: the run evaluates with its float weights (stochastic BC's test rule), "
                         "stored as float32")
            continue
        codes = to_codes(state[key], *grid)
        if codes is None:
            raise QexpError(f"layer {name}'s evaluated weights are not on the grid quant.json gives it "
                            f"(scale {grid[0]:g}, offset {grid[1]:g}): cannot export it as integer codes")
        tensors[f"{key}.codes"] = codes.contiguous()
        layers.append({"name": name, "tensor": key, "codes": f"{key}.codes", "dtype": str(codes.dtype)[6:],
                       "bits": fmt.bits, "kind": fmt.kind, "scale": grid[0], "offset": grid[1],
                       "shape": list(codes.shape)})
    quantized = {r["tensor"] for r in layers}
    floats = [k for k in state if k not in quantized]
    tensors.update({k: state[k].contiguous() for k in floats})
    return tensors, layers, floats, notes


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> str:
    """model.safetensors (or model.pt without the safetensors package), written atomically with the umask's
    mode (safetensors' own ``save_file`` makes the file 0600)."""
    try:
        from safetensors.torch import save
    except ImportError:
        write_torch(folder / export_loader.TORCH_FILE, tensors)
        return export_loader.TORCH_FILE
    atomic_write_bytes(folder / export_loader.SAFETENSORS, save(tensors))
    return export_loader.SAFETENSORS


#: the marker every export folder holds: ``--out DIR`` replaces DIR only when it holds this marker and
#: nothing but the files an export writes (EXPORT_FILES)
MARKER = ".qexp-export"
MARKER_TEXT = b"written by qexp export: the next export to this folder replaces it\n"
EXPORT_FILES = frozenset({MARKER, export_loader.MANIFEST, export_loader.SAFETENSORS, export_loader.TORCH_FILE,
                          "load_export.py", "model.onnx", "model-folded.onnx"})


def check_target(out: Path, run_dir: Path) -> None:
    """Refuse (one line) an ``--out`` that is not a new folder, an empty one or a previous export: the
    export replaces its folder whole, so any other target would lose files qexp did not write. A path
    that is not valid UTF-8 is refused too: safetensors (and the loader's users) cannot open it."""
    try:
        str(out.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(out).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise QexpError(f"--out {shown} is not a valid UTF-8 path (safetensors and load_export.py open the "
                        "export by its name): choose another name") from None
    where = out.resolve()
    if where == run_dir.resolve() or where in run_dir.resolve().parents:
        raise QexpError(f"--out {out} is the run folder or holds it: the export replaces its folder whole; "
                        "choose a new folder")
    if where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise QexpError(f"--out {out} is the current folder or holds it: the export replaces its folder whole; "
                        "choose a new folder")
    previous_export(out)


def previous_export(out: Path) -> list[Path] | None:
    """The files of the previous export in ``out`` (None when ``out`` does not exist, [] when it is an
    empty folder); anything else is refused."""
    if out.is_symlink():
        raise QexpError(f"--out {out} is a link: choose a new folder")
    if not out.exists():
        return None
    if not out.is_dir():
        raise QexpError(f"--out {out} is a file, not a folder: the export writes a folder; choose a new one")
    if not os.access(out, os.W_OK):  # the swap needs only its parent writable: it replaced the folder
        raise QexpError(f"--out {out} is write-protected: make it writable or choose a new folder")
    try:
        entries = sorted(out.iterdir())
    except OSError as e:
        raise QexpError(f"--out {out}: cannot read it ({e.strerror})") from e
    if not entries:
        return []
    if not (out / MARKER).is_file():
        raise QexpError(f"--out {out} already holds files that qexp export did not write (no {MARKER} marker): "
                        "choose a new folder")
    other = [p.name for p in entries if not _loader_cache(p)
             and (p.name not in EXPORT_FILES or p.is_symlink() or not p.is_file())]
    if other:
        raise QexpError(f"--out {out} holds a previous export plus other files ({', '.join(other[:3])}): "
                        "move them or choose a new folder")
    return entries


def _loader_cache(p: Path) -> bool:
    """Whether ``p`` is the ``__pycache__`` Python wrote when the export's ``load_export.py`` was imported
    from its folder (as the docs show): a folder holding only its compiled ``load_export.*.pyc``, which
    a later export replaces with the rest (it refused the folder as holding a user's file)."""
    if p.name != "__pycache__" or p.is_symlink() or not p.is_dir():
        return False
    try:
        return all(f.is_file() and not f.is_symlink() and re.fullmatch(r"load_export\.[\w.-]+\.pyc", f.name)
                   for f in p.iterdir())
    except OSError:
        return False


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Terminated(BaseException):
    """SIGTERM while an export is being written: unwinds like Ctrl-C's KeyboardInterrupt, so the
    temporary folder is removed; ``qexp export`` then exits 143."""


@contextlib.contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """While inside (main thread only), SIGTERM raises :class:`Terminated` instead of killing at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends (main thread only): a temporary folder and its marker
    come into being together, so an interrupted export never leaves an unmarked folder that no later
    export may reclaim (a signal between ``mkdtemp`` and the marker did). Inside, their handlers only
    note them; after, the handlers before are back and each noted signal is raised again. (Blocking
    the signals would not do: with torch's or any other thread running, the kernel delivers a
    process-directed signal to a thread that does not block it, and Python runs the handler anyway.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(noted):
            signal.raise_signal(s)


def _hold_marker(folder: Path, final: bool = True) -> int:
    """An open, exclusively flock'ed descriptor on ``folder``'s marker: the folder is in use while it is
    held (a killed process's lock goes with it). With ``final`` the marker is created locked under a
    temporary name and then renamed, so no one ever sees a marker that is not yet locked."""
    if not final:  # a previous export's marker, locked before the folder is moved aside
        fd = os.open(folder / MARKER, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd
    tmp = folder / f"{MARKER}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: such folders are never reclaimed
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, MARKER_TEXT)
        os.fsync(fd)
        os.rename(tmp, folder / MARKER)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd


#: what a temporary export folder beside OUT may hold: the export's files, atomic writes' temporaries
#: (qexp.jsonio) and the marker being created
_TEMP_FILE = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp|" + re.escape(f"{MARKER}.tmp"))


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the hidden folders a killed export to ``out`` left beside it (``.OUT.XXXXXXXX`` from
    :func:`tempfile.mkdtemp`, ``.OUT.old.XXXXXXXX`` while a previous export was replaced): only folders
    named so that hold the marker, whose lock no live export holds, and only the files an export writes;
    a folder holding anything else is left as it is. Returns the folders removed."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?:[a-z0-9_]{8}|old\.[0-9a-f]{8})")
    try:
        candidates = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    removed = []
    for folder in candidates:
        try:
            if folder.is_symlink() or not (folder / MARKER).is_file():
                continue
            fd = os.open(folder / MARKER, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: an export is writing there now
            if os.fstat(fd).st_ino != (folder / MARKER).stat().st_ino:
                continue  # renamed away (the export finished) between the open and the lock
            files = list(folder.iterdir())
            if any(p.is_symlink() or not p.is_file() or not (p.name in EXPORT_FILES or _TEMP_FILE.fullmatch(p.name))
                   for p in files):
                continue  # someone else's file in there: not provably ours
            for p in files:
                p.unlink()
            folder.rmdir()
            removed.append(folder)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def export_folder(out: Path) -> Iterator[Path]:
    """A hidden folder beside ``out`` to write into, renamed to ``out`` when the block succeeds (a previous
    export there is replaced, its own files only); on failure, Ctrl-C or SIGTERM nothing is left behind,
    including parent folders this call created, and folders a killed export left are removed first
    (:func:`remove_stale_temporaries`). The folder follows the umask (``mkdtemp`` alone would make it 0700)."""
    created = missing_folders(out.parent)
    tmp: Path | None = None
    held: list[int] = []
    try:
        with _terminate_unwinds():
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(out)
            with _signals_deferred():
                tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
                os.chmod(tmp, 0o777 & ~current_umask())
                held.append(_hold_marker(tmp))
            yield tmp
            old = previous_export(out)  # again: the folder may have changed while the model was evaluated
            if old is None:
                tmp.rename(out)
            elif not old:
                out.rmdir()
                tmp.rename(out)
            else:
                trash = out.parent / f".{out.name}.old.{secrets.token_hex(4)}"
                held.append(_hold_marker(out, final=False))  # locked before it is moved aside
                out.rename(trash)
                tmp.rename(out)
                for path in old:
                    if _loader_cache(trash / path.name):
                        for f in (trash / path.name).iterdir():
                            f.unlink()
                        (trash / path.name).rmdir()
                    else:
                        (trash / path.name).unlink()
                trash.rmdir()
            tmp, created = None, []
    except OSError as e:
        raise QexpError(f"cannot write the export to {out}: {e.strerror or e}; nothing written") from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for fd in held:
            os.close(fd)
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()  # only if still empty: this call made it


def status_notes(run_dir: Path, run: Any) -> list[str]:
    """The note (printed and kept in the export's metadata) for a run that has not completed, else none:
    exported as it stands, but not silently (the help says "a finished run")."""
    status = (record.read(run_dir) or {}).get("status")
    if status == "completed":
        return []
    return [f"the run's status is {status or 'unknown (no readable metrics.json)'}: this is its "
            f"{run.checkpoint_name} of epoch {run.epoch}, not a completed run's"]


FORMATS = ("qexp", "onnx")


def export_run(run_dir: Path, out: Path | None = None, best: bool = False, device: str = "cpu",
               data_root: str | None = None, fmt: str = "qexp", fold_bn: bool = False) -> dict[str, Any]:
    """Write the export folder of ``run_dir`` (atomically: built beside it, then renamed) and return its
    quant.json. Raises QexpError for methods out of scope and when the export would not reproduce."""
    if fmt not in FORMATS:
        raise QexpError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fold_bn and fmt != "onnx":
        raise QexpError("--fold-bn applies to --format onnx only")
    from qexp.run import session
    from qexp.run.evaluate import load_run

    out = Path(out) if out is not None else run_dir / ("export-best" if best else "export")
    check_target(out, run_dir)  # before the (slow) load and evaluation
    run = load_run(run_dir, device, data_root, which="best" if best else "last")
    method = run.built.method
    run.built.model.eval()
    if fmt == "qexp":
        refuse_activation_quantization(method.name, session.manifest(run.built))
    deployed, manifest, copied = session.deployment(run.built)  # PTQ: a k-bit copy of the float network
    if copied and best:
        raise QexpError(f"method={method.name} records the test error of its final deployable copy only; "
                        "export the last checkpoint (without --best)")
    if fmt == "qexp" and copied:  # a deployable copy's input quantizers have a format once calibrated
        refuse_activation_quantization(method.name, manifest)
    c, h, _ = run.built.data.in_shape
    arch = {"in_channels": c, "num_classes": run.built.data.num_classes, "image_size": h}
    conf = {**{k: v for k, v in OmegaConf.to_container(run.cfg.model, resolve=True).items()
               if k not in ("name", "tag")}, **arch}
    fresh = session.instantiate(OmegaConf.create(conf))
    if fmt == "onnx":
        return _export_onnx(run, run_dir, out, deployed, manifest, fresh, conf, fold_bn)
    eval_float = manifest.get("test_weights") == "float"
    tensors, layers, floats, notes = build_export(deployed, manifest, set(fresh.state_dict()), eval_float)
    notes[:0] = status_notes(run_dir, run)
    expected = recorded_error(run)

    with export_folder(out) as tmp:
        stored = save_tensors(tmp, tensors)
        doc: dict[str, Any] = {
            "format": export_loader.FORMAT, "tensors": stored, "method": method.name, "bits": method.bits,
            "checkpoint": run.checkpoint_name, "epoch": run.epoch,
            "model": {"name": run.cfg.model.get("name"), "target": conf["_target_"],
                      "kwargs": {k: v for k, v in conf.items() if k != "_target_"}},
            "input": {"shape": list(run.built.data.in_shape), "normalize": _normalization(run),
                      "dataset": run.cfg.dataset.get("name")},
            "dequantize": "weight = codes * scale + offset (float32)",
            "layers": layers, "float_tensors": floats, "notes": notes,
            "test_error": expected, "run": str(run_dir),
        }
        write_json(tmp / export_loader.MANIFEST, doc)
        shutil.copyfile(export_loader.__file__, tmp / "load_export.py")
        # the proof: the standalone loader into a fresh float model gives the run's test error
        fresh.load_state_dict(export_loader.load_state_dict(str(tmp)))
        got = run.evaluate(fresh.to(run.device))["error"]
        if got != expected:
            raise QexpError(f"the exported model gives test error {got}% but the run recorded {expected}%; "
                            "nothing written")
        doc["export_test_error"] = got
        write_json(tmp / export_loader.MANIFEST, doc)
    return doc


def _export_onnx(run: Any, run_dir: Path, out: Path, deployed: nn.Module, manifest: dict[str, Any],
                 fresh: nn.Module, conf: dict[str, Any], fold_bn: bool) -> dict[str, Any]:
    """model.onnx (and model-folded.onnx with ``fold_bn``), kept only when onnxruntime reproduces the
    run's recorded test error (see :mod:`qexp.run.onnx_export`)."""
    import copy

    from qexp.run import onnx_export as ox

    try:
        import onnx  # noqa: F401

        ox.import_runtime()
    except ImportError as e:
        raise QexpError(f"--format onnx needs the onnx and onnxruntime packages ({e.name} is missing): "
                        "pip install 'qexp[export]'") from e
    method = run.built.method
    plan = ox.read_plan(method, deployed, manifest)
    ox.check_module_swaps(deployed, fresh, plan)
    keys = set(fresh.state_dict())
    full = plain_state_dict(deployed)
    if not keys <= set(full):
        raise QexpError(f"method={method.name} changes the network's modules "
                        f"({', '.join(sorted(keys - set(full))[:3])} ...): not exported")
    state = {k: full[k] for k in keys}
    expected = recorded_error(run)
    exact = plan.weight_only and plan.exact_weights
    meta = {"format": "qexp-onnx/1", "method": method.name, "bits": method.bits,
            "preprocess": {"input": "float32 NCHW, batch dynamic", "shape": list(run.built.data.in_shape),
                           "scaling": "uint8 pixels / 255", "normalize": _normalization(run),
                           "dataset": run.cfg.dataset.get("name")},
            "quantization": ox.describe(plan), "checkpoint": run.checkpoint_name, "epoch": run.epoch,
            "run_test_error": expected}
    models: dict[str, tuple[bytes, dict[str, Any]]] = {}
    unfolded = ox.to_onnx(ox.deploy_model(copy.deepcopy(fresh), state, plan), run.built.data.in_shape,
                          {**meta, "batchnorm_folded": False})
    models[ox.ONNX_FILE] = unfolded, ox.check_error(unfolded, run.built.data.test, expected, exact)
    if not models[ox.ONNX_FILE][1]["ok"]:
        c = models[ox.ONNX_FILE][1]
        raise QexpError(f"onnxruntime gives test error {c['onnxruntime_test_error']:.2f}% but the run recorded "
                        f"{expected:.2f}% ({c['rule']}): nothing written")
    notes = status_notes(run_dir, run)
    fstate, fplan, pairs = ox.fold_batchnorm(fresh, state, plan) if fold_bn else (state, plan, [])
    folded_pairs = [f"{bn} -> {layer}" for layer, bn in pairs]
    if fold_bn and not pairs:
        notes.append("--fold-bn: no BatchNorm follows a conv/linear layer in this model; nothing to fold")
    elif fold_bn:
        fmeta = {**meta, "quantization": ox.describe(fplan), "batchnorm_folded": folded_pairs,
                 "folding": "BatchNorm folded into the preceding layer, then quantized: codes unchanged, "
                            "per-output-channel scale = scale * gamma / sqrt(var + eps)"}
        fbytes = ox.to_onnx(ox.deploy_model(copy.deepcopy(fresh), fstate, fplan, pairs), run.built.data.in_shape,
                            fmeta)
        models[ox.FOLDED_FILE] = fbytes, ox.check_error(fbytes, run.built.data.test, expected, False)
    doc: dict[str, Any] = {
        "format": "qexp-onnx/1", "method": method.name, "bits": method.bits, "checkpoint": run.checkpoint_name,
        "epoch": run.epoch, "model": {"name": run.cfg.model.get("name"), "target": conf["_target_"],
                                      "kwargs": {k: v for k, v in conf.items() if k != "_target_"}},
        "input": meta["preprocess"], "quantization": meta["quantization"], "opset": ox.OPSET,
        "batchnorm_folded": folded_pairs, "test_error": expected, "run": str(run_dir),
        "onnx": {name: {**check, "bytes": len(data)} for name, (data, check) in models.items()},
        "tensors": ox.ONNX_FILE, "layers": meta["quantization"]["weights"],
        "export_test_error": models[ox.ONNX_FILE][1]["onnxruntime_test_error"], "notes": notes,
    }
    if plan.float_weights:
        doc["notes"].append(f"{len(plan.float_weights)} layer(s) evaluate with float weights (stochastic BC's "
                            "test rule), stored as float32")
    inexact = [w["name"] for w in doc["layers"] if not w["exact"]]
    if inexact:
        doc["notes"].append(f"weights of {', '.join(inexact)} decode to within float rounding of the run's "
                            "(not bit for bit)")
    with export_folder(out) as tmp:
        for name, (data, _) in models.items():
            atomic_write_bytes(tmp / name, data)
        write_json(tmp / export_loader.MANIFEST, doc)
    return doc


def recorded_error(run: Any) -> float:
    """The test error the export must reproduce (metrics.json's, else the checkpoint's own history); none
    recorded is one line: an export that cannot be proved is not written."""
    expected = run.recorded_test_error()
    if not isinstance(expected, (int, float)) or isinstance(expected, bool):
        raise QexpError(f"{run.run_dir}: no test error is recorded for {run.checkpoint_name} (epoch {run.epoch}) in "
                        "metrics.json or the checkpoint, so the export cannot be checked; nothing written")
    return float(expected)


def _normalization(run: Any) -> Any:
    """How inputs were normalised (uint8 images: (x/255 - mean) / std per channel), when known."""
    norm = getattr(run.built.data.test, "normalize", None)
    if norm is None or not hasattr(norm, "mean"):
        return None
    return {"mean": list(norm.mean), "std": list(norm.std)}


def main(argv: list[str]) -> int:
    ap = ArgumentParser(prog="qexp export", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=path_arg, help="a finished run folder (holds .hydra/ and its checkpoints)")
    ap.add_argument("--best", action="store_true",
                    help="export best.pt (the epoch with the lowest validation error) instead of the last epoch")
    ap.add_argument("--out", type=path_arg, default=None, help="export folder (default RUN_DIR/export[-best])")
    ap.add_argument("--format", dest="fmt", choices=FORMATS, default="qexp",
                    help="qexp (default): integer codes + quant.json + a plain-PyTorch loader; onnx: model.onnx "
                         "with QuantizeLinear/DequantizeLinear, checked by onnxruntime on the test set "
                         "(needs pip install 'qexp[export]')")
    ap.add_argument("--fold-bn", action="store_true",
                    help="with --format onnx: also write model-folded.onnx, BatchNorm folded into the preceding "
                         "conv/linear layer before quantization, and report its test error beside the unfolded")
    ap.add_argument("--device", default="cpu", help="device of the check evaluation (default cpu)")
    ap.add_argument("--data-root", default=None, help="override the data root stored in the run's config")
    args = ap.parse_args(argv)
    try:
        doc = export_run(args.run_dir, args.out, args.best, args.device, args.data_root, args.fmt, args.fold_bn)
    except Terminated:
        print("error: terminated (SIGTERM); nothing written", file=sys.stderr)
        return 143
    out = args.out or args.run_dir / ("export-best" if args.best else "export")
    if args.fmt == "onnx":
        for name, c in doc["onnx"].items():
            ran = f"{c['run_test_error']:.2f}%" if c["run_test_error"] is not None else "not recorded"
            rule = (f"required: {c['rule']}" if name == "model.onnx"
                    else "BatchNorm folded, then quantized: reported, not required")
            levels = "; ".join(f"{lv} graph optimisations {c[lv]['test_error']:.2f}% ({c[lv]['wrong']}/{c['total']} "
                               "wrong)" for lv in ("all", "basic") if lv in c)
            print(f"wrote {out / name} ({c['bytes']} bytes): onnxruntime CPU test error {levels}; the run {ran}; "
                  f"{rule}")
        for n in doc["notes"]:
            print(f"note: {n}")
        return 0
    print(f"wrote {out} ({doc['tensors']}, {len(doc['layers'])} quantized layer(s), {doc['checkpoint']} of "
          f"epoch {doc['epoch']}); loaded back with the standalone load_export.py into a plain "
          f"{doc['model']['target'].rsplit('.', 1)[-1]} it gives test error {doc['export_test_error']:.2f}%")
    for n in doc["notes"]:
        print(f"note: {n}")
    return 0
