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
BNB4_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Every block size bitsandbytes 0.50's ``quantize_4bit`` takes on CPU (16 raises ``invalid blocksize``);
linear weights are drawn up to 40 x 40, so 2048 and 4096 are one (short) block."""
HQQ_GROUPS = (8, 16, 32, 64, 128)
HQQ_PACKED_GROUPS = {8: 1, 4: 2, 3: 1, 2: 4, 1: 8}  # as properties.targets._hqq_state.PACKED_GROUPS
MAX_FAN_STEP = 32  # linear fans are drawn up to 40: a step of at most 32 leaves a choice
NF4_DEFAULT = (64, 256)  # torchao's to_nf4 block_size and scaler_block_size (torchtune's QLoRA)
NF4_BLOCKS = (16, 32, 64)
NF4_SCALE_BLOCKS = (4, 16, 64, 256)
NF4_MAX_LOG_FAN = 7  # fans up to 128: 128 x 128 holds the default 64 x 256 = 16384 elements


def nf4_structure(draw: st.DrawFn, options: frozenset[str]) -> tuple[QuantSpec, tuple[int, int]]:
    """torchao NF4's block sizes and the (in, out) steps its quantizer can take.

    ``NF4Tensor.from_tensor`` (torchao 0.17/0.18) asserts ``numel % block_size == 0`` and, in
    ``double_quantize_scalers``, ``(numel / block_size) % scaler_block_size == 0``; its decode splits a
    block in halves (even block sizes). So the weight's size must be a multiple of ``block_size *
    scaler_block_size`` (16384 with the defaults torchtune uses), which ``in`` and ``out`` are drawn as
    multiples of a split of. A target declaring ``quant_blocksize`` (torchtune's ``LoRALinear`` passes
    its ``quantization_kwargs`` to ``to_nf4``) gets other block sizes drawn too."""
    if "quant_blocksize" in options and not draw(st.booleans(), label="nf4 default blocks"):
        block = draw(st.sampled_from(NF4_BLOCKS), label="blocksize")
        scale_block = draw(st.sampled_from(NF4_SCALE_BLOCKS), label="scaler_block_size")
    else:
        block, scale_block = NF4_DEFAULT
    need = (block * scale_block).bit_length() - 1
    lo, hi = max(0, need - NF4_MAX_LOG_FAN), min(need, NF4_MAX_LOG_FAN)
    log_in = draw(st.integers(lo, hi), label="log2 in_features step")
    q = QuantSpec("torchao_nf4", 4, block, double_quant=True, scale_block=scale_block)
    return q, (2**log_in, 2 ** (need - log_in))


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
    if d.kind == "torchao_nf4":
        q, steps = nf4_structure(draw, d.options)
    elif d.kind.startswith("hqq_"):
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
