"""Examples for the quantized layer kinds: a linear example plus the drawn quantization structure.

The LoRA part is drawn exactly as for ``linear`` (shapes down to 1, rank past the smallest dimension,
alpha, rsLoRA, several adapters, magnitudes, hostile entries), restricted to what quantized LoRA layers
have; then the quantizer's structure: block size and double quantization (bnb 4-bit); HQQ's group size
(8-128) and zero-point optimiser, drawn first, because HQQ needs the group size times the groups its
bit packing stacks (``_hqq_state.PACKED_GROUPS``) to divide the weight's size: ``in_features`` and
``out_features`` are drawn as multiples of a split of that power of two, so groups may span rows.
With the optimiser on, one adapter is drawn (no a priori bound exists for an unobserved intermediate
requantization, ``model.NoChainBound``); a LoRA bias only where the target declares
``hqq_lora_bias`` (PEFT's ``HqqLoraLinear`` refuses one). ``spec.weight``
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
HQQ_GROUPS = (8, 16, 32, 64, 128)
HQQ_PACKED_GROUPS = {8: 1, 4: 2, 3: 1, 2: 4, 1: 8}  # as properties.targets._hqq_state.PACKED_GROUPS
MAX_FAN_STEP = 32  # linear fans are drawn up to 40: a step of at most 32 leaves a choice


def hqq_structure(kind: str, draw: st.DrawFn) -> tuple[QuantSpec, tuple[int, int]]:
    """HQQ's bits (from the kind), group size and optimiser, and the (in, out) steps that make the
    weight's size a multiple of the group size times the packed groups."""
    bits = int(kind.removeprefix("hqq_").removesuffix("bit"))
    group = draw(st.sampled_from(HQQ_GROUPS), label="group_size")
    need = (group * HQQ_PACKED_GROUPS[bits]).bit_length() - 1  # log2 of what must divide in * out
    lo, hi = max(0, need - 5), min(need, 5)
    log_in = draw(st.integers(lo, hi), label="log2 in_features step")
    q = QuantSpec(kind, bits, group, optimize=draw(st.booleans(), label="optimize"))
    return q, (2**log_in, 2 ** (need - log_in))


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
    options, steps, q = d.options & LORA_OPTIONS, (1, 1), None
    if d.kind.startswith("hqq_"):
        q, steps = hqq_structure(d.kind, draw)
        if q.optimize:
            options -= {"multi_adapter"}
        if "hqq_lora_bias" not in d.options:
            options -= {"lora_bias"}
    linear = replace(d, kind="linear", options=options, min_batch=batch, fan_steps=steps)
    drawn = draw(examples(linear, hostile=hostile))
    q = q or quant_structure(d.kind, draw, d.options)
    ex, h = drawn if hostile else (drawn, None)
    ex = Example(replace(ex.spec, quant=q), ex.x)
    if not hostile:
        return ex
    if h.kind == "overflow":
        h = replace(h, kind="nan")
    return ex, h
