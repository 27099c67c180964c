"""Choosing the LoRA layer for a base module, and swapping layers into a model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .config import LoraConfig
from .conv import Conv1d, Conv2d, Conv3d
from .embedding import Embedding
from .layer import LoraLayer
from .linear import Linear
from .mha import MultiheadAttention

_DISPATCH: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: Linear,
    nn.Embedding: Embedding,
    nn.Conv1d: Conv1d,
    nn.Conv2d: Conv2d,
    nn.Conv3d: Conv3d,
    nn.MultiheadAttention: MultiheadAttention,
}


def wrap(base_module: nn.Module, fan_in_fan_out: bool = False, exact_unmerge: bool = False) -> LoraLayer:
    """Wrap ``base_module`` in place: the returned layer's ``base_layer`` is the same object.

    ``exact_unmerge=True`` keeps one copy of the merged parameters (weight and bias) from the
    first merge until ``unmerge()``, which then restores them bit-identically in any dtype.
    """
    if isinstance(base_module, LoraLayer):
        raise TypeError(f"{type(base_module).__name__} is already a LoRA layer")
    weight = getattr(base_module, "weight", None)
    is_conv1d = (
        type(base_module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
    )
    if is_conv1d or isinstance(base_module, nn.Linear):
        return Linear(base_module, fan_in_fan_out=fan_in_fan_out, exact_unmerge=exact_unmerge)
    for base_type, layer_type in _DISPATCH.items():
        if isinstance(base_module, base_type):
            return layer_type(base_module, exact_unmerge=exact_unmerge)
    supported = ", ".join(t.__name__ for t in _DISPATCH) + ", Conv1D (fan_in_fan_out)"
    raise TypeError(f"unsupported base module type {type(base_module).__name__}; supported: {supported}")


def inject(
    model: nn.Module, target_names: Iterable[str], config: LoraConfig, adapter_name: str = "default"
) -> dict[str, LoraLayer]:
    """Replace each submodule whose name ends with one of ``target_names`` by its wrapped layer."""
    targets = tuple(target_names)
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not chosen:
        raise ValueError(f"no submodule matches target_names={list(targets)}")
    layers = {}
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        layer = wrap(module)
        layer.add_adapter(adapter_name, config)
        setattr(model.get_submodule(parent_name), child, layer)
        layers[name] = layer
    return layers
