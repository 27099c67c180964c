"""torchtune 0.6.1: DoRA scales the base bias in the forward but ``get_merged_lora_ckpt`` does not.

``DoRALinear.forward`` returns ``(m / ||W + sBA||) * (base(x) + s B A x)`` where ``base(x)`` includes the
bias, so the bias is multiplied by the magnitude ratio; ``get_merged_lora_ckpt`` rescales the weight only.
The merged checkpoint therefore computes a different function whenever the layer has a bias (DoRA, and
PEFT, leave the bias unscaled). Prints FAIL and exits 1 while the bug is present.
"""

import sys

import torch
from torchtune.modules.peft import DoRALinear, get_merged_lora_ckpt

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
layer = DoRALinear(3, 2, rank=1, alpha=1.0, use_bias=True)
torch.nn.init.normal_(layer.lora_b.weight)
layer.initialize_dora_magnitude()
with torch.no_grad():
    layer.magnitude.mul_(1.5)
holder = torch.nn.Module()
holder.layer = layer
sd = get_merged_lora_ckpt({k: v.clone() for k, v in holder.state_dict().items()}, rank=1, alpha=1.0)
x = torch.randn(4, 3)
with torch.no_grad():
    err = (layer(x) - torch.nn.functional.linear(x, sd["layer.weight"], sd["layer.bias"])).abs().max().item()
print(f"float64: max |DoRA forward - merged checkpoint forward| = {err:.3g}")
ok = err < 1e-12
print("OK" if ok else "FAIL: the merged checkpoint does not compute the DoRA layer's function (bias)")
sys.exit(0 if ok else 1)
