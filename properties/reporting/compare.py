"""Compare a run against a baseline: what regressed, what changed, what the two runs differ in.

Regressions (``Comparison.ok`` is False): a cell that passed or xfailed and now fails or errors, and a
worst ratio that grew by more than ``max_growth``. Ratios at or below ``floor`` are noise around an exact
result, so growth is measured from ``max(baseline, floor)`` and only for a current ratio above ``floor``.
Everything else (new, missing, fixed, newly skipped cells; header differences) is information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from properties.reporting._common import FAILING, cell_label, cell_sort_key, cell_stats, fmt
from properties.results import CellResult, RunHeader, RunReport

Severity = Literal["regression", "info", "header"]
RATIO_FLOOR = 1e-3
_HEADER_FIELDS = ("target", "target_version", "torch_version", "device", "profile", "suite_version")


@dataclass(frozen=True)
class Change:
    severity: Severity
    what: str
    cell: tuple[str, str, str] | None = None
    before: str = ""
    after: str = ""


@dataclass
class Comparison:
    changes: list[Change] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.severity == "regression"]

    @property
    def ok(self) -> bool:
        return not self.regressions

    def format(self) -> str:
        """A plain-text table of the changes, regressions first, and a one-line verdict."""
        n = len(self.regressions)
        verdict = "OK: no regressions" if self.ok else f"REGRESSED: {n} regression{'s' * (n != 1)}"
        if not self.changes:
            return f"{verdict}; nothing changed.\n"
        rank = {"regression": 0, "header": 1, "info": 2}
        rows = [("", "cell / field", "change", "baseline", "current")]
        for c in sorted(self.changes, key=lambda c: rank[c.severity]):
            label = cell_label(c.cell) if c.cell else ""
            rows.append((c.severity.upper(), label, c.what, c.before, c.after))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([*lines, "", verdict]) + "\n"


def compare(
    baseline: RunReport, current: RunReport, max_growth: float = 2.0, floor: float = RATIO_FLOOR
) -> Comparison:
    """Changes from ``baseline`` to ``current``, cell by cell, plus differences between the headers."""
    changes = _header_changes(baseline.header, current.header)
    before = {c.key: c for c in baseline.cells}
    after = {c.key: c for c in current.cells}
    for key in sorted(before.keys() | after.keys(), key=cell_sort_key):
        if key not in after:
            changes.append(Change("info", "missing cell", key, before[key].status, "—"))
        elif key not in before:
            changes.append(Change("info", "new cell", key, "—", _describe(after[key])))
        else:
            changes += _cell_changes(key, before[key], after[key], max_growth, floor)
    return Comparison(changes)


def _describe(cell: CellResult) -> str:
    ratio = cell_stats(cell).ratio
    return cell.status if ratio is None else f"{cell.status}, ratio {fmt(ratio[0])}"


def _cell_changes(
    key: tuple[str, str, str], old: CellResult, new: CellResult, max_growth: float, floor: float
) -> list[Change]:
    was, now = old.status, new.status
    if now in FAILING and was in ("passed", "xfailed"):
        return [Change("regression", f"{was} → {now}", key, _describe(old), _describe(new))]
    if now in FAILING and was in FAILING:
        return []  # not a change; the report itself lists its failures
    if now in FAILING:
        return [Change("info", f"{was} → {now}", key, _describe(old), _describe(new))]
    if was in FAILING:
        return [Change("info", f"fixed ({was} → {now})", key, _describe(old), _describe(new))]
    if was != now:
        return [Change("info", f"{was} → {now}", key, _describe(old), _describe(new))]
    old_r, new_r = cell_stats(old).ratio, cell_stats(new).ratio
    if old_r is None or new_r is None:
        return []
    a, b = old_r[0], new_r[0]
    if math.isnan(a) or math.isnan(b):
        return []
    if b > floor and b / max(a, floor) > max_growth:
        return [Change("regression", f"ratio grew ×{fmt(b / max(a, floor), 2)}", key, fmt(a), fmt(b))]
    if a > floor and a / max(b, floor) > max_growth:
        return [Change("info", f"ratio shrank ×{fmt(a / max(b, floor), 2)}", key, fmt(a), fmt(b))]
    return []


def _header_changes(old: RunHeader, new: RunHeader) -> list[Change]:
    changes = [
        Change("header", name, None, str(getattr(old, name)), str(getattr(new, name)))
        for name in _HEADER_FIELDS
        if getattr(old, name) != getattr(new, name)
    ]
    for flag in sorted(old.precision_flags.keys() | new.precision_flags.keys()):
        a, b = old.precision_flags.get(flag, "—"), new.precision_flags.get(flag, "—")
        if a != b:
            changes.append(Change("header", f"precision flag {flag}", None, str(a), str(b)))
    return changes
