"""diffusers 0.42.1 (PEFT 0.21.2): a float16 DoRA fuse overflows to NaN although the merged weight is finite.

With ``|s B A|`` above the float16 maximum (65504) but the factors finite, the DoRA merged weight
``m (W + dW) / ||W + dW||`` is finite (here ``m * sign``). PEFT computes ``dW``, ``W + dW`` and its norm in
float16 (the storage dtype), gets ``inf / inf = NaN``, and ``fuse_lora(safe_fusing=True)`` raises "NaNs
detected" on an adapter whose merged weight is representable; without ``safe_fusing`` the NaN is written.
Prints FAIL and exits 1 while the bug is present.
"""

import sys

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from peft import LoraConfig


class OneLayer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    @register_to_config
    def __init__(self, conv: bool = False) -> None:
        super().__init__()
        self.layer = torch.nn.Conv1d(1, 1, 1, bias=False) if conv else torch.nn.Linear(1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


bad = 0
for conv in (False, True):
    model = OneLayer(conv=conv)
    config = LoraConfig(target_modules=["layer"], r=1, lora_alpha=1, use_dora=True, init_lora_weights=False)
    model.add_adapter(config, "a")
    model.to(torch.float16)
    with torch.no_grad():
        model.layer.base_layer.weight.fill_(1.0)
        model.layer.lora_A["a"].weight.fill_(300.0)  # finite factors, s B A = 90000 > 65504
        model.layer.lora_B["a"].weight.fill_(300.0)
        model.layer.lora_magnitude_vector["a"].weight.fill_(0.5)
    name = "Conv1d(1, 1, 1)" if conv else "Linear(1, 1)"
    # exact DoRA merged weight: m * (W + dW) / ||W + dW|| = 0.5 (float64)
    w, dw = torch.tensor(1.0, dtype=torch.float64), torch.tensor(90000.0, dtype=torch.float64)
    exact = 0.5 * (w + dw) / (w + dw).abs()
    try:
        model.fuse_lora(lora_scale=1.0, safe_fusing=True, adapter_names=["a"])
        got = model.layer.base_layer.weight.flatten()[0].item()
        ok = abs(got - exact.item()) < 1e-3
        print(f"{name} fp16: safe fuse gave {got} (exact merged weight {exact.item()})")
    except ValueError as e:
        ok = False
        msg = str(e).splitlines()[0][:60]
        print(f"{name} fp16: safe fuse raised '{msg}' (exact merged weight {exact.item()})")
    bad += not ok
print("OK" if not bad else "FAIL: a float16 DoRA fuse overflows although the merged weight is finite")
sys.exit(1 if bad else 0)
