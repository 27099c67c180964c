"""diffusers 0.42.1 (PEFT 0.21.2 backend): the DoRA forward loses accuracy when the base layer has a bias.

PEFT's DoRA forward reuses the base output: it recovers ``W x`` as ``fl(W x + b) - b`` and multiplies it by
``m / ||W + dW|| - 1``, so the rounding error of ``W x + b`` (about ``u |W x + b|``) is scaled by
``|m / ||W + dW|| - 1|``. Computing ``f W x + b`` directly is accurate to a few ``u``. Here ``f = 1000``
and the float32 error is ~390 u of the output. (Linear shown; the Conv path subtracts the bias the same
way.) Prints FAIL and exits 1 while the error exceeds 8 u of the output.
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
        self.layer = torch.nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


model = OneLayer()
model.add_adapter(
    LoraConfig(target_modules=["layer"], r=1, lora_alpha=1, use_dora=True, init_lora_weights=False)
)
with torch.no_grad():
    model.layer.base_layer.weight.fill_(1e-3)
    model.layer.base_layer.bias.fill_(1.0)
    model.layer.lora_B["default"].weight.zero_()  # dW = 0, so f = m / |W| = 1000
    model.layer.lora_magnitude_vector["default"].weight.fill_(1.0)
    y = model(torch.ones(1, 1)).item()
w = float(torch.tensor(1e-3))  # the stored float32 weight
exact = 1.0 / w * w + 1.0  # f W x + b in float64
err_u = abs(y - exact) / (abs(exact) * 2.0**-24)
print(f"float32 DoRA Linear(1, 1), W=1e-3, b=1, f=1000: output {y!r}, exact {exact!r}, error {err_u:.0f} u")
ok = err_u <= 8
print("OK" if ok else "FAIL: the DoRA forward amplifies the rounding of W x + b by |f - 1|")
sys.exit(0 if ok else 1)
