"""The method contract has one caller: under qexp/run and qexp/report only the run session
(qexp/run/session.py) calls Method hooks; the engine, callbacks, data parallelism, eval and export get
plain callables and values from it. Checked by reading the code (an AST scan), and the scan is shown to
catch a planted call."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import qexp
from qexp.methods.base import Layered, Method

ROOT = Path(qexp.__file__).parent
SESSION = ROOT / "run" / "session.py"


def hook_names() -> set[str]:
    """Every hook :class:`Method` declares: its public methods (properties and attributes are values)."""
    return {n for n, v in vars(Method).items() if not n.startswith("_") and inspect.isfunction(v)}


def _receiver_is_method(node: ast.expr) -> bool:
    """``method``, ``self.method``, ``run.built.method``: an object named as the run's method."""
    return (isinstance(node, ast.Name) and node.id == "method") or (
        isinstance(node, ast.Attribute) and node.attr == "method")


def hook_calls(source: str) -> list[tuple[int, str]]:
    """(line, hook) of every call of a hook on a method-named object in ``source``."""
    hooks = hook_names()
    out = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in hooks
                and _receiver_is_method(node.func.value)):
            out.append((node.lineno, node.func.attr))
    return out


def test_the_hook_list_is_the_contract() -> None:
    """The scan looks for the hooks the docs name (a renamed or dropped hook shows up here)."""
    assert {"prepare", "param_groups", "criterion", "before_forward", "extra_loss", "after_backward",
            "after_step", "before_evaluate", "on_epoch_end", "metrics", "images", "finalize", "manifest",
            "bits_label", "compile_ready", "deployable_copy", "state_dict", "load_state_dict"} == hook_names()


def test_the_scan_catches_a_planted_call() -> None:
    planted = ("def f(run, model):\n"
               "    method = run.built.method\n"
               "    model.state_dict()\n"  # not the method: not a hook call
               "    x = method.manifest(model)\n"
               "    run.built.method.before_evaluate(model)\n"
               "    self.method.images\n")  # a reference handed on, not a call
    assert hook_calls(planted) == [(4, "manifest"), (5, "before_evaluate")]


@pytest.mark.parametrize("package", ["run", "report"])
def test_only_the_session_calls_method_hooks(package: str) -> None:
    found = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        if f == SESSION:
            continue
        calls = hook_calls(f.read_text())
        if calls:
            found[str(f.relative_to(ROOT))] = calls
    assert not found, f"Method hooks called outside qexp/run/session.py: {found}"


def test_the_session_calls_every_hook() -> None:
    """Each hook the contract declares has its call in the session (none is left to another module)."""
    text = SESSION.read_text()  # called there, or handed on from there (``b.method.images``)
    assert {h for h in hook_names() if f"method.{h}" not in text} == set()


def test_layered_composes_every_hook() -> None:
    """A hook added to Method is composed by Layered (STE over BinaryConnect) without an edit in ste.py;
    only the outer method's own loss and table label are not the inner method's."""
    own = {"criterion", "bits_label"}
    assert hook_names() - own <= set(vars(Layered)), sorted(hook_names() - own - set(vars(Layered)))
