"""PEFT's TorchaoLoraLinear (torchao int8 weight-only base): merging several adapters crashes, and a safe
merge never looks at the delta.

``TorchaoLoraLinear.merge`` (PEFT 0.21.2) loops over the adapters with ``weight = weight.dequantize()``
and ends each iteration with ``del weight``: the second adapter hits ``UnboundLocalError``. With
``safe_merge=True`` it checks ``torch.isfinite(weight)`` on the dequantized *base* before adding the
delta, so a NaN in ``lora_A`` is merged (and quantized) without a ``ValueError``.
Reached as a user does: a one-layer model loaded with ``TorchAoConfig(Int8WeightOnlyConfig())`` on CPU,
then ``get_peft_model``. Exit status 1 when either bug is present.
"""

import sys
import warnings

import peft
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig
from transformers import PretrainedConfig, PreTrainedModel, TorchAoConfig

warnings.simplefilter("ignore")


class Config(PretrainedConfig):
    model_type = "repro_one_linear_ao"


class OneLinear(PreTrainedModel):
    config_class = Config

    def __init__(self, config):
        super().__init__(config)
        self.layer = nn.Linear(8, 4, bias=False)
        self.tail = nn.Linear(1, 1, bias=False)
        self.post_init()

    def forward(self, x):
        return self.layer(x)

    def _init_weights(self, module):
        pass

    def get_input_embeddings(self):
        return None

    def get_output_embeddings(self):
        return None


def build(adapters):
    torch.manual_seed(0)
    state = {"layer.weight": torch.randn(4, 8), "tail.weight": torch.zeros(1, 1)}
    model = OneLinear.from_pretrained(
        None,
        config=Config(),
        state_dict=state,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
        device_map="cpu",
        dtype=torch.float32,
    )
    cfg = LoraConfig(r=2, target_modules=["layer"], init_lora_weights=False)
    model = get_peft_model(model, cfg, adapter_name=adapters[0])
    for name in adapters[1:]:
        model.add_adapter(name, cfg)
    return model.base_model.model.layer


failures = []
layer = build(["a", "b"])
try:
    layer.merge(adapter_names=["a", "b"])
    print("merge of two adapters: OK")
except Exception as e:  # noqa: BLE001
    print(f"merge of two adapters: {type(e).__name__}: {e}: FAIL")
    failures.append("merge two adapters")

layer = build(["a"])
with torch.no_grad():
    layer.lora_A["a"].weight[0, 0] = float("nan")
try:
    layer.merge(safe_merge=True)
    finite = bool(torch.isfinite(layer.get_base_layer().weight.dequantize()).all())
    print(f"safe merge of a NaN delta: accepted, merged weights finite: {finite}: FAIL")
    failures.append("safe merge")
except ValueError:
    print("safe merge of a NaN delta: ValueError: OK")

print(f"peft {peft.__version__}:", "FAIL" if failures else "OK", failures)
sys.exit(1 if failures else 0)
