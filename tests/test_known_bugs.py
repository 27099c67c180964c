"""Known bugs as example predicates (``when`` lines in an xfails file): parsing, the gate, the report."""

from __future__ import annotations

import pytest
import torch
from mutants import MUTANTS

from properties.catalogue import all_properties
from properties.known_bugs import compile_condition, features
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.session import apply_xfail
from properties.spec import AdapterSpec, Example, LayerSpec
from properties.xfails import bundled_rules, example_rules, match, parse_xfails
from tests.fixture_targets import RSLORA_MERGE, SCALED

CELL = Cell("merge_equivalence", "linear", "float32")


def _run(target, lines: str, n: int = 30):
    rules = parse_xfails(lines)
    opts = RunOptions(
        target=target.name, profile=PROFILES["ci"], seed=0, max_examples=n, known_bugs=example_rules(rules)
    )
    used: set[str] = set()  # XfailRule.key of each line used
    result = apply_xfail(run_cell(target, all_properties()[CELL.property], CELL, opts), rules, used)
    return result, used


def test_when_lines_parse_and_stay_out_of_cell_matching():
    rules = parse_xfails(
        "merge_* linear * when rslora and rank > 1  # bug A\nmerge_equivalence linear float32  # bug B\n"
    )
    assert rules[0].condition == "rslora and rank > 1" and rules[0].reason == "bug A"
    assert str(rules[0]) == "line 1: merge_* linear * when rslora and rank > 1"
    assert match(rules, "merge_equivalence", "linear", "float32") is rules[1]
    assert example_rules(rules) == (rules[0],)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("a b c when __import__('os')  # x", "Call is not allowed"),
        ("a b c when rslora.real  # x", "Attribute is not allowed"),
        ("a b c when colour == 'red'  # x", "unknown feature 'colour'"),
        ("a b c when  # x", "expected 'property layer dtype [when EXPR]"),
        ("a b c when rank >  # x", "not an expression"),
    ],
)
def test_bad_conditions_are_refused_with_the_line(line, why):
    with pytest.raises(ValueError, match="line 1") as e:
        parse_xfails(line)
    assert why in str(e.value)


def test_a_bug_limited_to_some_examples_fails_the_cell_without_a_when_line():
    result, _ = _run(RSLORA_MERGE, "")
    assert result.status == "failed"
    assert "rslora=True" in result.example


def test_a_when_line_sets_the_known_bug_aside_and_the_rest_of_the_cell_passes():
    result, used = _run(RSLORA_MERGE, "merge_equivalence linear * when rslora  # rslora merge bug\n")
    assert result.status == "passed", result.message
    assert result.examples >= 30
    (count,) = result.known_bug_examples.values()
    assert count > 0
    assert "set aside as known bugs: rslora merge bug" in result.message
    assert used == {":1"}  # line 1 of an unnamed file


def test_a_new_bug_in_the_same_cell_still_fails():
    """Every merge of this target is wrong; the line covers only rsLoRA examples."""
    result, _ = _run(SCALED, "merge_equivalence linear * when rslora  # rslora merge bug\n")
    assert result.status == "failed"
    assert "rslora=False" in result.example


def test_a_when_line_that_matches_no_example_is_not_used():
    result, used = _run(RSLORA_MERGE, "merge_equivalence linear * when rank > 1000  # never\n")
    assert result.status == "failed"
    assert result.known_bug_examples == {} and used == set()


def test_a_cell_whose_every_example_is_a_known_bug_is_xfailed():
    result, used = _run(SCALED, "merge_equivalence linear * when kind == 'linear'  # everything\n")
    assert result.status == "xfailed"
    assert "every example drawn matched a known bug: everything" in result.message
    assert used == {":1"}  # line 1 of an unnamed file


def test_ci_stops_drawing_once_the_first_examples_are_all_known_bugs():
    """ci ends such a cell after ``known_only_limit`` examples instead of Hypothesis's 458; dev (and the
    nightly thorough profile) keep Hypothesis's own rule."""
    line = "merge_equivalence linear * when kind == 'linear'  # everything\n"
    result, _ = _run(SCALED, line)
    assert result.status == "xfailed"
    assert sum(result.known_bug_examples.values()) == PROFILES["ci"].known_only_limit > 0
    assert "the ci profile stops after" in result.message
    rules = parse_xfails(line)
    opts = RunOptions(target=SCALED.name, profile=PROFILES["dev"], seed=0, known_bugs=example_rules(rules))
    dev = run_cell(SCALED, all_properties()[CELL.property], CELL, opts)
    assert dev.status == "xfailed" and sum(dev.known_bug_examples.values()) > PROFILES["ci"].known_only_limit


def test_a_whole_cell_expected_failure_is_not_shrunk():
    """It only has to show it still fails; shrinking it would be most of a library's gate time."""
    from hypothesis import Phase

    from properties.runner import phases_for
    from properties.session import with_xfails

    base = RunOptions(target=SCALED.name, profile=PROFILES["ci"], seed=0)
    opts = with_xfails(base, parse_xfails("merge_* linear float32  # x\n* conv2d * when dora  # y\n"))
    assert Phase.shrink not in phases_for(CELL, opts)
    assert Phase.shrink in phases_for(CELL, base)
    assert Phase.shrink in phases_for(Cell("merge_equivalence", "conv2d", "float32"), opts)
    result = run_cell(SCALED, all_properties()[CELL.property], CELL, opts)
    assert result.status == "failed" and result.replay


def test_unused_lines_are_stale_only_in_scope_or_when_they_match_no_cell_at_all():
    """A line for cells this run did not ask for (quantized kinds in a default run) is not stale; an
    unused line for a cell in scope is, and so is one that matches no cell anywhere (a typo)."""
    from properties.session import _stale, plan_cells
    from properties.xfails import parse_xfails

    rules = parse_xfails(
        "merge_equivalence linear float32 when rank > 1000  # in scope, unused\n"
        "merge_equivalence bnb_nf4 *  # quantized: outside a linear-only run\n"
        "merge_equivalence conv9d *  # no such layer: stale everywhere\n"
        "merge_equivalence linear float64  # in scope, used\n"
    )
    used = {rules[3].key}
    scope = plan_cells(["merge_equivalence"], ["linear"])
    stale = _stale(rules, used, scope)
    assert stale == [str(rules[0]), str(rules[2])]
    assert _stale(rules, used, plan_cells(["merge_equivalence"], ["linear", "bnb_nf4"])) == [
        str(rules[0]),
        str(rules[1]),
        str(rules[2]),
    ]


def _dora_bias_lines(kind: str):
    rules = bundled_rules("peft", "0.21.2").rules
    return [
        r for r in rules if r.reason == "dora-bias-cancellation" and r.matches("reference_forward", kind, "*")
    ]


def test_dora_gain_is_how_far_dora_rescales_the_base_output():
    """The nightly's shrunk PEFT example: f = m / ||W + s B A|| = 8.5 / 0.1256 = 67.7, so gain 66.7."""
    h = torch.float16
    dora = AdapterSpec(
        "default",
        1,
        0.125,
        torch.tensor([[0.4519]], dtype=h),
        torch.tensor([[-0.6]], dtype=h),
        use_dora=True,
        magnitude=torch.tensor([8.5], dtype=h),
    )
    spec = LayerSpec(
        "linear", h, torch.tensor([[-0.09174]], dtype=h), (dora,), base_bias=torch.tensor([-1.357], dtype=h)
    )
    facts = features(Example(spec, torch.tensor([[-0.1117]], dtype=h)))
    v = spec.weight.double() + 0.125 * dora.B.double() @ dora.A.double()
    assert facts["dora_gain"] == pytest.approx(8.5 / v.abs().item() - 1, rel=1e-12)
    (line,) = _dora_bias_lines("linear")
    assert compile_condition(line.condition)(facts)
    plain = LayerSpec(
        "linear", h, spec.weight, (AdapterSpec("default", 1, 0.125, dora.A, dora.B),), spec.base_bias
    )
    plain_facts = features(Example(plain, torch.tensor([[-0.1117]], dtype=h)))
    assert plain_facts["dora_gain"] == 0.0 and not compile_condition(line.condition)(plain_facts)


@pytest.mark.parametrize(
    ("cell", "examples"),
    [
        (Cell("reference_forward", "linear", "float16"), 400),
        (Cell("reference_forward", "conv2d", "float16"), 600),
    ],
)
def test_the_dora_bias_cancellation_lines_set_aside_every_example_the_bug_fails(cell: Cell, examples: int):
    """PEFT's cancellation (the reference with ``W x`` recovered as ``round(W x + b) - b``) fails the cell,
    and with the bundled lines, which leave examples with ``|f - 1| <= 1`` in, the same 400 examples pass: the
    threshold is where the bug's error stays within the one rounding of ``W x + b`` every bound budgets."""
    target = MUTANTS["dora_bias_cancellation"].target()
    base = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=examples)
    assert run_cell(target, all_properties()[cell.property], cell, base).status == "failed"
    rules = _dora_bias_lines(cell.layer)
    opts = RunOptions(
        target=target.name,
        profile=PROFILES["ci"],
        seed=0,
        max_examples=examples,
        known_bugs=example_rules(rules),
    )
    result = run_cell(target, all_properties()[cell.property], cell, opts)
    assert result.status == "passed", f"{result.message}\n{result.example}"
    assert sum(result.known_bug_examples.values()) > 0
