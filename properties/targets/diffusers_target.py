"""diffusers (0.42, PEFT backend) as a conformance target, through a real diffusers model.

The layer under test sits in the smallest diffusers model there is: ``ModelMixin + ConfigMixin +
PeftAdapterMixin`` with one attribute, ``layer``. Adapters are added with the model's ``add_adapter``
(PEFT's ``inject_adapter_in_model``), and every operation goes through diffusers' public model API:

==================  ==============================================================================
protocol            diffusers
==================  ==============================================================================
merge               ``fuse_lora(lora_scale=1.0, safe_fusing=safe, adapter_names=names)``
unmerge             ``unfuse_lora()``
set_active          ``set_adapters(names, weights)`` (keeps each adapter's current weight)
set_scale           ``set_adapters(active, weights)`` with the new weight (PEFT ``set_scale``)
scale_layer         ``diffusers.utils.scale_lora_layers`` / ``unscale_lora_layers``
disable             ``disable_lora()`` / ``enable_lora()``
merge_and_unload    ``fuse_lora()`` then ``unload_lora()``
==================  ==============================================================================

So what is exercised is diffusers' plumbing around PEFT's LoRA layers (the layer arithmetic is PEFT's
own; the PEFT target checks that part across PEFT releases). The exact spec tensors are loaded into
PEFT's factors after injection.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import torch
from torch import nn

from properties.spec import CONV_KINDS, DTYPES, AdapterSpec, LayerSpec
from properties.targets._library import (
    base_weights,
    cloned_state,
    dense_groups,
    forward_in_mode,
    import_or_raise,
)
from properties.targets.protocol import OPERATIONS, Capabilities, Unsupported
from properties.targets.reference import base_module

PIP = "pip install diffusers==0.42.1 peft transformers  (or: python scripts/envs.py create diffusers)"


class DiffusersMissing(ImportError):
    """diffusers (with its PEFT backend) is not importable in this environment."""


def _diffusers() -> Any:
    message = f"the diffusers target needs `diffusers` with `peft`: {PIP}"
    return import_or_raise("diffusers", DiffusersMissing, message, also=["peft"])  # the PEFT backend


@cache
def _model_class() -> type:
    """The one-layer diffusers model (defined lazily: it subclasses diffusers' mixins)."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.loaders.peft import PeftAdapterMixin

    class OneLayerModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
        @register_to_config
        def __init__(self) -> None:
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    return OneLayerModel


def _load(target: torch.Tensor, value: torch.Tensor, groups: int = 1) -> None:
    """Copy ``value`` into a PEFT factor, dense where PEFT stores a grouped conv factor densely."""
    if groups > 1 and target.numel() != value.numel():
        value = dense_groups(value, groups)
    with torch.no_grad():
        target.copy_(value.reshape(target.shape).to(target.dtype))


class DiffusersHandle:
    def __init__(self, spec: LayerSpec, model: nn.Module) -> None:
        self.spec = spec
        self.model = model
        self.weights_by_name = {a.name: 1.0 for a in spec.adapters}
        self.active = list(spec.active_adapters)

    @property
    def layer(self) -> nn.Module:
        return self.model.layer

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        if adapter_names is not None:
            raise Unsupported("diffusers models do not route PEFT's per-row adapter_names")
        return forward_in_mode(self.model, x, train)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        names = None if adapter_names is None else list(adapter_names)
        try:
            self.model.fuse_lora(lora_scale=1.0, safe_fusing=safe, adapter_names=names)
        except NotImplementedError as e:
            raise Unsupported(f"diffusers/PEFT cannot fuse this layer: {e}") from e

    def unmerge(self) -> None:
        self.model.unfuse_lora()

    def merged_adapters(self) -> list[str]:
        return list(self.layer.merged_adapters)

    def set_active(self, names: Sequence[str]) -> None:
        self.active = list(names)
        self.model.set_adapters(self.active, [self.weights_by_name[n] for n in self.active])

    def set_enabled(self, enabled: bool) -> None:
        if enabled:
            self.model.enable_lora()
        else:
            self.model.disable_lora()

    def set_scale(self, name: str, scale: float) -> None:
        self.weights_by_name[name] = scale
        self.set_active(self.active)

    def scale_layer(self, factor: float) -> None:
        from diffusers.utils import scale_lora_layers

        scale_lora_layers(self.model, factor)

    def unscale_layer(self, factor: float | None = None) -> None:
        from diffusers.utils import unscale_lora_layers

        unscale_lora_layers(self.model, factor)

    def weights(self) -> dict[str, torch.Tensor]:
        base = self.layer.get_base_layer() if hasattr(self.layer, "get_base_layer") else self.layer
        return base_weights(base, self.spec)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        raise Unsupported("diffusers has no delta-weight API of its own")

    def snapshot(self) -> dict[str, object]:
        snap = cloned_state(self.model)
        snap["merged_adapters"] = list(self.layer.merged_adapters)
        snap["active_adapters"] = list(self.layer.active_adapters)
        snap["disable_adapters"] = bool(self.layer.disable_adapters)
        snap["scaling"] = dict(self.layer.scaling)
        return snap

    def merge_and_unload(self) -> nn.Module:
        self.merge()
        self.model.unload_lora()
        return self.model.layer


class DiffusersTarget:
    """diffusers' ``PeftAdapterMixin`` on a one-layer model (linear, embedding and conv layers)."""

    name = "diffusers"

    def version(self) -> str:
        return str(_diffusers().__version__)

    def capabilities(self) -> Capabilities:
        d = _diffusers()
        import peft

        v = f"diffusers {d.__version__} (peft {peft.__version__})"
        missing = {
            "exact_unmerge": "unfuse_lora subtracts the delta in floating point (PEFT unmerge)",
            "mixed_batch": "a diffusers model has no per-row adapter_names argument",
            "delta_weight": "no delta-weight API in diffusers",
        }
        return Capabilities(
            layers=frozenset({"linear", "embedding", "conv1d", "conv2d", "conv3d"}),
            dtypes=frozenset(DTYPES.values()),
            operations=OPERATIONS - set(missing),
            options=frozenset(
                {"multi_adapter", "rslora", "dora", "lora_bias", "dropout", "padding_idx", "conv_groups"}
                | {"conv_dilation", "padding_mode", "padding_same"}
            ),
            notes={
                **{k: f"{v}: {why}" for k, why in missing.items()},
                "mha": f"{v}: diffusers attention is its own Attention class with Linear projections",
                "fan_in_fan_out": f"{v}: diffusers models have no GPT-2 Conv1D layers",
            },
        )

    def build(self, spec: LayerSpec) -> DiffusersHandle:
        _diffusers()
        from peft import LoraConfig

        if spec.kind == "mha" or spec.fan_in_fan_out:
            raise Unsupported("diffusers target: no nn.MultiheadAttention and no GPT-2 Conv1D")
        model = _model_class()()
        model.layer = base_module(spec)
        for a in spec.adapters:
            config = LoraConfig(
                target_modules=["layer"], r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                use_rslora=a.use_rslora, use_dora=a.use_dora, lora_bias=a.bias is not None,
                init_lora_weights=False,
            )  # fmt: skip
            model.add_adapter(config, adapter_name=a.name)
        for a in spec.adapters:
            self._load(spec, model.layer, a)
        handle = DiffusersHandle(spec, model)
        handle.set_active(spec.active_adapters)
        model.eval()
        return handle

    def _load(self, spec: LayerSpec, layer: nn.Module, a: AdapterSpec) -> None:
        n = a.name
        if spec.kind == "embedding":
            _load(layer.lora_embedding_A[n], a.A)
            _load(layer.lora_embedding_B[n], a.B)
        else:
            g = spec.conv.groups if spec.kind in CONV_KINDS else 1
            _load(layer.lora_A[n].weight, a.A, g)
            _load(layer.lora_B[n].weight, a.B, g)
            if a.bias is not None:
                _load(layer.lora_B[n].bias, a.bias)
        if a.use_dora:
            _load(layer.lora_magnitude_vector[n].weight, a.magnitude)


TARGET = DiffusersTarget()
