"""``assert_close`` advice for users comparing merged and unmerged outputs, derived from what was measured.

``assert_close(actual, expected)`` accepts ``|actual - expected| <= atol + rtol * |expected|``. Each
sample carries the worst element's absolute ``error``, the exact value's magnitude ``reference`` and
the magnitude bound ``M`` (sum of |products|). Where ``reference`` is tiny compared with ``M`` (heavy
cancellation) only ``atol`` can absorb the error, elsewhere ``rtol`` should. Hence:

* ``rtol`` = max ``error / reference`` over samples with ``reference > TINY * M``;
* ``atol`` = max ``error`` over samples with ``reference <= TINY * M`` and a nonzero error (if there
  are none: over all samples, since any output element may sit near zero with as much error as the
  worst one; exact zeros, e.g. in padding, say nothing about atol);
* both times ``SAFETY``: samples are capped and a longer search finds worse cases.

``atol`` is absolute and so holds for outputs of the size these examples had (``max |y|`` is shown next
to it); ``rtol`` does not depend on scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from properties.reporting._common import ASSERT_CLOSE_DEFAULTS
from properties.results import CellResult, Sample

MERGE_EQUIVALENCE = "merge_equivalence"
"""Property id whose samples compare merged with unmerged outputs."""
OUTPUT_QUANTITIES = ("merged vs unmerged output", "output")
"""``Sample.quantity`` of those samples (the check's label; ``output`` is the field's default)."""
TINY = 1e-2
SAFETY = 4.0


@dataclass(frozen=True)
class ToleranceAdvice:
    """Recommended tolerances for one layer kind x dtype, next to ``assert_close``'s defaults."""

    rtol: float | None
    atol: float | None
    default_rtol: float | None
    default_atol: float | None
    samples: int
    defaults_hold: int  # samples whose error the defaults accept
    max_reference: float


def _round_up(x: float, digits: int = 2) -> float:
    """Round up to ``digits`` significant digits, so the advice reads cleanly and stays conservative."""
    if x <= 0 or not math.isfinite(x):
        return x
    scale = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / scale * (1 - 1e-12)) * scale


def recommend(samples: list[Sample], dtype: str) -> ToleranceAdvice | None:
    """Tolerances that accept every sample with a margin of ``SAFETY``; ``None`` without samples."""
    samples = [s for s in samples if math.isfinite(s.error) and math.isfinite(s.reference)]
    if not samples:
        return None
    tiny = [s for s in samples if s.reference <= TINY * s.magnitude and s.error > 0]
    rest = [s for s in samples if s.reference > TINY * s.magnitude]
    rtol = max((s.error / s.reference for s in rest), default=None)
    atol = max(s.error for s in (tiny or samples))
    d_rtol, d_atol = ASSERT_CLOSE_DEFAULTS.get(dtype, (None, None))
    holds = (
        sum(s.error <= d_atol + d_rtol * s.reference for s in samples)
        if d_rtol is not None and d_atol is not None
        else 0
    )
    return ToleranceAdvice(
        rtol=None if rtol is None else _round_up(SAFETY * rtol),
        atol=_round_up(SAFETY * atol),
        default_rtol=d_rtol,
        default_atol=d_atol,
        samples=len(samples),
        defaults_hold=holds,
        max_reference=max(s.reference for s in samples),
    )


def output_samples(cell: CellResult) -> list[Sample]:
    """The merged-vs-unmerged *output* samples of a ``merge_equivalence`` cell (empty for other cells)."""
    if cell.property != MERGE_EQUIVALENCE:
        return []
    return [s for s in cell.samples if s.quantity in OUTPUT_QUANTITIES]
