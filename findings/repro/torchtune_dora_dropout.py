"""torchtune 0.6.1: ``DoRALinear`` drops only the ``B A x`` path; the DoRA rescale of the base output stays.

``DoRALinear.forward`` returns ``f * (W x) + f * s * B A dropout(x)`` with ``f = m / ||W + sBA||``. With the
LoRA input dropped, the output is ``f * W x``, not the base output ``W x``; PEFT (and the suite) put the
whole adapter term ``(f - 1) W + f s B A`` on the dropped input, so a dropped entry gives ``W x``. Both
are unbiased in the mean; single train outputs differ. Prints FAIL and exits 1 while torchtune keeps
this placement (a semantic difference, not a mean bias).
"""

import sys

import torch
from torchtune.modules.peft import DoRALinear

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
layer = DoRALinear(1, 1, rank=1, alpha=1.0, dropout=0.5)
torch.nn.init.normal_(layer.lora_b.weight)
layer.initialize_dora_magnitude()
with torch.no_grad():
    layer.magnitude.mul_(1.5)
x = torch.ones(1, 1)
base = torch.nn.functional.linear(x, layer.weight).item()
layer.train()
with torch.no_grad():
    outs = sorted({round(layer(x).item(), 12) for _ in range(64)})
print(f"base output W x = {base:.6g}; distinct train outputs = {outs}")
ok = any(abs(o - base) < 1e-12 for o in outs)
print("OK" if ok else "FAIL: no train output equals the base output (the DoRA rescale is never dropped)")
sys.exit(0 if ok else 1)
