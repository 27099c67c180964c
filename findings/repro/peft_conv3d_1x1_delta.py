"""PEFT Conv3d LoRA with a kernel whose first two sizes are 1 (e.g. 1x1x1): get_delta_weight fails.

``lora.Conv.get_delta_weight`` tests ``weight.size()[2:4] == (1, 1)`` to pick its "conv2d 1x1" path and then
squeezes dims 3 and 2 only; on a 5-D Conv3d weight that leaves a 3-D tensor, so ``@`` becomes a batched
matmul: a shape error, or (when the shapes happen to broadcast) a delta of the wrong shape. Every merge,
safe merge, merge_and_unload and disable-after-merge on such a layer fails.
Exit status 1 when the bug is present.
"""

import sys

import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def not_applicable(e: Exception) -> None:
    """This release cannot build the layer at all: the bug cannot be present."""
    print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    sys.exit(0)


torch.manual_seed(0)
base = nn.Conv3d(2, 1, kernel_size=1, dtype=torch.float64)
try:
    model = get_peft_model(
        Holder(base), LoraConfig(target_modules=["layer"], r=1, lora_alpha=1, init_lora_weights=False)
    )
except (TypeError, ValueError) as e:
    not_applicable(e)
layer = model.get_base_model().layer
A = layer.lora_A["default"].weight.detach().reshape(1, 2)
B = layer.lora_B["default"].weight.detach().reshape(1, 1)
expected = (B @ A).reshape(1, 2, 1, 1, 1) * layer.scaling["default"]
try:
    delta = layer.get_delta_weight("default")
    ok = delta.shape == expected.shape and torch.allclose(delta, expected)
    detail = f"delta shape {tuple(delta.shape)}, expected {tuple(expected.shape)}"
except RuntimeError as e:
    ok, detail = False, f"get_delta_weight raised RuntimeError: {e}"
print(f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: Conv3d(2, 1, kernel_size=1) LoRA delta: {detail}")
sys.exit(0 if ok else 1)
