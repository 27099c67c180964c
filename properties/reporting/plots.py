"""Plots for the HTML report, as base64 PNG. matplotlib is optional and imported only here, lazily.

Figures are drawn on ``matplotlib.figure.Figure`` directly (no pyplot): no global backend switch and no
figure registry, so rendering a report inside a test run or a notebook leaves nothing behind.
"""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from properties.reporting._common import DTYPE_ORDER, sorted_dtypes
from properties.results import RunReport, Sample

_COLORS = dict(zip(DTYPE_ORDER, ("#4c72b0", "#55a868", "#c44e52", "#8172b2"), strict=True))
_OTHER_COLORS = ("#937860", "#da8bc3", "#8c8c8c", "#ccb974")
_DPI = 90


class PlottingUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True)
class Plot:
    title: str
    png_base64: str
    caption: str


def render_plots(report: RunReport) -> list[Plot]:
    """Every plot that has data; raises ``PlottingUnavailable`` without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlottingUnavailable(str(e)) from e
    samples = [(c.property, c.dtype, s) for c in report.cells for s in c.samples]
    plots = [
        _ratio_by_property(Figure, samples),
        _scaling(Figure, [(d, s) for _, d, s in samples if s.cycles is None]),
        _drift(Figure, [(d, s) for _, d, s in samples if s.cycles is not None]),
    ]
    return [p for p in plots if p is not None]


def _color(dtype: str, dtypes: list[str]) -> str:
    if dtype in _COLORS:
        return _COLORS[dtype]
    return _OTHER_COLORS[dtypes.index(dtype) % len(_OTHER_COLORS)]


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def _floor(values: list[float]) -> float:
    """Where to draw zeros on a log axis: below the smallest positive value."""
    positive = [v for v in values if v > 0]
    return min(positive) / 2 if positive else 1e-6


def _figure(Figure: Any, width: float, height: float, bottom: float = 0.55) -> Any:
    """A figure with fixed margins, in inches (left: tick labels and the y label; ``bottom``: tick
    labels and the x label). matplotlib's constrained layout measures every tick label's extent
    before each draw: ~40% of a report's plotting time."""
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=0.9 / width, right=1 - 0.15 / width, bottom=bottom / height, top=1 - 0.15 / height, wspace=0.3
    )
    return fig


def _plain_log_labels(fig: Any) -> None:
    """Log axes labelled ``1e-06`` rather than matplotlib's default ``$10^{-6}$``: the mathtext parser
    behind the default costs ~25% of a report's plotting, paid once in every process that renders."""
    from matplotlib.ticker import LogFormatter, NullFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_major_formatter(LogFormatter(base=axis.get_transform().base, labelOnlyBase=True))
                axis.set_minor_formatter(NullFormatter())


def _png(fig: Any) -> str:
    _plain_log_labels(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _jitter(n: int, width: float) -> list[float]:
    """Deterministic spread for strip plots (a report must not change between renders)."""
    return [width * (((i * 0.618034) % 1.0) - 0.5) for i in range(n)]


def _ratio_by_property(Figure: Any, samples: list[tuple[str, str, Sample]]) -> Plot | None:
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for prop, dtype, s in samples:
        if math.isfinite(s.ratio):
            groups[(prop, dtype)].append(s.ratio)
    if not groups:
        return None
    props = sorted({p for p, _ in groups})
    dtypes = sorted_dtypes(d for _, d in groups)
    floor = min(_floor([v for vs in groups.values() for v in vs]), 0.5)
    # Rotated property names below the axis: up to ~1 in.
    fig = _figure(Figure, max(5.0, 1.0 + 0.9 * len(props)), 3.6 + 0.5, bottom=1.15)
    ax = fig.subplots()
    width = 0.8 / len(dtypes)
    for j, dtype in enumerate(dtypes):
        # One boxplot and one scatter per dtype (not per property): matplotlib's cost is per call.
        color = _color(dtype, dtypes)
        boxes, positions, xs, ys = [], [], [], []
        for i, prop in enumerate(props):
            values = [max(v, floor) for v in groups.get((prop, dtype), [])]
            if not values:
                continue
            x = i + (j - (len(dtypes) - 1) / 2) * width
            boxes.append(values)
            positions.append(x)
            xs += [x + d for d in _jitter(len(values), width * 0.6)]
            ys += values
        if not boxes:
            continue
        box = ax.boxplot(boxes, positions=positions, widths=width * 0.8, showfliers=False, patch_artist=True)
        for patch in box["boxes"]:
            patch.set(facecolor=color, alpha=0.25, edgecolor=color)
        ax.scatter(xs, ys, s=6, color=color, alpha=0.7, label=dtype)
    ax.axhline(1.0, color="crimson", linestyle="--", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(props)), props, rotation=25, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(props) - 0.4)
    ax.set_ylabel("error / bound")
    ax.legend(fontsize=7, markerscale=2, loc="lower right")  # "best" scans every point: slow
    caption = "Each point is one example's worst element; the dashed line is the gate (ratio 1)."
    return Plot(
        "Error ratio by property and dtype",
        _png(fig),
        caption + _zero_note([v for vs in groups.values() for v in vs], floor),
    )


def _zero_note(values: list[float], floor: float) -> str:
    return f" Zeros are drawn at {floor:.2g}." if any(v <= 0 for v in values) else ""


def _scaling(Figure: Any, samples: list[tuple[str, Sample]]) -> Plot | None:
    samples = [(d, s) for d, s in samples if math.isfinite(s.err_u) and math.isfinite(s.ratio)]
    if not samples:
        return None
    dtypes = sorted_dtypes(d for d, _ in samples)
    err_floor = _floor([s.err_u for _, s in samples])
    ratio_floor = _floor([s.ratio for _, s in samples])
    fig = _figure(Figure, 9.0, 3.6)
    ax_k, ax_r = fig.subplots(1, 2)
    for dtype in dtypes:
        mine = [s for d, s in samples if d == dtype]
        style = {"s": 8, "color": _color(dtype, dtypes), "alpha": 0.6, "label": dtype}
        ax_k.scatter([max(s.inner_dim, 1) for s in mine], [max(s.err_u, err_floor) for s in mine], **style)
        ax_r.scatter([max(s.rank, 1) for s in mine], [max(s.ratio, ratio_floor) for s in mine], **style)
    ks = [max(s.inner_dim, 1) for _, s in samples]
    k_lo, k_hi = min(ks), max(ks)
    grid = [k_lo * (k_hi / k_lo) ** (i / 50) for i in range(51)] if k_hi > k_lo else [k_lo, k_lo * 2]
    ax_k.plot(grid, [math.sqrt(k) for k in grid], color="black", linestyle="--", linewidth=1, label="√K")
    ax_k.set(xscale="log", yscale="log", xlabel="inner dimension K", ylabel="error / (u·M)")
    ax_r.axhline(1.0, color="crimson", linestyle="--", linewidth=1)
    ax_r.set_xscale("log", base=2)
    ax_r.set(yscale="log", xlabel="rank r", ylabel="error / bound")
    ax_k.legend(fontsize=7, markerscale=2, loc="upper left")
    caption = (
        "Left: error in units of u·M against K; correct rounding typically sits near √K (dashed) — far "
        "above it hints at reduced precision (TF32, fp16 accumulation). Right: ratio against rank."
    )
    return Plot(
        "Error against inner dimension and rank",
        _png(fig),
        caption + _zero_note([s.err_u for _, s in samples], err_floor),
    )


def _drift(Figure: Any, samples: list[tuple[str, Sample]]) -> Plot | None:
    samples = [(d, s) for d, s in samples if math.isfinite(s.err_u) and s.cycles and s.cycles > 0]
    if not samples:
        return None
    dtypes = sorted_dtypes(d for d, _ in samples)
    floor = _floor([s.err_u for _, s in samples])
    fig = _figure(Figure, 5.5, 3.6)
    ax = fig.subplots()
    for dtype in dtypes:
        mine = [s for d, s in samples if d == dtype]
        color = _color(dtype, dtypes)
        ax.scatter([s.cycles for s in mine], [max(s.err_u, floor) for s in mine], s=8, color=color, alpha=0.5)
        worst: dict[int, float] = {}
        for s in mine:
            worst[s.cycles] = max(worst.get(s.cycles, 0.0), max(s.err_u, floor))  # type: ignore[index]
        xs = sorted(worst)
        ax.plot(xs, [worst[x] for x in xs], color=color, linewidth=1, label=f"{dtype} (worst)")
    cycles = sorted({s.cycles for _, s in samples})  # type: ignore[type-var]
    if len(cycles) > 1:
        start = max(max(s.err_u, floor) for _, s in samples if s.cycles == cycles[0])
        for power, style in ((0.5, ":"), (1.0, "--")):
            ys = [start * (c / cycles[0]) ** power for c in cycles]
            ax.plot(cycles, ys, color="grey", linestyle=style, linewidth=1, label=f"∝ n^{power:g}")
    ax.set(xscale="log", yscale="log", xlabel="merge/unmerge cycles n", ylabel="error / (u·M)")
    ax.legend(fontsize=7, loc="upper left")
    caption = (
        "Weight drift after n merge/unmerge cycles. Random rounding grows like √n; growth like n means "
        "a systematic bias (e.g. a rounding that always goes one way)."
    )
    return Plot(
        "Drift of repeated merge/unmerge",
        _png(fig),
        caption + _zero_note([s.err_u for _, s in samples], floor),
    )
