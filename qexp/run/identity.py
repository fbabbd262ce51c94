"""A run's identity is its effective configuration, not the command line's spelling.

* **fingerprint**: the resolved config minus the knobs that cannot change the result (``VOLATILE_KEYS``:
  device, paths, resume, ...), minus the top-level knobs only read through the keys that consume them
  (``SOURCE_KEYS``: ``bits`` reaches the method as ``method.bits``, so ``bits=4`` and ``method.bits=4`` are
  one run), minus the knobs the method ignores (``Method.ignored_knobs``: float ignores ``bits``), with
  ``init_from`` as its checkpoint's content (a sha1 prefix) and ``processes`` when several train it, plus
  a digest of the data the run read (``data.digest``). metrics.json and the checkpoint store it; a
  resume must match it, and so must a finished run before it is reported instead of training.
* **folder**: ``<out_root>/<name>/<dataset>/<model>/<method level>/<differences>/seed<k>``. The method level
  names the method *option* with its bits (``bc_li-1b``, ``lsq-w2a8``), from the method's own keys.
  ``<differences>`` lists, sorted, the group choices and keys whose *effective* value differs from the
  defaults of the same dataset/model/method/preset and seed (``optim=sgd,epochs=3,lr=0.01``). An override
  equal to its default adds nothing, so two command lines that compose to the same config share one folder,
  and two whose configs differ never do (every key outside the path that can differ is listed); only other
  data (not part of the folder) can meet a finished run of another fingerprint, and that is refused.

The defaults are found by composing ``train.yaml`` again with only the group choices of the path
(dataset, model, method, +experiment), then with all the run's group choices and its seed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qexp.errors import QexpError
from qexp.jsonio import file_sha1
from qexp.run.config import SOURCE_KEYS, VOLATILE_KEYS, method_reads
from qexp.run.record import CACHE_FOLDER, CHECKPOINT

#: groups whose choice is already a level of the folder (dataset/model/method tag) or names it (experiment)
PATH_GROUPS = ("dataset", "model", "method", "experiment")
#: qexp's own primary config (configs/train.yaml); another one (``--config-name``) is a folder level
PRIMARY_CONFIG = "train"
#: keys shown by the folder's fixed levels (the method tag carries ``bits``) or not part of the result
PATH_KEYS = ("name", "seed", "bits", "method.bits", "abits", "method.abits", "method.tag", "method.name",
             "dataset.name", "model.name")
#: top-level overrides the defaults are composed with: keys that other keys follow (``method.seed: ${seed}``)
#: and that are levels of the folder themselves, so a key that follows them is not listed again
BASELINE_KEYS = ("seed", "bits", "abits", "name")
#: the groups whose keys are checked against the types of their defaults
TYPED_GROUPS = ("dataset", "model", "method", "optim", "sched")
#: the data digest's key in a fingerprint
DATA_KEY = "data.digest"
#: the run folder whose weights a run starts from: identified by its checkpoint's content
INIT_KEY = "init_from"
#: how many processes train one run (``trainer.devices``, or torchrun's world size written there): other
#: ``trainer.*`` knobs are how a run executes, but data parallelism computes something else with
#: BatchNorm (statistics of each process's share of a batch) and with an ImageFolder's augmentation (each
#: process draws its own), so a run of N > 1 processes is its own run (``processes=N`` in the folder)
DEVICES_KEY, PROCESSES_KEY = "trainer.devices", "processes"
#: a longer difference string is cut and completed by a hash (file names are limited to 255 bytes)
MAX_LEVEL = 180
_MISSING = object()


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are leaves."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _volatile(key: str) -> bool:
    return any(key == v or key.startswith(v + ".") for v in VOLATILE_KEYS)


def _dropped(key: str) -> bool:
    """Not part of the identity: volatile, or a source knob whose consumers carry its value."""
    return _volatile(key) or key in SOURCE_KEYS


def _ignored(ignored: Iterable[str]) -> set[str]:
    return {k for knob in ignored for k in (knob, f"method.{knob}")}


def effective(cfg: DictConfig, ignored: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved config as flat ``key -> value`` minus volatile and source keys and the method's
    ignored knobs."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    if isinstance(flat.get("name"), str):  # x/./y, x//y and x/y/ are one folder, so one name
        flat["name"] = Path(flat["name"]).as_posix()
    if flat.get(INIT_KEY) is not None:  # the weights it starts from, not how their folder is spelled
        flat[INIT_KEY] = file_sha1(init_checkpoint(flat[INIT_KEY]))[:16]
    if int(flat.get(DEVICES_KEY) or 1) > 1:  # each process normalises its share of a batch (BatchNorm)
        flat[PROCESSES_KEY] = int(flat[DEVICES_KEY])
    drop = _ignored(ignored)
    return {k: v for k, v in flat.items() if not _dropped(k) and k not in drop}


def init_checkpoint(run_dir: Any) -> Path:
    """The checkpoint of ``init_from=RUN_DIR``, whose model weights start a run. The identity holds its
    content's sha1 (a prefix), not the folder's spelling: an absolute, a relative or a ``/``-ended path to
    one run is one start, and the same run trained further (or another run copied there) is another."""
    ckpt = Path(str(run_dir)) / CHECKPOINT
    if not ckpt.is_file():
        raise QexpError(f"init_from={run_dir}: no {CHECKPOINT} there (a qexp run folder that trained)")
    return ckpt


def fingerprint(cfg: DictConfig, ignored: Iterable[str] = (), data: str | None = None) -> str:
    """What metrics.json and the checkpoint store and a resume or reuse must match (JSON of
    :func:`effective`, plus ``data.digest`` when the run read files: :func:`qexp.data.common.digest`)."""
    eff = effective(cfg, ignored)
    if data is not None:
        eff[DATA_KEY] = data
    return json.dumps(eff, sort_keys=True)


def differences(stored: str, current: str, ignored: Iterable[str] = ()) -> list[str]:
    """``key: stored -> current`` for every key whose value differs between two fingerprints.

    A fingerprint written before keys were flattened (a nested JSON object) is flattened first; keys
    present on one side only are shown as ``(absent)``. Both sides are read as :func:`effective` reads a
    config (a stored fingerprint may predate ``SOURCE_KEYS``); one stored before runs recorded their data
    carries no data digest and is compared without it.
    """
    drop = _ignored(ignored)

    def load(s: str) -> dict[str, Any]:
        try:
            d = json.loads(s)
        except (TypeError, ValueError):
            return {}
        return {k: v for k, v in flatten(d).items() if not _dropped(k) and k not in drop} \
            if isinstance(d, dict) else {}

    a, b = load(stored), load(current)
    if DATA_KEY not in a:
        b.pop(DATA_KEY, None)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
        if va == vb:
            continue
        if k == DATA_KEY:
            out.append("data: other files under data_root" if vb is not _MISSING else "data: (absent)")
        else:
            out.append(f"{k}: {_show(va)} -> {_show(vb)}")
    return out


def same_run(stored: str, current: str, ignored: Iterable[str] = ()) -> bool:
    """Do two fingerprints describe the same run? Knobs the method ignores never count."""
    return not differences(stored, current, ignored)


def _show(v: Any) -> str:
    return "(absent)" if v is _MISSING else json.dumps(v)


def _number(v: Any) -> Any:
    """One number, one spelling: ``1.0`` and ``1`` are the same setting (fingerprints compare them equal), so
    an integral float reads as an integer (``sched.gamma=1``), in lists too."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 53:
        return int(v)
    if isinstance(v, list):
        return [_number(x) for x in v]
    if isinstance(v, dict):
        return {k: _number(x) for k, x in v.items()}
    return v


def _fmt(v: Any) -> str:
    """A value as it reads in a folder name (Hydra's spelling: true/false/null, lists without spaces; numbers
    by :func:`_number`)."""
    v = _number(v)
    if isinstance(v, bool):
        text = "true" if v else "false"
    elif v is None:
        text = "null"
    elif isinstance(v, (list, dict)):
        text = json.dumps(v, separators=(",", ":")).replace('"', "")
    else:
        text = str(v)
    return text.replace("/", "%2F")


_FOLLOWS = re.compile(r"\$\{([\w.]+)\}")


def differing(cfg: DictConfig, baseline: DictConfig, group_items: Iterable[str] = (),
              ignored: Iterable[str] = ()) -> str:
    """The folder level naming how ``cfg`` differs from ``baseline`` (composed with the same groups and
    seed).

    A key that only follows another listed key (``method.epochs: ${epochs}``) is not repeated; one that
    follows a source knob is listed under its own name (``grid_scale=0.5`` and ``method.scale=0.5`` both
    give ``method.scale=0.5``; ``optim.lr=0.01`` and ``lr=0.01`` both give ``lr=0.01``).
    """
    eff, base = effective(cfg, ignored), effective(baseline, ignored)
    raw = flatten(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
    items = list(group_items)
    for k in sorted(set(eff) | set(base)):
        if k in PATH_KEYS or is_label(k):
            continue
        if eff.get(k, _MISSING) == base.get(k, _MISSING):
            continue
        m = _FOLLOWS.fullmatch(str(raw.get(k, "")))
        if m and (m[1] in PATH_KEYS or (m[1] in eff and eff[m[1]] != base.get(m[1], _MISSING))):
            continue
        items.append(f"~{k}" if k not in eff else f"{k}={_fmt(eff[k])}")
    text = ",".join(sorted(items))
    if len(text) > MAX_LEVEL:
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        text = f"{text[:MAX_LEVEL - 12]}..{digest}"
    return text


def task_overrides(hc: Any) -> list[str]:
    """The command line's overrides as typed: read unresolved, so ``lr=${optim.lr}`` stays a string
    (iterating the node would resolve it against Hydra's own config, and fail)."""
    return [str(o) for o in OmegaConf.to_container(hc.overrides.task, resolve=False)]


def method_level(cfg: DictConfig, option: str | None = None) -> str:
    """The folder level of the method: its ``tag`` (``bc-1b``, from the method's own keys) with the class's
    name replaced by the option's (``method=bc_li`` -> ``bc_li-1b``): two options never share a folder."""
    tag, name = str(cfg.method.tag), str(cfg.method.get("name", ""))
    if option and option != name and name and tag.startswith(name):
        return option + tag[len(name):]
    return tag


def run_dir(cfg: DictConfig, level: str, option: str | None = None) -> Path:
    """``<out_root>/<name>/<dataset>/<model>/<method level>/<level>/seed<k>`` (an empty level is left out)."""
    parts = [str(cfg.out_root), str(cfg.name), str(cfg.dataset.name), str(cfg.model.name),
             method_level(cfg, option)]
    if level:
        parts.append(level)
    return Path(*parts, f"seed{cfg.seed}")


def check_place(cfg: DictConfig) -> None:
    """``name`` is one or more plain folder names below ``out_root`` (never absolute, never ``..``), and
    ``out_root`` is a folder or does not exist yet: no run is ever written outside ``out_root``."""
    name = str(cfg.name)
    parts = Path(name).parts
    if not name.strip() or Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise QexpError(f"name={name} must be a relative folder name below out_root (no '/' at the start, "
                        "no '..'); to write elsewhere set out_root=DIR")
    if parts and parts[0] == CACHE_FOLDER:
        raise QexpError(f"name={name}: {CACHE_FOLDER} below out_root holds the runs' caches, not runs; "
                        "choose another name")
    if not str(cfg.out_root).strip():
        raise QexpError("out_root= must name a folder (default outputs)")
    root = Path(str(cfg.out_root)).expanduser()
    if root.exists() and not root.is_dir():
        raise QexpError(f"out_root={cfg.out_root} is a file, not a folder")


def _kind(default: Any) -> tuple[tuple[type, ...], str] | None:
    """The types a value replacing ``default`` may have, and how to say it; None: any."""
    if isinstance(default, bool):
        return (bool,), "true or false"
    if isinstance(default, int):
        return (int,), "an integer"
    if isinstance(default, float):
        return (int, float), "a number"
    if isinstance(default, list):
        return (list,), "a list"
    return None


def is_label(key: str) -> bool:
    """A key that labels a group's option in folders and tables (``optim.name``, ``method.tag``) and is
    read by nothing else."""
    return key.count(".") == 1 and key.rsplit(".", 1)[1] in ("name", "tag")


def check_labels(cfg: DictConfig, defaults: DictConfig) -> None:
    """A label typed to another value is refused: ``dataset.name=cifar10`` with MNIST data, or
    ``optim.name=sgd`` on Adam, would name the folder and the table row falsely. Compared as written
    (``bc-${method.bits}b`` follows ``method.bits``) and as resolved (typing the label it has is harmless)."""
    raw_got = flatten(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
    raw_base = flatten(OmegaConf.to_container(defaults, resolve=False, enum_to_str=True))
    for k in filter(is_label, raw_got):
        if raw_got[k] != raw_base.get(k, raw_got[k]):
            got, base = OmegaConf.select(cfg, k), OmegaConf.select(defaults, k)
            if got != base:
                group = k.split(".")[0]
                raise QexpError(f"{k}={_fmt(got)}: {k} labels the {group} option ({_fmt(base)}) in folders and "
                                f"tables and changes nothing it computes; pick an option with {group}=NAME "
                                "(your own with --config-dir DIR)")


def check_types(cfg: DictConfig, defaults: DictConfig) -> None:
    """Every group key (``method.stochastic``, ``model.bn``, ...) has the type of its default: a mistyped
    boolean (``off``, ``flase``) is refused instead of being read as a true string. Keys whose default is
    null or a string take anything (their ``_target_`` checks them)."""
    extra = sorted(set(cfg.keys()) - set(defaults.keys()))
    if extra:  # +foo=1: nothing reads it, and it would become a folder level of its own
        raise QexpError(f"+{extra[0]}: qexp has no setting {extra[0]!r} (nothing would read it); "
                        "`qexp train --help` lists the settings")
    got = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    base = flatten(OmegaConf.to_container(defaults, resolve=True, enum_to_str=True))
    for k in sorted(got):
        if k.split(".", 1)[0] not in TYPED_GROUPS or k not in base:
            continue
        kind, value = _kind(base[k]), got[k]
        if kind is None or value is None:
            continue
        types, said = kind
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise QexpError(f"{k} must be {said} (default {_fmt(base[k])}), got {k}={_fmt(value)}")


@dataclass
class Defaults:
    """What a run's folder is measured against (:func:`compose_defaults`)."""

    baseline: DictConfig  # train.yaml with the run's group choices and seed
    items: list[str]  # group choices (other than the path's) that differ from their defaults
    option: str | None  # the method option (``bc_li``), which names the folder's method level


def compose_defaults() -> Defaults:
    """Inside a Hydra task: the defaults the run is compared with, composed through the running Hydra
    (so ``--config-dir`` folders count) with the job's own group overrides (``method=sr``,
    ``+experiment=li2017_mnist``, ``optim=sgd``) and its seed/bits/name."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    parsed = OverridesParser.create().parse_overrides(task_overrides(hc))
    groups = [o for o in parsed if o.key_or_group in choices]
    path_lines = [o.input_line for o in groups if o.key_or_group in PATH_GROUPS]
    all_lines = [o.input_line for o in groups]
    kept = [o.input_line for o in parsed if o.key_or_group in BASELINE_KEYS and not o.is_delete()]
    items: list[str] = []
    if len(all_lines) > len(path_lines):  # other groups chosen on the command line: are they defaults?
        defaults = compose(config_name=hc.job.config_name, overrides=path_lines, return_hydra_config=True)
        default_choices = defaults.hydra.runtime.choices
        items = [f"{g}={c}" for g, c in sorted(choices.items())
                 if g not in PATH_GROUPS and c is not None and default_choices.get(g) != c]
    named = [o for o in parsed if o.key_or_group == "name" and not o.is_delete()]
    if choices.get("experiment"):
        # the folder names the preset only under a name of the preset's own: another name typed, or a preset
        # that sets none (a user's, under the default name), would hide its defaults, so the run would
        # share a folder with one without it (the preset's own name typed again is the preset's folder)
        own = str(compose(config_name=hc.job.config_name, overrides=path_lines).get("name"))

        def plain() -> str:  # the name the same groups give without the preset (composed only if asked)
            lines = [o.input_line for o in groups if o.key_or_group in PATH_GROUPS and o.key_or_group != "experiment"]
            return str(compose(config_name=hc.job.config_name, overrides=lines).get("name"))

        if (named and str(named[-1].value()) != own) or own == plain():
            items.append(f"experiment={choices['experiment']}")
    if hc.job.config_name != PRIMARY_CONFIG:  # --config-name: its own defaults are the baseline, hidden too
        items.append(f"config={hc.job.config_name}")
    baseline = compose(config_name=hc.job.config_name, overrides=all_lines + kept)
    option = choices.get("method")
    return Defaults(baseline, items, str(option) if option is not None else None)


def unread_knobs(cfg: DictConfig, typed: Iterable[str], ignored: Iterable[str] = ()) -> list[str]:
    """The method knobs typed on the command line (``bits``, ``abits``, ``grid_scale``) that the run's method
    does not read: ``method=ste abits=4`` trains 2-bit activations (STE's activation bits are ``bits``);
    ``method=float bits=4`` is float. Not refused (a sweep ``method=float,bc bits=1,2`` types them for every
    job); the run says so, and is the same run as without them."""
    method = OmegaConf.to_container(cfg.method, resolve=False)
    out = []
    for override in typed:
        key, _, value = override.lstrip("+~").partition("=")
        # optim.lr (the other source key) is the optimizer's, read by every method through lr's default
        # (where lr is set instead, unread_optim_lr says so)
        if key in SOURCE_KEYS and "." not in key and (key in ignored or not method_reads(method, key)):
            out.append(f"{key}={value}")
    return out


def unread_optim_lr(cfg: DictConfig, typed: Iterable[str]) -> str | None:
    """``optim.lr=X`` typed where the configuration sets the top-level ``lr`` itself (a preset, or a method
    such as WAGE): the optimizer is built with ``lr``, so X is not read; the line the run logs, else None."""
    for override in typed:
        key, _, value = override.partition("=")
        if key == "optim.lr" and OmegaConf.to_container(cfg, resolve=False).get("lr") != "${optim.lr}":
            return (f"optim.lr={value} not read: this configuration sets lr={cfg.lr} itself (a preset's or the "
                    f"method's); the run is the same as without it (lr={value} changes the rate)")
    return None


def locate(cfg: DictConfig, defaults: Defaults, ignored: Iterable[str] = ()) -> tuple[Path, str]:
    """The run folder and its difference level, measured against the defaults of the run's own seed (a
    stacked group's later seeds are not the command's: ``method.seed=0`` typed with seeds 0 and 1 is a
    difference for seed 1, whose default ``method.seed`` follows its seed)."""
    baseline = defaults.baseline
    if baseline.get("seed") != cfg.seed:
        baseline = baseline.copy()
        baseline.seed = cfg.seed
    level = differing(cfg, baseline, defaults.items, ignored)
    return run_dir(cfg, level, defaults.option), level


def from_hydra(cfg: DictConfig, ignored: Iterable[str] = ()) -> tuple[Path, str]:
    """Inside a Hydra task: the run folder and its difference level, from the effective config."""
    return locate(cfg, compose_defaults(), ignored)
