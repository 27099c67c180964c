"""The tables both renderers show, built once as plain text so Markdown and HTML cannot disagree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from properties.reporting._common import (
    FAILING,
    cell_stats,
    fmt,
    sorted_cells,
    sorted_dtypes,
)
from properties.reporting.tolerances import SAFETY, TINY, output_samples, recommend
from properties.results import STATUSES, CellResult, RunReport


@dataclass(frozen=True)
class Cell:
    """Text of one table cell; ``kind`` (a status, or "") lets HTML colour it."""

    text: str
    kind: str = ""


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    numeric: set[int] = field(default_factory=set)  # right-aligned column indices


STATUS_MARK = {
    "passed": "✅ pass",
    "failed": "❌ FAIL",
    "error": "💥 ERROR",
    "skipped": "⏭️ skip",
    "xfailed": "⚠️ xfail",
}


def verdict(report: RunReport) -> str:
    if not report.cells:
        return "NO CELLS"
    return "PASS" if report.ok else "FAIL"


def counts_line(report: RunReport) -> str:
    counts = report.counts()
    parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s]]
    return f"{len(report.cells)} cells: " + (", ".join(parts) if parts else "none")


def header_facts(report: RunReport) -> list[tuple[str, str]]:
    """(label, value) pairs describing the run, in reading order."""
    h = report.header
    flags = ", ".join(f"{k}={v}" for k, v in sorted(h.precision_flags.items())) or "—"
    facts = [
        ("target", f"{h.target} {h.target_version}"),
        ("torch", h.torch_version),
        ("device", h.device),
        ("precision flags", flags),
        ("profile", h.profile),
        ("seed", str(h.seed)),
        ("max examples", "—" if h.max_examples is None else str(h.max_examples)),
        ("python", h.python_version),
        ("platform", h.platform),
        ("hypothesis", h.hypothesis_version or "—"),
        ("suite", h.suite_version),
        ("started", h.started),
        ("finished", h.finished or "—"),
        ("counts", counts_line(report)),
    ]
    if h.shard:
        facts.append(("shard", h.shard))
    return facts


def warnings(report: RunReport) -> list[str]:
    h = report.header
    out = []
    if h.interrupted:
        out.append("The run was interrupted or is incomplete: cells are missing.")
    if h.unmatched_xfails:
        out.append("xfail entries that matched no cell: " + ", ".join(h.unmatched_xfails))
    return out


def _status_text(cell: CellResult) -> Cell:
    text = STATUS_MARK.get(cell.status, cell.status)
    stats = cell_stats(cell)
    if stats.ratio is not None and cell.status in ("passed", "failed"):
        text += f" {fmt(stats.ratio[0])}"
    return Cell(text, cell.status)


def status_table(report: RunReport) -> Table:
    """Rows: property x layer; columns: dtypes; each entry: status and worst ratio (gate: <= 1)."""
    dtypes = sorted_dtypes(c.dtype for c in report.cells)
    by_key = {c.key: c for c in report.cells}
    table = Table(["property", "layer", *dtypes])
    seen: list[tuple[str, str]] = []
    for c in sorted_cells(report.cells):
        if (c.property, c.layer) not in seen:
            seen.append((c.property, c.layer))
    for prop, layer in seen:
        row = [Cell(prop), Cell(layer)]
        for dt in dtypes:
            cell = by_key.get((prop, layer, dt))
            row.append(Cell("·") if cell is None else _status_text(cell))
        table.rows.append(row)
    return table


def stats_table(report: RunReport) -> Table:
    """Per cell: max / median / p99 of the ratio and of err_u, with sqrt(K) to compare err_u against,
    and the bias test's largest |z| next to the worst ratio (``properties.bias``; it fires above 5.64)."""
    table = Table(
        ["property", "layer", "dtype", "examples", "ratio max", "bias |z|", "median", "p99", "err_u max"]
        + ["median", "p99", "√K max"],
        numeric=set(range(3, 12)),
    )
    for c in sorted_cells(report.cells):
        stats = cell_stats(c)
        if stats.ratio is None and stats.err_u is None:
            continue
        ratio = stats.ratio or (None, None, None)
        err_u = stats.err_u or (None, None, None)
        k_max = max((s.inner_dim for s in c.samples), default=0)
        kind = c.status if c.status in FAILING else ""
        table.rows.append(
            [Cell(c.property), Cell(c.layer), Cell(c.dtype), Cell(str(c.examples))]
            + [Cell(fmt(ratio[0]), kind), Cell(fmt(c.max_bias_z) if c.max_bias_z is not None else "—")]
            + [Cell(fmt(x), kind) for x in (*ratio[1:], *err_u)]
            + [Cell(fmt(math.sqrt(k_max)) if k_max else "—")]
        )
    return table


TOLERANCE_NOTE = (
    f"Recommended `rtol` = {SAFETY:g} × max(error / |reference|) over elements with "
    f"|reference| > {TINY:g}·M; `atol` = {SAFETY:g} × max(error) over elements with "
    f"|reference| ≤ {TINY:g}·M and nonzero error (all elements if none), M being the magnitude bound. "
    "`atol` is absolute: it holds for outputs as large as max |y|. 'defaults accept' counts the "
    "samples whose error `torch.testing.assert_close`'s defaults accept."
)


def tolerance_table(report: RunReport) -> Table:
    """merge_equivalence cells: recommended rtol / atol for merged-vs-unmerged outputs, and the defaults."""
    table = Table(
        ["layer", "dtype", "samples", "rtol", "atol", "max |y|", "default rtol", "default atol"]
        + ["defaults accept"],
        numeric=set(range(2, 9)),
    )
    for c in sorted_cells(report.cells):
        advice = recommend(output_samples(c), c.dtype)
        if advice is None:
            continue
        accept = f"{advice.defaults_hold}/{advice.samples}" if advice.default_rtol is not None else "—"
        table.rows.append(
            [
                Cell(c.layer),
                Cell(c.dtype),
                Cell(str(advice.samples)),
                Cell(fmt(advice.rtol, 2)),
                Cell(fmt(advice.atol, 2)),
                Cell(fmt(advice.max_reference)),
                Cell(fmt(advice.default_rtol)),
                Cell(fmt(advice.default_atol)),
                Cell(accept, "" if advice.defaults_hold == advice.samples else "failed"),
            ]
        )
    return table


def worst_table(report: RunReport, n: int = 15) -> Table:
    """The ``n`` cells with the largest worst-case ratio, with the example that produced it."""
    table = Table(
        ["property", "layer", "dtype", "status", "ratio", "err_u", "K", "rank", "quantity", "example"],
        numeric={4, 5, 6, 7},
    )
    ranked = []
    for c in report.cells:
        finite = [s for s in c.samples if math.isfinite(s.ratio)]
        worst = max(finite, key=lambda s: s.ratio, default=None)
        ratio = cell_stats(c).ratio
        if ratio is not None:
            ranked.append((ratio[0], c, worst))
    ranked.sort(key=lambda t: -t[0] if not math.isnan(t[0]) else math.inf)  # NaN last
    for ratio, c, s in ranked[:n]:
        table.rows.append(
            [
                Cell(c.property),
                Cell(c.layer),
                Cell(c.dtype),
                Cell(c.status, c.status),
                Cell(fmt(ratio), c.status if c.status in FAILING else ""),
                Cell(fmt(s.err_u) if s else "—"),
                Cell(str(s.inner_dim) if s else "—"),
                Cell(str(s.rank) if s else "—"),
                Cell(s.quantity if s else "—"),
                Cell(c.worst_example or c.example or "—", "code"),
            ]
        )
    return table
