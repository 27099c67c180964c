"""A safe merge rounds the delta twice in half precision, so it differs from the plain merge (PEFT >= 0.15).

``merge(safe_merge=True)`` promises the same merged weights as ``merge()``, only checked for finiteness
first. With a float16 (or bfloat16) base, the LoRA factors are kept in float32 (``autocast_adapter_dtype``,
0.12 on), so ``get_delta_weight`` is float32. The plain merge adds it in place (``weight += delta``: one
rounding to the storage dtype); the safe merge first casts the delta to the storage dtype and then adds
(``orig += delta.to(dtype)``: two roundings). Both results are within a few ulps, but they are not the same
weights. Checked on Linear and Conv2d over 50 random layers each; exit status 1 when some differ.
"""

import copy
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
        return self.layer(x)


def lora_layer(base: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LoraConfig(target_modules=["layer"], r=2, lora_alpha=3, init_lora_weights=False)
    layer = get_peft_model(Holder(base), cfg).get_base_model().layer
    with torch.no_grad():
        for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
            p.copy_(torch.randn_like(p))
    return layer


def differing(make_base, dtype: torch.dtype, trials: int = 50) -> tuple[int, str]:
    """How many of ``trials`` random layers merge to different weights safely and unsafely."""
    count, factor_dtype = 0, ""
    for seed in range(trials):
        torch.manual_seed(10_000 + seed)
        layer = lora_layer(make_base().to(dtype), seed)
        factor_dtype = str(next(layer.lora_A.parameters()).dtype)
        safe, unsafe = copy.deepcopy(layer), copy.deepcopy(layer)
        safe.merge(safe_merge=True)
        unsafe.merge(safe_merge=False)
        if not torch.equal(safe.get_base_layer().weight, unsafe.get_base_layer().weight):
            count += 1
    return count, factor_dtype


results = []
for kind, make_base in (("Linear", lambda: nn.Linear(8, 8)), ("Conv2d", lambda: nn.Conv2d(4, 4, 3))):
    for dtype in (torch.float16, torch.bfloat16):
        try:
            n, factor_dtype = differing(make_base, dtype)
        except Exception as e:  # 0.7: the Conv2d safe merge itself crashes (finding safe-merge-crash)
            print(f"{kind} {str(dtype).removeprefix('torch.')}: safe merge raises {type(e).__name__}: {e}")
            continue
        results.append(n)
        print(
            f"{kind} {str(dtype).removeprefix('torch.')} (factors {factor_dtype.removeprefix('torch.')}): "
            f"safe and plain merge differ on {n} of 50 layers"
        )
if not results:
    print(f"peft {peft.__version__}: N/A: no safe merge ran")
    sys.exit(0)
ok = not any(results)
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: merge(safe_merge=True) writes the same weights as "
    f"merge() in half precision"
)
sys.exit(0 if ok else 1)
