"""keras-hub `save_lora_weights` crashes when the LoRA is on an embedding (keras-hub-lora-save-embedding).

`Backbone.enable_lora(rank, target_layer_names=["token_embedding"])` accepts the token embedding (a
`ReversibleEmbedding`, which has `enable_lora`), and the model trains and runs with it; then
`save_lora_weights` reads `layer.lora_kernel_a` of every LoRA layer ("we only lora the einsumdense
layers") and raises `AttributeError`: an embedding's factors are `lora_embeddings_a/b`. The adapter
cannot be saved. OK/FAIL, exits 1 while it crashes.
"""

import os
import sys
import tempfile

os.environ["KERAS_BACKEND"] = "torch"
import keras_hub  # noqa: E402

model = keras_hub.models.LlamaBackbone(
    vocabulary_size=8,
    num_layers=1,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=4,
    intermediate_dim=4,
    dtype="float32",
)
model.enable_lora(2, target_layer_names=["token_embedding", "query"])
with tempfile.TemporaryDirectory() as tmp:
    try:
        model.save_lora_weights(os.path.join(tmp, "adapter.lora.h5"))
        error = None
    except AttributeError as e:
        error = e
print(f"save_lora_weights with a LoRA on token_embedding: {error!r}")
print("FAIL" if error else "OK")
sys.exit(1 if error else 0)
