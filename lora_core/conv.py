"""LoRA for ``nn.Conv1d/2d/3d``.

``A`` is a conv with all of the base's options (kernel, stride, padding, dilation, groups,
padding_mode) and ``B`` a grouped 1x1 conv. A grouped 1x1 conv after a conv is again a conv
with kernel ``delta[o] = s * sum_j B[o, j] A[j]`` over the ``j`` of ``o``'s group, of exactly
the base weight's shape, so merging is exact algebra for every option.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LoraConfig
from .layer import LoraLayer

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _ConvNd(LoraLayer):
    ndim = 0

    def _check_config(self, config: LoraConfig) -> None:
        groups = self.base_layer.groups
        if config.r % groups:
            raise ValueError(f"r={config.r} must be divisible by the base conv's groups={groups}")

    def _factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        base = self.base_layer
        ones = (1,) * self.ndim
        return {
            "A": (r, base.in_channels // base.groups, *base.kernel_size),
            "B": (base.out_channels, r // base.groups, *ones),
        }

    def _broadcast(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *[1] * self.ndim)

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        hidden = self.base_layer._conv_forward(x, self.lora_A[name], None)
        return _CONV[self.ndim](hidden, self.lora_B[name], groups=self.base_layer.groups)

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer._conv_forward(x, self.base_layer.weight, None)

    def _weight_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        g = self.base_layer.groups
        a, b = self.lora_A[name].to(dtype), self.lora_B[name].to(dtype)
        grouped = torch.bmm(b.reshape(g, b.shape[0] // g, -1), a.reshape(g, a.shape[0] // g, -1))
        return grouped.reshape(b.shape[0], *a.shape[1:]) * self.scaling[name]


class Conv1d(_ConvNd):
    ndim = 1


class Conv2d(_ConvNd):
    ndim = 2


class Conv3d(_ConvNd):
    ndim = 3
