"""PEFT's quantized LoRA layers, reached the way users reach them.

HQQ: transformers 5.24 refuses ``HqqConfig`` ("not available yet"), so users put ``HQQLinear`` (hqq's
own module, quantizing an ``nn.Linear``) into their model and call ``get_peft_model``, which gives
``HqqLoraLinear``; that is what is built here.

torchao: the same one-layer model loaded with ``TorchAoConfig(Int8WeightOnlyConfig())``, which attaches
the re-quantization function PEFT's ``TorchaoLoraLinear`` needs to merge.

bitsandbytes: a one-layer ``transformers`` model is loaded with ``from_pretrained(None, config=...,
state_dict=..., quantization_config=BitsAndBytesConfig(...), device_map="cpu")`` (in memory, no files),
then ``get_peft_model``: PEFT picks ``lora.Linear8bitLt`` / ``lora.Linear4bit`` from the model's
quantization flags, as it does for a real checkpoint. A hand-built module tree holding a bnb layer is
not the same path (``shared/notes/quantized.md``). The stored codes are read back from the bnb
parameters (``_bnb_state``). What the installed versions can do is detected by feature.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from properties.quantized.state import QuantState
from properties.spec import HQQ_KINDS, QUANT_KINDS, LayerSpec, QuantSpec
from properties.targets.protocol import Unsupported

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BNB4_DEFAULT_BLOCK = 64


def available() -> tuple[frozenset[str], dict[str, str]]:
    """The quantized kinds this environment can build through PEFT, and why the others cannot."""
    notes: dict[str, str] = {}
    try:
        import bitsandbytes  # noqa: F401
        import transformers  # noqa: F401
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError as e:
        why = f"needs bitsandbytes and transformers ({e}); pip install 'lora-conformance[quant]'"
        return frozenset(), {k: why for k in QUANT_KINDS}
    kinds = set()
    notes["torchao_nf4"] = (
        "PEFT has no LoRA layer for torchao's NF4Tensor (torchtune's QLoRA base): it wraps such a layer as "
        "a plain lora.Linear, whose merge raises 'NotImplementedError: NF4Tensor dispatch: attempting to "
        "run aten.add_.Tensor' (peft 0.21.2, torchao 0.18); PEFT's 4-bit QLoRA is bnb_nf4"
    )
    try:
        import torchao.quantization  # noqa: F401
        from peft.tuners.lora import torchao as peft_torchao  # noqa: F401
        from transformers import TorchAoConfig  # noqa: F401

        kinds.add("torchao_int8")
    except ImportError as e:
        notes["torchao_int8"] = f"needs torchao, transformers' TorchAoConfig and peft's torchao LoRA ({e})"
    for kind, cls in (("bnb_int8", "Linear8bitLt"), ("bnb_nf4", "Linear4bit"), ("bnb_fp4", "Linear4bit")):
        if hasattr(peft_bnb, cls):
            kinds.add(kind)
        else:
            notes[kind] = f"peft has no lora.bnb.{cls}"
    try:
        import hqq.core.quantize  # noqa: F401
        from peft.tuners.lora.hqq import HqqLoraLinear  # noqa: F401

        kinds.update(HQQ_KINDS)
    except ImportError as e:
        notes.update({k: f"needs hqq and peft's HqqLoraLinear ({e})" for k in HQQ_KINDS})
    return frozenset(kinds), notes


def hqq_accepts_lora_bias() -> bool:
    """Whether PEFT's ``HqqLoraLinear`` takes a LoRA bias (0.21.2 raises "does not support lora_bias
    yet"), found by building one."""
    import peft

    from properties.targets._library import Holder

    spec = LayerSpec("linear", torch.float32, torch.ones(8, 1), (), quant=QuantSpec("hqq_8bit", 8, 8))
    try:
        cfg = peft.LoraConfig(target_modules=["layer"], r=1, lora_bias=True)
        peft.get_peft_model(Holder(_hqq_layer(spec)), cfg)
    except (ValueError, TypeError):
        return False
    return True


def _hqq_layer(spec: LayerSpec) -> nn.Module:
    """``HQQLinear`` quantizing an ``nn.Linear`` holding the spec's weights, on CPU, in the spec's
    compute dtype (what a user does before ``get_peft_model``: transformers 5.24 refuses HqqConfig)."""
    from properties.targets._hqq_state import check_shape, hqq_modules, quant_config

    hqq_linear, _ = hqq_modules()
    out_f, in_f = spec.weight.shape
    check_shape((out_f, in_f), spec.quant.block, spec.quant.bits)
    linear = nn.Linear(in_f, out_f, bias=spec.base_bias is not None, dtype=spec.dtype)
    with torch.no_grad():
        linear.weight.copy_(spec.weight)
        if spec.base_bias is not None:
            linear.bias.copy_(spec.base_bias)
    return hqq_linear(linear, quant_config(spec.quant), compute_dtype=spec.dtype, device="cpu")


@functools.cache
def _model_class() -> type:
    """A one-linear ``PreTrainedModel`` (module ``layer``), defined once, lazily (needs transformers)."""
    from transformers import PretrainedConfig, PreTrainedModel

    class OneLinearConfig(PretrainedConfig):
        model_type = "lora_conformance_one_linear"

        def __init__(self, in_features: int = 1, out_features: int = 1, bias: bool = False, **kw: Any):
            super().__init__(**kw)
            self.in_features, self.out_features, self.bias = in_features, out_features, bias

    class OneLinear(PreTrainedModel):
        config_class = OneLinearConfig
        base_model_prefix = "model"
        _no_split_modules: list[str] = []

        def __init__(self, config: OneLinearConfig) -> None:
            super().__init__(config)
            self.layer = nn.Linear(config.in_features, config.out_features, bias=config.bias)
            # transformers leaves a model's last parameter's module unquantized (an lm_head): this one.
            self.tail = nn.Linear(1, 1, bias=False)
            self.post_init()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

        def _init_weights(self, module: nn.Module) -> None:  # the weights are loaded, never drawn
            pass

        def get_input_embeddings(self) -> None:
            return None

        def get_output_embeddings(self) -> None:
            return None

    return OneLinear


def _quantization_config(spec: LayerSpec) -> Any:
    q = spec.quant
    if q.kind == "torchao_int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    if q.kind == "bnb_int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.kind[4:],
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=spec.dtype,
    )


def load_quantized_model(spec: LayerSpec) -> nn.Module:
    """The one-layer model with ``spec``'s weights, loaded through transformers with the spec's
    quantization config (what a user's ``from_pretrained(..., quantization_config=...)`` does)."""
    q = spec.quant
    if q.kind in HQQ_KINDS:
        from properties.targets._library import Holder

        return Holder(_hqq_layer(spec))
    if q.kind == "torchao_int8":
        from properties.targets._torchao_state import check_shape

        check_shape(tuple(spec.weight.shape))
    if q.kind in ("bnb_nf4", "bnb_fp4") and q.block != BNB4_DEFAULT_BLOCK:
        raise Unsupported(
            f"transformers' BitsAndBytesConfig has no block size (bnb's {BNB4_DEFAULT_BLOCK} only)"
        )
    cls = _model_class()
    out_f, in_f = spec.weight.shape
    config = cls.config_class(in_features=in_f, out_features=out_f, bias=spec.base_bias is not None)
    state = {
        "layer.weight": spec.weight.to(spec.dtype).clone(),
        "tail.weight": torch.zeros(1, 1, dtype=spec.dtype),
    }
    if spec.base_bias is not None:
        state["layer.bias"] = spec.base_bias.clone()
    return cls.from_pretrained(
        None,
        config=config,
        state_dict=state,
        quantization_config=_quantization_config(spec),
        device_map="cpu",
        dtype=spec.dtype,
    )


def quant_state_of(base: nn.Module) -> QuantState:
    """The bnb (or torchao) layer's stored codes and scales in canonical form."""
    from properties.targets._bnb_state import bnb4_state, bnb8_state
    from properties.targets._torchao_state import torchao_int8_state

    if type(base).__name__ == "HQQLinear":
        from properties.targets._hqq_state import hqq_state

        return hqq_state(base)
    w = base.weight
    kind = type(w).__name__
    if kind == "Int8Tensor":
        return torchao_int8_state(w)
    if kind == "Params4bit":
        return bnb4_state(w.data, w.quant_state)
    if kind == "Int8Params":
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = base.state.SCB
        return bnb8_state(w.data, scb)
    raise TypeError(f"the base weight is a {kind}, not a bitsandbytes quantized parameter")


def make_handle_class(base_handle: type) -> type:
    """The PEFT handle with what a quantized base changes: stored weights are codes (decoded for
    ``weights()``), ``quant_state()`` reports them, snapshots include them."""

    class PeftQuantizedHandle(base_handle):
        def quant_state(self) -> QuantState:
            return quant_state_of(self.layer.get_base_layer())

        def weights(self) -> dict[str, torch.Tensor]:
            base = self.layer.get_base_layer()
            out = {"weight": self.quant_state().decode().to(self.spec.dtype)}
            if self.spec.base_bias is not None:
                out["bias"] = base.bias.detach().clone()
            return out

        def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
            raise Unsupported("delta_weights is not checked on quantized bases")

        def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
            names = None if adapter_names is None else list(adapter_names)
            with self._translated("merge"):
                self.layer.merge(safe_merge=safe, adapter_names=names)

        def snapshot(self) -> dict[str, object]:
            # Quantized tensor subclasses (torchao's Int8Tensor) cannot be compared bit for bit; their
            # codes and scales come in through quant_state().
            snap = {
                k: v
                for k, v in super().snapshot().items()
                if not isinstance(v, torch.Tensor) or type(v) in (torch.Tensor, nn.Parameter)
            }
            snap.update({k: v.clone() for k, v in self.quant_state().tensors().items()})
            return snap

        def merge_and_unload(self) -> nn.Module:
            raise Unsupported("merge_and_unload is not checked on quantized bases")

    return PeftQuantizedHandle
