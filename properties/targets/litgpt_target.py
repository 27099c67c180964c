"""litgpt (0.5.13) ``litgpt.lora.LoRALinear`` as a conformance target.

``LoRALinear`` wraps a plain ``self.linear`` and holds ``lora_A (r, in)`` / ``lora_B (out, r)`` in the
canonical layout. ``merge()`` adds ``get_lora_AB()`` into ``linear.weight`` once (guarded by ``merged``);
litgpt has no unmerge and no way to disable an adapter. Its factors are created in the default dtype,
as litgpt models are: the whole module is cast to the spec dtype (what ``fabric.init_module`` or
``model.to(dtype)`` does for a real model) before the exact tensors are loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from properties.spec import DTYPES, LayerSpec
from properties.targets._library import (
    OneAdapterHandle,
    base_weights,
    distribution_version,
    forward_in_mode,
    import_or_raise,
)
from properties.targets.protocol import Capabilities, Unsupported

PIP = "pip install litgpt==0.5.13  (or: python scripts/envs.py create litgpt)"


class LitgptMissing(ImportError):
    """litgpt is not importable in this environment."""


def _lora() -> Any:
    return import_or_raise(
        "litgpt.lora", LitgptMissing, f"the litgpt target needs the `litgpt` package: {PIP}"
    )


class LitgptHandle(OneAdapterHandle):
    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        if adapter_names is not None:
            raise Unsupported("litgpt has no per-row adapters")
        return forward_in_mode(self.layer, x, train)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("litgpt's merge has no finiteness check")
        if adapter_names is not None and list(adapter_names) != [self.name]:
            raise Unsupported("litgpt has one adapter per layer")
        self.layer.merge()

    def unmerge(self) -> None:
        raise Unsupported("litgpt has no unmerge")

    def set_active(self, names: Sequence[str]) -> None:
        raise Unsupported("litgpt has one adapter per layer")

    def set_enabled(self, enabled: bool) -> None:
        raise Unsupported("litgpt cannot disable an adapter")

    def set_scale(self, name: str, scale: float) -> None:
        raise Unsupported("litgpt has no scale API")

    def scale_layer(self, factor: float) -> None:
        raise Unsupported("litgpt has no scale API")

    def unscale_layer(self, factor: float | None = None) -> None:
        raise Unsupported("litgpt has no scale API")

    def weights(self) -> dict[str, torch.Tensor]:
        return base_weights(self.layer.linear, self.spec)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """``get_lora_AB()``: what ``merge()`` adds, cast to the base dtype as merge casts it."""
        return {"weight": self.layer.get_lora_AB().detach().to(self.layer.linear.weight.dtype)}

    def merge_and_unload(self) -> nn.Module:
        raise Unsupported("litgpt merges in place (merge_lora_weights) and keeps the LoRA module")


class LitgptTarget:
    """litgpt's ``LoRALinear`` (linear layers; one adapter per layer)."""

    name = "litgpt"

    def version(self) -> str:
        _lora()
        return distribution_version("litgpt")

    def capabilities(self) -> Capabilities:
        _lora()
        v = distribution_version("litgpt")
        no = {
            "multi_adapter": "one adapter per layer",
            "rslora": "scaling is lora_alpha / r only",
            "dora": "no DoRA",
            "lora_bias": "no LoRA bias",
            "fan_in_fan_out": "no GPT-2 Conv1D layers",
            "unmerge": "merge() is one-way",
            "exact_unmerge": "no unmerge",
            "merge_subset": "one adapter per layer",
            "safe_merge": "merge() has no finiteness check",
            "disable": "adapters cannot be disabled",
            "set_active": "one adapter per layer",
            "set_scale": "no scale API",
            "scale_layer": "no scale API",
            "mixed_batch": "no per-row adapters",
            "merge_and_unload": "merge_lora_weights merges in place and keeps the LoRA modules",
            "embedding": "LoRA exists for linear layers only (LoRALinear, LoRAQKVLinear)",
            "mha": "fused attention is LoRAQKVLinear inside litgpt's own CausalSelfAttention, not nn.MHA",
            **{k: "no conv LoRA" for k in ("conv1d", "conv2d", "conv3d")},
        }
        return Capabilities(
            layers=frozenset({"linear"}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset({"merge", "delta_weight", "train_forward"}),
            options=frozenset({"dropout"}),
            notes={k: f"litgpt {v}: {why}" for k, why in no.items()},
        )

    def build(self, spec: LayerSpec) -> LitgptHandle:
        lora = _lora()
        if spec.kind != "linear":
            raise Unsupported(f"litgpt has no LoRA for {spec.kind} layers")
        if spec.fan_in_fan_out or len(spec.adapters) != 1:
            raise Unsupported("litgpt has one adapter per linear layer and no fan_in_fan_out")
        a = spec.adapters[0]
        if a.use_rslora or a.use_dora or a.bias is not None:
            raise Unsupported("litgpt has no rsLoRA, DoRA or LoRA bias")
        out_f, in_f = spec.weight.shape
        layer = lora.LoRALinear(
            in_f, out_f, r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, bias=spec.base_bias is not None
        )
        layer.to(device=spec.device, dtype=spec.dtype)
        with torch.no_grad():
            layer.linear.weight.copy_(spec.weight)
            if spec.base_bias is not None:
                layer.linear.bias.copy_(spec.base_bias)
            layer.lora_A.copy_(a.A)
            layer.lora_B.copy_(a.B)
        layer.eval()
        return LitgptHandle(spec, layer)


TARGET = LitgptTarget()
