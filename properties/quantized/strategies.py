"""Examples for the quantized layer kinds: a linear example plus the drawn quantization structure.

The LoRA part is drawn exactly as for ``linear`` (shapes down to 1, rank past the smallest dimension,
alpha, rsLoRA, several adapters, magnitudes, hostile entries), restricted to what quantized LoRA layers
have; then the quantizer's structure: block size and double quantization (bnb 4-bit). ``spec.weight``
is the float weight handed to the quantizer; targets report what they stored. An ``overflow``
hostile entry becomes a NaN: quantized merges compute in float32, where the suite's overflow
construction (tuned to the storage dtype) means nothing.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import strategies as st

from properties.spec import Example, QuantSpec
from properties.strategies import Draw, examples

LORA_OPTIONS = frozenset({"multi_adapter", "rslora", "lora_bias"})
BNB4_BLOCKS = (32, 64, 128, 256)


def quant_structure(kind: str, draw: st.DrawFn, options: frozenset[str]) -> QuantSpec:
    """``options``: a target declaring ``quant_blocksize`` lets the 4-bit block size be drawn; others
    get bitsandbytes' default (transformers' ``BitsAndBytesConfig`` has no block size)."""
    if kind in ("bnb_nf4", "bnb_fp4"):
        block = draw(st.sampled_from(BNB4_BLOCKS), label="blocksize") if "quant_blocksize" in options else 64
        return QuantSpec(kind, 4, block, draw(st.booleans(), label="double_quant"))
    if kind in ("bnb_int8", "torchao_int8"):
        return QuantSpec(kind, 8)
    raise ValueError(f"not a quantized layer kind: {kind}")


@st.composite
def quantized_examples(draw: st.DrawFn, d: Draw, hostile: bool = False):
    """Like ``strategies.examples`` for a quantized kind (``d.kind`` in ``QUANT_KINDS``)."""
    # LLM.int8() (bitsandbytes 8-bit) rejects 1-D inputs (IndexError in int8_vectorwise_quant).
    batch = max(d.min_batch, 1) if d.kind == "bnb_int8" else d.min_batch
    linear = replace(d, kind="linear", options=d.options & LORA_OPTIONS, min_batch=batch)
    drawn = draw(examples(linear, hostile=hostile))
    q = quant_structure(d.kind, draw, d.options)
    ex, h = drawn if hostile else (drawn, None)
    ex = Example(replace(ex.spec, quant=q), ex.x)
    if not hostile:
        return ex
    if h.kind == "overflow":
        h = replace(h, kind="nan")
    return ex, h
