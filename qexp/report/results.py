"""Run folders -> records -> cells: what ``qexp table``, ``qexp plot`` and ``qexp runs`` read.

Everything shown is read back from run folders (metrics.json, and .hydra/ for runs that died before
writing it), so a sweep run on a cluster can be tabulated anywhere. Runs that did not complete are
kept as records with their status: a table marks them, it never drops them silently.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from qexp.errors import QexpError
from qexp.jsonio import file_sha1, read_json
from qexp.report import stats
from qexp.run import lock, record

#: row order of methods in every table (the papers' order: float, weight-only, activation, learned,
#: post-training); names outside it (plug-ins) follow alphabetically. tests/test_results.py checks it
#: names exactly the options in configs/method/ (tables show the option a run was launched with)
METHOD_ORDER = ("float", "bc", "bc_li", "big_sr", "sr", "r", "ste", "lsq", "pact", "dorefa", "wage", "learned",
                "ptq")
#: column order of datasets, smallest images first; others follow alphabetically. tests/test_results.py
#: checks it names exactly the ``name`` of the options in configs/dataset/
DATASET_ORDER = ("synthetic", "mnist", "fashion_mnist", "cifar10", "cifar10_jpeg", "cifar100", "imagenet")
#: status order in listings and cell notes (finished first, then in progress, then broken)
STATUS_ORDER = ("completed", "running", "interrupted", "pending", "dead", "diverged", "failed")
#: what identifies a configuration besides the seed: a cell mixing several of these is flagged
CONFIG_FIELDS = ("name", "dataset", "model", "method", "bits", "bits_tag", "epochs", "overrides", "optim",
                 "lr", "batch_size")
#: metrics a table can show, with their unit label; other numeric fields of metrics.json work too
METRIC_LABELS = {
    "test_error": "test error (%)",
    "best_test_error": "best test error (%)",
    "test_acc": "test accuracy (%)",
    "train_loss": "final training loss",
    "images_per_s": "training throughput (images/s)",
    "wall_s": "wall time (s)",
}
HIGHER_IS_BETTER = ("test_acc", "images_per_s")
#: measurements of the machine, not results of the configuration: every rerun differs in them, so repeats
#: of one (configuration, seed) that disagree on one are not noted (the newest is kept all the same)
TIMING_METRICS = ("images_per_s", "wall_s")
#: columns a table always has (filled with None when a run's files lack them)
BASE_COLUMNS = ("run_dir", "status", *CONFIG_FIELDS, "seed", "epochs_done", "test_error", "test_acc",
                "best_test_error", "train_loss", "images_per_s", "wall_s", "error", "mtime", "history")
MISSING = "—"


# ---- collecting ---------------------------------------------------------------------------------
def find_run_dirs(root: Path, unreadable: list[str] | None = None) -> list[Path]:
    """Folders below ``root`` (itself included) holding metrics.json or a Hydra job's .hydra/config.yaml;
    ``out_root``'s cache (decoded data, compiled kernels) is not searched. Folders that cannot be listed
    are appended to ``unreadable`` (``PATH (reason)``): the runs below them are not found, and a table
    or listing must not leave them out without saying so."""

    def refused(e: OSError) -> None:
        if unreadable is not None:
            unreadable.append(f"{e.filename} ({e.strerror})")

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=refused):  # linked folders are not entered
        dirnames[:] = sorted(d for d in dirnames if d != record.CACHE_FOLDER)
        here = Path(dirpath)
        if record.METRICS in filenames or (here / ".hydra" / "config.yaml").is_file():
            found.append(here)
    return sorted(found)


def _hydra_fields(run_dir: Path) -> dict[str, Any]:
    """Identifying fields from the composed config, for runs whose metrics.json lacks them."""
    import yaml

    out: dict[str, Any] = {}
    try:
        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return out
    for key in ("dataset", "model", "method", "optim"):
        node = cfg.get(key)
        if isinstance(node, dict) and isinstance(node.get("name"), str) and "${" not in node["name"]:
            out[key] = node["name"]
    for key in ("name", "bits", "seed", "epochs", "batch_size", "lr"):
        v = cfg.get(key)
        if v is not None and not (isinstance(v, str) and "${" in v):
            out[key] = v
    if "lr" not in out and isinstance(cfg.get("optim"), dict) and "lr" in cfg["optim"]:
        out["lr"] = cfg["optim"]["lr"]
    try:
        hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text()) or {}
        out["overrides"] = hydra["hydra"]["job"]["override_dirname"] or ""
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    return out


#: metrics.json keys that hold numbers when present
NUMERIC_FIELDS = ("test_error", "test_acc", "best_test_error", "val_error", "best_val_error", "train_loss",
                  "wall_s", "images_per_s", "epochs_done", "epochs")


def _malformed(rec: dict[str, Any]) -> str | None:
    """Why a metrics.json object cannot be a record (a hand-edited ``"test_error": "abc"`` or ``"status": 5``
    was a traceback in table, runs and plot), or None."""
    if not isinstance(rec.get("status", ""), str):
        return f"status is {rec.get('status')!r}, not a word"
    for k in NUMERIC_FIELDS:
        v = rec.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{k} is {v!r}, not a number"
    history = rec.get("history")
    if history is not None and not (isinstance(history, list) and all(isinstance(h, dict) for h in history)):
        return "history is not a list of objects"
    return None


def read_run(run_dir: Path) -> dict[str, Any]:
    """One run folder -> one flat record (scalars of metrics.json plus its history and folder)."""
    path = run_dir / record.METRICS
    rec: dict[str, Any]
    if path.exists():
        try:
            rec = read_json(path)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            why = _malformed(rec)
            if why:
                raise ValueError(why)
        except (OSError, ValueError) as e:
            rec = {"status": "failed", "error": f"unreadable {record.METRICS}: {e}"}
        mtime = path.stat().st_mtime
    else:  # launched, but died (or is still starting) before the first record
        rec = {"status": "pending", "error": f"no {record.METRICS} yet"}
        mtime = (run_dir / ".hydra" / "config.yaml").stat().st_mtime
    if any(rec.get(k) is None for k in (*CONFIG_FIELDS, "seed") if k != "bits_tag"):
        for k, v in _hydra_fields(run_dir).items():
            if rec.get(k) is None:
                rec[k] = v
    if rec.get("status") in ("running", "pending"):
        why = dead_reason(run_dir, mtime)
        if why is not None:
            rec = {**rec, "status": "dead", "error": why}
    out = {k: v for k, v in rec.items() if isinstance(v, (str, int, float, bool)) or v is None}
    option = method_option(run_dir)
    if option is not None:  # method=bc_li records its method's name, bc: a table must not pool it with bc
        out["method"] = option
    if out.get("bits_tag") is None and out.get("bits") is not None:
        out["bits_tag"] = str(out["bits"])
    out["history"] = rec.get("history") if isinstance(rec.get("history"), list) else []
    out["run_dir"] = str(run_dir)
    out["mtime"] = mtime
    out.setdefault("status", "failed")
    out.setdefault("epochs_done", len(out["history"]))
    return out


def method_option(run_dir: Path) -> str | None:
    """The method option the run was launched with (``bc_li``), as its folder names it, from Hydra's record
    of the group choices (.hydra/hydra.yaml, ``runtime.choices.method``); None without one. metrics.json
    holds the method's name, which two options can share (``bc`` and ``bc_li``; an option of one's own
    under ``--config-dir``). Read by lines, not parsed: the file is large and qexp writes it in one format."""
    try:
        with open(run_dir / ".hydra" / "hydra.yaml", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for i, line in enumerate(lines):
        if line.strip() == "choices:":
            depth = len(line) - len(line.lstrip())
            for entry in lines[i + 1:]:
                if len(entry) - len(entry.lstrip()) <= depth:
                    break
                key, _, value = entry.strip().partition(": ")
                if key == "method" and value and value != "null":
                    return value.strip("'\"")
    return None


def dead_reason(run_dir: Path, mtime: float, now: float | None = None) -> str | None:
    """Why a run recorded as ``running`` (or ``pending``) no longer runs; None while it may still run.

    Its lock decides (:mod:`qexp.run.lock`): on this host the holder's pid must still exist, from
    another host its heartbeat must be younger than ``lock.STALE_S``. A folder without a lock file
    (the run ended without writing its final status, or predates locks) is dead once metrics.json is
    older than ``lock.STALE_S``.
    """
    import time

    now = time.time() if now is None else now
    holder = lock.read_holder(run_dir / lock.LOCK)
    if holder is None:
        if now - mtime > lock.STALE_S:
            return (f"no process holds this run and it has not written for {now - mtime:.0f} s: rerun the "
                    "same command to resume it")
        return None
    if lock.holder_alive(holder, now):
        return None
    return f"its process ({holder.describe(now)}) is gone: rerun the same command to resume it"


def collect(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """Every run below ``dirs`` as one DataFrame row (duplicates from nested DIRs counted once).

    Raises QexpError when a folder does not exist or holds no run at all.
    """
    seen: dict[Path, dict[str, Any]] = {}
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise QexpError(f"{root} does not exist")
        unreadable: list[str] = []
        runs = find_run_dirs(root, unreadable)
        if not runs:
            why = f"; cannot read {', '.join(unreadable)}" if unreadable else ""
            raise QexpError(f"no runs found below {root} (a run folder holds metrics.json){why}")
        for u in unreadable:
            print(f"warning: cannot read {u}: the runs below it are left out", file=sys.stderr)
        for r in runs:
            seen.setdefault(r.resolve(), read_run(r))
    if not seen:
        raise QexpError("no folders given")
    df = pd.DataFrame(list(seen.values()))
    for col in BASE_COLUMNS:
        if col not in df.columns:
            df[col] = None
    return df.astype({"history": object}).reset_index(drop=True)


# ---- one result per (configuration, seed) ---------------------------------------------------------
def configuration(run: dict[str, Any]) -> str | None:
    """The run's effective configuration without its seed (its stored fingerprint minus ``seed`` and the
    keys that follow it), or None for a run from before metrics.json stored one."""
    fp = run.get("fingerprint")
    if not isinstance(fp, str):
        return None
    try:
        d = json.loads(fp)
    except ValueError:
        return None
    if not isinstance(d, dict):
        return None
    seed = d.pop("seed", None)
    return json.dumps({k: v for k, v in d.items() if not (k.endswith(".seed") and v == seed)}, sort_keys=True)


def _identity(run: dict[str, Any]) -> tuple:
    """(configuration, seed, shown method/bits): the same run copied to two folders has one identity."""
    conf = run.get("fingerprint") if isinstance(run.get("fingerprint"), str) else \
        json.dumps([key_label(k, run) for k in CONFIG_FIELDS])
    return conf, key_label("seed", run), run.get("method"), run.get("bits_tag")


#: how a run computed, outside its identity (``VOLATILE_KEYS`` of qexp.run.config), as metrics.json
#: records it (``compile``: whether it has compile_s): repeats of one (configuration, seed) whose last
#: digits disagree usually differ here
HOW_FIELDS = ("device", "torch", "threads", "compile", "seeds_per_process")


def _preference(run: dict[str, Any]) -> tuple:
    """Which of several folders of one (configuration, seed) a table keeps, smallest first: a completed
    run, then the newest metrics.json (the latest rerun stands for the configuration)."""
    return run.get("status") != "completed", -(run.get("mtime") or 0)


def _how(run: dict[str, Any], key: str) -> str:
    """A ``HOW_FIELDS`` value as shown."""
    if key == "compile":
        compiled = isinstance(run.get("compile_s"), (int, float)) and not _isnan(run["compile_s"])
        return "true" if compiled else "false"
    v = run.get(key)
    return str(int(v)) if isinstance(v, float) and v.is_integer() else key_label(key, run)  # threads: 1.0 in pandas


def _disagreement(runs: list[dict[str, Any]], kept: dict[str, Any], metric: str) -> str | None:
    """The note for repeats of one (configuration, seed) whose completed results differ, else None."""
    if metric in TIMING_METRICS:
        return None
    values = sorted({float(v) for r in runs if r.get("status") == "completed"
                     and isinstance(v := r.get(metric), (int, float)) and not _isnan(v)})
    if len(values) < 2:
        return None
    what = " x ".join("/".join(key_label(k, kept) for k in ks) for ks in (("method", "bits"), ("dataset", "model")))
    how = [f"{k} ({', '.join(sorted({_how(r, k) for r in runs}))})" for k in HOW_FIELDS
           if len({_how(r, k) for r in runs}) > 1]
    return (f"{what} seed {key_label('seed', kept)}: {len(runs)} run folders repeat one (configuration, seed) "
            f"and disagree on {metric_label(metric)}: {values[0]:g} to {values[-1]:g} ({len(values)} values); "
            f"kept {kept['run_dir']} ({_fmt(kept.get(metric))}), the newest completed one"
            + (f"; they differ in {', '.join(how)}, not part of a run's identity" if how else ""))


def _fmt(v: Any) -> str:
    return f"{float(v):g}" if isinstance(v, (int, float)) and not _isnan(v) else "no value"


def dedupe(df: pd.DataFrame, metric: str = "test_error") -> tuple[pd.DataFrame, list[str]]:
    """Count each (configuration, seed) once: a run found in several folders (a copied output folder,
    ``qexp table T T2``, a rerun with other threads) keeps one record (:func:`_preference`); a note says
    how many were dropped, and one per (configuration, seed) whose repeats disagree on ``metric`` gives
    the range and the folder kept, so a silent choice between different results cannot happen."""
    recs = df.to_dict("records")
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(recs):
        groups.setdefault(_identity(r), []).append(i)
    if len(groups) == len(recs):
        return df, []
    keep, notes = [], []
    for members in groups.values():
        kept = min(members, key=lambda i: _preference(recs[i]))
        keep.append(kept)
        if len(members) > 1 and (note := _disagreement([recs[i] for i in members], recs[kept], metric)):
            notes.append(note)
    dropped = len(recs) - len(groups)
    notes.insert(0, f"{dropped} run folder(s) repeat a (configuration, seed) found in another folder: "
                    "each counted once (a completed one, the newest)")
    return df.iloc[sorted(keep)].reset_index(drop=True), notes


# ---- post-training quantization curves (ptq.json) -----------------------------------------------
PTQ_FILE = record.PTQ_FILE


#: the scheme header of a ptq.json made without scheme options (``qexp.methods.ptq.curve.DEFAULT_SCHEME_HEADER``,
#: not imported: that loads torch; tests/test_results.py checks they agree). Files from before the header
#: was written used it
PTQ_DEFAULT_SCHEME = {"scheme": "affine-minmax-per-layer", "act_scheme": "affine-minmax-per-tensor"}
#: activations calibrated on this many training batches unless ``--calib-batches`` said otherwise
PTQ_DEFAULT_CALIB = 8
#: the fields of a source run a PTQ record keeps: what identifies it (and how it computed); its other
#: numbers (validation errors, diagnostics, timings) describe the source network, not the PTQ result
PTQ_KEPT = ("status", *CONFIG_FIELDS, "seed", "fingerprint", "mtime", "epochs_done", "device", "torch", "threads",
            "compile_s", "seeds_per_process")
#: a PTQ record's status when its ptq.json was made from a checkpoint.pt that has changed since
STALE = "stale"


def ptq_tag(scheme: dict[str, str], bits: int, act: Any = None) -> str:
    """How a ptq.json result shows under ``bits``: ``k`` (weights only) or ``k-a`` (a-bit activations), then
    its ``scheme`` (the file's header) when not the default: ``4 symmetric-minmax-per-channel``, with
    activations the weights' and the activations' scheme. Results of different schemes are then different
    rows, never one pooled cell."""
    tag = f"{bits}" if act is None else f"{bits}-{act}"
    text = ptq_scheme_text(scheme, activations=act is not None)
    return f"{tag} {text}" if text else tag


def ptq_scheme_text(scheme: dict[str, Any], activations: bool) -> str:
    """The schemes a PTQ result used, when not the default ("" then): the weights' scheme, and with
    ``activations`` the activations' one too and its calibration batches when not 8 (``calib1``; an
    absent or empty value is the default)."""
    keys = ("scheme", "act_scheme") if activations else ("scheme",)
    used = [str(scheme.get(k) or PTQ_DEFAULT_SCHEME[k]) for k in keys]
    text = "" if used == [PTQ_DEFAULT_SCHEME[k] for k in keys] else " ".join(used)
    calib = scheme.get("calib_batches")
    if activations and isinstance(calib, int) and calib != PTQ_DEFAULT_CALIB:
        text = f"{text} calib{calib}".strip()
    return text


def ptq_staleness(run_dir: str | Path, doc: dict[str, Any]) -> str | None:
    """Why a run's ptq.json does not describe its checkpoint.pt as it is now (None: it does, or cannot
    be checked: a file written before qexp recorded the checkpoint's digest, or no checkpoint): ``qexp
    eval --ptq-bits`` analysed a checkpoint the run has replaced since (it trained on, or was retrained)."""
    made = doc.get("checkpoint_sha1")
    if not isinstance(made, str) or not made:
        return None
    name = doc.get("checkpoint") if doc.get("checkpoint") in (record.CHECKPOINT, record.BEST) else record.CHECKPOINT
    path = Path(run_dir) / name
    try:
        st = path.stat()
        if [st.st_size, st.st_mtime_ns] == doc.get("checkpoint_stat"):  # untouched since: no need to hash it
            return None
        now = file_sha1(path)
    except OSError:
        return None
    if now.startswith(made):
        return None
    epoch = doc.get("epoch")
    return (f"{Path(run_dir) / PTQ_FILE} analysed {name} as it was"
            + (f" after epoch {epoch}" if isinstance(epoch, int) else "")
            + f", which has changed since: its results are not counted; rerun qexp eval {run_dir} --ptq-bits ...")


def ptq_records(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The PTQ results stored in a run folder as table records: method ``ptq`` (``ptq(<method>)`` when
    the source run was not float), bits tagged by :func:`ptq_tag`, the source run's other keys.
    Weights-only entries are deduplicated by k."""
    doc = record.read_ptq(run["run_dir"])
    if doc is None or run.get("status") != "completed":
        return []
    src = run.get("method")
    # a method=ptq run trains (and checkpoints) a float network: its PTQ curve is PTQ of float
    method = "ptq" if src in ("float", "ptq", None) else f"ptq({src})"
    scheme: dict[str, Any] = {k: str(doc.get(k) or v) for k, v in PTQ_DEFAULT_SCHEME.items()}  # old file: default
    scheme["calib_batches"] = doc.get("calib_batches")
    stale = ptq_staleness(run["run_dir"], doc)
    # the source run's identity only: its other numbers (val_error, diagnostics, ...) are not the PTQ result's
    base = {k: v for k, v in run.items() if k in PTQ_KEPT or not isinstance(v, (int, float)) or isinstance(v, bool)}
    out, seen = [], set()
    for e in doc["results"]:
        if not isinstance(e, dict) or not isinstance(e.get("bits"), int):
            continue
        act = e.get("act_bits")
        for key, tag in (("weights_only_error", ptq_tag(scheme, e["bits"])),
                         ("with_activations_error", ptq_tag(scheme, e["bits"], act))):
            err = e.get(key)
            if not isinstance(err, (int, float)) or tag in seen:
                continue
            seen.add(tag)
            drop = e.get(key.replace("_error", "_drop"))
            out.append({**base, "method": method, "bits": e["bits"], "bits_tag": tag, "test_error": err,
                        "test_acc": 100.0 - err, "best_test_error": err, "train_loss": None,
                        "images_per_s": None, "wall_s": None, "history": [], "ptq_of": src, "ptq_json": True,
                        "ptq_act_bits": act if key == "with_activations_error" else None,
                        "float_test_error": doc.get("float_test_error"),
                        "ptq_drop": drop if isinstance(drop, (int, float)) else None,
                        "ptq_scheme": scheme["scheme"],
                        "ptq_act_scheme": scheme["act_scheme"] if key == "with_activations_error" else None,
                        "run_dir": f"{run['run_dir']}#{PTQ_FILE}:{tag}",
                        **({"status": STALE, "error": stale} if stale else {})})
    return out


def with_ptq(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` plus one record per PTQ result found in its completed runs' folders."""
    extra = [r for run in df.to_dict("records") for r in ptq_records(run)]
    if not extra:
        return df
    return pd.concat([df, pd.DataFrame(extra)], ignore_index=True).astype({"history": object})


# ---- keys and order -----------------------------------------------------------------------------
def _natural(s: str) -> tuple:
    """'lr=0.01,epochs=10' sorts with numbers compared as numbers."""
    parts = re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", s)
    return tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts) if p)


def _leading_number(s: str) -> float:
    m = re.match(r"\s*(-?\d+(?:\.\d+)?)", s)
    return float(m.group(1)) if m else math.inf


def key_label(key: str, run: dict[str, Any] | pd.Series) -> str:
    """How a run shows under a grouping key: ``bits`` shows the method's tag (WAGE: 2-8-8-8)."""
    v = run.get("bits_tag") if key == "bits" else run.get(key)
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        v = run.get("bits") if key == "bits" else None
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == "":
        return MISSING
    if isinstance(v, bool):  # as typed on the command line and in folder names (Hydra's spelling)
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer() and key in ("bits", "seed", "epochs", "batch_size"):
        v = int(v)
    return str(v)


def sort_key(key: str, label: str) -> tuple:
    """Stable, meaningful order: paper method order, bits ascending, known datasets first, natural."""
    if label == MISSING:
        return (2,)
    if key == "method":
        base = label.split("(")[0]  # ptq(bc): PTQ of bc runs, after ptq
        return (0, METHOD_ORDER.index(base), label) if base in METHOD_ORDER else (1, 0, label)
    if key == "dataset":
        return (0, DATASET_ORDER.index(label), "") if label in DATASET_ORDER else (1, 0, label)
    if key == "status":
        return (0, STATUS_ORDER.index(label), "") if label in STATUS_ORDER else (1, 0, label)
    if key in ("bits", "seed", "epochs", "lr", "batch_size"):
        return (0, _leading_number(label), _natural(label))
    return (0, 0, _natural(label))


def ordered(keys: Sequence[str], labels: Iterable[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return sorted(set(labels), key=lambda t: tuple(sort_key(k, v) for k, v in zip(keys, t)))


# ---- cells --------------------------------------------------------------------------------------
def metric_label(metric: str) -> str:
    """'test error (%)' for known metrics; others readable, with % where they are errors/accuracies."""
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    words = metric.replace("/", " ").replace("_", " ")
    return f"{words} (%)" if re.search(r"(error|acc|drop)$", metric) else words


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER or metric.endswith("_acc") or metric.endswith("accuracy")


def check_metric(df: pd.DataFrame, metric: str) -> None:
    numeric = sorted(c for c in df.columns if c not in ("mtime", "seed", "epochs_done", *CONFIG_FIELDS)
                     and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any())
    if metric not in METRIC_LABELS and metric not in numeric:
        choices = sorted(set(METRIC_LABELS) | set(numeric))
        raise QexpError(f"unknown metric {metric!r}; choose from {', '.join(choices)}")


#: top-level knobs a method reads through its own config (``method.scale: ${grid_scale}``) -> the key that
#: carries the value into the method; ``bits`` is metrics.json's own column (the method's bits)
METHOD_KNOBS = {"grid_scale": "method.scale", "abits": "method.abits"}
#: keys another key carries (:data:`qexp.run.config.SOURCE_KEYS`) -> the key whose value the run used: a
#: table reads that one, so ``grid_scale=0.5`` and ``method.scale=0.5`` (one run) get one label whichever
#: spelling started it, and ``optim.lr`` shows the rate the optimizer was built with (``lr=0.01`` sets it)
CARRIED_BY = {**METHOD_KNOBS, "optim.lr": "lr"}
#: a folder level too long for the file system ends in ``..<10 hex digits>`` (qexp.run.identity): its
#: text is cut, so a key's value is read from the run's composed config instead
TRUNCATED = re.compile(r"\.\.[0-9a-f]{10}$")


def split_overrides(text: str) -> dict[str, str]:
    """Hydra's override_dirname (``method.ste=relu,lr=0.01,sched.milestones=[200,250]``) as a dict."""
    items, depth, cur = [], 0, ""
    for ch in text or "":
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if sep:
            out[k.lstrip("+~")] = v
        elif out and item:  # a bare comma inside an unbracketed value
            last = next(reversed(out))
            out[last] += "," + item
    return out


#: what a table shows for a top-level knob the run's method does not read (float at any ``grid_scale``)
NOT_READ = "—"


def config_value(run_dir: str, dotted: str, method_knob: bool = False) -> Any:
    """``dotted`` (``method.ste``, or ``method.scale: ${grid_scale}`` resolved) in the run's composed config
    (.hydra/config.yaml), or None. ``method_knob``: ``dotted`` is the method's key that carries a top-level
    knob (:data:`METHOD_KNOBS`: ``method.scale`` for ``grid_scale``, typed either way), :data:`NOT_READ` when
    the run's method has no such key: the composed config records the top-level value either way, set by
    whichever job of a sweep started the run (float trained once for ``grid_scale=0.01,glorot`` would
    otherwise sit in the row of that job's scale)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(Path(run_dir.split("#")[0]) / ".hydra" / "config.yaml")
        if method_knob and "method" in cfg and dotted.partition(".")[2] not in cfg.method:
            return NOT_READ
        node: Any = OmegaConf.select(cfg, dotted, throw_on_missing=False)
        if OmegaConf.is_config(node):
            node = OmegaConf.to_container(node, resolve=True)
    except (OSError, ValueError, OmegaConfBaseException):
        return None
    return node if isinstance(node, (str, int, float, bool)) else (None if node is None else str(node))


def with_keys(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Add the asked-for keys the records lack from each run's overrides, else its composed config, so
    any config key groups a table (``--rows method.ste,bits``, ``--cols optim.lr``)."""
    missing = [k for k in dict.fromkeys(keys) if k not in df.columns]
    if not missing:
        return df
    df = df.copy()
    recs = df.to_dict("records")
    for k in missing:
        values = []
        for r in recs:
            if k in CARRIED_BY:  # the value the run used, not how it was typed
                carried = r.get(CARRIED_BY[k])
                values.append(carried if carried is not None and not _isnan(carried)
                              else config_value(r["run_dir"], CARRIED_BY[k], method_knob=k in METHOD_KNOBS))
                continue
            text = r.get("overrides")
            usable = isinstance(text, str) and not TRUNCATED.search(text)
            v = split_overrides(text).get(k) if usable else None
            values.append(v if v is not None else config_value(r["run_dir"], k))
        if any(v is not None for v in values):
            df[k] = pd.Series(values, index=df.index, dtype=object)
    return df


def check_keys(df: pd.DataFrame, keys: Sequence[str], what: str) -> None:
    bad = [k for k in keys if k not in df.columns or k in ("history", "mtime")]
    if bad:
        usable = sorted(c for c in df.columns if c not in ("history", "mtime", "run_dir"))
        raise QexpError(f"unknown {what} key(s) {', '.join(bad)}; the runs have: {', '.join(usable)}, "
                        "and any key of their config (e.g. method.ste, optim.lr)")


@dataclass
class Cell:
    """The runs of one (row, column): completed ones give the numbers, the others a status note.

    ``values`` holds one sample per seed: the seed is what repeats an experiment, so a cell pooling
    configurations (flagged by :meth:`Grid.warnings`) that share a seed counts it once, as the mean of its
    runs; n, the std and Welch's test never count one seed twice (two seed-0 runs equal to the last digit
    would otherwise pass the test with zero variance)."""

    runs: list[dict[str, Any]]
    metric: str
    values: list[float] = field(default_factory=list, init=False)
    by_seed: dict[str, list[float]] = field(default_factory=dict, init=False)  # seed label -> its runs' values

    def __post_init__(self) -> None:
        for r in self.runs:
            v = r.get(self.metric)
            if r.get("status") == "completed" and v is not None and not _isnan(v):
                seed = key_label("seed", r)  # a run without a recorded seed is its own sample
                self.by_seed.setdefault(seed if seed != MISSING else f"? {r.get('run_dir')}", []).append(float(v))
        self.values = [statistics.fmean(vs) for vs in self.by_seed.values()]

    def shared_seeds(self) -> dict[str, int]:
        """Seeds that more than one of the cell's runs gave a value for, with how many."""
        return {s: len(vs) for s, vs in self.by_seed.items() if len(vs) > 1}

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds (n-1); None for a single run."""
        return statistics.stdev(self.values) if len(self.values) >= 2 else None

    @property
    def ci(self) -> float | None:
        """Half-width of the 95% t confidence interval of the mean; None for a single run."""
        return stats.mean_ci(self.values)

    def status_counts(self) -> dict[str, list[dict[str, Any]]]:
        """Runs that gave no number, by status (completed runs lacking the metric count as 'no value')."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.runs:
            st = r.get("status") or "failed"
            if st == "completed":
                v = r.get(self.metric)
                if v is not None and not _isnan(v):
                    continue
                st = "no value"
            out.setdefault(st, []).append(r)
        return dict(sorted(out.items(), key=lambda kv: sort_key("status", kv[0])))

    def number_text(self, digits: int = 2, spread: str = "std") -> str:
        """``mean ± std (n)``, or with ``spread="ci"`` ``mean ± half-width of the 95% CI (n)``."""
        if not self.values:
            return ""
        half = self.ci if spread == "ci" else self.std
        if half is None:
            return f"{self.mean:.{digits}f} ({self.n})"
        return f"{self.mean:.{digits}f} ± {half:.{digits}f} ({self.n})"

    def note(self) -> str:
        """'failed (1)', 'running 3/10 ep', 'diverged (2)', ...; empty when every run completed."""
        parts = []
        for st, runs in self.status_counts().items():
            if st in ("running", "interrupted"):
                done = sorted(int(r.get("epochs_done") or 0) for r in runs)
                total = _first(r.get("epochs") for r in runs)
                span = f"{done[0]}" if done[0] == done[-1] else f"{done[0]}-{done[-1]}"
                count = f" ({len(runs)})" if len(runs) > 1 else ""
                parts.append(f"{st} {span}/{total if total is not None else '?'} ep{count}")
            else:
                parts.append(f"{st} ({len(runs)})")
        return "; ".join(parts)

    def text(self, digits: int = 2, spread: str = "std") -> str:
        return "; ".join(p for p in (self.number_text(digits, spread), self.note()) if p) or MISSING

    def mixed_configs(self) -> list[str]:
        """Fields that differ between the cell's runs other than the seed (the cell mixes configs): from
        their stored configurations when they have them (every key, ``method.stochastic`` included),
        else from the identifying fields (an empty ``overrides``, a run with the defaults, counts)."""
        confs = [configuration(r) for r in self.runs]
        if all(c is not None for c in confs) and len(set(confs)) > 1:
            loaded = [json.loads(c) for c in dict.fromkeys(confs)]  # type: ignore[arg-type]
            keys = sorted({k for d in loaded for k in d})
            return [k for k in keys if len({json.dumps(d.get(k)) for d in loaded}) > 1]
        return [k for k in CONFIG_FIELDS
                if len({key_label(k, r) if k != "overrides" else str(r.get(k) or "") for r in self.runs}
                       - {MISSING}) > 1]


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _first(values: Iterable[Any]) -> Any:
    for v in values:
        if v is not None and not _isnan(v):
            return int(v) if isinstance(v, float) and v.is_integer() else v
    return None


#: significance level of the best-mark in tables (Welch's t-test against the runner-up)
DEFAULT_ALPHA = 0.05


@dataclass(frozen=True)
class Verdict:
    """A column's best cell(s), its runner-up and the test between them (None when untestable)."""

    rows: list[tuple[str, ...]]
    runner_up: tuple[str, ...] | None
    test: stats.Welch | None
    marked: bool


@dataclass
class Grid:
    """A table before rendering: ordered row/column labels and the cell for each pair present."""

    row_keys: list[str]
    col_keys: list[str]
    metric: str
    rows: list[tuple[str, ...]]
    cols: list[tuple[str, ...]]
    cells: dict[tuple[tuple[str, ...], tuple[str, ...]], Cell]
    notes: list[str] = field(default_factory=list)  # e.g. duplicates dropped (:func:`dedupe`)

    def cell(self, row: tuple[str, ...], col: tuple[str, ...]) -> Cell | None:
        return self.cells.get((row, col))

    def verdicts(self, alpha: float = DEFAULT_ALPHA) -> dict[tuple[str, ...], Verdict]:
        """Per column: its best mean, the runner-up and whether the best is marked.

        With ``alpha < 1`` a best cell is marked only when Welch's t-test over seeds (``Cell.values``: one
        sample per seed, never a seed twice) finds it different from the runner-up at p < alpha (so never
        with fewer than two seeds on either side, nor in a column with a single filled cell);
        ``alpha >= 1`` marks the best mean unconditionally (ties all).
        """
        out: dict[tuple[str, ...], Verdict] = {}
        sign = -1.0 if higher_is_better(self.metric) else 1.0
        for col in self.cols:
            ranked = sorted(((sign * c.mean, row) for row in self.rows
                             if (c := self.cell(row, col)) and c.mean is not None), key=lambda t: t[0])
            if not ranked:
                continue
            best_row = ranked[0][1]
            if alpha >= 1.0:
                tied = [row for m, row in ranked if math.isclose(m, ranked[0][0], abs_tol=1e-12)]
                out[col] = Verdict(tied, None, None, True)
                continue
            if len(ranked) < 2:
                out[col] = Verdict([best_row], None, None, False)
                continue
            runner = ranked[1][1]
            test = stats.welch(self.cells[(best_row, col)].values, self.cells[(runner, col)].values)
            out[col] = Verdict([best_row], runner, test, test is not None and test.p < alpha)
        return out

    def best(self, alpha: float = DEFAULT_ALPHA) -> set[tuple[tuple[str, ...], tuple[str, ...]]]:
        """The marked (row, col) pairs: see :meth:`verdicts`."""
        return {(row, col) for col, v in self.verdicts(alpha).items() if v.marked for row in v.rows}

    def warnings(self) -> list[str]:
        notes = list(self.notes)
        notes += list(dict.fromkeys(r["error"] for c in self.cells.values() for r in c.runs
                                    if r.get("status") == STALE and isinstance(r.get("error"), str)))
        for (row, col), c in self.cells.items():
            mixed = c.mixed_configs()
            if "overrides" in mixed:  # name the overridden keys that differ: those are what to add
                parsed = [split_overrides(r.get("overrides") or "") for r in c.runs]
                names = list(dict.fromkeys(k for p in parsed for k in p))
                differ = [k for k in names if len({p.get(k) for p in parsed}) > 1 and k not in mixed]
                if differ:
                    mixed = [k for k in mixed if k != "overrides"] + differ
            parts = [f"mixes runs that differ in {', '.join(mixed)}: add them to --rows or --cols to "
                     "separate them"] if mixed else []
            if shared := c.shared_seeds():
                seeds = ", ".join(f"seed {s} in {k} runs" for s, k in shared.items())
                parts.append(f"{seeds}: each seed counts once (the mean of its runs), n counts seeds")
            if parts:
                notes.append(f"cell {'/'.join(row)} x {'/'.join(col)} {'; '.join(parts)}")
        return notes


def aggregate(df: pd.DataFrame, row_keys: Sequence[str], col_keys: Sequence[str], metric: str) -> Grid:
    """Group runs into cells by (row keys, column keys); seeds (and anything not asked for) pooled."""
    df, notes = dedupe(df, metric)
    df = with_keys(df, [*row_keys, *col_keys])
    check_keys(df, list(row_keys) + list(col_keys), "row/column")
    check_metric(df, metric)
    groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[dict[str, Any]]] = {}
    for run in df.to_dict("records"):
        row = tuple(key_label(k, run) for k in row_keys)
        col = tuple(key_label(k, run) for k in col_keys)
        groups.setdefault((row, col), []).append(run)
    cells = {k: Cell(v, metric) for k, v in groups.items()}
    rows = ordered(row_keys, (r for r, _ in groups))
    cols = ordered(col_keys, (c for _, c in groups))
    unread = [k for k in dict.fromkeys([*row_keys, *col_keys]) if k in METHOD_KNOBS and k in df.columns
              and (df[k] == NOT_READ).any()]
    for k in unread:
        methods = sorted({str(m) for m in df.loc[df[k] == NOT_READ, "method"]}) if "method" in df.columns else []
        notes = [*notes, f"{k} {NOT_READ}: runs whose method does not read {k} ({', '.join(methods)}); "
                         f"one run answers for every {k} of the sweep"]
    return Grid(list(row_keys), list(col_keys), metric, rows, cols, cells, notes)


def where(df: pd.DataFrame, clauses: Sequence[str]) -> pd.DataFrame:
    """Keep runs whose KEY shows one of the comma-separated VALUES (``--where method=float,bc``); the one
    filter of ``qexp table``, ``qexp plot`` and ``qexp runs``. Any key works: record fields, override keys
    and config keys (``method.ste``), matched as the tables label them (``bits`` is the method's tag)."""
    for clause in clauses:
        key, values = parse_clause(clause, "--where")
        df = with_keys(df, [key])
        check_keys(df, [key], "--where")
        wanted = set(values.split(","))
        df = df[[key_label(key, r) in wanted for r in df.to_dict("records")]]
        if df.empty:
            raise QexpError(f"no runs left after --where {clause}")
    return df


def parse_clause(clause: str, option: str) -> tuple[str, str]:
    """``KEY=VALUE`` -> (key, value); anything else is a user error naming the option."""
    key, sep, value = clause.partition("=")
    if not sep or not key.strip() or not value:
        raise QexpError(f"{option} takes KEY=VALUE[,VALUE...], not {clause!r}")
    return key.strip(), value


def parse_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise QexpError(f"empty key list {text!r}; give comma-separated keys such as method,bits")
    return keys
