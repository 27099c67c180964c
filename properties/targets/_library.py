"""What the library targets share, written once.

Each library is imported on first use (so the suite, and ``lora-conformance targets``, import without
it) and a missing one is reported with its pip hint. The handles read state the same way: detached
copies of a state dict for ``snapshot()``, and a base layer's weight and bias in canonical layout.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from properties.spec import LayerSpec


def import_or_raise(module: str, missing: type[Exception], message: str, *, also: Sequence[str] = ()) -> Any:
    """Import ``module`` (and then ``also``).

    A package that is not installed raises ``missing(message)``, the pip hint. A package that is
    installed but fails to import (a dependency of its own missing or broken) raises ``missing`` with
    its own error and the module it could not find: the pip hint would send the user the wrong way."""
    found = None
    for name in (module, *also):
        try:
            imported = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is reported, in one line
            if isinstance(e, ImportError) and not _installed(name):
                raise missing(message) from e
            raise missing(broken_import_message(name, e)) from e
        found = found or imported
    return found


def _installed(module: str) -> bool:
    """Whether the top-level package of ``module`` is installed (findable without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def broken_import_message(module: str, error: BaseException) -> str:
    """'`peft` 0.17.1 is installed but `import peft` fails: ModuleNotFoundError: ... (missing module ...)'."""
    top = module.split(".")[0]
    version = distribution_version(top)
    installed = f"`{top}` {version}" if version != "unknown" else f"`{top}`"
    text = f"{installed} is installed but `import {module}` fails: {type(error).__name__}: {error}"
    missing_name = getattr(error, "name", None)
    if isinstance(error, ModuleNotFoundError) and missing_name and missing_name.split(".")[0] != top:
        dependency = missing_name.split(".")[0]
        text += f" (its dependency `{dependency}` is missing or broken: install or repair `{dependency}`)"
    return text


def distribution_version(dist_name: str) -> str:
    """The installed release of ``dist_name`` from its package metadata, or ``"unknown"``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return "unknown"


def cloned_state(module: nn.Module, prefix: str = "") -> dict[str, object]:
    """Detached copies of ``module``'s state dict, so a snapshot cannot change after it is taken."""
    return {f"{prefix}{k}": v.detach().clone() for k, v in module.state_dict().items()}


def base_weights(base: nn.Module, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Copies of a base layer's ``weight`` (and ``bias``) in canonical layout: GPT-2 Conv1D transposed."""
    weight = base.weight.detach().clone()
    out = {"weight": weight.T if spec.fan_in_fan_out else weight}
    if spec.base_bias is not None:
        out["bias"] = base.bias.detach().clone()
    return out


def dense_groups(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv factor ``(o, c/g, *k)`` as the dense ``(o, c, *k)`` it stands for.

    Output channel ``i`` belongs to group ``i // (o/g)`` and sees only that group's block of input
    channels; everything outside the block is zero, so the dense product computes the grouped one.
    Libraries that store grouped factors densely are loaded with this.
    """
    if groups == 1:
        return w
    out, per = w.shape[:2]
    dense = w.new_zeros((out, per * groups, *w.shape[2:]))
    rows = out // groups
    for g in range(groups):
        dense[g * rows : (g + 1) * rows, g * per : (g + 1) * per] = w[g * rows : (g + 1) * rows]
    return dense


def forward_in_mode(module: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    """``module(x)`` in train or eval mode; the module is left in eval mode, where handles keep it."""
    module.train(train)
    try:
        return module(x)
    finally:
        module.train(False)


class Holder(nn.Module):
    """The smallest model around one layer, under the attribute ``layer`` (``target_modules``, key prefix)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class OneAdapterHandle:
    """Handle basics for a library layer with exactly one adapter and its own ``merged`` flag."""

    def __init__(self, spec: LayerSpec, layer: nn.Module) -> None:
        self.spec = spec
        self.layer = layer
        self.name = spec.adapters[0].name

    def merged_adapters(self) -> list[str]:
        return [self.name] if self.layer.merged else []

    def snapshot(self) -> dict[str, object]:
        return {**cloned_state(self.layer), "merged": bool(self.layer.merged)}
