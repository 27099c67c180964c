"""HQQ storage -> the canonical ``QuantState`` (shared by the quantized targets).

``HQQLinear`` (hqq 0.2.8, ``axis=1``) cuts the row-major weight into groups of ``group_size``
consecutive elements (the group size must divide the weight's size: HQQ asserts it, and
``BaseQuantizeConfig`` wants a multiple of 8), stores per element a level ``c`` in ``0..2^b-1``
(bit-packed; 3-bit packs ten levels per int32 and pads the rows) and per group a scale and a zero
point in the compute dtype; the weight is ``(c - z) * s``, dequantized in the compute dtype. Its
quantizer computes in float32: ``1/s = (2^b-1) / (max - min)`` (1 where the range is at most
``1e-4``, clamped at ``2e4``), ``z = -min / s`` (rounded for 4-bit), optionally moved by its
optimiser, then ``c = round(W / s + z)`` clamped to the levels.
"""

from __future__ import annotations

from typing import Any

import torch

from properties.precision import UNIT_ROUNDOFF
from properties.quantized.state import F64, QuantState
from properties.spec import HQQ_KINDS, QuantSpec
from properties.targets.protocol import Unsupported

U32 = 2.0**-24


def hqq_modules() -> tuple[Any, Any]:
    """``(HQQLinear, BaseQuantizeConfig)``, or Unsupported naming what is missing."""
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise Unsupported(f"hqq is not installed ({e}): pip install hqq") from e
    return HQQLinear, BaseQuantizeConfig


def quant_config(q: QuantSpec) -> dict[str, Any]:
    """HQQ's ``BaseQuantizeConfig`` for the spec (its defaults but ``optimize``)."""
    if q.kind not in HQQ_KINDS:
        raise ValueError(f"not an HQQ kind: {q.kind}")
    _, base_config = hqq_modules()
    cfg = base_config(nbits=q.bits, group_size=q.block)
    cfg["weight_quant_params"]["optimize"] = q.optimize
    return cfg


PACKED_GROUPS = {8: 1, 4: 2, 3: 1, 2: 4, 1: 8}
"""HQQ's bit packing stacks this many groups into one row (``BitPack.pack_4bit_u8`` splits the groups
in halves, 2-bit in quarters): a group count that is not a multiple of it is packed wrongly without
an error (hqq 0.2.8: broadcast, the dequantize then crashes), so such shapes are unsupported."""


def check_shape(shape: tuple[int, ...], group: int, bits: int) -> None:
    n = shape[0] * shape[1]
    need = group * PACKED_GROUPS[bits]
    if n % need:
        raise Unsupported(
            f"HQQ {bits}-bit with group size {group} needs the weight's size ({n}, shape {shape}) to be a "
            f"multiple of {need} (the group size times the {PACKED_GROUPS[bits]} groups its packing stacks)"
        )


def hqq_state(layer: Any) -> QuantState:
    """An ``HQQLinear``'s stored levels, scales and zeros in canonical form."""
    from hqq.core.quantize import Quantizer

    meta = layer.meta
    if meta.get("quant_scale") or meta.get("quant_zero") or meta.get("axis") != 1:
        raise TypeError("only HQQ layers with axis=1 and unquantized scales/zeros are read")
    params = layer.quant_config["weight_quant_params"]
    shape = tuple(meta["shape"])
    group = int(meta["group_size"])
    n = shape[0] * shape[1]
    levels = Quantizer.unpack[meta["packing"]](layer.W_q, dtype=torch.float32)[: n // group]
    codes = levels.reshape(-1).to(torch.int64).cpu()
    nbits = int(meta["nbits"])
    opt = " opt" if params.get("optimize") else ""
    return QuantState(
        format=f"hqq {nbits}bit g{group}{opt}",
        shape=shape,
        codes=codes,
        codebook=torch.arange(2**nbits, dtype=F64),
        scale=meta["scale"].detach().to("cpu", F64).reshape(-1),
        zero=meta["zero"].detach().to("cpu", F64).reshape(-1),
        block=group,
        scale_rule="minmax",
        input_roundoff=U32,  # Quantizer.quantize computes on tensor.float()
        meta_roundoff=0.0 if meta["scale"].dtype == torch.float32 else UNIT_ROUNDOFF[meta["scale"].dtype],
        decode_roundings=2,
        round_zero=bool(params.get("round_zero")),
        zero_optimised=bool(params.get("optimize")),
    )


def quantize(q: QuantSpec, v: torch.Tensor, compute_dtype: torch.dtype) -> QuantState:
    """HQQ's own quantizer applied to ``v`` (as PEFT's merge does: a fresh ``HQQLinear``)."""
    hqq_linear, _ = hqq_modules()
    check_shape(tuple(v.shape), q.block, q.bits)
    cfg = quant_config(q)
    layer = hqq_linear(None, cfg, compute_dtype=compute_dtype, device="cpu")
    cfg.pop("offload_meta", None)
    layer.quantize(v, **cfg)
    return hqq_state(layer)
