"""PEFT add_weighted_adapter(combination_type="cat") with rsLoRA scales the result by sqrt(r)
(model-weighted-cat-rslora).

The new adapter's config copies use_rslora=True from the first adapter but sets lora_alpha = r, so its
scaling is sqrt(r) instead of 1, while the concatenated factors already carry each adapter's scaling.
The delta must equal sum_i w_i * delta_i. Prints OK/FAIL; exits 1 while the bug is present.
"""

import sys
import warnings

import peft
import torch
from torch import nn

warnings.simplefilter("ignore")
torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5).double()

    def forward(self, x):
        return self.lin(x)


cfg = dict(target_modules=["lin"], r=2, lora_alpha=4, use_rslora=True, init_lora_weights=False)
try:
    first = peft.LoraConfig(**cfg)
except TypeError as e:  # rsLoRA arrived in 0.8
    print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {e}")
    sys.exit(0)
model = peft.get_peft_model(Net(), first, adapter_name="a")
model.add_adapter("b", peft.LoraConfig(**{**cfg, "r": 3}))
layer = model.base_model.model.lin
w = {"a": 0.5, "b": 2.0}
expected = sum(w[n] * layer.get_delta_weight(n) for n in w)
model.add_weighted_adapter(["a", "b"], [w["a"], w["b"]], "ab", combination_type="cat")
actual = layer.get_delta_weight("ab")
err = (actual - expected).abs().max().item()
print(
    f"max |delta(cat) - sum w_i delta_i| = {err:.3g} (scaling of the new adapter: {layer.scaling['ab']:.4g})"
)
print("FAIL" if err > 1e-12 else "OK")
sys.exit(1 if err > 1e-12 else 0)
