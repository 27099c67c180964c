"""Modules an adapter trains whole and saves with its factors (PEFT's ``modules_to_save``).

A classifier head or a norm that fine-tuning updates entirely is not a LoRA: each adapter owns a full
copy of the module, and the original stays untouched beside them. :class:`ModulesToSave` holds both
and decides which one computes:

- an active adapter that saves this module: its trained copy;
- no such adapter active, or adapters disabled: the original;
- two active adapters that both save it: refused, since no copy is the right one (as in PEFT).

``lora_core.model.merge_and_unload`` puts the copy in force back in the model (the merged model is the
fine-tuned one); ``lora_core.model.unload`` puts the original back (the base model again).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn


class ModulesToSave(nn.Module):
    """A module with one trained copy per adapter; the attribute names follow PEFT's wrapper."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str, params: dict[str, torch.Tensor] | None = None) -> None:
        """A copy of the original for ``name``, holding ``params`` (by parameter name) where given."""
        if name in self.modules_to_save:
            raise ValueError(f"adapter {name!r} already has a copy of this module")
        trained = copy.deepcopy(self.original_module)
        if params:
            own = dict(trained.named_parameters())
            unknown = sorted(set(params) - set(own))
            if unknown:
                raise ValueError(f"{type(trained).__name__} has no parameter(s) {unknown}")
            with torch.no_grad():
                for key, value in params.items():
                    if tuple(value.shape) != tuple(own[key].shape):
                        raise ValueError(
                            f"{key}: expected shape {tuple(own[key].shape)}, got {tuple(value.shape)}"
                        )
                    own[key].copy_(value)
        self.modules_to_save[name] = trained

    def set_adapter(self, names: Sequence[str]) -> None:
        """Activate the copy of the one adapter in ``names`` that has one (none: the original)."""
        mine = [n for n in names if n in self.modules_to_save]
        if len(mine) > 1:
            raise ValueError(f"adapters {mine} all save this module: only one of them can be active")
        self.active_adapter = mine[0] if mine else None

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def enable_adapters(self, enabled: bool) -> None:
        self.disabled = not enabled

    def in_force(self, ignore_disabled: bool = False) -> nn.Module:
        """The module that computes now: the active adapter's copy, or the original."""
        if self.active_adapter is None or (self.disabled and not ignore_disabled):
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.in_force()(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes the model reads (``weight``, ``eps``, ...) come from the copy in force."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.in_force(), name)
