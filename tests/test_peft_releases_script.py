"""scripts/peft_releases.py: the gate table credits xfailed cells and set-aside examples to the lines that
caused them, split into lines verified on the release and lines applied by range."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the script imports its sibling helpers (_venv, peft_envs)
import peft_releases  # noqa: E402

OWN = "line 3: [peft>=0.7] merge_subset * * when adapters > 1 (from peft-0.7.1.txt)"
RANGED_WHEN = "line 9: [peft>=0.9] reference_forward linear * when dora and unbatched (from peft-0.13.2.txt)"
OWN_CELL = "line 5: [peft>=0.7,<0.8] merge_idempotent linear * (from peft-0.7.1.txt)"
RANGED_CELL = "line 20: [peft>=0.7] scaling_law embedding * (from peft-0.13.2.txt)"


def _cell(prop: str, layer: str, status: str, known: dict[str, int] | None = None) -> dict:
    return {
        "property": prop,
        "layer": layer,
        "dtype": "float32",
        "status": status,
        "known_bug_examples": known or {},
    }


def _report() -> dict:
    return {
        "header": {
            "xfails_applied": [OWN, RANGED_WHEN, OWN_CELL, RANGED_CELL],
            "xfails_by_range": [RANGED_WHEN, RANGED_CELL],
            "unmatched_xfails": [],
        },
        "counts": {"passed": 2, "failed": 1, "xfailed": 2, "skipped": 0, "error": 0},
        "cells": [
            _cell("merge_subset", "linear", "passed", {OWN: 4}),
            _cell("reference_forward", "linear", "passed", {RANGED_WHEN: 3, OWN: 1}),
            _cell("merge_idempotent", "linear", "xfailed"),
            _cell("scaling_law", "embedding", "xfailed"),
            _cell("merge_order", "conv2d", "failed"),
        ],
    }


def test_whole_cell_lines_are_read_back_from_the_header():
    assert peft_releases._applied_rule(OWN_CELL) == ("merge_idempotent", "linear", "*")
    assert peft_releases._applied_rule("line 2: merge_order conv* *16 (from x.txt)") == (
        "merge_order",
        "conv*",
        "*16",
    )
    assert peft_releases._applied_rule(OWN) is None  # a `when` line never covers a whole cell


def test_xfails_are_split_into_verified_and_by_range():
    assert peft_releases.xfail_split(_report()) == (1, 1, 5, 3)


def test_a_cell_xfailed_by_when_lines_alone_is_credited_to_those_lines():
    # Every example of the cell matched a `when` line: no whole-cell line covers it (0.20.0's
    # safe_merge_atomic cells, all by range, were once counted as verified).
    report = _report()
    report["cells"] = [
        _cell("reference_forward", "linear", "xfailed", {RANGED_WHEN: 12}),
        _cell("merge_subset", "conv2d", "xfailed", {OWN: 2, RANGED_WHEN: 10}),
    ]
    assert peft_releases.xfail_split(report) == (1, 1, 2, 22)


def test_table_row_shows_the_split_and_the_failing_properties(tmp_path):
    d = tmp_path / "0.7.1"
    d.mkdir()
    (d / "report.json").write_text(json.dumps(_report()))
    (d / "wall.json").write_text(json.dumps({"version": "0.7.1", "exit": 1, "wall_s": 12.3}))
    row = peft_releases.table(tmp_path).splitlines()[-1]
    assert row.startswith(
        "| 0.7.1 | 1 | 2 | 1 | 2 (1 + 1) | 8 (5 + 3) | 0 | 0 | 4 (2) | 0 | merge_order (1) | 12 s |"
    )


def test_table_row_says_the_load_and_the_arguments_of_the_run(tmp_path):
    d = tmp_path / "0.10.0"
    d.mkdir()
    (d / "report.json").write_text(json.dumps(_report()))
    wall = {"version": "0.10.0", "exit": 0, "wall_s": 625.4, "load_min": 9.2, "load_max": 14.6}
    (d / "wall.json").write_text(json.dumps(wall | {"extra": ["--properties", "model_*"]}))
    row = peft_releases.table(tmp_path).splitlines()[-1]
    assert row.endswith("| 625 s (load 9–15) | `--properties model_*` |")
    (d / "wall.json").write_text(json.dumps({"version": "0.10.0", "exit": 0, "wall_s": 625.4}))
    assert peft_releases.table(tmp_path).splitlines()[-1].endswith("| 625 s | ? |")  # older records


def test_a_gate_stopped_early_says_how_many_cells_it_finished(tmp_path):
    d = tmp_path / "0.14.0"
    d.mkdir()
    report = _report()
    report["header"]["interrupted"] = True
    (d / "report.json").write_text(json.dumps(report))
    (d / "wall.json").write_text(json.dumps({"version": "0.14.0", "exit": 130, "wall_s": 3000.0}))
    assert (
        peft_releases.table(tmp_path)
        .splitlines()[-1]
        .startswith("| 0.14.0 | 130, stopped after 5 cells | 2 |")
    )


def test_the_gate_runs_the_release_env_interpreter_by_its_path_not_a_script_on_path(tmp_path):
    # An env's `lora-conformance` script names, in its #!, the interpreter of the checkout that created
    # the env; once that is gone, execvp falls through to the global script and PEFT 0.21.2 runs instead.
    cmd = peft_releases.gate_command("0.7.1", tmp_path, 2, 10, ["--layers", "linear"])
    python = peft_releases.peft_envs.env_dir("0.7.1") / "bin" / "python"
    assert cmd[:4] == ["nice", "-n", "10", str(python)]
    assert Path(cmd[3]).is_absolute()
    assert cmd[4:7] == ["-m", "properties", "run"]
    assert "lora-conformance" not in cmd
    assert cmd[cmd.index("--report") + 1] == str(tmp_path)
    assert cmd[-2:] == ["--layers", "linear"]


def test_a_report_of_another_release_is_refused_and_not_counted(tmp_path):
    d = tmp_path / "0.7.1"
    d.mkdir()
    report = _report()
    report["header"]["target_version"] = "0.21.2"
    (d / "report.json").write_text(json.dumps(report))
    assert peft_releases.release_mismatch("0.7.1", d) == "the report is of peft 0.21.2, not 0.7.1"
    report["header"]["target_version"] = "0.7.1"
    (d / "report.json").write_text(json.dumps(report))
    assert peft_releases.release_mismatch("0.7.1", d) is None
    wrong = {
        "version": "0.7.1",
        "exit": 0,
        "wall_s": 290.0,
        "wrong_release": "the report is of peft 0.21.2, not 0.7.1",
    }
    (d / "wall.json").write_text(json.dumps(wrong))
    row = peft_releases.table(tmp_path).splitlines()[-1]
    assert row.startswith("| 0.7.1 | the report is of peft 0.21.2, not 0.7.1: not counted |")
    assert "388" not in row and "| 2 |" not in row  # none of the report's counts


def test_a_gate_that_ran_another_release_exits_2_and_records_why(tmp_path, monkeypatch):
    class RanTheGlobalPeft:  # what the fall-through to the global `lora-conformance` did
        def __init__(self, cmd, **_):
            report_dir = Path(cmd[cmd.index("--report") + 1])
            report = _report()
            report["header"]["target_version"] = "0.21.2"
            (report_dir / "report.json").write_text(json.dumps(report))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(peft_releases.subprocess, "Popen", RanTheGlobalPeft)
    assert peft_releases.gate(["0.7.1"], tmp_path, 2, 10, []) == 2
    wall = json.loads((tmp_path / "0.7.1" / "wall.json").read_text())
    assert wall["exit"] == 0 and wall["wrong_release"] == "the report is of peft 0.21.2, not 0.7.1"
