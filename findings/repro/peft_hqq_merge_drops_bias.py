"""PEFT's HqqLoraLinear (HQQ base): merging or unmerging drops the base layer's bias.

``HqqLoraLinear.merge`` / ``unmerge`` (PEFT 0.21.2; the same code since HQQ support landed) dequantize
the base, add (subtract) the delta and quantize into a fresh ``HQQLinear(None, quant_config, ...)``,
whose ``bias`` is ``None``: the base layer's bias is gone after the first merge, so the merged output
differs from the unmerged one by the bias, and a merge -> unmerge round trip does not come back.
Reached as users do (transformers 5.24 refuses ``HqqConfig``): an ``HQQLinear`` quantizing an
``nn.Linear`` with a bias, then ``get_peft_model``. Exit status 1 when the bug is present.
"""

import sys
import warnings

import peft
import torch
from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
from peft import LoraConfig, get_peft_model
from torch import nn

warnings.simplefilter("ignore")


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


torch.manual_seed(0)
linear = nn.Linear(16, 8, bias=True)
with torch.no_grad():
    linear.bias.fill_(1.0)
config = BaseQuantizeConfig(nbits=8, group_size=16)
base = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
model = get_peft_model(Holder(base), LoraConfig(target_modules=["layer"], r=2, init_lora_weights=False))
layer = model.base_model.model.layer
x = torch.randn(3, 16)
with torch.no_grad():
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    bias_after = layer.get_base_layer().bias
    layer.unmerge()
    roundtrip = layer(x)
    base_only = layer.get_base_layer()(x)
shift = (merged - unmerged).abs().max().item()
lost = (roundtrip - unmerged).abs().max().item()
print(
    f"peft {peft.__version__}: base bias after merge: {bias_after}; |merged - unmerged| = {shift:.3g}, "
    f"after unmerge {lost:.3g} (the bias is 1.0; 8-bit requantization moves outputs by ~1e-2)"
)
bad = bias_after is None or shift > 0.5 or lost > 0.5
print("FAIL: HqqLoraLinear merge drops the base bias" if bad else "OK")
sys.exit(1 if bad else 0)
