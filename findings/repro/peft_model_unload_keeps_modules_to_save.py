"""PEFT unload() hands back the trained modules_to_save copy, not the base module
(model-unload-keeps-modules-to-save).

A tiny Llama; LoRA on q_proj with modules_to_save=["lm_head"], the trained copy of lm_head changed (as
training would). `unload()` is documented to "get back the base model by removing all the lora modules
without merging"; with adapters disabled the base lm_head is used, yet after unload() the model's
lm_head is the trained copy and its logits are not the base model's. Prints OK/FAIL; exits 1 while the
bug is present.
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
model = transformers.LlamaForCausalLM(cfg).eval()
ids = torch.tensor([[1, 2, 3]])
with torch.no_grad():
    base_logits = model(input_ids=ids).logits.clone()
    head_before = model.lm_head.weight.detach().clone()
    lora = peft.get_peft_model(
        model,
        peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    ).eval()
    lora.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)  # "trained"
    with lora.disable_adapter():
        disabled_ok = torch.equal(lora(input_ids=ids).logits, base_logits)
    unloaded = lora.unload()
    head_ok = torch.equal(unloaded.lm_head.weight, head_before)
    logits_ok = torch.equal(unloaded(input_ids=ids).logits, base_logits)
print(f"disabled = base: {disabled_ok}; after unload() lm_head = base: {head_ok}; logits = base: {logits_ok}")
ok = head_ok and logits_ok
print("OK" if ok else "FAIL")
sys.exit(0 if ok else 1)
