"""Published numbers (``configs/reference/*.yaml``) matched to table cells by run keys.

A reference file mirrors the paper's table: ``columns`` name what each printed column stands for in
run keys (dataset, model), each of ``rows`` gives its run keys (method, bits, ...) and one value per
column id. A value is a number or ``{mean: x, std: y}``. Keys a row or column does not give match
anything; among several matching rows the first one wins, so list the variant qexp's default config
reproduces first. Example::

    title: Li et al. 2017, Table 1
    metric: test_error            # test_error | best_test_error | test_acc, in percent
    columns:
      c10_resnet56: {dataset: cifar10, model: resnet56}
    rows:
      - {method: float, bits: 32, c10_resnet56: 6.62}
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from qexp.errors import QexpError

REF_METRICS = ("test_error", "best_test_error", "test_acc")
#: our datasets that stand in for a published one (same images, another encoding): compared with the
#: paper's numbers for that dataset, always with this note
STAND_INS = {"cifar10_jpeg": ("cifar10", "cifar10_jpeg is a lossy JPEG copy of CIFAR-10 (mean pixel error "
                                         "5.8/255), not CIFAR-10 itself: absolute errors can differ from the "
                                         "paper's data by about a point")}


def paper_keys(keys: dict[str, str]) -> dict[str, str]:
    """``keys`` with a stand-in dataset replaced by the published dataset it stands in for."""
    d = keys.get("dataset")
    return {**keys, "dataset": STAND_INS[d][0]} if d in STAND_INS else keys


def stand_in_notes(datasets: Iterable[str]) -> list[str]:
    """The note of every stand-in dataset among ``datasets``."""
    return [STAND_INS[d][1] for d in sorted(set(datasets)) if d in STAND_INS]


@dataclass(frozen=True)
class Entry:
    keys: dict[str, str]  # run keys as strings (method, bits, dataset, model, ...)
    value: float
    std: float | None = None


@dataclass
class Reference:
    name: str
    title: str
    metric: str
    entries: list[Entry]
    source: str = ""

    def lookup(self, cell_keys: dict[str, str]) -> Entry | None:
        """The first entry agreeing with every key both sides define (a stand-in dataset as its original)."""
        cell_keys = paper_keys(cell_keys)
        for e in self.entries:
            if all(cell_keys[k] == v for k, v in e.keys.items() if k in cell_keys):
                return e
        return None

    def value_as(self, entry: Entry, metric: str) -> float:
        """The entry in the table's metric: accuracy <-> error convert as 100 - x."""
        if is_acc(metric) != is_acc(self.metric):
            return 100.0 - entry.value
        return entry.value


def is_acc(metric: str) -> bool:
    return metric.endswith("acc")


def is_best(metric: str) -> bool:
    """A best-epoch number (``best_test_error``), not the last epoch's."""
    return metric.startswith("best_")


def default_metric(ref: Reference | None) -> str:
    """A table's metric when ``--metric`` is left out: test error, the best epoch's when the paper
    published a best-epoch number."""
    return "best_test_error" if ref is not None and is_best(ref.metric) else "test_error"


def comparable(ref: Reference, metric: str) -> None:
    """The table's metric must measure what the paper published: accuracy and error convert, but the
    last epoch's number is not the best epoch's (WAGE's logs publish the best)."""
    if metric not in REF_METRICS:
        raise QexpError(f"reference {ref.name!r} holds {ref.metric}; --ref needs --metric "
                        f"{' | '.join(REF_METRICS)}, not {metric!r}")
    if is_best(metric) != is_best(ref.metric):
        raise QexpError(f"reference {ref.name!r} publishes {ref.metric}, another measure than --metric {metric} "
                        f"(the best epoch's, not the last one's, or the other way round): use --metric "
                        f"{ref.metric}, or leave --metric out")


def available() -> list[str]:
    root = resources.files("qexp.configs") / "reference"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of one shipped in configs/reference/."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.stem if p.suffix == ".yaml" else p.name
    shipped = resources.files("qexp.configs") / "reference" / f"{stem}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    raise QexpError(f"reference {name_or_path!r} not found: give a YAML file or one of "
                    f"{', '.join(available()) or '(none shipped)'}")


def _label(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v)


def load(name_or_path: str) -> Reference:
    import yaml

    path = resolve(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:  # the parser's message spans lines (the text and a caret): its position only
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise QexpError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or type(e).__name__})") \
            from None
    bad = f"{path}: a reference file needs 'metric', 'columns' (id -> keys) and 'rows' (list)"
    if not isinstance(doc, dict) or not isinstance(doc.get("columns"), dict) \
            or not isinstance(doc.get("rows"), list):
        raise QexpError(bad)
    metric = doc.get("metric", "test_error")
    if metric not in REF_METRICS:
        raise QexpError(f"{path}: metric must be one of {', '.join(REF_METRICS)}, not {metric!r}")
    columns: dict[str, dict[str, Any]] = doc["columns"]
    entries = []
    for i, row in enumerate(doc["rows"]):
        if not isinstance(row, dict):
            raise QexpError(f"{path}: rows[{i}] is not a mapping")
        keys = {k: _label(v) for k, v in row.items() if k not in columns}
        for col_id, col_keys in columns.items():
            if row.get(col_id) is None:
                continue
            v = row[col_id]
            mean, std = (v.get("mean"), v.get("std")) if isinstance(v, dict) else (v, None)
            try:
                mean = float(mean)
                std = None if std is None else float(std)
            except (TypeError, ValueError):
                raise QexpError(f"{path}: rows[{i}].{col_id} must be a number or {{mean, std}}") from None
            entries.append(Entry({**keys, **{k: _label(x) for k, x in (col_keys or {}).items()}}, mean, std))
    return Reference(name=path.stem, title=str(doc.get("title", path.stem)), metric=metric,
                     entries=entries, source=str(doc.get("source", "")))
