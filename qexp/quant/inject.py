"""Brevitas-style injection: quantizers enter float models through parametrizations and module swaps.

Models stay plain ``nn.Module``s; a method attaches a weight quantizer to each conv/linear layer with
:func:`attach_weight_quantizer` (``layer.weight`` then returns the quantized tensor, while the float
shadow lives in ``layer.parametrizations.weight.original``) or swaps activation modules.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.utils import parametrize

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def weight_layers(model: nn.Module, skip_first: bool = False, skip_last: bool = False) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers in definition order, optionally without the first and/or last one."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
    if skip_first and layers:
        layers = layers[1:]
    if skip_last and layers:
        layers = layers[:-1]
    return layers


def attach_weight_quantizer(layer: nn.Module, quantizer: nn.Module) -> None:
    """``layer.weight`` becomes ``quantizer(shadow)``; the optimizer updates the float shadow."""
    parametrize.register_parametrization(layer, "weight", quantizer, unsafe=True)


def shadow_weight(layer: nn.Module) -> nn.Parameter:
    """The stored (float) weight of a layer, whether or not a quantizer is attached."""
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def weight_quantizer(layer: nn.Module) -> nn.Module | None:
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight[0]
    return None


def replace_modules(model: nn.Module, match: Callable[[str, nn.Module], bool],
                    make: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Replace every submodule for which ``match(name, module)`` holds by ``make(name, module)``."""
    replaced = []
    for name, module in list(model.named_modules()):
        if name and match(name, module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, make(name, module))
            replaced.append(name)
    return replaced
