"""torchtune 0.6.1: ``DoRALinear`` turns an unbatched input ``(in,)`` into a ``(1, out)`` output.

``nn.Linear`` and ``LoRALinear`` return ``(out,)``; DoRA multiplies by ``magnitude.view(1, -1)``, which
broadcasts the 1-D result to 2-D. Prints FAIL and exits 1 while the bug is present.
"""

import sys

import torch
from torchtune.modules.peft import DoRALinear, LoRALinear

torch.manual_seed(0)
x = torch.randn(3)
shapes = {}
for cls in (LoRALinear, DoRALinear):
    layer = cls(3, 2, rank=1, alpha=1.0)
    if cls is DoRALinear:
        layer.initialize_dora_magnitude()
    shapes[cls.__name__] = tuple(layer(x).shape)
print("output shapes for x of shape (3,):", shapes, "(nn.Linear gives (2,))")
ok = shapes["DoRALinear"] == (2,)
print("OK" if ok else "FAIL: DoRALinear adds a batch dimension to unbatched input")
sys.exit(0 if ok else 1)
