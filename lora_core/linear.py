"""LoRA for ``nn.Linear`` and for GPT-2 style ``Conv1D`` (weight stored ``(in, out)``)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoraLayer


class Conv1D(nn.Module):
    """Minimal stand-in for ``transformers.pytorch_utils.Conv1D``: ``x @ W + b`` with ``W (in, out)``."""

    def __init__(self, nx_in: int, nf_out: int) -> None:
        super().__init__()
        self.nf = nf_out
        self.weight = nn.Parameter(torch.empty(nx_in, nf_out))
        self.bias = nn.Parameter(torch.zeros(nf_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Linear(LoraLayer):
    """``y = base(x) + s * B A x``; factors are ``A (r, in)``, ``B (out, r)`` in both storage layouts.

    With ``fan_in_fan_out`` (Conv1D) only the base weight is transposed, so deltas are returned
    as ``(in, out)`` to match what they are added to.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False, exact_unmerge: bool = False):
        super().__init__(base_layer, exact_unmerge)
        is_conv1d = type(base_layer).__name__ == "Conv1D"
        if fan_in_fan_out != is_conv1d:
            warnings.warn(
                f"fan_in_fan_out={fan_in_fan_out} does not fit {type(base_layer).__name__}; "
                f"using fan_in_fan_out={is_conv1d}",
                UserWarning,
                stacklevel=2,
            )
        self.fan_in_fan_out = is_conv1d
        out_features, in_features = self._out_major(base_layer.weight).shape
        self.in_features, self.out_features = in_features, out_features

    def _out_major(self, w: torch.Tensor) -> torch.Tensor:
        return w.T if self.fan_in_fan_out else w

    def _factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"A": (r, self.in_features), "B": (self.out_features, r)}

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name])

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._out_major(self.base_layer.weight))

    def _weight_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        delta = self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype)
        return self._out_major(delta * self.scaling[name])
