"""PEFT DoRA on a grouped conv (groups > 1) normalises by the norm of a scrambled matrix.

``DoraConv*Layer.get_lora_weight`` computes ``lora_B.weight.view(-1, r) @ lora_A.weight.view(r, -1)``. With
``groups > 1``, ``lora_B`` is a grouped 1x1 conv of shape ``(out, r/groups, 1, ...)``, so ``view(-1, r)``
mixes rows of different output channels; the result is then reshaped to the base weight's shape without
complaint. The DoRA column norm ``||W + s dW||`` - and with it every DoRA output - is wrong. Canonical DoRA:
``y = m / ||W + s dW||_row * (W + s dW) * x + b`` with ``dW`` the grouped delta of ``lora_B o lora_A``.
``lora_A`` is loaded block-diagonally (zero outside each group), so the LoRA branch is a true grouped conv.
Exit status 1 when the bug is present.
"""

import sys

import peft
import torch
import torch.nn.functional as F
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
g, cin, cout, r = 2, 2, 4, 2
base = nn.Conv2d(cin, cout, 1, groups=g, bias=False, dtype=torch.float64)
try:
    cfg = LoraConfig(target_modules=["layer"], r=r, lora_alpha=1, use_dora=True, init_lora_weights=False)
    model = get_peft_model(Holder(base), cfg).eval()
except (TypeError, ValueError) as e:
    not_applicable(e)
layer = model.get_base_model().layer
A = torch.randn(r, cin // g, 1, 1, dtype=torch.float64)  # canonical grouped A
B = torch.randn(cout, r // g, 1, 1, dtype=torch.float64)
dense_A = torch.zeros(r, cin, 1, 1, dtype=torch.float64)
for k in range(g):
    rows, cols = slice(k * r // g, (k + 1) * r // g), slice(k * cin // g, (k + 1) * cin // g)
    dense_A[rows, cols] = A[rows]
with torch.no_grad():
    layer.lora_A["default"].weight.copy_(dense_A)
    layer.lora_B["default"].weight.copy_(B.reshape(layer.lora_B["default"].weight.shape))
    mag = layer.lora_magnitude_vector["default"].weight
    mag.copy_(torch.rand_like(mag) + 0.5)
    # Exact grouped delta: output channel o (group o // (cout/g)) uses rank rows of its group only.
    s = layer.scaling["default"]
    delta = torch.zeros_like(base.weight)
    for o in range(cout):
        k = o // (cout // g)
        block = A[k * r // g : (k + 1) * r // g].reshape(r // g, -1)
        delta[o] = s * (B[o, :, 0, 0] @ block).reshape(delta[o].shape)
    merged = base.weight + delta
    norm = merged.flatten(1).norm(dim=1)
    want_w = (mag.reshape(-1) / norm).reshape(-1, 1, 1, 1) * merged
    x = torch.randn(1, cin, 3, 3, dtype=torch.float64)
    want = F.conv2d(x, want_w, groups=g)
    got = model(x)
err = (got - want).abs().max().item()
ok = err < 1e-10
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: DoRA Conv2d(groups={g}) eval output, "
    f"max |error| {err:.3g}"
)
sys.exit(0 if ok else 1)
