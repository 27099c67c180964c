"""adapter-hub `adapters` save_adapter writes the model's base LM head next to the adapter
(adapters-save-with-head, documented: `with_head=True` is the default).

A tiny GPT-2 (tied embeddings), one LoRA on mlp.c_fc. The saved directory holds the LoRA factors and
pytorch_model_head.bin with lm_head.weight: the whole (tied) input embedding of the base model. Prints
what was saved and OK/FAIL; exits 1 while base weights are saved with the adapter.
"""

import sys
import tempfile
import warnings
from pathlib import Path

import adapters
import torch
import transformers

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(
    transformers.GPT2Config(vocab_size=8, n_embd=4, n_head=1, n_layer=1)
).eval()
adapters.init(model)
model.add_adapter("a", config=adapters.LoRAConfig(r=2, alpha=2, selfattn_lora=False, intermediate_lora=True))
with tempfile.TemporaryDirectory() as tmp:
    model.save_adapter(tmp, "a")
    saved = {
        f"{f.name}/{k}": tuple(v.shape) for f in Path(tmp).glob("*.bin") for k, v in torch.load(f).items()
    }
for key, shape in sorted(saved.items()):
    print(key, shape)
base = [k for k in saved if "loras" not in k]
print(f"base tensors in the adapter directory: {base}")
print("FAIL" if base else "OK")
sys.exit(1 if base else 0)
