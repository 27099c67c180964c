"""torchtune QLoRA: ``LoRALinear(..., quantize_base=True)`` on a torchao NF4 base (kind ``torchao_nf4``).

torchtune (0.6.1) keeps the base weight as a torchao ``NF4Tensor`` (``to_nf4(weight, **quantization_kwargs)``,
block sizes 64 / 256 unless ``block_size`` / ``scaler_block_size`` are passed) and never merges into
it. A QLoRA user gets a merged model the way torchtune's recipes make one
(``recipes/lora_finetune_single_device.py``, ``save_checkpoint``): the QLoRA model builders
(``lora_llama3`` & co., ``quantize_base=True``) register ``reparametrize_as_dtype_state_dict_post_hook``
with its default ``dtype=torch.bfloat16`` (``_register_reparametrize_state_dict_hooks(model)``), so
``model.state_dict()`` holds the NF4 weights dequantized to bfloat16; the recipe calls
``get_merged_lora_ckpt`` on that (``weight += (alpha / rank) * B @ A``, LoRA keys deleted) and saves it as
the merged checkpoint, which is loaded into the plain model. The handle does exactly that for one layer
(hook registered on the ``Holder`` as the builders do on the model) and loads the result into an
``nn.Linear`` of the compute dtype. So the merge is an export to a float layer: there is no unmerge
and no requantization, and the claim on it is the ordinary layer merge bound on ``D(Wq) + ΔW`` (plus one
rounding of the dequantized weight), where ``D(Wq)`` is decoded from the stored codes.

The layer is built as a recipe builds it, under the compute dtype as default dtype (the NF4 tensor is
created in it), and loaded with ``load_state_dict`` (``NF4Tensor.copy_`` quantizes the weight).
``torchtune.training.set_default_dtype`` is not importable next to torchao 0.17 (``training`` imports
``int4_weight_only``, gone from torchao), so the default dtype is set and restored here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from properties.quantized.state import QuantState
from properties.spec import LayerSpec
from properties.targets._library import Holder, base_weights
from properties.targets._nf4_state import check_shape, nf4_state
from properties.targets._torchtune_ops import TorchtuneLayerOps
from properties.targets.protocol import Unsupported

EXPORT_DTYPE = torch.bfloat16
"""What torchtune's QLoRA builders dequantize NF4 to in ``state_dict()`` (the hook's default)."""


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """What ``torchtune.training.set_default_dtype`` does, restoring the previous default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _hooks() -> Any:
    from torchtune.modules import common_utils

    return common_utils


class TorchtuneQLoRAHandle(TorchtuneLayerOps):
    """One ``LoRALinear(quantize_base=True)`` in a ``Holder`` (state-dict keys ``layer.*``)."""

    def __init__(self, spec: LayerSpec, peft: Any) -> None:
        q, a = spec.quant, spec.adapters[0]
        out_f, in_f = spec.weight.shape
        check_shape((out_f, in_f), q.block, q.scale_block)
        self.spec, self.peft, self.adapter = spec, peft, a
        kwargs = {"block_size": q.block, "scaler_block_size": q.scale_block}
        with default_dtype(spec.dtype):
            layer = peft.LoRALinear(
                in_f,
                out_f,
                rank=a.r,
                alpha=a.alpha,
                dropout=a.dropout,
                use_bias=spec.base_bias is not None,
                quantize_base=True,
                **kwargs,
            )
        state = {"weight": spec.weight, "lora_a.weight": a.A, "lora_b.weight": a.B}
        if spec.base_bias is not None:
            state["bias"] = spec.base_bias
        layer.load_state_dict(state, strict=True)
        self.holder = Holder(layer)
        self.holder.eval()
        _hooks()._register_reparametrize_state_dict_hooks(self.holder)  # as lora_llama3(quantize_base=True)
        self.merged = False
        self.enabled = True

    def forward(
        self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None
    ) -> torch.Tensor:
        if adapter_names is not None:
            raise Unsupported("torchtune has no per-row adapters")
        self.holder.train(train)
        context = nullcontext() if self.enabled else self.peft.disable_adapter(self.holder)
        try:
            with context, torch.no_grad():
                return self.holder(x)
        finally:
            self.holder.train(False)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        if safe:
            raise Unsupported("get_merged_lora_ckpt has no finiteness check")
        if adapter_names is not None and list(adapter_names) != [self.adapter.name]:
            raise Unsupported("torchtune has one adapter per layer")
        state = {k: v.cpu() for k, v in self.holder.state_dict().items()}  # the recipe's line
        merged = self.peft.get_merged_lora_ckpt(state, rank=self.adapter.r, alpha=self.adapter.alpha)
        out_f, in_f = self.spec.weight.shape
        plain = Holder(nn.Linear(in_f, out_f, bias=self.spec.base_bias is not None, dtype=self.spec.dtype))
        plain.load_state_dict(merged, strict=True)
        self.holder = plain
        self.merged = True

    def unmerge(self) -> None:
        raise Unsupported("torchtune has no unmerge: the merged checkpoint is a float export")

    def quant_state(self) -> QuantState | None:
        """The NF4 base in canonical form; None once merged (the layer is a float export)."""
        return None if self.merged else nf4_state(self.holder.layer.weight)

    def weights(self) -> dict[str, torch.Tensor]:
        if not self.merged:
            raise Unsupported("the unmerged base is NF4: its weights are quant_state()")
        return base_weights(self.holder.layer, self.spec)

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        raise Unsupported("torchtune has no delta-weight function")

    def snapshot(self) -> dict[str, object]:
        """Every tensor bit for bit. NF4 weights are read through their codes and scales: torchtune
        overrides ``NF4Tensor.clone`` to requantize (``_register_nf4_dispatch_ops``), so a
        ``state_dict`` clone would not be a copy."""
        layer = self.holder.layer
        snap: dict[str, object] = {
            f"layer.{k}": v.detach().clone()
            for k, v in layer.named_parameters()
            if k != "weight" or self.merged
        }
        qs = self.quant_state()
        if qs is not None:
            snap.update({f"layer.weight.{k}": v.clone() for k, v in qs.tensors().items()})
        snap["merged"] = self.merged
        snap["layer_type"] = type(layer).__name__
        return snap

    def merge_and_unload(self) -> nn.Module:
        if not self.merged:
            self.merge()
        return self.holder.layer
