"""The precision model is sound (a correct implementation stays within it), sharp (a 1e-3 error in
float32 is flagged by orders of magnitude) and its building blocks have their exact textbook values.

A bound that is too tight flakes on correct code; one that is too loose lets real bugs through. Both
directions are tested here, before the bound gates anything (``shared/notes/precision.md``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import replace

import pytest
import torch

from properties import oracle
from properties.catalogue import all_properties
from properties.precision import (
    TF32_UNIT_ROUNDOFF,
    Arithmetic,
    Expected,
    forward_expected,
    gamma,
    inner_dim,
    measure,
    roundtrip_expected,
    unit_roundoff,
    weights_expected,
)
from properties.profiles import PROFILES
from properties.runner import Cell, RunOptions, run_cell
from properties.spec import AdapterSpec, ConvOptions, LayerSpec
from properties.targets.reference import TARGET

PROPS = all_properties()
F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
ALL_DTYPES = ("float64", "float32", "bfloat16", "float16")
PROFILE = dataclasses.replace(PROFILES["ci"], samples_kept=100_000)  # keep every sample for statistics


def _run(prop: str, layer: str, dtype: str, n: int):
    cell = Cell(prop, layer, dtype)
    return run_cell(
        TARGET, PROPS[prop], cell, RunOptions(target="reference", profile=PROFILE, seed=1, max_examples=n)
    )


# ----------------------------------------------------------------------------- sound on the reference


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("prop", ["reference_forward", "merge_equivalence", "merge_roundtrip"])
def test_reference_within_bound_over_many_examples(prop: str, dtype: str) -> None:
    """Soundness: over many drawn linear layers the reference never exceeds the bound."""
    result = _run(prop, "linear", dtype, 80)
    assert result.status == "passed", f"{result.message}\n{result.example}"
    assert result.examples >= 80 and len(result.samples) >= 80
    assert all(s.ratio <= 1.0 for s in result.samples)
    assert result.max_ratio is not None and result.max_ratio <= 1.0


@pytest.mark.parametrize("layer", ["conv2d", "embedding", "mha"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_forward_within_bound_other_layers(layer: str, dtype: str) -> None:
    """The same holds where K is a conv window, a single row (embedding) or attention."""
    result = _run("reference_forward", layer, dtype, 30)
    assert result.status == "passed", f"{result.message}\n{result.example}"
    assert result.max_ratio is not None and result.max_ratio <= 1.0


def test_float32_errors_are_near_sqrt_k_not_near_the_bound() -> None:
    """Not absurdly loose, and no hidden precision loss: correct float32 outputs sit near the
    probabilistic sqrt(K) u M, far below the worst-case K u M the bound allows, yet the bound is
    within a few hundred of the worst error seen (a bound 1e6 x too loose would pass any bug)."""
    result = _run("reference_forward", "linear", "float32", 80)
    assert result.status == "passed"
    per_sqrt_k = [s.err_u / math.sqrt(s.inner_dim + s.rank) for s in result.samples]
    assert statistics.median(per_sqrt_k) < 1.0
    assert max(per_sqrt_k) < 4.0
    assert max(s.ratio for s in result.samples) > 1e-2
    assert max(s.err_u for s in result.samples) > 0.1  # errors are really measured, not all zero


# ----------------------------------------------------------------------------- sharp on perturbations


def _lora_spec(
    dtype: torch.dtype, fan_in: int = 16, fan_out: int = 8, r: int = 4
) -> tuple[LayerSpec, torch.Tensor]:
    """A linear layer whose LoRA branch is as large as its base branch (scaling 1), and its input."""
    g = torch.Generator().manual_seed(7)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    adapter = AdapterSpec("default", r, float(r), rnd(r, fan_in), rnd(fan_out, r, scale=0.5))
    spec = LayerSpec("linear", dtype, rnd(fan_out, fan_in), (adapter,), base_bias=rnd(fan_out))
    return spec, rnd(3, fan_in)


def _scaled_delta(spec: LayerSpec, factor: float) -> LayerSpec:
    """The same spec with every adapter's delta multiplied exactly by ``factor`` (through alpha)."""
    return spec.with_adapters(tuple(replace(a, alpha=a.alpha * factor) for a in spec.adapters))


def _ratio(actual: torch.Tensor, expected: Expected, arith: Arithmetic) -> float:
    return measure(actual, expected, arith, quantity="t", inner=16, rank=4).ratio


def test_hand_made_spec_has_comparable_branches() -> None:
    """Precondition of the perturbation tests: the LoRA part is not negligible against the base."""
    spec, x = _lora_spec(F64)
    base = oracle.forward(spec, x, adapters=[])
    full = oracle.forward(spec, x)
    lora = (full - base).abs()
    assert 0.2 < float(lora.norm() / base.norm()) < 5.0


@pytest.mark.parametrize("dtype", [F64, F32])
def test_flags_delta_scaled_by_1001(dtype: torch.dtype) -> None:
    """A delta off by 1e-3 relative (computed correctly otherwise, then rounded) exceeds the bound;
    the correct output of the reference on the very same spec does not."""
    spec, x = _lora_spec(dtype)
    arith = Arithmetic.for_dtype(dtype)
    exp = forward_expected(spec, x, arith)
    assert _ratio(TARGET.build(spec).forward(x), exp, arith) <= 1.0
    wrong = oracle.forward(_scaled_delta(spec, 1.001), x).to(dtype)
    assert _ratio(wrong, exp, arith) > (10.0 if dtype == F32 else 1e6)
    # The merged weights too: W + 1.001 * delta, rounded once.
    w_exp = weights_expected(spec, ["default"], arith)
    h = TARGET.build(spec)
    h.merge()
    assert _ratio(h.weights()["weight"], w_exp["weight"], arith) <= 1.0
    wrong_w = oracle.merged_weights(_scaled_delta(spec, 1.001), ["default"])["weight"].to(dtype)
    assert _ratio(wrong_w, w_exp["weight"], arith) > 10.0


def test_relative_1e3_perturbation_in_float32_is_far_out() -> None:
    """Perturbing every output by 1e-3 relative in float32 is two orders of magnitude past the bound,
    while the correctly rounded exact value is well inside it."""
    spec, x = _lora_spec(F32)
    arith = Arithmetic.for_dtype(F32)
    exp = forward_expected(spec, x, arith)
    assert _ratio(exp.exact.to(F32), exp, arith) <= 0.1
    assert _ratio((exp.exact * (1 + 1e-3)).to(F32), exp, arith) > 100.0


def test_half_precision_tolerates_what_it_must() -> None:
    """In bfloat16 a 1e-3 delta error is below one rounding (u = 2^-8): a correct bf16 implementation
    makes errors that large, so the model must not flag it (a fixed tight tolerance would)."""
    spec, x = _lora_spec(BF16)
    arith = Arithmetic.for_dtype(BF16)
    exp = forward_expected(spec, x, arith)
    assert _ratio(oracle.forward(_scaled_delta(spec, 1.001), x).to(BF16), exp, arith) <= 1.0
    assert _ratio(oracle.forward(_scaled_delta(spec, 1.1), x).to(BF16), exp, arith) > 1.0


def test_bf16_merge_with_half_delta() -> None:
    """A bfloat16 merge done wholly in bfloat16 (three roundings: B @ A, * s, + W) is what a correct
    GPU implementation does, so the merged-weights bound must cover it."""
    arith = Arithmetic.for_dtype(BF16)
    worst = 0.0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        W = (torch.randn(64, 16, generator=g) / 8).to(BF16)
        A, B = torch.randn(1, 16, generator=g).to(BF16), torch.randn(64, 1, generator=g).to(BF16)
        spec = LayerSpec("linear", BF16, W, (AdapterSpec("default", 1, 1.5, A, B),))
        merged = W + (B @ A) * 1.5
        worst = max(worst, _ratio(merged, weights_expected(spec, ["default"], arith)["weight"], arith))
    assert worst <= 1.0, f"max ratio {worst:.3g}"


def test_forward_bound_has_the_documented_constants() -> None:
    """Unmerged forward: (gamma_{K+r}(u_a) + (3 + 2n) u_s) M, M from absolute values (module docstring)."""
    spec, x = _lora_spec(F32)
    arith = Arithmetic.for_dtype(F32)
    exp = forward_expected(spec, x, arith)
    k, r = 16, 4
    coeff = gamma(k + r, 2.0**-24) + 5 * 2.0**-24
    mag = oracle.forward(spec, x, magnitude=True)
    assert torch.allclose(exp.magnitude, mag, rtol=0, atol=0)
    assert torch.allclose(exp.bound, coeff * mag, rtol=1e-14, atol=0)
    assert (mag >= exp.exact.abs()).all()


def test_roundtrip_bound_grows_linearly_with_cycles() -> None:
    """c merge/unmerge cycles are 2c rounded writes: the bound is 2c times one merge's."""
    spec, _ = _lora_spec(BF16)
    arith = Arithmetic.for_dtype(BF16)
    one = weights_expected(spec, ["default"], arith)["weight"]
    for c in (1, 3, 30):
        rt = roundtrip_expected(spec, ["default"], arith, cycles=c)["weight"]
        assert torch.allclose(rt.bound, 2 * c * one.bound, rtol=1e-12, atol=0)
        assert torch.equal(rt.exact, spec.weight.to(F64))


# ----------------------------------------------------------------------------- building blocks


def test_unit_roundoff_exact_values() -> None:
    assert unit_roundoff(F64) == 2.0**-53
    assert unit_roundoff(F32) == 2.0**-24
    assert unit_roundoff(BF16) == 2.0**-8
    assert unit_roundoff(F16) == 2.0**-11
    assert TF32_UNIT_ROUNDOFF == 2.0**-11
    for dt in (F32, BF16, F16):  # u is half the machine epsilon
        assert unit_roundoff(dt) == torch.finfo(dt).eps / 2


def test_gamma_exact_values() -> None:
    """gamma_k = k u / (1 - k u); k < 1 counts as 1; no guarantee (inf) once k u >= 1."""
    u = 2.0**-24
    assert gamma(1, u) == u / (1 - u)
    assert gamma(10, u) == 10 * u / (1 - 10 * u)
    assert gamma(0, u) == gamma(1, u)
    assert gamma(3, 0.25) == 3.0
    assert gamma(4, 0.25) == math.inf
    assert gamma(2**11, 2.0**-11) == math.inf
    assert gamma(2**11 - 1, 2.0**-11) == (2**11 - 1) * 2.0**-11 / 2.0**-11
    assert gamma(5, u) < gamma(6, u)


def test_arithmetic_for_dtype() -> None:
    """Half types accumulate in float32 unless reduced-precision reduction is on; TF32 only touches
    float32 (u_acc 2^-11); float64 is never changed."""
    cases = {
        (F64, False, False): 2.0**-53,
        (F64, True, True): 2.0**-53,
        (F32, False, False): 2.0**-24,
        (F32, True, False): 2.0**-11,
        (F32, False, True): 2.0**-24,
        (BF16, False, False): 2.0**-24,
        (BF16, False, True): 2.0**-8,
        (BF16, True, False): 2.0**-24,
        (F16, False, False): 2.0**-24,
        (F16, False, True): 2.0**-11,
    }
    for (dt, tf32, rpr), u_acc in cases.items():
        a = Arithmetic.for_dtype(dt, tf32=tf32, reduced_precision_reduction=rpr)
        assert (a.dtype, a.u_acc) == (dt, u_acc), (dt, tf32, rpr)
        assert a.u == unit_roundoff(dt)
        assert a.gamma(7) == gamma(7, u_acc)


def test_inner_dim() -> None:
    """K of the base product: in-features, one row for an embedding, the conv window."""
    w = torch.zeros(6, 5)
    lin = LayerSpec("linear", F32, w, ())
    emb = LayerSpec("embedding", F32, w, ())
    conv = ConvOptions((3, 2), (1, 1), (0, 0), (1, 1), 2)
    c2 = LayerSpec("conv2d", F32, torch.zeros(4, 3, 3, 2), (), conv=conv)
    mha = LayerSpec("mha", F32, torch.zeros(12, 4), (), num_heads=2, out_weight=torch.zeros(4, 4))
    assert [inner_dim(s) for s in (lin, emb, c2, mha)] == [5, 1, 18, 4]


# ----------------------------------------------------------------------------- measure


def _exp(exact: list[float], bound: list[float], mag: list[float] | None = None) -> Expected:
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    return Expected(t(exact), t(bound), t(mag if mag is not None else [abs(e) + 1 for e in exact]))


def _measure(actual: list[float], expected: Expected, dtype: torch.dtype = F32):
    return measure(
        torch.tensor(actual, dtype=dtype),
        expected,
        Arithmetic.for_dtype(dtype),
        quantity="q",
        inner=3,
        rank=1,
    )


def test_measure_reports_the_worst_element() -> None:
    s = _measure([1.5, 2.0], _exp([1.0, 1.0], [1.0, 0.5], [4.0, 8.0]))
    assert s.ratio == 2.0 and s.error == 1.0 and s.bound == 0.5 and s.magnitude == 8.0
    assert s.err_u == 1.0 / (2.0**-24 * 8.0)
    assert (s.inner_dim, s.rank, s.quantity, s.reference) == (3, 1, "q", 1.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_measure_nonfinite_actual_is_infinite_ratio(bad: float) -> None:
    """A NaN/Inf where the exact value is finite is the worst error there is, whatever the bound."""
    s = _measure([1.0, bad], _exp([1.0, 1.0], [1e30, 1e30]))
    assert s.ratio == math.inf and s.error == math.inf


def test_measure_exact_zeros_with_zero_bound() -> None:
    """Zero bound (exact zeros, zero magnitude): exactly 0 passes with ratio 0, anything else is inf."""
    zero = _exp([0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    ok = _measure([0.0, -0.0], zero)
    assert ok.ratio == 0.0 and ok.err_u == 0.0
    tiny = _measure([0.0, 1e-30], zero)
    assert tiny.ratio == math.inf and tiny.err_u == math.inf


def test_measure_exact_match_with_nonzero_bound_is_zero() -> None:
    assert _measure([3.0, -2.0], _exp([3.0, -2.0], [1e-3, 1e-3])).ratio == 0.0


def test_measure_shape_mismatch_raises() -> None:
    with pytest.raises(AssertionError, match="shape"):
        _measure([1.0, 2.0, 3.0], _exp([1.0, 2.0], [1.0, 1.0]))
    with pytest.raises(AssertionError):
        measure(
            torch.zeros(2, 1),
            _exp([0.0, 0.0], [1.0, 1.0]),
            Arithmetic.for_dtype(F32),
            quantity="q",
            inner=1,
            rank=1,
        )


def test_measure_empty_is_zero() -> None:
    e = Expected(torch.zeros(0, dtype=F64), torch.zeros(0, dtype=F64), torch.zeros(0, dtype=F64))
    assert _measure([], e).ratio == 0.0
