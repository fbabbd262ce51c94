"""Contracts that hold for every method option, every experiment preset and every module (timm style):

- every ``configs/method/*.yaml`` passes :func:`qexp.testing.check_method` (trains, stops and resumes
  bit-identically, valid quant.json, state_dict round trip, export or a one-line refusal);
- a shipped method's name and default bits are the ones its YAML writes (and only there);
- every ``configs/experiment/*.yaml`` is built (data, model, method, optimizer, schedule) and runs a
  forward pass, with its dataset swapped for synthetic images of the same shape;
- the import graph of ``qexp`` has no cycle, and ``qexp/report`` never imports the training engine.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from qexp.methods.base import registered_methods
from qexp.run.session import build
from qexp.testing import check_method
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("option", options("method"))
def test_method_passes_the_contract_check(option: str, tmp_path: Path) -> None:
    """qexp.testing.check_method: trains through `qexp train`'s entry point, stop + resume bit-identical,
    manifest records valid, state_dict round trip, export done or refused in one line."""
    report = check_method(option, workdir=tmp_path)
    assert report.passed == ["train", "resume", "manifest", "state_dict", "export"]
    assert report.option == option


@pytest.mark.parametrize("option", options("method"))
def test_method_name_and_default_bits_are_the_yaml_ones(option: str) -> None:
    """The YAML is the one place they are written: the class reads them (no assignment in its body)."""
    doc = OmegaConf.load(CONFIGS / "method" / f"{option}.yaml")
    target = doc.method._target_
    module, _, attr = target.rpartition(".")
    cls = getattr(__import__(module, fromlist=[attr]), attr)
    assert cls in registered_methods()
    assert (cls.name, cls.default_bits) == (doc.method.name, doc.bits)
    source = Path(__import__(cls.__module__, fromlist=["_"]).__file__).read_text()
    body = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    assigned = {t.id for n in body.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    assert not assigned & {"name", "default_bits"}, (
        f"{cls.__name__} repeats name/default_bits: they come from configs/method/{option}.yaml")


def test_a_class_that_repeats_its_yaml_name_or_default_bits_is_refused() -> None:
    """One naming rule for shipped and plug-in methods: name and default bits live in the YAML only."""
    from qexp.methods.base import Method

    for attr in ("name", "default_bits"):
        with pytest.raises(TypeError, match=f"sets {attr}: a method's name and default bits come from its YAML"):
            type("Repeats", (Method,), {attr: "x" if attr == "name" else 2})


def test_a_config_dir_names_its_methods_and_may_not_rename_a_shipped_one(tmp_path: Path) -> None:
    from qexp.errors import QexpError
    from qexp.methods.base import register_config_dir
    from qexp.methods.float import Float

    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "my_float.yaml").write_text(
        "method:\n  _target_: qexp.methods.float.Float\n  name: float\n  bits: ${bits}\nbits: 32\n")
    assert register_config_dir(tmp_path) == {Float: {"option": "my_float", "name": "float", "default_bits": 32}}
    (tmp_path / "method" / "my_float.yaml").write_text(
        "method:\n  _target_: qexp.methods.float.Float\n  name: myfloat\n  bits: ${bits}\nbits: 32\n")
    with pytest.raises(QexpError, match="Float has name=float bits=32 in float.yaml; a second YAML may not rename"):
        register_config_dir(tmp_path)
    assert Float.name == "float"


#: synthetic images shaped like each preset's dataset
SHAPES = {"mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32)}


@pytest.mark.parametrize("preset", options("experiment"))
def test_experiment_preset_builds_and_runs_a_forward_pass(preset: str) -> None:
    """The preset as composed (model, method, optimizer, schedule, epochs), with its dataset node swapped
    for synthetic images of the same shape, normalisation and augmentation: build() and one forward."""
    cfg = compose_train([f"+experiment={preset}", "batch_size=16", "eval_batch_size=16", "progress=false"])
    channels, size = SHAPES[cfg.dataset.name]
    data = OmegaConf.load(CONFIGS / "dataset" / "synthetic.yaml")
    data.update(channels=channels, image_size=size, num_classes=cfg.dataset.get("num_classes", 10),
                train_samples=32, test_samples=16, normalize=cfg.dataset.normalize,
                augment=cfg.dataset.augment, val_size=16 if cfg.dataset.get("val_size") else 0)
    with open_dict(cfg):
        cfg.dataset = data
    torch.manual_seed(0)
    b = build(cfg, CPU)
    assert b.method.name == cfg.method.name and b.optimizer.param_groups
    x, y = next(iter(b.data.train))
    b.model.eval()
    with torch.no_grad():
        assert b.model(x).shape == (len(y), b.data.num_classes)


# ---- import graph ----------------------------------------------------------------------------------
def _import_graph(module_level: bool) -> dict[str, set[str]]:
    """qexp module -> the qexp modules it imports: everywhere (inside functions too), or only the
    imports executed when the module is imported (``module_level``: a cycle there breaks ``import``)."""
    graph: dict[str, set[str]] = {}
    for path in (REPO / "qexp").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        nodes = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test))] \
            if module_level else ast.walk(tree)
        deps = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _imports() -> dict[str, set[str]]:
    return _import_graph(module_level=False)


def _module_level_imports() -> dict[str, set[str]]:
    return _import_graph(module_level=True)


def test_import_graph_has_no_cycle() -> None:
    graph = _module_level_imports()
    # a package's own __init__ importing its submodules is the usual re-export, not a cycle
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_report_never_imports_the_training_run() -> None:
    """report/ reads what runs wrote (qexp.run.record's schema); the engine and the entry point are
    training internals."""
    graph = _imports()
    internals = {"qexp.run.engine", "qexp.run.train", "qexp.run.session", "qexp.run.callbacks", "qexp.run.distributed"}
    for m, deps in graph.items():
        if m.startswith("qexp.report"):
            assert not deps & internals, f"{m} imports {sorted(deps & internals)}"


def test_models_import_no_quantization() -> None:
    """Models are plain float modules: qexp.models imports nothing from quant/ or methods/."""
    for m, deps in _imports().items():
        if m.startswith("qexp.models"):
            assert not {d for d in deps if d.startswith(("qexp.quant", "qexp.methods"))}, m
