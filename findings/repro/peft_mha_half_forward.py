"""A LoRA MultiheadAttention in bfloat16 or float16 cannot run its forward, and a merge leaves its
in-projection weight in float32 (PEFT 0.15).

``nn.MultiheadAttention(dtype=bfloat16)`` with a LoRA adapter (PEFT's default ``autocast_adapter_dtype``
keeps the adapter in float32) must run in the base layer's dtype, as every other LoRA layer does. PEFT
0.15 raises ``expected scalar type BFloat16 but found Float``, and ``merge()`` turns ``in_proj_weight`` into
float32. Exit status 1 when a forward raises or a merge changes the dtype.
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
        return self.layer(x, x, x, need_weights=False)[0]


bad = []
for dtype in (torch.bfloat16, torch.float16):
    torch.manual_seed(0)
    base = nn.MultiheadAttention(8, 2, batch_first=True, dtype=dtype)
    try:
        cfg = LoraConfig(target_modules=["layer"], r=4, lora_alpha=16, init_lora_weights=False)
        model = get_peft_model(Holder(base), cfg).eval()
    except (TypeError, ValueError) as e:
        print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        sys.exit(0)
    try:
        with torch.no_grad():
            y = model(torch.randn(2, 3, 8, dtype=dtype))
        print(f"  {dtype}: forward ok, output {y.dtype}")
    except RuntimeError as e:
        print(f"  {dtype}: forward raised RuntimeError: {str(e).splitlines()[0][:90]}")
        bad.append(str(dtype))
    layer = model.get_base_model().layer
    layer.merge()
    merged = layer.get_base_layer().in_proj_weight.dtype
    print(f"  {dtype}: in_proj_weight after merge: {merged}")
    if merged != dtype:
        bad.append(f"{dtype} merge")
ok = not bad
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: half-precision LoRA MHA forward and merge"
    + ("" if ok else f" raises for {', '.join(bad)}")
)
sys.exit(0 if ok else 1)
