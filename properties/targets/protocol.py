"""The one interface properties use to talk to a LoRA implementation.

A *target* knows one library and nothing of the runner: it declares what it can do
(:class:`Capabilities`) and builds a :class:`LayerHandle` from a :class:`~properties.spec.LayerSpec`.
Properties only ever call the methods below, so the reference LoRA is just one target among others.

Conventions every target follows:

* Tensors go in and come out in the spec's canonical layout (``properties.spec``); a target that
  stores weights transposed (``fan_in_fan_out``, loralib conv layouts, MLX) converts at the boundary.
* ``weights()`` returns the *stored* base parameters (merged or not) by canonical name;
  ``delta_weights(name)`` returns what merging ``name`` would add, in the base dtype.
* An operation the library does not have raises :class:`Unsupported`; the runner reports the cell as
  skipped with that reason. Any other exception from a target is the target's error, reported as such.
* ``merge(safe=True)`` raises ``ValueError`` when the merged weights would be non-finite.
* Never reseed torch: the runner seeds once per example, so dropout masks replay with the example and
  differ between forwards (a reseed per forward makes every mask the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from properties.spec import LayerKind, LayerSpec

OPERATIONS = frozenset(
    {
        "merge",  # merge(adapter_names=None)
        "merge_subset",  # merge(adapter_names=[...]) merges exactly those
        "safe_merge",  # merge(safe=True) checks finiteness before writing
        "unmerge",
        "exact_unmerge",  # unmerge restores the original weights bit for bit
        "disable",  # set_enabled(False)
        "set_active",
        "set_scale",
        "scale_layer",
        "mixed_batch",  # forward(adapter_names=[...]) per row
        "merge_and_unload",
        "delta_weight",
        "train_forward",  # forward(train=True) applies dropout to the LoRA input
    }
)

OPTIONS = frozenset(
    {
        "multi_adapter",
        "rslora",
        "dora",
        "lora_bias",
        "dropout",
        "fan_in_fan_out",
        "padding_idx",
        "conv_groups",
        "conv_dilation",
        "padding_mode",
        "padding_same",
    }
)


class Unsupported(Exception):
    """The target cannot do this (a capability it lacks); the cell is skipped with this message."""


@dataclass(frozen=True)
class Capabilities:
    """What a target can do. The strategies only draw what is declared here."""

    layers: frozenset[LayerKind]
    dtypes: frozenset[torch.dtype]
    operations: frozenset[str]
    options: frozenset[str]
    notes: dict[str, str] = field(default_factory=dict)  # capability -> why it is missing


@runtime_checkable
class LayerHandle(Protocol):
    """One built LoRA layer, driven through the operations LoRA promises."""

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Run the layer. ``train`` selects train mode (dropout on); ``adapter_names`` is one
        adapter name per row of dim 0 (``"__base__"`` for none)."""

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        """Merge the given adapters (default: the active ones) into the base weights."""

    def unmerge(self) -> None:
        """Undo every merged adapter."""

    def merged_adapters(self) -> list[str]:
        """Names currently merged, in merge order."""

    def set_active(self, names: Sequence[str]) -> None: ...

    def set_enabled(self, enabled: bool) -> None:
        """``False`` disables all adapters: the forward is the base layer's."""

    def set_scale(self, name: str, scale: float) -> None:
        """PEFT semantics: scaling becomes ``scale * alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""

    def scale_layer(self, factor: float) -> None:
        """Multiply the scaling of every active adapter by ``factor``."""

    def unscale_layer(self, factor: float | None = None) -> None:
        """Divide by ``factor``, or reset to ``alpha / r`` when ``None``."""

    def weights(self) -> dict[str, torch.Tensor]:
        """Stored base parameters, canonical layout, e.g. ``{"weight": ..., "bias": ...}``."""

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """What merging ``name`` adds, keyed like :meth:`weights` (``"bias"`` with LoRA bias)."""

    def snapshot(self) -> dict[str, object]:
        """Everything that must stay bit-identical when a safe merge fails: parameters, factors,
        flags, caches. Values are tensors (compared bitwise) or plain Python values."""

    def merge_and_unload(self) -> nn.Module:
        """Merge and return a plain module of the base's type."""


@runtime_checkable
class Target(Protocol):
    """A LoRA implementation, as the suite sees it."""

    name: str

    def version(self) -> str:
        """The library's version string (shown in reports)."""

    def capabilities(self) -> Capabilities: ...

    def build(self, spec: LayerSpec) -> LayerHandle:
        """A fresh layer in eval mode with every adapter of ``spec`` loaded and ``spec.active_adapters``
        active. Raises :class:`Unsupported` for a spec it cannot represent."""
