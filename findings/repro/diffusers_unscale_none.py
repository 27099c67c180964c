"""diffusers 0.42.1: ``unscale_lora_layers(model, None)`` does nothing.

Its docstring: "If no scale is passed the scale of the lora layer will be re-initialized to the correct
value", but the function starts with ``if weight is None or weight == 1.0: return``. After
``scale_lora_layers(model, 2.0)`` the scaling stays doubled. Prints FAIL and exits 1 while the bug is present.
"""

import sys

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.utils import scale_lora_layers, unscale_lora_layers
from peft import LoraConfig


class OneLayer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    @register_to_config
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


model = OneLayer()
model.add_adapter(LoraConfig(target_modules=["layer"], r=2, lora_alpha=3), "a")
initial = model.layer.scaling["a"]
scale_lora_layers(model, 2.0)
unscale_lora_layers(model, None)
after = model.layer.scaling["a"]
print(f"alpha/r = {initial}; after scale_lora_layers(2.0) + unscale_lora_layers(None): {after}")
ok = after == initial
print("OK" if ok else "FAIL: unscale_lora_layers(model, None) did not re-initialise the scale")
sys.exit(0 if ok else 1)
