"""A quantized LoRA layer of our own, on the library's own quantizer, with exact merges.

The base weight is quantized by bitsandbytes (``quantize_4bit`` / ``int8_vectorwise_quant``, the
functions its ``Params4bit`` / ``Int8Params`` call), torchao (``quantize_`` with
``Int8WeightOnlyConfig``; ``to_nf4`` for NF4) or HQQ (a fresh ``HQQLinear.quantize``, as PEFT's merge
does). Everything between dequantize and quantize is exact float64: ``V = D(Wq) ± s B A``, checked
for finiteness *before* anything is written when the merge is safe, then handed to the same quantizer
(as float32; float16 for 8-bit, as bnb does). Its forward is the float64 answer on the decoded weight, rounded
once. It shows that a correct quantized merge passes the quantized properties;
``tests/quant_mutants.py`` breaks it on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from properties.quantized.state import F64, QuantState
from properties.spec import HQQ_KINDS, QUANT_KINDS, LayerSpec
from properties.targets.protocol import Capabilities, Unsupported

DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


def _bnb():
    try:
        import bitsandbytes.functional as bf
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise Unsupported("bitsandbytes is not installed: pip install 'lora-conformance[quant]'") from e
    return bf


def quantize(spec: LayerSpec, v: torch.Tensor) -> QuantState:
    """The library's quantizer applied to ``v`` (float64), in canonical form."""
    from properties.targets._bnb_state import bnb4_state, bnb8_state

    q = spec.quant
    if q.kind in HQQ_KINDS:
        from properties.targets._hqq_state import quantize as hqq_quantize

        return hqq_quantize(q, v, spec.dtype)
    if q.kind == "torchao_nf4":
        from properties.targets._nf4_state import quantize_nf4

        return quantize_nf4(v, spec.dtype, q.block, q.scale_block)
    if q.kind == "torchao_int8":
        from properties.targets._torchao_state import quantize_int8

        return quantize_int8(v, spec.dtype)
    bf = _bnb()
    if q.kind == "bnb_int8":
        codes, scb, _ = bf.int8_vectorwise_quant(v.to(torch.float16))
        return bnb8_state(codes, scb)
    packed, qstate = bf.quantize_4bit(
        v.to(torch.float32), blocksize=q.block, quant_type=q.kind[4:], compress_statistics=q.double_quant
    )
    return bnb4_state(packed, qstate)


class QuantizedReferenceHandle:
    """One layer: quantized base, float64 LoRA factors, merge bookkeeping like PEFT's."""

    def __init__(self, spec: LayerSpec) -> None:
        if spec.quant is None or spec.quant.kind not in QUANT_KINDS:
            raise Unsupported("the quantized reference builds quantized linear layers only")
        self.spec = spec
        self.state = quantize(spec, spec.weight.to(F64))
        self.bias = None if spec.base_bias is None else spec.base_bias.to(F64)
        self.factors = {a.name: (a.A.to(F64), a.B.to(F64), a.scaling) for a in spec.adapters}
        self.lora_bias = {a.name: a.bias.to(F64) for a in spec.adapters if a.bias is not None}
        self.scales = {a.name: 1.0 for a in spec.adapters}
        self.active = list(spec.active_adapters)
        self.enabled = True
        self.merged: list[str] = []

    # -- arithmetic (the parts tests/quant_mutants.py overrides) ---------------------------------

    def delta(self, name: str) -> torch.Tensor:
        A, B, s = self.factors[name]
        return s * self.scales[name] * (B @ A)

    def requantize(self, v: torch.Tensor) -> QuantState:
        return quantize(self.spec, v)

    def combine(self, w: torch.Tensor, delta: torch.Tensor, sign: float) -> torch.Tensor:
        return w + sign * delta

    def bias_delta(self, name: str) -> torch.Tensor | None:
        """What merging ``name`` adds to the (unquantized) base bias: ``s * b``."""
        b = self.lora_bias.get(name)
        return None if b is None else self.factors[name][2] * self.scales[name] * b

    def _move_bias(self, name: str, sign: float) -> None:
        d = self.bias_delta(name)
        if d is not None:
            self.bias = (self.bias + sign * d).to(self.spec.dtype).to(F64)  # stored in the dtype

    # -- LayerHandle -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *, train: bool = False, adapter_names: Sequence[str] | None = None):
        if adapter_names is not None:
            raise Unsupported("no mixed-batch forward")
        x64 = x.to(F64)
        y = x64 @ self.state.decode().T
        if self.bias is not None:
            y = y + self.bias
        if self.enabled:
            for name in self.active:
                if name not in self.merged:
                    A, B, s = self.factors[name]
                    y = y + s * self.scales[name] * ((x64 @ A.T) @ B.T)
                    if name in self.lora_bias:
                        y = y + self.bias_delta(name)
        return y.to(self.spec.dtype)

    def merge(self, *, adapter_names: Sequence[str] | None = None, safe: bool = False) -> None:
        names = [
            n for n in (adapter_names if adapter_names is not None else self.active) if n not in self.merged
        ]
        if safe:  # every adapter checked before anything is written
            total = self.state.decode() + sum((self.delta(n) for n in names), torch.zeros(()))
            biases = [b for b in (self.bias_delta(n) for n in names) if b is not None]
            bias = self.bias + sum(biases) if biases else torch.zeros(())
            if not (torch.isfinite(total).all() and torch.isfinite(bias).all()):
                raise ValueError(f"merging {names} gives non-finite weights")
        for name in names:
            self.state = self.requantize(self.combine(self.state.decode(), self.delta(name), +1.0))
            self._move_bias(name, +1.0)
            self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            name = self.merged.pop()
            self.state = self.requantize(self.combine(self.state.decode(), self.delta(name), -1.0))
            self._move_bias(name, -1.0)

    def merged_adapters(self) -> list[str]:
        return list(self.merged)

    def set_active(self, names: Sequence[str]) -> None:
        self.active = list(names)

    def set_enabled(self, enabled: bool) -> None:
        """Disabling takes merged adapters back out of the weights first (PEFT's semantics)."""
        if not enabled:
            self.unmerge()
        self.enabled = enabled

    def set_scale(self, name: str, scale: float) -> None:
        raise Unsupported("no set_scale")

    def scale_layer(self, factor: float) -> None:
        raise Unsupported("no scale_layer")

    def unscale_layer(self, factor: float | None = None) -> None:
        raise Unsupported("no unscale_layer")

    def weights(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.state.decode().to(self.spec.dtype)}
        if self.bias is not None:
            out["bias"] = self.bias.to(self.spec.dtype)
        return out

    def delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        raise Unsupported("no delta_weights")

    def quant_state(self) -> QuantState:
        return self.state

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = {k: v.clone() for k, v in self.state.tensors().items()}
        snap["format"] = self.state.format
        if self.bias is not None:
            snap["bias"] = self.bias.clone()
        snap["merged"] = list(self.merged)
        snap["active"] = list(self.active)
        snap["enabled"] = self.enabled
        return snap

    def merge_and_unload(self) -> nn.Module:
        raise Unsupported("no merge_and_unload")


class QuantizedReferenceTarget:
    name = "quantized-reference"
    handle = QuantizedReferenceHandle

    def version(self) -> str:
        parts = []
        for name, label in (("bitsandbytes", "bnb"), ("torchao", "torchao"), ("hqq", "hqq")):
            try:
                parts.append(f"{label} {__import__(name).__version__}")
            except ImportError:
                parts.append(f"{label} missing")
            except AttributeError:  # hqq has no __version__
                from importlib.metadata import version

                parts.append(f"{label} {version(name)}")
        return ", ".join(parts)

    def capabilities(self) -> Capabilities:
        layers, notes = set(), {}
        try:
            _bnb()
            layers |= {k for k in QUANT_KINDS if k.startswith("bnb_")}
        except Unsupported as e:
            notes.update({k: str(e) for k in QUANT_KINDS if k.startswith("bnb_")})
        try:
            import torchao.quantization  # noqa: F401

            layers.add("torchao_int8")
        except ImportError as e:
            notes["torchao_int8"] = f"torchao is not installed ({e})"
        try:
            from properties.targets._nf4_state import nf4_module

            nf4_module()
            layers.add("torchao_nf4")
        except Unsupported as e:
            notes["torchao_nf4"] = str(e)
        try:
            from properties.targets._hqq_state import hqq_modules

            hqq_modules()
            layers.update(HQQ_KINDS)
        except Unsupported as e:
            notes.update({k: str(e) for k in HQQ_KINDS})
        return Capabilities(
            layers=frozenset(layers),
            dtypes=DTYPES,
            operations=frozenset({"merge", "merge_subset", "safe_merge", "unmerge", "disable", "set_active"}),
            options=frozenset({"multi_adapter", "rslora", "lora_bias", "hqq_lora_bias", "quant_blocksize"}),
            notes={**notes, "float64": "quantized layers compute in float32, bfloat16 or float16"},
        )

    def build(self, spec: LayerSpec) -> QuantizedReferenceHandle:
        return self.handle(spec)


TARGET = QuantizedReferenceTarget()
