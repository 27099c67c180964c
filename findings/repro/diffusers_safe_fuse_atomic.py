"""diffusers 0.42.1 (PEFT 0.21.2 backend): a refused ``fuse_lora(safe_fusing=True)`` is not atomic.

With two adapters and a non-finite entry in the second, ``fuse_lora`` raises ``ValueError`` as it should,
but only after fusing the first adapter: PEFT's ``merge(safe_merge=True)`` checks adapter by adapter and
writes each one before checking the next. The refused fuse leaves the base weight changed and the first
adapter marked merged. Prints FAIL and exits 1 while the bug is present.
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
model = OneLayer()
for name in ("a", "b"):
    model.add_adapter(LoraConfig(target_modules=["layer"], r=1, lora_alpha=1, init_lora_weights=False), name)
with torch.no_grad():
    model.layer.lora_A["b"].weight[0, 0] = float("nan")
model.set_adapters(["a", "b"])
w0 = model.layer.base_layer.weight.detach().clone()
try:
    model.fuse_lora(lora_scale=1.0, safe_fusing=True, adapter_names=["a", "b"])
    print("FAIL: fuse_lora(safe_fusing=True) accepted a NaN adapter")
    sys.exit(1)
except ValueError as e:
    print("fuse_lora(safe_fusing=True) raised ValueError:", str(e).splitlines()[0][:90])
same = torch.equal(model.layer.base_layer.weight, w0)
print("base weight unchanged:", same, "| merged_adapters:", model.layer.merged_adapters)
ok = same and not model.layer.merged_adapters
print("OK" if ok else "FAIL: the refused safe fuse left adapter 'a' fused into the base weight")
sys.exit(0 if ok else 1)
