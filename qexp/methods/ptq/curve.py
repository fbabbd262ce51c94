"""``qexp eval RUN_DIR --ptq-bits 8,6,4,3,2``: post-training quantization of a finished run.

For each k, the run's model is copied and quantized as ``method=ptq bits=k`` does (see
:mod:`qexp.methods.ptq`): once with k-bit weights only, once with k-bit weights and ``act_bits``-bit
activations calibrated on training batches. The results go to ``RUN_DIR/ptq.json``::

    {"dataset": "mnist", "model": "lenet5", "method": "float", "run_bits": 32,
     "scheme": "affine-minmax-per-layer",               # weights: --ptq-per-channel, --ptq-grid
     "act_scheme": "affine-minmax-per-tensor",          # activations: --ptq-grid, --ptq-calib
     "calib_batches": 8,
     "checkpoint": "checkpoint.pt",       # the checkpoint analysed, 16 hex digits of its sha1, its
     "checkpoint_sha1": "9f2c...",        # size and mtime_ns, and its epochs: qexp table leaves out a
     "checkpoint_stat": [2331000, 17...], # file whose checkpoint has changed since (the run trained on)
     "epoch": 3,
     "float_test_error": 1.23,            # the run's network as trained, evaluated now (percent)
     "float32_bytes": 1724040,            # its parameters as float32
     "results": [                          # sorted by bits, high to low; one entry per (bits, act_bits)
       {"bits": 8, "act_bits": 8,
        "weights_only_error": 1.24, "with_activations_error": 1.25,   # test error, percent
        "weights_only_drop": 0.01, "with_activations_drop": 0.02,     # minus float_test_error
        "bytes": 433194, "packed_bytes": 433194,                      # parameter memory, quantized
        "layers": [{"name": "features.0", "weight_sqnr_db": 48.1,     # per layer: SQNR (dB) of the
                    "input_sqnr_db": 41.7}, ...]}, ...]}              #  weight and of its input

A later call with the same scheme, calibration batches and checkpoint merges its entries into the file
(same ``bits`` and ``act_bits``: replaced); a call with other options, or after the checkpoint changed,
starts the file afresh, so one file never mixes results made otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torch import nn

from qexp.errors import QexpError, check_range
from qexp.jsonio import file_sha1, write_json
from qexp.methods.base import Evaluate
from qexp.methods.ptq import affine
from qexp.methods.ptq.method import (
    DEFAULT_SCHEME,
    Scheme,
    affine_weight_copy,
    calibration_batches,
    quantize_activations,
    weight_memory,
    weight_sqnr,
)
from qexp.run import record

PTQ_FILE = record.PTQ_FILE
#: header keys that describe how the entries were made: entries made otherwise are not merged with them
#: (a file from before a key was written holds its default; one without the checkpoint's digest is
#: never merged: what it analysed cannot be told)
SCHEME_KEYS = ("scheme", "act_scheme", "calib_batches", "checkpoint_sha1")
#: training batches that calibrate the activation ranges unless ``--calib-batches`` says otherwise
DEFAULT_CALIB_BATCHES = 8
DEFAULT_SCHEME_HEADER = {"scheme": DEFAULT_SCHEME.name, "act_scheme": DEFAULT_SCHEME.act_name,
                         "calib_batches": DEFAULT_CALIB_BATCHES}


def parse_bits(text: str) -> list[int]:
    """``"8,6,4"`` -> ``[8, 6, 4]``; each value must be in 2..8 (uint8 codes)."""
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise QexpError(f"--ptq-bits takes comma-separated integers such as 8,6,4,3,2; got {text!r}") \
            from None
    bad = [b for b in bits if not 2 <= b <= 8]
    if not bits or bad:
        raise QexpError(f"--ptq-bits values must be in 2..8; got {text!r}")
    return sorted(set(bits), reverse=True)


def parse_act_bits(text: str) -> int | None:
    """An integer in 2..8, or ``same`` (activations at the weights' k): returns None for ``same``."""
    if text == "same":
        return None
    if not text.isdigit() or not 2 <= int(text) <= 8:
        raise QexpError(f"--ptq-act-bits takes an integer in 2..8 or 'same'; got {text!r}")
    return int(text)


def curve(model: nn.Module, evaluate: Evaluate, train_loader: Any, bits: list[int], act_bits: int | None = 8,
          calib_batches: int = 8, base: dict[str, float] | None = None, share: tuple[object, ...] = (),
          scheme: Scheme = DEFAULT_SCHEME) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The float result and one entry per k (see the module docstring); ``act_bits=None`` means k.

    ``base``: the model's float result when the caller has it already (saves one evaluation);
    ``share``: objects the copies reference instead of copying (the run's method and data);
    ``scheme``: per-layer or per-channel weights, grid, activation calibration.
    """
    base = evaluate(model) if base is None else base
    rows = []
    for k in bits:
        a = k if act_bits is None else act_bits
        wq, codes = affine_weight_copy(model, k, share, scheme)
        w_only = evaluate(wq)["error"]
        sqnr = weight_sqnr(model, codes)
        acts = quantize_activations(wq, a, calibration_batches(train_loader, calib_batches), scheme)
        w_act = evaluate(wq)["error"]
        mem = weight_memory(model, k, codes)
        layers = [{"name": n, "weight_sqnr_db": sqnr.get(n), "input_sqnr_db": acts[n].sqnr_db if n in acts else None}
                  for n in codes]
        rows.append({"bits": k, "act_bits": a,
                     "weights_only_error": w_only, "with_activations_error": w_act,
                     "weights_only_drop": w_only - base["error"],
                     "with_activations_drop": w_act - base["error"],
                     "bytes": mem["weight_bytes"], "packed_bytes": mem["packed_bytes"], "layers": layers})
    return base, rows


def analysed(checkpoint: Path) -> dict[str, Any]:
    """The header keys naming the checkpoint a curve analysed: its name, 16 hex digits of its sha1, and
    its size and mtime (``qexp table`` hashes it again only when those changed)."""
    st = checkpoint.stat()
    return {"checkpoint": checkpoint.name, "checkpoint_sha1": file_sha1(checkpoint)[:16],
            "checkpoint_stat": [st.st_size, st.st_mtime_ns]}


def write(run_dir: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``rows`` into ``run_dir/ptq.json`` (replacing entries with the same bits and act_bits)."""
    path = Path(run_dir) / PTQ_FILE
    old: list[dict[str, Any]] = []
    prev = record.read_ptq(run_dir)
    if prev is not None:
        same = all(prev.get(k, DEFAULT_SCHEME_HEADER.get(k)) == header.get(k, DEFAULT_SCHEME_HEADER.get(k))
                   for k in SCHEME_KEYS)
        old = [r for r in prev["results"] if isinstance(r, dict)] if same else []  # other options: afresh
    keep = {(r["bits"], r["act_bits"]) for r in rows}
    merged = [r for r in old if (r.get("bits"), r.get("act_bits")) not in keep] + rows
    merged.sort(key=lambda r: (-r["bits"], -r["act_bits"]))
    doc = {**header, "results": merged}
    write_json(path, doc)
    return doc


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ptq-bits", type=parse_bits, default=None, metavar="K,K,...",
                    help="post-training quantization at these weight bits (2..8); writes RUN_DIR/ptq.json "
                         "(printed only with --other-data)")
    ap.add_argument("--ptq-act-bits", type=parse_act_bits, default="8", metavar="N|same",
                    help="activation bits of the with-activations column (default 8; 'same': k)")
    ap.add_argument("--calib-batches", type=int, default=DEFAULT_CALIB_BATCHES,
                    help="training batches used to calibrate activation ranges (default 8)")
    ap.add_argument("--ptq-per-channel", action="store_true",
                    help="one weight range per output channel instead of per layer")
    ap.add_argument("--ptq-grid", choices=affine.GRIDS, default="asymmetric",
                    help="asymmetric (min/max, 2^k levels; default) or symmetric (+-max|x|, 2^k-1 levels)")
    ap.add_argument("--ptq-calib", choices=affine.CALIBRATIONS, default="minmax",
                    help="activation range: running min/max (default), a percentile, or the MSE-optimal clip")
    ap.add_argument("--ptq-percentile", type=float, default=99.99,
                    help="percentile of --ptq-calib percentile (default 99.99)")


def check(method_name: str, args: argparse.Namespace) -> None:
    """Before anything is loaded (a bad value once failed only after a whole test-set evaluation, or was
    ignored without ``--ptq-bits``): the curve's options, and ``--ptq-bits`` with ``--best`` (the curve is of
    the last checkpoint)."""
    check_range("--calib-batches", args.calib_batches, 1)
    Scheme(args.ptq_per_channel, args.ptq_grid, args.ptq_calib, args.ptq_percentile)  # checks its values
    if args.ptq_bits and getattr(args, "best", False):
        raise QexpError("--best evaluates best.pt only; --ptq-bits and --integer analyse the last checkpoint")


def run(loaded: Any, args: argparse.Namespace, base: dict[str, float] | None = None) -> dict[str, Any] | None:
    """``qexp eval`` entry: do nothing unless ``--ptq-bits`` was given; else write and print the curve.

    ``base``: the run's plain evaluation, already computed by ``qexp eval``.
    """
    if args.ptq_bits is None:
        return None
    bits, act_bits = args.ptq_bits, args.ptq_act_bits
    scheme = Scheme(args.ptq_per_channel, args.ptq_grid, args.ptq_calib, args.ptq_percentile)
    model, cfg = loaded.built.model, loaded.cfg
    data = loaded.built.data
    base, rows = curve(model, loaded.evaluate, data.train, bits, act_bits, args.calib_batches, base,
                       share=(loaded.built.method, data), scheme=scheme)
    header = {"dataset": cfg.dataset.name, "model": cfg.model.name, "method": cfg.method.name,
              "run_bits": loaded.built.method.bits, "scheme": scheme.name, "act_scheme": scheme.act_name,
              "calib_batches": args.calib_batches,
              **analysed(loaded.run_dir / loaded.checkpoint_name), "epoch": loaded.epoch,
              "float_test_error": base["error"], "float32_bytes": weight_memory(model, 8)["float32_bytes"]}
    # print first: minutes of evaluation must not be lost to a read-only run folder
    print(f"post-training quantization of {loaded.run_dir} (as trained: test error {base['error']:.2f}%)")
    print(f"  {'bits':>4}  {'act':>3}  {'weights only':>12}  {'+ activations':>13}  {'bytes':>10}")
    for r in rows:
        print(f"  {r['bits']:>4}  {r['act_bits']:>3}  {r['weights_only_error']:>11.2f}%  "
              f"{r['with_activations_error']:>12.2f}%  {r['bytes']:>10}", flush=True)
    if getattr(args, "other_data", False):  # ptq.json holds results on the run's own data (qexp table)
        print(f"  not written to {loaded.run_dir / PTQ_FILE}: measured on other data (--other-data)")
        return {**header, "results": rows}
    try:
        doc = write(loaded.run_dir, header, rows)
    except OSError as e:
        raise QexpError(f"the results above were not saved: cannot write {loaded.run_dir / PTQ_FILE} "
                        f"({e.strerror or e})") from None
    print(f"  float32: {header['float32_bytes']} bytes; written to {loaded.run_dir / PTQ_FILE}")
    return doc
