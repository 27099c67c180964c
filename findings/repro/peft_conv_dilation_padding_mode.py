"""PEFT conv LoRA ignores the base conv's dilation and padding_mode (accepted without a warning).

``lora.Conv*d`` builds ``lora_A = Conv(in, r, kernel, stride, padding)``: no ``dilation``, default
``padding_mode="zeros"``. Canonical conv LoRA applies ``A`` with the base conv's geometry, so
``y = conv(x, W) + s * B(conv(x, A))`` with the same dilation and padding mode. PEFT gives wrong values
(``padding="same"`` or a non-zero padding mode) or a shape error (integer padding with dilation).
Exit status 1 when the bug is present.
"""

import sys

import peft
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def check(**conv_kw) -> str | None:
    torch.manual_seed(0)
    base = nn.Conv2d(2, 3, 3, dtype=torch.float64, **conv_kw)
    cfg = LoraConfig(target_modules=["layer"], r=2, lora_alpha=2, init_lora_weights=False)
    model = get_peft_model(Holder(base), cfg).eval()
    layer = model.get_base_model().layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        # The LoRA branch as a conv with the base's own geometry (the base conv does padding modes).
        lora_a = nn.Conv2d(2, 2, 3, bias=False, dtype=torch.float64, **conv_kw)
        lora_a.weight.copy_(A)
        want = base(x) + layer.scaling["default"] * F.conv2d(lora_a(x), B)
        try:
            got = model(x)
        except RuntimeError as e:
            return f"forward raised: {str(e).splitlines()[0]}"
    if got.shape != want.shape:
        return f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    return None if err < 1e-10 else f"max |error| {err:.3g}"


failures = []
for kw in (
    dict(padding="same", dilation=2),
    dict(padding=2, dilation=2),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=1, padding_mode="circular"),
):
    why = check(**kw)
    print(f"  Conv2d(2, 3, 3, {', '.join(f'{k}={v!r}' for k, v in kw.items())}): {why or 'ok'}")
    if why:
        failures.append(kw)
ok = not failures
print(f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: conv LoRA honours dilation and padding_mode")
sys.exit(0 if ok else 1)
