"""Model-level operations over a module tree holding ``LoraLayer`` modules (torch only).

A whole-model merge is not a loop of layer merges, for two reasons:

- **Safe merge is atomic for the whole model.** Every layer's merge is planned and checked before any
  is written, so a non-finite value in one adapter of the deepest module leaves every module as it was.
- **Tied weights are untied before they are written.** When a LoRA layer's base parameter shares its
  storage with a parameter outside that layer (``lm_head`` tied to the input embedding), writing the
  merged weight in place would change the twin too. The layer gets its own copy first; the names of
  the parameters so untied are returned, so the caller can clear its tie flag (a model saved with a
  stale ``tie_word_embeddings=True`` would be re-tied on load).

Modules an adapter saves whole (:class:`~lora_core.saved.ModulesToSave`) are not merged: merge-and-unload
puts the copy in force in their place, unload the original.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layer import LoraLayer
from .saved import ModulesToSave


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every LoRA layer by module path, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def saved_modules(model: nn.Module) -> dict[str, ModulesToSave]:
    """Every module saved whole by some adapter (``modules_to_save``), by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSave)}


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by storage address (tied parameters share one)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(p.data_ptr(), []).append(name)
    return owners


def _untie(owners: dict[int, list[str]], path: str, layer: LoraLayer) -> list[str]:
    """Give ``layer``'s merge parameters their own storage where another module shares it."""
    untied = []
    for key in layer.merge_params:
        p = layer._param(key)
        if p is None:
            continue
        mine = f"{path}.base_layer.{key}" if path else f"base_layer.{key}"
        others = [n for n in owners.get(p.data_ptr(), []) if n != mine]
        if others:
            setattr(layer.base_layer, key, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
            untied.append(mine)
    return untied


@torch.no_grad()
def merge(
    model: nn.Module, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
) -> list[str]:
    """Merge the active adapters (or ``adapter_names``, where a layer has them) of every LoRA layer.

    With ``safe_merge`` nothing is written unless every layer's merged values are finite. Returns the
    names of the base parameters that had to be untied from a twin."""
    layers = lora_layers(model)
    plans = {}
    for path, layer in layers.items():
        names = None if adapter_names is None else [n for n in adapter_names if n in layer.r]
        plans[path] = layer.plan_merge(safe_merge, names)
    untied: list[str] = []
    owners = _owners(model)
    for path, plan in plans.items():
        if plan is not None:
            untied += _untie(owners, path, layers[path])
            layers[path].commit_merge(plan)
    return untied


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        if layer.merged:
            layer.unmerge()


def _replace_layers(model: nn.Module, keep_merged: bool) -> nn.Module:
    root = model
    for path, saved in saved_modules(model).items():
        # merged: the fine-tuned model keeps the active adapter's copy; unloaded: the original is back
        chosen = saved.in_force(ignore_disabled=True) if keep_merged else saved.original_module
        if not path:
            root = chosen
            continue
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, chosen)
    for path, layer in lora_layers(model).items():
        if keep_merged:
            layer._originals = None
        elif layer.merged:
            layer.unmerge()
        if not path:
            root = layer.base_layer
            continue
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    return root


def merge_and_unload(
    model: nn.Module, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
) -> tuple[nn.Module, list[str]]:
    """Merge (atomically with ``safe_merge``), then put every base module back in its layer's place.

    Returns the plain model and the names of the parameters untied from a twin (see :func:`merge`)."""
    untied = merge(model, safe_merge, adapter_names)
    return _replace_layers(model, keep_merged=True), untied


def unload(model: nn.Module) -> nn.Module:
    """Put every base module back, unmerged, dropping the adapters: the base model again."""
    return _replace_layers(model, keep_merged=False)
