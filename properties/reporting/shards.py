"""Merge the reports of a sharded run (``header.shard = "i/n"``) into the report of the whole run.

Refuses to merge what would give a misleading report: shards of different runs (target, version,
profile, seed, ...), the same shard twice, the same cell twice, or an incomplete set of shards unless
``allow_partial`` (then the merged header says ``interrupted``: cells are missing).
"""

from __future__ import annotations

import dataclasses
import re

from properties.reporting._common import cell_label, sorted_cells
from properties.results import RunReport

_SAME = (
    "target",
    "target_version",
    "profile",
    "seed",
    "max_examples",
    "suite_version",
    "torch_version",
    "device",
    "precision_flags",
)
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class ShardMergeError(ValueError):
    """The shard reports do not make up one run."""


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``"i/n"`` with ``1 <= i <= n`` -> ``(i, n)``."""
    m = _SHARD.match(shard or "")
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ShardMergeError(f"not a shard report: shard={shard!r} (expected 'i/n' with 1 <= i <= n)")
    return int(m.group(1)), int(m.group(2))


def merge_reports(reports: list[RunReport], allow_partial: bool = False) -> RunReport:
    """One report from shard reports; cells sorted by property, layer kind, dtype."""
    if not reports:
        raise ShardMergeError("no shard reports to merge")
    shards = sorted(((parse_shard(r.header.shard), r) for r in reports), key=lambda t: t[0])
    _check_same_run([r for _, r in shards])
    totals = {n for (_, n), _ in shards}
    if len(totals) > 1:
        raise ShardMergeError(f"shards split the run differently: n = {sorted(totals)}")
    total = totals.pop()
    indices = [i for (i, _), _ in shards]
    dupes = sorted({i for i in indices if indices.count(i) > 1})
    if dupes:
        raise ShardMergeError("the same shard given twice: " + ", ".join(f"{i}/{total}" for i in dupes))
    missing = [f"{i}/{total}" for i in range(1, total + 1) if i not in indices]
    if missing and not allow_partial:
        raise ShardMergeError(f"missing shards: {', '.join(missing)} (pass allow_partial to merge anyway)")

    owner: dict[tuple[str, str, str], str] = {}
    cells = []
    for _, r in shards:
        for c in r.cells:
            if c.key in owner:
                raise ShardMergeError(
                    f"cell {cell_label(c.key)} appears in shard {owner[c.key]} and shard {r.header.shard}"
                )
            owner[c.key] = r.header.shard  # type: ignore[assignment]
            cells.append(c)

    headers = [r.header for _, r in shards]
    finished = [h.finished for h in headers]
    unmatched = set.intersection(*(set(h.unmatched_xfails) for h in headers))  # unmatched in every shard
    header = dataclasses.replace(
        headers[0],
        shard=None,
        started=min(h.started for h in headers),
        finished=None if None in finished else max(finished),  # type: ignore[type-var]
        interrupted=any(h.interrupted for h in headers) or bool(missing),
        unmatched_xfails=[x for x in headers[0].unmatched_xfails if x in unmatched],
        precision_flags=dict(headers[0].precision_flags),
        argv=list(headers[0].argv),
    )
    return RunReport(header=header, cells=sorted_cells(cells), schema_version=reports[0].schema_version)


def _check_same_run(reports: list[RunReport]) -> None:
    first = reports[0]
    problems = []
    for name in _SAME:
        values = {repr(getattr(r.header, name)) for r in reports}
        if len(values) > 1:
            by_shard = ", ".join(f"{r.header.shard}: {getattr(r.header, name)!r}" for r in reports)
            problems.append(f"{name} differs ({by_shard})")
    versions = {r.schema_version for r in reports}
    if len(versions) > 1:
        problems.append(f"schema_version differs: {sorted(versions)}")
    if problems:
        raise ShardMergeError(f"shards of different runs (first {first.header.shard}): {'; '.join(problems)}")
