"""Adapter bookkeeping, merge/unmerge and the forward pass shared by every LoRA layer.

A subclass only says how its factors are shaped, how the LoRA branch runs and what
weight delta it stands for; everything stateful (active set, merging, safe merge,
DoRA norm cache, exact unmerge) lives here so that it behaves the same for all kinds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import LoraConfig

BASE = "__base__"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Deltas are formed in float64 for float64 bases and in float32 otherwise, then rounded once."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nonfinite_kind(exact: torch.Tensor, rounded: torch.Tensor) -> str | None:
    if torch.isnan(exact).any():
        return "NaN"
    for sign, bad in (("+", exact == math.inf), ("-", exact == -math.inf)):
        if bad.any():
            return f"{sign}Inf"
    if not torch.isfinite(rounded).all():
        sign = "+" if (rounded == math.inf).any() else "-"
        return f"{sign}Inf from overflow when rounding to {rounded.dtype}"
    return None


@dataclass
class MergePlan:
    """What one layer's merge writes: the adapters, the new (rounded) parameters, the DoRA norms."""

    names: list[str]
    values: dict[str, torch.Tensor]
    cache: dict[str, torch.Tensor]


class LoraLayer(nn.Module):
    """Base class: ``output = base_layer(x) + sum_a scaling_a * B_a(A_a(dropout_a(x)))``.

    Subclasses implement ``_factor_shapes``, ``_branch``, ``_apply_weight``, ``_lora_deltas``
    and, where the weight is not stored output-major, ``_out_major``.
    """

    merge_params: tuple[str, ...] = ("weight", "bias")
    supports_dora = True
    supports_bias = True

    def __init__(self, base_layer: nn.Module, exact_unmerge: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.exact_unmerge = exact_unmerge
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_out_A = nn.ParameterDict()
        self.lora_out_B = nn.ParameterDict()
        self.lora_bias = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.use_dora: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        self._active: list[str] = []
        self._disable_adapters = False
        self._caches: dict[str, torch.Tensor] = {}
        self._originals: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ hooks
    def _factor_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Unscaled ``B(A(x))`` without the LoRA bias."""
        raise NotImplementedError

    def _apply_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The base weight applied to ``x`` without the base bias (DoRA needs ``W x``)."""
        raise NotImplementedError

    def _weight_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``scaling * B A`` in the base weight's storage layout, computed in ``dtype``."""
        raise NotImplementedError

    def _out_major(self, w: torch.Tensor) -> torch.Tensor:
        """View of a storage-layout weight with output features on dim 0 (its own inverse)."""
        return w

    def _broadcast(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Shape a per-output-feature vector to broadcast against a layer output."""
        return v

    def _check_config(self, config: LoraConfig) -> None:
        """Kind-specific rejections (e.g. ``r`` not divisible by conv groups)."""

    def _init_factors(self, name: str, init_lora_weights: bool) -> None:
        """As PEFT: ``A`` kaiming-uniform, ``B`` zero (kaiming-uniform too when not ``init_lora_weights``)."""
        for a_store, b_store in ((self.lora_A, self.lora_B), (self.lora_out_A, self.lora_out_B)):
            if name in a_store:
                nn.init.kaiming_uniform_(a_store[name], a=math.sqrt(5))
                if init_lora_weights:
                    nn.init.zeros_(b_store[name])
                else:
                    nn.init.kaiming_uniform_(b_store[name], a=math.sqrt(5))

    # ------------------------------------------------------------- utilities
    def _param(self, pname: str) -> nn.Parameter | None:
        module = self.base_layer
        *path, leaf = pname.split(".")
        for part in path:
            module = getattr(module, part)
        return getattr(module, leaf, None)

    @property
    def base_weight(self) -> nn.Parameter:
        return self._param(self.merge_params[0])

    def _known(self, names: Sequence[str], allow_base: bool = False) -> None:
        for name in names:
            if name not in self.r and not (allow_base and name == BASE):
                raise ValueError(f"unknown adapter {name!r}; known adapters: {sorted(self.r)}")

    def _stores(self) -> tuple[nn.ParameterDict, ...]:
        return (
            self.lora_A,
            self.lora_B,
            self.lora_out_A,
            self.lora_out_B,
            self.lora_bias,
            self.lora_magnitude,
        )

    def _check_unmerged(self, name: str, action: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; unmerge first before {action}")

    # ------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def disable_adapters(self) -> bool:
        return self._disable_adapters

    def enable_adapters(self, enabled: bool) -> None:
        """Disabled adapters make ``forward`` return exactly ``base_layer(x)``."""
        self._disable_adapters = not enabled

    def set_adapter(self, names: str | Sequence[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self._known(names)
        self._active = names

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Create the factors of a new adapter (base dtype and device) and make it active."""
        if not isinstance(name, str) or not name or "." in name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string without '.', not {BASE!r}: {name!r}")
        if name in self.r:
            raise ValueError(f"adapter {name!r} already exists")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        kind = type(self).__name__
        if config.use_dora and not self.supports_dora:
            raise ValueError(f"use_dora=True is not supported for {kind}")
        if config.lora_bias and not self.supports_bias:
            raise ValueError(f"lora_bias=True is not supported for {kind}")
        if config.lora_bias and self._param("bias") is None:
            raise ValueError(f"lora_bias=True needs a base layer with a bias; {kind}'s base has bias=None")
        self._check_config(config)
        weight = self.base_weight
        new = lambda shape: nn.Parameter(torch.empty(shape, dtype=weight.dtype, device=weight.device))  # noqa: E731
        for key, shape in self._factor_shapes(config.r).items():
            getattr(self, f"lora_{key}")[name] = new(shape)
        if (
            config.lora_bias
        ):  # zero like PEFT's lora_B bias, random like nn.Linear's when not init_lora_weights
            bias = torch.zeros_like(self._param("bias"))
            if not config.init_lora_weights:
                nn.init.uniform_(bias, -(config.r**-0.5), config.r**-0.5)
            self.lora_bias[name] = nn.Parameter(bias)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.r[name], self.lora_alpha[name] = int(config.r), float(config.lora_alpha)
        self.use_rslora[name], self.use_dora[name] = config.use_rslora, config.use_dora
        self.scaling[name] = self._default_scaling(name)
        with torch.no_grad():
            self._init_factors(name, config.init_lora_weights)
            if config.use_dora:
                norm = self._weight_norm(name, self.base_weight.to(compute_dtype(weight.dtype)))
                self.lora_magnitude[name] = nn.Parameter(norm.to(weight.dtype))
        self._active.append(name)

    def load_factors(
        self,
        name: str,
        A: torch.Tensor | None = None,
        B: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        magnitude: torch.Tensor | None = None,
        out_A: torch.Tensor | None = None,
        out_B: torch.Tensor | None = None,
    ) -> None:
        """Copy exact values into an adapter's factors (cast to the base dtype); shapes must match."""
        self._known([name])
        self._check_unmerged(name, "loading factors")
        given = {"A": A, "B": B, "bias": bias, "magnitude": magnitude, "out_A": out_A, "out_B": out_B}
        given = {k: None if v is None else torch.as_tensor(v) for k, v in given.items()}
        for key, value in given.items():
            if value is None:
                continue
            store = getattr(self, f"lora_{key}")
            if name not in store:
                raise ValueError(f"adapter {name!r} of {type(self).__name__} has no {key!r} factor")
            if tuple(value.shape) != tuple(store[name].shape):
                raise ValueError(
                    f"{key} for adapter {name!r}: expected shape {tuple(store[name].shape)}, "
                    f"got {tuple(value.shape)}"
                )
        with torch.no_grad():
            for key, value in given.items():
                if value is not None:
                    getattr(self, f"lora_{key}")[name].copy_(value)

    def delete_adapter(self, name: str) -> None:
        self._known([name])
        self._check_unmerged(name, "deleting it")
        for store in (*self._stores(), self.lora_dropout):
            if name in store:
                del store[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.use_rslora, self.use_dora):
            del table[name]
        self._active = [a for a in self._active if a != name]

    # -------------------------------------------------------------- scaling
    def _default_scaling(self, name: str) -> float:
        r = self.r[name]
        return self.lora_alpha[name] / (math.sqrt(r) if self.use_rslora[name] else r)

    def set_scale(self, name: str, scale: float) -> None:
        """``scaling = scale * alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        self._known([name])
        self._check_unmerged(name, "changing its scale")
        self.scaling[name] = scale * self._default_scaling(name)

    def scale_layer(self, factor: float) -> None:
        for name in self._active:
            self._check_unmerged(name, "changing its scale")
        for name in self._active:
            self.scaling[name] *= factor

    def unscale_layer(self, factor: float | None = None) -> None:
        """Divide active scalings by ``factor``; ``None`` resets them to the configured value."""
        if factor == 0:
            raise ValueError("unscale_layer factor must be non-zero, got 0")
        for name in self._active:
            self._check_unmerged(name, "changing its scale")
        for name in self._active:
            default = self._default_scaling(name)
            self.scaling[name] = default if factor is None else self.scaling[name] / factor

    # ----------------------------------------------------------------- DoRA
    def _weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Per-output-feature norm of ``W + scaling * B A`` (in ``weight``'s dtype, storage layout)."""
        total = self._out_major(weight + self._weight_delta(name, weight.dtype))
        return total.flatten(1).norm(dim=1)

    def _scale_rows(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        w = self._out_major(weight)
        return self._out_major(w * factor.view(-1, *[1] * (w.dim() - 1)))

    # ---------------------------------------------------------------- merge
    def _lora_deltas(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Plain LoRA deltas keyed by base parameter name (storage layout, in ``dtype``)."""
        deltas = {self.merge_params[0]: self._weight_delta(name, dtype)}
        if name in self.lora_bias:
            deltas["bias"] = self.scaling[name] * self.lora_bias[name].to(dtype)
        return deltas

    def _merged_values(self, name: str, cur: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor | None]:
        """Exact (unrounded) values the merge of ``name`` writes, and the DoRA norm to cache."""
        deltas = self._lora_deltas(name, next(iter(cur.values())).dtype)
        new = {k: cur[k] + d for k, d in deltas.items()}
        if not self.use_dora[name]:
            return new, None
        key = self.merge_params[0]
        norm = self._out_major(new[key]).flatten(1).norm(dim=1)
        new[key] = self._scale_rows(new[key], self.lora_magnitude[name].to(norm.dtype) / norm)
        return new, norm

    def _unmerged_values(self, name: str, cur: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        deltas = self._lora_deltas(name, next(iter(cur.values())).dtype)
        old = {k: cur[k] - d for k, d in deltas.items()}
        if self.use_dora[name]:
            key, norm = self.merge_params[0], self._caches[f"{name}-weight_norm"]
            scaled = self._scale_rows(cur[key], norm / self.lora_magnitude[name].to(norm.dtype))
            old[key] = scaled - deltas[key]
        return old

    def _current(self) -> dict[str, torch.Tensor]:
        return {p: self._param(p).detach() for p in self.merge_params if self._param(p) is not None}

    def get_delta_weights(self, name: str) -> dict[str, torch.Tensor]:
        """What merging ``name`` now would add to each base parameter (storage layout, base dtype)."""
        self._known([name])
        cur = self._current()
        fp = {k: v.to(compute_dtype(v.dtype)) for k, v in cur.items()}
        with torch.no_grad():
            deltas = self._lora_deltas(name, fp[self.merge_params[0]].dtype)
            if self.use_dora[name]:
                key = self.merge_params[0]
                deltas[key] = self._merged_values(name, fp)[0][key] - fp[key]
        return {k: v.to(cur[k].dtype) for k, v in deltas.items()}

    def get_delta_weight(self, name: str) -> torch.Tensor:
        return self.get_delta_weights(name)[self.merge_params[0]]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters into the base weights, each rounded once to the base dtype.

        With ``safe_merge`` every value is computed first and checked finite (also after rounding);
        on failure nothing at all is changed.
        """
        plan = self.plan_merge(safe_merge, adapter_names)
        if plan is not None:
            self.commit_merge(plan)

    @torch.no_grad()
    def plan_merge(
        self, safe_merge: bool = False, adapter_names: Sequence[str] | None = None
    ) -> MergePlan | None:
        """Everything a merge would write, computed and (with ``safe_merge``) checked, nothing written.

        A model-level safe merge plans every layer before committing any (``lora_core.model``)."""
        names = self._active if adapter_names is None else adapter_names
        names = [names] if isinstance(names, str) else list(names)
        self._known(names)
        for name in names:
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; skipping", UserWarning, stacklevel=3)
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return None
        cur, cache = self._current(), {}
        for name in names:
            fp = {k: v.to(compute_dtype(v.dtype)) for k, v in cur.items()}
            new, norm = self._merged_values(name, fp)
            for key, value in new.items():
                rounded = value.to(cur[key].dtype)
                kind = _nonfinite_kind(value, rounded) if safe_merge else None
                if kind is not None:
                    raise ValueError(
                        f"safe_merge: merging adapter {name!r} would make {key!r} non-finite ({kind}); "
                        "nothing was changed"
                    )
                cur[key] = rounded
            if norm is not None:
                cache[f"{name}-weight_norm"] = norm
        return MergePlan(names, cur, cache)

    @torch.no_grad()
    def commit_merge(self, plan: MergePlan) -> None:
        """Write what :meth:`plan_merge` computed."""
        if self.exact_unmerge and self._originals is None:
            self._originals = {k: v.clone() for k, v in self._current().items()}
        self._write(plan.values)
        self._caches.update(plan.cache)
        self.merged_adapters.extend(plan.names)

    def _write(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self._param(key).copy_(value)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo all merges, last in first out; bit-exact when ``exact_unmerge`` is on."""
        if not self.merged:
            warnings.warn("nothing is merged; unmerge() does nothing", UserWarning, stacklevel=3)
            return
        if self._originals is not None:
            self._write(self._originals)
            self._originals = None
        else:
            for name in reversed(self.merged_adapters):
                cur = self._current()
                fp = {k: v.to(compute_dtype(v.dtype)) for k, v in cur.items()}
                self._write({k: v.to(cur[k].dtype) for k, v in self._unmerged_values(name, fp).items()})
        for name in self.merged_adapters:
            self._caches.pop(f"{name}-weight_norm", None)
        self.merged_adapters = []

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and hand back the (same, plain) base module."""
        if any(n not in self.merged_adapters for n in self._active):
            self.merge()
        self._originals = None
        return self.base_layer

    # -------------------------------------------------------------- forward
    def _lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The adapter's additive contribution to ``base_layer(x)``."""
        if x.is_floating_point():
            x = x.to(self.lora_A[name].dtype)
        x = self.lora_dropout[name](x)
        scaling = self.scaling[name]
        out = self._branch(name, x) * scaling
        if name in self.lora_bias:
            out = out + self._broadcast(self.lora_bias[name] * scaling, out)
        if self.use_dora[name]:
            weight = self.base_weight
            with torch.no_grad():  # the norm is a constant for autograd, as in PEFT (DoRA paper sec. 4.3)
                norm = self._weight_norm(name, weight.detach().to(compute_dtype(weight.dtype)))
            factor = self.lora_magnitude[name].to(norm.dtype) / norm
            factor = self._broadcast(factor.to(out.dtype), out)
            out = (factor - 1) * self._apply_weight(x) + factor * out
        return out

    def _mixed_rows(self, adapter_names: Sequence[str], batch: int) -> dict[str, torch.Tensor]:
        if self.merged:
            raise ValueError(f"mixed-batch forward is not possible while merged ({self.merged_adapters})")
        if len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch} rows")
        self._known(adapter_names, allow_base=True)
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            if name != BASE:
                rows.setdefault(name, []).append(i)
        return {n: torch.tensor(i, device=self.base_weight.device) for n, i in rows.items()}

    def _pending(self) -> list[str]:
        return [n for n in self._active if n not in self.merged_adapters]

    def _disabled_check(self) -> None:
        if self.merged:
            warnings.warn("adapters are disabled but merged: unmerging first", UserWarning, stacklevel=3)
            self.unmerge()

    def forward(self, x: torch.Tensor, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """Merged adapters already live in the base weights; active unmerged ones are added."""
        if self._disable_adapters:
            self._disabled_check()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            for name, idx in self._mixed_rows(adapter_names, x.shape[0]).items():
                result = result.index_add(0, idx, self._lora_output(name, x[idx]).to(result.dtype))
            return result
        for name in self._pending():
            result = result + self._lora_output(name, x).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"adapters={list(self.r)}, active={self._active}, merged={self.merged_adapters}"
