"""PEFT DoRA conv layers with a bf16/fp16 base crash in train mode when dropout is on.

``get_peft_model`` upcasts adapter weights to float32 by default (``autocast_adapter_dtype=True``), and the
forward casts ``x`` to the adapter dtype. With ``lora_dropout > 0`` in train mode,
``_DoraConvNdLayer.forward`` recomputes the base output as ``conv_fn(x, base_layer.weight)``: a float32 input
against a bf16/fp16 weight, which raises ``RuntimeError: expected scalar type Float but found BFloat16``.
The eval forward is checked too: in 0.13.2 it raised as well (dora.py), in 0.21.2 it is fine; DoRA Linear
is fine. Exit status 1 when a forward raises; the last line names the layer, dtype and mode.
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


failures = []
for dtype in (torch.bfloat16, torch.float16):
    for conv, x_shape in ((nn.Conv1d, (1, 2, 3)), (nn.Conv2d, (1, 2, 3, 3))):
        torch.manual_seed(0)
        try:
            cfg = LoraConfig(
                target_modules=["layer"], r=1, lora_dropout=0.1, use_dora=True, init_lora_weights=False
            )
        except TypeError as e:
            not_applicable(e)
        try:
            model = get_peft_model(Holder(conv(2, 2, 1, dtype=dtype)), cfg)
        except (ValueError, NotImplementedError) as e:  # no LoRA (ValueError) or no DoRA (0.15) for it
            reason = (str(e).splitlines() or [type(e).__name__])[0][:60]
            print(f"  {conv.__name__} {dtype}: n/a ({reason})")
            continue
        for mode in ("train", "eval"):  # eval too: up to 0.13/0.14 the eval forward raised as well
            model.train(mode == "train")
            try:
                y = model(torch.randn(x_shape).to(dtype))
                status = f"ok, output {y.dtype}"
            except RuntimeError as e:
                status = f"RuntimeError: {str(e).splitlines()[0]}"
                failures.append(f"{conv.__name__} {dtype} {mode}")
            print(f"  {conv.__name__} {dtype} {mode} forward: {status}")
ok = not failures
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: DoRA conv forward in half precision"
    + ("" if ok else f" crashes for {', '.join(failures)}")
)
sys.exit(0 if ok else 1)
