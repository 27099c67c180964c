"""diffusers 0.42.1 (PEFT 0.21.2): after fusing a subset of the active adapters, the rest are dropped.

``fuse_lora(adapter_names=["a"])`` with adapters ``a`` and ``b`` active should leave ``b`` applied unmerged,
so the output stays ``W x + dW_a x + dW_b x``. PEFT's layer forward returns ``base_layer(x)`` as soon as
anything is merged (``elif self.merged: result = self.base_layer(x)``), so ``b`` silently stops
contributing. Prints FAIL and exits 1 while the bug is present.
"""

import sys

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from peft import LoraConfig


class OneLayer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    @register_to_config
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
model = OneLayer()
for name in ("a", "b"):
    model.add_adapter(LoraConfig(target_modules=["layer"], r=1, lora_alpha=1, init_lora_weights=False), name)
model.set_adapters(["a", "b"])
x = torch.randn(4, 3)
with torch.no_grad():
    before = model(x)
    model.fuse_lora(lora_scale=1.0, adapter_names=["a"])
    after = model(x)
err = (after - before).abs().max().item()
layer = model.layer
print(f"merged={layer.merged_adapters}, active={layer.active_adapters}: max |output change| = {err:.3g}")
ok = err < 1e-12
print("OK" if ok else "FAIL: fusing adapter 'a' dropped the still-active, unfused adapter 'b'")
sys.exit(0 if ok else 1)
