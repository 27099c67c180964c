"""The precision model: how far a *correct* implementation may be from the exact answer.

Pure functions of dtypes and tensors. Every bound is componentwise and built from the unit
roundoff of the storage dtype ``u_s``, the unit roundoff of the accumulator ``u_a`` and the float64
magnitude ``M`` of the computation (``|x||W| + |s||x||A||B| + ...``, see ``oracle``), following
Higham's ``|fl(AB) - AB| <= gamma_K |A||B|`` with ``gamma_K = K u / (1 - K u)``. The constants count
rounding stages; they are derived below, not tuned:

* unmerged forward ``base(x) + s B(A x)``: gamma over the inner dimension (K, then r) plus one store
  of ``A x``, of ``B(.)``, of ``s *``, of the sum and of the output: ``(gamma_{K+r}(u_a) + (3 + 2n) u_s) M``
  for ``n`` adapters. DoRA adds a norm (another ``gamma_K``) and the ``m / n`` factor (one ``u_s``).
* merged forward: each merge writes ``round(W + delta)`` with ``delta`` from an ``r``-term product,
  so the weights are off by ``(gamma_r(u_a) + 3 u_s)|W'|`` per merge (three roundings when the delta
  is formed in the storage dtype: ``B @ A``, ``* s``, ``+ W``), then the same product as above.
  Both paths are covered by one bound, so merged vs unmerged compares against the sum of two.
* merge -> unmerge round trip: two such weight writes per cycle, so ``c`` cycles give ``c`` times that.

Half-precision matmuls on CPU (and on GPU by default) accumulate in float32: ``u_a`` is float32's
unless the device reduces in half precision (then ``u_a = u_s``). TF32 rounds float32 inputs to a
10-bit mantissa, which makes ``u_a`` about ``2^-11`` for float32 products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from properties import oracle
from properties.results import Sample
from properties.spec import LayerSpec

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}
TF32_UNIT_ROUNDOFF = 2.0**-11


def unit_roundoff(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def gamma(k: int, u: float) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``; infinite when ``k u >= 1`` (no guarantee left)."""
    ku = max(k, 1) * u
    return ku / (1 - ku) if ku < 1 else math.inf


@dataclass(frozen=True)
class Arithmetic:
    """How a target rounds: storage dtype and accumulator roundoff."""

    dtype: torch.dtype
    u_acc: float

    @property
    def u(self) -> float:
        return unit_roundoff(self.dtype)

    @property
    def eta(self) -> float:
        """Absolute error of one rounding in the subnormal range: at most half the smallest
        subnormal; we use the whole (half of float64's is not representable).

        Higham's model is ``fl(a op b) = (a op b)(1 + d) + e`` with ``|e| <= eta``; the relative
        term alone fails for results below the smallest normal (6.1e-5 in float16)."""
        info = torch.finfo(self.dtype)
        return info.tiny * info.eps

    def gamma(self, k: int) -> float:
        return gamma(k, self.u_acc)

    @classmethod
    def for_dtype(
        cls, dtype: torch.dtype, *, tf32: bool = False, reduced_precision_reduction: bool = False
    ) -> Arithmetic:
        """CPU (and default GPU) arithmetic: half types accumulate in float32."""
        u = unit_roundoff(dtype)
        if dtype in (torch.float16, torch.bfloat16):
            return cls(dtype, u if reduced_precision_reduction else unit_roundoff(torch.float32))
        if dtype == torch.float32 and tf32:
            return cls(dtype, TF32_UNIT_ROUNDOFF)
        return cls(dtype, u)


def inner_dim(spec: LayerSpec) -> int:
    """The inner dimension K of the base product."""
    if spec.kind == "embedding":
        return 1
    if spec.kind in ("linear", "mha"):
        return spec.weight.shape[1]
    return math.prod(spec.weight.shape[1:])


def _rank_total(spec: LayerSpec, names: Sequence[str]) -> int:
    return sum(spec.adapter(n).r for n in names)


def _n_dora(spec: LayerSpec, names: Sequence[str]) -> int:
    return sum(spec.adapter(n).use_dora for n in names)


@dataclass
class Expected:
    """An exact answer with the bound a correct implementation meets and the magnitude M behind it."""

    exact: torch.Tensor
    bound: torch.Tensor
    magnitude: torch.Tensor
    # Why this comparison lies outside the claim (an intermediate beyond the dtype's range), or None.
    out_of_range: str | None = None

    def versus(self, exact: torch.Tensor, bound: torch.Tensor) -> Expected:
        """Another comparison derived from this one (same magnitudes, same range verdict)."""
        return Expected(exact, bound, self.magnitude, self.out_of_range)


def range_violation(
    spec: LayerSpec,
    x: torch.Tensor | None,
    arith: Arithmetic,
    *,
    adapters: Sequence[str] | None = None,
    scales: dict[str, float] | None = None,
    input_gain: float = 1.0,
    output: Expected | None = None,
) -> str | None:
    """Why the claim does not cover this computation, or None: some value a correct implementation
    stores in the dtype (``oracle.intermediates``, or the output) may exceed the dtype's largest
    finite value, so a correct implementation may return inf or NaN where the exact answer is finite.

    Decided from the float64 exact values alone, never from a target's output: a value ``v`` with
    magnitude ``M`` is stored as at most ``|v| + rho M`` (``rho``: the forward's rounding coefficient,
    an upper bound of every intermediate's relative error); that is compared with ``finfo.max``."""
    names = spec.active_adapters if adapters is None else list(adapters)
    limit = torch.finfo(spec.dtype).max
    nd = _n_dora(spec, names)
    peak = _crude_peak(spec, x, names, scales or {}, input_gain)
    if peak < limit / 4 and (output is None or float((output.exact.abs() + output.bound).max()) < limit):
        return None  # far inside the range (float32, bfloat16, float64 always): no need to look closer
    rho = arith.gamma((1 + nd) * inner_dim(spec) + _rank_total(spec, names)) + (8 + 2 * len(names)) * arith.u
    found = oracle.intermediates(spec, x, names, scales, input_gain=input_gain)
    if output is not None:
        found.append(("output", output.exact.abs() + output.bound, torch.zeros_like(output.bound)))
    for what, value, mag in found:
        if value.numel() and float((value.abs() + rho * mag).max()) > limit:
            return f"{what} may exceed the {str(spec.dtype).removeprefix('torch.')} range"
    return None


def _crude_peak(spec: LayerSpec, x, names: Sequence[str], scales: dict[str, float], gain: float) -> float:
    """A cheap upper bound of every value ``oracle.intermediates`` lists (products of the largest
    entries and the sums' lengths); infinite where it has no such bound (DoRA: ``m / ||W + sBA||``)."""
    if any(spec.adapter(n).use_dora for n in names):
        return math.inf

    def big(t) -> float:
        return float(t.detach().abs().max()) if t is not None and t.numel() else 0.0

    k = inner_dim(spec)
    mx = 1.0 if x is None or not x.is_floating_point() else big(x)
    wide = max(big(spec.weight), big(spec.out_weight))  # any weight-like value: W, B A, s B A, W'
    per_input = 0.0  # A x, B (A x), s B (A x) per unit of input entry and inner dimension
    bias = max(big(spec.base_bias), big(spec.out_bias))
    for n in names:
        a = spec.adapter(n)
        s = abs(a.scaling * scales.get(n, 1.0))
        ma, mb = max(big(a.A), big(a.out_A)), max(big(a.B), big(a.out_B))
        wide += max(s, 1.0) * max(a.r, 1) * ma * mb * max(gain, 1.0)
        per_input = max(per_input, gain * ma * (1 + max(a.r, 1) * mb * max(s, 1.0)))
        bias += s * big(a.bias)
    out = k * mx * wide + bias  # W x + b, the sum of the output's terms (every order)
    peak = max(wide, k * mx * per_input, out)
    if spec.kind == "mha":  # q k^T over d = E / H; then the output projection of o (|o| <= |v|)
        d = k // spec.num_heads
        peak = max(peak, d * out * out, k * out * wide + bias, k * out * per_input)
    return peak


def forward_expected(
    spec: LayerSpec,
    x: torch.Tensor,
    arith: Arithmetic,
    *,
    adapters: Sequence[str] | None = None,
    scales: dict[str, float] | None = None,
) -> Expected:
    """Exact eval output and its bound, valid for the merged and the unmerged path alike."""
    names = spec.active_adapters if adapters is None else list(adapters)
    if spec.kind == "mha":
        y, ey, mag = oracle.mha_forward_with_error(spec, x, names, scales or {}, (arith.gamma, arith.u))
        stages = 8 + 2 * len(names)  # projections, logits, softmax, values, output: one store each
        exp = Expected(y, ey + arith.u * y.abs() + stages * arith.eta, mag)
        exp.out_of_range = range_violation(spec, x, arith, adapters=names, scales=scales, output=exp)
        return exp
    exact = oracle.forward(spec, x, adapters=names, scales=scales)
    mag = oracle.forward(spec, x, adapters=names, scales=scales, magnitude=True)
    k, r, nd = inner_dim(spec), _rank_total(spec, names), _n_dora(spec, names)
    stages = 3 + 2 * len(names) + 2 * nd
    coeff = arith.gamma((1 + nd) * k + r) + stages * arith.u
    exp = Expected(exact, coeff * mag + _underflow(spec, names, scales or {}, stages, arith, exact), mag)
    exp.out_of_range = range_violation(spec, x, arith, adapters=names, scales=scales, output=exp)
    return exp


def _underflow(spec: LayerSpec, names, scales: dict[str, float], stages: int, arith: Arithmetic, y):
    """The absolute (subnormal) rounding errors, each carried to the output by what multiplies it
    afterwards: the store of ``A x`` by ``|s| |B|`` (summed over the rank), of ``B(A x)`` by ``|s|``, of
    ``s B A x`` by 1; with DoRA all of them, and ``W x``, also by the factor ``|m / ||W + sBA|||``."""
    if arith.eta == 0.0:
        return torch.zeros_like(y)
    gain = torch.zeros(y.shape[1] if spec.kind not in ("linear", "embedding") else y.shape[-1], dtype=y.dtype)
    for name in names:
        a = spec.adapter(name)
        b_rows = a.B.detach().to("cpu", torch.float64).abs().flatten(1).sum(1)
        f = oracle.dora_factor(spec, a, scales.get(name, 1.0)).abs() if a.use_dora else 0.0
        s_abs = abs(a.scaling * scales.get(name, 1.0))
        gain = gain + (1 + f) * (s_abs * b_rows + s_abs + 1) + 2 * f
    return arith.eta * (stages + oracle._out_view(spec, gain, y.dim()))


def mixed_expected(spec: LayerSpec, x: torch.Tensor, rows: Sequence[str], arith: Arithmetic) -> Expected:
    """Per-row expectations for a mixed batch (each row with its own adapter)."""
    parts = [
        forward_expected(spec, x[i : i + 1], arith, adapters=[] if n == "__base__" else [n])
        for i, n in enumerate(rows)
    ]
    exp = Expected(*(torch.cat([getattr(p, f) for p in parts]) for f in ("exact", "bound", "magnitude")))
    exp.out_of_range = next((p.out_of_range for p in parts if p.out_of_range), None)
    return exp


def weights_expected(
    spec: LayerSpec, adapters: Sequence[str], arith: Arithmetic, *, writes: int = 1
) -> dict[str, Expected]:
    """Stored weights after merging ``adapters`` in order; ``writes`` counts rounded weight writes
    per adapter beyond the merge itself (an unmerge is one more, ``c`` cycles are ``2c``)."""
    exact = oracle.merged_weights(spec, adapters)
    mag = oracle.merged_weights(spec, adapters, magnitude=True)
    r = max([spec.adapter(n).r for n in adapters] or [1])
    k = inner_dim(spec) if _n_dora(spec, adapters) else 0
    # One write: the r-term product, then up to three roundings to the storage dtype (B @ A, times s,
    # plus W) for an implementation that forms the delta in the storage dtype, as PEFT does on GPU.
    per_write = arith.gamma(r + k) + (3 + 2 * (k > 0)) * arith.u
    count = max(len(adapters), 1) * writes
    coeff, floor = count * per_write, count * (3 + 2 * (k > 0)) * arith.eta
    for name in adapters:  # a DoRA merge scales every (possibly subnormal) rounding by its factor
        a = spec.adapter(name)
        if a.use_dora and floor:
            f = oracle.dora_factor(spec, a).abs().max()
            floor = floor * (1 + float(f))
    reason = range_violation(spec, None, arith, adapters=adapters)
    return {key: Expected(exact[key], coeff * mag[key] + floor, mag[key], reason) for key in exact}


def roundtrip_expected(spec: LayerSpec, adapters: Sequence[str], arith: Arithmetic, cycles: int = 1):
    """Base weights after ``cycles`` merge -> unmerge cycles: the originals, within ``2 c`` writes."""
    merged = weights_expected(spec, adapters, arith, writes=2 * cycles)
    base = {k: v.detach().to("cpu", torch.float64) for k, v in spec.base_tensors().items()}
    return {k: e.versus(base[k], e.bound) for k, e in merged.items()}


def delta_expected(spec: LayerSpec, name: str, arith: Arithmetic) -> dict[str, Expected]:
    """``delta_weights(name)``: what a single merge adds, rounded once to the base dtype."""
    exact = oracle.delta_weights(spec, name)
    weights = weights_expected(spec, [name], arith)
    return {k: weights[k].versus(exact[k], weights[k].bound) for k in exact}


def measure(
    actual: torch.Tensor,
    expected: Expected,
    arith: Arithmetic,
    *,
    quantity: str,
    inner: int,
    rank: int,
    cycles: int | None = None,
) -> Sample:
    """The worst element of ``|actual - exact| / bound``; NaN or Inf where the exact value is finite
    counts as an infinite ratio, and any error where the bound is 0 (exact zeros) too."""
    a = actual.detach().to("cpu", torch.float64)
    if a.shape != expected.exact.shape:
        raise AssertionError(f"{quantity}: shape {tuple(a.shape)}, expected {tuple(expected.exact.shape)}")
    err = (a - expected.exact).abs()
    err = torch.where(torch.isfinite(a), err, torch.full_like(err, math.inf))
    if err.numel() == 0:
        return Sample(0.0, 0.0, inner, rank, quantity, cycles)
    ratio = torch.where(err == 0, torch.zeros_like(err), err / expected.bound)
    i = int(torch.argmax(torch.nan_to_num(ratio, nan=math.inf)))
    e, b, m = (float(t.flatten()[i]) for t in (err, expected.bound, expected.magnitude))
    ref = float(expected.exact.flatten()[i])
    rho = float(ratio.flatten()[i])
    err_u = e / (arith.u * m) if m > 0 else (0.0 if e == 0 else math.inf)
    return Sample(rho, err_u, inner, rank, quantity, cycles, e, b, m, abs(ref))
