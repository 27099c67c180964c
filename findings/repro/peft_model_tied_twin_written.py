"""PEFT merge_and_unload on a tied model writes the untargeted twin (model-tied-twin-written).

A tiny Llama with tie_word_embeddings=True; LoRA on model.embed_tokens only. After merge_and_unload the
untargeted lm_head.weight must be the base lm_head (or PEFT must refuse); it changes silently, and the
logits move far beyond rounding. Prints OK/FAIL; exits 1 while the bug is present.
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
    tie_word_embeddings=True,
)
model = transformers.LlamaForCausalLM(cfg).eval()
head_before = model.lm_head.weight.detach().clone()
ids = torch.tensor([[1, 2, 3]])
with torch.no_grad():
    lora = peft.get_peft_model(
        model, peft.LoraConfig(target_modules=["model.embed_tokens"], init_lora_weights=False)
    )
    unmerged = lora(input_ids=ids).logits
    merged_model = lora.merge_and_unload()
    merged = merged_model(input_ids=ids).logits
changed = not torch.equal(merged_model.lm_head.weight, head_before)
print(f"lm_head changed: {changed}; max |merged - unmerged| logits: {(merged - unmerged).abs().max():.3g}")
print("FAIL" if changed else "OK")
sys.exit(1 if changed else 0)
