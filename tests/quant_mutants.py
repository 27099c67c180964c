"""Broken quantized merges: the quantized reference with one deliberate bug each.

Each must fail its cell (``tests/test_quantized.py``), which shows the quantized properties see:
a delta added in the wrong scale (in units of the block scale, as if added to the normalised codes),
blocks requantized with the old scale (no new absmax where the delta moved it), a safe merge that
writes the codes before checking, and a delta computed in 8-bit (row-wise int8) before adding; on HQQ:
codes rounded down instead of to the nearest level, blocks kept on the old grid, the base bias
dropped by the merge, the delta in code units and a safe merge writing first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from properties.quantized.state import F64, QuantState
from properties.targets.quantized_reference import QuantizedReferenceHandle, QuantizedReferenceTarget


class DeltaInCodeUnits(QuantizedReferenceHandle):
    def combine(self, w, delta, sign):
        scale = self.state.per_element(self.state.scale).reshape(w.shape)
        return w + sign * delta * scale


class OldScale(QuantizedReferenceHandle):
    def requantize(self, v: torch.Tensor) -> QuantState:
        qs = self.state
        norm = (v.reshape(-1) / qs.per_element(qs.scale)).unsqueeze(1)
        return replace(qs, codes=(norm - qs.codebook.unsqueeze(0)).abs().argmin(dim=1))


class SafeMergeWritesFirst(QuantizedReferenceHandle):
    def merge(self, *, adapter_names=None, safe=False):
        before = self.state.decode()
        super().merge(adapter_names=adapter_names, safe=False)
        if safe and not torch.isfinite(self.state.decode() - before + before).all():
            raise ValueError("non-finite weights (found after writing them)")
        if safe and not all(torch.isfinite(self.delta(n)).all() for n in self.merged):
            raise ValueError("non-finite delta (found after writing the codes)")


class DeltaInt8(QuantizedReferenceHandle):
    def delta(self, name: str) -> torch.Tensor:
        import bitsandbytes.functional as bf

        d = super().delta(name)
        q, s, _ = bf.int8_vectorwise_quant(d.to(torch.float16))
        return bf.int8_vectorwise_dequant(q, s).to(F64)


class HqqFloor(QuantizedReferenceHandle):
    """HQQ's grid, but codes rounded down (floor) instead of to the nearest level."""

    def requantize(self, v: torch.Tensor) -> QuantState:
        qs = super().requantize(v)
        t = v.reshape(-1) / qs.per_element(qs.scale) + qs.per_element(qs.zero)
        return replace(qs, codes=t.floor().clamp(0, qs.codebook.numel() - 1).long())


class HqqOldGrid(QuantizedReferenceHandle):
    """Blocks requantized on the old HQQ grid (old scale and zero), not the merged weights' min/max."""

    def requantize(self, v: torch.Tensor) -> QuantState:
        qs = self.state
        t = v.reshape(-1) / qs.per_element(qs.scale) + qs.per_element(qs.zero)
        return replace(qs, codes=t.round().clamp(0, qs.codebook.numel() - 1).long())


class HqqDropsBias(QuantizedReferenceHandle):
    """A merge that rebuilds the quantized layer without its bias (as PEFT's HqqLoraLinear does)."""

    def merge(self, *, adapter_names=None, safe=False):
        super().merge(adapter_names=adapter_names, safe=safe)
        if self.merged and self.bias is not None:
            self.bias = torch.zeros_like(self.bias)


@dataclass(frozen=True)
class QuantMutant:
    name: str
    handle: type
    property: str
    layer: str
    dtype: str = "float32"
    max_examples: int | None = None

    def target(self) -> QuantizedReferenceTarget:
        t = QuantizedReferenceTarget()
        t.handle = self.handle
        t.name = f"quantized-reference-{self.name}"
        return t


QUANT_MUTANTS = {
    m.name: m
    for m in (
        QuantMutant("delta_in_code_units", DeltaInCodeUnits, "merge_equivalence", "bnb_nf4"),
        QuantMutant("old_scale", OldScale, "merge_equivalence", "bnb_nf4"),
        QuantMutant("old_scale_int8", OldScale, "merge_roundtrip", "bnb_int8"),
        QuantMutant("safe_merge_writes_first", SafeMergeWritesFirst, "safe_merge_atomic", "bnb_fp4"),
        QuantMutant("delta_int8", DeltaInt8, "merge_equivalence", "bnb_int8", max_examples=60),
        QuantMutant("hqq_delta_in_code_units", DeltaInCodeUnits, "merge_equivalence", "hqq_4bit"),
        QuantMutant("hqq_floor", HqqFloor, "merge_equivalence", "hqq_3bit"),
        QuantMutant("hqq_old_grid", HqqOldGrid, "merge_roundtrip", "hqq_8bit"),
        QuantMutant("hqq_drops_bias", HqqDropsBias, "merge_equivalence", "hqq_2bit", "bfloat16"),
        QuantMutant("hqq_safe_merge_writes_first", SafeMergeWritesFirst, "safe_merge_atomic", "hqq_4bit"),
    )
}
