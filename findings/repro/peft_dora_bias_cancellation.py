"""PEFT's unmerged DoRA forward loses ``x W`` to cancellation when the base layer has a bias.

``DoraLinearLayer.forward`` is handed the base output ``round(x W + b)`` (in the layer's dtype) and
recovers ``x W`` as ``round(x W + b) - b`` before scaling it by ``m / ||W + s B A|| - 1``. Where
``|b|`` is much larger than ``|x W|`` the subtraction keeps only the top bits of ``x W``, and the DoRA
factor multiplies that error. Example (float16, the shrunk example of the suite's thorough run, seed 1,
``merge_roundtrip linear float16``): ``x W = 0.0102``, ``b = -1.357``, ``m / ||V|| = 67.7``: the output is
off by 0.032 (162 units of roundoff of the output's magnitude), while the merged layer is within
6.1e-5 of the exact answer. Computing ``x W`` without the bias (``F.linear(x, W)``) avoids it.

The same numbers run through a ``Linear(1, 1)`` and a 1x1 ``Conv2d(1, 1)``, in float16 and in float32 (there
with the bias 2^13 times larger, so that ``x W + b`` loses as many bits): PEFT reuses the base output for
Linear from 0.14 and for Conv from 0.15. A float16 DoRA conv cannot run at all in 0.12-0.14
(dora-conv-half-train), so float32 shows the conv's lower end. Exit status 1 when the bug shows anywhere.
"""

import sys

import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

W, B_BIAS, A, B, M, X, ALPHA = (
    -0.09173583984375,
    -1.357421875,
    0.451904296875,
    -0.6,
    8.5,
    -0.1116943359375,
    0.125,
)
U = {torch.float16: 2.0**-11, torch.float32: 2.0**-24}  # unit roundoff
BIAS_GAIN = {torch.float16: 1.0, torch.float32: 2.0**13}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def dora_config() -> LoraConfig:
    """``r = 1`` DoRA on the held layer; a ``TypeError`` in releases without DoRA (before 0.9)."""
    return LoraConfig(target_modules=["layer"], r=1, lora_alpha=ALPHA, use_dora=True)


def unmerged_and_merged(kind: str, dtype: torch.dtype) -> tuple[float, float]:
    """The DoRA layer's eval output for x = X, unmerged then merged (nan when the merged forward fails)."""
    base = nn.Linear(1, 1, dtype=dtype) if kind == "Linear" else nn.Conv2d(1, 1, 1, dtype=dtype)
    with torch.no_grad():
        base.weight.fill_(W)
        base.bias.fill_(B_BIAS * BIAS_GAIN[dtype])
    model = get_peft_model(Holder(base), dora_config())
    layer = model.base_model.model.layer
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(A)
        layer.lora_B["default"].weight.fill_(B)
        magnitude = layer.lora_magnitude_vector["default"]
        getattr(magnitude, "weight", magnitude).fill_(M)  # a bare Parameter before 0.12
    model.eval()
    x = torch.full((1, 1) if kind == "Linear" else (1, 1, 1, 1), X, dtype=dtype)
    with torch.no_grad():
        y = model(x).double().item()
        layer.merge()
        try:
            y_merged = model(x).double().item()
        except RuntimeError:  # 0.12-0.15 leave a merged half-precision DoRA weight in float32
            y_merged = float("nan")
    return y, y_merged


V = W + ALPHA * B * A  # scaling alpha / r with r = 1
try:
    dora_config()
except TypeError as e:
    print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    sys.exit(0)
failed = []
for kind in ("Linear", "Conv2d"):
    for dtype in (torch.float16, torch.float32):
        name, bias = f"{kind} {str(dtype)[6:]}", B_BIAS * BIAS_GAIN[dtype]
        try:
            y, y_merged = unmerged_and_merged(kind, dtype)
        except RuntimeError as e:  # a half-precision DoRA conv in 0.12-0.14 (dora-conv-half-train)
            print(f"peft {peft.__version__}: {name} cannot run: {str(e).splitlines()[0][:100]}")
            continue
        exact = X * M * V / abs(V) + bias
        err, err_merged = abs(y - exact), abs(y_merged - exact)
        ok = err <= 4 * U[dtype] * max(abs(exact), abs(bias))
        failed += [] if ok else [name]
        print(
            f"peft {peft.__version__}: {name} {'OK' if ok else 'FAIL'}: DoRA, x W = {X * W:.4g}, "
            f"bias {bias:.6g}, "
            f"m/||V|| = {M / abs(V):.3g}: unmerged output {y:.9g}, merged {y_merged:.9g}, exact {exact:.9g} "
            f"(errors {err:.2g} and {err_merged:.2g}; {err / (U[dtype] * abs(exact)):.1f} u of the output)"
        )
print(f"peft {peft.__version__}: {'FAIL: ' + ', '.join(failed) if failed else 'OK'}")
sys.exit(1 if failed else 0)
