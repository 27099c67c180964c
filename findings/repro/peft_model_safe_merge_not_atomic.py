"""PEFT merge_and_unload(safe_merge=True) is not atomic for the model (model-safe-merge-not-atomic).

LoRA on two modules; a NaN in the deeper module's lora_A. The safe merge raises ValueError, as it
should, but the first module has already been merged and replaced by a plain nn.Linear: the model is
left half merged. Prints OK/FAIL; exits 1 while the bug is present.
"""

import sys
import warnings

import peft
import torch
import transformers

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()
torch.manual_seed(0)
cfg = transformers.LlamaConfig(
    vocab_size=8,
    hidden_size=4,
    head_dim=2,
    intermediate_size=4,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    tie_word_embeddings=False,
)
targets = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj"]
lora = peft.get_peft_model(
    transformers.LlamaForCausalLM(cfg).eval(),
    peft.LoraConfig(target_modules=targets, init_lora_weights=False),
)
with torch.no_grad():
    lora.base_model.model.model.layers[0].mlp.up_proj.lora_A["default"].weight[0, 0] = float("nan")
before = {n: type(m).__name__ for n, m in lora.named_modules()}
try:
    lora.merge_and_unload(safe_merge=True)
    print("no error raised")
except ValueError as e:
    print(f"raised: {str(e)[:80]}")
after = {n: type(m).__name__ for n, m in lora.named_modules()}
changed = sorted(n for n in before if after.get(n) != before[n])
print(f"modules changed by the refused merge: {changed}")
print("FAIL" if changed else "OK")
sys.exit(1 if changed else 0)
