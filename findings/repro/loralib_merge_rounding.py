"""loralib 0.1.2: how many roundings its fp16 merge makes (evidence for a suite defect, not a loralib bug).

loralib merges with ``weight += (lora_B @ lora_A) * scaling`` in the storage dtype: ``B @ A`` is rounded,
the product with a non-power-of-two ``scaling`` is rounded again, then the sum: three roundings, so the
merged weight may be up to ~3 u*M from exact (M = |W| + s|B||A|). The suite's merge bound allows 2 u*M.
Prints OK and exits 0 when every error is within the 3-rounding bound (correct floating point); the
printed worst error above 2 u*M is what the suite flags. Exits 1 if an error exceeds 3 u*M.
"""

import sys

import loralib as lora
import torch

torch.manual_seed(0)
u = 2.0**-11  # fp16 unit roundoff
worst = 0.0
for _ in range(3000):
    layer = lora.Linear(8, 10, r=1, lora_alpha=3, merge_weights=True).half()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_A.normal_()
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    layer.eval()  # loralib's merge
    exact = W + layer.scaling * B @ A
    M = W.abs() + layer.scaling * B.abs() @ A.abs()
    worst = max(worst, ((layer.weight.double() - exact).abs() / (u * M)).max().item())
print(
    f"fp16 Linear(8, 10, r=1, alpha=3): worst merged-weight error = {worst:.3f} u*M "
    "(suite bound: 2 u*M; three roundings allow 3 u*M)"
)
ok = worst <= 3.0 + 1e-6
print("OK: within three roundings" if ok else "FAIL: more than three roundings of error")
sys.exit(0 if ok else 1)
