"""PEFT safe merge is not atomic over several adapters: a refused merge leaves earlier adapters merged.

``merge(safe_merge=True)`` checks each adapter's merged weights for NaN/Inf just before writing that
adapter, in turn. With two adapters where the second holds a NaN, the first is written (and recorded in
``merged_adapters``) before the ``ValueError`` for the second. A safe merge that raises must leave the
layer exactly as it was. Linear, Embedding, Conv and MultiheadAttention alike.
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


failures = []
for base in (nn.Linear(3, 2), nn.Embedding(4, 2), nn.Conv2d(2, 2, 1), nn.MultiheadAttention(2, 1)):
    torch.manual_seed(0)
    try:
        model = get_peft_model(
            Holder(base), LoraConfig(target_modules=["layer"], r=1, init_lora_weights=False)
        )
    except ValueError:
        print(f"  {type(base).__name__}: n/a (this release has no LoRA for it)")
        continue
    model.add_adapter("other", LoraConfig(target_modules=["layer"], r=1, init_lora_weights=False))
    layer = model.get_base_model().layer
    layer.set_adapter(["default", "other"])
    a = layer.lora_embedding_A if isinstance(base, nn.Embedding) else layer.lora_A
    with torch.no_grad():
        (a["other"] if isinstance(base, nn.Embedding) else a["other"].weight).view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    try:
        layer.merge(safe_merge=True)
        outcome = "did not raise"
    except AttributeError as e:
        outcome = f"safe merge crashed: AttributeError: {e}"
    except ValueError:
        changed = [
            k
            for k, v in layer.state_dict().items()
            if not torch.equal(v.view(torch.int32), before[k].view(torch.int32))
        ]
        outcome = f"raised; merged_adapters={layer.merged_adapters}, changed={changed}"
        if not changed and not layer.merged_adapters:
            outcome = None
    print(f"  {type(base).__name__}: {outcome or 'raised, state unchanged'}")
    if outcome:
        failures.append(type(base).__name__)
ok = not failures
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: refused safe merge leaves the layer unchanged"
    + ("" if ok else f" (not for {', '.join(failures)})")
)
sys.exit(0 if ok else 1)
