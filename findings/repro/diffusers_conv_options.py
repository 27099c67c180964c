"""diffusers 0.42.1 (PEFT 0.21.2): the LoRA branch of a conv ignores ``dilation`` and ``padding_mode``.

PEFT builds ``lora_A = conv_layer(in, r, kernel_size, stride, padding, bias=False)``: no dilation and the
default zero padding. A dilated base conv then gets a LoRA output of another length (shape error), and a
reflect-padded one gets a zero-padded LoRA term, so the output is not ``conv(x; W + dW)``.
Prints FAIL and exits 1 while either bug is present.
"""

import sys

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from peft import LoraConfig


class OneLayer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    @register_to_config
    def __init__(self, dilation: int = 1, padding: int = 0, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.layer = torch.nn.Conv1d(1, 1, 2, padding=padding, dilation=dilation, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
bad = False
for kw in ({"dilation": 2}, {"padding": 1, "padding_mode": "reflect"}):
    model = OneLayer(**kw)
    model.add_adapter(LoraConfig(target_modules=["layer"], r=1, lora_alpha=1, init_lora_weights=False), "a")
    x = torch.randn(1, 1, 4)
    base = model.layer.base_layer
    w = base.weight + model.layer.get_delta_weight("a")
    xp = F.pad(x, (1, 1), mode="reflect") if "padding_mode" in kw else x
    with torch.no_grad():
        ref = F.conv1d(xp, w, base.bias, dilation=kw.get("dilation", 1))
        try:
            y = model(x)
            if y.shape == ref.shape:
                err = (y - ref).abs().max().item()
                what = f"max |forward - conv(x; W + dW)| = {err:.3g}"
            else:
                err, what = float("inf"), f"output shape {tuple(y.shape)}, expected {tuple(ref.shape)}"
        except RuntimeError as e:
            err, what = float("inf"), f"RuntimeError: {str(e).splitlines()[0][:80]}"
    ok = err < 1e-12
    bad |= not ok
    print(f"{'OK  ' if ok else 'FAIL'} Conv1d(1, 1, 2, {kw}): {what}")
sys.exit(1 if bad else 0)
