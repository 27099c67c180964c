"""adapter-hub ``adapters`` (LoRA) at layer level, through the library's own LoRA layer classes.

``adapters.init(model)`` reaches LoRA by replacing a model's linear modules with
``LoRALinear.wrap(module, location_key, model_config, adapters_config, ...)`` (an ``nn.Linear``, or
transformers' GPT-2 ``Conv1D`` with ``fan_in_fan_out=True, no_init_bias=True`` as ``GPT2`` does). This
target builds one layer the same way: a base module of the spec, ``LoRALinear.wrap`` on it, the adapter
registered in a ``ModelAdaptersConfig`` with a ``LoRAConfig`` and added by ``layer.add_adapter`` (what
``model.add_adapter`` does per layer), the active setup set on that config (what
``model.set_active_adapters`` does). Merge and unmerge are the layer's ``merge_adapter(name)`` and
``reset_adapter()``, which ``model.merge_adapter`` / ``model.reset_adapter`` call on every layer.

What the library has decides what is declared:

- **Linear only** (and GPT-2's ``Conv1D``). ``adapters`` has no LoRA for embeddings or convolutions;
  its ``LoRAMergedLinear`` puts one LoRA per q/k/v slice of a fused projection, which is not a LoRA on
  the module.
- **One adapter.** Several active LoRAs are composed (``Stack`` feeds one LoRA's output into the next),
  not added, and ``merge_adapter`` refuses a second merged LoRA, so ``multi_adapter`` is not declared.
- **Scaling** is ``alpha / r`` (no rsLoRA), no LoRA bias, no scale API, no safe merge, no unload.
- **Disable** is ``set_active_adapters(None)``: the layer is reset (a merged LoRA unmerged), then the
  active setup set to ``None``.
- **Dropout** is applied to the LoRA input in train mode; **DoRA** is ``LoRAConfig(use_dora=True)``.

The factors are created in the spec's dtype (``LoRAConfig(dtype=...)``) and overwritten with the spec's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from properties.spec import DTYPES, LayerSpec, dtype_name
from properties.targets._library import (
    OneAdapterHandle,
    base_weights,
    cloned_state,
    distribution_version,
    forward_in_mode,
    import_or_raise,
)
from properties.targets.protocol import Capabilities, Unsupported

PIP = "python scripts/envs.py create adapters  (adapters==1.3.0 pins transformers 4.57)"


class AdaptersMissing(ImportError):
    """adapter-hub ``adapters`` is not importable in this environment."""


def _adapters() -> Any:
    adapters = import_or_raise(
        "adapters", AdaptersMissing, f"the adapters target needs adapter-hub `adapters`: {PIP}"
    )
    logging.getLogger("adapters").setLevel(logging.ERROR)
    return adapters


def _base_module(spec: LayerSpec) -> nn.Module:
    """The module ``adapters`` would find in a model: ``nn.Linear``, or GPT-2's ``Conv1D`` (weight
    stored ``(in, out)``)."""
    out_f, in_f = spec.weight.shape
    bias = spec.base_bias is not None
    if spec.fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(out_f, in_f).to(dtype=spec.dtype, device=spec.device)
        with torch.no_grad():
            module.weight.copy_(spec.weight.T)
            if bias:
                module.bias.copy_(spec.base_bias)
        return module
    module = nn.Linear(in_f, out_f, bias=bias, dtype=spec.dtype, device=spec.device)
    with torch.no_grad():
        module.weight.copy_(spec.weight)
        if bias:
            module.bias.copy_(spec.base_bias)
    return module


class AdaptersHandle(OneAdapterHandle):
    """One ``LoRALinear``; merge state is its own ``merged`` (the merged adapter's name, or falsy)."""

    def __init__(self, spec: LayerSpec, layer: nn.Module, adapters_config: Any) -> None:
        super().__init__(spec, layer)
        self.adapters_config = adapters_config

    def merged_adapters(self) -> list[str]:
        return [self.layer.merged] if self.layer.merged else []

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        if adapter_names is not None:
            raise Unsupported("adapters has no per-row adapter names (BatchSplit splits by block sizes)")
        return forward_in_mode(self.layer, x, train)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("adapters has no safe merge")
        if adapter_names is not None and list(adapter_names) != [self.name]:
            raise Unsupported("adapters merges one LoRA per layer (merge_adapter(name))")
        self.layer.merge_adapter(self.name)

    def unmerge(self) -> None:
        self.layer.reset_adapter()

    def set_active(self, names: Sequence[str]) -> None:
        raise Unsupported("adapters composes several active LoRAs (Stack) instead of adding them")

    def set_enabled(self, enabled: bool) -> None:
        """What ``model.set_active_adapters(name or None)`` does to each layer: reset (unmerge) the
        LoRA layer, then set the active setup."""
        from adapters.composition import parse_composition

        self.layer.reset_adapter()
        self.adapters_config.active_setup = parse_composition(self.name) if enabled else None

    def set_scale(self, name: str, scale: float) -> None:
        raise Unsupported("adapters has no scale API (scaling is alpha / r, fixed by LoRAConfig)")

    def scale_layer(self, factor: float) -> None:
        raise Unsupported("adapters has no scale API")

    def unscale_layer(self, factor: float | None = None) -> None:
        raise Unsupported("adapters has no scale API")

    def weights(self) -> dict[str, torch.Tensor]:
        return base_weights(self.layer, self.spec)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        raise Unsupported("adapters' LoRA.delta_w is B @ A without the scaling; no public delta weight")

    def snapshot(self) -> dict[str, object]:
        return {
            **cloned_state(self.layer),
            "merged": str(self.layer.merged or ""),
            "active": str(self.adapters_config.active_setup),
        }

    def merge_and_unload(self) -> nn.Module:
        raise Unsupported("adapters has no unload: merge_adapter keeps the LoRA layer")


class AdaptersTarget:
    """adapter-hub ``adapters``: ``LoRALinear`` on Linear and GPT-2 Conv1D; one adapter per layer."""

    name = "adapters"

    def version(self) -> str:
        _adapters()
        return distribution_version("adapters")

    def capabilities(self) -> Capabilities:
        _adapters()
        v = f"adapters {distribution_version('adapters')}"
        no_lora = f"{v}: LoRA wraps linear modules only (LoRALinear, LoRAMergedLinear)"
        return Capabilities(
            layers=frozenset({"linear"}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset({"merge", "unmerge", "disable", "train_forward"}),
            options=frozenset({"dora", "dropout", "fan_in_fan_out"}),
            notes={
                "embedding": no_lora,
                "conv1d": no_lora,
                "conv2d": no_lora,
                "conv3d": no_lora,
                "mha": f"{v}: no LoRA on torch MultiheadAttention (q/k/v are separate Linear modules)",
                "multi_adapter": f"{v}: several active LoRAs are stacked (composed), not added",
                "rslora": f"{v}: scaling is alpha / r only",
                "lora_bias": f"{v}: no LoRA bias",
                "safe_merge": f"{v}: merge_adapter has no finiteness check",
                "merge_subset": f"{v}: one LoRA merged per layer",
                "exact_unmerge": f"{v}: reset_adapter subtracts the delta in floating point",
                "set_active": f"{v}: one adapter per layer here (several are composed)",
                "set_scale": f"{v}: scaling is fixed by LoRAConfig",
                "scale_layer": f"{v}: scaling is fixed by LoRAConfig",
                "mixed_batch": f"{v}: BatchSplit splits by block sizes, not per-row names",
                "merge_and_unload": f"{v}: merge_adapter keeps the LoRA layer; no unload",
                "delta_weight": f"{v}: LoRA.delta_w is B @ A unscaled; no public delta weight",
            },
        )

    def build(self, spec: LayerSpec) -> AdaptersHandle:
        lib = _adapters()
        if spec.kind != "linear" or spec.quant is not None:
            raise Unsupported(f"adapters has no LoRA {spec.kind} layer")
        if len(spec.adapters) != 1:
            raise Unsupported("adapters adds one LoRA per layer (several are composed)")
        a = spec.adapters[0]
        if a.use_rslora or a.bias is not None:
            raise Unsupported("adapters has no rsLoRA or LoRA bias")
        from adapters.composition import parse_composition
        from adapters.configuration import ModelAdaptersConfig
        from adapters.methods.lora import LoRALinear
        from transformers import PretrainedConfig

        adapters_config = ModelAdaptersConfig()
        kw = {"fan_in_fan_out": True, "no_init_bias": True} if spec.fan_in_fan_out else {}
        layer = LoRALinear.wrap(_base_module(spec), "output", PretrainedConfig(), adapters_config, **kw)
        if spec.fan_in_fan_out and spec.base_bias is None:
            layer.register_parameter("bias", None)  # GPT-2's Conv1D always has one; the spec has none
        config = lib.LoRAConfig(
            r=a.r,
            alpha=a.alpha,
            dropout=a.dropout,
            selfattn_lora=False,
            output_lora=True,
            use_dora=a.use_dora,
            dtype=dtype_name(spec.dtype),
            init_weights="bert",  # random factors; the spec's are written over them
        )
        adapters_config.add(a.name, config=config)
        if not layer.add_adapter(a.name, layer_idx=0):
            raise RuntimeError(f"adapters did not add {a.name!r} to the layer (LoRAConfig not matched)")
        lora = layer.loras[a.name]
        with torch.no_grad():
            lora.lora_A.copy_(a.A)
            lora.lora_B.copy_(a.B)
            if a.magnitude is not None:
                lora.m.weight.copy_(a.magnitude.reshape(lora.m.weight.shape))
        adapters_config.active_setup = parse_composition(a.name)
        layer.train(False)
        return AdaptersHandle(spec, layer, adapters_config)


TARGET = AdaptersTarget()
