"""Expected-failure files: ``property layer dtype  # reason``, one cell pattern per line.

Fields are shell globs (``merge_equivalence conv* float16``); blank lines and lines starting with ``#``
are ignored. A line that matches no cell of a run is reported, so stale entries do not pile up.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class XfailRule:
    property: str
    layer: str
    dtype: str
    reason: str
    line: int

    def matches(self, prop: str, layer: str, dtype: str) -> bool:
        return all(
            fnmatch.fnmatchcase(v, p)
            for v, p in ((prop, self.property), (layer, self.layer), (dtype, self.dtype))
        )

    def __str__(self) -> str:
        return f"line {self.line}: {self.property} {self.layer} {self.dtype}"


def parse_xfails(text: str) -> list[XfailRule]:
    rules = []
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cell, _, reason = line.partition("#")
        fields = cell.split()
        if len(fields) != 3:
            raise ValueError(f"xfails line {i}: expected 'property layer dtype  # reason', got {raw!r}")
        rules.append(XfailRule(*fields, reason=reason.strip() or "expected failure", line=i))
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
    return next((r for r in rules if r.matches(prop, layer, dtype)), None)
