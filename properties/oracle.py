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
    A, B = _t(a.A, magnitude), _t(a.B, magnitude)
    s = abs(a.scaling * scale) if magnitude else a.scaling * scale
    if spec.kind in ("linear", "mha"):
        return s * (B @ A)
    if spec.kind == "embedding":
        return s * (B @ A).T
    g = spec.conv.groups
    out, rg = B.shape[0], B.shape[1]
    Bg = B.reshape(g, out // g, rg)
    Ag = A.reshape(g, rg, -1)
    return s * torch.bmm(Bg, Ag).reshape(spec.weight.shape)


def _dora_factor(spec: LayerSpec, a: AdapterSpec, w: torch.Tensor, scale: float) -> torch.Tensor:
    """``m / ||W + s B A||`` per output feature, shaped to broadcast against the output."""
    merged = w + lora_delta(spec, a, scale=scale)
    norm = merged.norm(dim=0) if spec.kind == "embedding" else merged.flatten(1).norm(dim=1)
    return _t(a.magnitude, False) / norm


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
    eo = (ep @ v.abs() + p @ ev + (g(L) + us) * (p @ v.abs())).transpose(1, 2).reshape(N, L, E)
    ao = o.abs()
    ey = eo @ m_out.T + (g(E + r_tot) + (3 + 2 * len(names)) * us) * (ao @ m_out.T)
    mag = ao @ m_out.T
    if b_out is not None:
        ey = ey + us * b_out.abs()
        mag = mag + b_out.abs()
    return y, ey, mag
