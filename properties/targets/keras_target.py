"""Keras 3 on its torch backend (``KERAS_BACKEND=torch``): ``Dense`` and ``Embedding`` with
``layer.enable_lora(rank, lora_alpha=...)``.

Keras has no merge call. Its LoRA layers compute ``kernel = kernel + (lora_alpha / rank) · a @ b`` on
every call, and its save path writes that merged kernel: ``save_own_variables`` stores the kernel "with
merged LoRA" and no LoRA variables, which a plain layer loads. That save path is the merge this target
drives: ``merge()`` saves the LoRA layer's variables and loads them into a fresh plain layer of the same
config (what ``model.save(...)`` then ``load_model`` gives). There is no unmerge, no second adapter, no
rsLoRA, DoRA, LoRA bias or dropout; those cells are skipped with the reason.

Layouts: a ``Dense`` kernel is ``(in, out)``, ``lora_kernel_a`` ``(in, r)`` and ``lora_kernel_b``
``(r, out)``, so ``a = Aᵀ`` and ``b = Bᵀ`` of the canonical factors; an ``Embedding`` has
``lora_embeddings_a`` ``(num, r)`` and ``lora_embeddings_b`` ``(r, dim)``, again ``Aᵀ`` and ``Bᵀ``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from properties.spec import DTYPES, LayerSpec, dtype_name
from properties.targets._library import distribution_version, import_or_raise
from properties.targets.protocol import Capabilities, Unsupported


class KerasMissing(ImportError):
    pass


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = import_or_raise(
        "keras", KerasMissing, "keras is not installed: python scripts/envs.py create keras"
    )
    if keras.backend.backend() != "torch":
        raise KerasMissing(f"keras runs on the {keras.backend.backend()} backend: set KERAS_BACKEND=torch")
    return keras


def _assign(variable: Any, value: torch.Tensor) -> None:
    variable.assign(value.detach().to("cpu").contiguous())


def _tensor(value: Any) -> torch.Tensor:
    t = value.value if hasattr(value, "value") else value
    return torch.as_tensor(t).detach().clone()


class KerasHandle:
    """One Keras layer; after ``merge()`` it is the plain layer Keras' save path gives back."""

    def __init__(self, spec: LayerSpec, layer: Any) -> None:
        self.spec = spec
        self.layer = layer
        self.name = spec.adapters[0].name
        self.merged = False

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        if adapter_names is not None:
            raise Unsupported("keras has no mixed-batch forward")
        if train:
            raise Unsupported("keras LoRA has no dropout: train and eval forwards are the same")
        if self.spec.kind == "linear" and x.dim() < 2:
            raise Unsupported("keras Dense refuses a 1-D input (its InputSpec needs min_ndim=2)")
        with torch.no_grad():
            return torch.as_tensor(self.layer(x, training=False)).detach()

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("keras has no safe merge")
        if adapter_names is not None and list(adapter_names) != [self.name]:
            raise Unsupported("keras has one LoRA per layer")
        if self.merged:
            return
        store: dict[str, Any] = {}
        self.layer.save_own_variables(store)  # Keras' save path: the kernel with LoRA merged
        plain = type(self.layer).from_config(self.layer.get_config())
        plain.build(self._input_shape())
        plain.load_own_variables(store)
        self.layer, self.merged = plain, True

    def _input_shape(self) -> tuple:
        return (None,) if self.spec.kind == "embedding" else (None, self.spec.weight.shape[1])

    def unmerge(self) -> None:
        raise Unsupported("keras merges only by saving: there is no unmerge")

    def merged_adapters(self) -> list[str]:
        return [self.name] if self.merged else []

    def set_active(self, names: Sequence[str]) -> None:
        raise Unsupported("keras has one always-active LoRA per layer")

    def set_enabled(self, enabled: bool) -> None:
        raise Unsupported("keras cannot disable a LoRA")

    def set_scale(self, name: str, scale: float) -> None:
        raise Unsupported("keras has no scale API")

    def scale_layer(self, factor: float) -> None:
        raise Unsupported("keras has no scale API")

    def unscale_layer(self, factor: float | None = None) -> None:
        raise Unsupported("keras has no scale API")

    def weights(self) -> dict[str, torch.Tensor]:
        if self.spec.kind == "embedding":
            return {"weight": _tensor(self.layer.embeddings)}
        out = {"weight": _tensor(self.layer._kernel).T}
        if self.spec.base_bias is not None:
            out["bias"] = _tensor(self.layer.bias)
        return out

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        raise Unsupported("keras has no public delta-weight function")

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = {v.path: _tensor(v) for v in self.layer.weights}
        snap["merged"] = self.merged
        return snap

    def merge_and_unload(self) -> nn.Module:
        raise Unsupported("a merged Keras layer is a Keras layer, not a torch module")


class KerasTarget:
    """Keras 3 (torch backend): ``Dense`` and ``Embedding`` with ``enable_lora``; one LoRA per layer."""

    name = "keras"

    def version(self) -> str:
        _keras()
        return distribution_version("keras")

    def capabilities(self) -> Capabilities:
        _keras()
        v = distribution_version("keras")
        missing = {
            "conv1d": "keras conv layers have no enable_lora",
            "conv2d": "keras conv layers have no enable_lora",
            "conv3d": "keras conv layers have no enable_lora",
            "mha": "keras MultiHeadAttention LoRA is EinsumDense inside; not a torch MultiheadAttention",
            "multi_adapter": f"keras {v}: one LoRA per layer",
            "rslora": f"keras {v}: scaling is lora_alpha / rank",
            "dora": f"keras {v}: no DoRA",
            "lora_bias": f"keras {v}: no LoRA bias",
            "dropout": f"keras {v}: no LoRA dropout",
            "safe_merge": f"keras {v}: no merge call, no finiteness check",
            "unmerge": f"keras {v}: merging is saving; there is no unmerge",
            "disable": f"keras {v}: a LoRA cannot be disabled",
            "merge_and_unload": f"keras {v}: a Keras layer is not a torch module",
            "delta_weight": f"keras {v}: no public delta-weight function",
            "fan_in_fan_out": "a Dense kernel is (in, out) by construction; no Conv1D to wrap",
        }
        return Capabilities(
            layers=frozenset({"linear", "embedding"}),
            dtypes=frozenset(DTYPES.values()),
            operations=frozenset({"merge"}),
            options=frozenset(),
            notes=missing,
        )

    def build(self, spec: LayerSpec) -> KerasHandle:
        keras = _keras()
        if len(spec.adapters) != 1:
            raise Unsupported("keras has one LoRA per layer")
        a = spec.adapters[0]
        if a.use_rslora or a.use_dora or a.bias is not None or a.dropout:
            raise Unsupported("keras has no rsLoRA, DoRA, LoRA bias or dropout")
        if spec.fan_in_fan_out or spec.padding_idx is not None:
            raise Unsupported("keras: no fan_in_fan_out layout, no padding_idx")
        dtype = dtype_name(spec.dtype)
        if spec.kind == "linear":
            out_f, in_f = spec.weight.shape
            layer = keras.layers.Dense(out_f, use_bias=spec.base_bias is not None, dtype=dtype)
            layer.build((None, in_f))
            _assign(layer._kernel, spec.weight.T)
            if spec.base_bias is not None:
                _assign(layer.bias, spec.base_bias)
            layer.enable_lora(a.r, lora_alpha=a.alpha)
            _assign(layer.lora_kernel_a, a.A.T)
            _assign(layer.lora_kernel_b, a.B.T)
        elif spec.kind == "embedding":
            num, dim = spec.weight.shape
            layer = keras.layers.Embedding(num, dim, dtype=dtype)
            layer.build((None,))
            _assign(layer._embeddings, spec.weight)
            layer.enable_lora(a.r, lora_alpha=a.alpha)
            _assign(layer.lora_embeddings_a, a.A.T)
            _assign(layer.lora_embeddings_b, a.B.T)
        else:
            raise Unsupported(f"keras has no LoRA {spec.kind} layer")
        return KerasHandle(spec, layer)


TARGET = KerasTarget()
