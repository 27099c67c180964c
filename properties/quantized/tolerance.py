"""The tolerance table for quantized merges: what merging costs, per quantizer, bit width and block.

Each ``merge_equivalence`` example on a quantized kind records one sample named
``merge shift [<quantizer label>]``: ``error`` = max |merged - unmerged output|, ``reference`` = max
|LoRA contribution| (unmerged output minus the base output), ``bound`` = the largest elementwise bound
of the model (both forwards plus the requantization error carried through ``|x|``), ``ratio`` = the
worst elementwise shift / bound. Rows aggregate the samples a report kept (per cell, capped).
"""

from __future__ import annotations

from typing import Any

from properties.reporting.tables import Cell, Table
from properties.results import RunReport

PREFIX = "merge shift ["


def rows(report: RunReport) -> list[dict[str, Any]]:
    """One row per (quantizer label, compute dtype): worst measured shift beside the model's bound."""
    groups: dict[tuple[str, str], list] = {}
    for c in report.cells:
        for s in c.samples:
            if s.quantity.startswith(PREFIX):
                groups.setdefault((s.quantity[len(PREFIX) : -1], c.dtype), []).append(s)
    out = []
    for (label, dtype), ss in sorted(groups.items()):
        fractions = [s.error / s.reference for s in ss if s.reference > 0]
        out.append(
            {
                "quantizer": label,
                "dtype": dtype,
                "examples": len(ss),
                "max_shift": max(s.error for s in ss),
                "max_shift_over_lora": max(fractions, default=0.0),
                "median_shift_over_lora": sorted(fractions)[len(fractions) // 2] if fractions else 0.0,
                "max_bound": max(s.bound for s in ss),
                "max_ratio": max(s.ratio for s in ss),
            }
        )
    return out


def table(report: RunReport) -> Table:
    t = Table(
        [
            "quantizer",
            "dtype",
            "examples",
            "max |Δy| (merge)",
            "max |Δy| / max |LoRA|",
            "median |Δy| / max |LoRA|",
            "model bound (max)",
            "worst ratio",
        ],
        numeric={2, 3, 4, 5, 6, 7},
    )
    for r in rows(report):
        t.rows.append(
            [
                Cell(str(v))
                for v in (
                    r["quantizer"],
                    r["dtype"],
                    str(r["examples"]),
                    f"{r['max_shift']:.3g}",
                    f"{r['max_shift_over_lora']:.1%}",
                    f"{r['median_shift_over_lora']:.1%}",
                    f"{r['max_bound']:.3g}",
                    f"{r['max_ratio']:.3g}",
                )
            ]
        )
    return t


NOTE = (
    "Merging a LoRA into quantized weights requantizes them: the merged outputs move by the table's "
    "|Δy| (absolute, and as a fraction of the LoRA's own contribution), which the precision model "
    "bounds elementwise (worst ratio ≤ 1: what you see is rounding, not a bug). "
    "See README, 'Quantized bases'."
)
