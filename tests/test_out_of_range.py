"""Examples outside the claim: a value a correct implementation stores may exceed the dtype's range.

The reference returned inf for a float16 attention whose exact output was finite (ci, seed 10): the
unscaled logits q k^T passed 65504. Such examples are recognised from the exact float64 values
(``precision.range_violation``), set aside and counted per cell with the reason, never excused by
looking at the target's output and never by a wider tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from properties import oracle
from properties.catalogue import all_properties
from properties.precision import (
    Arithmetic,
    _crude_peak,
    forward_expected,
    range_violation,
    weights_expected,
)
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.spec import AdapterSpec, LayerSpec
from properties.strategies import Draw, examples
from properties.targets.reference import TARGET

F16 = torch.float16


def _linear(w_scale: float, s_alpha: float = 1.0) -> tuple[LayerSpec, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    W = (torch.ones(4, 8, dtype=torch.float64) * w_scale).to(F16)
    A = torch.randn(2, 8, generator=g, dtype=torch.float64).to(F16)
    B = torch.randn(4, 2, generator=g, dtype=torch.float64).to(F16)
    spec = LayerSpec("linear", F16, W, (AdapterSpec("default", 2, 2.0 * s_alpha, A, B),))
    return spec, torch.ones(3, 8, dtype=F16)


def test_in_range_example_is_inside_the_claim() -> None:
    spec, x = _linear(1.0)
    arith = Arithmetic.for_dtype(F16)
    assert range_violation(spec, x, arith) is None
    assert forward_expected(spec, x, arith).out_of_range is None


def test_base_product_beyond_float16_is_outside_the_claim() -> None:
    """W x = 8 * 9000 = 72000 > 65504 although each entry is representable."""
    spec, x = _linear(9000.0)
    reason = forward_expected(spec, x, Arithmetic.for_dtype(F16)).out_of_range
    assert reason is not None and "W x + b" in reason and "float16" in reason


def test_a_scaled_lora_term_beyond_float16_is_outside_the_claim() -> None:
    """set_scale multiplies s B (A x): the same layer is inside the claim at scale 1, outside at 1e5."""
    spec, x = _linear(1.0)
    arith = Arithmetic.for_dtype(F16)
    assert forward_expected(spec, x, arith, scales={"default": 1.0}).out_of_range is None
    reason = forward_expected(spec, x, arith, scales={"default": 1e5}).out_of_range
    assert reason is not None and "s B" in reason


def test_merged_weights_beyond_float16_are_outside_the_claim() -> None:
    spec, _ = _linear(60000.0, s_alpha=4000.0)
    assert weights_expected(spec, ["default"], Arithmetic.for_dtype(F16))["weight"].out_of_range


def test_float32_has_room_for_the_same_example() -> None:
    spec, x = _linear(9000.0)
    spec32 = LayerSpec(
        "linear",
        torch.float32,
        spec.weight.float(),
        tuple(AdapterSpec(a.name, a.r, a.alpha, a.A.float(), a.B.float()) for a in spec.adapters),
    )
    assert range_violation(spec32, x.float(), Arithmetic.for_dtype(torch.float32)) is None


def test_attention_logits_beyond_float16_are_outside_the_claim() -> None:
    """q k^T is stored before the 1/sqrt(d) and the softmax: 3 * 160^2 = 76800 > 65504 while every
    projection (160) and the output stay small."""
    E = 3
    W = torch.zeros(3 * E, E, dtype=torch.float64)
    W[:E] = torch.eye(E) * 160  # q = 160 x
    W[E : 2 * E] = torch.eye(E) * 160  # k = 160 x
    W[2 * E :] = torch.eye(E)
    a = AdapterSpec(
        "default",
        1,
        1.0,
        torch.zeros(1, E, dtype=F16),
        torch.zeros(3 * E, 1, dtype=F16),
        out_A=torch.zeros(1, E, dtype=F16),
        out_B=torch.zeros(E, 1, dtype=F16),
    )
    spec = LayerSpec("mha", F16, W.to(F16), (a,), num_heads=1, out_weight=torch.eye(E, dtype=F16))
    x = torch.ones(1, 2, E, dtype=F16)
    reason = forward_expected(spec, x, Arithmetic.for_dtype(F16)).out_of_range
    assert reason is not None and "q k^T" in reason
    small = LayerSpec("mha", F16, (W / 4).to(F16), (a,), num_heads=1, out_weight=torch.eye(E, dtype=F16))
    assert forward_expected(small, x, Arithmetic.for_dtype(F16)).out_of_range is None


def test_seed_10_attention_float16_passes_with_the_overflowing_examples_set_aside() -> None:
    """The issue's reproduction: ``--seed 10 --properties scaling_law --layers mha --dtypes float16``."""
    cell = Cell("scaling_law", "mha", "float16")
    opts = RunOptions(target="reference", profile=PROFILES["ci"], seed=10)
    result = run_cell(TARGET, all_properties()["scaling_law"], cell, opts)
    assert result.status == "passed", result.message
    assert result.examples >= PROFILES["ci"].examples_for(1.0)
    assert any("q k^T" in reason for reason in result.out_of_range_examples)
    assert "outside the claim" in result.message
    assert result.to_json()["out_of_range_examples"] == result.out_of_range_examples


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
@pytest.mark.parametrize("kind", ["linear", "embedding", "conv1d", "conv2d", "mha"])
def test_the_quick_screen_bounds_every_stored_value(kind: str, data) -> None:
    """``range_violation`` skips the close look when a cheap bound is far inside the range; that bound
    must exceed every value and magnitude ``oracle.intermediates`` lists, under any scale."""
    caps = TARGET.capabilities()
    ex = data.draw(examples(Draw(kind=kind, dtype=torch.float32, options=caps.options)))
    spec, x = ex.spec, ex.x
    names = spec.active_adapters
    scales = {n: data.draw(st.sampled_from([0.0, 0.5, -1.0, 9.75])) for n in names}
    gain = data.draw(st.sampled_from([1.0, 10.0]))
    peak = _crude_peak(spec, x, names, scales, gain)
    for what, value, mag in oracle.intermediates(spec, x, names, scales, input_gain=gain):
        if value.numel():
            assert float(value.abs().max()) <= peak * (1 + 1e-12), what
            assert float(mag.max()) <= peak * (1 + 1e-12), what
