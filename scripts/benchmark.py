"""Where the suite's time goes: total time of a profile, examples/s per property, and the share of time
spent inside the target (its own arithmetic) versus the suite (generation, oracle, bounds, bookkeeping).

    python scripts/benchmark.py --target reference --profile ci [--half layer] [--jobs 2] \
        [--mutants layer,peft,model,quantized] [--json docs/benchmark-ci.json --label after]

Per target and per half (``layer``: the six layer kinds; ``model``: the ``model_*`` properties;
``quantized``: the quantized kinds in fp32/bf16/fp16), it records the in-process breakdown and, with
``--jobs``, the real CLI run (``--report`` into a temporary directory, as CI runs it): wall seconds and
CPU seconds of the whole process tree (the CLI and its workers). On a shared, loaded machine wall time
says little; CPU seconds are the comparable figure. ``--mutants`` records, per mutant of the project's
mutation self-checks, the time and examples to the first failing example and to the shrunk verdict.

The target is wrapped in a timing proxy, so every call a property makes into the implementation
(build, forward, merge, ...) is counted as the target's; everything else is the suite's overhead,
split into example generation, the float64 oracle with its bounds, and the rest (Hypothesis's engine,
isolation, bookkeeping).
Timings are measurements, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections import defaultdict
from typing import Any

from properties.catalogue import Property, all_properties
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.session import apply_xfail, plan_cells, with_xfails
from properties.spec import LAYER_KINDS, QUANT_KINDS
from properties.targets.registry import load_target
from properties.xfails import bundled_rules

HALVES: dict[str, dict[str, list[str] | None]] = {
    "layer": {"properties": None, "layers": list(LAYER_KINDS), "dtypes": None},
    "model": {"properties": ["model_*"], "layers": None, "dtypes": None},
    "quantized": {
        "properties": None,
        "layers": list(QUANT_KINDS),
        "dtypes": ["float32", "bfloat16", "float16"],
    },
    "all": {"properties": None, "layers": None, "dtypes": None},  # the default plan: layer + model cells
}


class _Clock:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.depth = 0

    def timed(self, fn):
        def call(*args: Any, **kwargs: Any):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.depth -= 1

        return call


class _TimedHandle:
    def __init__(self, inner: Any, clock: _Clock):
        self._inner, self._clock = inner, clock

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        return self._clock.timed(attr) if callable(attr) else attr


class TimedTarget:
    """A target proxy that charges every call into the implementation to ``clock``."""

    def __init__(self, inner: Any, clock: _Clock):
        self._inner, self._clock = inner, clock
        self.name = inner.name

    def version(self) -> str:
        return self._inner.version()

    def capabilities(self):
        return self._inner.capabilities()

    def build(self, spec):
        return _TimedHandle(self._clock.timed(self._inner.build)(spec), self._clock)

    @property
    def model_target(self) -> TimedTarget:
        """The model half (``properties.models``), timed the same way."""
        from properties.models.protocol import model_target_for

        return TimedTarget(model_target_for(self._inner), self._clock)

    def __getattr__(self, name: str):
        """A model target's other entry points (``build_base``, ``load_adapter``, ``load_merged``)."""
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any):
            out = self._clock.timed(attr)(*args, **kwargs)
            if isinstance(out, tuple):
                return tuple(_TimedHandle(o, self._clock) if hasattr(o, "outputs") else o for o in out)
            return _TimedHandle(out, self._clock) if hasattr(out, "outputs") else out

        return call


_ORACLE_MODULES = (
    "properties.oracle",
    "properties.precision",
    "properties.catalogue",
    "properties.checks.equivalence",
    "properties.checks.state",
    "properties.checks.scaling",
    "properties.checks.dropout",
    "properties.models.checks",
    "properties.models.oracle",
)
_ORACLE_FUNCTIONS = (
    "forward",
    "mixed_forward",
    "merged_weights",
    "delta_weights",
    "lora_delta",
    "forward_expected",
    "mixed_expected",
    "weights_expected",
    "roundtrip_expected",
    "delta_expected",
    "measure",
)


@contextlib.contextmanager
def _timed_suite_parts(oracle: _Clock, generation: _Clock):
    """Charge the float64 oracle + bounds and example generation to their own clocks.

    Generation is timed around the whole ``examples`` draw: Hypothesis's choices for the structure
    plus filling the tensors from the drawn seed.
    """
    import importlib

    from hypothesis import strategies as st

    import properties.runner as runner_module

    saved: list[tuple[object, str, object]] = []
    for mod_name in _ORACLE_MODULES:
        mod = importlib.import_module(mod_name)
        for fn in _ORACLE_FUNCTIONS:
            if callable(getattr(mod, fn, None)):
                saved.append((mod, fn, getattr(mod, fn)))
                setattr(mod, fn, oracle.timed(getattr(mod, fn)))
    real_examples = runner_module.examples

    def timed_examples(*args: Any, real=real_examples, **kwargs: Any):
        inner = real(*args, **kwargs)

        @st.composite
        def timed(draw):
            start = time.perf_counter()
            try:
                return draw(inner)
            finally:
                generation.seconds += time.perf_counter() - start

        return timed()

    saved.append((runner_module, "examples", real_examples))
    runner_module.examples = timed_examples
    own = [p for p in all_properties().values() if p.examples is not None]  # the model half's strategies
    for p in own:
        object.__setattr__(p, "examples", functools.partial(timed_examples, real=p.examples))
    try:
        yield
    finally:
        for p in own:
            object.__setattr__(p, "examples", p.examples.keywords["real"])
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def benchmark(
    target_name: str,
    profile: str,
    max_examples: int | None,
    properties: list[str] | None = None,
    layers: list[str] | None = None,
    dtypes: list[str] | None = None,
) -> dict[str, Any]:
    """One process, no workers: where the time goes (target calls, generation, oracle, the rest)."""
    clock, oracle_clock, generation_clock = _Clock(), _Clock(), _Clock()
    target = TimedTarget(load_target(target_name), clock)
    opts = RunOptions(target=target_name, profile=PROFILES[profile], seed=0, max_examples=max_examples)
    # The bundled expected failures, as the CLI gate applies them: known-bug examples are set aside
    # and listed cells are not shrunk, so the numbers are those of the gate a library would run.
    rules = bundled_rules(target.name, target.version()).rules
    opts = with_xfails(opts, rules)
    catalogue = all_properties()
    per_prop: dict[str, dict[str, float]] = defaultdict(
        lambda: {"seconds": 0.0, "examples": 0, "target": 0.0}
    )
    statuses: dict[str, int] = defaultdict(int)
    started, cpu_started = time.perf_counter(), time.process_time()
    with _timed_suite_parts(oracle_clock, generation_clock):
        for cell in plan_cells(properties, layers, dtypes):
            before = clock.seconds
            r = run_cell(target, catalogue[cell.property], cell, opts)
            statuses[apply_xfail(r, rules, set()).status] += 1
            p = per_prop[cell.property]
            p["seconds"] += r.duration_s
            p["examples"] += r.examples
            p["target"] += clock.seconds - before
    total = time.perf_counter() - started
    rest = total - clock.seconds - oracle_clock.seconds - generation_clock.seconds
    return {
        "target": target_name,
        "target_version": target.version(),
        "profile": profile,
        "cells": sum(statuses.values()),
        "statuses": dict(statuses),
        "total_s": total,
        "cpu_s": time.process_time() - cpu_started,
        "target_s": clock.seconds,
        "overhead_share": 1 - clock.seconds / total if total else 0.0,
        "overhead_s": {
            "generation": generation_clock.seconds,
            "oracle_and_bounds": oracle_clock.seconds,
            "engine_and_bookkeeping": rest,
        },
        "per_property": {
            k: {**v, "examples_per_s": v["examples"] / v["seconds"] if v["seconds"] else 0.0}
            for k, v in per_prop.items()
        },
    }


def cli_run(
    target_name: str,
    profile: str,
    jobs: int,
    properties: list[str] | None = None,
    layers: list[str] | None = None,
    dtypes: list[str] | None = None,
) -> dict[str, Any]:
    """The real CLI with ``--jobs`` and ``--report`` (what a CI job pays, bundled expected failures and
    the three reports included): wall seconds, CPU seconds of the process tree, exit status, last line.

    CPU seconds are those of the CLI process and every worker it started and reaped (``RUSAGE_CHILDREN``
    of this process around the call): on a machine shared with other jobs they stay comparable between
    runs, where wall seconds do not."""
    import resource
    import subprocess
    import tempfile

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    args = [sys.executable, "-m", "properties", "run", "--target", target_name, "--profile", profile]
    args += ["--jobs", str(jobs)]
    for flag, values in (("--properties", properties), ("--layers", layers), ("--dtypes", dtypes)):
        if values:
            args += [flag, ",".join(values)]
    with tempfile.TemporaryDirectory() as reports:
        cpu0, start = children_cpu(), time.perf_counter()
        out = subprocess.run([*args, "--report", reports], check=False, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - start, children_cpu() - cpu0
        report_cpu = _report_write_cpu(reports) if out.returncode in (0, 1) else None
    lines = [ln for ln in out.stdout.strip().splitlines() if not ln.startswith("reports:")]
    closing = next((ln for ln in reversed(lines) if " passed, " in ln), lines[-1] if lines else "")
    return {
        "jobs": jobs,
        "wall_s": wall,
        "cpu_s": cpu,
        "exit_status": out.returncode,
        "closing_line": closing or out.stderr.strip()[-200:],
        "report_write_cpu_s": report_cpu,
    }


def _report_write_cpu(reports: str) -> float | None:
    """CPU seconds to write the run's three reports again from its ``report.json`` (what the CLI pays
    once at the end of a run, serially, after every worker is done); matplotlib's import included
    when this process has not imported it yet."""
    import os
    import tempfile

    from properties.reporting import load_report, write_reports

    path = os.path.join(reports, "report.json")
    if not os.path.exists(path):
        return None
    report = load_report(path)
    with tempfile.TemporaryDirectory() as out:
        start = time.process_time()
        write_reports(report, out)
        return time.process_time() - start


_STARTUP_PROBE = """
import sys
from properties.cli import main  # noqa: F401  (what `python -m properties` imports)
from properties.targets.registry import load_target
target = load_target(sys.argv[1])
target.version()
target.capabilities()
"""


def fixed_costs(target_name: str, repeats: int = 3) -> dict[str, Any]:
    """The costs a run pays once, whatever its cells: the parent's start-up (a fresh interpreter
    importing the suite, loading the target and reading its capabilities, minus a bare interpreter's
    start) and starting two workers that each run one trivial cell, by fork and by spawn.

    CPU seconds of the child processes (``RUSAGE_CHILDREN``), the smallest of ``repeats`` runs; wall
    seconds alongside. A forked worker inherits the parent's imports and loaded target; a spawned one
    imports and loads them again."""
    import resource
    import subprocess

    from properties.runner import Cell, RunOptions
    from properties.targets.registry import load_target
    from properties.workers import WorkerPool

    def children_cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    def child_run(args: list[str]) -> tuple[float, float]:
        cpu0, start = children_cpu(), time.perf_counter()
        subprocess.run(args, check=True, capture_output=True)
        return children_cpu() - cpu0, time.perf_counter() - start

    bare = min(child_run([sys.executable, "-c", "pass"]) for _ in range(repeats))
    startup = min(child_run([sys.executable, "-c", _STARTUP_PROBE, target_name]) for _ in range(repeats))
    target = load_target(target_name)  # the parent's state when the CLI starts its workers
    target.version()
    target.capabilities()
    # A cell every target skips at once (the property has no embedding claim): start-up and load only.
    trivial = Cell("train_dropout_unbiased", "embedding", "float32")
    opts = RunOptions(target=target_name, profile=PROFILES["ci"], seed=0)
    workers: dict[str, dict[str, float]] = {}
    for method in ("fork", "spawn"):
        best: tuple[float, float] | None = None
        for _ in range(repeats):
            cpu0, start = children_cpu(), time.perf_counter()
            with WorkerPool(target_name, 2, method=method) as pool:
                pool.run([trivial, trivial], opts, lambda _r: None)
            sample = (children_cpu() - cpu0, time.perf_counter() - start)
            best = sample if best is None else min(best, sample)
        assert best is not None
        workers[method] = {"cpu_s": best[0], "wall_s": best[1]}
    return {
        "target": target_name,
        "startup_cpu_s": startup[0] - bare[0],
        "startup_wall_s": startup[1] - bare[1],
        "bare_interpreter_cpu_s": bare[0],
        "two_workers": workers,
    }


def _mutant_cells(groups: list[str]) -> list[tuple[str, str, Any, Cell, int | None]]:
    """(group, name, target, cell, max_examples) for every mutant of the project's self-checks, run
    exactly as their tests run them (``tests/test_*mutants.py``, ``tests/test_quantized.py``)."""
    import importlib.util
    import os

    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    out: list[tuple[str, str, Any, Cell, int | None]] = []
    if "layer" in groups:
        from mutants import MUTANTS

        out += [("layer", m.name, m.target(), m.cell, m.max_examples) for m in MUTANTS.values()]
    if "peft" in groups and importlib.util.find_spec("peft"):
        from peft_mutants import MUTANTS as PEFT_MUTANTS
        from peft_mutants import PeftMutantTarget

        out += [("peft", m.name, PeftMutantTarget(m), m.cell, m.max_examples) for m in PEFT_MUTANTS.values()]
    if "model" in groups and importlib.util.find_spec("transformers"):
        from model_mutants import MODEL_MUTANTS

        out += [("model", m.name, m.target(), m.cell, None) for m in MODEL_MUTANTS]
    if "quantized" in groups and importlib.util.find_spec("bitsandbytes"):
        from quant_mutants import QUANT_MUTANTS

        out += [
            ("quantized", m.name, m.target(), Cell(m.property, m.layer, m.dtype), m.max_examples or 12)
            for m in QUANT_MUTANTS.values()
        ]
    return out


def _first_failure_clock(prop: Property, seen: dict[str, Any]) -> Property:
    """``prop`` whose check notes the example count and time of the first example that fails (a
    property failure or a crash; rejections — unsupported, outside the claim — are not failures)."""
    from dataclasses import replace

    from hypothesis.errors import UnsatisfiedAssumption

    from properties.catalogue import OutOfRange
    from properties.targets.protocol import Unsupported

    def check(ctx: Any) -> None:
        seen["examples"] += 1
        try:
            prop.check(ctx)
        except (Unsupported, OutOfRange, UnsatisfiedAssumption):
            seen["examples"] -= 1
            raise
        except Exception:
            if seen["first_s"] is None:
                seen["first_s"] = time.perf_counter() - seen["start"]
                seen["first_examples"] = seen["examples"]
            raise

    return replace(prop, check=check)


def mutant_catch_times(groups: list[str]) -> list[dict[str, Any]]:
    """Per mutant: status (``failed`` = caught), examples and seconds to the first failing example, and
    to the end of the cell (shrinking included). A failure found only by the cell's pooled bias test
    has no failing example: its first failure is the end of the generate phase."""
    catalogue = all_properties()
    rows = []
    for group, name, target, cell, max_examples in _mutant_cells(groups):
        opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=max_examples)
        seen: dict[str, Any] = {"examples": 0, "first_s": None, "first_examples": None}
        seen["start"] = time.perf_counter()
        result = run_cell(target, _first_failure_clock(catalogue[cell.property], seen), cell, opts)
        rows.append(
            {
                "group": group,
                "mutant": name,
                "cell": str(cell),
                "status": result.status,
                "examples_to_first_failure": seen["first_examples"],
                "seconds_to_first_failure": seen["first_s"],
                "examples_total": seen["examples"],
                "seconds_total": result.duration_s,
            }
        )
        first = (
            "-" if seen["first_s"] is None else f"{seen['first_s']:.2f}s after {seen['first_examples']} ex"
        )
        print(f"{group:10} {name:34} {result.status:8} first failure {first}; cell {result.duration_s:.2f}s")
    return rows


def _store(path: str, label: str, entry: dict[str, Any]) -> None:
    """Keep every labelled measurement in one file (``before``/``after``, dates): older labels stay."""
    import os

    data: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        data = old if isinstance(old, dict) else {"2026-11-28 (idle, one process + CLI --jobs 2)": old}
    previous = data.get(label, {})
    data[label] = {**previous, **entry, "runs": [*previous.get("runs", []), *entry.get("runs", [])]}
    if "mutants" in previous and "mutants" not in entry:
        data[label]["mutants"] = previous["mutants"]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _machine() -> dict[str, Any]:
    import os
    import platform
    import subprocess
    from datetime import datetime, timezone

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit.strip(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", help="repeatable; default: reference")
    ap.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    ap.add_argument("--max-examples", type=int)
    ap.add_argument("--jobs", type=int, default=0, help="also time the CLI with this many jobs")
    ap.add_argument("--json", help="write the numbers here (under --label; other labels are kept)")
    ap.add_argument(
        "--label", default="latest", help="key of this measurement in --json (e.g. before, after)"
    )
    ap.add_argument("--half", action="append", choices=sorted(HALVES), help="repeatable; default: all")
    ap.add_argument("--cli-only", action="store_true", help="skip the in-process breakdown")
    ap.add_argument(
        "--fixed-costs",
        action="store_true",
        help="also measure start-up, worker start (fork vs spawn) per target",
    )
    ap.add_argument(
        "--mutants",
        type=lambda t: [g for g in t.split(",") if g],
        default=[],
        help="layer,peft,model,quantized",
    )
    ap.add_argument(
        "--properties", type=lambda t: [p for p in t.split(",") if p], help="ids or globs ('model_*')"
    )
    args = ap.parse_args(argv)
    runs: list[dict[str, Any]] = []
    fixed: list[dict[str, Any]] = []
    for name in args.target or ["reference"]:
        for half in args.half or ["all"]:
            scope = dict(HALVES[half])
            if args.properties:
                scope["properties"] = args.properties
            res: dict[str, Any] = {"target": name, "half": half, "profile": args.profile}
            if not args.cli_only:
                res.update(benchmark(name, args.profile, args.max_examples, **scope))
            if args.jobs:
                res["cli"] = cli_run(name, args.profile, args.jobs, **scope)
            runs.append(res)
            _print_run(res)
        if args.fixed_costs:
            fixed.append(fixed_costs(name))
            _print_fixed(fixed[-1])
    entry: dict[str, Any] = {"machine": _machine(), "runs": runs}
    if fixed:
        entry["fixed_costs"] = fixed
    if args.mutants:
        entry["mutants"] = mutant_catch_times(args.mutants)
    if args.json:
        _store(args.json, args.label, entry)
    return 0


def _print_fixed(f: dict[str, Any]) -> None:
    w = f["two_workers"]
    fork, spawn = w["fork"], w["spawn"]
    print(
        f"\n{f['target']} fixed costs: start-up {f['startup_cpu_s']:.2f} CPU-s "
        f"({f['startup_wall_s']:.2f}s wall) beyond a bare interpreter; two workers by fork "
        f"{fork['cpu_s']:.2f} CPU-s ({fork['wall_s']:.2f}s), by spawn {spawn['cpu_s']:.2f} CPU-s "
        f"({spawn['wall_s']:.2f}s)"
    )


def _print_run(res: dict[str, Any]) -> None:
    head = f"\n{res['target']} half={res['half']} profile={res['profile']}"
    if "cli" in res:
        c = res["cli"]
        print(
            f"{head}: CLI --jobs {c['jobs']}: {c['wall_s']:.1f}s wall, {c['cpu_s']:.1f} CPU-s "
            f"(process tree), exit {c['exit_status']}: {c['closing_line']}"
        )
        if c.get("report_write_cpu_s") is not None:
            print(f"writing the three reports again from report.json: {c['report_write_cpu_s']:.2f} CPU-s")
    if "total_s" not in res:
        return
    print(
        f"{head}: {res['cells']} cells {res['statuses']}, {res['total_s']:.1f}s on one process "
        f"({res['cpu_s']:.1f} CPU-s); target {res['target_s']:.1f}s, suite {100 * res['overhead_share']:.0f}%"
    )
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in res["overhead_s"].items())
    print(f"suite overhead by part: {parts}")
    print(f"{'property':<26}{'examples':>9}{'seconds':>9}{'ex/s':>8}{'target%':>9}")
    for prop, v in res["per_property"].items():
        share = 100 * v["target"] / v["seconds"] if v["seconds"] else 0
        print(f"{prop:<26}{v['examples']:>9.0f}{v['seconds']:>9.2f}{v['examples_per_s']:>8.0f}{share:>8.0f}%")


if __name__ == "__main__":
    raise SystemExit(main())
