"""torchtune 0.6.1: a float32 QLoRA model's merged checkpoint holds its adapted weights in bfloat16.

The QLoRA builders (``lora_llama3(..., quantize_base=True)`` and the other ``lora_*`` builders) call
``_register_reparametrize_state_dict_hooks(model)`` without the model's dtype, so the hook dequantizes
every NF4 weight to its default, ``torch.bfloat16``, in ``state_dict()``. The recipes' merged export
(``recipes/lora_finetune_single_device.py``, ``save_checkpoint``) runs ``get_merged_lora_ckpt`` on that
state dict, which adds the float32 LoRA delta in place into the bfloat16 weight: in a float32 model the
merged checkpoint's quantized weights come back as bfloat16 (norms and embeddings float32), and the merged
weight is ``D(Wq) + ΔW`` rounded twice to bfloat16 (relative error up to ~2^-8 instead of float32's
2^-24). Run in envs/torchtune; exits 1 while the bug is present.
"""

import sys

import torch
from torchtune.models.llama3 import lora_llama3
from torchtune.modules.peft import get_merged_lora_ckpt

torch.manual_seed(0)
torch.set_default_dtype(torch.float32)  # what a recipe with `dtype: fp32` does around the builder
model = lora_llama3(
    lora_attn_modules=["q_proj"],
    vocab_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    embed_dim=128,  # q_proj: 128 x 128 = 16384 elements, what to_nf4's defaults (64 x 256) need
    max_seq_len=16,
    intermediate_dim=256,
    lora_rank=4,
    lora_alpha=8.0,
    quantize_base=True,
)
q = model.layers[0].attn.q_proj
torch.nn.init.normal_(q.lora_b.weight, std=0.02)  # as after training (B starts at zero)
with torch.no_grad():
    exact = q.weight.get_original_weight().double() + 2.0 * (
        q.lora_b.weight.double() @ q.lora_a.weight.double()
    )
state = {k: v.cpu() for k, v in model.state_dict().items()}  # the recipe's line
merged = get_merged_lora_ckpt(state, rank=4, alpha=8.0)
w = merged["layers.0.attn.q_proj.weight"]
err = ((w.double() - exact).abs().max() / exact.abs().max()).item()
norm = merged["layers.0.sa_norm.scale"].dtype
print(
    f"model float32: merged q_proj.weight is {w.dtype} (sa_norm.scale: {norm}); "
    f"max |merged - (D(Wq) + delta)| / max |D(Wq) + delta| = {err:.3g} (float32: ~6e-8)"
)
ok = w.dtype == torch.float32 and err < 1e-5
print("OK" if ok else "FAIL: the float32 QLoRA merged checkpoint is rounded to bfloat16")
sys.exit(0 if ok else 1)
