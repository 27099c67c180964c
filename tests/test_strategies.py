"""The strategies draw only what a target declared, exact and non-degenerate values, valid layers,
hostile entries exactly where they say, and replay bit for bit from a seed.

A strategy that drew an undeclared option would report a capability gap as a bug; one that drew B = 0
or a geometry torch rejects would make properties vacuous or crash; one that did not replay would make
every failure report unreproducible.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st
from torch import nn

from properties import oracle
from properties.catalogue import all_properties
from properties.profiles import PROFILES
from properties.runner import RunOptions, run_cell
from properties.spec import CONV_KINDS, LAYER_KINDS, Example, LayerSpec
from properties.strategies import Draw, Hostile, examples, plant
from properties.targets.protocol import OPTIONS
from properties.targets.reference import TARGET, base_module

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
FAST = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.generate, Phase.shrink),
)


def _tensors(spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Every float tensor of a spec by a readable name."""
    out = {f"base.{k}": v for k, v in spec.base_tensors().items()}
    for a in spec.adapters:
        out |= {f"{a.name}.{k}": v for k, v in a.tensors().items()}
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@st.composite
def _draws(draw: st.DrawFn, kinds=LAYER_KINDS, dtypes=DTYPES) -> Draw:
    """A Draw with a random subset of the options, adapter cap, dropout mode, batch and bias needs."""
    return Draw(
        kind=draw(st.sampled_from(kinds)),
        dtype=draw(st.sampled_from(dtypes)),
        options=frozenset(draw(st.sets(st.sampled_from(sorted(OPTIONS))))),
        max_adapters=draw(st.integers(1, 3)),
        dropout=draw(st.sampled_from(("none", "any", "positive"))),
        min_batch=draw(st.integers(0, 1)),
        need_bias=draw(st.booleans()),
    )


@FAST
@given(st.data())
def test_only_declared_options_are_drawn(data: st.DataObject) -> None:
    """No DoRA, rsLoRA, bias, groups... unless declared; the other Draw knobs are honoured too."""
    d = data.draw(_draws())
    spec = data.draw(examples(d)).spec
    allowed = d.options | ({"dropout"} if d.dropout == "positive" else set())
    assert spec.options <= allowed, spec.options - allowed
    assert 1 <= len(spec.adapters) <= d.max_adapters
    if "multi_adapter" not in d.options:
        assert len(spec.adapters) == 1
    ps = [a.dropout for a in spec.adapters]
    if d.dropout == "none":
        assert ps == [0.0] * len(ps)
    if d.dropout == "positive":
        assert all(0 < p < 1 for p in ps)
    if d.need_bias and d.kind != "embedding":
        assert spec.base_bias is not None
    assert (spec.kind, spec.dtype, spec.device) == (d.kind, d.dtype, "cpu")


_REACHABLE = {
    "linear": ("multi_adapter", "rslora", "dropout", "dora", "lora_bias", "fan_in_fan_out"),
    "conv2d": (
        "multi_adapter",
        "rslora",
        "dropout",
        "conv_groups",
        "conv_dilation",
        "padding_mode",
        "padding_same",
    ),
    "embedding": ("multi_adapter", "rslora", "dropout", "padding_idx"),
}


@pytest.mark.parametrize("kind,option", [(k, o) for k, opts in _REACHABLE.items() for o in opts])
def test_declared_options_are_reachable(kind: str, option: str) -> None:
    """Every declared option is actually drawn for the kinds it applies to, so no property is vacuous.

    ``find`` searches for an example with the option (deterministically) rather than counting what a
    fixed number of examples happened to hold, which depended on the order tests ran in."""
    found = find(
        examples(Draw(kind, torch.float32, OPTIONS, dropout="any")),
        lambda ex: option in ex.spec.options,
        settings=settings(FAST, max_examples=500),
    )
    assert option in found.spec.options


@FAST
@given(st.data())
def test_tensors_exact_finite_and_adapters_nonzero(data: st.DataObject) -> None:
    """Every tensor is already in the dtype (a float64 round trip is the identity), finite, and every
    adapter tensor is non-zero (B = 0 would make every LoRA property vacuous)."""
    d = data.draw(_draws())
    ex = data.draw(examples(d))
    spec = ex.spec
    tensors = _tensors(spec)
    if ex.x.is_floating_point():
        tensors["x"] = ex.x
    for name, t in tensors.items():
        assert t.dtype == spec.dtype, name
        assert _same_bits(t.to(torch.float64).to(spec.dtype), t), name
        assert torch.isfinite(t).all(), name
    for a in spec.adapters:
        for key, t in a.tensors().items():
            assert t.abs().max() > 0, f"{a.name}.{key} is all zeros"
        if a.magnitude is not None:
            assert (a.magnitude > 0).all()
        assert a.alpha != a.r  # scaling 1 would hide alpha/r <-> r/alpha swaps
    if spec.kind == "embedding":
        assert ex.x.dtype == torch.int64
        assert int(ex.x.min()) >= 0 and int(ex.x.max()) < spec.weight.shape[0]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on even kernels, not a failure
@FAST
@given(st.data())
def test_conv_geometry_is_valid(data: st.DataObject) -> None:
    """The drawn conv builds in torch, runs on the drawn input, and the LoRA factors fit it."""
    d = data.draw(_draws(kinds=CONV_KINDS, dtypes=(torch.float32,)))
    ex = data.draw(examples(d))
    spec, c = ex.spec, ex.spec.conv
    assert c is not None and len(c.kernel_size) == int(spec.kind[-2]) == ex.x.dim() - 2
    out_c, in_per_group = spec.weight.shape[:2]
    assert out_c % c.groups == 0 and ex.x.shape[1] == in_per_group * c.groups
    if c.padding == "same":
        assert all(s == 1 for s in c.stride)
    for a in spec.adapters:
        assert a.r % c.groups == 0
        assert a.A.shape == (a.r, in_per_group, *c.kernel_size)
        assert a.B.shape == (out_c, a.r // c.groups, *([1] * len(c.kernel_size)))
    y = base_module(spec)(ex.x)
    assert y.shape[:2] == (ex.x.shape[0], out_c) and y.numel() > 0
    lora = TARGET.build(spec).forward(ex.x)
    assert lora.shape == y.shape and torch.isfinite(lora).all()


@FAST
@given(st.data())
def test_mha_geometry_is_valid(data: st.DataObject) -> None:
    """E is divisible by the heads, the packed shapes match, and torch's attention runs on x."""
    d = data.draw(_draws(kinds=("mha",), dtypes=(torch.float32,)))
    ex = data.draw(examples(d))
    spec = ex.spec
    E = spec.weight.shape[1]
    assert E % spec.num_heads == 0
    assert spec.weight.shape == (3 * E, E) and spec.out_weight.shape == (E, E)
    assert ex.x.dim() == 3 and ex.x.shape[-1] == E
    for a in spec.adapters:
        assert a.A.shape == (a.r, E) and a.B.shape == (3 * E, a.r)
        assert a.out_A.shape == (a.r, E) and a.out_B.shape == (E, a.r)
    m = base_module(spec)
    assert isinstance(m, nn.MultiheadAttention) and m.num_heads == spec.num_heads
    y = m(ex.x, ex.x, ex.x, need_weights=False)[0]
    assert y.shape == ex.x.shape and torch.isfinite(y).all()


@FAST
@given(st.data())
def test_every_drawn_example_runs_on_the_reference(data: st.DataObject) -> None:
    """Whatever the kind and options, the reference builds the spec and its output has the oracle's
    shape: the strategy never hands targets an invalid layer."""
    d = data.draw(_draws(dtypes=(torch.float32, torch.float64)))
    ex = data.draw(examples(d))
    y = TARGET.build(ex.spec).forward(ex.x)
    assert y.shape == oracle.forward(ex.spec, ex.x).shape


# ----------------------------------------------------------------------------- hostile entries


@FAST
@given(st.data())
def test_plant_nonfinite_puts_one_entry_where_it_says(data: st.DataObject) -> None:
    """NaN/Inf planting changes exactly the named entry of the named tensor of the named adapter,
    copies instead of mutating, and leaves every other tensor bit-identical."""
    d = data.draw(_draws())
    ex = data.draw(examples(d))
    idx = data.draw(st.integers(0, len(ex.spec.adapters) - 1))
    a = ex.spec.adapters[idx]
    h = Hostile(
        data.draw(st.sampled_from(("nan", "inf", "-inf"))),
        idx,
        data.draw(st.sampled_from(sorted(a.tensors()))),
        data.draw(st.integers(0, 2**16)),
    )
    before = {k: v.clone() for k, v in _tensors(ex.spec).items()}
    planted = plant(ex, h)
    after = _tensors(planted.spec)
    for k, v in _tensors(ex.spec).items():
        assert _same_bits(v, before[k]), f"plant mutated the original {k}"
    target = f"{a.name}.{h.tensor}"
    for k in before:
        if k != target:
            assert _same_bits(after[k], before[k]), k
    flat = after[target].reshape(-1)
    bad = (~torch.isfinite(flat)).nonzero().flatten().tolist()
    assert bad == [h.position % flat.numel()]
    value = float(flat[bad[0]])
    if h.kind == "nan":
        assert math.isnan(value)
    else:
        assert value == (math.inf if h.kind == "inf" else -math.inf)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[bad[0]] = False
    assert _same_bits(flat[keep], before[target].reshape(-1)[keep])
    assert torch.equal(planted.x, ex.x)


def _check_overflow(ex: Example, h: Hostile) -> None:
    a = ex.spec.adapters[h.adapter]
    p = plant(ex, h).spec.adapters[h.adapter]
    changed_a = (_bits(p.A) != _bits(a.A)).reshape(a.r, -1).nonzero().tolist()
    changed_b = (_bits(p.B) != _bits(a.B)).reshape(a.B.shape[0], -1).nonzero().tolist()
    assert len(changed_a) == 1 and len(changed_b) == 1
    (j, _), (o, jb) = changed_a[0], changed_b[0]
    groups = ex.spec.conv.groups if ex.spec.conv is not None else 1
    per, out_per = a.r // groups, a.B.shape[0] // groups
    assert j == h.position % a.r and jb == j % per and o // out_per == j // per  # one rank-1 term
    v_a, v_b = p.A.reshape(a.r, -1)[tuple(changed_a[0])], p.B.reshape(a.B.shape[0], -1)[o, jb]
    assert bool(torch.isfinite(v_a)) and bool(torch.isfinite(v_b)), "overflow entries must be finite"
    delta = oracle.lora_delta(ex.spec, p)
    assert float(delta.abs().max()) >= 3.9 * torch.finfo(ex.spec.dtype).max


@FAST
@given(st.data())
def test_plant_overflow_is_one_finite_rank1_term(data: st.DataObject) -> None:
    """Overflow planting writes one finite value into A and one into B, paired in one rank-1 term
    (same group for grouped convs), so that term of s B A reaches ~4x the dtype's max."""
    d = data.draw(_draws(dtypes=(torch.float32, torch.bfloat16, torch.float16)))
    ex = data.draw(examples(d))
    idx = data.draw(st.integers(0, len(ex.spec.adapters) - 1))
    _check_overflow(
        ex, Hostile("overflow", idx, data.draw(st.sampled_from(("A", "B"))), data.draw(st.integers(0, 2**16)))
    )


def test_plant_overflow_float64_is_finite() -> None:
    for ex in _collect(0, Draw("linear", torch.float64, frozenset())):
        _check_overflow(ex, Hostile("overflow", 0, "A", 3))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Hypothesis' failure explanation imports libcst
@FAST
@given(st.data())
def test_hostile_strategy_returns_the_clean_example(data: st.DataObject) -> None:
    """The runner plants the Hostile itself and keeps the clean spec for the 'no hostile entry' branch,
    so the strategy must hand back the example before planting."""
    ex, h = data.draw(examples(Draw("linear", torch.float32, frozenset()), hostile=True))
    assert isinstance(h, Hostile)
    for name, t in _tensors(ex.spec).items():
        assert torch.isfinite(t).all(), f"{name} already holds the hostile entry"


# ----------------------------------------------------------------------------- replay


def _collect(seed: int, d: Draw) -> list[Example]:
    """The examples Hypothesis generates for ``d`` under a seed, as the runner's cells draw them."""
    out: list[Example] = []

    @settings(max_examples=15, database=None, deadline=None, phases=[Phase.generate])
    @hyp_seed(seed)
    @given(examples(d))
    def run(ex: Example) -> None:
        out.append(ex)

    run()
    return out


def _same_example(a: Example, b: Example) -> bool:
    ta, tb = _tensors(a.spec), _tensors(b.spec)
    if ta.keys() != tb.keys() or a.describe() != b.describe():
        return False
    return all(_same_bits(ta[k], tb[k]) for k in ta) and torch.equal(a.x, b.x)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding", "mha"])
def test_same_seed_replays_bit_identical(kind: str) -> None:
    """Same Hypothesis seed -> the same examples, every tensor bit for bit; another seed differs."""
    d = Draw(kind, torch.bfloat16, TARGET.capabilities().options, dropout="any")
    first, again, other = _collect(123, d), _collect(123, d), _collect(124, d)
    assert len(first) == len(again) > 5
    assert all(_same_example(a, b) for a, b in zip(first, again, strict=True))
    assert not all(_same_example(a, b) for a, b in zip(first, other, strict=False))


def test_runner_failure_replays_to_the_same_example() -> None:
    """A failing cell run twice with the same seed shrinks to the same example and message."""
    from mutants import MUTANTS

    m = MUTANTS["delta_scaled_1001"]
    prop = all_properties()[m.cell.property]
    opts = RunOptions(target=m.target().name, profile=PROFILES["ci"], seed=5)
    r1, r2 = (run_cell(m.target(), prop, m.cell, opts) for _ in range(2))
    assert r1.status == r2.status == "failed"
    assert (r1.example, r1.message, r1.replay) == (r2.example, r2.message, r2.replay)
    assert "--seed 5" in r1.replay
