"""Shared test hooks: print the mutant catch table (mutant -> cell -> examples -> seconds)."""

from __future__ import annotations

import sys

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The kill rate and time to catch of every mutant that ran (see ``test_mutants.py``)."""
    mutants = sys.modules.get("mutants")  # imported only when test_mutants.py ran
    log = getattr(mutants, "CATCH_LOG", None)
    if not log:
        return
    caught = sum(status == "failed" for _, _, status, _, _ in log)
    tr = terminalreporter
    tr.section("mutant catch table")
    tr.write_line(f"kill rate: {caught}/{len(log)}")
    tr.write_line(f"{'mutant':34} {'cell':44} {'status':8} {'examples':>8} {'seconds':>8}")
    for name, cell, status, examples, seconds in log:
        tr.write_line(f"{name:34} {str(cell):44} {status:8} {examples:8d} {seconds:8.2f}")
