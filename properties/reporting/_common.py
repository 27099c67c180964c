"""Shared vocabulary of the renderers: canonical ordering, number formatting, per-dtype constants.

Kept free of torch so that reports can be rendered / compared on a machine without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

from properties.results import CellResult

DTYPE_ORDER: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
LAYER_ORDER: tuple[str, ...] = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "mha")

ASSERT_CLOSE_DEFAULTS: dict[str, tuple[float, float]] = {
    # dtype: (rtol, atol) of torch.testing.assert_close
    "float64": (1e-7, 1e-7),
    "float32": (1.3e-6, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float16": (1e-3, 1e-5),
}

FAILING = ("failed", "error")


def _rank(name: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def dtype_rank(dtype: str) -> tuple[int, str]:
    return _rank(dtype, DTYPE_ORDER)


def cell_sort_key(key: tuple[str, str, str]) -> tuple[str, tuple[int, str], tuple[int, str]]:
    """Property alphabetically, then layers and dtypes in the spec's order (unknown ones last)."""
    prop, layer, dtype = key
    return (prop, _rank(layer, LAYER_ORDER), dtype_rank(dtype))


def sorted_cells(cells: Iterable[CellResult]) -> list[CellResult]:
    return sorted(cells, key=lambda c: cell_sort_key(c.key))


def sorted_dtypes(dtypes: Iterable[str]) -> list[str]:
    return sorted(set(dtypes), key=dtype_rank)


def fmt(x: float | None, digits: int = 3) -> str:
    """Compact number for tables; ``—`` for a missing value."""
    if x is None:
        return "—"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def cell_label(key: tuple[str, str, str]) -> str:
    return " · ".join(key)


@dataclass(frozen=True)
class CellStats:
    """(max, median, p99) of the ratio and of err_u; ``None`` when the cell measured nothing."""

    ratio: tuple[float, float, float] | None
    err_u: tuple[float, float, float] | None


def cell_stats(cell: CellResult) -> CellStats:
    """Take the runner's summary fields; recompute from ``samples`` only where they were left empty.

    ``summarize`` skips non-finite ratios; a NaN / Inf output is the worst case there is, so a sample
    with a non-finite ratio makes the maximum ``inf`` here.
    """
    c = cell
    if cell.max_ratio is None or cell.max_err_u is None:
        c = copy.copy(cell)
        c.summarize()
    ratio = None if c.max_ratio is None else (c.max_ratio, c.median_ratio, c.p99_ratio)
    if any(not math.isfinite(s.ratio) for s in cell.samples):
        ratio = (math.inf, *ratio[1:]) if ratio else (math.inf, math.inf, math.inf)
    err_u = None if c.max_err_u is None else (c.max_err_u, c.median_err_u, c.p99_err_u)
    return CellStats(ratio=ratio, err_u=err_u)  # type: ignore[arg-type]
