"""``scripts/benchmark.py``: its bookkeeping (labelled measurements kept in one file, mutant catch
records). No timing is asserted: only what was recorded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_store_keeps_every_label_and_the_old_list_format(bench_script, tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([{"target": "reference", "total_s": 1.0}]))  # the file's first format
    bench_script._store(
        str(path), "before", {"runs": [{"target": "reference"}], "mutants": [{"mutant": "m"}]}
    )
    bench_script._store(
        str(path), "before", {"runs": [{"target": "peft"}]}
    )  # a second invocation, same label
    bench_script._store(str(path), "after", {"runs": [{"target": "reference"}]})
    data = json.loads(path.read_text())
    assert list(data) == ["2026-11-28 (idle, one process + CLI --jobs 2)", "before", "after"]
    assert [r["target"] for r in data["before"]["runs"]] == ["reference", "peft"]
    assert data["before"]["mutants"] == [{"mutant": "m"}]
    assert data["2026-11-28 (idle, one process + CLI --jobs 2)"][0]["total_s"] == 1.0


def test_mutant_records_count_examples_to_the_first_failure(bench_script, monkeypatch):
    import mutants  # tests/ is on sys.path (rootdir conftest)

    chosen = {k: v for k, v in mutants.MUTANTS.items() if k in ("delta_scaled_1001", "merge_not_marked")}
    monkeypatch.setattr(mutants, "MUTANTS", chosen)
    rows = bench_script.mutant_catch_times(["layer"])
    assert [r["mutant"] for r in rows] == list(chosen)
    for r in rows:
        assert r["status"] == "failed"
        assert 1 <= r["examples_to_first_failure"] <= r["examples_total"]
        assert r["seconds_to_first_failure"] is not None


def test_report_write_cost_is_measured_from_the_runs_report_json(bench_script, tmp_path):
    from test_reporting import make_report  # tests/ is on sys.path (rootdir conftest)

    from properties.reporting import write_json

    assert bench_script._report_write_cpu(str(tmp_path)) is None  # a run that wrote no report
    write_json(make_report(), tmp_path / "report.json")
    before = sorted(p.name for p in tmp_path.iterdir())
    cpu = bench_script._report_write_cpu(str(tmp_path))
    assert cpu is not None and cpu >= 0.0
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # rewritten elsewhere, not over the run's
