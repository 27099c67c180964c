"""The catalogue catches real bugs injected into real PEFT, and passes the clean release on the same cells.

Each mutant in ``tests/peft_mutants.py`` breaks one PEFT method on one handle's layer instance; its cell
(``ci`` profile) must end ``failed`` - not ``error`` - with a shrunk example, and clean PEFT (same reduced
capabilities) must pass that cell. The time to catch is printed. Skipped without peft.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("peft")

from peft_mutants import MUTANTS, PeftMutant, PeftMutantTarget, peft_class_state  # noqa: E402

from properties.catalogue import all_properties  # noqa: E402
from properties.profiles import PROFILES  # noqa: E402
from properties.results import CellResult  # noqa: E402
from properties.runner import Cell, RunOptions, run_cell  # noqa: E402

PROPS = all_properties()
CLEAN = PeftMutantTarget()
CATCHES: list[tuple[str, str, str, int, float]] = []

KNOWN_SURVIVORS: dict[str, str] = {}


def _run(target: PeftMutantTarget, cell: Cell, max_examples: int | None = None) -> CellResult:
    opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=max_examples)
    return run_cell(target, PROPS[cell.property], cell, opts)


def test_at_least_eight_mutants_on_distinct_properties() -> None:
    """Enough variants, each aimed at a property that exists and applies to its layer."""
    assert len(MUTANTS) >= 8
    for m in MUTANTS.values():
        assert m.property in PROPS and m.layer in PROPS[m.property].layers, m.name
    assert len({m.property for m in MUTANTS.values()}) >= 8


def _params() -> list:
    marks = {n: [pytest.mark.xfail(reason=r, strict=True)] for n, r in KNOWN_SURVIVORS.items()}
    return [pytest.param(m, id=m.name, marks=marks.get(m.name, [])) for m in MUTANTS.values()]


@pytest.mark.parametrize("mutant", _params())
def test_peft_mutant_is_caught(mutant: PeftMutant) -> None:
    """The mutant's cell fails; PEFT's classes are untouched afterwards; clean PEFT passes the same cell."""
    before = peft_class_state()
    started = time.perf_counter()
    result = _run(PeftMutantTarget(mutant), mutant.cell, mutant.max_examples)
    took = time.perf_counter() - started
    CATCHES.append((mutant.name, str(mutant.cell), result.status, result.examples, took))
    print(f"{mutant.name}: {result.status} in {took:.2f} s after {result.examples} examples ({mutant.cell})")
    assert result.status == "failed", f"{mutant.name} -> {result.status}: {result.message}"
    assert result.example and f"kind={mutant.layer}" in result.example
    assert peft_class_state() == before, "a mutant leaked a patch into PEFT's classes"
    clean = _run(CLEAN, mutant.cell, mutant.max_examples)
    assert clean.status == "passed", f"clean PEFT {clean.status} on {mutant.cell}: {clean.message}"


def test_kill_rate_report() -> None:
    """Printed summary of the parametrized runs above (runs last in file order)."""
    if not CATCHES:
        pytest.skip("no mutant ran (selected alone)")
    killed = sum(status == "failed" for _, _, status, _, _ in CATCHES)
    print(f"\nPEFT mutant kill rate: {killed}/{len(CATCHES)}")
    for name, cell, status, examples, took in CATCHES:
        print(f"  {name:30} {cell:40} {status:7} {examples:4d} ex {took:6.2f} s")
    survivors = {name for name, _, status, _, _ in CATCHES if status != "failed"}
    assert survivors <= set(KNOWN_SURVIVORS), survivors
