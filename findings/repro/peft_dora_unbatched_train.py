"""PEFT DoRA Linear in train mode with dropout returns the wrong shape for an unbatched (1-D) input.

With ``lora_dropout > 0`` in train mode, ``DoraLinearLayer.forward`` recomputes the base output and
multiplies it by ``mag_norm_scale.view(1, -1)``; for ``x`` of shape ``(in,)`` the result broadcasts to
``(1, out)``, while ``nn.Linear`` (and the same layer in eval mode) returns ``(out,)``.
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


def not_applicable(e: Exception) -> None:
    """This release cannot build the layer at all: the bug cannot be present."""
    print(f"peft {peft.__version__}: N/A: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    sys.exit(0)


torch.manual_seed(0)
base = nn.Linear(3, 2)
try:
    cfg = LoraConfig(target_modules=["layer"], r=1, lora_dropout=0.1, use_dora=True, init_lora_weights=False)
    model = get_peft_model(Holder(base), cfg)
except (TypeError, ValueError) as e:
    not_applicable(e)
x = torch.randn(3)
model.eval()
eval_shape = tuple(model(x).shape)
model.train()
train_shape = tuple(model(x).shape)
ok = train_shape == eval_shape == (2,)
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: DoRA Linear(3, 2), x of shape (3,): eval output "
    f"{eval_shape}, train output {train_shape}, expected (2,)"
)
sys.exit(0 if ok else 1)
