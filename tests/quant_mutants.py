"""Broken quantized merges: the quantized reference with one deliberate bug each.

Each must fail its cell (``tests/test_quantized.py``), which shows the quantized properties see:
a delta added in the wrong scale (in units of the block scale, as if added to the normalised codes),
blocks requantized with the old scale (no new absmax where the delta moved it), a safe merge that
writes the codes before checking, and a delta computed in 8-bit (row-wise int8) before adding; on HQQ:
codes rounded down instead of to the nearest level, blocks kept on the old grid, the base bias
dropped by the merge, the delta in code units and a safe merge writing first. On torchao NF4 the
requantizing mutants again, and ``FloatExportReference``: a correct merge that exports
``D(Wq) + ΔW`` into a float layer (what torchtune's QLoRA recipe does), with the mutant that routes the
export through bfloat16 (torchtune's hook default, ``torchtune-qlora-export-bf16``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from properties.quantized.state import F64, QuantState
from properties.targets.protocol import Capabilities, Unsupported
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


class FloatExportReference(QuantizedReferenceHandle):
    """A correct float export: merging writes ``D(Wq) + Σ ΔW`` (exact, rounded once to
    ``export_dtype``, then stored in the compute dtype) into a float weight; no unmerge."""

    export_dtype: torch.dtype | None = None

    def merge(self, *, adapter_names=None, safe=False):
        if safe:
            raise Unsupported("no safe merge")
        if self.merged:
            return
        names = list(adapter_names if adapter_names is not None else self.active)
        v = self.state.decode() + sum((self.delta(n) for n in names), torch.zeros(()))
        self.float_weight = v.to(self.export_dtype or self.spec.dtype).to(self.spec.dtype)
        self.merged = names

    def unmerge(self) -> None:
        raise Unsupported("a float export has no unmerge")

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled  # as torchtune's disable_adapter: nothing to take out of the weights

    def quant_state(self):
        return None if self.merged else self.state

    def weights(self):
        if not self.merged:
            return super().weights()
        out = {"weight": self.float_weight}
        if self.bias is not None:
            out["bias"] = self.bias.to(self.spec.dtype)
        return out

    def forward(self, x, *, train=False, adapter_names=None):
        if not self.merged:
            return super().forward(x, train=train, adapter_names=adapter_names)
        y = x.to(F64) @ self.float_weight.to(F64).T
        return (y if self.bias is None else y + self.bias).to(self.spec.dtype)

    def snapshot(self):
        if not self.merged:
            return super().snapshot()
        return {"weight": self.float_weight.clone(), "merged": list(self.merged)}


class ExportViaBf16(FloatExportReference):
    export_dtype = torch.bfloat16


class FloatExportTarget(QuantizedReferenceTarget):
    """The quantized reference with a float-export merge (``merge_to_float``), one adapter."""

    def capabilities(self) -> Capabilities:
        caps = super().capabilities()
        ops = (caps.operations - {"unmerge", "safe_merge", "merge_subset", "set_active"}) | {"merge_to_float"}
        return Capabilities(
            caps.layers, caps.dtypes, frozenset(ops), frozenset({"quant_blocksize"}), caps.notes
        )


@dataclass(frozen=True)
class QuantMutant:
    name: str
    handle: type
    property: str
    layer: str
    dtype: str = "float32"
    max_examples: int | None = None

    def target(self) -> QuantizedReferenceTarget:
        t = (
            FloatExportTarget()
            if issubclass(self.handle, FloatExportReference)
            else QuantizedReferenceTarget()
        )
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
        QuantMutant("nf4_old_scale", OldScale, "merge_equivalence", "torchao_nf4", "bfloat16"),
        QuantMutant("nf4_delta_in_code_units", DeltaInCodeUnits, "merge_equivalence", "torchao_nf4"),
        QuantMutant("nf4_safe_merge_writes_first", SafeMergeWritesFirst, "safe_merge_atomic", "torchao_nf4"),
        QuantMutant("nf4_export_via_bf16", ExportViaBf16, "merge_equivalence", "torchao_nf4"),
    )
}
