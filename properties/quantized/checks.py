"""The catalogue's properties on quantized bases: same ids and claims, quantization-aware expectations.

Importing this module extends the properties below to ``QUANT_KINDS``: a cell of a quantized kind runs
the function here, every other cell the original. Handles of quantized layers offer one method beyond
the protocol, ``quant_state() -> QuantState`` (the stored codes and scales in canonical form); every
expectation is computed from those codes by ``properties.quantized.model``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import torch
from hypothesis import strategies as st

from properties import oracle
from properties.catalogue import REGISTRY, Context, OutOfRange, PropertyFailure, assert_identical
from properties.precision import Expected, forward_expected, weights_expected
from properties.quantized import model
from properties.quantized.state import F64, QuantState
from properties.results import Sample
from properties.spec import HQQ_KINDS, QUANT_KINDS

MERGE_SHIFT = "merge shift"
"""Sample quantity prefix of the tolerance table's rows (``merge shift [nf4 b64 dq]``)."""


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _state(ctx: Context, h) -> QuantState:
    get = getattr(h, "quant_state", None)
    if get is None:
        raise PropertyFailure(f"{ctx.target.name}: a quantized layer handle must offer quant_state()")
    return get()


def _int8_acts(ctx: Context) -> bool:
    return ctx.spec.quant.kind == "bnb_int8"


def _fwd(ctx: Context, qs: QuantState, adapters=None, merged=(), bias_writes: int = 0) -> Expected:
    """Expected output with the base stored as ``qs`` and ``adapters`` unmerged. ``merged``: adapters
    whose LoRA bias is in the base bias (added in floating point, not quantized); ``bias_writes``:
    float roundings of the base bias so far (merges and unmerges), each ``u |b'|``."""
    spec = ctx.spec
    with_bias = [n for n in merged if spec.adapter(n).bias is not None]
    if with_bias:
        spec = replace(spec, base_bias=oracle.merged_weights(spec, with_bias)["bias"])
    exp = model.forward_expected_q(
        spec, qs, ctx.x, ctx.arith, adapters=adapters, int8_activations=_int8_acts(ctx)
    )
    if bias_writes and ctx.spec.base_bias is not None:
        names = [n for n in ctx.spec.adapter_names if ctx.spec.adapter(n).bias is not None]
        mag = oracle.merged_weights(ctx.spec, names, magnitude=True)["bias"]
        exp = Expected(exp.exact, exp.bound + bias_writes * 2 * ctx.arith.u * mag, exp.magnitude)
    return exp


def _check_format(ctx: Context, qs: QuantState, stage: str) -> None:
    q = ctx.spec.quant
    want = {"bnb_int8": "bnb int8 per-row", "torchao_int8": "torchao int8 per-row"}.get(q.kind) or (
        q.label
        if q.kind in HQQ_KINDS or q.kind == "torchao_nf4"
        else f"bnb {q.kind[4:]} b{q.block}" + (" dq" if q.double_quant else "")
    )
    if qs.format != want or tuple(qs.shape) != tuple(ctx.spec.weight.shape):
        raise PropertyFailure(
            f"{stage}: base stored as {qs.format!r} {tuple(qs.shape)}, expected {want!r} "
            f"{tuple(ctx.spec.weight.shape)} (quantization state lost)"
        )


def _check_requant(ctx: Context, qs_out: QuantState, exp: Expected, scales: Expected | None, what: str):
    """The stored codes land on the grid (and, for absmax quantizers, the scales are the new absmax)."""
    ctx.check(qs_out.decode(), exp, f"{what} (quantized weights)")
    if scales is not None:
        ctx.check(qs_out.scale, scales, f"{what} (block scales)")


def _initial(ctx: Context, h) -> QuantState:
    """The freshly built layer's state: the right format, and the quantizer applied correctly to W."""
    qs = _state(ctx, h)
    _check_format(ctx, qs, "built")
    w = ctx.spec.weight.to("cpu", F64)
    delta = (qs.input_roundoff + 3 * model.U32) * w.abs()
    exp = Expected(w, model.requant_bound(qs, w, delta), w.abs())
    _check_requant(ctx, qs, exp, model.scale_expected(qs, w, delta), "initial quantization")
    return qs


def reference_forward(ctx: Context) -> None:
    h = ctx.build()
    qs = _initial(ctx, h)
    ctx.check(h.forward(ctx.x), _fwd(ctx, qs), "unmerged output")


def _merge_shift_sample(
    ctx: Context, qs0: QuantState, y0, y1, unmerged: Expected, merged: Expected, w_bound
) -> None:
    """Merged vs unmerged outputs against the model, and a row for the quantized tolerance table."""
    names = ctx.spec.active_adapters
    bound = unmerged.bound + merged.bound + model.weight_effect(ctx.x, w_bound)
    shift = (y1.detach().to("cpu", F64) - y0.detach().to("cpu", F64)).abs()
    both = Expected(y0.detach().to("cpu", F64), bound, unmerged.magnitude)
    ctx.check(y1, both, "merged vs unmerged output")
    lora = unmerged.exact - _fwd(ctx, qs0, adapters=[]).exact  # the LoRA's own contribution
    ctx.samples.append(
        Sample(
            ratio=float((shift / bound).nan_to_num(0.0).max()) if shift.numel() else 0.0,
            err_u=math.nan,
            inner_dim=ctx.spec.weight.shape[1],
            rank=sum(ctx.spec.adapter(n).r for n in names),
            quantity=f"{MERGE_SHIFT} [{ctx.spec.quant.label}]",
            error=float(shift.max()) if shift.numel() else 0.0,
            bound=float(bound.max()) if bound.numel() else 0.0,
            magnitude=float(unmerged.magnitude.max()) if shift.numel() else 0.0,
            reference=float(lora.abs().max()) if lora.numel() else 0.0,
        )
    )


def _exports_float(ctx: Context) -> bool:
    """The target's merge writes ``D(Wq) + ΔW`` into a float layer instead of requantizing (torchtune's
    QLoRA: the recipe's merged checkpoint is the dequantized state dict plus the delta)."""
    return "merge_to_float" in ctx.target.capabilities().operations


def _float_export(ctx: Context, h, qs0: QuantState, y0, unmerged_exp: Expected) -> None:
    """A merge that exports a float layer: its weights are the ordinary layer merge of ``D(Wq) + ΔW``
    (``weights_expected`` on the decoded weight) plus one rounding of the dequantized weight, and its
    output the ordinary forward of that layer."""
    names = ctx.spec.active_adapters
    dspec = model.decoded_spec(ctx.spec, qs0)
    d_abs = dspec.weight.abs()
    extra = model.dequant_rounding(qs0, ctx.arith.u) * d_abs
    wexp = weights_expected(dspec, names, ctx.arith)
    w = wexp["weight"]
    wexp["weight"] = Expected(w.exact, w.bound + extra, w.magnitude + d_abs)
    ctx.check_weights(h.weights(), wexp, "merged export (D(Wq) + delta)")
    y1 = h.forward(ctx.x)
    exp = forward_expected(dspec, ctx.x, ctx.arith)
    merged_exp = Expected(exp.exact, exp.bound + model.weight_effect(ctx.x, extra), exp.magnitude)
    ctx.check(y1, merged_exp, "merged output")
    _merge_shift_sample(ctx, qs0, y0, y1, unmerged_exp, merged_exp, torch.zeros_like(d_abs))


def merge_equivalence(ctx: Context) -> None:
    h = ctx.build()
    qs0 = _initial(ctx, h)
    names = ctx.spec.active_adapters
    unmerged_exp = _fwd(ctx, qs0)
    y0 = h.forward(ctx.x)
    ctx.check(y0, unmerged_exp, "unmerged output")
    if _exports_float(ctx):
        h.merge()
        _float_export(ctx, h, qs0, y0, unmerged_exp)
        return
    h.merge()
    qs1 = _state(ctx, h)
    _check_format(ctx, qs1, "merged")
    wexp, scales, wbound = model.merged_weight_expected(ctx.spec, qs0, qs1, names, ctx.arith)
    _check_requant(ctx, qs1, wexp, scales, "merged weights")
    y1 = h.forward(ctx.x)
    merged_exp = _fwd(ctx, qs1, adapters=[], merged=names, bias_writes=len(names))
    ctx.check(y1, merged_exp, "merged output")
    _merge_shift_sample(ctx, qs0, y0, y1, unmerged_exp, merged_exp, wbound)


def _cycle(ctx: Context, h, qs: QuantState, names, i: int) -> tuple[QuantState, torch.Tensor]:
    """One merge -> unmerge with both requantizations checked; returns the new state and the bound
    on how far this cycle may move the decoded weights."""
    h.merge()
    qs1 = _state(ctx, h)
    _check_format(ctx, qs1, f"cycle {i} merged")
    wexp, scales, b1 = model.merged_weight_expected(ctx.spec, qs, qs1, names, ctx.arith)
    _check_requant(ctx, qs1, wexp, scales, f"cycle {i} merge")
    h.unmerge()
    if h.merged_adapters():
        raise PropertyFailure(f"after unmerge, merged_adapters = {h.merged_adapters()}")
    qs2 = _state(ctx, h)
    _check_format(ctx, qs2, f"cycle {i} unmerged")
    uexp, uscales, b2 = model.unmerged_weight_expected(ctx.spec, qs1, qs2, names, ctx.arith)
    _check_requant(ctx, qs2, uexp, uscales, f"cycle {i} unmerge")
    return qs2, b1 + b2


def merge_roundtrip(ctx: Context) -> None:
    h = ctx.build()
    qs0 = _initial(ctx, h)
    qs2, bound = _cycle(ctx, h, qs0, ctx.spec.active_adapters, 1)
    d0 = qs0.decode()
    ctx.check(qs2.decode(), Expected(d0, bound, d0.abs()), "round trip (quantized weights)")
    out = _fwd(ctx, qs0, bias_writes=2 * len(ctx.spec.active_adapters))
    slack = model.weight_effect(ctx.x, bound)
    ctx.check(
        h.forward(ctx.x), Expected(out.exact, out.bound + slack, out.magnitude), "output after round trip"
    )


QUANT_CYCLES = (1, 2, 5, 10)
"""Cycle counts drawn on quantized bases (each cycle is two requantizations, each checked)."""


def merge_cycle_drift(ctx: Context) -> None:
    cycles = ctx.draw(st.sampled_from(QUANT_CYCLES), "cycles")
    h = ctx.build()
    qs0 = _initial(ctx, h)
    qs, total = qs0, torch.zeros(qs0.shape, dtype=F64)
    for i in range(cycles):
        qs, b = _cycle(ctx, h, qs, ctx.spec.active_adapters, i + 1)
        total = total + b
    d0 = qs0.decode()
    ctx.check(qs.decode(), Expected(d0, total, d0.abs()), f"weights after {cycles} cycles", cycles=cycles)


def _full_snapshot(ctx: Context, h) -> dict[str, object]:
    snap = dict(h.snapshot())
    qs = _state(ctx, h)
    if qs is None and _exports_float(ctx) and h.merged_adapters():
        return snap  # merged into a float export: no quantized state is left
    snap.update({k: v.clone() for k, v in qs.tensors().items()})
    snap["quant.format"] = qs.format
    return snap


def merge_idempotent(ctx: Context) -> None:
    h = ctx.build()
    h.merge()
    once = _full_snapshot(ctx, h)
    _quiet(h.merge)
    assert_identical(once, _full_snapshot(ctx, h), "second merge")
    _quiet(h.merge, adapter_names=list(ctx.spec.active_adapters))
    assert_identical(once, _full_snapshot(ctx, h), "second merge naming the adapters")


def unmerge_noop(ctx: Context) -> None:
    h = ctx.build()
    fresh = _full_snapshot(ctx, h)
    _quiet(h.unmerge)
    assert_identical(fresh, _full_snapshot(ctx, h), "unmerge on a fresh layer")
    h.merge()
    h.unmerge()
    settled = _full_snapshot(ctx, h)
    _quiet(h.unmerge)
    assert_identical(settled, _full_snapshot(ctx, h), "second unmerge")


def safe_merge_atomic(ctx: Context) -> None:
    clean = ctx.draw(st.booleans(), "without hostile entry")
    spec = ctx.clean_spec if clean else ctx.spec
    h = ctx.target.build(spec)
    qs0 = _state(ctx, h)
    merged = oracle.merged_weights(model.decoded_spec(spec, qs0), list(spec.active_adapters))
    limit = torch.finfo(torch.float32).max / 2
    finite = all(bool(torch.isfinite(v).all()) and bool((v.abs() < limit).all()) for v in merged.values())
    before = _full_snapshot(ctx, h)
    try:
        h.merge(safe=True)
    except ValueError as e:
        if finite:
            raise PropertyFailure(f"safe merge raised on finite weights: {e}") from None
        assert_identical(
            before, _full_snapshot(ctx, h), "state (codes and scales included) after a refused safe merge"
        )
        return
    if not finite:
        raise PropertyFailure("safe merge accepted weights that are non-finite")
    unsafe = ctx.target.build(spec)
    unsafe.merge()
    a, b = _state(ctx, h), _state(ctx, unsafe)
    assert_identical(b.tensors(), a.tensors(), "safe vs unsafe merge (codes and scales)")
    if h.merged_adapters() != unsafe.merged_adapters():
        raise PropertyFailure(f"merged_adapters {h.merged_adapters()} != unsafe {unsafe.merged_adapters()}")


def dtype_device_preserved(ctx: Context) -> None:
    """Here: the quantization state is preserved (a merged 4-bit layer is still 4-bit, same blocks),
    and outputs keep the compute dtype and device; a float export (``merge_to_float``) is a layer of
    the compute dtype."""
    h = ctx.build()
    exports = _exports_float(ctx)
    for stage in ("built", "merged") if exports else ("built", "merged", "unmerged"):
        if stage == "merged":
            h.merge()
        elif stage == "unmerged":
            h.unmerge()
        if exports and stage == "merged":  # a float export: a float layer in the compute dtype
            w = h.weights()["weight"]
            if w.dtype != ctx.spec.dtype or w.device != torch.device(ctx.spec.device):
                raise PropertyFailure(f"merged export is {w.dtype} on {w.device}, expected {ctx.spec.dtype}")
        else:
            _check_format(ctx, _state(ctx, h), stage)
        y = h.forward(ctx.x)
        if y.dtype != ctx.spec.dtype or y.device != torch.device(ctx.spec.device):
            raise PropertyFailure(f"{stage}: output is {y.dtype} on {y.device}, expected {ctx.spec.dtype}")


def merge_subset(ctx: Context) -> None:
    names = list(ctx.spec.adapter_names)
    subset = ctx.draw(
        st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=len(names)), "subset"
    )
    h = ctx.build()
    qs0 = _state(ctx, h)
    h.merge(adapter_names=subset)
    if sorted(h.merged_adapters()) != sorted(subset):
        raise PropertyFailure(f"merged_adapters = {h.merged_adapters()}, asked to merge {subset}")
    qs1 = _state(ctx, h)
    _check_format(ctx, qs1, "merged")
    wexp, scales, wbound = model.merged_weight_expected(ctx.spec, qs0, qs1, h.merged_adapters(), ctx.arith)
    _check_requant(ctx, qs1, wexp, scales, f"weights after merging {subset}")
    rest = [n for n in ctx.spec.active_adapters if n not in subset]
    exp = _fwd(ctx, qs1, adapters=rest, merged=subset, bias_writes=len(subset))
    ctx.check(h.forward(ctx.x), exp, "output with the rest unmerged")


def disable_exact(ctx: Context) -> None:
    spec, x = ctx.spec, ctx.x
    h = ctx.build()
    qs0 = _state(ctx, h)
    h.set_enabled(False)
    ctx.check(h.forward(x), _fwd(ctx, qs0, adapters=[]), "disabled output")
    h.set_enabled(True)
    ctx.check(h.forward(x), _fwd(ctx, qs0), "re-enabled output")
    if "merge" not in ctx.target.capabilities().operations or _exports_float(ctx):
        return  # after a float export there is no adapter left to disable
    h.merge()
    qs1 = _state(ctx, h)
    _check_format(ctx, qs1, "merged")
    _, _, b1 = model.merged_weight_expected(spec, qs0, qs1, spec.active_adapters, ctx.arith)
    h.set_enabled(False)
    y = h.forward(x)
    # The adapters must come back out of the weights: within one merge -> unmerge of the stored codes.
    qs2 = _state(ctx, h)
    _check_format(ctx, qs2, "disabled after merge")
    _, _, b2 = model.unmerged_weight_expected(spec, qs1, qs2, spec.active_adapters, ctx.arith)
    base = _fwd(ctx, qs0, adapters=[], bias_writes=2 * len(spec.active_adapters))
    slack = model.weight_effect(x, b1 + b2)
    ctx.check(y, Expected(base.exact, base.bound + slack, base.magnitude), "disabled output after merge")


QUANTIZED = {
    "reference_forward": reference_forward,
    "merge_equivalence": merge_equivalence,
    "merge_roundtrip": merge_roundtrip,
    "merge_cycle_drift": merge_cycle_drift,
    "merge_idempotent": merge_idempotent,
    "unmerge_noop": unmerge_noop,
    "safe_merge_atomic": safe_merge_atomic,
    "dtype_device_preserved": dtype_device_preserved,
    "merge_subset": merge_subset,
    "disable_exact": disable_exact,
}


def _dispatch(original, quantized):
    def check(ctx: Context) -> None:
        if ctx.spec.quant is None:
            return original(ctx)
        try:
            quantized(ctx)
        except model.NoChainBound as e:  # no claim can be made: the example is set aside and counted
            raise OutOfRange(str(e)) from None

    check.__doc__ = original.__doc__
    check.__name__ = getattr(original, "__name__", "check")
    return check


def extend_registry() -> None:
    """Give the properties above their quantized claims on ``QUANT_KINDS`` (idempotent)."""
    for pid, fn in QUANTIZED.items():
        p = REGISTRY[pid]
        if QUANT_KINDS[0] in p.layers:
            continue
        REGISTRY[pid] = replace(p, check=_dispatch(p.check, fn), layers=p.layers + QUANT_KINDS)
