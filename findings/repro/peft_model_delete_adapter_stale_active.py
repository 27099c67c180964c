"""After deleting an inactive adapter, every forward raises KeyError (model-delete-adapter-stale-active).

Two adapters on a tiny Llama; ``model.base_model.set_adapter(["other"])`` (the documented way to choose
the active adapters, one or several) makes ``other`` the only active one, then ``delete_adapter("default")``
deletes the now inactive one. The model must keep computing with ``other``. Where ``PeftModel`` keeps its
own copy of the active adapter's name, that copy still says ``default`` and the forward looks up a deleted
config. Prints OK/FAIL; exits 1 while the bug is present.
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
    intermediate_size=4,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)
lora = peft.LoraConfig(target_modules=["model.layers.0.mlp.up_proj"], init_lora_weights=False)
model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).eval(), lora)
model.add_adapter(
    "other", peft.LoraConfig(target_modules=["model.layers.0.mlp.up_proj"], init_lora_weights=False)
)
ids = torch.tensor([[1, 2, 3]])
model.base_model.set_adapter(["other"])
with torch.no_grad():
    before = model(input_ids=ids).logits
    model.delete_adapter("default")
    try:
        after = model(input_ids=ids).logits
        problem = (
            None if torch.equal(before, after) else f"output moved by {(after - before).abs().max():.3g}"
        )
    except Exception as e:  # noqa: BLE001 - the failure this script shows
        problem = f"forward raises {type(e).__name__}: {e}"
print(f"after delete_adapter('default') with 'other' active: {problem or 'same output'}")
print(
    f"peft {peft.__version__}: {'OK' if problem is None else 'FAIL'}: deleting an inactive adapter keeps "
    f"the active one working"
)
sys.exit(0 if problem is None else 1)
