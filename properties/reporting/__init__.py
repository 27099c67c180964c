"""Reporting: turn a ``RunReport`` into report.json / report.md / report.html, compare runs, merge shards.

Everything here is a pure function of the report (no torch, no test run), so reports can be rendered,
compared and merged anywhere, e.g. in a CI job that only downloads the shards' ``report.json``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from properties.reporting._atomic import atomic_write, atomic_write_text
from properties.reporting.compare import Change, Comparison, compare
from properties.reporting.html import render_html
from properties.reporting.journal import Journal
from properties.reporting.json_report import ReportError, load_report, write_json
from properties.reporting.markdown import render_markdown
from properties.reporting.shards import ShardMergeError, merge_reports
from properties.results import RunReport

__all__ = [
    "Change",
    "Comparison",
    "Journal",
    "ReportError",
    "ShardMergeError",
    "atomic_write",
    "compare",
    "load_report",
    "merge_reports",
    "render_html",
    "render_markdown",
    "write_json",
    "write_reports",
]

_RENDERERS: dict[str, tuple[str, Callable[[RunReport], str] | None]] = {
    "json": ("report.json", None),
    "md": ("report.md", render_markdown),
    "html": ("report.html", render_html),
}


def write_reports(
    report: RunReport, out_dir: str | os.PathLike[str], formats: Iterable[str] = ("json", "md", "html")
) -> dict[str, Path]:
    """Write ``report.<fmt>`` for each format into ``out_dir`` (created if needed), each atomically.

    Returns ``{format: path}``. Unknown formats are rejected before anything is written.
    """
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in _RENDERERS]
    if unknown:
        raise ValueError(f"unknown report format(s) {unknown}; known: {sorted(_RENDERERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in formats:
        name, render = _RENDERERS[fmt]
        path = out / name
        paths[fmt] = write_json(report, path) if render is None else atomic_write_text(path, render(report))
    return paths
