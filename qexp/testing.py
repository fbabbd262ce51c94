"""The method contract as one call: ``check_method`` checks any method, shipped or kept outside qexp.

It trains the method the way ``qexp train`` does (the same entry point, run folder, checkpoint and resume
code, in this process) on LeNet-5 and a few hundred images (real MNIST when the data root holds it, else
the synthetic dataset), and checks, in this order, each part naming itself when it fails:

- ``train``: the run completes, its losses are finite and the weights moved;
- ``resume``: a run stopped after ``stop_at`` steps (the SIGTERM path: checkpoint, status interrupted) and
  launched again ends with the same metrics.json numbers and a bit-identical checkpoint (model,
  optimizer, schedule, method state, random state) as an uninterrupted run;
- ``manifest``: quant.json has the documented envelope and every row is a valid format record
  (:mod:`qexp.quant.format`); ``manifest()`` changes neither the model nor the method;
- ``state_dict``: the method's state survives a save/load round trip into a freshly built run (same
  state, same outputs);
- ``export``: ``qexp export`` of the run succeeds, storing every quantized weight the manifest lists, or
  refuses the method with one clear line (a :class:`~qexp.errors.QexpError`).

Typical use, in a method's own tests::

    from qexp.testing import check_method
    check_method("configs/method/ternary.yaml")    # a YAML in a --config-dir's method/ folder
    check_method("bc", overrides=["bits=2"])        # a shipped option
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qexp.errors import QexpError
from qexp.methods.base import Method, method_option, registered_methods

#: metrics.json keys that measure time, not results
TIMING_KEYS = ("wall_s", "images_per_s", "train_time", "compile_s")
#: checkpoint ``progress`` keys that measure time
PROGRESS_TIMING = ("train_time", "wall_s", "compile_s")
#: test images of the check's runs (evaluated after every epoch, and by the export)
TEST_IMAGES = 256
#: the envelope every quant.json has (docs/extending.md, "The manifest")
ENVELOPE = ("method", "bits", "layers", "weight_bytes", "float32_bytes")


class ContractError(AssertionError):
    """A method broke part of the contract; the message starts with the part (``resume: ...``)."""


@dataclass
class Report:
    """What :func:`check_method` ran and found."""

    option: str  # the method option (its YAML's file stem)
    method: str  # the method's name (method.name)
    bits: int
    dataset: str  # mnist (a real subset) or synthetic
    steps: int  # optimizer steps of the straight run
    stop_at: int  # the step after which the interrupted run stopped
    quantized_layers: int  # manifest rows that are quantized (not kind float / 32 bits)
    export: str  # "N tensors as integer codes" or "refused: <the method's one line>"
    seconds: float = 0.0
    passed: list[str] = field(default_factory=list)


def check_method(method: str | Path | type[Method], *, options: dict[str, Any] | None = None,
                 overrides: tuple[str, ...] | list[str] = (), data_root: str | Path | None = None,
                 steps_per_epoch: int = 3, epochs: int = 2, stop_at: int | None = None, batch_size: int = 16,
                 workdir: str | Path | None = None, device: str = "cpu") -> Report:
    """Check the method contract for ``method`` and return a :class:`Report`; raise
    :class:`ContractError` (an ``AssertionError``) naming the failing part.

    ``method`` is a shipped option (``"bc"``), a method YAML (``DIR/method/NAME.yaml``: ``DIR`` is used
    as ``--config-dir``), a config folder holding exactly one ``method/*.yaml``, or a method class
    (shipped, or importable by its module path: a YAML is then written for it, ``options`` as its keys).
    ``options`` become ``method.KEY=VALUE`` overrides, ``overrides`` are passed on as typed (``bits=3``).
    ``data_root`` (default ``$QEXP_DATA``): real MNIST when it holds ``MNIST/raw``, else synthetic images.
    The runs are written under ``workdir`` (default: a temporary folder, removed afterwards). Runs on
    ``device`` (default the CPU; on a GPU exact resume also needs deterministic kernels:
    ``torch.use_deterministic_algorithms(True)``), in the main thread (the interruption is the SIGTERM
    path).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("check_method runs in the main thread: it stops a run as SIGTERM does")
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="qexp-check-")))
        work.mkdir(parents=True, exist_ok=True)
        config_dir, option = _resolve(method, options, work)
        root = Path(data_root if data_root is not None else os.environ.get("QEXP_DATA", "./data")).resolve()
        real = (root / "MNIST" / "raw").is_dir()
        base = [f"method={option}", *(f"method.{k}={_value(v)}" for k, v in (options or {}).items()
                                       if not isinstance(method, type)), *overrides]
        cfg = _compose(config_dir, base)
        scale = _instantiate(cfg.method).batch_scale
        images = steps_per_epoch * batch_size * scale
        data = (["dataset=mnist", "dataset._target_=qexp.testing.mnist_subset", f"+dataset.test_subset={TEST_IMAGES}",
                 f"data_root={root}", f"dataset.train_subset={images}", "dataset.download=false"] if real else
                ["dataset=synthetic", f"dataset.train_samples={images}", f"dataset.test_samples={TEST_IMAGES}"])
        if _group_choice(cfg, "dataset") not in ("mnist", "synthetic"):
            data = []  # the option (a preset) chose its own dataset: leave it
        common = [*(["--config-dir", str(config_dir)] if config_dir else []), *base, *data,
                  f"epochs={epochs}", f"batch_size={batch_size}", "eval_batch_size=1000", f"device={device}",
                  "progress=false", "threads=1", "lock=fail"]
        steps = epochs * steps_per_epoch
        stop_at = steps_per_epoch + 1 if stop_at is None else stop_at
        if not 0 < stop_at < steps:
            raise ValueError(f"stop_at={stop_at}: choose a step inside the run's {steps} steps")

        passed: list[str] = []
        straight = _train(common, work / "straight", "train")
        rec = _read_json(straight / "metrics.json")
        _check_train(straight, rec, common, config_dir, steps, device)
        passed.append("train")

        resumed_out = work / "resumed"
        first = _train(common, resumed_out, "resume", stop_after=stop_at)
        first_rec = _read_json(first / "metrics.json")
        _expect(first_rec.get("status") == "interrupted", "resume",
                f"the run stopped after step {stop_at} has status {first_rec.get('status')!r}, not interrupted")
        resumed = _train(common, resumed_out, "resume")
        _expect(resumed == first, "resume", f"the second launch trained {resumed}, not {first}")
        diffs = _compare_runs(straight, resumed)
        _expect(not diffs, "resume", f"stopped after step {stop_at} and resumed, the run differs from an "
                f"uninterrupted one: {'; '.join(diffs[:6])}")
        passed.append("resume")

        loaded = _load(straight, device)
        manifest = _read_json(straight / "quant.json")
        quantized = _check_manifest(manifest, loaded, rec)
        passed.append("manifest")

        _check_state_dict(straight, loaded, device)
        passed.append("state_dict")

        export = _check_export(straight, work / "export", manifest, root if real else None)
        passed.append("export")
    return Report(option=option, method=str(rec["method"]), bits=int(rec["bits"]),
                  dataset="mnist" if real else "synthetic", steps=steps, stop_at=stop_at,
                  quantized_layers=quantized, export=export, seconds=round(time.perf_counter() - started, 2),
                  passed=passed)


def mnist_subset(test_subset: int, **kwargs: Any) -> Any:
    """MNIST (:func:`qexp.data.mnist.build`, same options) with only the first ``test_subset`` test images:
    the check evaluates every epoch, and the full test set would take most of its time."""
    from qexp.data import mnist
    from qexp.data.common import in_memory_bundle, make_normalize

    keys = ("variant", "root", "download")
    variant = kwargs.get("variant", "mnist")
    arrays = mnist.load_arrays(variant, kwargs.get("root", "./data"), kwargs.get("download", True))
    x, y = arrays["test"]
    rest = {k: v for k, v in kwargs.items() if k not in (*keys, "normalize")}
    defaults = {"batch_size": 64, "eval_batch_size": 1000, "augment": False, "train_subset": None, "val_size": 0,
                "seed": 0, "device": "cpu"}
    args = {**defaults, **rest}
    norm = make_normalize(kwargs.get("normalize", "standard"), *mnist.STATS[variant])
    return in_memory_bundle(variant, arrays["train"], (x[:test_subset], y[:test_subset]), 10, norm,
                            args["batch_size"], args["eval_batch_size"], args["augment"], args["train_subset"],
                            args["val_size"], args["seed"], args["device"], arrays["sources"])


# ---- the method to check ---------------------------------------------------------------------------
def _resolve(method: str | Path | type[Method], options: dict[str, Any] | None,
             work: Path) -> tuple[Path | None, str]:
    """(``--config-dir`` or None, the option's name)."""
    if isinstance(method, type):
        if not issubclass(method, Method):
            raise TypeError(f"check_method: {method.__name__} is not a qexp.methods.base.Method")
        entry = method_option(method)
        if entry is not None and method in registered_methods() and not options:
            return None, entry["option"]
        return _write_option(method, options or {}, work)
    path = Path(method)
    if path.suffix == ".yaml":
        if not path.is_file():
            raise FileNotFoundError(f"check_method: no such method YAML {path}")
        if path.parent.name != "method":
            raise ValueError(f"check_method: {path} must lie in a config folder's method/ (DIR/method/NAME.yaml)")
        return path.parent.parent.resolve(), path.stem
    if path.is_dir():
        found = sorted((path / "method").glob("*.yaml"))
        if len(found) != 1:
            raise ValueError(f"check_method: {path}/method holds {len(found)} method YAML files; name one")
        return path.resolve(), found[0].stem
    if str(method) in {e["option"] for e in registered_methods().values()} or \
            (Path(_shipped_dir()) / f"{method}.yaml").is_file():
        return None, str(method)
    raise ValueError(f"check_method: {method!r} is neither a shipped method option, a method YAML nor a "
                     "config folder")


def _shipped_dir() -> str:
    import qexp.configs

    return str(Path(qexp.configs.__file__).parent / "method")


def _write_option(cls: type[Method], options: dict[str, Any], work: Path) -> tuple[Path, str]:
    """A config folder with one YAML building ``cls`` (it must be importable by its module path)."""
    import yaml

    target = f"{cls.__module__}.{cls.__qualname__}"
    if "<locals>" in target or cls.__module__ == "__main__":
        raise ValueError(f"check_method: {target} cannot be imported by qexp train; give its YAML instead")
    name = cls.name
    folder = work / "configs"
    (folder / "method").mkdir(parents=True, exist_ok=True)
    doc = {"method": {"_target_": target, "name": name, "tag": f"{name}-${{bits}}b", "bits": "${bits}",
                      **options}, "bits": cls.default_bits}
    option = f"check_{name}"
    (folder / "method" / f"{option}.yaml").write_text("# @package _global_\n" + yaml.safe_dump(doc, sort_keys=False))
    return folder, option


def _value(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _compose(config_dir: Path | None, overrides: list[str]) -> Any:
    """The composed configuration, as ``qexp train [--config-dir DIR] OVERRIDES`` would see it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from qexp.methods.base import register_config_dir
    from qexp.run.config import register

    register()
    extra = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    if config_dir:
        register_config_dir(config_dir)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="qexp.configs", version_base="1.3"):
            return compose("train", overrides=[*overrides, *extra])
    except Exception as e:
        raise ContractError(f"config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _group_choice(cfg: Any, group: str) -> str | None:
    node = cfg.get(group)
    return None if node is None else node.get("name")


def _instantiate(node: Any) -> Any:
    from qexp.run.session import instantiate

    return instantiate(node)


# ---- running qexp train in this process ------------------------------------------------------------
def _train(args: list[str], out_root: Path, part: str, stop_after: int | None = None) -> Path:
    """``qexp train ARGS out_root=OUT_ROOT`` through its entry point; the run folder. ``stop_after``: a
    stop signal arrives after that many optimizer steps (the run checkpoints and ends interrupted)."""
    from hydra.core.global_hydra import GlobalHydra
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from qexp.run import preempt, train

    handle = None
    if stop_after is not None:
        count = [0]

        def on_step(opt: Any, a: Any, k: Any) -> None:
            count[0] += 1
            if count[0] == stop_after:
                signal.raise_signal(signal.SIGTERM)  # handled by the run (qexp.run.preempt): checkpoint, stop

        handle = register_optimizer_step_post_hook(on_step)
    argv, out, err = sys.argv, io.StringIO(), io.StringIO()
    code: Any = 0
    threads = torch.get_num_threads()
    sys.argv = ["qexp train", *args, f"out_root={out_root}"]
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            train.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        if handle is not None:
            handle.remove()
        preempt.reset()  # the stop request belonged to this launch only
        GlobalHydra.instance().clear()
        torch.set_num_threads(threads)
    if code not in (0, None):
        raise ContractError(f"{part}: qexp train {' '.join(args)} exited {code}: "
                            f"{(err.getvalue() or out.getvalue()).strip()[-1500:]}")
    found = sorted({p.parent for p in out_root.rglob("metrics.json")})
    if len(found) != 1:
        raise ContractError(f"{part}: qexp train wrote {len(found)} run folders under {out_root}: "
                            f"{err.getvalue().strip()[-1500:]}")
    return found[0]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _expect(ok: bool, part: str, message: str) -> None:
    if not ok:
        raise ContractError(f"{part}: {message}")


# ---- the parts ---------------------------------------------------------------------------------------
def _check_train(run: Path, rec: dict[str, Any], args: list[str], config_dir: Path | None, steps: int,
                 device: str) -> None:
    _expect(rec.get("status") == "completed", "train", f"status {rec.get('status')!r} ({rec.get('error')})")
    losses = [row.get("train_loss") for row in rec.get("history", [])]
    _expect(bool(losses) and all(isinstance(v, float) and math.isfinite(v) for v in losses), "train",
            f"training losses are not finite: {losses}")
    state = _checkpoint(run)
    _expect(int(state["progress"]["step"]) == steps, "train",
            f"{state['progress']['step']} optimizer steps, expected {steps}")
    initial = _initial_model(run, device)
    moved = [k for k, v in state["model"].items()
             if v.is_floating_point() and k in initial and not torch.equal(v, initial[k])]
    _expect(bool(moved), "train", f"no weight changed in {steps} steps")


def _checkpoint(run: Path) -> dict[str, Any]:
    from qexp.run import checkpoint

    return checkpoint.load(run / "checkpoint.pt")


def _built(run: Path, device: str) -> Any:
    """The run's data, model and method as a fresh run builds them (seeded, not trained)."""
    from omegaconf import OmegaConf

    from qexp.run.config import register
    from qexp.run.session import assemble

    register()
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    torch.manual_seed(int(cfg.seed))
    return assemble(cfg, torch.device(device))


def _initial_model(run: Path, device: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in _built(run, device).model.state_dict().items()}


def _load(run: Path, device: str) -> Any:
    """The run as ``qexp eval`` and ``qexp export`` load it (model and method state from checkpoint.pt)."""
    from qexp.run.evaluate import load_run

    try:
        return load_run(run, device)
    except QexpError as e:
        raise ContractError(f"state_dict: the trained run cannot be loaded back: {e}") from e


def _tree_diffs(a: Any, b: Any, path: str) -> list[str]:
    """Where two state trees differ (tensors bit for bit, dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys {sorted(map(str, set(a) ^ set(b)))[:4]}"]
        return [d for k in a for d in _tree_diffs(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _tree_diffs(x, y, f"{path}/{i}")]
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    return [] if same else [f"{path}: {a!r} != {b!r}"[:200]]


def _numbers(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in rec.items() if k not in TIMING_KEYS}
    out["history"] = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rec.get("history", [])]
    return out


def _compare_runs(ref: Path, got: Path) -> list[str]:
    """metrics.json numbers, the checkpoint (timings aside) and quant.json of two runs."""
    diffs = _tree_diffs(_numbers(_read_json(ref / "metrics.json")), _numbers(_read_json(got / "metrics.json")),
                        "metrics.json")
    a, b = _checkpoint(ref), _checkpoint(got)
    for s in (a, b):
        s["progress"] = {k: v for k, v in s["progress"].items() if k not in PROGRESS_TIMING}
        s["progress"]["history"] = [{k: v for k, v in row.items() if k not in TIMING_KEYS}
                                    for row in s["progress"].get("history", [])]
    diffs += _tree_diffs(a, b, "checkpoint")
    diffs += _tree_diffs(_read_json(ref / "quant.json"), _read_json(got / "quant.json"), "quant.json")
    return diffs


def _check_manifest(manifest: Any, loaded: Any, rec: dict[str, Any]) -> int:
    """The envelope, every row a valid format record, and manifest() leaves no trace; the number of
    quantized rows."""
    from qexp.quant import format as fmt

    part = "manifest"
    _expect(isinstance(manifest, dict), part, f"quant.json is a {type(manifest).__name__}, not an object")
    missing = [k for k in ENVELOPE if k not in manifest]
    _expect(not missing, part, f"quant.json lacks {', '.join(missing)}")
    _expect(manifest["method"] == rec["method"], part,
            f"method {manifest['method']!r}, but the run's method.name is {rec['method']!r}")
    _expect(manifest["bits"] == rec["bits"], part, f"bits {manifest['bits']!r}, but the run has {rec['bits']}")
    wb, fb = manifest["weight_bytes"], manifest["float32_bytes"]
    _expect(all(isinstance(v, int) and not isinstance(v, bool) for v in (wb, fb)) and 0 < wb <= fb, part,
            f"weight_bytes {wb!r} and float32_bytes {fb!r} must be integers with 0 < weight_bytes <= float32_bytes")
    rows = manifest["layers"]
    _expect(isinstance(rows, list), part, "layers is not a list")
    try:  # every row is a typed format record (qexp.quant.format), read by export, eval and tables alike
        formats = fmt.parse_manifest(manifest)
    except fmt.FormatError as e:
        raise ContractError(f"{part}: {e}") from e
    quantized = sum(f.quantized for f in formats)
    model, method = loaded.built.model, loaded.built.method
    before = (_snapshot(model.state_dict()), _snapshot(method.state_dict()))
    first = json.dumps(method.manifest(model), sort_keys=True)
    second = json.dumps(method.manifest(model), sort_keys=True)
    _expect(first == second, part, "two calls of manifest() give different results")
    after = (_snapshot(model.state_dict()), _snapshot(method.state_dict()))
    _expect(not _tree_diffs(before, after, "state"), part,
            f"manifest() changed {', '.join(_tree_diffs(before, after, 'state')[:4])}")
    return quantized


def _snapshot(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_snapshot(v) for v in state)
    return state


def _check_state_dict(run: Path, loaded: Any, device: str) -> None:
    """Loaded from the checkpoint, the method gives its state back unchanged; that state and the model's
    load into a freshly built run, which then computes the same outputs and holds the same state."""
    part = "state_dict"
    saved = _checkpoint(run)["method"]
    model, method = loaded.built.model, loaded.built.method
    diffs = _tree_diffs(saved, method.state_dict(), "method")
    _expect(not diffs, part, f"load_state_dict then state_dict() changes {', '.join(diffs[:4])}")
    fresh = _built(run, device)
    try:
        fresh.model.load_state_dict(model.state_dict())
        fresh.method.load_state_dict(_snapshot(method.state_dict()))
    except Exception as e:
        raise ContractError(f"{part}: a freshly built run cannot load the trained state: {e}") from e
    diffs = _tree_diffs(method.state_dict(), fresh.method.state_dict(), "method")
    _expect(not diffs, part, f"after the round trip the method state differs at {', '.join(diffs[:4])}")
    x, _ = next(iter(loaded.built.data.test))
    model.eval()
    fresh.model.eval()
    with torch.no_grad():
        same = torch.equal(model(x.to(device)), fresh.model(x.to(device)))
    _expect(same, part, "a freshly built run loaded with the model's and method's state computes other outputs")


def _check_export(run: Path, out: Path, manifest: dict[str, Any], data_root: Path | None) -> str:
    """``qexp export``: done, with every quantized weight stored as codes (or explained in its notes), or
    refused with one line."""
    from qexp.quant import format as fmt
    from qexp.run.export import export_run

    part = "export"
    try:
        doc = export_run(run, out, data_root=None if data_root is None else str(data_root))
    except QexpError as e:
        msg = str(e)
        _expect(bool(msg) and "\n" not in msg, part, f"the refusal must be one line, got {msg!r}")
        return f"refused: {msg}"
    except Exception as e:
        raise ContractError(f"{part}: qexp export failed with {type(e).__name__}: {e}") from e
    wanted = {f.name for f in fmt.parse_manifest(manifest) if f.tensor == "weight" and f.quantized}
    stored = {r["name"] for r in doc.get("layers", [])}
    noted = {n for n in wanted if any(note.startswith(f"{n}:") for note in doc.get("notes", []))}
    lost = sorted(wanted - stored - noted)
    _expect(not lost, part, f"quant.json lists quantized weights the export stores as float without saying "
            f"why: {', '.join(lost[:6])}")
    return f"{len(stored)} tensors as integer codes" + (f", {len(noted)} kept float (noted)" if noted else "")
