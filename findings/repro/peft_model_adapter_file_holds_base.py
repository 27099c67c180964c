"""PEFT save_pretrained writes base weights into the adapter file (model-adapter-file-holds-base).

LoRA on lm_head of a tiny Llama. With the default save_embedding_layers="auto", PEFT saves the base
lm_head weight next to the LoRA factors (documented: it assumes embeddings may have been resized), so
the adapter file is as large as the vocabulary matrix. Prints OK/FAIL; exits 1 while it does.
"""

import sys
import tempfile
import warnings

import peft
import torch
import transformers
from safetensors.torch import load_file

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
lora = peft.get_peft_model(
    transformers.LlamaForCausalLM(cfg), peft.LoraConfig(target_modules=["lm_head"], r=1)
)
with tempfile.TemporaryDirectory() as d:
    lora.save_pretrained(d)
    keys = sorted(load_file(f"{d}/adapter_model.safetensors"))
base = [k for k in keys if "lora_" not in k]
print(f"saved tensors: {keys}")
print("FAIL" if base else "OK")
sys.exit(1 if base else 0)
