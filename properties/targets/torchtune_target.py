"""torchtune (0.6.1) ``LoRALinear`` / ``DoRALinear`` as a conformance target.

torchtune has no module-level merge: the one merge it ships is ``get_merged_lora_ckpt(state_dict, rank,
alpha)``, which rewrites a *checkpoint* (base weight += delta, LoRA keys deleted) for export. The handle
therefore merges the way torchtune users do: take the layer's state dict under a parent prefix (the
function finds LoRA modules by key prefix), merge it, and load the result into a plain ``nn.Linear``
that replaces the LoRA layer. A merge is thus one-way: there is no unmerge, and after it there is no
adapter left for ``disable_adapter`` to switch off. Merging again runs the function on the plain
state dict, where it finds nothing to do.

``set_enabled(False)`` runs forwards inside torchtune's ``disable_adapter(model)`` context manager.
DoRA layers get ``initialize_dora_magnitude()`` (as torchtune requires after loading) and then the
spec's exact magnitude. QLoRA (``quantize_base=True``, the quantized kind ``torchao_nf4``) is
``torchtune_qlora.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from properties.spec import DTYPES, LayerSpec
from properties.targets._library import (
    Holder,
    base_weights,
    cloned_state,
    distribution_version,
    import_or_raise,
)
from properties.targets._torchtune_ops import TorchtuneLayerOps
from properties.targets.protocol import Capabilities, Unsupported
from properties.targets.torchtune_qlora import TorchtuneQLoRAHandle

PIP = "pip install torchtune==0.6.1 torchao==0.17.0  (or: python scripts/envs.py create torchtune)"


class TorchtuneMissing(ImportError):
    """torchtune (or the torchao it imports) is not importable in this environment."""


def _peft() -> Any:
    message = f"the torchtune target needs `torchtune` and `torchao`: {PIP}"
    return import_or_raise("torchtune.modules.peft", TorchtuneMissing, message)


class TorchtuneHandle(TorchtuneLayerOps):
    """The layer sits in a ``Holder``: its state-dict keys carry the ``layer.`` prefix torchtune expects."""

    def __init__(self, spec: LayerSpec, holder: Holder) -> None:
        self.spec = spec
        self.holder = holder
        self.adapter = spec.adapters[0]
        self.merged = False
        self.enabled = True

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        if adapter_names is not None:
            raise Unsupported("torchtune has no per-row adapters")
        self.holder.train(train)
        context = nullcontext() if self.enabled else _peft().disable_adapter(self.holder)
        try:
            with context:
                return self.holder(x)
        finally:
            self.holder.train(False)

    def _merged_linear(self) -> nn.Linear:
        """torchtune's checkpoint merge, loaded into the plain layer a merged checkpoint describes."""
        state = cloned_state(self.holder)
        merged = _peft().get_merged_lora_ckpt(state, rank=self.adapter.r, alpha=self.adapter.alpha)
        out_f, in_f = self.spec.weight.shape
        plain = Holder(
            nn.Linear(
                in_f,
                out_f,
                bias=self.spec.base_bias is not None,
                dtype=self.spec.dtype,
                device=self.spec.device,
            )
        )
        plain.load_state_dict(merged, strict=True)
        return plain.layer

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("get_merged_lora_ckpt has no finiteness check")
        if adapter_names is not None and list(adapter_names) != [self.adapter.name]:
            raise Unsupported("torchtune has one adapter per layer")
        self.holder.layer = self._merged_linear()
        self.merged = True

    def unmerge(self) -> None:
        raise Unsupported("torchtune has no unmerge: get_merged_lora_ckpt deletes the LoRA weights")

    def weights(self) -> dict[str, torch.Tensor]:
        return base_weights(self.holder.layer, self.spec)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        raise Unsupported("torchtune has no delta-weight function")

    def snapshot(self) -> dict[str, object]:
        return {
            **cloned_state(self.holder),
            "merged": self.merged,
            "layer_type": type(self.holder.layer).__name__,
        }

    def merge_and_unload(self) -> nn.Module:
        if not self.merged:
            self.merge()
        return self.holder.layer


class TorchtuneTarget:
    """torchtune ``LoRALinear`` and ``DoRALinear`` (linear layers only; one adapter per layer)."""

    name = "torchtune"

    def version(self) -> str:
        _peft()
        return distribution_version("torchtune")

    def capabilities(self) -> Capabilities:
        _peft()
        v = distribution_version("torchtune")
        layers, notes = {"linear"}, {}
        try:
            from properties.targets._nf4_state import nf4_module

            nf4_module()
            layers.add("torchao_nf4")
        except Unsupported as e:
            notes["torchao_nf4"] = f"torchtune QLoRA needs torchao's NF4Tensor: {e}"
        return Capabilities(
            layers=frozenset(layers),
            dtypes=frozenset(DTYPES.values()),
            # merge_to_float: a QLoRA (torchao_nf4) merge exports D(Wq) + delta to a float layer
            operations=frozenset({"merge", "disable", "merge_and_unload", "train_forward", "merge_to_float"}),
            options=frozenset({"dora", "dropout", "quant_blocksize"}),
            notes={
                **notes,
                **{k: f"torchtune {v}: LoRA/DoRA exist for linear layers only" for k in ("embedding", "mha")},
                **{k: f"torchtune {v}: no conv LoRA" for k in ("conv1d", "conv2d", "conv3d")},
                "multi_adapter": f"torchtune {v}: one adapter per layer",
                "rslora": f"torchtune {v}: scaling is alpha / rank only",
                "lora_bias": f"torchtune {v}: use_bias is the base layer's bias; LoRA has none",
                "fan_in_fan_out": f"torchtune {v}: no GPT-2 Conv1D layers",
                "unmerge": f"torchtune {v}: get_merged_lora_ckpt is one-way (LoRA keys are deleted)",
                "exact_unmerge": f"torchtune {v}: no unmerge",
                "merge_subset": f"torchtune {v}: one adapter per layer",
                "safe_merge": f"torchtune {v}: get_merged_lora_ckpt has no finiteness check",
                "set_active": f"torchtune {v}: one adapter per layer",
                "set_scale": f"torchtune {v}: no scale API",
                "scale_layer": f"torchtune {v}: no scale API",
                "mixed_batch": f"torchtune {v}: no per-row adapters",
                "delta_weight": f"torchtune {v}: no delta-weight function",
                "merge": "merge = get_merged_lora_ckpt on the layer's state dict, loaded into nn.Linear",
                "disable": "disable_adapter(model); after a merge there is no adapter left to disable",
            },
        )

    def build(self, spec: LayerSpec) -> TorchtuneHandle | TorchtuneQLoRAHandle:
        peft = _peft()
        if spec.quant is not None and spec.quant.kind == "torchao_nf4":
            a = spec.adapters[0]
            if len(spec.adapters) != 1 or a.use_rslora or a.use_dora or a.bias is not None:
                raise Unsupported("torchtune QLoRA: one plain LoRA adapter per layer")
            return TorchtuneQLoRAHandle(spec, peft)
        if spec.kind != "linear":
            raise Unsupported(f"torchtune has no LoRA for {spec.kind} layers")
        if spec.fan_in_fan_out or len(spec.adapters) != 1:
            raise Unsupported("torchtune has one adapter per linear layer and no fan_in_fan_out")
        a = spec.adapters[0]
        if a.use_rslora or a.bias is not None:
            raise Unsupported("torchtune has no rsLoRA and no LoRA bias")
        out_f, in_f = spec.weight.shape
        cls = peft.DoRALinear if a.use_dora else peft.LoRALinear
        layer = cls(
            in_f, out_f, rank=a.r, alpha=a.alpha, dropout=a.dropout, use_bias=spec.base_bias is not None
        )
        layer.to(device=spec.device, dtype=spec.dtype)
        with torch.no_grad():
            layer.weight.copy_(spec.weight)
            if spec.base_bias is not None:
                layer.bias.copy_(spec.base_bias)
            layer.lora_a.weight.copy_(a.A)
            layer.lora_b.weight.copy_(a.B)
        if a.use_dora:
            layer.initialize_dora_magnitude()
            with torch.no_grad():
                layer.magnitude.copy_(a.magnitude)
        holder = Holder(layer)
        holder.eval()
        return TorchtuneHandle(spec, holder)


TARGET = TorchtuneTarget()
