"""Contracts that hold for every method option, every experiment preset and every module (timm style):

- every ``configs/method/*.yaml`` builds on synthetic data, trains with the engine's ``train_step``, is
  interrupted after two steps and resumes bit-identically, writes a quant.json of the documented schema,
  and round-trips its state_dict;
- a shipped method's name and default bits are the ones its YAML writes (and only there);
- every ``configs/experiment/*.yaml`` is built (data, model, method, optimizer, schedule) and runs a
  forward pass, with its dataset swapped for synthetic images of the same shape;
- the import graph of ``qexp`` has no cycle, and ``qexp/report`` never imports the training engine.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from qexp.methods.base import registered_methods
from qexp.run import checkpoint
from qexp.run.engine import Trainer, evaluate, train_step
from qexp.run.train import build
from tests.conftest import compose_train

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


#: a tiny problem every method can train: a chain MLP without BN, biases or dropout (WAGE's limits),
#: ReLUs (activation methods); batches of 8 synthetic 1x12x12 images (big_sr: 64), 4 steps used
TINY = ["dataset=synthetic", "dataset.image_size=12", "dataset.train_samples=256", "dataset.test_samples=32",
        "batch_size=8", "eval_batch_size=32", "model=mlp", "model.width=32", "model.depth=2", "model.bn=false",
        "model.bias=false", "epochs=2", "progress=false"]


#: methods that refuse a quantized activation without a BatchNorm before it (their clip assumes one)
NEEDS_BN = ("dorefa", "pact")


def _build(option: str, extra: tuple[str, ...] = ()):
    bn = ["model.bn=true"] if option in NEEDS_BN else []
    cfg = compose_train([f"method={option}", *TINY, *bn, *extra])
    torch.manual_seed(cfg.seed)
    return cfg, build(cfg, CPU)


def _trainer(cfg, b) -> Trainer:
    """The engine's checkpoint format (Trainer.state_dict) around a built run; steps are train_step's."""
    return Trainer(b.model, b.method, b.optimizer, b.scheduler, b.data, CPU, cfg.epochs, progress_bar=False)


def _steps(b, batches, start: int, stop: int) -> list[float]:
    b.model.train()
    return [float(train_step(b.model, b.method, b.optimizer, *batches[i], step=i)[0]) for i in range(start, stop)]


def _state(b) -> list[tuple[str, torch.Tensor]]:
    return sorted(b.model.state_dict().items())


@pytest.mark.parametrize("option", options("method"))
def test_method_trains_resumes_bit_identically_and_reports(option: str, tmp_path: Path) -> None:
    cfg, ref = _build(option)
    batches = list(ref.data.train)[:4]
    assert len(batches) == 4
    ref_losses = _steps(ref, batches, 0, 4)
    assert all(torch.isfinite(torch.tensor(ref_losses))), ref_losses

    # interrupted after two steps: the engine's checkpoint, written and read back from disk
    _, first = _build(option)
    assert _steps(first, batches, 0, 2) == ref_losses[:2]
    checkpoint.save(tmp_path / "ckpt.pt", _trainer(cfg, first).state_dict())
    del first
    _, resumed = _build(option)
    _trainer(cfg, resumed).load_state_dict(checkpoint.load(tmp_path / "ckpt.pt"))
    assert _steps(resumed, batches, 2, 4) == ref_losses[2:]
    for (k, v), (k2, v2) in zip(_state(ref), _state(resumed)):
        assert k == k2 and torch.equal(v, v2), f"{option}: {k} differs after resume"
    assert str(resumed.method.state_dict()) == str(ref.method.state_dict())

    # evaluation and the manifest (quant.json) of the documented schema, JSON-serialisable
    res = evaluate(ref.model, ref.method, ref.data.test, CPU)
    assert ref.model.training, "evaluate() must restore the training mode"
    ref.model.eval()
    with torch.no_grad():  # the error is the share of wrong argmax predictions, counted again here
        wrong = sum(int((ref.model(x).argmax(1) != y).sum()) for x, y in ref.data.test)
        n = sum(len(y) for _, y in ref.data.test)
    ref.model.train()
    assert res["error"] == pytest.approx(100.0 * wrong / n) and math.isfinite(res["loss"])
    m = json.loads(json.dumps(ref.method.manifest(ref.model)))
    assert m["method"] == cfg.method.name and m["bits"] == ref.method.bits
    assert isinstance(m["layers"], list) and all("name" in r and "bits" in r for r in m["layers"])
    assert isinstance(m["weight_bytes"], int) and isinstance(m["float32_bytes"], int)
    assert 0 < m["weight_bytes"] <= m["float32_bytes"]
    assert json.dumps(ref.method.manifest(ref.model)) == json.dumps(m), "manifest() changed state"

    # state_dict round trip into a freshly built run: the same function, the same method state
    _, fresh = _build(option)
    fresh.model.load_state_dict(ref.model.state_dict())
    fresh.method.load_state_dict(ref.method.state_dict())
    x = batches[0][0]
    ref.model.eval(), fresh.model.eval()
    with torch.no_grad():
        assert torch.equal(ref.model(x), fresh.model(x))
    assert str(fresh.method.state_dict()) == str(ref.method.state_dict())


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
    internals = {"qexp.run.engine", "qexp.run.train", "qexp.run.callbacks", "qexp.run.distributed"}
    for m, deps in graph.items():
        if m.startswith("qexp.report"):
            assert not deps & internals, f"{m} imports {sorted(deps & internals)}"


def test_models_import_no_quantization() -> None:
    """Models are plain float modules: qexp.models imports nothing from quant/ or methods/."""
    for m, deps in _imports().items():
        if m.startswith("qexp.models"):
            assert not {d for d in deps if d.startswith(("qexp.quant", "qexp.methods"))}, m
