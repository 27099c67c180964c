"""Where the suite's time goes: total time of a profile, examples/s per property, and the share of time
spent inside the target (its own arithmetic) versus the suite (generation, oracle, bounds, bookkeeping).

    python scripts/benchmark.py --target reference --profile ci [--jobs 2] [--json out.json]

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

from properties.catalogue import all_properties
from properties.profiles import PROFILES
from properties.runner import RunOptions, run_cell
from properties.session import apply_xfail, plan_cells, with_xfails
from properties.targets.registry import load_target
from properties.xfails import bundled_rules


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
    target_name: str, profile: str, max_examples: int | None, properties: list[str] | None = None
) -> dict[str, Any]:
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
    started = time.perf_counter()
    with _timed_suite_parts(oracle_clock, generation_clock):
        for cell in plan_cells(properties):
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
        "target_s": clock.seconds,
        "overhead_share": 1 - clock.seconds / total,
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


def parallel_wall_time(
    target_name: str, profile: str, jobs: int, properties: list[str] | None = None
) -> tuple[float, int, str]:
    """Wall time, exit status and closing line of the real CLI with ``--jobs`` (what a CI job pays,
    bundled expected failures included)."""
    import subprocess

    start = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "properties",
            "run",
            "--target",
            target_name,
            "--profile",
            profile,
            "--jobs",
            str(jobs),
            *(["--properties", ",".join(properties)] if properties else []),
        ],
        check=False,
        capture_output=True,
        text=True,
    )
    closing = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip()[-200:]
    return time.perf_counter() - start, out.returncode, closing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", help="repeatable; default: reference")
    ap.add_argument("--profile", default="ci", choices=sorted(PROFILES))
    ap.add_argument("--max-examples", type=int)
    ap.add_argument("--jobs", type=int, default=0, help="also time the CLI with this many jobs")
    ap.add_argument("--json", help="write the numbers here")
    ap.add_argument(
        "--properties", type=lambda t: [p for p in t.split(",") if p], help="ids or globs ('model_*')"
    )
    args = ap.parse_args(argv)
    results = []
    for name in args.target or ["reference"]:
        res = benchmark(name, args.profile, args.max_examples, args.properties)
        if args.jobs:
            wall, status, closing = parallel_wall_time(name, args.profile, args.jobs, args.properties)
            res[f"cli_wall_s_jobs{args.jobs}"], res["cli_exit_status"], res["cli_closing_line"] = (
                wall,
                status,
                closing,
            )
        results.append(res)
        print(
            f"\n{name} {res['target_version']} profile={args.profile}: "
            f"{res['cells']} cells {res['statuses']}, "
            f"{res['total_s']:.1f}s on one process; target arithmetic {res['target_s']:.1f}s, "
            f"suite overhead {100 * res['overhead_share']:.0f}%"
            + (
                f"; CLI with --jobs {args.jobs}: {res[f'cli_wall_s_jobs{args.jobs}']:.1f}s"
                if args.jobs
                else ""
            )
        )
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in res["overhead_s"].items())
        print(f"suite overhead by part: {parts}")
        if args.jobs:
            print(f"CLI exit status {res['cli_exit_status']}: {res['cli_closing_line']}")
        print(f"{'property':<24}{'examples':>9}{'seconds':>9}{'ex/s':>8}{'target%':>9}")
        for prop, v in res["per_property"].items():
            share = 100 * v["target"] / v["seconds"] if v["seconds"] else 0
            print(
                f"{prop:<24}{v['examples']:>9.0f}{v['seconds']:>9.2f}{v['examples_per_s']:>8.0f}{share:>8.0f}%"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
