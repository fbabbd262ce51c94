"""``qexp eval RUN_DIR --integer``: integer-only inference of a trained run, checked against its
fake-quantized float evaluation.

Exports the run's network with :mod:`qexp.methods.wage.integer` (int8 weights and activations, power-of-two
scales, int32/int64 accumulation, shifts for rescaling), runs the test set through it on the CPU, and
compares every prediction (and every logit) with the float forward of the same fake-quantized model.
For WAGE every value is a small integer times a power of two, so the two must agree exactly.
Writes ``integer_eval.json`` and the exported tensors ``integer_model.pt`` into the run folder.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from qexp.errors import QexpError
from qexp.jsonio import write_json, write_torch
from qexp.methods.wage.integer import export

RESULT = "integer_eval.json"
EXPORT = "integer_model.pt"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--integer", action="store_true",
                    help="export to int8 tensors with power-of-two scales and evaluate in integer arithmetic "
                         f"only; compares with the fake-quantized evaluation and writes {RESULT}")


def compare(model: torch.nn.Module, loader: Any, limit: int | None = None) -> tuple[dict[str, Any], Any]:
    """Integer vs fake-quantized float forward over ``loader`` (at most ``limit`` images)."""
    was_training = model.training
    model.eval()
    net = None
    n = correct_int = correct_float = differ = logit_mismatch = 0
    try:
        for x, y in loader:
            if limit is not None and n >= limit:
                break
            if limit is not None:
                x, y = x[: limit - n], y[: limit - n]
            if net is None:
                net = export(model, x[:2])
            with torch.no_grad():
                ref = model(x).double().cpu()
            codes, e = net.forward(x)
            logits = codes.double() * 2.0**e
            y = y.cpu()
            p_int, p_float = codes.argmax(1), ref.argmax(1)
            correct_int += int((p_int == y).sum())
            correct_float += int((p_float == y).sum())
            differ += int((p_int != p_float).sum())
            logit_mismatch += int((logits != ref).any(1).sum())
            n += len(y)
    finally:
        model.train(was_training)
    res = {"images": n, "accuracy": 100.0 * correct_int / max(n, 1),
           "test_error": 100.0 - 100.0 * correct_int / max(n, 1),
           "fake_quant_accuracy": 100.0 * correct_float / max(n, 1),
           "differing_predictions": differ, "differing_logit_rows": logit_mismatch,
           "output_exponent": None if net is None else e,
           "weight_bytes_int8": 0 if net is None else net.weight_bytes(),
           "layers": [] if net is None else net.layers}
    return res, net


def run(loaded: Any, args: argparse.Namespace, base: dict[str, float] | None = None) -> dict[str, Any] | None:
    """The ``--integer`` analysis of a loaded run (``qexp.run.evaluate.LoadedRun``); None when not asked."""
    if not getattr(args, "integer", False):
        return None
    res, net = compare(loaded.built.model, loaded.built.data.test)
    print(f"integer inference: accuracy {res['accuracy']:.2f}% on {res['images']} test images "
          f"(fake-quantized float {res['fake_quant_accuracy']:.2f}%), "
          f"{res['differing_predictions']} differing predictions, "
          f"{res['differing_logit_rows']} images with any differing logit", flush=True)
    if getattr(args, "other_data", False):  # the run's files hold results on its own data
        print(f"  not written to {loaded.run_dir / RESULT}: measured on other data (--other-data)")
        return res
    try:
        write_json(loaded.run_dir / RESULT, res)
        if net is not None:
            write_torch(loaded.run_dir / EXPORT, net.state_dict())
    except OSError as e:
        raise QexpError(f"the results above were not saved: cannot write into {loaded.run_dir} "
                        f"({e.strerror or e})") from None
    print(f"  written to {loaded.run_dir / RESULT}")
    return res


def check(method_name: str, args: argparse.Namespace) -> None:
    """Refuse ``--integer`` for a run that is not WAGE (or with ``--best``) before anything is evaluated."""
    if getattr(args, "integer", False) and getattr(args, "best", False):
        raise QexpError("--best evaluates best.pt only; --ptq-bits and --integer analyse the last checkpoint")
    if getattr(args, "integer", False) and method_name != "wage":
        raise QexpError(f"--integer needs a method=wage run (integer-only inference of WAGE's power-of-two "
                        f"formats); this run is method={method_name}")
