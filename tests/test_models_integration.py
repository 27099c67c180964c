"""The model half through the shared machinery: CLI, reports, xfails `when` lines, shards, pytest plugin."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from properties.catalogue import all_properties
from properties.known_bugs import FEATURES, compile_condition, features
from properties.models.spec import ARCHITECTURES
from properties.models.strategies import ModelDraw, model_examples
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.session import plan_cells
from properties.xfails import bundled_rules, example_rules, parse_xfails
from tests.test_cli import cli

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="the model half builds transformers models: install the `peft` extra",
)


def test_model_cells_are_planned_by_architecture_and_glob():
    cells = plan_cells(["model_*"], None, ["float32"])
    assert {c.layer for c in cells} == set(ARCHITECTURES)
    assert {c.property for c in plan_cells(["model_tied_weights"])} == {"model_tied_weights"}
    assert {c.layer for c in plan_cells(["model_tied_weights"])} == {"llama_tied", "gpt2"}
    assert any(c.property.startswith("model_") for c in plan_cells())  # the default run has both halves
    layer_only = plan_cells(None, ["linear"], ["float32"])
    assert layer_only and not any(c.property.startswith("model_") for c in layer_only)


@needs_transformers
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(model_examples(ModelDraw("llama_tied", torch.float32, frozenset({"multi_adapter"}), tied_target=True)))
def test_model_example_features_cover_every_feature_name(ex):
    facts = features(ex)
    assert set(FEATURES) <= set(facts)
    assert facts["architecture"] == "llama_tied" and facts["tied_target"] and facts["twin_untargeted"]
    assert compile_condition("tied_target and architecture == 'llama_tied'")(facts)


def _linear_only(arch: str, paths: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for p in paths if "embeddings" not in p)


@needs_transformers
@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(model_examples(ModelDraw("bert", torch.float16, frozenset({"dora"}), targetable=_linear_only)))
def test_a_model_dora_gain_is_the_largest_over_the_modules_dora_targets(ex):
    """By hand from the spec's exact base weights: ``max |m / ||W + s B A|| - 1|`` over every DoRA module and
    output row (bert's Linear weights are ``(out, in)``), as the layer feature is for one module; so the
    dora-bias-cancellation line sets aside a model example exactly where one of its modules can fail."""
    gains = [0.0]
    for a in ex.spec.adapters:
        for path, m in a.modules.items():
            if not a.use_dora:
                continue
            w = ex.spec.base[f"{path}.weight"].double()
            v = w + m.scaling * m.B.double() @ m.A.double()
            gains.append((m.magnitude.double() / v.norm(dim=1) - 1).abs().max().item())
    facts = features(ex)
    assert facts["dora_gain"] == pytest.approx(max(gains), rel=1e-12, abs=0)
    assert facts["dora"] == any(a.use_dora for a in ex.spec.adapters)
    if not facts["dora"]:
        assert facts["dora_gain"] == 0.0
    (line,) = [
        r
        for r in bundled_rules("peft", "0.21.2").rules
        if r.reason == "dora-bias-cancellation" and r.matches("model_merge_equivalence", "bert", "float16")
    ]
    assert compile_condition(line.condition)(facts) == (facts["dora"] and facts["dora_gain"] > 1)


@needs_transformers
def test_when_line_sets_model_examples_aside():
    cell = Cell("model_merge_equivalence", "gpt2", "float32")
    rules = parse_xfails("model_merge_equivalence * * when tied_target  # demo\n")
    opts = RunOptions(
        target="reference", profile=PROFILES["ci"], seed=0, max_examples=4, known_bugs=example_rules(rules)
    )
    from properties.targets.reference import TARGET

    result = run_cell(TARGET, all_properties()[cell.property], cell, opts)
    assert result.status == "passed", result.message
    assert sum(result.known_bug_examples.values()) > 0


@needs_transformers
def test_cli_runs_model_properties_and_writes_reports(tmp_path):
    out = cli(
        "run",
        "--target",
        "reference",
        "--properties",
        "model_merge_equivalence,model_tied_weights",
        "--layers",
        "llama_tied",
        "--dtypes",
        "bfloat16",
        "--max-examples",
        "2",
        "--report",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    cells = {(c["property"], c["layer"], c["dtype"]): c["status"] for c in report["cells"]}
    assert cells == {
        ("model_merge_equivalence", "llama_tied", "bfloat16"): "passed",
        ("model_tied_weights", "llama_tied", "bfloat16"): "passed",
    }
    assert "model_tied_weights" in (tmp_path / "report.md").read_text()


@needs_transformers
def test_failing_model_cell_prints_replay_that_reproduces(tmp_path):
    """A broken model target fails with a replay line; running that line fails the same way."""
    args = ["--properties", "model_unloaded_is_plain", "--layers", "bert", "--dtypes", "float32"]
    out = cli("run", "--target", "tests.model_mutants:WRAPPER_LEFT_BEHIND", *args, "--max-examples", "3")
    assert out.returncode == 1, out.stdout + out.stderr
    replay = next(line for line in out.stdout.splitlines() if "replay: " in line).split("replay: ", 1)[1]
    assert "--layers bert" in replay and "model_unloaded_is_plain" in replay
    again = cli(*replay.split()[1:])
    assert again.returncode == 1 and "left behind" in again.stdout


def test_model_cells_skip_with_the_reason_without_transformers(monkeypatch):
    """transformers is optional (the ``peft`` extra): without it the model cells are skipped, not errors."""
    from properties.models import architectures as archs
    from properties.targets.reference import TARGET

    monkeypatch.setattr(archs, "missing", lambda: "the model half needs transformers")
    cell = Cell("model_merge_equivalence", "llama", "float32")
    opts = RunOptions(target="reference", profile=PROFILES["ci"], seed=0, max_examples=2)
    result = run_cell(TARGET, all_properties()[cell.property], cell, opts)
    assert result.status == "skipped" and "needs transformers" in result.message


@needs_transformers
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    model_examples(
        ModelDraw("bert", torch.float16, frozenset(), min_adapters=1, max_adapters=1, targetable=_linear_only)
    )
)
def test_a_module_fed_a_non_finite_input_is_out_of_range_not_a_failure(ex):
    """An earlier value leaving float16's range (an overflowing UNet conv, thorough seed 1) feeds the next
    module inf: its output has no exact answer, so the example is out of range, as a layer example
    whose intermediate overflows; every module fed finite values is still judged (a wrong one fails)."""
    from properties.catalogue import Context, OutOfRange, PropertyFailure
    from properties.models.checks import _active_paths, _judge_merged
    from properties.models.protocol import model_target_for
    from properties.precision import Arithmetic
    from properties.targets.reference import TARGET

    target = model_target_for(TARGET)
    paths = _active_paths(ex.spec)
    ctx = Context(target, ex, Arithmetic.for_dtype(torch.float16))
    h = target.build(ex.spec)
    before = h.capture(ex.batch, paths)
    fed = next(p for p in paths if p in before)
    x, y = before[fed]
    before[fed] = (torch.full_like(x, float("inf")), y)
    h.merge()
    with pytest.raises(OutOfRange, match="not finite"):
        _judge_merged(ctx, h, ex.spec, before, "merged", unloaded=False)
    others = [p for p in paths if p in before and p != fed]
    if others:  # a module fed finite values but giving a wrong output still fails
        x2, y2 = before[others[0]]
        before[others[0]] = (x2, y2 + 1)
        with pytest.raises(PropertyFailure):
            _judge_merged(
                Context(target, ex, Arithmetic.for_dtype(torch.float16)), h, ex.spec, before, "merged", False
            )
