"""litgpt 0.5.13: how many roundings its fp16 merge makes (evidence for a suite defect, not a litgpt bug).

``LoRALinear.merge`` adds ``get_lora_AB() = (lora_B @ lora_A) * scaling`` computed in the storage dtype:
``B @ A`` is rounded, the product with a non-power-of-two ``scaling`` again, then the sum; up to ~3 u*M
(M = |W| + s|B||A|). The suite's merge bound allows 2 u*M. Prints OK and exits 0 when every error is within
three roundings; exits 1 if an error exceeds 3 u*M.
"""

import sys

import torch
from litgpt.lora import LoRALinear

torch.manual_seed(0)
u = 2.0**-11  # fp16 unit roundoff
worst = 0.0
for _ in range(3000):
    layer = LoRALinear(13, 4, r=2, lora_alpha=9, bias=False).half()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    W, A, B = (t.detach().double() for t in (layer.linear.weight, layer.lora_A, layer.lora_B))
    layer.merge()
    exact = W + layer.scaling * B @ A
    M = W.abs() + layer.scaling * B.abs() @ A.abs()
    worst = max(worst, ((layer.linear.weight.double() - exact).abs() / (u * M)).max().item())
print(
    f"fp16 LoRALinear(13, 4, r=2, alpha=9): worst merged-weight error = {worst:.3f} u*M "
    "(suite bound: 2 u*M; three roundings allow 3 u*M)"
)
ok = worst <= 3.0 + 1e-6
print("OK: within three roundings" if ok else "FAIL: more than three roundings of error")
sys.exit(0 if ok else 1)
