"""``cells.jsonl``: an append-only journal of finished cells, so a run killed outright loses nothing.

Rewriting the whole ``report.json`` after every cell costs time quadratic in the number of cells (a
ci report is megabytes), so the runner rewrites it only every few seconds. Between rewrites the
journal holds every finished cell: one JSON line each, flushed and fsynced as the cell finishes.
Line 1 is the run header. A run that ends normally (or by Ctrl-C) writes the full report and removes
the journal; a journal left behind means the run died, and ``lora-conformance report cells.jsonl``
rebuilds the reports from it. A torn last line (killed mid-write) is ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from properties.reporting.json_report import ReportError, encode_floats, from_json_obj
from properties.results import SCHEMA_VERSION, CellResult, RunReport

JOURNAL_NAME = "cells.jsonl"


class Journal:
    """Appends one line per finished cell to ``out_dir/cells.jsonl``."""

    def __init__(self, out_dir: str | os.PathLike[str], report: RunReport) -> None:
        self.path = Path(out_dir) / JOURNAL_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115 - kept open
        self._write({"schema_version": SCHEMA_VERSION, "header": encode_floats(asdict(report.header))})

    def append(self, cell: CellResult) -> None:
        self._write(encode_floats(cell.to_json()))

    def _write(self, obj: object) -> None:
        self._file.write(json.dumps(obj, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, remove: bool) -> None:
        """Close; ``remove`` once the full report is safely written."""
        self._file.close()
        if remove:
            self.path.unlink(missing_ok=True)


def read_journal(path: str | os.PathLike[str]) -> RunReport:
    """The report of the cells a journal holds; the header marks it as interrupted."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    docs = []
    for n, line in enumerate(lines):
        try:
            docs.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:
                break  # the line being written when the run died
            raise ReportError(f"{path}:{n + 1}: not a journal line ({e})") from e
    if not docs or not isinstance(docs[0], dict) or "header" not in docs[0]:
        raise ReportError(f"{path}: not a LoRA conformance journal (no header line)")
    head = docs[0]
    report = from_json_obj(
        {"schema_version": head.get("schema_version"), "header": head["header"], "cells": docs[1:]}
    )
    report.header.interrupted = True
    return report
