"""Number formats as data (qexp.quant.format): the per-tensor record round-trips through JSON, malformed rows
are refused naming the field, every shipped method's manifest on LeNet-5 is made of valid records whose bits
are the method's, and export refuses a format it cannot encode instead of storing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qexp.errors import QexpError
from qexp.quant.format import KINDS, FormatError, LayerFormat, float_format, parse_manifest, symmetric, uniform
from qexp.run.export import build_export, grid_of, plain_state_dict
from qexp.run.train import build
from tests.conftest import compose_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("one_thread")

#: one record of every kind
EXAMPLES = {
    "float": float_format("fc", bits=16),
    "uniform": uniform("fc", 8, [0.5, 0.25], 0, 255, offset=[-1.0, -2.0], tensor="input"),
    "binary": symmetric("conv", 1, 0.125, rounding="stochastic"),
    "ternary": symmetric("conv", 2, 0.5),
    "power_of_two": LayerFormat("conv", "weight", "power_of_two", 3, "nearest", signed=True,
                                levels=(-0.5, -0.125, 0.0, 0.125, 0.25)),
    "grid": LayerFormat("relu", "activation", "grid", 2, "nearest", signed=False, levels=(0.0, 0.3, 1.1, 2.0)),
}


def test_every_kind_round_trips_through_json():
    assert set(EXAMPLES) == set(KINDS)
    for kind, fmt in EXAMPLES.items():
        doc = json.loads(json.dumps(fmt.to_json()))
        assert doc["kind"] == kind and LayerFormat.from_json(doc) == fmt
        # descriptive keys beside the record are ignored by the reader
        assert LayerFormat.from_json({**doc, "shape": [3, 3], "sqnr_db": 20.0}) == fmt


def test_symmetric_grid_codes_match_the_bits():
    for bits in range(1, 9):
        f = symmetric("w", bits, 0.1)
        lo, hi = f.code_range
        used = 2 if f.kind == "binary" else hi - lo + 1  # binary: codes -1 and +1, no 0
        assert used <= 2**bits and lo == -hi and f.signed and (f.kind == "binary") == (bits == 1)


@pytest.mark.parametrize("change,field", [
    ({"kind": "ternery"}, "kind"), ({"tensor": "bias"}, "tensor"), ({"bits": "4"}, "bits"),
    ({"bits": 4}, "bits"),  # a ternary format is 2 bits
    ({"step": -0.5}, "step"), ({"step": None}, "step"), ({"rounding": "truncate"}, "rounding"),
    ({"code_range": [1, -1]}, "code_range"), ({"signed": False}, "signed"), ({"levels": [0.0, 1.0]}, "levels"),
])
def test_malformed_rows_are_refused_naming_the_field(change, field):
    row = {**symmetric("features.0", 2, 0.5).to_json(), **change}
    with pytest.raises(FormatError, match=f"layers\\[3\\] \\(features.0\\): field '{field}'"):
        LayerFormat.from_json(row, "layers[3]")


def test_missing_fields_and_bad_levels_are_refused():
    for key in ("name", "tensor", "kind", "bits"):
        row = symmetric("fc", 3, 0.25).to_json()
        del row[key]
        with pytest.raises(FormatError, match=f"field '{key}' is missing"):
            LayerFormat.from_json(row)
    with pytest.raises(FormatError, match="powers of two"):
        LayerFormat("c", "weight", "power_of_two", 3, "nearest", levels=(-0.3, 0.0, 0.5))
    with pytest.raises(FormatError, match="more than 1 bits"):
        LayerFormat("c", "weight", "grid", 1, "nearest", levels=(-1.0, 0.0, 1.0))
    with pytest.raises(FormatError, match="'layers' must be a list"):
        parse_manifest({"method": "x"})


def _built(option: str):
    model = ["model=lenet5", "model.bn=false", "model.bias=false"] if option == "wage" else \
        ["model=lenet5", "model.bn=true"]
    cfg = compose_train([f"method={option}", "dataset=synthetic", "dataset.train_samples=64",
                         "dataset.test_samples=16", "batch_size=16", "epochs=1", "progress=false", *model])
    torch.manual_seed(0)
    return build(cfg, torch.device("cpu"))


@pytest.mark.parametrize("option", METHODS)
def test_every_method_manifest_is_valid_records_at_its_bits(option: str):
    b = _built(option)
    m = b.method
    x = next(iter(b.data.train))[0]
    b.model.train()
    b.model(x)  # calibrates activation quantizers (STE, learned)
    b.model.eval()
    model = m.deployable_copy(b.model) or b.model  # PTQ: the deployed k-bit copy
    formats = parse_manifest(json.loads(json.dumps(m.manifest(b.model))))
    weights = [f for f in formats if f.tensor == "weight" and f.quantized]
    layers = [n for n, mod in model.named_modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))]
    # (WAGE wraps the network: its layers are named inside the wrapper)
    assert all(any(n == f.name or n.endswith(f".{f.name}") for n in layers)
               for f in formats if f.tensor in ("weight", "input")), option
    if option == "float":
        assert formats == []
        return
    wbits = getattr(getattr(m, "inner", None), "bits", None) if option == "ste" else m.bits
    if option == "learned":  # per-layer allocation: spends the budget exactly
        assert sum(f.bits for f in weights) == m.bits * len(weights) and weights
    elif wbits is not None:
        allowed = {wbits, getattr(m, "first_last_bits", wbits)}
        assert weights and {f.bits for f in weights} <= allowed, (option, [f.bits for f in weights])
    acts = [f for f in formats if f.tensor != "weight" and f.quantized]
    abits = {"ste": m.bits, "dorefa": getattr(m, "abits", None), "pact": getattr(m, "abits", None),
             "lsq": getattr(m, "abits", None), "wage": getattr(m, "bits_a", None)}.get(option)
    if abits is not None and acts:
        assert {f.bits for f in acts} <= {abits, getattr(m, "first_last_bits", abits)}, option
    for f in weights:  # a uniform weight is on its grid: every evaluated value decodes from an integer code
        w = next(mod for n, mod in model.named_modules() if n == f.name or n.endswith(f".{f.name}"))
        w = w.weight.detach().float()
        if f.kind in ("binary", "ternary", "uniform") and not f.per_channel and option != "dorefa":
            k = (w - float(f.offset)) / float(f.step)
            assert torch.equal(k, k.round()) or (k - k.round()).abs().max() < 1e-4, (option, f.name)
            lo, hi = f.code_range
            assert lo - 1e-4 <= float(k.min()) and float(k.max()) <= hi + 1e-4, (option, f.name)


def test_export_refuses_a_format_it_cannot_encode():
    b = _built("bc")
    manifest = b.method.manifest(b.model)
    row = manifest["layers"][0]
    levels = {k: v for k, v in row.items() if k not in ("step", "offset", "code_range")}
    manifest["layers"][0] = {**levels, "kind": "power_of_two", "bits": 3, "levels": [-0.5, 0.0, 0.25, 0.5],
                             "signed": True}
    with pytest.raises(QexpError, match="power_of_two 3-bit format is a level set"):
        grid_of(LayerFormat.from_json(manifest["layers"][0]))
    float_keys = set(plain_state_dict(b.model))
    with pytest.raises(QexpError, match="cannot store as codes"):
        build_export(b.model, manifest, float_keys, eval_float_weights=False)
    manifest["layers"][0] = {"name": "features.0", "bits": 1, "step": 0.1}  # a row of the old, untyped kind
    with pytest.raises(QexpError, match="field 'tensor' is missing"):
        build_export(b.model, manifest, float_keys, eval_float_weights=False)
