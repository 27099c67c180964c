"""PEFT's bitsandbytes LoRA layers merge a LoRA bias wrongly: unscaled, and a safe merge crashes on it.

``lora.Linear4bit.merge`` / ``lora.Linear8bitLt.merge`` (PEFT 0.21.2) add ``lora_B.bias`` to the base
bias without ``scaling`` (the forward applies ``scaling``, as does ``lora.Linear``'s merge), so merged
outputs move by ``(scaling - 1) * lora_B.bias``; unmerge subtracts the same unscaled amount. And with
``safe_merge=True`` the bias check is ``not torch.isfinite(bias_data)`` on a vector: ``RuntimeError:
Boolean value of Tensor with more than one value is ambiguous``, raised after the quantized weight was
already replaced (the layer is left half merged, ``merged_adapters`` empty).
Reached as a user does: a one-layer model loaded with ``BitsAndBytesConfig`` on CPU, ``get_peft_model``.
Exit status 1 when either bug is present.
"""

import sys
import warnings

import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

warnings.simplefilter("ignore")


class Config(PretrainedConfig):
    model_type = "repro_one_linear"


class OneLinear(PreTrainedModel):
    config_class = Config

    def __init__(self, config):
        super().__init__(config)
        self.layer = nn.Linear(16, 4)
        self.tail = nn.Linear(1, 1, bias=False)  # transformers keeps the last module unquantized
        self.post_init()

    def forward(self, x):
        return self.layer(x)

    def _init_weights(self, module):
        pass

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return None


def build(quant, zero_b_weight=True):
    torch.manual_seed(0)
    state = {
        "layer.weight": torch.randn(4, 16),
        "layer.bias": torch.randn(4),
        "tail.weight": torch.zeros(1, 1),
    }
    model = OneLinear.from_pretrained(
        None,
        config=Config(),
        state_dict=state,
        quantization_config=quant,
        device_map="cpu",
        dtype=torch.float32,
    )
    cfg = LoraConfig(r=2, lora_alpha=8, target_modules=["layer"], lora_bias=True, init_lora_weights=False)
    model = get_peft_model(model, cfg).eval()
    layer = model.base_model.model.layer
    with torch.no_grad():
        if zero_b_weight:  # only the LoRA bias differs from the base: no requantization noise
            layer.lora_B["default"].weight.zero_()
        layer.lora_B["default"].bias.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
    return layer


failures = []
for name, quant in (
    ("Linear4bit nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)),
    ("Linear8bitLt", BitsAndBytesConfig(load_in_8bit=True)),
):
    layer = build(quant)
    x = torch.randn(2, 16)
    with torch.no_grad():
        before = layer(x)
        bias_before = layer.get_base_layer().bias.detach().clone()
        layer.merge()
        moved = layer.get_base_layer().bias - bias_before
        want = layer.lora_B["default"].bias * layer.scaling["default"]
        ok = torch.allclose(moved, want)
        print(
            f"{name}: merged bias moved by {moved.tolist()}, expected scaling * b = {want.tolist()}:",
            "OK" if ok else "FAIL",
        )
        if not ok:
            failures.append(f"{name} merge")
    layer = build(quant, zero_b_weight=False)
    w0 = layer.get_base_layer().weight.detach().clone()
    try:
        layer.merge(safe_merge=True)
        print(f"{name}: safe merge with a finite LoRA bias: OK")
    except Exception as e:  # noqa: BLE001
        changed = not torch.equal(layer.get_base_layer().weight.detach(), w0)
        print(f"{name}: safe merge raised {type(e).__name__}: {e}; weight already replaced: {changed}: FAIL")
        failures.append(f"{name} safe merge")

print(f"peft {peft.__version__}:", "FAIL" if failures else "OK", failures)
sys.exit(1 if failures else 0)
