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
        reports: Path, lib: str, shard: tuple[int, int], seed: int, jobs: int, extra: list[str], limits=()
    ) -> dict:
        return nightly.shard_record(report, lib, shard, seed, timed, extra, reports / "gone", limits)

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


def test_hang_limits_reach_the_cli_but_not_the_runs_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard run with longer hang limits (a loaded machine) completes the run recorded without them:
    the limits are passed to `lora-conformance run` and kept in the record, but a shard already
    recorded without them is not run again, and the shards form one library summary."""
    commands: list[list[str]] = []
    real_run_timed = nightly.run_timed

    def spy(cmd: list[str], **kw: object) -> nightly.Timed:
        commands.append(cmd)
        return real_run_timed(cmd, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(nightly, "run_timed", spy)
    assert _nightly(tmp_path, "--only", "1") == 0
    assert not any("--example-timeout" in " ".join(c) for c in commands)
    assert _nightly(tmp_path, "--example-timeout", "300", "--cell-timeout", "1800") == 0
    assert len(commands) == 2  # shard 1 was recorded: only shard 2 ran
    assert "--example-timeout=300" in commands[1] and "--cell-timeout=1800" in commands[1]
    data = json.loads((tmp_path / "n.json").read_text())
    limits = {r["shard"]: r["limits"] for r in data["runs"]}
    assert limits == {"1/2": [], "2/2": ["--cell-timeout=1800", "--example-timeout=300"]}
    (summary,) = data["summaries"]
    assert summary["shards_run"] == ["1/2", "2/2"]
    for r in data["runs"]:  # the 1-minute load average at the shard's start and end
        assert len(r["load_1min_start_end"]) == 2 and min(r["load_1min_start_end"]) >= 0
    low, high = summary["load_1min_range"]
    assert low <= high


def test_notes_kept_in_the_record_are_rendered(tmp_path: Path) -> None:
    """What the table cannot say (load, superseded shards) is kept by hand in the JSON's notes."""
    record = tmp_path / "n.json"
    record.write_text(json.dumps({"runs": [], "notes": ["loaded machine: load 4-6"]}))
    files = ["--json", str(record), "--md", str(tmp_path / "n.md"), "--reports", str(tmp_path / "r")]
    assert nightly.main(["--render-only", *files]) == 0
    md = (tmp_path / "n.md").read_text()
    assert "## Notes\n\n- loaded machine: load 4-6\n" in md
    assert json.loads(record.read_text())["notes"] == ["loaded machine: load 4-6"]


def test_an_older_peft_release_runs_in_its_env_as_the_peft_target(tmp_path: Path) -> None:
    """``peft-0.13.2`` is PEFT's target run by that release's env (a record of its own), and a name that
    is neither a library nor a release is refused before anything runs."""
    cmd = nightly.run_command("peft-0.13.2", (3, 8), 1, 2, tmp_path, ["--layers", "linear"])
    assert cmd[1:5] == [str(ROOT / "scripts" / "peft_envs.py"), "run", "0.13.2", "--"]
    assert cmd[cmd.index("--target") + 1] == "peft" and cmd[cmd.index("--shard") + 1] == "3/8"
    assert nightly.run_command("peft", (1, 8), 1, 2, tmp_path, [])[0] == sys.executable
    with pytest.raises(SystemExit):
        nightly.main(["--libs", "pefty", "--json", str(tmp_path / "n.json")])
    assert not (tmp_path / "n.json").exists()
