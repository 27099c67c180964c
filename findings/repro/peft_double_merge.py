"""PEFT merges an adapter that is already merged a second time (0.7.x).

``merge(adapter_names=["default"])`` twice must equal merging once. PEFT 0.7.1 appends the adapter to
``merged_adapters`` again and adds its delta again (2x the delta in the weight).
Exit status 1 when the bug is present.
"""

import sys
import warnings

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


torch.manual_seed(0)
model = get_peft_model(
    Holder(nn.Linear(3, 2)), LoraConfig(target_modules=["layer"], r=1, init_lora_weights=False)
)
layer = model.get_base_model().layer
layer.merge(adapter_names=["default"])
once = layer.get_base_layer().weight.detach().clone()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    layer.merge(adapter_names=["default"])
twice = layer.get_base_layer().weight.detach()
ok = torch.equal(once, twice) and layer.merged_adapters == ["default"]
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: second merge: "
    f"merged_adapters={layer.merged_adapters}, "
    f"weight changed by {(twice - once).abs().max().item():.3g}"
)
sys.exit(0 if ok else 1)
