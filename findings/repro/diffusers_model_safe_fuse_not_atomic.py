"""diffusers 0.42.1 (PEFT 0.21.2 backend): a refused model-level ``fuse_lora(safe_fusing=True)`` is not
atomic for the model.

A tiny ``UNet2DConditionModel`` gets one LoRA adapter on ``conv_in`` (the first module) and on
``conv_out`` (the last), with a NaN in ``conv_out``'s ``lora_A``. ``fuse_lora(safe_fusing=True)`` raises
``ValueError`` as it should, but ``ModelMixin.fuse_lora`` walks the modules with ``self.apply`` and each
PEFT layer checks and writes only itself, so ``conv_in`` is already fused when ``conv_out`` refuses: the
model the user keeps after the error is neither the unfused nor a fused one. Prints FAIL and exits 1
while the bug is present.
"""

import sys

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

torch.manual_seed(0)
unet = UNet2DConditionModel(
    sample_size=4,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(2,),
    down_block_types=("DownBlock2D",),
    up_block_types=("UpBlock2D",),
    mid_block_type=None,
    norm_num_groups=1,
    cross_attention_dim=1,
).eval()
unet.add_adapter(
    LoraConfig(target_modules=["conv_in", "conv_out"], r=1, lora_alpha=1, init_lora_weights=False), "default"
)
with torch.no_grad():
    unet.conv_out.lora_A["default"].weight[0, 0, 0, 0] = float("nan")
before = {k: v.clone() for k, v in unet.state_dict().items()}
try:
    unet.fuse_lora(lora_scale=1.0, safe_fusing=True)
    print("FAIL: fuse_lora(safe_fusing=True) accepted a NaN adapter")
    sys.exit(1)
except ValueError as e:
    print("fuse_lora(safe_fusing=True) raised ValueError:", str(e).splitlines()[0][:90])
same = {k: torch.allclose(v, before[k], rtol=0, atol=0, equal_nan=True) for k, v in unet.state_dict().items()}
changed = [k for k, ok in same.items() if not ok]
print("parameters changed by the refused fuse:", changed)
print("conv_in merged adapters:", unet.conv_in.merged_adapters)
ok = not changed and not unet.conv_in.merged_adapters
print("OK" if ok else "FAIL: the refused safe fuse left conv_in fused into its base weight")
sys.exit(0 if ok else 1)
