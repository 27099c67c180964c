"""The command line as a user meets it: exit codes, reports, replay, xfails, interrupts, shards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from properties.session import plan_cells

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-examples", "4", "--dtypes", "float32", "--layers", "linear"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "properties", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def test_properties_lists_every_property_id():
    from properties.catalogue import all_properties

    out = cli("properties")
    assert out.returncode == 0
    for pid in all_properties():
        assert pid in out.stdout


def test_unknown_target_is_a_usage_error_in_one_line():
    out = cli("run", "--target", "no_such_module:TARGET", *FAST)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "cannot import 'no_such_module'" in out.stderr


def test_unknown_layer_is_a_usage_error():
    out = cli("run", "--target", "reference", "--layers", "lstm")
    assert out.returncode == 2
    assert "unknown layer lstm" in out.stderr


def test_passing_run_writes_a_complete_report(tmp_path):
    out = cli(
        "run",
        "--target",
        "reference",
        "--properties",
        "merge_equivalence,reference_delta",
        *FAST,
        "--report",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert [c["status"] for c in report["cells"]] == ["passed", "passed"]
    assert report["header"]["target"] == "reference" and report["header"]["seed"] == 0
    assert all(0 <= c["max_ratio"] <= 1 for c in report["cells"])
    assert (tmp_path / "report.md").stat().st_size > 0 and (tmp_path / "report.html").stat().st_size > 0


def test_failure_prints_shrunk_example_and_a_replay_that_reproduces_it():
    out = cli("run", "--target", "tests.fixture_targets:SCALED", "--properties", "merge_equivalence", *FAST)
    assert out.returncode == 1
    assert "FAIL: merge_equivalence [linear, float32]" in out.stdout
    assert "shrunk example:" in out.stdout and "kind=linear" in out.stdout
    replay = next(line.split("replay: ", 1)[1] for line in out.stdout.splitlines() if "replay: " in line)
    args = replay.split()[1:]  # drop the console-script name, run through python -m
    again = cli(*args)
    assert again.returncode == 1
    first_msg = out.stdout.split("FAIL: ")[1].splitlines()[1]
    assert first_msg in again.stdout


def test_crashing_target_is_an_error_with_its_frame_not_a_traceback_wall():
    out = cli("run", "--target", "tests.fixture_targets:CRASH", "--properties", "reference_forward", *FAST)
    assert out.returncode == 1
    assert "ERROR: reference_forward" in out.stdout
    assert "RuntimeError: boom from deep inside the library at " in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_hanging_target_is_reported_as_a_hang():
    out = cli(
        "run",
        "--target",
        "tests.fixture_targets:HANG",
        "--properties",
        "reference_forward",
        *FAST,
        "--cell-timeout",
        "2",
    )
    assert out.returncode == 1
    assert "hang: the cell ran past 2 s" in out.stdout


def test_missing_capability_is_skipped_with_the_reason():
    out = cli("run", "--target", "examples.my_target:TARGET", "--properties", "mixed_batch", *FAST)
    assert out.returncode == 0
    assert "skipped: tiny-lora lacks mixed_batch (not implemented)" in out.stdout


def test_xfails_turn_a_known_failure_into_xfailed_and_report_unmatched_lines(tmp_path):
    xf = tmp_path / "xfails.txt"
    xf.write_text(
        "merge_equivalence linear float32  # merges 1% too much\nmerge_roundtrip conv9d *  # stale\n"
    )
    out = cli(
        "run",
        "--target",
        "tests.fixture_targets:SCALED",
        "--properties",
        "merge_equivalence",
        *FAST,
        "--xfails",
        str(xf),
    )
    assert out.returncode == 0, out.stdout
    assert "xfail" in out.stdout
    assert "matched no cell: line 2: merge_roundtrip conv9d *" in out.stdout


def test_when_lines_gate_on_new_failures_only_and_replays_keep_them(tmp_path):
    xf = tmp_path / "known.txt"
    xf.write_text(
        "merge_equivalence linear * when rslora  # rsLoRA merges 1% too much\n"
        "merge_equivalence linear * when rank > 1000  # stale\n"
    )
    args = [
        "--properties",
        "merge_equivalence",
        "--max-examples",
        "20",
        "--dtypes",
        "float32",
        "--layers",
        "linear",
    ]
    known = cli("run", "--target", "tests.fixture_targets:RSLORA_MERGE", *args, "--xfails", str(xf))
    assert known.returncode == 0, known.stdout
    assert "matched no example of this run" in known.stdout
    assert "line 2: merge_equivalence linear * when rank > 1000" in known.stdout
    new_bug = cli("run", "--target", "tests.fixture_targets:SCALED", *args, "--xfails", str(xf))
    assert new_bug.returncode == 1, new_bug.stdout
    replay = next(line for line in new_bug.stdout.splitlines() if "lora-conformance run" in line)
    assert f"--xfails {xf}" in replay  # the replay sets the same examples aside, so it draws the same


def _slow_run_with_report(tmp_path: Path, *extra: str) -> subprocess.Popen:
    """A run of a slow target writing reports to tmp_path; returns once its journal holds a cell."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "properties",
            "run",
            "--target",
            "tests.fixture_targets:SLOW",
            "--max-examples",
            "3",
            "--layers",
            "linear",
            "--report",
            str(tmp_path),
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A terminal's Ctrl-C: Python keeps an inherited SIG_IGN for SIGINT (a shell's background job
        # has one), and then the run rightly ignores it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    journal = tmp_path / "cells.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (journal.exists() and len(journal.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    return proc


def test_interrupted_run_keeps_finished_cells_in_a_valid_report(tmp_path):
    proc = _slow_run_with_report(tmp_path)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["header"]["interrupted"] is True
    assert 1 <= len(data["cells"]) < len(plan_cells(layers=["linear"]))
    assert "INTERRUPTED" in out
    assert not list(tmp_path.glob("*.tmp*")), "a temporary file was left behind"
    assert not (tmp_path / "cells.jsonl").exists(), "the journal outlived a report that was written"


def test_killed_run_leaves_a_journal_that_rebuilds_the_report(tmp_path):
    proc = _slow_run_with_report(tmp_path)
    proc.kill()  # SIGKILL: no handler runs, no final report is written
    proc.communicate(timeout=60)
    journal = tmp_path / "cells.jsonl"
    finished = len(journal.read_text().splitlines()) - 1
    assert finished >= 1
    with journal.open("a") as f:
        f.write('{"property": "torn')  # a line cut short by the kill is ignored
    out = cli("report", str(journal), "--out", str(tmp_path / "rebuilt"))
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads((tmp_path / "rebuilt" / "report.json").read_text())
    assert len(data["cells"]) == finished
    assert data["header"]["interrupted"] is True
    assert (tmp_path / "rebuilt" / "report.html").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_of_a_killed_parallel_run_exit_too(tmp_path):
    proc = _slow_run_with_report(
        tmp_path, "--jobs", "2", "--properties", "merge_equivalence,reference_forward"
    )
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
    workers = [int(p) for p in children.stdout.split()]
    assert workers, "the run started no worker processes"
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 30
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
    assert not alive, f"worker processes {alive} outlived the killed run"


def _state(pid: int) -> str:
    try:
        return "zombie" if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z" else "alive"
    except OSError:
        return "zombie"


def test_shards_partition_the_cells_deterministically():
    full = plan_cells()
    shards = [plan_cells(shard=(i, 3)) for i in (1, 2, 3)]
    assert sorted(map(str, full)) == sorted(str(c) for s in shards for c in s)
    assert all(shards) and plan_cells(shard=(2, 3)) == shards[1]


def test_sharded_runs_merge_into_the_full_report(tmp_path):
    sel = [
        "--target",
        "reference",
        "--properties",
        "reference_forward,unmerge_noop",
        "--max-examples",
        "3",
        "--layers",
        "linear,embedding",
    ]
    for i in (1, 2):
        assert cli("run", *sel, "--shard", f"{i}/2", "--report", str(tmp_path / f"s{i}")).returncode == 0
    out = cli(
        "merge",
        str(tmp_path / "s1" / "report.json"),
        str(tmp_path / "s2" / "report.json"),
        "--out",
        str(tmp_path / "all"),
    )
    assert out.returncode == 0, out.stderr
    cells = json.loads((tmp_path / "all" / "report.json").read_text())["cells"]
    assert len(cells) == 2 * 2 * 4


def test_compare_fails_on_a_degraded_run_and_passes_on_a_rerun(tmp_path):
    sel = ["--properties", "merge_equivalence", *FAST]
    for name, target in (
        ("base", "reference"),
        ("again", "reference"),
        ("bad", "tests.fixture_targets:SCALED"),
    ):
        cli("run", "--target", target, *sel, "--report", str(tmp_path / name))
    same = cli("compare", str(tmp_path / "base/report.json"), str(tmp_path / "again/report.json"))
    assert same.returncode == 0, same.stdout
    worse = cli("compare", str(tmp_path / "base/report.json"), str(tmp_path / "bad/report.json"))
    assert worse.returncode == 1
    assert "merge_equivalence" in worse.stdout


def test_cuda_device_without_cuda_is_a_clear_usage_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = cli("run", "--target", "reference", "--device", "cuda", *FAST)
    assert out.returncode == 2
    assert "CUDA is not available" in out.stderr


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_reference_passes_on_cuda(tmp_path):
    out = cli(
        "run",
        "--target",
        "reference",
        "--device",
        "cuda",
        "--properties",
        "reference_forward,merge_equivalence",
        "--max-examples",
        "6",
        "--report",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stdout
    header = json.loads((tmp_path / "report.json").read_text())["header"]
    assert "cuda_matmul_allow_tf32" in header["precision_flags"]


def test_pytest_plugin_runs_cells_as_items_and_writes_the_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "properties",
        "-q",
        "-p",
        "no:cacheprovider",
        "--lora-target",
        "tests.fixture_targets:SCALED",
        "--lora-layers",
        "linear",
        "--lora-dtypes",
        "float32",
        "--lora-properties",
        "reference_forward,merge_equivalence",
        "--lora-max-examples",
        "4",
        "--lora-report",
        str(tmp_path),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 1, out.stdout
    assert "1 failed, 1 passed" in out.stdout
    assert "replay: lora-conformance run --target tests.fixture_targets:SCALED" in out.stdout
    cells = json.loads((tmp_path / "report.json").read_text())["cells"]
    assert sorted(c["status"] for c in cells) == ["failed", "passed"]
