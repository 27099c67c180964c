"""PEFT 0.7.x: a refused safe merge of a half-precision Linear rewrites lora_A/lora_B (NaN bits change).

get_delta_weight casts fp16/bf16 factors to float32 on CPU and writes `weight.to(dtype)` back into
lora_A/lora_B. A refused safe merge must leave the layer bit-identical; with a NaN in A the written-back
NaN has other bits. Prints one OK/FAIL line; exits 1 when the bug is there."""

import sys

import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(1, 1, bias=False, dtype=torch.float16)


torch.manual_seed(0)
model = get_peft_model(
    Holder(), LoraConfig(target_modules=["layer"], r=1, lora_alpha=1, init_lora_weights=False)
)
layer = model.base_model.model.layer
layer.to(torch.float16)
with torch.no_grad():
    nan = torch.tensor([0x7E01], dtype=torch.int16).view(torch.float16)  # a quiet NaN with payload
    layer.lora_A["default"].weight.view(-1)[0] = nan
before = {k: v.detach().clone().view(torch.int16) for k, v in layer.state_dict().items()}
try:
    layer.merge(safe_merge=True)
    print(f"peft {peft.__version__}: N/A: safe merge did not raise")
    sys.exit(0)
except ValueError:
    pass
after = {k: v.detach().view(torch.int16) for k, v in layer.state_dict().items()}
changed = [k for k in before if not torch.equal(before[k], after[k])]
ok = not changed
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: "
    f"refused fp16 safe merge leaves state bit-identical; changed={changed}"
)
sys.exit(0 if ok else 1)
