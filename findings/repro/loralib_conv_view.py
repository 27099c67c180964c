"""loralib 0.1.2: Conv1d/Conv3d with kernel_size > 1 cannot run.

``ConvLoRA`` builds ``lora_A (r*k, in*k)`` and ``lora_B (out/g*k, r*k)`` for every conv class and views
``lora_B @ lora_A`` (``out*in*k**2/g`` elements) as the weight, which has ``out*in*k/g`` (Conv1d) or
``out*in*k**3/g`` (Conv3d) elements. The forward and ``eval()`` (the merge) both raise in ``.view``.
Prints FAIL and exits 1 while the bug is present.
"""

import sys

import loralib as lora
import torch

bad = []
for cls, x in ((lora.Conv1d, torch.randn(1, 2, 5)), (lora.Conv3d, torch.randn(1, 2, 4, 4, 4))):
    layer = cls(2, 2, 3, r=1)
    for what in ("forward", "eval() merge"):
        layer.train()
        try:
            layer(x) if what == "forward" else layer.eval()
            print(f"OK   {cls.__name__}(2, 2, kernel_size=3, r=1) {what}")
        except RuntimeError as e:
            bad.append(cls.__name__)
            print(f"FAIL {cls.__name__}(2, 2, kernel_size=3, r=1) {what}: {str(e).splitlines()[0]}")
sys.exit(1 if bad else 0)
