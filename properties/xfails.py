"""Expected-failure files: ``property layer dtype [when EXPR]  # reason``, one pattern per line.

Fields are shell globs (``merge_equivalence conv* float16``); blank lines and lines starting with ``#``
are ignored. A plain line marks whole cells as expected failures. A line with ``when EXPR`` marks only
the examples of those cells that match ``EXPR`` (see ``properties.known_bugs``): they are set aside
and the rest of the cell is tested. A line that matches no cell (or, with ``when``, no example) of a
run is reported, so stale entries do not pile up.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from properties.known_bugs import compile_condition


@dataclass(frozen=True)
class XfailRule:
    property: str
    layer: str
    dtype: str
    reason: str
    line: int
    condition: str | None = None  # ``when`` expression: the line covers only matching examples

    def matches(self, prop: str, layer: str, dtype: str) -> bool:
        return all(
            fnmatch.fnmatchcase(v, p)
            for v, p in ((prop, self.property), (layer, self.layer), (dtype, self.dtype))
        )

    def __str__(self) -> str:
        when = f" when {self.condition}" if self.condition else ""
        return f"line {self.line}: {self.property} {self.layer} {self.dtype}{when}"


def parse_xfails(text: str) -> list[XfailRule]:
    rules = []
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cell, _, reason = line.partition("#")
        cell, when, condition = cell.partition(" when ")
        fields = cell.split()
        if len(fields) != 3 or (when and not condition.strip()):
            raise ValueError(
                f"xfails line {i}: expected 'property layer dtype [when EXPR]  # reason', got {raw!r}"
            )
        if when:
            try:
                compile_condition(condition.strip())
            except ValueError as e:
                raise ValueError(f"xfails line {i}: {e}") from None
        rules.append(
            XfailRule(
                *fields,
                reason=reason.strip() or "expected failure",
                line=i,
                condition=condition.strip() if when else None,
            )
        )
    return rules


def load_xfails(path: str | Path | None) -> list[XfailRule]:
    return parse_xfails(Path(path).read_text()) if path else []


BUNDLED = Path(__file__).parent / "targets" / "xfails"


def bundled_xfails(target: str, version: str) -> Path | None:
    """The expected-failure file shipped for ``target`` at ``version`` (``targets/xfails/NAME-VERSION.txt``),
    so that ``lora-conformance run --target peft`` gates on "no new failures" for a known release."""
    path = BUNDLED / f"{target}-{version}.txt"
    return path if path.is_file() else None


def match(rules: list[XfailRule], prop: str, layer: str, dtype: str) -> XfailRule | None:
    """The first whole-cell line for this cell (``when`` lines never cover a whole cell)."""
    return next((r for r in cell_rules(rules) if r.matches(prop, layer, dtype)), None)


def cell_rules(rules: list[XfailRule]) -> tuple[XfailRule, ...]:
    """The plain lines: whole cells expected to fail."""
    return tuple(r for r in rules if r.condition is None)


def example_rules(rules: list[XfailRule]) -> tuple[XfailRule, ...]:
    """The ``when`` lines: known bugs the runner sets aside example by example."""
    return tuple(r for r in rules if r.condition is not None)
