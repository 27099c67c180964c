"""Expected-failure files: ``[RANGE] property layer dtype [when EXPR]  # reason``, one pattern per line.

Fields are shell globs (``merge_equivalence conv* float16``); blank lines and lines starting with ``#``
are ignored. A plain line marks whole cells as expected failures. A line with ``when EXPR`` marks only
the examples of those cells that match ``EXPR`` (see ``properties.known_bugs``): they are set aside
and the rest of the cell is tested. A line that matches no cell (or, with ``when``, no example) of a
run is reported, so stale entries do not pile up.

A line may start with a release range, ``[peft>=0.9,<0.14]`` (``properties.releases``): it applies only to
a run against that library at a release in the range. In a bundled ``NAME-VERSION.txt`` an unranged line
means ``[NAME==VERSION]``, and a run against any release picks up every bundled line of every file of its
library whose range contains that release (:func:`bundled_rules`), saying which were applied by range
rather than verified on that exact release.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from properties.known_bugs import compile_condition
from properties.releases import ReleaseRange, exact, parse_range, version_key


@dataclass(frozen=True)
class XfailRule:
    property: str
    layer: str
    dtype: str
    reason: str
    line: int
    condition: str | None = None  # ``when`` expression: the line covers only matching examples
    release: ReleaseRange | None = None  # ``[name>=a,<b]``: the releases the line applies to
    source: str = ""  # the file's name, when read from a file

    @property
    def key(self) -> str:
        """Identifies the line among those of several files (line numbers repeat across files)."""
        return f"{self.source}:{self.line}"

    @property
    def pattern(self) -> tuple[str, str, str, str | None]:
        """What the line matches, whatever file or range it comes from (two equal patterns are one)."""
        return (self.property, self.layer, self.dtype, self.condition)

    def matches(self, prop: str, layer: str, dtype: str) -> bool:
        return all(
            fnmatch.fnmatchcase(v, p)
            for v, p in ((prop, self.property), (layer, self.layer), (dtype, self.dtype))
        )

    def __str__(self) -> str:
        when = f" when {self.condition}" if self.condition else ""
        rng = f"{self.release} " if self.release else ""
        source = f" (from {self.source})" if self.source else ""
        return f"line {self.line}: {rng}{self.property} {self.layer} {self.dtype}{when}{source}"


def parse_xfails(text: str, source: str = "") -> list[XfailRule]:
    """The lines of an xfails file (``source``: its name, kept in each rule).

    ``ValueError`` names the line that is malformed."""
    rules = []
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            release, line = parse_range(line)
        except ValueError as e:
            raise ValueError(f"xfails line {i}: {e}") from None
        cell, _, reason = line.partition("#")
        cell, when, condition = cell.partition(" when ")
        fields = cell.split()
        if len(fields) != 3 or (when and not condition.strip()):
            raise ValueError(
                f"xfails line {i}: expected 'property layer dtype [when EXPR]  # reason' (after an optional "
                f"release range like [peft>=0.14,<0.19]), got {raw!r}"
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
                release=release,
                source=source,
            )
        )
    return rules


def load_xfails(path: str | Path | None) -> list[XfailRule]:
    return parse_xfails(Path(path).read_text(), Path(path).name) if path else []


def for_release(rules: list[XfailRule], target: str, version: str) -> list[XfailRule]:
    """The lines that apply to ``target`` at ``version``: unranged ones, and those whose range holds it."""
    return [r for r in rules if r.release is None or r.release.applies_to(target, version)]


BUNDLED = Path(__file__).parent / "targets" / "xfails"


def bundled_xfails(target: str, version: str) -> Path | None:
    """The expected-failure file shipped for ``target`` at ``version`` (``targets/xfails/NAME-VERSION.txt``),
    so that ``lora-conformance run --target peft`` gates on "no new failures" for a known release."""
    path = BUNDLED / f"{target}-{version}.txt"
    return path if path.is_file() else None


@dataclass(frozen=True)
class BundledXfails:
    """The bundled lines that apply to one release, and where they come from."""

    rules: list[XfailRule]
    exact: Path | None  # NAME-VERSION.txt, when this very release has a file
    files: list[Path]  # every file a line was taken from
    by_range: list[XfailRule]  # lines from other releases' files, applied because their range holds it

    def describe(self) -> str:
        if not self.rules:
            return ""
        names = ", ".join(p.name for p in self.files)
        verified = len(self.rules) - len(self.by_range)
        return (
            f"{len(self.rules)} lines from {names}: {verified} verified on this release, "
            f"{len(self.by_range)} by range"
        )


def bundled_files(target: str) -> list[tuple[str, Path]]:
    """``(version, path)`` of every bundled ``NAME-VERSION.txt`` of ``target``, oldest first."""
    out = []
    for path in BUNDLED.glob(f"{target}-*.txt"):
        version = path.stem[len(target) + 1 :]
        try:
            version_key(version)
        except ValueError:
            continue
        out.append((version, path))
    return sorted(out, key=lambda vp: version_key(vp[0]))


def bundled_rules(target: str, version: str) -> BundledXfails:
    """Every bundled line of ``target`` whose release range contains ``version``.

    An unranged line of ``NAME-V.txt`` applies to V only. Lines of the release's own file count as verified
    there; the others are applied by range and listed in ``by_range``. Two lines with the same pattern are
    one: the one from the release's own file wins, else the one from the nearest release's file.
    """
    try:
        here = version_key(version)
    except ValueError:
        here = None
    files = bundled_files(target)
    if here is not None:  # own file first, then the nearest in release order (newer first at a tie)
        older = sum(version_key(v) < here for v, _ in files)
        order = sorted(range(len(files)), key=lambda i: (files[i][0] != version, _distance(i, older)))
        files = [files[i] for i in order]
    chosen: dict[tuple, XfailRule] = {}
    used: list[Path] = []
    for file_version, path in files:
        took = False
        for rule in load_xfails(path):
            release = rule.release or exact(target, file_version)
            if not release.applies_to(target, version) or rule.pattern in chosen:
                continue
            chosen[rule.pattern] = rule
            took = True
        if took:
            used.append(path)
    rules = sorted(chosen.values(), key=lambda r: (r.source, r.line))
    own = f"{target}-{version}.txt"
    return BundledXfails(
        rules=rules,
        exact=bundled_xfails(target, version),
        files=sorted(used, key=lambda p: p.name),
        by_range=[r for r in rules if r.source != own],
    )


def _distance(index: int, older: int) -> tuple[int, int]:
    """How many files lie between the file at ``index`` (release order) and a release that comes after
    ``older`` files; a newer file before an older one at the same distance."""
    return (older - index, 1) if index < older else (index - older + 1, 0)


def applied_by_range(rule: XfailRule, target: str, version: str) -> bool:
    """Whether ``rule`` applies to ``version`` only through its range, not verified on that release.

    Lines of the release's own bundled file are verified there; lines of another release's file, and
    ranged lines of a user's file whose range is more than this one release, are applied by range.
    """
    if rule.source == f"{target}-{version}.txt":
        return False
    if rule.source.startswith(f"{target}-") and rule.source.endswith(".txt"):
        return True
    return rule.release is not None and rule.release.clauses != (("==", version),)


def record_xfails(header: Any, rules: list[XfailRule], target: str, version: str) -> None:
    """Write into a run's header which lines it applied, from which files, and which only by range."""
    header.xfails_applied = [str(r) for r in rules]
    header.xfail_files = sorted({r.source for r in rules if r.source})
    header.xfails_by_range = [str(r) for r in rules if applied_by_range(r, target, version)]


def match(rules: list[XfailRule], prop: str, layer: str, dtype: str) -> XfailRule | None:
    """The first whole-cell line for this cell (``when`` lines never cover a whole cell)."""
    return next((r for r in cell_rules(rules) if r.matches(prop, layer, dtype)), None)


def cell_rules(rules: list[XfailRule]) -> tuple[XfailRule, ...]:
    """The plain lines: whole cells expected to fail."""
    return tuple(r for r in rules if r.condition is None)


def example_rules(rules: list[XfailRule]) -> tuple[XfailRule, ...]:
    """The ``when`` lines: known bugs the runner sets aside example by example."""
    return tuple(r for r in rules if r.condition is not None)
