"""PEFT merges a LoRA bias (``lora_bias=True``) unscaled, while the unmerged forward scales it.

With ``LoraConfig(lora_bias=True)`` the unmerged forward adds ``scaling * (B A x + b_B)``: the LoRA bias is
scaled with the rest of the branch. PEFT 0.14 and 0.15 merge ``b_B`` unscaled, so the merged layer's output
differs from the unmerged one by ``(1 - scaling) * b_B``. Checked for one adapter with a LoRA bias, and for
two adapters of which only the second has one. Exit status 1 when merged and unmerged outputs differ.
"""

import sys
import warnings

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


def config(**kw) -> LoraConfig:
    return LoraConfig(target_modules=["layer"], r=1, lora_alpha=0.125, init_lora_weights=False, **kw)


try:
    config(lora_bias=True)
except TypeError as e:
    print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {e}")
    sys.exit(0)

failed = []
CASES = (("one adapter, LoRA bias", [True]), ("two adapters, the second with a bias", [False, True]))
for label, biases in CASES:
    torch.manual_seed(0)
    model = get_peft_model(Holder(nn.Linear(1, 1, dtype=torch.float64)), config(lora_bias=biases[0]))
    for i, b in enumerate(biases[1:], 1):
        model.add_adapter(f"a{i}", config(lora_bias=b))
    layer = model.get_base_model().layer
    names = ["default"] + [f"a{i}" for i in range(1, len(biases))]
    with torch.no_grad():
        for n in names:
            if layer.lora_B[n].bias is not None:
                layer.lora_B[n].bias.fill_(0.5)
        layer.set_adapter(names)
        x = torch.ones(1, 1, dtype=torch.float64)
        unmerged = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge(adapter_names=names)
        merged = layer(x)
    err = (merged - unmerged).abs().max().item()
    print(f"  {label}: unmerged {unmerged.item():.6f}, merged {merged.item():.6f}, |diff| {err:.3g}")
    if err > 1e-12:
        failed.append(label)
ok = not failed
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: merged output = unmerged output with lora_bias"
    + ("" if ok else f" (not for: {', '.join(failed)})")
)
sys.exit(0 if ok else 1)
