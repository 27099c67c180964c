"""The adapter-hub ``adapters`` layer target: ``LoRALinear`` against float64 formulas, its cells, and
what it lacks skipped with the reason.

Needs ``adapters`` (it pins its own transformers): ``python scripts/envs.py run adapters -- python -m
pytest tests/test_adapters_layer_target.py``; elsewhere every test that builds a layer skips.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from properties.catalogue import all_properties
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.spec import AdapterSpec, LayerSpec

PROPS = all_properties()
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _target():
    try:  # not find_spec: adapters replaces itself by a lazy module whose __spec__ is None
        importlib.import_module("adapters")
    except ImportError:
        pytest.skip("adapters is not installed here (python scripts/envs.py create adapters)")
    from properties.targets.adapters_target import TARGET

    return TARGET


def _spec(*, fan_in_fan_out: bool, bias: bool, out: int = 5, dora: bool = False) -> LayerSpec:
    g = torch.Generator().manual_seed(1)
    w, A, B = (torch.randn(*s, generator=g, dtype=F64) for s in ((out, 4), (2, 4), (out, 2)))
    mag = (w + 1.5 * B @ A).norm(dim=1) * 1.5 if dora else None
    adapter = AdapterSpec("default", 2, 3.0, A, B, use_dora=dora, magnitude=mag)
    b = torch.randn(out, generator=g, dtype=F64) if bias else None
    return LayerSpec("linear", F64, w, (adapter,), base_bias=b, fan_in_fan_out=fan_in_fan_out)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_merge_reset_and_disable_match_the_formulas(fan_in_fan_out: bool, bias: bool) -> None:
    spec = _spec(fan_in_fan_out=fan_in_fan_out, bias=bias)
    a = spec.adapters[0]
    h = _target().build(spec)
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    base = x @ spec.weight.T + (spec.base_bias if bias else 0.0)
    lora = base + 1.5 * (x @ a.A.T) @ a.B.T
    torch.testing.assert_close(h.forward(x), lora, **TOL)
    assert set(h.weights()) == ({"weight", "bias"} if bias else {"weight"})
    h.merge()
    assert h.merged_adapters() == ["default"]
    torch.testing.assert_close(h.weights()["weight"], spec.weight + 1.5 * a.B @ a.A, **TOL)
    torch.testing.assert_close(h.forward(x), lora, **TOL)
    h.set_enabled(False)  # as set_active_adapters(None): the merged LoRA is reset first
    assert h.merged_adapters() == []
    torch.testing.assert_close(h.weights()["weight"], spec.weight, **TOL)
    torch.testing.assert_close(h.forward(x), base, **TOL)
    h.set_enabled(True)
    torch.testing.assert_close(h.forward(x), lora, **TOL)


def test_dropout_is_on_the_lora_path_in_train_mode_only() -> None:
    """Eval: the formula. Train: differs, and only by something in the span of ``B`` (the base path and
    its bias are untouched, so dropout acts on the LoRA input)."""
    plain = _spec(fan_in_fan_out=False, bias=True)
    a = plain.adapters[0]
    adapter = AdapterSpec("default", 2, 3.0, a.A, a.B, dropout=0.5)
    spec = LayerSpec("linear", F64, plain.weight, (adapter,), base_bias=plain.base_bias)
    h = _target().build(spec)
    x = torch.randn(64, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    base = x @ spec.weight.T + spec.base_bias
    torch.testing.assert_close(h.forward(x), base + 1.5 * (x @ a.A.T) @ a.B.T, **TOL)
    moved = h.forward(x, train=True) - base
    assert not torch.allclose(moved, 1.5 * (x @ a.A.T) @ a.B.T)
    coeffs = torch.linalg.lstsq(a.B, moved.T).solution
    torch.testing.assert_close(a.B @ coeffs, moved.T, **TOL)


def _run(prop: str, layer: str = "linear", dtype: str = "float32", n: int = 8):
    opts = RunOptions(target="adapters", profile=PROFILES["ci"], seed=0, max_examples=n)
    return run_cell(_target(), PROPS[prop], Cell(prop, layer, dtype), opts)


class _WithoutDora:
    """The layer target with DoRA left out of what is drawn (its DoRA is a finding: adapters-dora)."""

    name = "adapters"

    def __getattr__(self, attr):
        return getattr(_target(), attr)

    def capabilities(self):
        import dataclasses

        caps = _target().capabilities()
        return dataclasses.replace(caps, options=caps.options - {"dora"})


@pytest.mark.parametrize(
    "prop", ["reference_forward", "merge_equivalence", "merge_roundtrip", "disable_exact"]
)
def test_properties_pass_without_dora(prop: str) -> None:
    _target()
    opts = RunOptions(target="adapters", profile=PROFILES["ci"], seed=0, max_examples=8)
    result = run_cell(_WithoutDora(), PROPS[prop], Cell(prop, "linear", "bfloat16"), opts)
    assert result.status == "passed", f"{result.message}\n{result.example}"
    assert result.examples >= 1


def test_dora_is_caught() -> None:
    """adapters-dora at layer level: the DoRA forward leaves the scaling out of the norm."""
    result = _run("reference_forward", n=30)
    assert result.status == "failed" and "dora=True" in result.example, result.message


def test_dora_on_conv1d_takes_the_magnitude_from_the_wrong_axis() -> None:
    """adapters-dora, GPT-2 Conv1D: the magnitude is initialised from the rows of the (in, out) weight."""
    with pytest.raises(RuntimeError):
        _target().build(_spec(fan_in_fan_out=True, bias=True, out=5, dora=True))


def test_what_adapters_lacks_is_skipped_with_the_reason() -> None:
    result = _run("merge_equivalence", layer="conv2d")
    assert result.status == "skipped" and "linear modules only" in result.message
    result = _run("merge_subset")
    assert result.status == "skipped" and "merge_subset" in result.message
    result = _run("safe_merge_atomic")
    assert result.status == "skipped" and "safe_merge" in result.message


def test_the_name_finds_both_halves() -> None:
    _target()
    from properties.models.protocol import model_target_for
    from properties.models.targets.adapterhub import TARGET as MODEL
    from properties.targets.registry import load_target

    layer = load_target("adapters")
    assert layer is _target()
    assert model_target_for(layer) is MODEL
