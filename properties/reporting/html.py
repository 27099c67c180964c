"""``report.html``: one self-contained file (inline CSS, plots as inline PNG) that opens offline."""

from __future__ import annotations

from html import escape

from properties.reporting._common import FAILING, cell_label, sorted_cells
from properties.reporting.tables import (
    TOLERANCE_NOTE,
    Table,
    header_facts,
    stats_table,
    status_table,
    tolerance_table,
    verdict,
    warnings,
    worst_table,
)
from properties.results import RunReport

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
body { padding: 0 1em; }
h1 .PASS { color: #1a7f37; } h1 .FAIL, h1 .NO-CELLS { color: #cf222e; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.passed { background: #dafbe1; } td.failed, td.error { background: #ffebe9; font-weight: 600; }
td.skipped { color: #6e7781; } td.xfailed { background: #fff8c5; }
td.code, pre { font-family: ui-monospace, monospace; font-size: 12px; }
pre { background: #f6f8fa; padding: .6em; overflow-x: auto; white-space: pre-wrap; }
.warn { background: #fff8c5; padding: .4em .8em; border-left: 4px solid #d4a72c; }
.note { color: #57606a; font-size: 13px; max-width: 60em; }
figure { margin: 1em 0 2em; } figcaption { color: #57606a; font-size: 13px; max-width: 60em; }
img { max-width: 100%; }
"""
_NO_MATPLOTLIB = "matplotlib is not installed, so this report has no plots (pip install matplotlib)."


def render_html(report: RunReport) -> str:
    """The whole report as one HTML document."""
    h = report.header
    v = verdict(report)
    title = f"LoRA conformance: {v} — {h.target} {h.target_version}"
    body = [
        f'<h1>LoRA conformance: <span class="{v.replace(" ", "-")}">{v}</span> — '
        f"{escape(h.target)} {escape(h.target_version)}</h1>",
        _facts(report),
        *(f'<p class="warn">{escape(w)}</p>' for w in warnings(report)),
        "<h2>Results</h2>",
        '<p class="note">Worst ratio error / bound per cell; the gate is ≤ 1.</p>',
        table_html(status_table(report)),
        _failures(report),
        _not_run(report),
        "<h2>Plots</h2>",
        _plots(report),
        "<h2>Error statistics</h2>",
        '<p class="note">ratio = error / bound; err_u = error in units of u·M, to compare with √K.</p>',
        table_html(stats_table(report)),
    ]
    tol = tolerance_table(report)
    if tol.rows:
        body += [
            "<h2>Tolerances for merged vs unmerged outputs (torch.testing.assert_close)</h2>",
            f'<p class="note">{escape(TOLERANCE_NOTE.replace("`", ""))}</p>',
            table_html(tol),
        ]
    body += ["<h2>Worst examples</h2>", table_html(worst_table(report))]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _facts(report: RunReport) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in header_facts(report))
    return f"<table>{rows}</table>"


def _failures(report: RunReport) -> str:
    failing = [c for c in sorted_cells(report.cells) if c.status in FAILING]
    if not failing:
        return ""
    out = [f"<h2>Failures ({len(failing)})</h2>"]
    for c in failing:
        out.append(f"<h3>{escape(cell_label(c.key))} ({escape(c.status)})</h3>")
        for label, text in (
            ("", c.message),
            ("Shrunk example", c.example),
            ("Worst example found", c.worst_example if c.worst_example != c.example else None),
            ("Replay", c.replay),
        ):
            if text:
                out.append((f"<p>{label}:</p>" if label else "") + f"<pre>{escape(text)}</pre>")
    return "\n".join(out)


def _not_run(report: RunReport) -> str:
    cells = [c for c in sorted_cells(report.cells) if c.status in ("skipped", "xfailed")]
    if not cells:
        return ""
    items = "".join(
        f"<li>{c.status} <b>{escape(cell_label(c.key))}</b>: {escape(c.message or 'no reason given')}</li>"
        for c in cells
    )
    return f"<h2>Skipped and xfailed cells ({len(cells)})</h2><ul>{items}</ul>"


def _plots(report: RunReport) -> str:
    from properties.reporting.plots import PlottingUnavailable, render_plots

    try:
        plots = render_plots(report)
    except PlottingUnavailable:
        return f'<p class="warn">{_NO_MATPLOTLIB}</p>'
    if not plots:
        return '<p class="note">No samples to plot.</p>'
    return "\n".join(
        f'<figure><img alt="{escape(p.title)}" src="data:image/png;base64,{p.png_base64}">'
        f"<figcaption><b>{escape(p.title)}.</b> {escape(p.caption)}</figcaption></figure>"
        for p in plots
    )


def table_html(table: Table) -> str:
    if not table.rows:
        return '<p class="note">(none)</p>'
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        tds = []
        for i, cell in enumerate(row):
            classes = " ".join(x for x in (cell.kind, "num" if i in table.numeric else "") if x)
            attr = f' class="{classes}"' if classes else ""
            tds.append(f"<td{attr}>{escape(cell.text)}</td>")
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
