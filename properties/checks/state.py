"""State changes: what merge, unmerge and safe_merge leave behind."""

from __future__ import annotations

import warnings

import torch
from hypothesis import strategies as st

from properties import oracle
from properties.catalogue import Context, PropertyFailure, assert_identical, prop
from properties.precision import forward_expected, roundtrip_expected, weights_expected
from properties.strategies import Draw


def _multi(caps, kind, dtype) -> Draw:
    return Draw(kind=kind, dtype=dtype, options=caps.options | {"multi_adapter"})


def _quiet(fn, *args, **kwargs):
    """Run an operation whose warning (e.g. 'already merged') is allowed, not asserted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@prop(
    "merge_roundtrip",
    "merge -> unmerge restores the base weights: bit-exact where promised, else within the round-trip bound.",
    requires={"merge", "unmerge"},
)
def merge_roundtrip(ctx: Context) -> None:
    h = ctx.build()
    before = {k: v.clone() for k, v in h.weights().items()}
    h.merge()
    h.unmerge()
    if h.merged_adapters():
        raise PropertyFailure(f"after unmerge, merged_adapters = {h.merged_adapters()}")
    after = h.weights()
    if "exact_unmerge" in ctx.target.capabilities().operations:
        assert_identical(before, after, "exact unmerge")
    ctx.check_weights(after, roundtrip_expected(ctx.spec, ctx.spec.active_adapters, ctx.arith), "round trip")
    ctx.check(h.forward(ctx.x), forward_expected(ctx.spec, ctx.x, ctx.arith), "output after round trip")


@prop(
    "merge_cycle_drift",
    "Repeated merge/unmerge cycles drift no more than the precision model allows for that many cycles.",
    requires={"merge", "unmerge"},
    needs_data=True,
    cost=3.0,  # up to 30 cycles per example
)
def merge_cycle_drift(ctx: Context) -> None:
    cycles = ctx.draw(st.sampled_from((1, 3, 10, 30)), "cycles")
    h = ctx.build()
    for _ in range(cycles):
        h.merge()
        h.unmerge()
    expected = roundtrip_expected(ctx.spec, ctx.spec.active_adapters, ctx.arith, cycles=cycles)
    ctx.check_weights(h.weights(), expected, f"weights after {cycles} cycles", cycles=cycles)


@prop("merge_idempotent", "Merging an adapter that is already merged changes nothing.", requires={"merge"})
def merge_idempotent(ctx: Context) -> None:
    h = ctx.build()
    h.merge()
    once = h.snapshot()
    _quiet(h.merge)
    assert_identical(once, h.snapshot(), "second merge")
    _quiet(h.merge, adapter_names=list(ctx.spec.active_adapters))
    assert_identical(once, h.snapshot(), "second merge naming the adapters")


@prop(
    "unmerge_noop",
    "unmerge() when nothing is merged changes nothing, before and after a merge/unmerge.",
    requires={"unmerge"},
)
def unmerge_noop(ctx: Context) -> None:
    h = ctx.build()
    fresh = h.snapshot()
    _quiet(h.unmerge)
    assert_identical(fresh, h.snapshot(), "unmerge on a fresh layer")
    if "merge" in ctx.target.capabilities().operations:
        h.merge()
        h.unmerge()
        settled = h.snapshot()
        _quiet(h.unmerge)
        assert_identical(settled, h.snapshot(), "second unmerge")


def _finite_verdict(ctx: Context) -> bool | None:
    """Whether the merged weights are finite in the dtype: True, False, or None when the exact value
    is within the precision bound of the overflow threshold (either answer is then correct)."""
    names = ctx.spec.active_adapters
    exact = oracle.merged_weights(ctx.spec, names)
    bounds = weights_expected(ctx.spec, names, ctx.arith)
    limit = torch.finfo(ctx.spec.dtype).max
    # The model computes deltas in float32 (float64 for float64): a delta beyond that range cannot be
    # computed, so raising is right even where DoRA's normalisation would bring the result back.
    compute_max = torch.finfo(torch.float64 if ctx.spec.dtype == torch.float64 else torch.float32).max
    delta_overflows = any(
        (oracle.lora_delta(ctx.spec, ctx.spec.adapter(n)).abs() > compute_max).any() for n in names
    )
    # Round-to-nearest overflows past max + half an ulp at the top binade.
    threshold = limit * (1 + ctx.arith.u)
    verdict: bool | None = True
    for k, v in exact.items():
        if not torch.isfinite(v).all() or (v.abs() - bounds[k].bound > threshold).any():
            return False
        if (v.abs() + bounds[k].bound >= threshold).any():
            verdict = None
    return None if delta_overflows else verdict


def _safe_draw(caps, kind, dtype) -> Draw:
    return Draw(kind=kind, dtype=dtype, options=caps.options)


@prop(
    "safe_merge_atomic",
    "safe_merge raises ValueError exactly when the merged weights would be non-finite, leaves everything "
    "bit-identical when it raises, and otherwise merges exactly like the unsafe path.",
    requires={"merge", "safe_merge"},
    draw=_safe_draw,
    hostile=True,
    needs_data=True,
)
def safe_merge_atomic(ctx: Context) -> None:
    clean = ctx.draw(st.booleans(), "without hostile entry")
    spec = ctx.clean_spec if clean else ctx.spec
    finite = _finite_verdict(Context(ctx.target, type(ctx.example)(spec, ctx.x), ctx.arith))
    h = ctx.target.build(spec)
    before = h.snapshot()
    try:
        h.merge(safe=True)
    except ValueError as e:
        if finite is True:
            raise PropertyFailure(f"safe merge raised on finite weights: {e}") from None
        assert_identical(before, h.snapshot(), "state after a refused safe merge")
        return
    if finite is False:
        raise PropertyFailure("safe merge accepted weights that are non-finite in the dtype")
    unsafe = ctx.target.build(spec)
    unsafe.merge()
    assert_identical(unsafe.weights(), h.weights(), "safe vs unsafe merge weights")
    if h.merged_adapters() != unsafe.merged_adapters():
        raise PropertyFailure(f"merged_adapters {h.merged_adapters()} != unsafe {unsafe.merged_adapters()}")


@prop(
    "dtype_device_preserved",
    "merge and unmerge keep every base parameter's dtype, device and shape.",
    requires={"merge", "unmerge"},
)
def dtype_device_preserved(ctx: Context) -> None:
    h = ctx.build()
    ref = {k: (v.dtype, v.device, tuple(v.shape)) for k, v in h.weights().items()}
    want = {
        k: (ctx.spec.dtype, torch.device(ctx.spec.device), tuple(v.shape))
        for k, v in ctx.spec.base_tensors().items()
    }
    for stage in ("built", "merged", "unmerged"):
        if stage == "merged":
            h.merge()
        elif stage == "unmerged":
            h.unmerge()
        got = {k: (v.dtype, v.device, tuple(v.shape)) for k, v in h.weights().items()}
        if got != ref or got != want:
            raise PropertyFailure(f"{stage}: parameters are {got}, expected {want}")


@prop(
    "merge_subset",
    "merge(adapter_names=S) merges exactly S: merged_adapters == S, weights == W + sum over S of the deltas.",
    requires={"merge", "merge_subset"},
    draw=_multi,
    needs_data=True,
)
def merge_subset(ctx: Context) -> None:
    names = list(ctx.spec.adapter_names)
    subset = ctx.draw(
        st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=len(names)), "subset"
    )
    h = ctx.build()
    h.merge(adapter_names=subset)
    if sorted(h.merged_adapters()) != sorted(subset):
        raise PropertyFailure(f"merged_adapters = {h.merged_adapters()}, asked to merge {subset}")
    ctx.check_weights(
        h.weights(), weights_expected(ctx.spec, subset, ctx.arith), f"weights after merging {subset}"
    )
    ctx.check(h.forward(ctx.x), forward_expected(ctx.spec, ctx.x, ctx.arith), "output with the rest unmerged")


@prop(
    "merge_order",
    "Merging several adapters in any order gives the same weights up to rounding.",
    requires={"merge", "merge_subset"},
    draw=_multi,
    needs_data=True,
)
def merge_order(ctx: Context) -> None:
    names = list(ctx.spec.adapter_names)
    order = ctx.draw(st.permutations(names), "order")
    h = ctx.build()
    for n in order:
        h.merge(adapter_names=[n])
    if h.merged_adapters() != list(order):
        raise PropertyFailure(f"merged_adapters = {h.merged_adapters()} after merging in order {list(order)}")
    ctx.check_weights(
        h.weights(), weights_expected(ctx.spec, names, ctx.arith), f"weights merged in order {order}"
    )
