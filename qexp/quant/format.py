"""Number formats as data: one typed record per quantized tensor (a row of quant.json's ``layers``).

Every method's ``manifest(model)`` describes each tensor it quantizes (or deliberately keeps float) with a
:class:`LayerFormat`; export, ONNX export, the contract check and reports read these records, never the
method's other keys. A row is the record's fields plus any descriptive keys the method adds (``shape``,
``params``, ``sqnr_db`` ...), which readers of the format ignore.

Kinds and what a value of the tensor is (``code`` an integer in ``code_range``):

- ``float``: not quantized (``bits`` 16 or 32; no grid fields).
- ``uniform``: ``offset + code * step``; ``step``/``offset`` a number (per tensor) or a list (per output
  channel). Symmetric grids have ``offset`` 0.
- ``binary``: ``code * step`` with code in {-1, +1} (1 bit).
- ``ternary``: ``code * step`` with code in {-1, 0, +1} (2 bits).
- ``power_of_two``: one of ``levels``, whose non-zero magnitudes are the smallest one times powers of two.
- ``grid``: one of ``levels`` (any non-uniform level set of at most ``2^bits`` values).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from qexp.errors import QexpError

#: which tensor of the layer the format applies to: its weight, its input (a pre-hook), an activation
#: module's output (a quantized ReLU), or the backward pass's gradient / error (training only)
TENSORS = ("weight", "input", "activation", "gradient", "error")
KINDS = ("float", "uniform", "binary", "ternary", "power_of_two", "grid")
#: how values reach the grid: nearest (ties to even, as torch.round), stochastic (unbiased, seeded), ceil
#: (STE's staircase); float tensors have none
ROUNDINGS = ("nearest", "stochastic", "ceil")
#: the manifest keys that hold lists of records
RECORD_LISTS = ("layers", "activations")

Number = float | tuple[float, ...]


class FormatError(QexpError):
    """A manifest row that is not a valid :class:`LayerFormat` (the message names the row and field)."""


@dataclass(frozen=True)
class LayerFormat:
    """How one tensor is stored: ``kind`` and ``bits`` always; the grid fields its kind needs."""

    name: str  # module path (``features.0``)
    tensor: str  # one of TENSORS
    kind: str  # one of KINDS
    bits: int  # storage width per value (float: 16 or 32)
    rounding: str | None = None  # one of ROUNDINGS; None for float
    step: Number | None = None  # uniform/binary/ternary: the value of code 1 (per output channel: a tuple)
    offset: Number = 0.0  # uniform: the value of code 0 (affine grids; a tuple per output channel)
    code_range: tuple[int, int] | None = None  # uniform/binary/ternary: the smallest and largest code
    signed: bool = True  # whether the codes (or levels) take negative values
    levels: tuple[float, ...] | None = None  # power_of_two/grid: the level set, ascending

    def __post_init__(self) -> None:
        validate(self)

    @property
    def quantized(self) -> bool:
        return self.kind != "float"

    @property
    def per_channel(self) -> bool:
        return isinstance(self.step, tuple)

    @property
    def integer_codes(self) -> bool:
        """Whether values are ``offset + code * step`` for integer codes (what ``qexp export`` stores)."""
        return self.kind in ("uniform", "binary", "ternary")

    def to_json(self) -> dict[str, Any]:
        """The row's format fields, JSON-ready (tuples as lists; fields the kind does not use left out)."""
        out: dict[str, Any] = {}
        for k, v in asdict(self).items():
            if v is None or (k == "offset" and not self.integer_codes) or (k == "signed" and not self.quantized):
                continue
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, row: Any, where: str = "row") -> LayerFormat:
        """The record of one manifest row (extra descriptive keys ignored); :class:`FormatError` naming
        ``where`` and the field when the row is malformed."""
        if not isinstance(row, dict):
            raise FormatError(f"{where}: a layer row must be a JSON object, got {type(row).__name__}")
        label = f"{where} ({row['name']})" if isinstance(row.get("name"), str) else where
        for k in ("name", "tensor", "kind", "bits"):
            if k not in row:
                raise FormatError(f"{label}: field '{k}' is missing (every row has name, tensor, kind, bits)")
        known = {f.name for f in fields(cls)}
        values = {k: _tupled(v) for k, v in row.items() if k in known}
        try:
            return cls(**values)
        except FormatError as e:
            raise FormatError(f"{label}: {e}") from None


def _tupled(v: Any) -> Any:
    return tuple(_tupled(x) for x in v) if isinstance(v, list) else v


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(field: str, why: str) -> FormatError:
    return FormatError(f"field '{field}' {why}")


def validate(f: LayerFormat) -> None:
    """Raise :class:`FormatError` (naming the field) unless ``f`` is a consistent format."""
    if not isinstance(f.name, str) or not f.name:
        raise _bad("name", f"must be a non-empty module path, got {f.name!r}")
    if f.tensor not in TENSORS:
        raise _bad("tensor", f"is {f.tensor!r}; allowed: {', '.join(TENSORS)}")
    if f.kind not in KINDS:
        raise _bad("kind", f"is {f.kind!r}; allowed: {', '.join(KINDS)}")
    if not isinstance(f.bits, int) or isinstance(f.bits, bool):
        raise _bad("bits", f"must be an integer, got {f.bits!r}")
    if not isinstance(f.signed, bool):
        raise _bad("signed", f"must be true or false, got {f.signed!r}")
    if f.kind == "float":
        if f.bits not in (16, 32):
            raise _bad("bits", f"is {f.bits} for a float tensor; allowed: 16, 32")
        for k in ("rounding", "step", "code_range", "levels"):
            if getattr(f, k) is not None:
                raise _bad(k, "is set for a float tensor (kind float has no grid)")
        return
    if not 1 <= f.bits <= 16:
        raise _bad("bits", f"is {f.bits} for a {f.kind} tensor; allowed: 1..16")
    if f.rounding not in ROUNDINGS:
        raise _bad("rounding", f"is {f.rounding!r}; allowed: {', '.join(ROUNDINGS)}")
    if f.integer_codes:
        _check_codes(f)
    else:
        _check_levels(f)


def _numbers(field: str, v: Any, positive: bool) -> list[float]:
    vals = list(v) if isinstance(v, tuple) else [v]
    if not vals or not all(_real(x) for x in vals):
        raise _bad(field, f"must be a finite number or a non-empty list of them, got {v!r}")
    if positive and not all(x > 0 for x in vals):
        raise _bad(field, f"must be > 0, got {v!r}")
    return vals


def _check_codes(f: LayerFormat) -> None:
    if f.levels is not None:
        raise _bad("levels", f"is set for a {f.kind} tensor (its values are offset + code * step)")
    if f.step is None:
        raise _bad("step", f"is missing (a {f.kind} tensor's values are offset + code * step)")
    steps = _numbers("step", f.step, positive=True)
    offsets = _numbers("offset", f.offset, positive=False)
    if isinstance(f.offset, tuple) and len(offsets) != len(steps):
        raise _bad("offset", f"has {len(offsets)} channel(s), step has {len(steps)}")
    if f.kind != "uniform" and any(offsets):
        raise _bad("offset", f"must be 0 for a {f.kind} tensor, got {f.offset!r}")
    r = f.code_range
    if (not isinstance(r, tuple) or len(r) != 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in r)
            or r[0] >= r[1]):
        raise _bad("code_range", f"must be [lowest, highest] integer codes, lowest < highest, got {r!r}")
    if f.kind == "binary" and (f.bits != 1 or r != (-1, 1)):
        raise _bad("bits" if f.bits != 1 else "code_range", "of a binary tensor must be 1 bit, codes [-1, 1]")
    if f.kind == "ternary" and (f.bits != 2 or r != (-1, 1)):
        raise _bad("bits" if f.bits != 2 else "code_range", "of a ternary tensor must be 2 bits, codes [-1, 1]")
    if r[1] - r[0] + 1 > 1 << f.bits and f.kind == "uniform":
        raise _bad("code_range", f"{list(r)} holds {r[1] - r[0] + 1} codes, more than {f.bits} bits can store")
    if f.signed != (r[0] < 0):
        raise _bad("signed", f"is {f.signed} but code_range is {list(r)}")


def _check_levels(f: LayerFormat) -> None:
    if f.step is not None or f.code_range is not None:
        raise _bad("step" if f.step is not None else "code_range", f"is set for a {f.kind} tensor (it lists levels)")
    if not isinstance(f.levels, tuple):
        raise _bad("levels", f"is missing: a {f.kind} tensor lists its level set")
    vals = _numbers("levels", f.levels, positive=False)
    if vals != sorted(set(vals)):
        raise _bad("levels", "must be distinct and ascending")
    if len(vals) > 1 << f.bits:
        raise _bad("levels", f"has {len(vals)} values, more than {f.bits} bits can index")
    if f.signed != (vals[0] < 0):
        raise _bad("signed", f"is {f.signed} but the lowest level is {vals[0]}")
    if f.kind == "power_of_two":
        mags = [abs(v) for v in vals if v]
        if mags and not all(math.log2(m / min(mags)).is_integer() for m in mags):
            raise _bad("levels", "of a power_of_two tensor must be one magnitude times powers of two")


def records(manifest: Any) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the manifest's record lists (``layers``, ``activations``)."""
    if not isinstance(manifest, dict):
        raise FormatError(f"a manifest must be a JSON object, got {type(manifest).__name__}")
    if not isinstance(manifest.get("layers"), list):
        raise FormatError("manifest field 'layers' must be a list of layer rows")
    for key in RECORD_LISTS:
        rows = manifest.get(key, [])
        if not isinstance(rows, list):
            raise FormatError(f"manifest field '{key}' must be a list of layer rows, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield f"{key}[{i}]", row


def parse_manifest(manifest: Any) -> list[LayerFormat]:
    """Every format record of a manifest (quant.json), validated: the one reader of its rows.
    Raises :class:`FormatError` (one line: which row, which field) on a malformed one."""
    return [LayerFormat.from_json(row, where) for where, row in records(manifest)]


def weight_formats(manifest: Any) -> dict[str, LayerFormat]:
    """The weight records by layer name."""
    return {f.name: f for f in parse_manifest(manifest) if f.tensor == "weight"}


def row(fmt: LayerFormat, **extra: Any) -> dict[str, Any]:
    """A manifest row: the record's fields, then the method's descriptive keys (which must not clash)."""
    base = fmt.to_json()
    clash = sorted(set(base) & set(extra))
    if clash:
        raise ValueError(f"descriptive keys {clash} would overwrite the format of {fmt.name}")
    return {**base, **extra}


# ---- constructors for the common formats ---------------------------------------------------------
def float_format(name: str, tensor: str = "weight", bits: int = 32) -> LayerFormat:
    return LayerFormat(name, tensor, "float", bits)


def symmetric(name: str, bits: int, step: float, rounding: str = "nearest", tensor: str = "weight") -> LayerFormat:
    """qexp's k-bit symmetric grid (:class:`qexp.quant.grid.SymmetricGrid`): codes ``-m..m``, ``m =
    2^(k-1) - 1``; 1 bit is binary ``{-step, +step}``."""
    if bits == 1:
        return LayerFormat(name, tensor, "binary", 1, rounding, float(step), code_range=(-1, 1))
    m = (1 << (bits - 1)) - 1
    kind = "ternary" if bits == 2 else "uniform"
    return LayerFormat(name, tensor, kind, bits, rounding, float(step), code_range=(-m, m))


def uniform(name: str, bits: int, step: float | Sequence[float], lo: int, hi: int,
            offset: float | Sequence[float] = 0.0, rounding: str = "nearest", tensor: str = "weight") -> LayerFormat:
    """``offset + code * step`` for codes ``lo..hi``."""
    def num(v: float | Sequence[float]) -> Number:
        return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)

    return LayerFormat(name, tensor, "uniform", bits, rounding, num(step), num(offset), (int(lo), int(hi)), lo < 0)
