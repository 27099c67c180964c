"""The precision model extended to quantized bases: pure float64 functions of the stored codes.

A merge into a quantized weight computes ``V = D(Wq) + ΔW`` in floating point and quantizes ``V``
again. From the codes a target stores (``QuantState``), in float64:

* **Unmerged forward**: the exact answer is the oracle's LoRA forward on the *decoded* weight
  ``D(Wq)``; the bound is the usual one (``precision.forward_expected``) plus one rounding of the
  dequantized weight to the compute dtype, plus, for LLM.int8() (bnb 8-bit), the row-wise int8
  quantization of the activations (``|x - D(Q(x))| <= max|x_row| / 254`` per element after a float16
  cast).
* **Merged weights**: the exact target is ``V = D(Wq) + Σ s B A``. A correct quantizer rounds each
  element to the nearest point of its block's grid ``{(c - z) s : c in codebook}``, so
  ``|D(Wq') - V| <= dist(V, grid) + 2 δ``: ``dist`` is computed from the stored grid itself, ``δ`` is
  the float merge's own rounding before quantizing (``precision.weights_expected``, one store of the
  dequantized weight, the quantizer's input cast and its float32 normalisation). A code that is not
  the nearest grid point fails, even by one step.
* **Scales** (absmax quantizers): a correct merge re-derives each block's scale from the merged block,
  ``s = max|V_block| / max|codebook|``, within ``max δ`` of the block, float32 storage and, with bnb's
  double quantization, half the largest gap of the 8-bit scale code book times the nested block's
  spread of scales. A block whose absmax the delta moved must get a new scale; requantizing with the
  old scale fails here.
* **Several adapters** merged in one call requantize once per adapter: the earlier steps are not
  observable, so each adds at most half the code book's largest gap times an a priori bound on the
  block scale, twice (``dist`` is 1-Lipschitz), to the bound of the last step.
* **Round trip** merge -> unmerge: ``|D(W'') - D(Wq)| <= e_merge + e_unmerge``, each a requantization
  bound as above (``V'' = D(W') - ΔW``): requantizing twice is not exact, a weight may move by up to
  about one grid step per requantization. **n cycles**: ``2n`` requantizations, so the bound grows
  linearly with n; what is measured is reported per cycle count (``cycles`` in the samples).
* **HQQ** (``scale_rule="minmax"``): an affine grid per group, ``(c - z) s`` with ``c`` in
  ``0..2^b-1``. The codes are the nearest levels to ``V / s* + z*`` for the float32 scale and zero
  HQQ computed; it stores ``s`` and ``z`` rounded to the compute dtype, so the stored grid may sit
  ``|V| e + u |z| s`` away from the one the codes were chosen on (``e``: the scale's relative
  rounding): ``|D(Wq') - V| <= dist(V, stored grid) + 2 δ + 2 (|V| e + u |z| s) + float32
  evaluation``. This is a grid-only claim, true whatever the zero point is, so it holds for HQQ's
  zero-point optimiser (``optimize=True``) as for plain min/max. The scale is min/max in both (the
  optimiser moves only the zero): ``s = (max - min) / (2^b - 1)`` per group, 1 for a range at most
  ``1e-4``, at least ``1 / 2e4``, and is checked. Several adapters in one call: an intermediate
  requantization with a min/max zero is off by at most half a step of its grid (plus the stored
  grid's shift; up to the group's magnitude where its range may be below ``1e-4``); with an
  optimised zero nothing bounds it a priori (``NoChainBound``).
* **torchao NF4** (absmax, nearest code of the dtype-rounded NF4 table, computed in the weight's
  dtype): the absmax bounds above with ``δ`` including ``5u |V|`` (input cast, division, distance
  roundings); its double-quantized scales (global mean subtracted, int8 per group, the largest
  deviation clamped a whole step) are off by at most ``D (1/128 + 6u) + 1.01 u |a|`` (``_dq_term``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from properties import oracle
from properties.precision import Arithmetic, Expected, forward_expected, weights_expected
from properties.quantized.state import F64, QuantState
from properties.spec import LayerSpec

U32 = 2.0**-24
U16 = 2.0**-11
HQQ_MIN_RANGE = 1e-4
"""HQQ sets a group's scale to 1 where ``max - min <= 1e-4`` (``Quantizer.quantize``)."""
HQQ_MAX_INV_SCALE = 2e4
"""HQQ clamps ``1 / scale`` at ``2e4``: a scale is never below ``5e-5``."""


class NoChainBound(ValueError):
    """No a priori bound exists for an unobservable intermediate requantization (an optimised
    zero point): a multi-adapter merge in one call is outside the claim."""


def dequant_rounding(qs: QuantState, u: float) -> float:
    """Relative error of the library's own dequantize in a dtype of unit roundoff ``u``."""
    return (1.0 + u) ** qs.decode_roundings - 1.0


def decoded_spec(spec: LayerSpec, qs: QuantState) -> LayerSpec:
    """The spec with its weight replaced by the exact float64 weight the codes stand for."""
    return replace(spec, weight=qs.decode(), quant=None)


def _blocks(qs: QuantState, t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``t`` flattened and cut into ``(n_blocks, block)``, the short last block padded with ``fill``."""
    flat = t.reshape(-1).to(F64)
    pad = qs.n_blocks * qs.block - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), fill)])
    return flat.reshape(qs.n_blocks, qs.block)


def grid_distance(qs: QuantState, v: torch.Tensor, block_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise distance of ``v`` to the nearest point of its block's grid (the stored scales, or
    ``block_scale`` given per block)."""
    zero = qs.per_element(qs.zero) if qs.zero is not None else torch.zeros(qs.codes.numel(), dtype=F64)
    scale = qs.per_element(qs.scale if block_scale is None else block_scale)
    flat = v.reshape(-1).to(F64)
    book = torch.sort(qs.codebook).values
    gaps = book[1:] - book[:-1]
    if book.numel() > 2 and bool((gaps - gaps[0]).abs().max() <= 1e-12 * gaps[0]):
        # A uniform grid (int8, HQQ): the nearest level directly, without comparing with every code.
        step = float(gaps.mean())
        t = (torch.where(scale != 0, flat / scale, torch.zeros_like(flat)) + zero - float(book[0])) / step
        nearest = t.round().clamp(0, book.numel() - 1)
        dist = torch.where(scale != 0, (t - nearest).abs() * step * scale.abs(), flat.abs())
        return dist.reshape(v.shape)
    grid = (book.unsqueeze(0) - zero.unsqueeze(1)) * scale.unsqueeze(1)
    return (flat.unsqueeze(1) - grid).abs().min(dim=1).values.reshape(v.shape)


def gap_max(codebook: torch.Tensor) -> float:
    """The largest distance between neighbouring code values."""
    c = torch.sort(codebook.to(F64)).values
    return float((c[1:] - c[:-1]).max()) if c.numel() > 1 else 0.0


def float_rounding(
    spec: LayerSpec, qs_in: QuantState, adapters: Sequence[str], arith: Arithmetic, v: torch.Tensor
) -> torch.Tensor:
    """``δ``: how far the value a correct implementation hands its quantizer may be from ``v``.

    The float merge's own bound (``weights_expected`` on the decoded weight), a store of the
    dequantized weight in the compute dtype, the quantizer's input cast and float32 normalisation."""
    dspec = decoded_spec(spec, qs_in)
    merge = weights_expected(dspec, list(adapters), arith)["weight"].bound if adapters else 0.0
    d_abs = dspec.weight.abs()
    return merge + dequant_rounding(qs_in, arith.u) * d_abs + (qs_in.input_roundoff + 3 * U32) * v.abs()


def requant_bound(qs_out: QuantState, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Bound on ``|D(qs_out) - v|`` when ``qs_out`` is a correct nearest-code quantization of ``v``
    computed from a value within ``delta`` of it.

    An absmax quantizer picks the code nearest to ``v / a`` with ``a`` the block absmax of what it was
    handed (within ``max δ`` of ``v``'s), then stores the scale (coded again with double
    quantization): ``dist(v, grid_a) + 2 δ + 2 max δ + cmax |s - a|``; the scale's own error is
    checked apart (``scale_expected``). HQQ's affine grid: the nearest point of the stored grid plus
    twice the stored grid's shift (``_grid_shift``). Otherwise the nearest point of the stored grid."""
    if qs_out.scale_rule == "minmax":
        return grid_distance(qs_out, v) + 2 * delta + 2 * _grid_shift(qs_out, v.abs() + delta)
    if qs_out.scale_rule != "absmax":
        return grid_distance(qs_out, v) + 2 * delta
    cmax = float(qs_out.codebook.abs().max())
    a = _blocks(qs_out, v).abs().max(dim=1).values / qs_out.divisor
    dmax = qs_out.per_element(_blocks(qs_out, delta).max(dim=1).values).reshape(v.shape)
    moved = qs_out.per_element((qs_out.scale - a).abs() * cmax).reshape(v.shape)
    return grid_distance(qs_out, v, a) + 2 * delta + 2 * dmax + moved


def _grid_shift(qs: QuantState, vabs: torch.Tensor) -> torch.Tensor:
    """Per element: how far the stored affine grid may sit from the one the codes were chosen on,
    ``s |t - t_s|`` with ``t = V / s* + z*``: the scale was inverted in float32 and stored with
    ``meta_roundoff`` (relative ``e``), the zero stored with ``meta_roundoff``; plus half the float32
    evaluation of ``V s*^-1 + z*`` (the caller doubles it)."""
    s = qs.per_element(qs.scale).reshape(vabs.shape).abs()
    z = qs.per_element(qs.zero).reshape(vabs.shape).abs() if qs.zero is not None else torch.zeros_like(vabs)
    e = (qs.meta_roundoff + U32) * 1.01
    shift = e * vabs + qs.meta_roundoff * 1.01 * z * s
    return shift + U32 * 1.01 * (2 * vabs + z * s) / 2


def _minmax_scale(qs: QuantState, rng: torch.Tensor) -> torch.Tensor:
    """HQQ's scale for a group of range ``rng`` (before storage)."""
    levels = qs.codebook.numel() - 1
    s = (rng / levels).clamp(min=1.0 / HQQ_MAX_INV_SCALE)
    return torch.where(rng > HQQ_MIN_RANGE, s, torch.ones_like(s))


def _dq_term(qs: QuantState, absmax: torch.Tensor, slack: torch.Tensor | None = None) -> torch.Tensor:
    """Per block: the error double quantization may put on a scale (8-bit code, per nested block of
    ``scale_block`` scales, of the scales minus their mean).

    torchao NF4 (``scale_mean="global"``, roundings ``u = meta_roundoff``): with ``D`` the group's
    largest ``|a - m'|`` (``m'`` the stored mean, within ``(u + n 2^-24) max a`` of the exact one;
    the absmaxes the quantizer saw within ``slack`` of ``absmax``), ``a - m'`` rounded, the factor
    ``256 / 2D`` rounded, the product rounded, rounded to an integer and clamped (at most one step
    ``D / 128``), divided and added back to ``m'`` (two roundings): ``|s - a| <= D (1/128 + 6u) +
    1.01 u |a|``."""
    if qs.scale_codebook is None:
        return torch.zeros_like(absmax)
    offset = absmax.mean()
    dev = (absmax - offset).abs()
    if qs.scale_mean == "global":
        u = qs.meta_roundoff
        em = (u + absmax.numel() * U32) * 1.01 * float(absmax.abs().max())
        dev = dev + em + (2 * float(slack.max()) if slack is not None and slack.numel() else 0.0)
    n = dev.numel()
    nb = -(-n // qs.scale_block)
    padded = torch.cat([dev, dev.new_zeros(nb * qs.scale_block - n)]).reshape(nb, qs.scale_block)
    spread = padded.max(dim=1).values.repeat_interleave(qs.scale_block)[:n]
    if qs.scale_mean == "global":
        u = qs.meta_roundoff
        steps = gap_max(qs.scale_codebook) * qs.scale_code_steps
        return (steps + 6 * u + 4 * U32) * spread + (1.01 * u + 4 * U32) * absmax.abs()
    return (gap_max(qs.scale_codebook) / 2 + 4 * U32) * spread + 4 * U32 * absmax.abs()


def scale_expected(qs_out: QuantState, v: torch.Tensor, delta: torch.Tensor) -> Expected | None:
    """The scale a correct absmax (or HQQ min/max) quantizer stores for ``v`` (None for free scales).

    HQQ: ``fl(1 / fl(levels / fl(max - min)))`` stored with ``meta_roundoff``; the range of the value
    it was handed is within ``2 max δ`` (and a float32 subtraction) of ``V``'s. Where that slack
    straddles ``1e-4`` either branch is correct."""
    if qs_out.scale_rule == "minmax":
        levels = qs_out.codebook.numel() - 1
        vb = _blocks(qs_out, v)
        rng = vb.max(dim=1).values - vb.min(dim=1).values
        slack = 2 * _blocks(qs_out, delta).max(dim=1).values + 2 * U32 * rng
        exact = _minmax_scale(qs_out, rng)
        bound = slack / levels + (qs_out.meta_roundoff + 4 * U32) * 1.01 * exact
        either = (rng - HQQ_MIN_RANGE).abs() <= slack * 1.01
        near = ((rng + slack) / levels).clamp(min=1.0 / HQQ_MAX_INV_SCALE)  # the other branch's scale
        other = torch.where(rng > HQQ_MIN_RANGE, torch.ones_like(rng), near)
        bound = torch.where(either, torch.maximum(bound, (other - exact).abs() + bound), bound)
        return Expected(exact, bound, exact)
    if qs_out.scale_rule != "absmax":
        return None
    div = qs_out.divisor
    absmax = _blocks(qs_out, v).abs().max(dim=1).values / div
    slack = _blocks(qs_out, delta).max(dim=1).values / div
    bound = slack + _dq_term(qs_out, absmax, slack) + 2 * U32 * absmax
    return Expected(absmax, bound, absmax)


def _affine_chain(
    qs_in: QuantState, spec: LayerSpec, steps: Sequence[str], sign: float, delta: torch.Tensor, u: float
) -> torch.Tensor:
    """HQQ with a min/max zero: ``E``, the accumulated error of the intermediate weights after the
    requantizations before the last. Each is off its input by at most half a step of its grid
    (``range / levels``, the range grown by the errors so far) plus the stored grid's shift
    (``|z| s <= S``, the group's magnitude) and its own dequantize; where the group's range may be
    at most ``1e-4`` (scale 1) by at most the group's magnitude (zero rounded) or ``1e-4``."""
    levels = qs_in.codebook.numel() - 1
    v = qs_in.decode()
    acc = torch.zeros(qs_in.shape, dtype=F64)
    e_meta = (qs_in.meta_roundoff + U32) * 1.01
    for n in steps:
        v = v + sign * oracle.lora_delta(spec, spec.adapter(n))
        err = _blocks(qs_in, acc + delta).max(dim=1).values
        vb = _blocks(qs_in, v)
        rng = vb.max(dim=1).values - vb.min(dim=1).values
        big = _blocks(qs_in, v.abs() + acc + delta).max(dim=1).values
        half = ((rng + 2 * err) / levels).clamp(min=1.0 / HQQ_MAX_INV_SCALE) * (1 + e_meta) / 2
        small = big * float(qs_in.round_zero) + HQQ_MIN_RANGE * 1.01
        maybe_small = rng - 2 * err <= HQQ_MIN_RANGE * 1.01
        step = torch.where(maybe_small, torch.maximum(half, small), half)
        step = step + 2 * (e_meta + qs_in.meta_roundoff * 1.01) * big + 3 * U32 * 1.01 * big
        step = step + dequant_rounding(qs_in, u) * big
        acc = acc + qs_in.per_element(step).reshape(qs_in.shape) + delta
    return acc


def chain_term(
    qs_in: QuantState,
    spec: LayerSpec,
    adapters: Sequence[str],
    delta: torch.Tensor,
    *,
    sign: float = 1.0,
    u: float = 0.0,
) -> torch.Tensor:
    """Per element: what the unobservable intermediate requantizations of a multi-adapter merge may
    add (zero for one adapter): ``2 Σ_j (G/2 · S + 2 δ)`` over the ``k - 1`` earlier steps, with
    ``S`` an upper bound of any intermediate block scale (``|D| + Σ|ΔW|`` per block, grown by the
    double-quantization error). HQQ: ``2 E`` (``_affine_chain``); ``adapters`` in the order they are
    applied, ``sign`` -1 for an unmerge, ``u`` the compute dtype's unit roundoff."""
    k = len(adapters)
    if k <= 1:
        return torch.zeros(qs_in.shape, dtype=F64)
    if qs_in.scale_rule == "minmax":
        if qs_in.zero_optimised:
            raise NoChainBound(
                "several adapters requantized in one call with HQQ's optimised zero point: no a priori "
                "bound on the unobserved intermediate weights"
            )
        return 2 * _affine_chain(qs_in, spec, list(adapters)[:-1], sign, delta, u)
    total = qs_in.decode().abs()
    for n in adapters:
        total = total + oracle.lora_delta(spec, spec.adapter(n), magnitude=True)
    cmax = float(qs_in.codebook.abs().max())
    if qs_in.scale_rule == "absmax":
        s = _blocks(qs_in, total).max(dim=1).values / qs_in.divisor
        dq = gap_max(qs_in.scale_codebook) if qs_in.scale_codebook is not None else 0.0
        s = s * (1.0 + 2 * dq + 8 * qs_in.meta_roundoff)
    else:  # an affine grid spanning at most [-S, S] in 2^b - 1 steps
        s = 2 * _blocks(qs_in, total).max(dim=1).values / max(cmax, 1.0)
    step = gap_max(qs_in.codebook) / 2 * qs_in.per_element(s).reshape(qs_in.shape) + 2 * delta
    return 2 * (k - 1) * step


def merged_weight_expected(
    spec: LayerSpec, qs_in: QuantState, qs_out: QuantState, adapters: Sequence[str], arith: Arithmetic
) -> tuple[Expected, Expected | None, torch.Tensor]:
    """After merging ``adapters`` into ``qs_in`` (giving ``qs_out``): the exact ``V`` with the bound on
    ``D(qs_out)``, the expected scales (absmax quantizers) and ``δ``."""
    dspec = decoded_spec(spec, qs_in)
    v = oracle.merged_weights(dspec, list(adapters))["weight"]
    delta = float_rounding(spec, qs_in, adapters, arith, v)
    chain = chain_term(qs_in, spec, adapters, delta, u=arith.u)
    bound = requant_bound(qs_out, v, delta) + chain
    scales = scale_expected(qs_out, v, delta + chain)
    return Expected(v, bound, v.abs() + dspec.weight.abs()), scales, bound


def unmerged_weight_expected(
    spec: LayerSpec, qs_merged: QuantState, qs_out: QuantState, adapters: Sequence[str], arith: Arithmetic
) -> tuple[Expected, Expected | None, torch.Tensor]:
    """After unmerging ``adapters`` from ``qs_merged``: ``V = D(qs_merged) - Σ ΔW`` with the bound on
    ``D(qs_out)`` (the unmerge's requantization), and the expected scales."""
    dspec = decoded_spec(spec, qs_merged)
    v = dspec.weight.clone()
    for n in adapters:
        v = v - oracle.lora_delta(spec, spec.adapter(n))
    delta = float_rounding(spec, qs_merged, adapters, arith, v)
    chain = chain_term(qs_merged, spec, list(adapters)[::-1], delta, sign=-1.0, u=arith.u)
    bound = requant_bound(qs_out, v, delta) + chain
    return Expected(v, bound, v.abs() + dspec.weight.abs()), scale_expected(qs_out, v, delta + chain), bound


def activation_error(x: torch.Tensor, int8_activations: bool) -> torch.Tensor | None:
    """Elementwise bound on the input error of LLM.int8(): a float16 cast, then row-wise absmax int8."""
    if not int8_activations:
        return None
    xa = x.detach().to("cpu", F64).abs()
    row = xa.amax(dim=-1, keepdim=True) * (1 + U16)
    return U16 * xa + row / 254.0 * (1 + 4 * U32)


def forward_expected_q(
    spec: LayerSpec,
    qs: QuantState,
    x: torch.Tensor,
    arith: Arithmetic,
    *,
    adapters: Sequence[str] | None = None,
    int8_activations: bool = False,
) -> Expected:
    """Eval output of the layer whose base weight is stored as ``qs`` with ``adapters`` unmerged: the
    oracle on the decoded weight, the usual bound, one store of the dequantized weight, and the
    activation quantization of LLM.int8()."""
    dspec = decoded_spec(spec, qs)
    exp = forward_expected(dspec, x, arith, adapters=adapters)
    xa = x.detach().to("cpu", F64).abs()
    d_abs = dspec.weight.abs()
    extra = dequant_rounding(qs, arith.u) * (xa @ d_abs.T)
    act = activation_error(x, int8_activations)
    if act is not None:
        k = d_abs.shape[1]
        # int32 accumulation is exact; the float16 output and scale products add a few roundings.
        extra = extra + act @ d_abs.T + (k * U32 + 4 * U16) * (xa @ d_abs.T)
    return Expected(exp.exact, exp.bound + extra, exp.magnitude + xa @ d_abs.T)


def weight_effect(x: torch.Tensor, weight_bound: torch.Tensor) -> torch.Tensor:
    """How far an elementwise weight error ``weight_bound`` may move the output ``x W^T``."""
    return x.detach().to("cpu", F64).abs() @ weight_bound.T
