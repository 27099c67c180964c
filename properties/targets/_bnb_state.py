"""bitsandbytes storage -> the canonical ``QuantState`` (shared by the quantized targets).

4-bit: two codes per byte, high nibble first, ``quant_state.code`` is the 16-value code book and
``absmax`` the block scales; with double quantization the scales are stored as 8-bit codes of
``state2`` plus an offset. 8-bit (LLM.int8()): int8 levels and one float32 ``SCB`` (row absmax) per
row; the weight is ``q * SCB / 127``.
"""

from __future__ import annotations

from typing import Any

import torch

from properties.quantized.state import F64, QuantState

U16 = 2.0**-11


def _scales_4bit(qstate: Any) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    if getattr(qstate, "nested", False) and qstate.state2 is not None:
        s2 = qstate.state2
        codes = qstate.absmax.to("cpu").long()
        per = s2.blocksize
        absmax2 = s2.absmax.to("cpu", F64).repeat_interleave(per)[: codes.numel()]
        scale = s2.code.to("cpu", F64)[codes] * absmax2 + float(qstate.offset)
        return scale, s2.code.to("cpu", F64), per
    return qstate.absmax.to("cpu", F64), None, 256


def bnb4_state(packed: torch.Tensor, qstate: Any) -> QuantState:
    """A 4-bit ``Params4bit`` (its ``.data`` and ``quant_state``) in canonical form."""
    shape = tuple(qstate.shape)
    n = 1
    for s in shape:
        n *= s
    b = packed.detach().to("cpu").reshape(-1).view(torch.uint8).long()
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    scale, scale_code, scale_block = _scales_4bit(qstate)
    dq = " dq" if scale_code is not None else ""
    return QuantState(
        format=f"bnb {qstate.quant_type} b{qstate.blocksize}{dq}",
        shape=shape,
        codes=codes,
        codebook=qstate.code.to("cpu", F64),
        scale=scale,
        block=int(qstate.blocksize),
        scale_codebook=scale_code,
        scale_block=scale_block,
    )


INT8_CODEBOOK = torch.arange(-127, 128, dtype=F64) / 127.0


def bnb8_state(q: torch.Tensor, scb: torch.Tensor) -> QuantState:
    """An 8-bit weight (int8 levels and row absmax ``SCB``) in canonical form."""
    q = q.detach().to("cpu")
    if q.dtype != torch.int8:
        raise TypeError(f"expected int8 codes, got {q.dtype}")
    levels = q.long().reshape(-1)
    if (levels < -127).any():
        raise ValueError("int8 code -128 is outside LLM.int8()'s symmetric grid")
    return QuantState(
        format="bnb int8 per-row",
        shape=tuple(q.shape),
        codes=levels + 127,
        codebook=INT8_CODEBOOK,
        scale=scb.detach().to("cpu", F64).reshape(-1),
        block=int(q.shape[1]),
        input_roundoff=U16,  # Int8Params quantizes a float16 copy
    )
