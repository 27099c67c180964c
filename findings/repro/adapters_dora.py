"""adapter-hub `adapters` DoRA (LoRAConfig(use_dora=True)) departs from DoRA three ways (adapters-dora).

A tiny BERT, DoRA on intermediate.dense with r=2, alpha=1 (scaling 1/2), random factors. DoRA's layer is
    y = m * (W + s B A) x / ||W + s B A||_row + b
(PEFT's definition; the bias is not rescaled). adapters 1.3.0:
  1. the forward normalises by ||W + B A|| (the scaling s left out) and rescales the bias too;
  2. so merge_adapter (nearly DoRA's merged weight) and the unmerged forward disagree: merged != unmerged;
  3. reset_adapter after a DoRA merge computes the unmerged weight and never writes it back;
  4. on GPT-2 (Conv1D, fan_in_fan_out) the magnitude is taken from the rows of the stored (in, out)
     weight: add_adapter crashes when in != out (every GPT-2 MLP module).
Prints each check and OK/FAIL; exits 1 while any is present.
"""

import sys
import warnings

import adapters
import torch
import transformers

warnings.simplefilter("ignore")
transformers.logging.set_verbosity_error()
torch.manual_seed(0)
cfg = transformers.BertConfig(
    vocab_size=8, hidden_size=4, num_attention_heads=1, intermediate_size=3, num_hidden_layers=1
)
model = transformers.BertModel(cfg).eval()
adapters.init(model)
model.add_adapter(
    "d",
    config=adapters.LoRAConfig(
        r=2, alpha=1, intermediate_lora=True, selfattn_lora=False, use_dora=True, init_weights="bert"
    ),
)
model.set_active_adapters("d")
layer = model.encoder.layer[0].intermediate.dense
lora = layer.loras["d"]
with torch.no_grad():
    lora.lora_B.normal_()
    lora.lora_A.normal_()
    layer.bias.normal_()
W, b = layer.weight.detach().double().clone(), layer.bias.detach().double()
A, B, m, s = lora.lora_A.double(), lora.lora_B.double(), lora.m.weight.double().reshape(-1), lora.scaling
V = W + s * B @ A
x = torch.randn(2, 4, dtype=torch.float64)
exact = (m / V.norm(dim=1)) * (x @ V.T) + b
with torch.no_grad():
    got = layer(x.float()).double()
    fwd_err = (got - exact).abs().max().item()
    model.merge_adapter("d")
    merged = layer(x.float()).double()
    merge_err = (merged - got).abs().max().item()
    merged_exact = (merged - exact).abs().max().item()
    model.reset_adapter()
    reset_err = (layer.weight.double() - W).abs().max().item()
print(f"1. forward vs DoRA (scaling {s}): max error {fwd_err:.3g}")
print(f"2. merged vs unmerged output: max difference {merge_err:.3g} (merged vs DoRA: {merged_exact:.3g})")
print(f"3. weight after merge_adapter + reset_adapter vs original: max difference {reset_err:.3g}")
gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=4, n_head=1, n_layer=1, vocab_size=8))
adapters.init(gpt2)
try:
    gpt2.add_adapter(
        "d",
        config=adapters.LoRAConfig(r=2, alpha=1, selfattn_lora=False, intermediate_lora=True, use_dora=True),
    )
    gpt2_error = None
except RuntimeError as e:
    gpt2_error = f"{type(e).__name__}: {e}"
print(f"4. DoRA on GPT-2's mlp.c_fc (Conv1D 4 -> 16): {gpt2_error or 'added'}")
bad = fwd_err > 1e-5 or merge_err > 1e-5 or reset_err > 1e-5 or gpt2_error is not None
print("FAIL" if bad else "OK")
sys.exit(1 if bad else 0)
