"""LyCORIS 4.1.3: the LoRA term of a conv ignores the base conv's ``padding_mode``.

The (default) rebuild forward adds ``F.conv2d(x, dW, padding=org.padding)``: the delta term is
zero-padded while the base conv pads with ``reflect``/``replicate``/``circular``. So the output is not
``conv(x; W + dW)`` and differs from the merged layer. Prints FAIL and exits 1 while the bug is present.
"""

import sys

import torch
import torch.nn.functional as F
from lycoris.modules.locon import LoConModule

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
conv = torch.nn.Conv2d(1, 1, 1, padding=1, padding_mode="reflect")
c = LoConModule("c", conv, lora_dim=1, alpha=1)
torch.nn.init.normal_(c.lora_up.weight)
c.apply_to()
x = torch.randn(1, 1, 2, 2)
with torch.no_grad():
    y = conv(x)
    ref = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), conv.weight + c.get_diff_weight(1.0)[0], conv.bias)
err = (y - ref).abs().max().item()
print(f"reflect-padded Conv2d, float64: max |LyCORIS forward - conv(x; W + dW)| = {err:.3g}")
ok = err < 1e-12
print("OK" if ok else "FAIL: the LoRA term is zero-padded while the base conv reflect-pads")
sys.exit(0 if ok else 1)
