"""Three small PEFT LoRA-layer API bugs: partial merge, Embedding scale_layer, rsLoRA set_scale.

1. ``partial_merge``: after ``merge(adapter_names=["a"])`` with ``["a", "b"]`` active, the forward runs the
   base layer alone (``elif self.merged: result = self.base_layer(x)``): the still-active, unmerged ``b`` is
   silently dropped. LoRA: output = (W + dA) x + s_b B_b A_b x.
2. ``embedding_scale_layer``: ``scale_layer`` / ``unscale_layer`` skip adapters not in ``self.lora_A``; an
   Embedding keeps its factors in ``lora_embedding_A``, so both are no-ops there.
3. ``set_scale_rslora``: ``set_scale(name, 1.0)`` must give ``alpha / sqrt(r)`` for an rsLoRA adapter.
Exit status 1 when any bug is present.
"""

import math
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


def cfg(**kw) -> LoraConfig:
    return LoraConfig(target_modules=["layer"], r=4, lora_alpha=2, init_lora_weights=False, **kw)


bad = []
torch.manual_seed(0)
model = get_peft_model(Holder(nn.Linear(3, 2, dtype=torch.float64)), cfg())
model.add_adapter("b", cfg())
layer = model.get_base_model().layer
layer.set_adapter(["default", "b"])
model.eval()
x = torch.randn(2, 3, dtype=torch.float64)
with torch.no_grad():
    want = model(x)
    layer.merge(adapter_names=["default"])
    got = model(x)
err = (got - want).abs().max().item()
print(f"  partial_merge: output after merging 1 of 2 active adapters, max |error| {err:.3g}")
bad += ["partial_merge"] if err > 1e-10 else []

emb = get_peft_model(Holder(nn.Embedding(5, 2)), cfg()).get_base_model().layer
emb.scale_layer(2.0)
print(
    f"  embedding_scale_layer: scaling after scale_layer(2.0): "
    f"{emb.scaling['default']} (expected {2 * 2 / 4})"
)
bad += ["embedding_scale_layer"] if emb.scaling["default"] != 1.0 else []

try:
    rs = get_peft_model(Holder(nn.Linear(3, 2)), cfg(use_rslora=True)).get_base_model().layer
    rs.set_scale("default", 1.0)
    got = rs.scaling["default"]
    print(f"  set_scale_rslora: scaling after set_scale(1.0): {got} (expected {2 / math.sqrt(4)})")
    bad += ["set_scale_rslora"] if rs.scaling["default"] != 2 / math.sqrt(4) else []
except TypeError as e:
    print(f"  set_scale_rslora: n/a ({e})")
print(f"peft {peft.__version__}: {'OK' if not bad else 'FAIL'}: " + (", ".join(bad) or "all three behave"))
sys.exit(1 if bad else 0)
