"""The model properties catch model-level bugs, and the reference model target passes them all.

Every mutant in ``tests/model_mutants.py`` carries one bug (tied twin written, adapter applied twice,
keys dropped on load, wrapper left behind, ...); its cell must end ``failed`` (not ``error``) with a
shrunk example and a replay command. The clean reference must pass every model property in every
dtype (few examples each: the point is no false alarm, and each example is a whole model).
"""

from __future__ import annotations

import importlib.util

import pytest
from model_mutants import MODEL_MUTANTS, ModelMutant

from properties.catalogue import all_properties
from properties.models.spec import ARCHITECTURES
from properties.models.targets.reference import TARGET
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.spec import DTYPES

PROPS = all_properties()
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="the model half builds transformers models: install the `peft` extra",
)
MODEL_PROPS = [p for p in PROPS if p.startswith("model_")]


def _run(target, cell: Cell, max_examples: int | None = None):
    opts = RunOptions(target=target.name, profile=PROFILES["ci"], seed=0, max_examples=max_examples)
    return run_cell(target, PROPS[cell.property], cell, opts)


@needs_transformers
@pytest.mark.parametrize("mutant", MODEL_MUTANTS, ids=lambda m: m.name)
def test_model_mutant_is_caught(mutant: ModelMutant) -> None:
    result = _run(mutant.target(), mutant.cell)
    assert result.status == "failed", f"{mutant.name}: {result.status}: {result.message}"
    assert result.example and result.replay


@needs_transformers
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("prop", MODEL_PROPS)
def test_reference_passes_model_property(prop: str, dtype: str) -> None:
    available = (
        TARGET.capabilities().layers
    )  # unet, torchtune_llama: in their envs (test_model_library_targets)
    for arch in [a for a in PROPS[prop].layers if a in available]:
        result = _run(TARGET, Cell(prop, arch, dtype), max_examples=2)
        assert result.status == "passed", f"{prop} {arch} {dtype}: {result.message}\n{result.example}"


def test_every_model_property_has_a_mutant() -> None:
    """A model property no mutant is aimed at has never been shown to catch anything."""
    assert set(MODEL_PROPS) - {m.cell.property for m in MODEL_MUTANTS} == set()
    for m in MODEL_MUTANTS:
        assert set(m.catches) <= set(MODEL_PROPS) and m.layer in PROPS[m.cell.property].layers, m.name


def test_model_properties_cover_every_architecture() -> None:
    assert set(MODEL_PROPS) >= {
        "model_merge_equivalence",
        "model_unload_restores_base",
        "model_adapter_save_load",
        "model_merged_save_load",
        "model_tied_weights",
        "model_adapter_isolation",
        "model_safe_merge",
        "model_unloaded_is_plain",
    }
    assert all(set(PROPS[p].layers) <= set(ARCHITECTURES) for p in MODEL_PROPS)


def test_layer_target_without_model_half_is_skipped() -> None:
    """A target with no model_target and no built-in model half: model cells are skipped, with why."""

    class LayerOnly:
        name = "layer-only"

        def version(self):
            return "0"

        def capabilities(self):
            return TARGET.capabilities()

        def build(self, spec):
            raise AssertionError("never built")

    result = _run(LayerOnly(), Cell("model_merge_equivalence", "llama", "float32"), max_examples=2)
    assert result.status == "skipped" and "no model-level target" in result.message


def test_a_parameter_difference_after_unload_names_what_differs() -> None:
    """A reshaped parameter is named with both shapes (an empty name list read as 'no difference')."""
    from properties.models.checks import _shape_diff

    want = {"lm_head.weight": (5, 4), "embed.weight": (5, 4)}
    assert _shape_diff({"lm_head.weight": (4, 5), "embed.weight": (5, 4)}, want) == (
        "shapes: lm_head.weight: (4, 5) instead of (5, 4)"
    )
    assert _shape_diff({"embed.weight": (5, 4), "extra.bias": (3,)}, want) == (
        "missing parameters: lm_head.weight; extra parameters: extra.bias"
    )
