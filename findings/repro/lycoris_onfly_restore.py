"""LyCORIS 4.1.3 on CPU: ``onfly_restore()`` does not undo ``onfly_merge()``.

``onfly_merge`` caches ``self.org_module[0].weight.data.cpu()`` before merging in place; on a CPU tensor
``.cpu()`` returns the same tensor, so the cache aliases the weight, the in-place merge overwrites it,
and ``onfly_restore`` copies the merged weight back. Prints FAIL and exits 1 while the bug is present.
"""

import sys

import torch
from lycoris.modules.locon import LoConModule

torch.manual_seed(0)
base = torch.nn.Linear(4, 3)
w0 = base.weight.detach().clone()
m = LoConModule("lora", base, multiplier=1.0, lora_dim=2, alpha=2)
torch.nn.init.normal_(m.lora_up.weight)
m.onfly_merge(1.0)
merged = base.weight.detach().clone()
m.onfly_restore()
restored = torch.equal(base.weight, w0)
print(
    "after onfly_merge + onfly_restore: weight == original:",
    restored,
    "| weight == merged:",
    torch.equal(base.weight, merged),
)
print("OK" if restored else "FAIL: onfly_restore left the merged weight in place (the cache aliases it)")
sys.exit(0 if restored else 1)
