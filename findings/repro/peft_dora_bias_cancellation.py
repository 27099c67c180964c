"""PEFT's unmerged DoRA forward loses ``x W`` to cancellation when the base layer has a bias.

``DoraLinearLayer.forward`` is handed the base output ``round(x W + b)`` (in the layer's dtype) and
recovers ``x W`` as ``round(x W + b) - b`` before scaling it by ``m / ||W + s B A|| - 1``. Where
``|b|`` is much larger than ``|x W|`` the subtraction keeps only the top bits of ``x W``, and the DoRA
factor multiplies that error. Example (float16, the shrunk example of the suite's thorough run, seed 1,
``merge_roundtrip linear float16``): ``x W = 0.0102``, ``b = -1.357``, ``m / ||V|| = 69.5``: the output is
off by 0.034 (26.8 units of roundoff of the output's magnitude), while the merged layer is within
4.4e-4 of the exact answer. Computing ``x W`` without the bias (``F.linear(x, W)``) avoids it.
Exit status 1 when the bug is present.
"""

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


base = nn.Linear(1, 1, dtype=torch.float16)
with torch.no_grad():
    base.weight.fill_(-0.09173583984375)
    base.bias.fill_(-1.357421875)
try:
    cfg = LoraConfig(target_modules=["layer"], r=1, lora_alpha=0.125, use_dora=True)
    model = get_peft_model(Holder(base), cfg)
except (TypeError, ValueError) as e:
    print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    sys.exit(0)
layer = model.base_model.model.layer

with torch.no_grad():
    layer.lora_A["default"].weight.fill_(0.451904296875)
    layer.lora_B["default"].weight.fill_(-0.6)
    layer.lora_magnitude_vector["default"].weight.fill_(8.5)
model.eval()
x = torch.tensor([[-0.1116943359375]], dtype=torch.float16)
W, b, s = base.weight.double().item(), base.bias.double().item(), 0.125
V = W + s * (-0.6) * 0.451904296875
exact = x.double().item() * 8.5 * V / abs(V) + b
with torch.no_grad():
    y = model(x).double().item()
    layer.merge()
    y_merged = model(x).double().item()
u = 2.0**-11
err, err_merged = abs(y - exact), abs(y_merged - exact)
ok = err <= 4 * u * max(abs(exact), abs(b))
xw = x.double().item() * W
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: float16 DoRA Linear(1, 1), x W = {xw:.4g}, "
    f"bias {b:.4g}, m/||V|| = {8.5 / abs(V):.3g}: unmerged output {y:.6g}, merged {y_merged:.6g}, "
    f"exact {exact:.6g} (errors {err:.2g} and {err_merged:.2g}; {err / (u * abs(exact)):.1f} u of the output)"
)
sys.exit(0 if ok else 1)
