"""LyCORIS 4.1.3: ``onfly_merge`` keeps no merged state, so a second call merges the delta again.

LoRA requires merging an already-merged adapter to change nothing (PEFT warns and skips). Prints FAIL and
exits 1 while the bug is present.
"""

import sys

import torch
from lycoris.modules.locon import LoConModule

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
base = torch.nn.Linear(4, 3)
w0 = base.weight.detach().clone()
m = LoConModule("lora", base, lora_dim=2, alpha=2)
torch.nn.init.normal_(m.lora_up.weight)
with torch.no_grad():
    d = m.get_diff_weight(1.0)[0]
m.onfly_merge(1.0)
once = base.weight.detach().clone()
m.onfly_merge(1.0)
twice = torch.allclose(base.weight, w0 + 2 * d)
print("merged once == W + dW:", torch.allclose(once, w0 + d), "| after a second merge == W + 2 dW:", twice)
ok = torch.equal(base.weight, once)
print("OK" if ok else "FAIL: a second onfly_merge adds the delta again")
sys.exit(0 if ok else 1)
