"""The canonical form of a quantized weight, as every quantized target reports it.

A quantizer stores, per block of consecutive elements of the row-major weight, a scale (and for
affine quantizers a zero point) and per element a code: an index into a code book. The weight it
stands for is ``(codebook[code] - zero) * scale``. bitsandbytes 4-bit (nf4/fp4: 16-value code books in
[-1, 1], scale = block absmax), bitsandbytes 8-bit and torchao int8 (integer levels, one scale per
row) and HQQ (levels 0..2^b-1, scale and zero per group) all fit this form; target adapters translate
their library's packing into it, so the precision model never sees a library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass(frozen=True, eq=False)
class QuantState:
    """Stored codes and block parameters of one quantized weight (all float64 / int64, on CPU).

    ``scale_rule``: ``"absmax"`` when a correct quantizer sets ``scale = max|block| / max|codebook|``
    (bitsandbytes, torchao); ``"minmax"`` for HQQ's affine grid: ``scale = (max - min) / (2^b - 1)``
    per group (1 where the range is at most ``1e-4``, at least ``1 / 2e4``), the zero point either
    ``-min / scale`` or an optimiser's output (``zero_optimised``), about which no claim beyond the
    grid is made; ``"free"`` for a scale about which nothing beyond the grid is claimed.
    ``meta_roundoff``: unit roundoff of the dtype the scales and zeros are stored in (HQQ keeps
    them in the compute dtype, rounded from the float32 values its codes were chosen with; 0 where
    the codes were chosen with the stored values). ``decode_roundings``: roundings in the compute
    dtype when the library dequantizes (HQQ: ``(c - z)`` and the product with the scale).
    ``round_zero``: HQQ rounds its zero point to an integer (its 4-bit default).
    ``scale_codebook``/``scale_block``: bnb double quantization, the
    8-bit code book and block size the scales themselves were coded with (None without).
    ``input_roundoff``: the unit roundoff of the dtype the quantizer rounds its input to first (bnb
    8-bit quantizes a float16 copy).
    ``scale_code_steps``: how many gaps of ``scale_codebook`` a coded scale may be off (0.5 for a
    nearest rounding; 1 for torchao NF4, whose largest deviation is clamped from 128 to 127);
    ``scale_mean``: ``"global"`` where the offset subtracted before coding the scales is the mean of
    all the block scales computed in the storage dtype (torchao NF4; its roundings are
    ``meta_roundoff``), ``"exact"`` for bnb's.
    """

    format: str  # e.g. "bnb nf4 b64 dq": what a merge must preserve
    shape: tuple[int, ...]
    codes: torch.Tensor  # int64, one per element, row-major
    codebook: torch.Tensor  # float64 code values
    scale: torch.Tensor  # float64, one per block
    block: int  # elements per block (last block may be short)
    zero: torch.Tensor | None = None  # float64, one per block (affine quantizers)
    scale_rule: str = "absmax"
    scale_codebook: torch.Tensor | None = None
    scale_block: int = 256
    input_roundoff: float = 2.0**-24
    scale_divisor: float | None = None  # absmax rule: scale = absmax / this (default max|codebook|)
    meta_roundoff: float = 0.0
    decode_roundings: int = 1
    round_zero: bool = False
    zero_optimised: bool = False
    scale_code_steps: float = 0.5
    scale_mean: str = "exact"

    @property
    def divisor(self) -> float:
        return self.scale_divisor if self.scale_divisor is not None else float(self.codebook.abs().max())

    @property
    def n_blocks(self) -> int:
        return self.scale.numel()

    def per_element(self, per_block: torch.Tensor) -> torch.Tensor:
        """Expand a per-block vector to one value per (flattened) element."""
        n = self.codes.numel()
        return per_block.repeat_interleave(self.block)[:n]

    def decode(self) -> torch.Tensor:
        """The weight the codes stand for, exactly (float64), in ``shape``."""
        values = self.codebook[self.codes]
        if self.zero is not None:
            values = values - self.per_element(self.zero)
        return (values * self.per_element(self.scale)).reshape(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Codes and block parameters by name (compared bit for bit where state must not change)."""
        out = {"quant.codes": self.codes, "quant.scale": self.scale}
        if self.zero is not None:
            out["quant.zero"] = self.zero
        return out
