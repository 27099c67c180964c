"""What a run prints: live progress, the summary grid and each failure with its replay command."""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import TextIO

from properties.results import CellResult, RunReport
from properties.spec import DTYPES

MARK = {"passed": "ok", "failed": "FAIL", "error": "ERROR", "skipped": "skip", "xfailed": "xfail"}


class Progress:
    """``[done/total] failures so far`` on one updating line on a terminal, sparse lines elsewhere."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total = total
        self.stream = stream or sys.stderr  # looked up now: a default bound at import outlives a redirect
        self.tty = self.stream.isatty()
        self.counts: Counter[str] = Counter()
        self.started = time.perf_counter()
        self.done = 0

    def __call__(self, r: CellResult) -> None:
        self.done += 1
        self.counts[r.status] += 1
        bad = self.counts["failed"] + self.counts["error"]
        line = (
            f"[{self.done}/{self.total}] {bad} failing, {self.counts['skipped']} skipped, "
            f"{time.perf_counter() - self.started:.0f}s  {r.property} {r.layer} {r.dtype}: {r.status}"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            if self.done == self.total:
                self.stream.write("\n")
        elif r.status in ("failed", "error") or self.done == self.total or self.done % 50 == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def _ratio(r: CellResult) -> str:
    return "" if r.max_ratio is None else f" {r.max_ratio:.2g}"


def summary_grid(report: RunReport) -> str:
    """Property x layer rows, dtype columns: status and worst error ratio (gate: ratio <= 1)."""
    by_key = {c.key: c for c in report.cells}
    dtypes = [d for d in DTYPES if any(c.dtype == d for c in report.cells)]
    rows = list(dict.fromkeys((c.property, c.layer) for c in report.cells))
    width = max([len(f"{p} {lay}") for p, lay in rows] + [10])
    lines = [f"{'property layer':<{width}}  " + "".join(f"{d:<14}" for d in dtypes)]
    for p, lay in rows:
        cells = [by_key.get((p, lay, d)) for d in dtypes]
        if all(c is None or (c.status == "skipped" and "does not apply" in (c.message or "")) for c in cells):
            continue
        text = "".join(f"{(MARK[c.status] + _ratio(c)) if c else '-':<14}" for c in cells)
        lines.append(f"{p + ' ' + lay:<{width}}  {text}")
    return "\n".join(lines)


def failure_details(report: RunReport) -> str:
    out = []
    for c in report.cells:
        if c.status not in ("failed", "error"):
            continue
        out.append(f"\n{MARK[c.status]}: {c.property} [{c.layer}, {c.dtype}] after {c.examples} examples")
        out.append(f"  {c.message}")
        if c.example:
            # A crash or a hang stops the cell where it happens: that example is not shrunk.
            stopped = (c.message or "").startswith(("crash:", "hang:"))
            out.append("  example running when it stopped:" if stopped else "  shrunk example:")
            out.extend("    " + line for line in c.example.splitlines())
        if c.replay:
            out.append(f"  seed {c.seed}; replay: {c.replay}")
    return "\n".join(out)


def skipped_reasons(report: RunReport) -> str:
    reasons = Counter(
        c.message for c in report.cells if c.status == "skipped" and "does not apply" not in (c.message or "")
    )
    return "\n".join(f"  {n:4d} cells skipped: {m}" for m, n in reasons.most_common())


def closing_line(report: RunReport, seconds: float) -> str:
    n = report.counts()
    state = " (INTERRUPTED: partial results)" if report.header.interrupted else ""
    return (
        f"{report.header.target} {report.header.target_version}: {n['passed']} passed, "
        f"{n['failed']} failed, {n['error']} errors, {n['skipped']} skipped, {n['xfailed']} xfailed "
        f"in {seconds:.1f}s{state}"
    )
