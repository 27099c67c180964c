"""``report.md``: a pull-request comment. Verdict and failures first; statistics folded away."""

from __future__ import annotations

import re

from properties.reporting._common import FAILING, cell_label, sorted_cells
from properties.reporting.tables import (
    TOLERANCE_NOTE,
    Cell,
    Table,
    header_facts,
    stats_table,
    status_table,
    tolerance_table,
    verdict,
    warnings,
)
from properties.results import CellResult, RunReport

MAX_DETAILED_FAILURES = 25
MAX_BLOCK_CHARS = 4000  # GitHub comments are capped at 65536 characters


def render_markdown(report: RunReport) -> str:
    """The whole report as GitHub-flavoured Markdown."""
    h = report.header
    facts = dict(header_facts(report))
    mark = {"PASS": "✅", "FAIL": "❌"}.get(verdict(report), "⚠️")
    brief = ("torch", "device", "precision flags", "profile", "seed", "max examples", "shard")
    out = [f"## {mark} LoRA conformance: {verdict(report)} — {h.target} {h.target_version}", ""]
    out += [f"**{facts['counts']}**", ""]
    out += [" · ".join(f"{k} `{_inline(facts[k])}`" for k in brief if k in facts), ""]
    out += [f"> ⚠️ {w}" for w in warnings(report)]
    out += ["", "### Results (worst ratio error/bound; the gate is ≤ 1)", "", table_md(status_table(report))]
    out += _failures(report)
    out += _not_run(report)
    out += _known_bugs(report)
    out += _by_range(report)
    out += _out_of_range(report)
    out += _details("Error statistics per cell", table_md(stats_table(report)), _STATS_NOTE)
    tol = tolerance_table(report)
    if tol.rows:
        title = "Tolerances for comparing merged and unmerged outputs with torch.testing.assert_close"
        out += _details(title, table_md(tol), TOLERANCE_NOTE)
    from properties.quantized import tolerance as quantized

    qtol = quantized.table(report)
    if qtol.rows:
        out += _details("Quantized merges: output change caused by merging", table_md(qtol), quantized.NOTE)
    out += _details("Run details", table_md(_facts_table(report)), "")
    return "\n".join(out).strip() + "\n"


_STATS_NOTE = (
    "ratio = error / bound (≤ 1 passes); bias |z| = the bias test over the cell's examples (a "
    "systematic lean of the errors along the LoRA delta; it fires above 5.64, false-alarm rate ≤ 1e-6 "
    "per example); err_u = error in units of u·M (u: unit roundoff, M: magnitude "
    "bound). Rounding errors usually grow like √K; err_u far above √K while the ratio passes hints at "
    "reduced precision (e.g. TF32) being on."
)


def _facts_table(report: RunReport) -> Table:
    return Table(["", ""], [[Cell(k), Cell(v)] for k, v in header_facts(report)])


def _failures(report: RunReport) -> list[str]:
    failing = [c for c in sorted_cells(report.cells) if c.status in FAILING]
    if not failing:
        return []
    out = ["", f"### Failures ({len(failing)})"]
    for c in failing[:MAX_DETAILED_FAILURES]:
        out += _failure(c)
    rest = failing[MAX_DETAILED_FAILURES:]
    if rest:
        out += ["", f"… and {len(rest)} more: " + ", ".join(f"`{cell_label(c.key)}`" for c in rest)]
    return out


def _failure(c: CellResult) -> list[str]:
    out = ["", f"#### {'❌' if c.status == 'failed' else '💥'} {cell_label(c.key)} ({c.status})", ""]
    if c.message:
        out += [fence(c.message), ""]
    if c.example:
        out += ["Shrunk example:", "", fence(c.example), ""]
    if c.worst_example and c.worst_example != c.example:
        out += ["Worst example found:", "", fence(c.worst_example), ""]
    if c.replay:
        out += ["Replay:", "", fence(c.replay, "sh")]
    return out


def _not_run(report: RunReport) -> list[str]:
    """Skipped and xfailed cells with their reasons, so a gap in coverage is visible."""
    cells = [c for c in sorted_cells(report.cells) if c.status in ("skipped", "xfailed")]
    if not cells:
        return []
    lines = [f"- {c.status} `{cell_label(c.key)}`: {_inline(c.message or 'no reason given')}" for c in cells]
    return _details(f"Skipped and xfailed cells ({len(cells)})", "\n".join(lines), "")


def _known_bugs(report: RunReport) -> list[str]:
    """Examples set aside by each xfails ``when`` line: how much of the matrix a known bug hides."""
    per_line: dict[str, list[int]] = {}
    for c in report.cells:
        for line, n in c.known_bug_examples.items():
            cells_and_examples = per_line.setdefault(line, [0, 0])
            cells_and_examples[0] += 1
            cells_and_examples[1] += n
    if not per_line:
        return []
    table = Table(
        ["xfails line", "cells", "examples set aside"],
        [[Cell(k, "code"), Cell(str(v[0])), Cell(str(v[1]))] for k, v in sorted(per_line.items())],
        numeric={1, 2},
    )
    note = "Known bugs (xfails `when` lines): these examples were not run; the rest of each cell was."
    return _details(f"Known bugs set aside ({len(per_line)} lines)", table_md(table), note)


def _by_range(report: RunReport) -> list[str]:
    """The xfails lines applied because their release range holds this release, not verified on it."""
    h = report.header
    if not h.xfails_by_range:
        return []
    note = (
        f"{len(h.xfails_by_range)} of the {len(h.xfails_applied)} xfails lines applied to "
        f"{h.target} {h.target_version} come from another release's file, applied because their release "
        "range contains this one; they were not verified on this exact release. Files: "
        + ", ".join(f"`{f}`" for f in h.xfail_files)
        + "."
    )
    body = "\n".join(f"- `{_inline(x)}`" for x in h.xfails_by_range)
    return ["", f"> ℹ️ {note}"] + _details(
        f"xfails lines applied by release range ({len(h.xfails_by_range)})", body, ""
    )


def _out_of_range(report: RunReport) -> list[str]:
    """Examples outside the claim (a stored value may exceed the dtype's range), by reason."""
    per: dict[str, list[int]] = {}
    for c in report.cells:
        for reason, n in c.out_of_range_examples.items():
            per.setdefault(reason, [0, 0])
            per[reason][0] += 1
            per[reason][1] += n
    if not per:
        return []
    table = Table(
        ["reason", "cells", "examples set aside"],
        [[Cell(k), Cell(str(v[0])), Cell(str(v[1]))] for k, v in sorted(per.items())],
        numeric={1, 2},
    )
    note = (
        "A value a correct implementation stores may exceed the dtype's largest finite value, so inf or "
        "NaN would be correct there; decided from the exact values, never from the target's output."
    )
    return _details(f"Examples outside the claim ({sum(v[1] for v in per.values())})", table_md(table), note)


def _details(summary: str, body: str, note: str) -> list[str]:
    parts = ["", f"<details><summary>{summary}</summary>", ""]
    if note:
        parts += [note, ""]
    return parts + [body, "", "</details>"]


def fence(text: str, lang: str = "") -> str:
    """A code block whose fence is longer than any backtick run inside ``text``; long text is cut."""
    if len(text) > MAX_BLOCK_CHARS:
        text = text[:MAX_BLOCK_CHARS] + f"\n… ({len(text) - MAX_BLOCK_CHARS} more characters)"
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _inline(text: str) -> str:
    """Table-/inline-safe text: no pipes or newlines that would break the Markdown structure."""
    return text.replace("|", "\\|").replace("\n", " ")


def table_md(table: Table) -> str:
    if not table.rows:
        return "_(none)_"
    align = ["---:" if i in table.numeric else "---" for i in range(len(table.columns))]
    lines = ["| " + " | ".join(_inline(c) for c in table.columns) + " |", "| " + " | ".join(align) + " |"]
    for row in table.rows:
        cells = [f"`{_inline(c.text)}`" if c.kind == "code" else _inline(c.text) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
