"""The independent float64 answer: LoRA written as plain functional math on a spec's tensors.

This never calls a target (the reference LoRA included): a library that agrees with itself can still
be wrong. Every function upcasts the spec's already-rounded tensors to float64, so target and oracle
start from identical values. ``magnitude=True`` evaluates the same expression on absolute values,
which gives the ``M`` of the precision model (``|x||W| + |s||x||A||B| + ...``) for free.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from properties.spec import BASE_ROW, AdapterSpec, LayerSpec

F64 = torch.float64


class _Float64Copies:
    """The float64 copy (and its absolute value) of each spec tensor, made once per tensor.

    One example asks for the same tensors dozens of times (exact value and magnitude, every bound,
    every comparison). Entries are keyed by the tensor object, dropped when it is freed and remade
    when it is written in place (its version counter moves). Callers never write into the copies.
    """

    def __init__(self) -> None:
        self._entries: dict[int, list] = {}

    def get(self, t: torch.Tensor, magnitude: bool) -> torch.Tensor:
        key = id(t)
        entry = self._entries.get(key)
        if entry is None or entry[0]() is not t or entry[1] != t._version:
            copy = t.detach().to(device="cpu", dtype=F64, copy=True)
            ref = weakref.ref(t, lambda _, k=key, entries=self._entries: entries.pop(k, None))
            entry = self._entries[key] = [ref, t._version, copy, None]
        if not magnitude:
            return entry[2]
        if entry[3] is None:
            entry[3] = entry[2].abs()
        return entry[3]


_COPIES = _Float64Copies()


def _t(t: torch.Tensor | None, magnitude: bool) -> torch.Tensor | None:
    return None if t is None else _COPIES.get(t, magnitude)


def conv_padding(spec: LayerSpec) -> list[int]:
    """Explicit ``F.pad`` amounts (last dim first) for the spec's conv padding, 'same' included."""
    c = spec.conv
    assert c is not None
    pads: list[int] = []
    for i in reversed(range(len(c.kernel_size))):
        if c.padding == "same":
            total = c.dilation[i] * (c.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        elif c.padding == "valid":
            pads += [0, 0]
        else:
            pads += [c.padding[i], c.padding[i]]
    return pads


def _apply(spec: LayerSpec, w: torch.Tensor, x: torch.Tensor, magnitude: bool) -> torch.Tensor:
    """Apply a weight shaped like the base weight to ``x`` (float64, no bias)."""
    if spec.kind == "linear":
        return x @ w.T
    if spec.kind == "embedding":
        return F.embedding(x, w)
    c = spec.conv
    assert c is not None
    mode = "constant" if c.padding_mode == "zeros" else c.padding_mode
    xp = F.pad(x, conv_padding(spec), mode=mode)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(c.kernel_size)]
    return conv(xp, w, stride=c.stride, dilation=c.dilation, groups=c.groups)


def lora_delta(spec: LayerSpec, a: AdapterSpec, *, magnitude: bool = False, scale: float = 1.0):
    """``scaling * B A`` in the base weight's canonical shape (groups respected for conv)."""
    s = abs(a.scaling * scale) if magnitude else a.scaling * scale
    return s * lora_product(spec, a, magnitude=magnitude)


def lora_product(spec: LayerSpec, a: AdapterSpec, *, magnitude: bool = False) -> torch.Tensor:
    """``B A`` unscaled, in the base weight's canonical shape (groups respected for conv)."""
    A, B = _t(a.A, magnitude), _t(a.B, magnitude)
    if spec.kind in ("linear", "mha"):
        return B @ A
    if spec.kind == "embedding":
        return (B @ A).T
    g = spec.conv.groups
    out, rg = B.shape[0], B.shape[1]
    Bg = B.reshape(g, out // g, rg)
    Ag = A.reshape(g, rg, -1)
    return torch.bmm(Bg, Ag).reshape(spec.weight.shape)


def _dora_factor(spec: LayerSpec, a: AdapterSpec, w: torch.Tensor, scale: float) -> torch.Tensor:
    """``m / ||W + s B A||`` per output feature, shaped to broadcast against the output."""
    merged = w + lora_delta(spec, a, scale=scale)
    norm = merged.norm(dim=0) if spec.kind == "embedding" else merged.flatten(1).norm(dim=1)
    return _t(a.magnitude, False) / norm


def dora_factor(spec: LayerSpec, a: AdapterSpec, scale: float = 1.0) -> torch.Tensor:
    """DoRA's ``m / ||W + s B A||`` per output feature, in float64 from the spec's rounded tensors."""
    return _dora_factor(spec, a, _t(spec.weight, False), scale)


def _out_view(spec: LayerSpec, v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Broadcast a per-output-feature vector against an output of ``ndim`` dims."""
    if spec.kind in ("linear", "embedding"):
        return v
    return v.reshape(-1, *([1] * (ndim - 2)))


def _adapter_output(
    spec: LayerSpec, a: AdapterSpec, x: torch.Tensor, w: torch.Tensor, magnitude: bool, scale: float
) -> torch.Tensor:
    """What adapter ``a`` adds to the base output (eval mode)."""
    y = _apply(spec, lora_delta(spec, a, magnitude=magnitude, scale=scale), x, magnitude)
    if a.bias is not None:
        s = abs(a.scaling * scale) if magnitude else a.scaling * scale
        y = y + s * _out_view(spec, _t(a.bias, magnitude), y.dim())
    if not a.use_dora:
        return y
    wx = _apply(spec, w, x, magnitude)
    factor = _dora_factor(spec, a, _t(spec.weight, False), scale)
    f = _out_view(spec, factor.abs() if magnitude else factor, y.dim())
    if magnitude:
        return f * (wx + y) + wx
    return (f - 1) * wx + f * y


def forward(
    spec: LayerSpec,
    x: torch.Tensor,
    *,
    adapters: Sequence[str] | None = None,
    scales: dict[str, float] | None = None,
    magnitude: bool = False,
) -> torch.Tensor:
    """Eval-mode output of the unmerged layer with ``adapters`` (default: the active ones) on.

    ``scales`` multiplies an adapter's ``alpha / r`` (PEFT's ``set_scale``).
    """
    names = spec.active_adapters if adapters is None else adapters
    scales = scales or {}
    if spec.kind == "mha":
        return _mha_forward(spec, x, names, scales)
    xx = _t(x, magnitude) if x.is_floating_point() else x.to("cpu")
    w = _t(spec.weight, magnitude)
    y = _apply(spec, w, xx, magnitude)
    for name in names:
        y = y + _adapter_output(spec, spec.adapter(name), xx, w, magnitude, scales.get(name, 1.0))
    if spec.base_bias is not None:
        y = y + _out_view(spec, _t(spec.base_bias, magnitude), y.dim())
    return y


def mixed_forward(spec: LayerSpec, x: torch.Tensor, row_adapters: Sequence[str], **kw) -> torch.Tensor:
    """Mixed batch: row ``i`` of ``x`` sees only adapter ``row_adapters[i]`` (or none for __base__)."""
    rows = [
        forward(spec, x[i : i + 1], adapters=[] if n == BASE_ROW else [n], **kw)
        for i, n in enumerate(row_adapters)
    ]
    return torch.cat(rows)


def merged_weights(
    spec: LayerSpec, adapters: Sequence[str] | None = None, *, magnitude: bool = False
) -> dict[str, torch.Tensor]:
    """Base parameters after merging ``adapters`` in order (keys as ``LayerHandle.weights()``).

    With ``magnitude=True``: ``|W| + sum |s||B||A|`` (plus ``|W + sBA|`` terms for DoRA), the scale
    of every value a merge and an unmerge write.
    """
    names = spec.active_adapters if adapters is None else adapters
    out = {k: _t(v, magnitude) for k, v in spec.base_tensors().items()}
    main = "in_proj_weight" if spec.kind == "mha" else "weight"
    for name in names:
        a = spec.adapter(name)
        delta = lora_delta(spec, a, magnitude=magnitude)
        if a.use_dora:
            w = out[main]
            f = _dora_factor(spec, a, w.clone() if not magnitude else _t(spec.weight, False), 1.0)
            f = f.abs() if magnitude else f
            fv = f if spec.kind == "embedding" else f.reshape(-1, *([1] * (w.dim() - 1)))
            out[main] = fv * (w + delta) + (w + delta if magnitude else 0)
        else:
            out[main] = out[main] + delta
        if spec.kind == "mha":
            s = abs(a.scaling) if magnitude else a.scaling
            out["out_proj.weight"] = out["out_proj.weight"] + s * (
                _t(a.out_B, magnitude) @ _t(a.out_A, magnitude)
            )
        if a.bias is not None:
            s = abs(a.scaling) if magnitude else a.scaling
            out["bias"] = out["bias"] + s * _t(a.bias, magnitude)
    return out


def delta_weights(spec: LayerSpec, name: str, *, magnitude: bool = False) -> dict[str, torch.Tensor]:
    """What merging ``name`` alone into the base adds (keys as ``LayerHandle.delta_weights()``)."""
    a = spec.adapter(name)
    keys = ["in_proj_weight", "out_proj.weight"] if spec.kind == "mha" else ["weight"]
    if a.bias is not None:
        keys.append("bias")
    merged = merged_weights(spec, [name], magnitude=magnitude)
    if magnitude:
        return {k: merged[k] for k in keys}
    base = spec.base_tensors()
    return {k: merged[k] - _t(base[k], False) for k in keys}


def _mha_forward(spec: LayerSpec, x: torch.Tensor, names: Sequence[str], scales: dict[str, float]):
    """Self-attention (batch_first) with LoRA on in_proj and out_proj, in float64."""
    return mha_forward_with_error(spec, x, names, scales, None)[0]


def mha_forward_with_error(
    spec: LayerSpec,
    x: torch.Tensor,
    names: Sequence[str],
    scales: dict[str, float],
    unit: tuple[float, float] | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Self-attention in float64 and, when ``unit = (gamma, u_store)`` is given, a first-order
    elementwise bound on the error of a correct implementation (propagated through the projections,
    the logits, the softmax and the output projection) and the magnitude ``|o| |W_out'|``."""
    xx = _t(x, False)
    E, H = spec.weight.shape[1], spec.num_heads
    d = E // H
    w_in, w_out = _t(spec.weight, False), _t(spec.out_weight, False)
    b_in = _t(spec.base_bias, False)
    b_out = _t(spec.out_bias, False)
    d_in = torch.zeros_like(w_in)
    d_out = torch.zeros_like(w_out)
    m_in = w_in.abs().clone()
    m_out = w_out.abs().clone()
    for name in names:
        a = spec.adapter(name)
        s = a.scaling * scales.get(name, 1.0)
        d_in = d_in + s * (_t(a.B, False) @ _t(a.A, False))
        d_out = d_out + s * (_t(a.out_B, False) @ _t(a.out_A, False))
        m_in = m_in + abs(s) * (_t(a.B, True) @ _t(a.A, True))
        m_out = m_out + abs(s) * (_t(a.out_B, True) @ _t(a.out_A, True))
    proj = xx @ (w_in + d_in).T
    if b_in is not None:
        proj = proj + b_in
    N, L, _ = xx.shape
    q, k, v = (t.reshape(N, L, H, d).transpose(1, 2) for t in proj.split(E, dim=-1))
    logits = q @ k.transpose(-1, -2) / d**0.5
    p = torch.softmax(logits, dim=-1)
    o = (p @ v).transpose(1, 2).reshape(N, L, E)
    y = o @ (w_out + d_out).T
    if b_out is not None:
        y = y + b_out
    if unit is None:
        return y, None, None
    g, us = unit  # g(K): gamma for an inner dimension K; us: storage roundoff
    r_tot = sum(spec.adapter(n).r for n in names)
    mproj = xx.abs() @ m_in.T + (b_in.abs() if b_in is not None else 0)
    eproj = (g(E + r_tot) + (3 + 2 * len(names)) * us) * mproj
    eq, ek, ev = (t.reshape(N, L, H, d).transpose(1, 2) for t in eproj.split(E, dim=-1))
    aq, ak, av = (t.abs() for t in (q, k, v))
    elog = eq @ ak.transpose(-1, -2) + aq @ ek.transpose(-1, -2) + (g(d) + us) * (aq @ ak.transpose(-1, -2))
    elog = elog / d**0.5
    # softmax: |dp_ij| <= p_ij (|dl_ij| + sum_k p_ik |dl_ik|), plus rounding of exp/sum/div.
    ep = p * (elog + (p * elog).sum(-1, keepdim=True)) + (g(L) + 3 * us) * p
    # Both p and its computed value lie in [0, 1 + rounding]: past that the first-order term says nothing.
    ep = ep.clamp(max=1 + g(L) + 3 * us)
    eo = (ep @ v.abs() + p @ ev + (g(L) + us) * (p @ v.abs())).transpose(1, 2).reshape(N, L, E)
    ao = o.abs()
    ey = eo @ m_out.T + (g(E + r_tot) + (3 + 2 * len(names)) * us) * (ao @ m_out.T)
    mag = ao @ m_out.T
    if b_out is not None:
        ey = ey + us * b_out.abs()
        mag = mag + b_out.abs()
    return y, ey, mag


Intermediate = tuple[str, torch.Tensor, torch.Tensor]
"""``(what, exact value, magnitude)`` of one value an implementation may hold in the storage dtype."""


def intermediates(
    spec: LayerSpec,
    x: torch.Tensor | None,
    names: Sequence[str],
    scales: dict[str, float] | None = None,
    *,
    input_gain: float = 1.0,
) -> list[Intermediate]:
    """Every value a correct implementation may store in the layer's dtype on the way to the output,
    exact and with its magnitude, for both the unmerged and the merged path: ``W x + b``, per adapter
    ``B (A x)`` and ``s B (A x)`` (and DoRA's ``f W x``, ``f s B A x``), the sum of the output's terms
    in any order (bounded by the sum of their absolute values), ``B A``, ``s B A``, the merged weights
    ``W + sum s B A`` (DoRA: ``f (W + s B A)``), and for attention the q/k/v projections and the
    unscaled logits ``q k^T``. ``x = None``: the weights only (a merge). ``input_gain`` multiplies the
    LoRA input (inverted dropout keeps ``x / (1 - p)``).

    Half-precision products accumulate in float32 (or wider), whose range is that of float64 for our
    purposes; what can overflow is what is *stored*, and that is what is listed here."""
    scales = scales or {}
    out: list[Intermediate] = []
    mats = ["in_proj_weight", "out_proj.weight"] if spec.kind == "mha" else ["weight"]
    merged = {k: (_t(v, False).abs(), _t(v, True)) for k, v in spec.base_tensors().items()}
    for name in names:
        a = spec.adapter(name)
        s_adapter = a.scaling * scales.get(name, 1.0)
        facs = [(a.A, a.B)] + ([(a.out_A, a.out_B)] if spec.kind == "mha" else [])
        for key, (A, B) in zip(mats, facs, strict=False):
            s = s_adapter
            if spec.kind == "mha":
                ba, ba_m = _t(B, False) @ _t(A, False), _t(B, True) @ _t(A, True)
            else:
                ba, ba_m = lora_product(spec, a), lora_product(spec, a, magnitude=True)
            out += [("B A", ba, ba_m), ("s B A", s * ba, abs(s) * ba_m)]
            w = _t(spec.base_tensors()[key], False)
            if a.use_dora:
                f = _dora_factor(spec, a, w, scales.get(name, 1.0))
                fv = f if spec.kind == "embedding" else f.reshape(-1, *([1] * (w.dim() - 1)))
                out += [("W + s B A", w + s * ba, w.abs() + abs(s) * ba_m)]
                ba, ba_m = fv * (w + s * ba) - w, fv.abs() * (w.abs() + abs(s) * ba_m) + w.abs()
                s = 1.0
            merged[key] = (merged[key][0] + (s * ba).abs(), merged[key][1] + abs(s) * ba_m)
        if a.bias is not None:
            lb = abs(s_adapter) * _t(a.bias, True)
            merged["bias"] = (merged["bias"][0] + lb, merged["bias"][1] + lb)
    out += [(f"merged {k}", v, m) for k, (v, m) in merged.items()]
    if x is None:
        return out
    if spec.kind == "mha":
        return out + _mha_intermediates(spec, x, names, scales, input_gain)
    xx = _t(x, False) if x.is_floating_point() else x.to("cpu")
    xa = _t(x, True) if x.is_floating_point() else xx
    w = _t(spec.weight, False)
    base, base_m = _apply(spec, w, xx, False), _apply(spec, w.abs(), xa, True)
    if spec.base_bias is not None:
        b = _out_view(spec, _t(spec.base_bias, False), base.dim())
        base, base_m = base + b, base_m + b.abs()
    out.append(("W x + b", base, base_m))
    total, total_m = base.abs(), base_m
    for name in names:
        a = spec.adapter(name)
        scale = scales.get(name, 1.0)
        s = a.scaling * scale
        ba, ba_m = lora_product(spec, a), lora_product(spec, a, magnitude=True)
        a_w = _t(a.A, False).T if spec.kind == "embedding" else _t(a.A, False)
        out.append(
            ("A x", input_gain * _apply(spec, a_w, xx, False), input_gain * _apply(spec, a_w.abs(), xa, True))
        )
        bax, bax_m = input_gain * _apply(spec, ba, xx, False), input_gain * _apply(spec, ba_m, xa, True)
        out += [("B (A x)", bax, bax_m), ("s B (A x)", s * bax, abs(s) * bax_m)]
        term, term_m = s * bax, abs(s) * bax_m
        if a.bias is not None:
            lb = _out_view(spec, _t(a.bias, False), base.dim()) * s
            term, term_m = term + lb, term_m + lb.abs()
        if a.use_dora:
            f = _out_view(spec, _dora_factor(spec, a, w, scale), base.dim())
            wx = base - (
                _out_view(spec, _t(spec.base_bias, False), base.dim()) if spec.base_bias is not None else 0
            )
            out += [("DoRA f W x", f * wx, f.abs() * base_m), ("DoRA f s B A x", f * term, f.abs() * term_m)]
            term, term_m = (f - 1) * wx + f * term, (f.abs() + 1) * base_m + f.abs() * term_m
        total, total_m = total + term.abs(), total_m + term_m
    out.append(("sum of the output's terms", total, total_m))
    return out


def _mha_intermediates(spec, x, names, scales, input_gain) -> list[Intermediate]:
    """Attention's stored values: the in/out projections (split into their terms) and ``q k^T``
    before the ``1 / sqrt(d)`` (an implementation may scale before or after the product)."""
    xx, xa = _t(x, False), _t(x, True)
    E, H = spec.weight.shape[1], spec.num_heads
    d = E // H
    out: list[Intermediate] = []

    def projection(inp, inp_m, w, b, factors, what):
        base, base_m = inp @ _t(w, False).T, inp_m @ _t(w, True).T
        if b is not None:
            base, base_m = base + _t(b, False), base_m + _t(b, True)
        out.append((f"{what} W x + b", base, base_m))
        total, total_m = base.abs(), base_m
        exact = base
        for s, A, B in factors:
            hid, hid_m = input_gain * inp @ _t(A, False).T, input_gain * inp_m @ _t(A, True).T
            bh, bh_m = hid @ _t(B, False).T, hid_m @ _t(B, True).T
            out.extend([(f"{what} A x", hid, hid_m), (f"{what} B (A x)", bh, bh_m)])
            out.append((f"{what} s B (A x)", s * bh, abs(s) * bh_m))
            total, total_m, exact = total + (s * bh).abs(), total_m + abs(s) * bh_m, exact + s * bh
        out.append((f"{what} sum of terms", total, total_m))
        return exact, total_m

    ss = [spec.adapter(n).scaling * scales.get(n, 1.0) for n in names]
    ads = [spec.adapter(n) for n in names]
    proj, proj_m = projection(
        xx,
        xa,
        spec.weight,
        spec.base_bias,
        [(s, a.A, a.B) for s, a in zip(ss, ads, strict=True)],
        "in-projection",
    )
    N, L, _ = xx.shape
    q, k, v = (t.reshape(N, L, H, d).transpose(1, 2) for t in proj.split(E, dim=-1))
    mq, mk, _ = (t.reshape(N, L, H, d).transpose(1, 2) for t in proj_m.split(E, dim=-1))
    out.append(("q k^T", q @ k.transpose(-1, -2), mq @ mk.transpose(-1, -2)))
    p = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    o = (p @ v).transpose(1, 2).reshape(N, L, E)
    projection(
        o,
        o.abs(),
        spec.out_weight,
        spec.out_bias,
        [(s, a.out_A, a.out_B) for s, a in zip(ss, ads, strict=True)],
        "out-projection",
    )
    return out
