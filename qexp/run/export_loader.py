"""Load a ``qexp export`` folder with plain PyTorch: no qexp needed (``qexp export`` copies this file into
the folder as ``load_export.py``).

    import torch
    from load_export import load_state_dict, read_manifest
    model = MyLeNet5()                         # the float architecture; quant.json's "model" names it
    model.load_state_dict(load_state_dict("outputs/.../export"))

Each quantized layer is stored as integer codes plus a per-layer scale (and offset, for affine grids):
``weight = codes * scale + offset`` in float32, which is bit for bit the weight the run evaluated with.
Every other tensor (biases, BatchNorm, layers kept float) is stored as is.
"""

from __future__ import annotations

import json
import os

import torch

FORMAT = "qexp-export/1"
MANIFEST = "quant.json"
SAFETENSORS = "model.safetensors"
TORCH_FILE = "model.pt"


def read_manifest(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}: not a {FORMAT} export (format {manifest.get('format')!r})")
    return manifest


def read_tensors(folder: str) -> dict[str, torch.Tensor]:
    """The stored tensors: ``model.safetensors`` when present (needs the safetensors package), else
    ``model.pt`` (a plain dict of tensors, loaded with ``weights_only=True``)."""
    path = os.path.join(folder, SAFETENSORS)
    if os.path.exists(path):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(os.path.join(folder, TORCH_FILE), map_location="cpu", weights_only=True)


def dequantize(codes: torch.Tensor, scale: float, offset: float = 0.0) -> torch.Tensor:
    """``codes * scale (+ offset)`` in float32, the same arithmetic the training run used."""
    w = codes.to(torch.float32) * scale
    return w + offset if offset else w


def load_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """A float state_dict for the model architecture quant.json names (``model.load_state_dict(...)``)."""
    manifest = read_manifest(folder)
    tensors = read_tensors(folder)
    state = {name: tensors[name] for name in manifest["float_tensors"]}
    for layer in manifest["layers"]:
        state[layer["tensor"]] = dequantize(tensors[layer["codes"]], layer["scale"], layer.get("offset", 0.0))
    return state
