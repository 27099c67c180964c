"""diffusers 0.42.1 (PEFT 0.21.2): a DoRA Linear turns an unbatched input ``(in,)`` into ``(1, out)``.

PEFT's ``DoraLinearLayer`` multiplies by ``(magnitude / weight_norm).view(1, -1)``, which broadcasts the
1-D result to 2-D (plain LoRA returns ``(out,)``, as ``nn.Linear`` does). Prints FAIL and exits 1 while the
bug is present.
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
shapes = {}
for dora in (False, True):
    model = OneLayer()
    config = LoraConfig(target_modules=["layer"], r=1, lora_alpha=1, use_dora=dora, init_lora_weights=False)
    model.add_adapter(config, "a")
    with torch.no_grad():
        shapes["DoRA" if dora else "LoRA"] = tuple(model(torch.randn(3)).shape)
print("output shapes for x of shape (3,):", shapes, "(nn.Linear gives (2,))")
ok = shapes["DoRA"] == (2,)
print("OK" if ok else "FAIL: the DoRA layer adds a batch dimension to unbatched input")
sys.exit(0 if ok else 1)
