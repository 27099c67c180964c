"""LyCORIS (``lycoris-lora`` 4.1.x) ``LoConModule`` as a conformance target: LoRA on Linear and Conv.

Each adapter is one ``LoConModule`` hooked onto the same base module with ``apply_to()`` (LyCORIS stacks
hooks, so several adapters on one layer is what it does for stacked networks). ``lora_down`` is ``A``,
``lora_up`` is ``B``; a grouped conv's ``lora_up`` is dense ``(out, r)``, so the canonical grouped ``B`` is
loaded with zeros off its group, which gives the same block-diagonal delta exactly. DoRA is
``weight_decompose=True`` (with ``wd_on_out=True``, PEFT's per-output norm) and ``dora_scale`` holds the
magnitude. The per-adapter ``multiplier`` is LyCORIS' scale knob, so ``set_scale`` maps onto it.

Operations map onto LyCORIS' reversible merge: ``merge`` = ``onfly_merge(1.0)`` and then ``restore()``
(unhook, or the merged delta would be added a second time by the forward), ``unmerge`` =
``onfly_restore()`` then ``apply_to()`` for each merged adapter, newest first. ``onfly_restore`` copies a
cached original back, so unmerge is bit-exact. LyCORIS keeps no merged flag: the handle records what it
merged (so ``unmerge`` knows what to undo), but a repeated ``merge`` calls ``onfly_merge`` again, as a
user's code would. ``merge_and_unload`` is the permanent ``merge_to(1.0)`` plus ``restore()``.

The default (non-bypass) forward rebuilds ``W + ΔW`` and never applies the ``dropout`` argument (only
rank/module dropout act there); the target passes ``dropout`` through anyway, as a user would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from properties.spec import CONV_KINDS, DTYPES, AdapterSpec, LayerSpec
from properties.targets._library import (
    base_weights,
    cloned_state,
    dense_groups,
    distribution_version,
    import_or_raise,
)
from properties.targets.protocol import Capabilities, Unsupported
from properties.targets.reference import base_module

PIP = "pip install lycoris-lora==4.1.3  (or: python scripts/envs.py create lycoris)"


class LycorisMissing(ImportError):
    """lycoris-lora is not importable in this environment."""


def _locon() -> Any:
    message = f"the lycoris target needs the `lycoris-lora` package: {PIP}"
    return import_or_raise("lycoris.modules.locon", LycorisMissing, message).LoConModule


class LycorisHandle:
    """The base module plus one hooked ``LoConModule`` per adapter."""

    def __init__(self, spec: LayerSpec, base: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.spec = spec
        self.base = base
        self.modules = modules
        self.applied = list(modules)  # hooked adapters, in hook order
        self.merged: list[str] = []
        self.enabled = True

    def _hook(self, names: Sequence[str]) -> None:
        """Hook exactly ``names`` (unmerged ones only) onto the base, in that order."""
        for n in reversed(self.applied):
            self.modules[n].restore()
        self.applied = [n for n in names if n not in self.merged]
        for n in self.applied:
            self.modules[n].apply_to()

    def _wanted(self) -> list[str]:
        return [n for n in self.active if n not in self.merged] if self.enabled else []

    @property
    def active(self) -> list[str]:
        return getattr(self, "_active", list(self.spec.active_adapters))

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        if adapter_names is not None:
            raise Unsupported("LyCORIS has no per-row adapters")
        for m in (self.base, *self.modules.values()):
            m.train(train)
        try:
            return self.base(x)
        finally:
            for m in (self.base, *self.modules.values()):
                m.train(False)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("LyCORIS has no safe merge")
        names = list(self.active if adapter_names is None else adapter_names)
        for n in names:
            self.modules[n].onfly_merge(1.0)
            if n not in self.merged:
                self.merged.append(n)
        self._hook(self._wanted())

    def unmerge(self) -> None:
        for n in reversed(self.merged):
            self.modules[n].onfly_restore()
        self.merged = []
        self._hook(self._wanted())

    def merged_adapters(self) -> list[str]:
        return list(self.merged)

    def set_active(self, names: Sequence[str]) -> None:
        self._active = list(names)
        self._hook(self._wanted())

    def set_enabled(self, enabled: bool) -> None:
        """``restore()`` unhooks every adapter (the LyCORIS way to switch a network off)."""
        self.enabled = enabled
        self._hook(self._wanted())

    def set_scale(self, name: str, scale: float) -> None:
        self.modules[name].multiplier = scale

    def scale_layer(self, factor: float) -> None:
        raise Unsupported("LyCORIS has no scale_layer (only the per-module multiplier)")

    def unscale_layer(self, factor: float | None = None) -> None:
        raise Unsupported("LyCORIS has no unscale_layer")

    def weights(self) -> dict[str, torch.Tensor]:
        return base_weights(self.base, self.spec)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """``get_diff_weight`` (LoRA) or ``get_merged_weight - W`` (DoRA), LyCORIS' own functions."""
        m = self.modules[name]
        with torch.no_grad():
            if self.spec.adapter(name).use_dora:
                merged = m.get_merged_weight(1.0, self.base.weight.shape, self.base.weight.device)[0]
                return {"weight": (merged.to(self.spec.dtype) - self.base.weight).detach()}
            diff = m.get_diff_weight(1.0, self.base.weight.shape, self.base.weight.device)[0]
            return {"weight": diff.to(self.spec.dtype).detach()}

    def snapshot(self) -> dict[str, object]:
        state = cloned_state(self.base, "base.")
        for n, m in self.modules.items():
            for k, v in nn.Module.state_dict(m).items():
                state[f"{n}.{k}"] = v.detach().clone()
            state[f"{n}.multiplier"] = m.multiplier
        state["merged"] = list(self.merged)
        state["applied"] = list(self.applied)
        return state

    def merge_and_unload(self) -> nn.Module:
        for n in self.active:
            if n not in self.merged:
                self.modules[n].merge_to(1.0)
        for n in reversed(self.applied):
            self.modules[n].restore()
        self.applied = []
        return self.base


class LycorisTarget:
    """LyCORIS LoCon (LoRA) modules on Linear and Conv1d/2d/3d layers."""

    name = "lycoris"

    def version(self) -> str:
        _locon()
        return distribution_version("lycoris-lora")

    def capabilities(self) -> Capabilities:
        _locon()
        v = distribution_version("lycoris-lora")
        return Capabilities(
            layers=frozenset({"linear", "conv1d", "conv2d", "conv3d"}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset(
                {"merge", "merge_subset", "unmerge", "exact_unmerge", "disable", "set_active", "set_scale"}
                | {"merge_and_unload", "delta_weight", "train_forward"}
            ),
            options=frozenset(
                {"multi_adapter", "rslora", "dora", "dropout", "conv_groups", "conv_dilation"}
                | {"padding_mode", "padding_same"}
            ),
            notes={
                "embedding": f"lycoris {v}: LoConModule supports linear and conv layers only",
                "mha": f"lycoris {v}: LoConModule supports linear and conv layers only",
                "lora_bias": f"lycoris {v}: LoCon has no LoRA bias",
                "fan_in_fan_out": f"lycoris {v}: no GPT-2 Conv1D support in LoConModule",
                "padding_idx": "applies to embeddings, which LoCon does not support",
                "safe_merge": f"lycoris {v}: merges do not check finiteness",
                "scale_layer": f"lycoris {v}: only the per-module multiplier (mapped to set_scale)",
                "mixed_batch": f"lycoris {v}: no per-row adapters",
                "dropout": "the default (weight-rebuild) forward ignores LoConModule's dropout argument",
                "set_scale": "multiplier scales the LoRA delta; with DoRA it scales the DoRA factor instead",
            },
        )

    def build(self, spec: LayerSpec) -> LycorisHandle:
        locon = _locon()
        if spec.kind not in ("linear", *CONV_KINDS):
            raise Unsupported(f"LoConModule does not support {spec.kind}")
        if spec.fan_in_fan_out:
            raise Unsupported("LoConModule has no GPT-2 Conv1D (fan_in_fan_out) support")
        base = base_module(spec)
        modules = {a.name: self._module(locon, spec, base, a) for a in spec.adapters}
        handle = LycorisHandle(spec, base, modules)
        handle.set_active(spec.active_adapters)
        for m in (base, *modules.values()):
            m.train(False)
        return handle

    def _module(self, locon: Any, spec: LayerSpec, base: nn.Module, a: AdapterSpec) -> nn.Module:
        if a.bias is not None:
            raise Unsupported("LoCon has no LoRA bias")
        m = locon(
            f"lora_{a.name}", base, multiplier=1.0, lora_dim=a.r, alpha=a.alpha, dropout=a.dropout,
            weight_decompose=a.use_dora, wd_on_out=True, rs_lora=a.use_rslora,
        )  # fmt: skip
        m.to(device=spec.device, dtype=spec.dtype)
        with torch.no_grad():
            m.lora_down.weight.copy_(a.A.reshape(m.lora_down.weight.shape))
            groups = spec.conv.groups if spec.conv is not None else 1
            m.lora_up.weight.copy_(dense_groups(a.B, groups).reshape(m.lora_up.weight.shape))
            if a.use_dora:
                m.dora_scale.copy_(a.magnitude.reshape(m.dora_scale.shape))
        m.apply_to()
        return m


TARGET = LycorisTarget()
