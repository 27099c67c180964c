"""LoRA for ``nn.MultiheadAttention`` on both ``in_proj_weight`` and ``out_proj.weight``.

The unmerged forward really computes ``x W^T + b + s * B(A(dropout(x)))`` for the q/k/v and
output projections and does the attention by hand; only when no unmerged adapter is active
does it call the base module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoraLayer


class MultiheadAttention(LoraLayer):
    """Factors ``A (r, E)``, ``B (3E, r)`` on the packed in-projection and ``out_A (r, E)``,
    ``out_B (E, r)`` on the output projection, sharing one scaling and one dropout.

    Only packed q/k/v (``kdim == vdim == embed_dim``), no ``add_bias_kv``/``add_zero_attn`` and
    attention ``dropout=0`` (the hand-written attention would draw different masks than torch).
    DoRA and LoRA bias are not supported. In a mixed batch, ``adapter_names`` has one name per
    batch element.
    """

    merge_params = ("in_proj_weight", "out_proj.weight")
    supports_dora = False
    supports_bias = False

    def __init__(self, base_layer: nn.MultiheadAttention, exact_unmerge: bool = False) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("MultiheadAttention with kdim/vdim != embed_dim is not supported")
        if base_layer.dropout:
            raise ValueError(f"MultiheadAttention with dropout={base_layer.dropout} is not supported; use 0")
        if base_layer.bias_k is not None or base_layer.add_zero_attn:
            raise ValueError("MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
        super().__init__(base_layer, exact_unmerge)

    def _factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        e = self.base_layer.embed_dim
        return {"A": (r, e), "B": (3 * e, r), "out_A": (r, e), "out_B": (e, r)}

    def _lora_deltas(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        s = self.scaling[name]
        return {
            "in_proj_weight": self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype) * s,
            "out_proj.weight": self.lora_out_B[name].to(dtype) @ self.lora_out_A[name].to(dtype) * s,
        }

    def _project(self, x, weight, bias, a, b, rows: dict) -> torch.Tensor:
        """``x W^T + bias`` plus, per adapter, ``s * B(A(drop(x)))`` on its batch rows (``None`` = all)."""
        out = F.linear(x, weight, bias)
        for name, idx in rows.items():
            xs = x if idx is None else x[idx]
            hidden = F.linear(self.lora_dropout[name](xs.to(a[name].dtype)), a[name])
            delta = (F.linear(hidden, b[name]) * self.scaling[name]).to(out.dtype)
            out = out + delta if idx is None else out.index_add(0, idx, delta)
        return out

    def _in_projection(self, inputs: list[torch.Tensor], rows: dict) -> list[torch.Tensor]:
        """Project q, k, v; consecutive identical inputs are projected together with one dropout
        mask, exactly as the packed in-projection Linear would see them."""
        base, e = self.base_layer, self.base_layer.embed_dim
        runs = [[0]]
        for j in (1, 2):
            if inputs[j] is inputs[runs[-1][-1]]:
                runs[-1].append(j)
            else:
                runs.append([j])
        out = []
        for run in runs:
            sl = slice(run[0] * e, (run[-1] + 1) * e)
            bias = None if base.in_proj_bias is None else base.in_proj_bias[sl]
            b = {n: self.lora_B[n][sl] for n in rows}
            proj = self._project(inputs[run[0]], base.in_proj_weight[sl], bias, self.lora_A, b, rows)
            out.extend(proj.split(e, dim=-1))
        return out

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        adapter_names: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base_layer
        masks = dict(key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask)
        if self._disable_adapters:
            self._disabled_check()
            return base(query, key, value, average_attn_weights=average_attn_weights, **masks)
        pending = self._pending()
        if adapter_names is None and not pending:
            return base(query, key, value, average_attn_weights=average_attn_weights, **masks)

        unbatched = query.dim() == 2
        to_batch_first = (lambda t: t.unsqueeze(0)) if unbatched else (lambda t: t.transpose(0, 1))
        if not unbatched and base.batch_first:
            to_batch_first = lambda t: t  # noqa: E731
        seen: dict[int, torch.Tensor] = {}  # keep `query is key` identities for _in_projection
        inputs = [seen.setdefault(id(t), to_batch_first(t)) for t in (query, key, value)]
        if adapter_names is None:
            rows = dict.fromkeys(pending)
        else:
            rows = self._mixed_rows(adapter_names, inputs[0].shape[0])
        q, k, v = self._in_projection(inputs, rows)

        n, l, e = q.shape
        h, s = base.num_heads, k.shape[1]
        q, k, v = (t.reshape(n, -1, h, e // h).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(e // h)
        if attn_mask is not None:
            scores = _add_mask(scores, attn_mask.reshape(-1, h, l, s) if attn_mask.dim() == 3 else attn_mask)
        if key_padding_mask is not None:
            scores = _add_mask(scores, key_padding_mask.reshape(n, 1, 1, s))
        weights = scores.softmax(dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(n, l, e)
        out_proj = base.out_proj
        out = self._project(attended, out_proj.weight, out_proj.bias, self.lora_out_A, self.lora_out_B, rows)

        if unbatched:
            out, weights = out.squeeze(0), weights.squeeze(0)
        elif not base.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights


def _add_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Boolean masks mark disallowed positions (-inf); float masks are added, as in torch."""
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask.to(scores.dtype)
