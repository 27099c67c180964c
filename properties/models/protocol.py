"""The interface model properties use to talk to a LoRA implementation at model level.

A *model target* has the same shape as a layer target (``name``, ``version()``, ``capabilities()``,
``build(spec)``) so the runner, sessions and reports treat it alike: its ``capabilities().layers``
are the architectures it can adapt. ``build(ModelSpec)`` returns a :class:`ModelHandle`: the adapted
model, driven through the library's own model-level API (PEFT: ``merge_and_unload``, ``unload``,
``disable_adapter``, ``add_weighted_adapter``, ``save_pretrained`` / ``PeftModel.from_pretrained``...).

A layer target offers its model half as a ``model_target`` attribute; the built-in ones are found by
name (:func:`model_target_for`). An operation a library lacks raises
:class:`~properties.targets.protocol.Unsupported` and the cell is skipped with the reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from properties.models import architectures as archs
from properties.models.spec import ARCHITECTURES, ModelAdapter, ModelSpec
from properties.spec import DTYPES
from properties.targets.protocol import Capabilities, Target, Unsupported

MODEL_OPERATIONS = frozenset(
    {
        "merge",  # merge(adapter_names=None, safe=False): merged in place, adapters kept
        "unmerge",
        "merge_and_unload",  # merge_and_unload(safe=False): a plain base model is left
        "safe_merge",  # merge_and_unload(safe=True) checks the whole model before writing
        "unload",  # unload(): the base model back, adapters dropped, nothing merged
        "disable",  # disabled(): a context in which the base model computes alone
        "set_active",
        "add_adapter",
        "delete_adapter",
        "weighted_cat",  # add_weighted_adapter(names, weights, new, combination "cat")
        "save_adapter",  # save_adapter(dir) / target.load_adapter(spec, dir)
        "save_merged",  # save_merged(dir) / target.load_merged(spec, dir)
    }
)
MODEL_OPTIONS = frozenset({"multi_adapter", "rslora", "dora", "lora_bias", "modules_to_save", "tied_target"})
"""``lora_bias``: a LoRA bias on modules with a base bias (PEFT ``lora_bias=True``); ``modules_to_save``:
whole modules trained and saved with the adapter (PEFT ``modules_to_save``); ``tied_target``: a LoRA
can go on one module of a tied pair (input embedding / ``lm_head``), which ``model_tied_weights`` needs."""


@dataclass(frozen=True)
class ModelCapabilities(Capabilities):
    """A model target's capabilities, with what it can put a LoRA on when that is not every module.

    These fields are the one way a rule about targets is stated, by a target (adapter-hub ``adapters``
    selects modules by location and layer) or by an architecture whose library configures LoRA per kind
    of module (torchtune, litgpt: see :func:`properties.models.architectures.drawable`):

    ``targetable(architecture, paths)``: the module paths the library can adapt (default: all);
    ``closure(architecture, chosen)``: the smallest set of paths containing ``chosen`` that one adapter
    of the library can target (a library configured by module kind and layer adapts whole kinds ×
    layers); ``group_of(architecture, path)``: the switch that adapts ``path`` (None: none does), where
    one switch adapts every module of its group, so a chosen path brings its whole group (a closure
    that needs the model's paths, which is why it is a function of one path and not a ``closure``);
    ``uniform_rank``: one ``r`` and ``alpha`` per adapter (no per-module pattern); ``alpha_is_rank``:
    the library fixes ``alpha = r`` (scaling 1). The model strategies draw only what these allow, so a
    library's cells test what it can express."""

    targetable: Callable[[str, tuple[str, ...]], tuple[str, ...]] | None = None
    closure: Callable[[str, list[str]], list[str]] | None = None
    uniform_rank: bool = False
    group_of: Callable[[str, str], str | None] | None = None
    alpha_is_rank: bool = False  # alpha is not settable: it is the rank (keras-hub's Backbone.enable_lora)


def full_model_capabilities() -> Capabilities:
    """Every architecture, dtype, model operation and option: what a complete model-level target
    declares. An architecture whose library is missing here (transformers, diffusers, torchtune,
    litgpt) is left out, with the reason."""
    notes = archs.unavailable_notes()
    return Capabilities(
        layers=frozenset(a for a in ARCHITECTURES if a not in notes),
        dtypes=frozenset(DTYPES.values()),
        operations=MODEL_OPERATIONS,
        options=MODEL_OPTIONS,
        notes=notes,
    )


@runtime_checkable
class ModelHandle(Protocol):
    """One adapted model. Tensors cross this boundary in the layer half's canonical layout."""

    def outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An eval forward: ``logits`` (language models) or hidden states (encoders)."""

    def capture(
        self, batch: dict[str, torch.Tensor], paths: Sequence[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One eval forward, returning each module's (input, output) at ``paths``."""

    def module(self, path: str) -> nn.Module:
        """The module now at ``path`` (a plain base module after merge-and-unload)."""

    def modules(self) -> dict[str, type]:
        """Every module path and its type (``""`` is the root model)."""

    def parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter by name (adapters included), tied twins once each."""

    def base_parameters(self) -> dict[str, torch.Tensor]:
        """The base model's parameters by their transformers names (merged or not), every name."""

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """An adapter's factors keyed ``path/A``, ``path/B``, ``path/magnitude`` (canonical layout)."""

    def snapshot(self) -> dict[str, object]:
        """Everything that must stay bit-identical when a safe merge refuses."""

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None: ...

    def unmerge(self) -> None: ...

    def merge_and_unload(self, *, safe: bool = False) -> None: ...

    def unload(self) -> None: ...

    def disabled(self) -> AbstractContextManager[None]: ...

    def set_active(self, names: Sequence[str]) -> None: ...

    def add_adapter(self, adapter: ModelAdapter) -> None: ...

    def delete_adapter(self, name: str) -> None: ...

    def add_weighted_adapter(self, names: Sequence[str], weights: Sequence[float], new_name: str) -> None: ...

    def save_adapter(self, directory: Path, name: str) -> None:
        """Save one adapter with the library's own API."""

    def saved_tensors(self, directory: Path) -> dict[str, torch.Tensor]:
        """Every tensor the saved adapter files hold, as stored."""

    def load_adapter(self, directory: Path, name: str) -> list[str]:
        """Load a saved adapter into this model under ``name``; returns what the library reported."""

    def save_merged(self, directory: Path) -> None: ...


@runtime_checkable
class ModelTarget(Target, Protocol):
    """A LoRA implementation at model level. ``capabilities().layers`` are architectures."""

    def build(self, spec: ModelSpec) -> ModelHandle: ...

    def build_base(self, spec: ModelSpec) -> ModelHandle:
        """The base model alone, no adapter (the control for unload and loading)."""

    def load_adapter(self, spec: ModelSpec, directory: Path, name: str) -> tuple[ModelHandle, list[str]]:
        """A fresh copy of ``spec``'s base with the saved adapter loaded; what the library reported."""

    def load_merged(self, spec: ModelSpec, directory: Path) -> ModelHandle:
        """A model saved with ``save_merged``, loaded with the library's loader."""


BUILTIN_MODEL_TARGETS = {
    "reference": "properties.models.targets.reference:TARGET",
    "peft": "properties.models.targets.peft:TARGET",
    "diffusers": "properties.models.targets.diffusers:TARGET",
    "torchtune": "properties.models.targets.torchtune:TARGET",
    "litgpt": "properties.models.targets.litgpt:TARGET",
    "adapters": "properties.models.targets.adapterhub:TARGET",
    "keras": "properties.models.targets.keras:TARGET",
}


def model_target_for(target: Target) -> ModelTarget:
    """The model half of ``target``: itself if it is one, its ``model_target``, or a built-in by name."""
    if getattr(target, "is_model_target", False):
        return target  # type: ignore[return-value]
    own = getattr(target, "model_target", None)
    if own is not None:
        return own
    path = BUILTIN_MODEL_TARGETS.get(target.name)
    if path is None:
        raise Unsupported(f"{target.name} has no model-level target (no model_target attribute)")
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
