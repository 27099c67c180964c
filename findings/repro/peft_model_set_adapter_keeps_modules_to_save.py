"""An adapter made active with ``base_model.set_adapter`` runs another adapter's ``modules_to_save`` copy
(model-set-adapter-keeps-modules-to-save).

``default`` trains a whole module (``modules_to_save``) besides its LoRA; ``other`` has only a LoRA.
``model.base_model.set_adapter(["other"])`` (the documented way to choose the active adapters, one or
several) must make the model compute with ``other`` alone, so its output may not depend on ``default``'s
trained copy. Where ``LoraModel.set_adapter`` switches the LoRA layers but not the ``ModulesToSaveWrapper``s,
the wrapper keeps ``default`` active and ``other``'s output moves when ``default``'s copy changes. The suite
sees it as ``model_adapter_isolation``: ``other``'s output changes once ``default`` is deleted (the wrapper
then falls back to the base module). Prints OK/FAIL; exits 1 while the bug is present.
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
saved = "model.layers.0.mlp.down_proj"
lora = peft.LoraConfig(
    target_modules=["model.layers.0.mlp.up_proj"], modules_to_save=[saved], init_lora_weights=False
)
model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg).eval(), lora)
model.add_adapter(
    "other", peft.LoraConfig(target_modules=["model.layers.0.mlp.up_proj"], init_lora_weights=False)
)
ids = torch.tensor([[1, 2, 3]])
model.base_model.set_adapter(["other"])
copy = dict(model.named_parameters())[f"base_model.model.{saved}.modules_to_save.default.weight"]
with torch.no_grad():
    before = model(input_ids=ids).logits
    copy.add_(torch.randn_like(copy))  # train default's copy further: 'other' must not notice
    after = model(input_ids=ids).logits
moved = (after - before).abs().max().item()
print(f"'other' active; default's modules_to_save copy changed: output moved by {moved:.3g}")
print(
    f"peft {peft.__version__}: {'OK' if moved == 0 else 'FAIL'}: base_model.set_adapter(['other']) leaves "
    f"'other' independent of default's modules_to_save"
)
sys.exit(0 if moved == 0 else 1)
