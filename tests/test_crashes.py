"""A target that kills its process, hangs, returns bad numbers or cannot be imported: each is named
plainly, and the run still ends in complete reports (issue 12)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from properties.catalogue import all_properties
from properties.diagnostics import form_problem, value_problem
from properties.precision import Expected
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.targets._library import import_or_raise
from tests import fixture_targets
from tests.test_cli import REPO, cli

CELLS = ["--properties", "reference_forward,unmerge_noop", "--layers", "linear", "--dtypes", "float32"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and fork: Linux")


def _run(target: str, jobs: str, report: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = cli(
        "run", "--target", f"tests.fixture_targets:{target}", *CELLS, "--max-examples", "4", "--jobs", jobs,
        "--report", str(report), *extra,
    )  # fmt: skip
    for name in ("report.json", "report.md", "report.html"):
        assert (report / name).stat().st_size > 0, f"{name} missing: {out.stdout}{out.stderr}"
    cells = {c["property"]: c for c in json.loads((report / "report.json").read_text())["cells"]}
    return out, cells


@linux_only
@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize(
    ("target", "broken", "fine", "words"),
    [
        (
            "SEGFAULT",
            "reference_forward",
            "unmerge_noop",
            ["crash:", "SIGSEGV", "example 2, in handle.forward"],
        ),
        ("EXIT", "unmerge_noop", "reference_forward", ["crash:", "exited with status 3", "in handle.merge"]),
    ],
)
def test_a_target_that_kills_its_process_is_an_error_cell_and_the_run_goes_on(
    tmp_path, jobs, target, broken, fine, words
):
    out, cells = _run(target, jobs, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert cells[fine]["status"] == "passed", cells[fine]["message"]
    bad = cells[broken]
    assert bad["status"] == "error"
    for word in words:
        assert word in bad["message"], bad["message"]
    assert bad["example"].startswith("kind=linear"), "the example that was running is named"
    assert "--properties " + broken in bad["replay"]
    assert f"ERROR: {broken} [linear, float32]" in out.stdout


@linux_only
@pytest.mark.parametrize("jobs", ["1", "2"])
@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("HANG", ["at ", "fixture_targets.py", "in forward"]),  # the alarm interrupts Python code
        ("NATIVE_HANG", ["ignored the alarm", "worker was killed"]),  # the parent kills the worker
    ],
)
def test_a_hang_ends_its_cell_at_the_first_hung_example(tmp_path, jobs, target, words):
    """The per-example limit (2 s here), not the cell's (the profile's 120 s), ends the cell: one
    example run, the target call named; the next cell runs in a working (fresh if need be) worker."""
    out, cells = _run(target, jobs, tmp_path, "--example-timeout", "2")
    assert out.returncode == 1, out.stdout + out.stderr
    hung = cells["reference_forward"]
    assert hung["status"] == "error"
    assert hung["examples"] == 1
    assert "hang: example 1, in handle.forward" in hung["message"], hung["message"]
    assert "ran past the 2 s example limit" in hung["message"]
    for word in words:
        assert word in hung["message"], hung["message"]
    assert hung["example"].startswith("kind=linear")
    assert cells["unmerge_noop"]["status"] == "passed", cells["unmerge_noop"]["message"]


@pytest.mark.parametrize(
    ("exitcode", "words"),
    [
        (-9, ["SIGKILL", "out of memory"]),  # what the OOM killer sends
        (-6, ["SIGABRT", "aborted"]),
        (-11, ["SIGSEGV", "segmentation fault"]),
        (137, ["exited with status 137"]),
    ],
)
def test_a_dead_workers_exit_is_put_in_words(exitcode, words):
    from properties.workers import death_cause

    for word in words:
        assert word in death_cause(exitcode)


def test_spawned_workers_isolate_too():
    """Where forking is unsafe (macOS, Windows, xdist workers, CUDA) workers are spawned: a dead one
    is reported and replaced the same way, and the replacement runs the next cell."""
    from properties.workers import WorkerPool

    opts = RunOptions(target="tests.fixture_targets:EXIT", profile=PROFILES["ci"], seed=0, max_examples=3)
    with WorkerPool(opts.target, 1, method="spawn") as pool:
        dead = pool.run_one(Cell("unmerge_noop", "linear", "float32"), opts)
        alive = pool.run_one(Cell("reference_forward", "linear", "float32"), opts)
    assert dead.status == "error"
    assert "exited with status 3" in dead.message and "in handle.merge" in dead.message
    assert alive.status == "passed", alive.message


def test_in_process_mode_names_the_hung_call_too(tmp_path):
    """``--jobs 0`` (debugging) runs cells in the run's own process: a Python-level hang is still
    found by the example alarm."""
    out = cli(
        "run", "--target", "tests.fixture_targets:HANG", "--properties", "reference_forward",
        "--layers", "linear", "--dtypes", "float32", "--max-examples", "4", "--jobs", "0",
        "--example-timeout", "2",
    )  # fmt: skip
    assert out.returncode == 1
    assert "hang: example 1, in handle.forward at " in out.stdout


def test_negative_jobs_is_a_usage_error():
    out = cli("run", "--target", "reference", "--jobs", "-1", *CELLS)
    assert out.returncode == 2
    assert "--jobs -1" in out.stderr


@linux_only
def test_pytest_plugin_isolates_a_segfaulting_target(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "pytest", "--pyargs", "properties", "-q", "-p", "no:cacheprovider",
        "--lora-target", "tests.fixture_targets:SEGFAULT", "--lora-layers", "linear", "--lora-dtypes",
        "float32", "--lora-properties", "reference_forward,unmerge_noop", "--lora-max-examples", "4",
        "--lora-report", str(tmp_path),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 failed, 1 passed" in out.stdout
    assert "SIGSEGV" in out.stdout
    cells = json.loads((tmp_path / "report.json").read_text())["cells"]
    assert sorted(c["status"] for c in cells) == ["error", "passed"]


# Bad numbers -------------------------------------------------------------------------------------


def _cell(target, prop: str = "reference_forward"):
    cell = Cell(prop, "linear", "float32")
    opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=5)
    return run_cell(target, all_properties()[prop], cell, opts)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("NAN", "unmerged output: NaN at index (0,) where the exact value is "),
        ("INF", "unmerged output: +Inf at index (0,) where the exact value is "),
        ("BAD_SHAPE", "unmerged output: wrong shape (0,), expected (1,)"),
        ("BAD_DTYPE", "unmerged output: wrong dtype float64, expected float32"),
        ("BAD_DEVICE", "unmerged output: wrong device meta, expected cpu"),
    ],
)
def test_bad_numbers_get_their_own_message(target, expected):
    result = _cell(getattr(fixture_targets, target))
    assert result.status == "failed"
    assert result.message.startswith(expected), result.message
    assert "exceeds the precision bound" not in result.message


def _expected(exact: torch.Tensor) -> Expected:
    return Expected(exact, torch.full_like(exact, 1e-6), exact.abs())


def test_value_problem_names_the_first_offending_index_and_the_count():
    exact = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    actual = exact.float().clone()
    actual[1, 2] = -float("inf")
    actual[2, 3] = -float("inf")
    message = value_problem(actual, _expected(exact), quantity="merged output")
    assert (
        message
        == "merged output: -Inf at index (1, 2) where the exact value is 6 (2 of 12 elements infinite)"
    )
    actual[0, 1] = float("nan")  # NaN is named first, whatever its position
    assert value_problem(actual, _expected(exact), quantity="y").startswith("y: NaN at index (0, 1)")


def test_value_problem_leaves_what_the_exact_answer_allows_to_the_bound():
    """Inf where the exact value itself overflows the dtype, or is not finite, is not called wrong here."""
    exact = torch.tensor([1e39, float("inf"), 1.0], dtype=torch.float64)
    actual = torch.tensor([float("inf"), float("inf"), 1.0])
    assert value_problem(actual, _expected(exact), quantity="y") is None


def test_form_problem_checks_dtype_and_device_but_not_for_the_suites_own_statistics():
    from properties.precision import Arithmetic
    from properties.spec import LayerSpec

    spec = LayerSpec("linear", torch.bfloat16, torch.zeros(3, 2, dtype=torch.bfloat16), ())
    exact = torch.zeros(2, 3, dtype=torch.float64)
    mean = torch.zeros(2, 3, dtype=torch.float64)  # a float64 mean the suite computed
    kw = {"spec": spec, "arith": Arithmetic.for_dtype(torch.bfloat16), "quantity": "q"}
    assert form_problem(mean, _expected(exact), statistical=True, **kw) is None
    assert (
        form_problem(mean, _expected(exact), **kw)
        == "q: wrong dtype float64, expected bfloat16 (the layer's dtype)"
    )
    assert form_problem((mean,), _expected(exact), **kw) == "q: the target returned tuple, expected a tensor"
    assert form_problem(mean.bfloat16(), _expected(exact), **kw) is None
    assert form_problem(mean.bfloat16().to("meta"), _expected(exact), **kw).startswith("q: wrong device meta")


# Bad installs ------------------------------------------------------------------------------------


def test_an_installed_package_that_fails_to_import_shows_its_own_error(tmp_path, monkeypatch):
    pkg = tmp_path / "lora_broken_lib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import lora_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError) as err:
        import_or_raise("lora_broken_lib", RuntimeError, "the target needs `lora_broken_lib`: pip install it")
    message = str(err.value)
    assert "`lora_broken_lib` is installed but `import lora_broken_lib` fails" in message
    assert "No module named 'lora_missing_dependency_xyz'" in message
    assert "its dependency `lora_missing_dependency_xyz` is missing" in message
    with pytest.raises(RuntimeError, match="pip install it"):
        import_or_raise("lora_not_installed_xyz", RuntimeError, "the target needs it: pip install it")


def test_peft_with_a_broken_dependency_is_not_reported_as_missing():
    pytest.importorskip("peft")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = (
        "import sys; sys.modules['yaml'] = None\n"  # a dependency of PEFT's stack, made unimportable
        "from properties.cli import main\n"
        "raise SystemExit(main(['run', '--target', 'peft', '--layers', 'linear', '--max-examples', '1']))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.returncode == 2
    assert "`peft` " in out.stderr and " is installed but `import peft` fails" in out.stderr, out.stderr
    assert "yaml" in out.stderr
    assert "needs the `peft` package" not in out.stderr


def test_a_flaky_error_after_the_cell_deadline_is_a_hang_not_a_failure():
    """Under load, the cell's CellTimeout can fire inside Hypothesis' own bookkeeping, which then reports
    "Inconsistent data generation" (Flaky): past the deadline that is the cell running out of time."""
    import time

    from hypothesis.errors import Flaky

    from properties.runner import CellTimeout, _out_of_time, _Watchdog

    expired = _Watchdog(0.05, 0)
    with pytest.raises(CellTimeout), expired:
        time.sleep(5)
    assert _out_of_time(Flaky("Inconsistent data generation!"), expired)
    assert not _out_of_time(ValueError("a real crash"), expired)  # only Flaky is reinterpreted
    in_time = _Watchdog(600, 0)
    with in_time:
        pass
    assert not _out_of_time(Flaky("Inconsistent data generation!"), in_time)  # a real flaky failure
