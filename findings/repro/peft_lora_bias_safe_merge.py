"""A safe merge refused for a non-finite LoRA bias has already written the merged weight (PEFT 0.14-0.20).

``merge(safe_merge=True)`` must leave the layer bit-identical when it raises. With ``lora_bias=True`` and a
NaN in ``lora_B.bias``, PEFT checks the merged weight, writes it, and only then builds and checks the merged
bias, so it raises with ``base_layer.weight`` already changed. Exit status 1 when the weight changed.
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


try:
    cfg = LoraConfig(target_modules=["layer"], r=1, lora_bias=True, init_lora_weights=False)
except TypeError as e:
    print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {e}")
    sys.exit(0)

torch.manual_seed(0)
layer = get_peft_model(Holder(nn.Linear(3, 2)), cfg).get_base_model().layer
with torch.no_grad():
    layer.lora_B["default"].bias[0] = float("nan")
before = {k: v.clone() for k, v in layer.get_base_layer().state_dict().items()}
try:
    layer.merge(safe_merge=True)
    raised = False
except ValueError:
    raised = True
after = layer.get_base_layer().state_dict()
changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
ok = raised and not changed
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: refused safe merge (NaN LoRA bias) leaves the base "
    f"layer unchanged; raised={raised}, changed={changed}"
)
sys.exit(0 if ok else 1)
