"""Keras 3 (torch backend) makes a float64 layer's LoRA variables float32 (keras-float64-lora).

`Dense(..., dtype="float64")` / `Embedding(..., dtype="float64")` then `enable_lora(rank)`: the kernel
is float64 but `lora_kernel_a/b` (`lora_embeddings_a/b`) are float32, so float64 factors are rounded to
float32 and the LoRA term carries float32 error into a float64 layer. Prints the dtypes and the error
of the embedding's output against float64 arithmetic; OK/FAIL, exits 1 while the factors are float32.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "torch"
import keras  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)
emb = keras.layers.Embedding(5, 3, dtype="float64")
emb.build((None,))
emb.enable_lora(2, lora_alpha=1.0)
a, b = torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
emb.lora_embeddings_a.assign(a)
emb.lora_embeddings_b.assign(b)
W = torch.as_tensor(emb._embeddings.value).detach().double()
exact = W + 0.5 * a @ b
with torch.no_grad():
    got = torch.as_tensor(emb(torch.arange(5))).double()
err = (got - exact).abs().max().item()
dtype = emb.lora_embeddings_a.dtype
print(
    f"embeddings {emb._embeddings.dtype}, lora_embeddings_a {dtype}; max |output - float64 exact| = {err:.3g}"
)
bad = dtype != "float64" or err > 1e-12
print("FAIL" if bad else "OK")
sys.exit(1 if bad else 0)
