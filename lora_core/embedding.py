"""LoRA for ``nn.Embedding``: the factors act on one-hot rows, so ``A`` is ``(r, num_embeddings)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoraLayer


class Embedding(LoraLayer):
    """``y = W[ids] + s * A.T[ids] @ B.T``; the delta is ``s * (B A).T`` of shape ``(num, dim)``.

    ``padding_idx`` is passed to the LoRA lookup too. It only stops gradients: the delta still
    changes the padding row after a merge exactly as it changes the unmerged output, so the two
    agree. ``max_norm`` is rejected because it renormalises weight rows in place at lookup.
    Dropout cannot act on integer ids and is ignored, as in PEFT. DoRA norms are taken per
    embedding dimension, i.e. ``W.T`` is treated like a Linear weight ``(dim, num)``.
    """

    def __init__(self, base_layer: nn.Embedding, exact_unmerge: bool = False) -> None:
        if base_layer.max_norm is not None:
            raise ValueError(
                f"Embedding with max_norm={base_layer.max_norm} is not supported: max_norm renormalises "
                "weight rows in place at lookup, so merged and unmerged outputs cannot agree"
            )
        super().__init__(base_layer, exact_unmerge)

    def _out_major(self, w: torch.Tensor) -> torch.Tensor:
        return w.T

    def _factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"A": (r, self.base_layer.num_embeddings), "B": (self.base_layer.embedding_dim, r)}

    def _init_factors(self, name: str, init_lora_weights: bool) -> None:
        if init_lora_weights:
            nn.init.zeros_(self.lora_A[name])
        else:
            nn.init.normal_(self.lora_A[name])
        nn.init.normal_(self.lora_B[name])

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, None, 2.0, base.scale_grad_by_freq, base.sparse)

    def _branch(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(ids, self.lora_A[name].T) @ self.lora_B[name].T

    def _apply_weight(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(ids, self.base_layer.weight)

    def _weight_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return (self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype)).T * self.scaling[name]
