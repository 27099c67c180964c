"""Float64 answers for whole models, module by module.

A merged model is a set of merged modules, so each adapted module is judged by the layer half's
oracle and precision model: :func:`layer_spec` turns one module of a :class:`ModelSpec` (its exact
base weight and bias, and the factors each adapter puts on it) into a
:class:`~properties.spec.LayerSpec`. The weighted combination of adapters (``add_weighted_adapter``
with ``cat``) is one adapter whose delta is the weighted sum of the deltas, computed in float64 here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from properties.models.spec import ModelSpec
from properties.models.strategies import layout, module_weight
from properties.spec import AdapterSpec, LayerSpec


def layer_spec(
    spec: ModelSpec,
    path: str,
    adapters: Sequence[str] | None = None,
    base: dict[str, torch.Tensor] | None = None,
) -> LayerSpec:
    """The module at ``path`` as a layer-half spec, with the adapters (default: the active ones) that
    target it, in that order. ``base`` overrides the base tensors (e.g. a model's current ones)."""
    _, _, facts = layout(spec)
    f = facts[path]
    base = spec.base if base is None else base
    names = spec.active_adapters if adapters is None else adapters
    factors = tuple(
        replace(spec.adapter(n).modules[path], name=n) for n in names if path in spec.adapter(n).modules
    )
    return LayerSpec(
        kind=f["kind"],
        dtype=spec.dtype,
        weight=module_weight(spec, path, base),
        adapters=factors,
        base_bias=base.get(f"{path}.bias") if f["bias"] else None,
        fan_in_fan_out=f["fan_in_fan_out"],
        padding_idx=f["padding_idx"],
        conv=f.get("conv"),
        device=spec.device,
        seed=spec.seed,
    )


def weighted_cat_spec(
    spec: ModelSpec, path: str, names: Sequence[str], weights: Sequence[float]
) -> LayerSpec:
    """The module with one adapter whose delta is ``sum_i w_i s_i B_i A_i`` exactly (float64 factors,
    scaling 1): the answer ``add_weighted_adapter(..., combination_type="cat")`` must give."""
    ls = layer_spec(spec, path, [])
    As, Bs = [], []
    for n, w in zip(names, weights, strict=True):
        a = spec.adapter(n).modules.get(path)
        if a is None:
            continue
        As.append(a.A.to("cpu", torch.float64))
        Bs.append(a.B.to("cpu", torch.float64) * (w * a.scaling))
    A, B = torch.cat(As, 0), torch.cat(Bs, 1)
    r = A.shape[0]
    return ls.with_adapters((AdapterSpec(name="weighted", r=r, alpha=float(r), A=A, B=B),))


def adapter_numel(spec: ModelSpec, names: Sequence[str] | None = None) -> int:
    """How many numbers the adapters hold (what a saved adapter file must hold, and no more)."""
    names = spec.adapter_names if names is None else names
    return sum(t.numel() for n in names for t in spec.adapter(n).tensors().values())
