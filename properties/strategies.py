"""Hypothesis strategies for LoRA layers: the structure is drawn, the values are seeded.

Hypothesis draws what matters for finding and shrinking a bug — layer kind, shapes (down to 1, rank
up to and past the smallest dimension), alpha, rsLoRA, DoRA, LoRA bias, dropout, number of adapters,
conv geometry, the magnitude of every tensor, and which entry is hostile — and a seed. Tensor values
are then filled from a ``torch.Generator`` with that seed: drawing elements one by one costs ten
times the arithmetic (see ``shared/notes/speed.md``), and a seed replays exactly. Every tensor is
rounded to the layer dtype before anyone sees it, so target and oracle start from the same values.
Every adapter tensor is non-zero (standard normal scaled by a drawn power of two).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from hypothesis import strategies as st

from properties.spec import QUANT_KINDS, AdapterSpec, ConvOptions, Example, LayerKind, LayerSpec

ADAPTER_NAMES = ("default", "other", "third")
DROPOUT_RATES = (1e-3, 0.1, 0.5, 0.9)
ALPHAS = (0.5, 1.0, 3.0, 7.5, 16.0, 32.0)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
HostileKind = Literal["nan", "inf", "-inf", "overflow"]


@dataclass(frozen=True)
class Draw:
    """What a property lets the strategy draw for one cell (derived from the target's capabilities)."""

    kind: LayerKind
    dtype: torch.dtype
    options: frozenset[str]
    max_adapters: int = 3
    dropout: Literal["none", "any", "positive"] = "none"
    min_batch: int = 0  # leading batch dims of x (mixed batch needs one)
    need_bias: bool = False
    device: str = "cpu"
    fan_steps: tuple[int, int] = (1, 1)  # linear: (in, out) drawn as multiples of these (HQQ groups)


@dataclass(frozen=True)
class Hostile:
    """A non-finite or overflowing entry planted in one adapter tensor (safe-merge properties)."""

    kind: HostileKind
    adapter: int
    tensor: str  # A, B, bias or magnitude
    position: int


def _exp_range(dtype: torch.dtype, kind: LayerKind) -> tuple[int, int]:
    """Powers of two for tensor scales. Half precision keeps outputs far from overflow (attention
    multiplies two projections, so it gets less headroom); overflow is the hostile draws' job."""
    if dtype in (torch.float16, torch.bfloat16):
        return (-3, 0) if kind == "mha" else (-3, 1)
    return (-4, 4)


def _unwrapped(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """The strategy behind Hypothesis's lazy wrapper: drawing from the wrapper re-resolves it each time."""
    return getattr(strategy, "wrapped_strategy", strategy)


@functools.cache
def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """``st.integers(lo, hi)``, built once. An example makes ~30 small draws; building each strategy
    anew costs as much as the draw (see ``scripts/benchmark.py``)."""
    return _unwrapped(st.integers(lo, hi))


@functools.cache
def _choice(values: tuple) -> st.SearchStrategy:
    return _unwrapped(st.sampled_from(values))


_BOOL = _unwrapped(st.booleans())


def _alpha(draw: st.DrawFn, r: int) -> float:
    """Alpha different from r: a common value, or any multiple of 1/8 up to 32 (two plain draws;
    a ``one_of`` strategy costs more per draw than the rest of an example's structure)."""
    alpha = ALPHAS[draw(_ints(0, len(ALPHAS) - 1))] if draw(_BOOL) else draw(_ints(1, 256)) / 8
    return alpha if alpha != r else alpha + 0.5


@st.composite
def _conv_geometry(draw: st.DrawFn, nd: int, options: frozenset[str]) -> tuple[ConvOptions, int, int, tuple]:
    """Conv options plus (in, out, spatial) that make a valid layer for them."""
    g = draw(_ints(1, 3)) if "conv_groups" in options else 1
    cin, cout = g * draw(_ints(1, 3)), g * draw(_ints(1, 3))
    kmax = 2 if nd == 3 else 3
    k = tuple(draw(_ints(1, kmax)) for _ in range(nd))
    dil = tuple(draw(_ints(1, 2)) if "conv_dilation" in options else 1 for _ in range(nd))
    mode = draw(_choice(PADDING_MODES)) if "padding_mode" in options else "zeros"
    same = "padding_same" in options and draw(_BOOL)
    stride = (1,) * nd if same else tuple(draw(_ints(1, 2)) for _ in range(nd))
    padding: tuple[int, ...] | str = "same" if same else tuple(draw(_ints(0, 2)) for _ in range(nd))
    pads = [(d * (kk - 1)) // 2 + 1 for d, kk in zip(dil, k, strict=True)] if same else list(padding)
    spatial = []
    for i in range(nd):
        need = max(dil[i] * (k[i] - 1) + 1 - 2 * (0 if same else padding[i]), 1)
        if mode in ("reflect", "circular"):
            need = max(need, pads[i] + 1)
        spatial.append(max(draw(_ints(1, 5 if nd < 3 else 3)), need))
    opts = ConvOptions(k, stride, padding, dil, g, mode)
    return opts, cin, cout, tuple(spatial)


@st.composite
def examples(draw: st.DrawFn, d: Draw, hostile: bool = False) -> Example | tuple[Example, Hostile]:
    """An :class:`Example` for one cell; with ``hostile=True`` the clean example and a :class:`Hostile`
    to plant in it (the property needs both: the clean spec is its control)."""
    if d.kind in QUANT_KINDS:  # a linear example on a quantized base (properties/quantized)
        from properties.quantized.strategies import quantized_examples

        return draw(quantized_examples(d, hostile))
    opts = d.options
    lo, hi = _exp_range(d.dtype, d.kind)
    scale = {t: 2.0 ** draw(_ints(lo, hi), label=f"log2|{t}|") for t in ("x", "W", "A", "B")}
    seed = draw(_ints(0, 2**31 - 1), label="seed")
    conv = None
    padding_idx = None
    num_heads = 1
    batch = [draw(_ints(1, 4)) for _ in range(draw(_ints(d.min_batch, max(d.min_batch, 2))))]
    if d.kind == "linear":
        (si, so), top = d.fan_steps, 40
        fan_in, fan_out = si * draw(_ints(1, max(1, top // si))), so * draw(_ints(1, max(1, top // so)))
        x_shape: tuple[int, ...] = (*batch, fan_in)
        w_shape: tuple[int, ...] = (fan_out, fan_in)
        r_cap, r_step = min(fan_in, fan_out), 1
    elif d.kind == "embedding":
        num, dim = draw(_ints(1, 30)), draw(_ints(1, 30))
        if "padding_idx" in opts and draw(_BOOL):
            padding_idx = draw(_ints(0, num - 1))
        x_shape, w_shape = tuple(batch) or (draw(_ints(1, 4)),), (num, dim)
        fan_out, r_cap, r_step = dim, min(num, dim), 1
    elif d.kind == "mha":
        num_heads, hd = draw(_ints(1, 3)), draw(_ints(1, 4))
        E = num_heads * hd
        x_shape, w_shape = (draw(_ints(1, 3)), draw(_ints(1, 4)), E), (3 * E, E)
        fan_out, r_cap, r_step = E, E, 1
    else:
        nd = int(d.kind[-2])
        conv, cin, cout, spatial = draw(_conv_geometry(nd, opts))
        x_shape = (max(batch[0] if batch else 1, 1), cin, *spatial)
        w_shape = (cout, cin // conv.groups, *conv.kernel_size)
        fan_out, r_cap, r_step = cout, max(cin, cout), conv.groups
    n_adapters = draw(_ints(1, d.max_adapters)) if "multi_adapter" in opts else 1
    has_bias = d.kind != "embedding" and (d.need_bias or draw(_BOOL))
    plans = []
    for i in range(n_adapters):
        r = r_step * draw(_ints(1, max(1, math.ceil(r_cap / r_step)) + 1))
        dora = "dora" in opts and n_adapters == 1 and d.kind != "mha" and draw(_BOOL)
        # PEFT (and so the reference) does not combine DoRA with a LoRA bias.
        lora_bias = "lora_bias" in opts and has_bias and d.kind != "mha" and not dora and draw(_BOOL)
        if d.dropout == "none":
            p = 0.0
        else:
            choices = DROPOUT_RATES if d.dropout == "positive" else (0.0, *DROPOUT_RATES)
            p = draw(_choice(choices)) if "dropout" in opts or d.dropout == "positive" else 0.0
        plans.append(
            dict(
                name=ADAPTER_NAMES[i],
                r=r,
                alpha=_alpha(draw, r),
                use_rslora="rslora" in opts and draw(_BOOL),
                use_dora=dora,
                dropout=p,
                lora_bias=lora_bias,
            )
        )
    fan_in_fan_out = d.kind == "linear" and "fan_in_fan_out" in opts and draw(_BOOL)
    ex = _fill(d, seed, scale, x_shape, w_shape, fan_out, plans, has_bias, conv, padding_idx, num_heads)
    ex = Example(replace(ex.spec, fan_in_fan_out=fan_in_fan_out), ex.x)
    if not hostile:
        return ex
    kind = draw(_choice(("nan", "inf", "-inf", "overflow")), label="hostile")
    idx = draw(_ints(0, n_adapters - 1))
    a = ex.spec.adapters[idx]
    tensors = ["A", "B"] if kind == "overflow" else list(a.tensors())
    h = Hostile(kind, idx, draw(_choice(tuple(tensors))), draw(_ints(0, 2**16)))
    return ex, h


def _rounded(gen: torch.Generator, shape: tuple[int, ...], scale: float, d: Draw) -> torch.Tensor:
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return t.to(device=d.device, dtype=d.dtype)


def _fill(d: Draw, seed, scale, x_shape, w_shape, fan_out, plans, has_bias, conv, padding_idx, num_heads):
    gen = torch.Generator().manual_seed(seed)
    w = _rounded(gen, w_shape, scale["W"], d)
    bias = _rounded(gen, (w_shape[0],), scale["W"], d) if has_bias else None
    out_w = out_b = None
    if d.kind == "mha":
        E = w_shape[1]
        out_w = _rounded(gen, (E, E), scale["W"], d)
        out_b = _rounded(gen, (E,), scale["W"], d) if has_bias else None
    if d.kind == "embedding":
        x = torch.randint(0, w_shape[0], x_shape, generator=gen).to(d.device)
        if padding_idx is not None:
            x.view(-1)[0] = padding_idx
    else:
        x = _rounded(gen, x_shape, scale["x"], d)
    adapters = []
    for p in plans:
        r = p["r"]
        if d.kind == "embedding":
            a_shape, b_shape = (r, w_shape[0]), (w_shape[1], r)
        elif conv is not None:
            a_shape, b_shape = (
                (r, *w_shape[1:]),
                (w_shape[0], r // conv.groups, *([1] * len(conv.kernel_size))),
            )
        else:
            a_shape, b_shape = (r, w_shape[1]), (w_shape[0], r)
        A = _rounded(gen, a_shape, scale["A"], d)
        B = _rounded(gen, b_shape, scale["B"], d)
        extra = {}
        if d.kind == "mha":
            E = w_shape[1]
            extra = dict(
                out_A=_rounded(gen, (r, E), scale["A"], d), out_B=_rounded(gen, (E, r), scale["B"], d)
            )
        lb = _rounded(gen, (fan_out,), scale["B"], d) if p["lora_bias"] else None
        mag = None
        if p["use_dora"]:
            mag = (torch.rand(fan_out, generator=gen, dtype=torch.float64) * 2 + 0.5) * scale["W"]
            mag = (mag * math.sqrt(math.prod(w_shape[1:]) if d.kind != "embedding" else w_shape[0])).to(
                d.dtype
            )
        adapters.append(
            AdapterSpec(
                name=p["name"],
                r=r,
                alpha=p["alpha"],
                A=A,
                B=B,
                use_rslora=p["use_rslora"],
                use_dora=p["use_dora"],
                dropout=p["dropout"],
                bias=lb,
                magnitude=mag,
                **extra,
            )
        )
    spec = LayerSpec(
        kind=d.kind,
        dtype=d.dtype,
        weight=w,
        adapters=tuple(adapters),
        base_bias=bias,
        conv=conv,
        padding_idx=padding_idx,
        num_heads=num_heads,
        out_weight=out_w,
        out_bias=out_b,
        device=d.device,
        seed=seed,
    )
    return Example(spec, x)


def plant(ex: Example, h: Hostile) -> Example:
    """Return ``ex`` with the hostile entry written into a copy of the chosen adapter tensor."""
    spec = ex.spec
    a = spec.adapters[h.adapter]
    finfo = torch.finfo(spec.dtype)
    if h.kind == "overflow":
        # One rank-1 term of B A reaches 4x the dtype's largest finite value.
        v = 2 * math.sqrt(finfo.max) / math.sqrt(abs(a.scaling))  # 4 * max would overflow float64 itself
        A, B = a.A.clone(), a.B.clone()
        j = h.position % a.r
        a_row = A[j].reshape(-1)
        a_row[h.position % a_row.numel()] = v
        groups = spec.conv.groups if spec.conv is not None else 1
        per = a.r // groups
        out_per = B.shape[0] // groups
        o = (j // per) * out_per + (h.position // 7) % out_per
        B.reshape(B.shape[0], -1)[o, j % per] = v
        new = replace(a, A=A, B=B)
    else:
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[h.kind]
        t = getattr(a, h.tensor).clone()
        t.view(-1)[h.position % t.numel()] = value
        new = replace(a, **{h.tensor: t})
    adapters = tuple(new if i == h.adapter else b for i, b in enumerate(spec.adapters))
    return Example(spec.with_adapters(adapters), ex.x)
