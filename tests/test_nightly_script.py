"""``scripts/nightly.py``: shards run, merged and summed; a recorded shard is not run again.

Runs the built-in reference (this interpreter, no library environment) over a two-cell matrix split in
two shards with two examples a cell, so it costs two short CLI runs and two merges.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import nightly  # noqa: E402

MATRIX = [
    "--properties",
    "unmerge_noop",
    "--layers",
    "linear",
    "--dtypes",
    "float64,float32",
    "--max-examples",
    "2",
]


def _nightly(tmp: Path, *args: str) -> int:
    files = ["--json", str(tmp / "n.json"), "--md", str(tmp / "n.md"), "--reports", str(tmp / "r")]
    return nightly.main(["--libs", "reference", "--shards", "2", *files, *args, "--", *MATRIX])


def test_shards_are_merged_summed_and_not_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = nightly.planned_cells(2, MATRIX)
    assert sum(plan.values()) == 2  # one property x one layer x two dtypes, however the hash splits them

    assert _nightly(tmp_path, "--only", "1") == 0
    data = json.loads((tmp_path / "n.json").read_text())
    (summary,) = data["summaries"]
    assert summary["shards_run"] == ["1/2"] and summary["cells_planned"] == 2
    assert summary["unmatched_xfails"] is None  # not judged until every shard ran
    assert summary["cells_run"] == plan["1/2"]

    assert _nightly(tmp_path) == 0  # runs shard 2 only
    data = json.loads((tmp_path / "n.json").read_text())
    assert sorted(r["shard"] for r in data["runs"]) == ["1/2", "2/2"]
    (summary,) = data["summaries"]
    assert summary["shards_run"] == ["1/2", "2/2"] and summary["cells_run"] == 2
    assert summary["counts"]["passed"] == 2 and summary["failures"] == []
    assert summary["unmatched_xfails"] == []
    merged = Path(summary["merged_report"])
    assert json.loads(merged.read_text())["counts"]["passed"] == 2
    assert (merged.parent / "report.html").exists()
    assert summary["estimated_full_cpu_s"] == pytest.approx(summary["cpu_s"], abs=1)  # every cell ran
    md = (tmp_path / "n.md").read_text()
    assert "| reference (" in md and "| 2 of 2 |" in md

    def must_not_run(*a: object, **k: object) -> dict:
        raise AssertionError("a recorded shard was run again")

    monkeypatch.setattr(nightly, "run_shard", must_not_run)
    assert _nightly(tmp_path) == 0


def test_a_failed_cell_is_listed_and_fails_the_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exit status and the page carry a failure with its replay line; no report on disk is needed."""
    report = {
        "header": {"target_version": "9.9", "unmatched_xfails": []},
        "counts": {"passed": 0, "failed": 1},
        "cells": [
            {
                "property": "unmerge_noop",
                "layer": "linear",
                "dtype": "float64",
                "status": "failed",
                "examples": 3,
                "max_ratio": "Infinity",
                "message": "planted\nsecond line",
                "replay": "REPLAY",
            }
        ],
    }
    timed = nightly.Timed(1, "", "", wall_s=60.0, cpu_s=100.0)

    def fake_shard(
        reports: Path, lib: str, shard: tuple[int, int], seed: int, jobs: int, extra: list[str]
    ) -> dict:
        return nightly.shard_record(report, lib, shard, seed, timed, extra, reports / "gone")

    monkeypatch.setattr(nightly, "run_shard", fake_shard)
    assert _nightly(tmp_path, "--only", "1") == 1
    (summary,) = json.loads((tmp_path / "n.json").read_text())["summaries"]
    assert summary["merged_report"] is None and summary["counts"] == {"passed": 0, "failed": 1}
    assert summary["worst_ratio"] is None  # of passed cells only: a failed or xfailed ratio measures a bug
    # Cost scales with the cells: one shard of one cell cost 100 CPU-s, the whole plan has 2 cells.
    assert summary["estimated_full_cpu_s"] == 200 and summary["estimated_full_wall_s_jobs2_idle"] == 100
    md = (tmp_path / "n.md").read_text()
    assert "## Failed and error cells: 1" in md and "planted" in md and "`REPLAY`" in md
    assert "second line" not in md
