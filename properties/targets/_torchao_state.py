"""torchao int8 weight-only storage -> the canonical ``QuantState``.

``Int8WeightOnlyConfig`` stores ``qdata`` (int8, levels -128..127) and one ``scale`` per row; the
weight is ``qdata * scale`` with ``scale = max|row| / 127.5`` (symmetric, so ``-128`` is reachable only
by rounding ``-127.5``).
"""

from __future__ import annotations

import torch

from properties.precision import UNIT_ROUNDOFF
from properties.quantized.state import F64, QuantState
from properties.targets.protocol import Unsupported

IN_FEATURES_ONE = (
    "torchao int8 weight-only cannot quantize a layer with in_features == 1 and out_features > 1 "
    "(RuntimeError: shape '[out, 1]' is invalid, in _choose_qparams_affine)"
)


def check_shape(shape: tuple[int, ...]) -> None:
    """torchao 0.18 crashes on an (out > 1, 1) weight; such layers are unsupported, not failures."""
    if shape[1] == 1 and shape[0] > 1:
        raise Unsupported(IN_FEATURES_ONE)


CODEBOOK = torch.arange(-128, 128, dtype=F64)


def torchao_int8_state(weight: torch.Tensor) -> QuantState:
    q = getattr(weight, "qdata", None)
    scale = getattr(weight, "scale", None)
    if q is None or scale is None:
        raise TypeError(f"the base weight is a {type(weight).__name__}, not torchao's Int8Tensor")
    q = q.detach().to("cpu")
    return QuantState(
        input_roundoff=UNIT_ROUNDOFF.get(weight.dtype, 2.0**-24),  # quantized in the weight's dtype
        format="torchao int8 per-row",
        shape=tuple(q.shape),
        codes=q.long().reshape(-1) + 128,
        codebook=CODEBOOK,
        scale=scale.detach().to("cpu", F64).reshape(-1),
        block=int(q.shape[1]),
        scale_divisor=127.5,
    )


def quantize_int8(v: torch.Tensor, dtype: torch.dtype) -> QuantState:
    """torchao's own int8 weight-only quantizer applied to ``v`` (as ``dtype``)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    check_shape(tuple(v.shape))
    layer = torch.nn.Sequential(torch.nn.Linear(v.shape[1], v.shape[0], bias=False, dtype=dtype))
    with torch.no_grad():
        layer[0].weight.copy_(v.to(dtype))
    quantize_(layer, Int8WeightOnlyConfig())
    return torchao_int8_state(layer[0].weight)
