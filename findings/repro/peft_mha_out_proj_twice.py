"""PEFT MultiheadAttention LoRA applies the out_proj delta twice (merge, and the forward that merges).

``lora.MultiheadAttention.merge`` adds ``out_proj``'s delta to ``out_proj.weight`` and then calls
``out_proj.merge()``, which adds it a second time. The unmerged forward merges internally, so it sees
``W_o + 2 s B_o A_o`` too. Canonical LoRA: ``W_o + s B_o A_o``.
Exit status 1 when the bug is present.
"""

import copy
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
        return self.layer(x, x, x, need_weights=False)[0]


def not_applicable(e: Exception) -> None:
    """This release cannot build the layer at all: the bug cannot be present."""
    print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    sys.exit(0)


torch.manual_seed(0)
E = 4
base = nn.MultiheadAttention(E, 2, batch_first=True, dtype=torch.float64)
reference = copy.deepcopy(base)
try:
    model = get_peft_model(
        Holder(base), LoraConfig(target_modules=["layer"], r=2, lora_alpha=3, init_lora_weights=False)
    )
except (TypeError, ValueError) as e:
    not_applicable(e)
model.eval()
layer = model.get_base_model().layer
out_proj = layer.get_base_layer().out_proj
s = layer.scaling["default"]
with torch.no_grad():
    reference.in_proj_weight += s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    d_out = s * out_proj.lora_B["default"].weight @ out_proj.lora_A["default"].weight
    reference.out_proj.weight += d_out
    x = torch.randn(2, 3, E, dtype=torch.float64)
    want = reference(x, x, x, need_weights=False)[0]
    unmerged = model(x)
    w0 = out_proj.get_base_layer().weight.detach().clone()
    layer.merge()
    merged = model(x)
    w_merged = out_proj.get_base_layer().weight.detach().clone()
    added = (w_merged - w0).norm() / d_out.norm()

err_u = (unmerged - want).abs().max().item()
err_m = (merged - want).abs().max().item()
ok = err_u < 1e-10 and err_m < 1e-10 and abs(added.item() - 1) < 1e-10
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: MHA LoRA, max |error| unmerged {err_u:.3g}, merged "
    f"{err_m:.3g}; merge added {added.item():.3g} x the out_proj delta (expected 1)"
)
sys.exit(0 if ok else 1)
