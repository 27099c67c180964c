"""torchao NF4 storage (``NF4Tensor``, torchtune's QLoRA base) -> the canonical ``QuantState``.

``NF4Tensor.from_tensor(w, block_size, scaler_block_size)`` (torchao 0.17 ``torchao.dtypes.nf4tensor``;
the same code in 0.18 under ``torchao.quantization.quantize_.workflows.nf4``) works in ``w``'s dtype:

* per block of ``block_size`` consecutive elements the absmax ``a`` (exact: a max of stored values);
  each element is divided by ``a`` (one rounding) and coded as the index of the *nearest* entry of the
  16-value NF4 table, itself rounded to the dtype (``quantize_tensor_nearest``); two codes per byte,
  the first element in the high nibble;
* double quantization of the absmaxes: their global mean ``m`` (in the dtype) is subtracted, and per
  group of ``scaler_block_size`` absmaxes the deviations are coded as ``clamp(round(d * f), -128, 127)``
  with ``f = 256 / (2 max|d|)``; so the largest positive deviation maps to 128 and is clamped to 127,
  a whole step of ``max|d| / 128`` off, every other one at most half a step;
* decode (``get_original_weight``): ``nf4[code] * (q / f + m)``, each operation in the dtype.

The canonical state keeps the dtype's NF4 table as the code book and the decoded scales
(``dequantize_scalers``, exactly the values the library multiplies by) as the block scales, so
``QuantState.decode`` equals torchao's dequantize up to its one final rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from properties.precision import UNIT_ROUNDOFF
from properties.quantized.state import F64, QuantState
from properties.targets.protocol import Unsupported

NF4_SCALE_CODEBOOK = torch.arange(-128, 128, dtype=F64) / 128.0
"""The scalers' int8 levels in units of the group's ``max|d|`` (``q / f = q max|d| / 128``)."""


def nf4_module() -> Any:
    """torchao's NF4 module (its path moved between 0.17 and 0.18)."""
    try:
        from torchao.dtypes import nf4tensor
    except ImportError:
        try:
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as nf4tensor
        except ImportError as e:
            raise Unsupported(f"torchao with NF4Tensor is not installed ({e})") from e
    return nf4tensor


def check_shape(shape: tuple[int, ...], block: int, scale_block: int) -> None:
    """torchao's constraints (see ``properties.quantized.strategies.nf4_structure``)."""
    n = 1
    for s in shape:
        n *= s
    if block % 2 or n % (block * scale_block):
        raise Unsupported(
            f"torchao NF4 needs an even block_size and a weight of a multiple of block_size * "
            f"scaler_block_size elements: {tuple(shape)} with {block} x {scale_block}"
        )


def nf4_state(weight: Any) -> QuantState:
    """An ``NF4Tensor`` in canonical form."""
    if not hasattr(weight, "quantized_data") or not hasattr(weight, "scaler_mean"):
        raise TypeError(f"the base weight is a {type(weight).__name__}, not torchao's NF4Tensor")
    shape = tuple(weight.shape)
    n = 1
    for s in shape:
        n *= s
    b = weight.quantized_data.detach().to("cpu").reshape(-1).long()
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    with torch.no_grad():
        scales = weight.dequantize_scalers(
            weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size
        )
    u = UNIT_ROUNDOFF.get(weight.dtype, 2.0**-24)
    return QuantState(
        format=f"torchao nf4 b{weight.block_size} s{weight.scaler_block_size}",
        shape=shape,
        codes=codes,
        codebook=weight.nf4.detach().to("cpu", F64),
        scale=scales.detach().to("cpu", F64).reshape(-1),
        block=int(weight.block_size),
        scale_codebook=NF4_SCALE_CODEBOOK,
        scale_block=int(weight.scaler_block_size),
        # the value handed over is stored in the dtype (u |v|), divided by the absmax in the dtype
        # (u |v|), and its distances to the table are rounded there (nearest up to 3u |v|)
        input_roundoff=5 * u,
        meta_roundoff=u,
        scale_code_steps=1.0,
        scale_mean="global",
    )


def quantize_nf4(v: torch.Tensor, dtype: torch.dtype, block: int, scale_block: int) -> QuantState:
    """torchao's own NF4 quantizer (``to_nf4``) applied to ``v`` stored in ``dtype``."""
    check_shape(tuple(v.shape), block, scale_block)
    w = v.to(dtype).contiguous()
    return nf4_state(nf4_module().to_nf4(w, block_size=block, scaler_block_size=scale_block))
