"""PEFT loads an adapter into a model that lacks one of its layers silently (model-load-unexpected-keys).

A LoRA on ``up_proj`` of both layers of a 2-layer Llama is saved, then loaded with
``PeftModel.from_pretrained`` into a 1-layer Llama. The weights for layer 1 have nowhere to go: PEFT must
raise or report them (newer releases warn about the unexpected keys). Old releases drop them silently, so
the user runs a different model than the one saved. Prints OK/FAIL; exits 1 while the bug is present.
"""

import sys
import tempfile
import warnings

import peft
import torch
import transformers

transformers.logging.set_verbosity_error()
torch.manual_seed(0)


def llama(layers: int) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=8,
        hidden_size=4,
        intermediate_size=4,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


targets = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
model = peft.get_peft_model(llama(2), peft.LoraConfig(target_modules=targets, init_lora_weights=False))
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft.PeftModel.from_pretrained(llama(1), tmp)
            raised = None
        except (ValueError, KeyError, RuntimeError) as e:
            raised = f"{type(e).__name__}: {e}"
reported = [str(w.message)[:100] for w in caught if "layers.1" in str(w.message) or "key" in str(w.message)]
ok = bool(raised or reported)
print(f"raised: {raised}; warnings about the keys: {reported}")
print(
    f"peft {peft.__version__}: {'OK' if ok else 'FAIL'}: loading an adapter whose layer-1 weights the model "
    f"lacks raises or reports it"
)
sys.exit(0 if ok else 1)
