"""The Keras 3 target (torch backend): it runs, the properties assert, and what Keras lacks is skipped.

Needs Keras: ``python scripts/envs.py run keras -- python -m pytest tests/test_keras_target.py``;
elsewhere every test skips.
"""

from __future__ import annotations

import importlib.util

import pytest

from properties.catalogue import all_properties
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell

PROPS = all_properties()


def _target():
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed here (python scripts/envs.py create keras)")
    from properties.targets.keras_target import TARGET

    return TARGET


def _run(prop: str, layer: str, dtype: str, n: int = 6):
    opts = RunOptions(target="keras", profile=PROFILES["ci"], seed=0, max_examples=n)
    return run_cell(_target(), PROPS[prop], Cell(prop, layer, dtype), opts)


@pytest.mark.parametrize("layer", ["linear", "embedding"])
@pytest.mark.parametrize("prop", ["reference_forward", "merge_equivalence"])
def test_keras_lora_is_within_the_bounds(prop: str, layer: str) -> None:
    """Dense/Embedding enable_lora forward, and the merge Keras' save path makes, in bfloat16."""
    result = _run(prop, layer, "bfloat16")
    assert result.status == "passed", f"{result.message}\n{result.example}"
    assert result.examples >= 1


def test_float64_lora_factors_are_caught() -> None:
    """keras-float64-lora: float32 LoRA variables on a float64 layer fail the float64 bound."""
    result = _run("reference_forward", "embedding", "float64")
    assert result.status == "failed", result.message


def test_what_keras_lacks_is_skipped() -> None:
    result = _run("merge_roundtrip", "linear", "float32")
    assert result.status == "skipped" and "unmerge" in result.message
    result = _run("merge_equivalence", "conv2d", "float32")
    assert result.status == "skipped" and "enable_lora" in result.message
