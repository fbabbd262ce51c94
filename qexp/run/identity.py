"""A run's identity is its effective configuration, not the command line's spelling.

* **fingerprint**: the resolved config minus the knobs that cannot change the result (``VOLATILE_KEYS``:
  device, paths, resume, ...) and minus the knobs the method ignores (``Method.ignored_knobs``: float
  ignores ``bits``). A checkpoint stores it; a resume must match it.
* **folder**: ``<out_root>/<name>/<dataset>/<model>/<method tag>/<differences>/seed<k>``, where
  ``<differences>`` lists, sorted, the group choices and keys whose *effective* value differs from the
  defaults of the same dataset/model/method/preset (``optim=sgd,epochs=3,lr=0.01``). An override equal to
  its default adds nothing, so two command lines that compose to the same config share one folder, and
  two whose fingerprints differ never do (every key outside the path that can differ is listed).

The defaults are found by composing ``train.yaml`` again with only the group choices of the path
(dataset, model, method, +experiment), then with all the run's group choices.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qexp.run.config import VOLATILE_KEYS

#: groups whose choice is already a level of the folder (dataset/model/method tag) or names it (experiment)
PATH_GROUPS = ("dataset", "model", "method", "experiment")
#: keys shown by the folder's fixed levels (the method tag carries ``bits``) or not part of the result
PATH_KEYS = ("name", "seed", "bits", "method.bits", "abits", "method.abits", "method.tag", "method.name",
             "dataset.name", "model.name")
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


def effective(cfg: DictConfig, ignored: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved config as flat ``key -> value`` minus volatile keys and the method's ignored knobs."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    drop = {k for knob in ignored for k in (knob, f"method.{knob}")}
    return {k: v for k, v in flat.items() if not _volatile(k) and k not in drop}


def fingerprint(cfg: DictConfig, ignored: Iterable[str] = ()) -> str:
    """What a checkpoint stores and a resume must match (JSON of :func:`effective`)."""
    return json.dumps(effective(cfg, ignored), sort_keys=True)


def differences(stored: str, current: str) -> list[str]:
    """``key: stored -> current`` for every key whose value differs between two fingerprints.

    A fingerprint written before keys were flattened (a nested JSON object) is flattened first; keys
    present on one side only are shown as ``(absent)``.
    """
    def load(s: str) -> dict[str, Any]:
        try:
            d = json.loads(s)
        except (TypeError, ValueError):
            return {}
        return {k: v for k, v in flatten(d).items() if not _volatile(k)} if isinstance(d, dict) else {}

    a, b = load(stored), load(current)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
        if va != vb:
            out.append(f"{k}: {_show(va)} -> {_show(vb)}")
    return out


def same_run(stored: str, current: str, ignored: Iterable[str] = ()) -> bool:
    """Do two fingerprints describe the same run? Knobs the method ignores never count."""
    drop = {k for knob in ignored for k in (knob, f"method.{knob}")}
    return not [d for d in differences(stored, current) if d.split(":", 1)[0] not in drop]


def _show(v: Any) -> str:
    return "(absent)" if v is _MISSING else json.dumps(v)


def _fmt(v: Any) -> str:
    """A value as it reads in a folder name (Hydra's spelling: true/false/null, lists without spaces)."""
    if isinstance(v, bool):
        text = "true" if v else "false"
    elif v is None:
        text = "null"
    elif isinstance(v, (list, dict)):
        text = json.dumps(v, separators=(",", ":")).replace('"', "")
    else:
        text = str(v)
    return text.replace("/", "%2F")


def differing(cfg: DictConfig, baseline: DictConfig, group_items: Iterable[str] = (),
              ignored: Iterable[str] = ()) -> str:
    """The folder level naming how ``cfg`` differs from ``baseline`` (both composed with the same groups).

    A key counts when its resolved value differs *and* its unresolved value differs, so a key that only
    follows an interpolation (``method.seed: ${seed}``, ``method.epochs: ${epochs}``) is not repeated.
    """
    eff, base = effective(cfg, ignored), effective(baseline, ignored)
    raw = flatten(OmegaConf.to_container(cfg, resolve=False, enum_to_str=True))
    raw_base = flatten(OmegaConf.to_container(baseline, resolve=False, enum_to_str=True))
    items = list(group_items)
    for k in sorted(set(eff) | set(base)):
        if k in PATH_KEYS or k.split(".")[-1] in ("name", "tag") and k.count(".") == 1:
            continue
        if eff.get(k, _MISSING) == base.get(k, _MISSING):
            continue
        if k in raw and k in raw_base and raw[k] == raw_base[k]:
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


def run_dir(cfg: DictConfig, level: str) -> Path:
    """``<out_root>/<name>/<dataset>/<model>/<method tag>/<level>/seed<k>`` (an empty level is left out)."""
    parts = [str(cfg.out_root), str(cfg.name), str(cfg.dataset.name), str(cfg.model.name), str(cfg.method.tag)]
    if level:
        parts.append(level)
    return Path(*parts, f"seed{cfg.seed}")


def from_hydra(cfg: DictConfig, ignored: Iterable[str] = ()) -> tuple[Path, str]:
    """Inside a Hydra task: the run folder and its difference level, from the effective config.

    Composes the defaults through the running Hydra (so ``--config-dir`` folders count) and the job's own
    group overrides (``method=sr``, ``+experiment=li2017_mnist``, ``optim=sgd``).
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hc = HydraConfig.get()
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    parsed = OverridesParser.create().parse_overrides(task_overrides(hc))
    groups = [o for o in parsed if o.key_or_group in choices]
    path_lines = [o.input_line for o in groups if o.key_or_group in PATH_GROUPS]
    all_lines = [o.input_line for o in groups]
    items: list[str] = []
    if len(all_lines) > len(path_lines):  # other groups chosen on the command line: are they defaults?
        defaults = compose(config_name=hc.job.config_name, overrides=path_lines, return_hydra_config=True)
        default_choices = defaults.hydra.runtime.choices
        items = [f"{g}={c}" for g, c in sorted(choices.items())
                 if g not in PATH_GROUPS and c is not None and default_choices.get(g) != c]
    baseline = compose(config_name=hc.job.config_name, overrides=all_lines)
    level = differing(cfg, baseline, items, ignored)
    return run_dir(cfg, level), level
