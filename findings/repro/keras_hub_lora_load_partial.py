"""keras-hub `load_lora_weights` loads part of an adapter without a word (keras-hub-lora-load-partial).

A LoRA saved from a 2-block `LlamaBackbone` (`enable_lora(1, ["query"])`, `save_lora_weights`) is
loaded into a 1-block backbone with the same `enable_lora`: `load_lora_weights` walks the *model's*
LoRA layers and looks each one up in the file by its index, so the file's entry for the block the
model lacks is never read. No error, no warning: half the adapter is silently dropped. Prints the
entries the file holds and how many were loaded; OK/FAIL, exits 1 while it loads silently.
"""

import os
import sys
import tempfile
import warnings

os.environ["KERAS_BACKEND"] = "torch"
import h5py  # noqa: E402
import keras_hub  # noqa: E402
import torch  # noqa: E402


def backbone(layers: int):
    return keras_hub.models.LlamaBackbone(
        vocabulary_size=8,
        num_layers=layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=4,
        intermediate_dim=4,
        dtype="float32",
    )


torch.manual_seed(0)
big = backbone(2)
big.enable_lora(1, target_layer_names=["query"])
for v in big.weights:
    if "lora_kernel_b" in v.path:
        v.assign(torch.randn(tuple(v.shape)))
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "adapter.lora.h5")
    big.save_lora_weights(path)
    with h5py.File(path) as f:
        entries = sorted(k for k in f["lora"] if k.isdigit())
    small = backbone(1)
    small.enable_lora(1, target_layer_names=["query"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            small.load_lora_weights(path)
            raised = None
        except Exception as e:  # noqa: BLE001 - any refusal is the right answer
            raised = e
loaded = len(small._lora_enabled_layers)
print(
    f"file holds LoRA entries {entries}; model loaded {loaded} of them; raised={raised!r}; "
    f"warnings={[str(w.message)[:60] for w in caught]}"
)
bad = raised is None and not caught and loaded < len(entries)
print("FAIL" if bad else "OK")
sys.exit(1 if bad else 0)
